"""Progress lines on stderr, one ``write`` per line.

``print(line, file=sys.stderr)`` writes the text and the newline in two calls; with
unbuffered stderr (``PYTHONUNBUFFERED=1``) the lines of several processes sharing one pipe
(torchrun ranks, ``simulate --jobs`` workers) then interleave mid-line. A single write of a
line shorter than ``PIPE_BUF`` (4096 bytes on Linux) to a pipe is atomic (POSIX ``write``).
"""

from __future__ import annotations

import sys


def progress_line(line: str) -> None:
    """Write ``line`` and its newline to stderr in one call, then flush."""
    sys.stderr.write(line + "\n")
    sys.stderr.flush()
