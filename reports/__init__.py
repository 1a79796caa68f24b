"""``fp4sim report``: FP4 attention error and gradient-error reports (top layer).

Modules, one concept each: ``scenarios`` (named inputs), ``metrics`` (error metrics and
distributions), ``runner`` (computes every case), ``summary`` (ranking, findings,
``--fail-on``), ``figures`` (matplotlib), ``html`` (generic self-contained page builder),
``document`` (the report page), ``schema`` (report.json structure), ``output`` (atomic
folder writing), ``cli`` (the subcommand). ``html`` and ``output`` are generic and reused
by ``fp4sim simulate``.
"""
