"""Tests of `fp4sim simulate`: tasks, spike counter, verdicts, the training loop, the CLI."""

from __future__ import annotations

import copy
import json
import math
import textwrap

import numpy as np
import pytest
import torch

from fp4sim.simulate import metrics
from fp4sim.simulate.config import TrainingConfig, get_preset, with_overrides
from fp4sim.simulate.model import (
    apply_rotary,
    build_model,
    masked_cross_entropy,
    rotary_tables,
)
from fp4sim.simulate.tasks import (
    ABSENT_SHARE,
    MANYKEYS_VALUES,
    generate_absentkeys,
    generate_copy,
    generate_majority,
    generate_manykeys,
    generate_pairs,
    generate_recall,
    get_task,
    pairs_layout,
    recall_layout,
)
from fp4sim.simulate.training import (
    DeviceBatch,
    derive_seeds,
    to_device,
    train_variant,
    training_step,
)
from fp4sim.simulate.variants import (
    VALID_VARIANTS,
    SimulationSetupError,
    Variant,
    build_variant,
    check_variant_names,
    resolve_recipe,
)


def tiny_config(**overrides: object):
    settings = dict(steps=3, batch_size=2, seq_len=32, width=32, n_heads=1, n_layers=2,
                    eval_batches=1, diagnostic_checkpoints=2, diagnostic_batch=1, log_every=1)
    settings.update(overrides)
    return with_overrides(get_preset("cpu"), **settings)


def exact_attention(q, k, v, causal, sm_scale):  # noqa: ANN001, ANN201
    scores = (q @ k.transpose(-1, -2)) * sm_scale
    if causal:
        length = q.shape[-2]
        mask = torch.ones(length, length, dtype=torch.bool).tril()
        scores = scores.masked_fill(~mask, float("-inf"))
    return scores.softmax(-1) @ v


# -- tasks ------------------------------------------------------------------------------


@pytest.mark.parametrize("seq_len", [8, 32, 64])
def test_copy_task_repeats_the_first_half_and_scores_it(seq_len: int) -> None:
    batch = generate_copy(np.random.default_rng(1), 3, seq_len, 32)
    tokens = np.concatenate([batch.inputs[:, :1], batch.targets], axis=1)
    half = seq_len // 2
    assert tokens.shape == (3, seq_len + 1)
    assert (tokens[:, 0] == 0).all()
    np.testing.assert_array_equal(tokens[:, 1:1 + half], tokens[:, 1 + half:])
    np.testing.assert_array_equal(batch.inputs[:, 1:], batch.targets[:, :-1])
    scored_tokens = np.flatnonzero(batch.scored[0]) + 1
    np.testing.assert_array_equal(scored_tokens, np.arange(1 + half, seq_len + 1))


@pytest.mark.parametrize(("seq_len", "vocab"), [(16, 32), (128, 32), (64, 12)])
def test_recall_answers_are_the_values_bound_to_the_queried_keys(seq_len: int,
                                                                 vocab: int) -> None:
    batch = generate_recall(np.random.default_rng(2), 4, seq_len, vocab)
    num_keys, pairs, queries = recall_layout(seq_len, vocab)
    assert batch.scored.sum(axis=1).tolist() == [queries] * 4
    for row in range(4):
        tokens = np.concatenate([batch.inputs[row, :1], batch.targets[row]])
        context = tokens[1:1 + 2 * pairs]
        keys, values = context[0::2], context[1::2]
        assert len(set(keys.tolist())) == pairs
        assert ((keys >= 1) & (keys <= num_keys)).all()
        assert ((values > num_keys) & (values < vocab)).all()
        binding = dict(zip(keys.tolist(), values.tolist(), strict=True))
        for target_position in np.flatnonzero(batch.scored[row]):
            query = tokens[target_position]  # the token read just before the answer
            assert tokens[target_position + 1] == binding[int(query)]


@pytest.mark.parametrize(("seq_len", "vocab"), [(16, 81), (64, 81), (64, 36), (12, 9)])
def test_pairs_answers_are_the_values_of_the_pair_tokens_with_the_queried_key(
        seq_len: int, vocab: int) -> None:
    batch = generate_pairs(np.random.default_rng(4), 8, seq_len, vocab)
    n, pairs, queries = pairs_layout(seq_len, vocab)
    assert (n + 1) ** 2 <= vocab < (n + 2) ** 2
    assert batch.scored.sum(axis=1).tolist() == [queries] * 8
    for row in range(8):
        tokens = np.concatenate([batch.inputs[row, :1], batch.targets[row]])
        assert tokens[0] == 0
        context = tokens[1:1 + pairs]
        # decoded independently: pair token 2n+1 + key*n + value for key, value in 0..n-1
        assert ((context > 2 * n) & (context <= 2 * n + n * n)).all()
        keys, values = (context - 2 * n - 1) // n, (context - 2 * n - 1) % n
        assert len(set(keys.tolist())) == pairs
        binding = dict(zip((keys + 1).tolist(), (values + n + 1).tolist(), strict=True))
        scored = np.flatnonzero(batch.scored[row])
        assert len(scored) == queries and scored[0] == pairs + 1
        for target_position in scored:
            query = int(tokens[target_position])  # the key token read just before the answer
            assert 1 <= query <= n
            assert tokens[target_position + 1] == binding[query]
    assert math.isclose(get_task("pairs").chance_loss(seq_len, vocab), math.log(n))


@pytest.mark.parametrize(("seq_len", "vocab"), [(64, 265), (128, 265), (16, 13)])
def test_manykeys_answers_are_the_values_bound_to_the_queried_keys(seq_len: int,
                                                                   vocab: int) -> None:
    batch = generate_manykeys(np.random.default_rng(6), 4, seq_len, vocab)
    num_keys = vocab - 1 - MANYKEYS_VALUES
    pairs = min(num_keys, seq_len // 4)
    queries = (seq_len - 2 * pairs) // 2
    assert batch.scored.sum(axis=1).tolist() == [queries] * 4
    for row in range(4):
        tokens = np.concatenate([batch.inputs[row, :1], batch.targets[row]])
        keys, values = tokens[1:1 + 2 * pairs:2], tokens[2:2 + 2 * pairs:2]
        assert len(set(keys.tolist())) == pairs
        assert ((keys >= 1) & (keys <= num_keys)).all()
        assert ((values > num_keys) & (values < vocab)).all()  # the last 8 tokens
        binding = dict(zip(keys.tolist(), values.tolist(), strict=True))
        for target_position in np.flatnonzero(batch.scored[row]):
            assert tokens[target_position + 1] == binding[int(tokens[target_position])]
    assert math.isclose(get_task("manykeys").chance_loss(seq_len, vocab), math.log(8))


def test_absentkeys_asks_an_eighth_of_the_queries_for_keys_not_in_the_context() -> None:
    seq_len, vocab, rows = 64, 265, 200
    batch = generate_absentkeys(np.random.default_rng(7), rows, seq_len, vocab)
    num_keys, pairs = vocab - 1 - MANYKEYS_VALUES, seq_len // 4
    absent = answered = 0
    for row in range(rows):
        tokens = np.concatenate([batch.inputs[row, :1], batch.targets[row]])
        keys, values = tokens[1:1 + 2 * pairs:2], tokens[2:2 + 2 * pairs:2]
        binding = dict(zip(keys.tolist(), values.tolist(), strict=True))
        for target_position in np.flatnonzero(batch.scored[row]):
            query, answer = int(tokens[target_position]), int(tokens[target_position + 1])
            assert 1 <= query <= num_keys
            if query in binding:
                assert answer == binding[query]
                answered += 1
            else:  # a key of no pair: the answer is one of the context's values
                assert answer in values.tolist()
                absent += 1
    share = absent / (absent + answered)
    # binomial over 200 x 24 queries: 4 standard deviations of the share 1/8 are 0.019
    assert abs(share - ABSENT_SHARE) < 4 * math.sqrt(ABSENT_SHARE * (1 - ABSENT_SHARE)
                                                     / (absent + answered))
    # the same stream as manykeys up to the replaced queries: keys and values agree
    plain = generate_manykeys(np.random.default_rng(7), rows, seq_len, vocab)
    np.testing.assert_array_equal(plain.inputs[:, :1 + 2 * pairs],
                                  batch.inputs[:, :1 + 2 * pairs])


def test_pairs_task_rejects_a_too_small_vocabulary() -> None:
    with pytest.raises(ValueError, match="vocab_size >= 9"):
        pairs_layout(16, 8)


@pytest.mark.parametrize(("seq_len", "vocab"), [(8, 5), (64, 17), (128, 32)])
def test_majority_answer_is_the_most_frequent_symbol(seq_len: int, vocab: int) -> None:
    batch = generate_majority(np.random.default_rng(3), 64, seq_len, vocab)
    tokens = np.concatenate([batch.inputs[:, :1], batch.targets], axis=1)
    assert tokens.shape == (64, seq_len + 1) and (tokens[:, 0] == 0).all()
    content, answer = tokens[:, 1:-1], tokens[:, -1]
    assert ((content >= 1) & (content < vocab)).all()
    for row in range(64):  # counted independently: the answer occurs most often
        counts = np.bincount(content[row], minlength=vocab)
        assert counts[answer[row]] == counts.max()
        assert answer[row] == int(np.flatnonzero(counts == counts.max())[0])
    # only the last position, the one that predicts the answer, is scored
    np.testing.assert_array_equal(batch.scored, np.eye(seq_len, dtype=bool)[[-1] * 64])
    assert math.isclose(get_task("majority").chance_loss(seq_len, vocab), math.log(vocab - 1))


def test_unknown_task_lists_the_valid_ones() -> None:
    with pytest.raises(ValueError, match="copy.*recall"):
        get_task("sorting")


# -- spikes and verdicts on synthetic series ---------------------------------------------


def test_spike_counter_on_synthetic_series() -> None:
    flat = [1.0] * 100
    assert metrics.spike_steps(flat) == []
    one = list(flat)
    one[60] = 5.5
    assert metrics.spike_steps(one) == [60]
    just_below = list(flat)
    just_below[60] = 4.9  # under 5x the running median: not a spike
    assert metrics.spike_steps(just_below) == []
    early = list(flat)
    early[5] = 100.0  # fewer than SPIKE_MIN_HISTORY previous steps: not judged
    assert metrics.spike_steps(early) == []
    growth = [1.05 ** t for t in range(200)]  # steady growth, 100x overall: no spike
    assert metrics.spike_steps(growth) == []
    decay_then_jump = [10.0 * 0.97 ** t for t in range(100)] + [6.0]
    assert metrics.spike_steps(decay_then_jump) == [100]  # the median tracks the recent level
    pair = list(flat)
    pair[70] = pair[71] = 20.0  # consecutive spikes count in steps
    assert metrics.spike_steps(pair) == [70, 71]
    non_finite = list(flat)
    non_finite[3] = float("nan")
    non_finite[80] = float("inf")
    assert metrics.spike_steps(non_finite) == [3, 80]
    # a high level more than SPIKE_WINDOW steps ago no longer counts
    old = [100.0] * 60 + [1.0] * 50 + [6.0]
    assert metrics.spike_steps(old) == [110]
    # a sustained 10x level shift spikes until it fills half of the window
    shift = [1.0] * 30 + [10.0] * 100
    assert metrics.spike_steps(shift) == list(range(30, 55))


def test_norm_summary_statistics() -> None:
    norms = [float(i) for i in range(1, 101)] + [float("nan")]
    summary = metrics.summarize_norms(norms)
    assert summary.median == pytest.approx(50.5)
    assert summary.p99 == pytest.approx(np.percentile(np.arange(1, 101), 99))
    assert summary.max == 100.0
    assert summary.non_finite == 1
    assert summary.spikes == 1  # the NaN


@pytest.mark.parametrize(
    ("loss", "spikes", "learning", "stable"),
    [
        (0.05, 0, metrics.LEARNS_LIKE_BF16, True),
        (0.3, 2, metrics.LEARNS_LIKE_BF16, True),   # progress 0.93, spikes within the margin
        (0.3, 4, metrics.LEARNS_LIKE_BF16, False),  # spikes beyond bf16 + margin
        (1.5, 0, metrics.LEARNS_WORSE, True),       # progress 0.6
        (2.5, 9, metrics.FAILS_TO_LEARN, False),    # progress 0.3
        (3.6, 0, metrics.FAILS_TO_LEARN, True),     # worse than chance
    ],
)
def test_verdicts_relative_to_bf16(loss: float, spikes: int, learning: str,
                                   stable: bool) -> None:
    result = metrics.verdict(status="ok", final_loss=loss, spikes=spikes, baseline_loss=0.05,
                             baseline_spikes=1, chance_loss=3.43)
    assert result.learning == learning
    assert result.stable is stable
    assert result.progress == pytest.approx((3.43 - loss) / (3.43 - 0.05))
    assert ("unstable" in result.text) is (not stable)


def test_verdict_special_cases() -> None:
    common = dict(spikes=0, baseline_spikes=0, chance_loss=3.0)
    assert metrics.verdict(status="failed", final_loss=None, baseline_loss=0.1,
                           **common).text == metrics.FAILED
    assert metrics.verdict(status="diverged", final_loss=None, baseline_loss=0.1,
                           **common).text == metrics.DIVERGED
    assert metrics.verdict(status="ok", final_loss=float("nan"), baseline_loss=0.1,
                           **common).learning == metrics.DIVERGED
    # bf16 itself barely learned: no comparison is possible
    assert metrics.verdict(status="ok", final_loss=2.0, baseline_loss=2.9,
                           **common).learning == metrics.INCONCLUSIVE
    assert metrics.verdict(status="ok", final_loss=2.0, baseline_loss=None,
                           **common).learning == metrics.INCONCLUSIVE


def test_paper_split_conditions() -> None:
    like = metrics.Verdict(metrics.LEARNS_LIKE_BF16, stable=True, progress=1.0)
    bad = metrics.Verdict(metrics.FAILS_TO_LEARN, stable=False, progress=0.1)
    split = metrics.paper_split({"attn_qat": like, "p_only": like, "drop_in": bad,
                                 "o_only": bad})
    assert all(split.values())
    split = metrics.paper_split({"attn_qat": bad, "drop_in": like, "o_only": bad})
    assert split["attn_qat learns like bf16"] is False
    assert split["drop_in learns worse than bf16"] is False
    assert split["o_only fails or is unstable"] is True
    assert metrics.paper_split({"attn_qat": like})["drop_in fails or is unstable"] is None
    # issue 19's wording: failing to learn counts without spikes; learning worse needs them
    fails_quietly = metrics.Verdict(metrics.FAILS_TO_LEARN, stable=True, progress=0.1)
    worse_quietly = metrics.Verdict(metrics.LEARNS_WORSE, stable=True, progress=0.7)
    split = metrics.paper_split({"attn_qat": like, "p_only": like, "drop_in": fails_quietly,
                                 "o_only": worse_quietly})
    assert split["drop_in fails or is unstable"] is True
    assert [k for k, v in split.items() if not v] == ["o_only fails or is unstable"]
    # the issue names p_only too: it must learn like bf16 (a missing p_only run is unknown)
    assert metrics.paper_split({"attn_qat": like})["p_only learns like bf16"] is None
    worse = metrics.Verdict(metrics.LEARNS_WORSE, stable=True, progress=0.7)
    split = metrics.paper_split({"attn_qat": like, "p_only": worse, "drop_in": bad,
                                 "o_only": bad})
    assert split["p_only learns like bf16"] is False
    assert [k for k, v in split.items() if not v] == ["p_only learns like bf16"]


def test_reproduced_only_when_every_condition_holds() -> None:
    from fp4sim.simulate.report import split_reproduced

    assert split_reproduced({"a": True, "b": True}) is True
    assert split_reproduced({"a": True, "b": False}) is False
    assert split_reproduced({"a": True, "b": None}) is None  # a condition not judged
    assert split_reproduced({}) is None


def test_presets_train_every_variant_the_split_names() -> None:
    # a preset that skipped one would leave its conditions unjudged: never "reproduced"
    named = {condition.split()[0] for condition in metrics.paper_split({})}
    assert named == {"attn_qat", "p_only", "o_only", "drop_in"}
    for name in ("cpu", "gpu", "gpu-strong"):
        preset = get_preset(name)
        assert not preset.smoke
        assert named | {"bf16"} <= set(preset.variants)


def test_gpu_strong_preset_is_a_valid_configuration() -> None:
    preset = get_preset("gpu-strong")
    model, training = preset.model, preset.training
    assert preset.task == "recall" and preset.device == "cuda"
    assert model.token_shift and 0 < model.token_shift_scale < 1
    assert model.positions == "learned" and model.head_dim == 32  # two NVFP4 blocks a row
    # 8 keys, 8 values, 8 pairs and 24 queries a sequence; the rows end with two P tiles
    assert recall_layout(model.seq_len, model.vocab_size) == (8, 8, 24)
    assert model.seq_len == 2 * preset.block_n
    assert training.lr_schedule == "cosine" and training.warmup_steps < training.steps
    assert math.isclose(training.lr_factor(training.steps - 1), training.min_lr_ratio)
    # the preset's model and data as the command builds them, two steps of two variants
    config = with_overrides(preset, device="cpu", steps=2, eval_batches=1,
                            diagnostic_checkpoints=1, diagnostic_batch=1, log_every=1)
    recipe = resolve_recipe(config.recipe, config.block_n)
    for name in ("bf16", "o_only"):
        run = train_variant(config, build_variant(name, config.recipe, config.block_n),
                            recipe)
        assert run.status == "ok", run.error
        assert all(math.isfinite(v) for v in run.series["loss"])


def test_cosine_schedule_and_token_shift_scale() -> None:
    cosine = TrainingConfig(steps=11, warmup_steps=1, lr_schedule="cosine", min_lr_ratio=0.2)
    factors = [cosine.lr_factor(step) for step in range(11)]
    # warm-up step 0 at 1/1, then 0.2 + 0.8 * (1 + cos(pi * (s - 1) / 9)) / 2
    expected = [1.0] + [0.2 + 0.4 * (1 + math.cos(math.pi * (s - 1) / 9)) for s in range(1, 11)]
    assert factors == pytest.approx(expected, abs=1e-12)
    constant = TrainingConfig(steps=11, warmup_steps=4)
    assert [constant.lr_factor(s) for s in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    with pytest.raises(ValueError, match="lr_schedule"):
        TrainingConfig(lr_schedule="linear")
    # the shift's embedding enters the first layer multiplied by the scale
    config = with_overrides(tiny_config(), token_shift=True, token_shift_scale=0.25)
    model = build_model(config.model, exact_attention, seed=3)
    tokens = torch.tensor([[0, 5, 9]])
    expected_input = (model.token_embedding.weight[tokens] + model.position_embedding.weight[:3]
                      + 0.25 * model.previous_token_embedding.weight[torch.tensor([[0, 0, 5]])])
    captured = []
    handle = model.blocks[0].register_forward_pre_hook(
        lambda m, args: captured.append(args[0]))
    model(tokens)
    handle.remove()
    torch.testing.assert_close(captured[0], expected_input, rtol=0, atol=0)
    with pytest.raises(ValueError, match="token_shift_scale"):
        with_overrides(tiny_config(), token_shift_scale=0.0)


# -- the training loop -------------------------------------------------------------------


def _batch(config, seed: int = 5) -> DeviceBatch:  # noqa: ANN001
    task = get_task(config.task)
    model = config.model
    return to_device(task.generate(np.random.default_rng(seed), config.training.batch_size,
                                   model.seq_len, model.vocab_size), "cpu")


def test_recorded_gradient_norm_matches_an_independent_computation() -> None:
    config = tiny_config(batch_size=4)
    model = build_model(config.model, exact_attention, seed=3)
    twin = copy.deepcopy(model)
    batch = _batch(config)
    before = [p.detach().clone() for p in model.parameters()]
    clip = 1e-3  # far below the norm, so clipping must act
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    stats = training_step(model, optimizer, batch, grad_clip=clip)

    loss = masked_cross_entropy(twin(batch.inputs), batch.targets, batch.scored)
    grads = torch.autograd.grad(loss, list(twin.parameters()))
    expected = torch.linalg.vector_norm(torch.cat([g.flatten() for g in grads])).item()
    assert stats.loss == pytest.approx(loss.item(), rel=1e-6)
    assert stats.grad_norm == pytest.approx(expected, rel=1e-5)
    assert stats.grad_norm > 10 * clip
    named = dict(zip([n for n, _ in twin.named_parameters()], grads, strict=True))
    for layer, recorded in enumerate(stats.attention_grad_norms):
        qkv = [named[f"blocks.{layer}.attn.qkv.weight"], named[f"blocks.{layer}.attn.qkv.bias"]]
        independent = torch.linalg.vector_norm(torch.cat([g.flatten() for g in qkv])).item()
        assert recorded == pytest.approx(independent, rel=1e-5)
    # SGD with lr 1 moves the parameters by exactly the clipped gradient
    step = torch.cat([(p.detach() - b).flatten() for p, b in zip(model.parameters(), before,
                                                                   strict=True)])
    assert torch.linalg.vector_norm(step).item() == pytest.approx(clip, rel=1e-3)


def test_same_seed_gives_the_same_initialization_and_data() -> None:
    config = tiny_config()
    a = build_model(config.model, exact_attention, seed=derive_seeds(7).init)
    b = build_model(config.model, exact_attention, seed=derive_seeds(7).init)
    c = build_model(config.model, exact_attention, seed=derive_seeds(8).init)
    for pa, pb in zip(a.parameters(), b.parameters(), strict=True):
        assert torch.equal(pa, pb)
    assert not all(torch.equal(pa, pc) for pa, pc in
                   zip(a.parameters(), c.parameters(), strict=True))
    seeds = derive_seeds(7)
    assert len({seeds.init, seeds.data, seeds.eval}) == 3


def test_token_shift_adds_the_previous_tokens_embedding_and_keeps_the_rest() -> None:
    plain = tiny_config()
    shifted = with_overrides(plain, token_shift=True)
    a = build_model(plain.model, exact_attention, seed=3)
    b = build_model(shifted.model, exact_attention, seed=3)
    # the extra table is created last: every other parameter is initialized as without it
    for (name, pa), (_, pb) in zip(a.named_parameters(), b.named_parameters(), strict=False):
        assert torch.equal(pa, pb), name
    assert a.previous_token_embedding is None
    table = b.previous_token_embedding.weight
    tokens = torch.tensor([[0, 5, 9, 3, 7]])
    # an independent computation of the first layer's input
    expected = (b.token_embedding.weight[tokens] + b.position_embedding.weight[:5]
                + table[torch.tensor([[0, 0, 5, 9, 3]])])
    captured = []
    handle = b.blocks[0].register_forward_pre_hook(lambda m, args: captured.append(args[0]))
    b(tokens)
    handle.remove()
    torch.testing.assert_close(captured[0], expected, rtol=0, atol=0)


def test_rotary_scores_depend_on_the_offset_only() -> None:
    # RoFormer (arXiv 2104.09864) eq. 16: <R_m q, R_n k> depends on n - m alone
    torch.manual_seed(0)
    q, k = torch.randn(1, 1, 1, 8), torch.randn(1, 1, 1, 8)
    cos, sin = rotary_tables(20, 8, torch.device("cpu"))

    def score(m: int, n: int) -> float:
        qm = apply_rotary(q, cos[m:m + 1], sin[m:m + 1])
        kn = apply_rotary(k, cos[n:n + 1], sin[n:n + 1])
        return float((qm * kn).sum())

    assert math.isclose(score(3, 1), score(13, 11), rel_tol=1e-5)
    assert not math.isclose(score(3, 1), score(3, 2), rel_tol=1e-3)
    torch.testing.assert_close(apply_rotary(q, cos[5:6], sin[5:6]).norm(), q.norm())
    model = build_model(with_overrides(tiny_config(), positions="rotary").model,
                        exact_attention, seed=1)
    assert model.position_embedding is None and model.blocks[0].attn.rotary
    with pytest.raises(ValueError, match="positions must be one of"):
        with_overrides(tiny_config(), positions="alibi")


def test_loop_is_deterministic_for_a_seed() -> None:
    config = tiny_config(steps=4, seed=11)
    recipe = resolve_recipe(config.recipe, config.block_n)
    runs = [train_variant(config, build_variant("attn_qat", config.recipe, config.block_n),
                          recipe) for _ in range(2)]
    assert runs[0].status == runs[1].status == "ok", runs[0].error
    assert runs[0].series == runs[1].series
    assert runs[0].eval == runs[1].eval
    assert runs[0].diagnostics == runs[1].diagnostics
    other = train_variant(with_overrides(config, seed=12),
                          build_variant("attn_qat", config.recipe, config.block_n), recipe)
    assert other.series["loss"] != runs[0].series["loss"]


@pytest.mark.parametrize("name", VALID_VARIANTS)
def test_a_short_run_of_every_variant_completes_on_the_cpu(name: str) -> None:
    config = tiny_config(steps=2)
    recipe = resolve_recipe(config.recipe, config.block_n)
    run = train_variant(config, build_variant(name, config.recipe, config.block_n), recipe)
    assert run.status == "ok", run.error
    assert run.steps_completed == 2
    assert set(run.series) == {"loss", "accuracy", "grad_norm", "attention_grad_norm.layer0",
                               "attention_grad_norm.layer1"}
    assert all(len(values) == 2 for values in run.series.values())
    assert all(math.isfinite(v) for values in run.series.values() for v in values)
    assert [entry["step"] for entry in run.diagnostics] == [0, 1]
    for entry in run.diagnostics:
        assert "error" not in entry, entry.get("error")
        assert 0 <= entry["d_from_fp4_output_error"] < 1
        assert entry["grad_rel_error.attn_qat"] >= 0


def test_a_failing_attention_is_reported_with_its_traceback() -> None:
    def broken(q, k, v, causal, sm_scale):  # noqa: ANN001, ANN202
        raise FloatingPointError("kernel exploded")

    config = tiny_config()
    variant = Variant(name="kernel", recipe_name="test", backward=None, description="broken",
                      attention=broken)
    run = train_variant(config, variant, resolve_recipe(config.recipe, config.block_n))
    assert run.status == "failed"
    assert "FloatingPointError: kernel exploded" in run.error
    assert "Traceback" in run.error


def test_unknown_names_list_the_valid_ones() -> None:
    with pytest.raises(SimulationSetupError, match="attn_qat.*drop_in"):
        check_variant_names(["attn_qat", "fancy"], None)
    with pytest.raises(SimulationSetupError, match="valid recipes: .*attn-qat"):
        resolve_recipe("no-such-recipe", 32)
    with pytest.raises(SimulationSetupError, match="MODULE:ATTR"):
        build_variant("kernel", "attn-qat", 32, kernel_spec="no_colon")
    with pytest.raises(SimulationSetupError, match="cannot import"):
        build_variant("kernel", "attn-qat", 32, kernel_spec="no_such_module_xyz:fn")


# -- the command line --------------------------------------------------------------------


def _cli(*args: str) -> int:
    from fp4sim.cli import main

    return main(["simulate", "--config", "cpu", "--device", "cpu", "--steps", "2",
                 "--batch-size", "2", "--seq-len", "32", "--width", "32", "--heads", "1",
                 *args])


def test_cli_writes_the_report_and_refuses_to_overwrite(tmp_path) -> None:  # noqa: ANN001
    out = tmp_path / "sim"
    assert _cli("--variants", "bf16", "drop_in", "--out", str(out)) == 0
    report = json.loads((out / "report.json").read_text())
    assert [row["variant"] for row in report["summary"]] == ["bf16", "drop_in"]
    assert len(report["runs"]["drop_in"]["series"]["grad_norm"]) == 2
    assert report["config"]["training"]["steps"] == 2
    html = (out / "index.html").read_text()
    assert "data:image/png;base64," in html and "drop_in" in html
    assert "drop_in" in (out / "summary.md").read_text()
    # the cpu preset is the searched configuration that reproduces the split: no smoke label
    assert report["smoke_run"] is False
    assert "SMOKE RUN" not in html and "SMOKE RUN" not in (out / "summary.md").read_text()
    assert _cli("--variants", "bf16", "--out", str(out)) == 2
    assert _cli("--variants", "bf16", "--out", str(out), "--overwrite") == 0
    assert _cli("--variants", "nope", "--out", str(tmp_path / "other")) == 2


def test_a_smoke_config_is_labelled_in_its_report() -> None:
    from fp4sim.simulate.report import build_html, build_summary_md
    from fp4sim.simulate.runner import run_simulation

    for smoke in (True, False):
        result = run_simulation(tiny_config(steps=1, variants=("bf16",), smoke=smoke))
        labelled = ["SMOKE RUN" in text for text in (build_summary_md(result),
                                                     build_html(result))]
        assert labelled == [smoke, smoke]


def test_cli_reports_a_failing_kernel(tmp_path, monkeypatch) -> None:  # noqa: ANN001
    module = tmp_path / "sim_kernel_under_test.py"
    module.write_text(textwrap.dedent("""
        def attention(q, k, v, causal, sm_scale):
            raise RuntimeError("deliberate kernel failure")
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    out = tmp_path / "sim"
    code = _cli("--variants", "bf16", "kernel", "--kernel", "sim_kernel_under_test:attention",
                "--out", str(out))
    assert code == 1
    report = json.loads((out / "report.json").read_text())
    assert report["runs"]["kernel"]["status"] == "failed"
    assert "deliberate kernel failure" in report["runs"]["kernel"]["error"]
    assert "deliberate kernel failure" in (out / "index.html").read_text()


def test_parallel_jobs_give_the_runs_of_a_sequential_simulation() -> None:
    from fp4sim.simulate.runner import run_simulation

    config = tiny_config(steps=2, variants=("bf16", "o_only"), diagnostic_checkpoints=1)
    sequential = run_simulation(config)
    parallel = run_simulation(with_overrides(config, jobs=2))
    for a, b in zip(sequential.runs, parallel.runs, strict=True):
        assert (a.variant, a.status) == (b.variant, b.status)
        assert a.series.keys() == b.series.keys()
        for key in a.series:  # another process may round the last bits differently
            np.testing.assert_allclose(a.series[key], b.series[key], rtol=1e-5)
        assert a.eval["loss"] == pytest.approx(b.eval["loss"], rel=1e-5)


def test_kernel_dtype_casts_inputs_and_output_back():
    from fp4sim.simulate.variants import kernel_attention

    seen = []

    def kernel(q, k, v, causal, sm_scale):
        seen.append((q.dtype, k.dtype, v.dtype))
        return q * 2

    q = torch.randn(1, 1, 4, 8)
    out = kernel_attention(kernel, "bfloat16")(q, q, q, True, 0.5)
    assert seen == [(torch.bfloat16,) * 3]
    assert out.dtype == torch.float32
    assert torch.equal(out, (q.to(torch.bfloat16) * 2).float())
    with pytest.raises(SimulationSetupError, match="kernel dtype"):
        kernel_attention(kernel, "int8")
