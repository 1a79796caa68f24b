"""Writing a result folder: shared by ``fp4sim report`` and ``fp4sim simulate``.

A base of the comparison tier (docs/DESIGN.md): NumPy and the standard library only
(matplotlib only when a figure is rendered); it imports none of the comparison layers.

* ``folder``: the atomic folder write (``index.html``, ``report.json``, ``summary.md``).
* ``html``: ``HtmlReport``, a self-contained HTML page builder.
* ``console``: ``progress_line``, one stderr write per progress line (several processes).
"""
