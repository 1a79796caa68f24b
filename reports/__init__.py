"""``fp4sim report``: FP4 attention error and gradient-error reports (a comparison layer).

The report is one straight line, one module per room: ``cli`` (arguments) -> ``runner``
(computes every case; ``distributed`` shards the units over torchrun ranks) -> ``analysis``
(``identities``, ``summary``: ranking, findings, ``--fail-on``; ``verdicts`` and
``error_statistics`` for external kernels) -> ``schema`` (validation) -> ``document`` +
``figures`` (``index.html``) and ``markdown`` (``summary.md``) -> ``fp4sim.publish.folder``
(atomic folder writing). ``scenarios`` names the inputs; ``metrics`` and
``streaming_metrics`` are the error metrics (dense, and chunked for production shapes).
The page builder and the folder writer live in ``fp4sim.publish``, shared with
``fp4sim simulate``; the FP4 tolerance rule that judges external kernels lives in
``fp4sim.judge``, shared with ``fp4sim check``.
"""
