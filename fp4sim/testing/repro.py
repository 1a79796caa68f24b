"""Reproduction scripts for failures found by `fp4sim check`.

``write_repro_script`` writes a standalone Python file holding the check's configuration
and the shrunk case's description (distribution, parameters, shape, dtype, seed; plus the
Hypothesis ``@reproduce_failure`` blob as a comment). Running it regenerates the input from
the seed with the NumPy generators, calls the kernel once, prints the diagnosis and exits
1 when the failure reproduces (0 when the kernel now agrees).
"""

from __future__ import annotations

import dataclasses
import os
import pprint
import sys
from pathlib import Path
from typing import Any

import numpy as np

from fp4sim.harness import KernelWorker, load_inputs_file
from fp4sim.judge.inputs import (
    AttentionCase,
    AttentionInputSpec,
    generate_attention_inputs,
    generate_tensor,
    round_to_dtype,
)
from fp4sim.testing import check_attention, check_quantizer
from fp4sim.testing.strategies import TensorCase

__all__ = ["case_to_json", "rerun", "write_repro_script"]

_TEMPLATE = '''#!/usr/bin/env python
"""Reproduces a failure found by `fp4sim check {what}`.

Run: python {name}   (exit 1: the failure reproduces; exit 0: the kernel now agrees)
{blob_line}"""

import sys

sys.path.insert(0, {cwd!r})

from fp4sim.testing.repro import rerun

CONFIG = {config}
CASE = {case}

if __name__ == "__main__":
    sys.exit(rerun({what!r}, CONFIG, CASE))
'''


def case_to_json(case: Any) -> dict[str, Any]:
    """The JSON-able description of a TensorCase or AttentionCase (arrays omitted)."""
    if isinstance(case, TensorCase):
        return {
            "distribution": case.distribution,
            "params": [list(p) for p in case.params],
            "shape": list(case.shape),
            "block_size": case.block_size,
            "dtype": case.dtype,
            "seed": case.seed,
        }
    if isinstance(case, AttentionCase):
        out = {
            "spec": dataclasses.asdict(case.spec),
            "seed": case.seed,
            "causal": case.causal,
            "sm_scale": case.sm_scale,
        }
        if case.source is not None:  # captured activations: re-read from the file
            out["inputs"] = os.path.abspath(case.source)
        return out
    raise TypeError(f"cannot describe a {type(case).__name__}")


def _case_from_json(what: str, data: dict[str, Any]) -> Any:
    if what == "quantizer":
        params = tuple((k, v) for k, v in data["params"])
        shape = tuple(data["shape"])
        x = generate_tensor(
            np.random.default_rng(data["seed"]),
            shape,
            data["distribution"],
            block_size=data["block_size"],
            dtype=data["dtype"],
            **dict(params),
        )
        return TensorCase(
            distribution=data["distribution"],
            params=params,
            shape=shape,
            block_size=data["block_size"],
            dtype=data["dtype"],
            seed=data["seed"],
            x=x,
        )
    spec = AttentionInputSpec(**data["spec"])
    do = None
    if data.get("inputs"):
        arrays = load_inputs_file(data["inputs"])
        q, k, v = (round_to_dtype(arrays[n], spec.dtype) for n in ("q", "k", "v"))
        do = arrays.get("do")
    else:
        q, k, v = generate_attention_inputs(np.random.default_rng(data["seed"]), spec)
    return AttentionCase(
        spec=spec,
        seed=data["seed"],
        causal=data["causal"],
        sm_scale=data["sm_scale"],
        q=q,
        k=k,
        v=v,
        do=do,
        source=data.get("inputs"),
    )


def write_repro_script(
    path: str | os.PathLike[str], what: str, config: Any, case: Any, blob: str | None
) -> Path:
    """Write the reproduction script for ``case`` under ``config`` (a Quantizer- or
    AttentionCheckConfig) to ``path``; returns the path."""
    if what not in ("quantizer", "attention"):
        raise ValueError(f"what must be 'quantizer' or 'attention', got {what!r}")
    path = Path(path)
    text = _TEMPLATE.format(
        what=what,
        name=path.name,
        blob_line=(
            f"\nHypothesis: {blob}\n(add it above the property test to replay the same draw)\n"
            if blob
            else ""
        ),
        cwd=os.getcwd(),
        config=pprint.pformat(config.to_json(), sort_dicts=False),
        case=pprint.pformat(case_to_json(case), sort_dicts=False),
    )
    path.write_text(text)
    return path


def rerun(what: str, config_json: dict[str, Any], case_json: dict[str, Any]) -> int:
    """Re-run one case of a check; prints the diagnosis; 1 = disagreement, 0 = agreement."""
    case = _case_from_json(what, case_json)
    if what == "quantizer":
        qconfig = check_quantizer.QuantizerCheckConfig.from_json(config_json)
        with KernelWorker(qconfig.kernel, kind="quantizer", timeout=qconfig.timeout,
                          device=qconfig.device) as worker:
            input_type = check_quantizer.probe_quantizer(worker, qconfig)
            text, _ = check_quantizer.evaluate_quantizer_case(worker, case, qconfig, input_type)
    else:
        aconfig = check_attention.AttentionCheckConfig.from_json(config_json)
        with KernelWorker(aconfig.kernel, spec_overrides=aconfig.kernel_overrides,
                          timeout=aconfig.timeout, device=aconfig.device) as worker:
            assert worker.spec is not None
            aconfig = check_attention.effective_config(aconfig, worker.spec)
            outcome = check_attention.evaluate_attention_case(worker, case, aconfig)
        text = None if outcome.ok else outcome.describe(case)
    if text is None:
        print(f"{what} check: the kernel agrees on {case!r}")
        return 0
    print(f"{what} check: failure reproduced on {case!r}", file=sys.stderr)
    print(text, file=sys.stderr)
    return 1
