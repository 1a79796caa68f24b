"""Atomic writing of a report folder (``index.html``, ``report.json``, ``summary.md``).

Used by ``fp4sim report`` and ``fp4sim simulate``. The folder appears complete or not
at all: every file is written into a temporary sibling folder, flushed, and the folder
is renamed into place. An existing folder is refused unless ``overwrite=True``; even
then only a folder that looks like an earlier report (it holds ``report.json``) or an
empty folder is replaced, so a mistyped ``--out .`` cannot delete a working tree. On
overwrite the old folder is first renamed aside, the new one renamed in, and the old
one removed last; if the swap fails the old folder is put back.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

REPORT_FILES = ("index.html", "report.json", "summary.md")


class ReportFolderError(Exception):
    """The output folder cannot be written (it exists, or is not a report folder)."""


def json_sanitize(value: Any) -> Any:
    """A copy of ``value`` that strict JSON accepts: non-finite floats become None,
    tuples become lists, NumPy scalars become Python numbers, keys become strings."""
    if isinstance(value, Mapping):
        return {str(k): json_sanitize(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_sanitize(v) for v in value]
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return value
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if hasattr(value, "item") and callable(value.item):  # NumPy / torch scalars
        return json_sanitize(value.item())
    raise TypeError(f"cannot serialize {type(value).__name__} to JSON: {value!r}")


def dumps_json(data: Mapping[str, Any]) -> str:
    """Strict, indented JSON (no NaN/Infinity literals) of a report dict."""
    return json.dumps(json_sanitize(data), indent=1, allow_nan=False) + "\n"


def _looks_replaceable(folder: Path) -> bool:
    entries = list(folder.iterdir())
    return not entries or (folder / "report.json").is_file()


def check_output_folder(out_dir: str | os.PathLike[str], *, overwrite: bool = False) -> Path:
    """Raise :class:`ReportFolderError` if ``out_dir`` may not be written; return it as a Path.

    Call it before a long computation so that a refusal comes at once.
    """
    out = Path(out_dir)
    if out.exists() or out.is_symlink():
        if not out.is_dir() or out.is_symlink():
            raise ReportFolderError(f"{out} exists and is not a folder; choose another --out")
        if not overwrite:
            raise ReportFolderError(
                f"{out} already exists; pass --overwrite to replace it or choose another --out"
            )
        if not _looks_replaceable(out):
            raise ReportFolderError(
                f"{out} is not empty and holds no report.json, so it does not look like an "
                "earlier report; refusing to replace it even with --overwrite"
            )
    parent = out.parent if str(out.parent) else Path(".")
    if not parent.is_dir():
        raise ReportFolderError(f"the parent folder {parent} of {out} does not exist")
    # Permission bits do not tell (root, read-only mounts, /proc): create and remove the
    # kind of temporary sibling folder the write will use.
    try:
        os.rmdir(tempfile.mkdtemp(prefix=f".{out.name}.probe-", dir=parent))
    except OSError as err:
        raise ReportFolderError(
            f"cannot write into {parent} ({err.strerror or err}); choose another --out"
        ) from None
    return out


def _write_file(path: Path, content: str | bytes) -> None:
    data = content.encode("utf-8") if isinstance(content, str) else content
    with open(path, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())


def write_report_folder(
    out_dir: str | os.PathLike[str],
    *,
    index_html: str,
    report_json: Mapping[str, Any] | str,
    summary_md: str,
    overwrite: bool = False,
    extra_files: Mapping[str, str | bytes] | None = None,
) -> Path:
    """Write ``index.html``, ``report.json`` and ``summary.md`` (plus ``extra_files``,
    plain names only) atomically into ``out_dir`` and return its path.

    ``report_json`` is a dict (serialized with :func:`dumps_json`) or ready JSON text.
    Raises :class:`ReportFolderError` when the folder exists and ``overwrite`` is false,
    or when it does not look like a report folder.
    """
    out = check_output_folder(out_dir, overwrite=overwrite)
    files: dict[str, str | bytes] = {
        "index.html": index_html,
        "report.json": report_json if isinstance(report_json, str) else dumps_json(report_json),
        "summary.md": summary_md,
    }
    for name, content in (extra_files or {}).items():
        if Path(name).name != name or name in files or name.startswith("."):
            raise ValueError(f"extra file name {name!r} must be a plain, new file name")
        files[name] = content

    parent = out.parent if str(out.parent) else Path(".")
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=parent))
    try:
        for name, content in files.items():
            _write_file(tmp / name, content)
        os.chmod(tmp, 0o755)
        if out.exists():
            aside = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=parent))
            os.rmdir(aside)
            os.rename(out, aside)
            try:
                os.rename(tmp, out)
            except OSError:
                os.rename(aside, out)
                raise
            shutil.rmtree(aside, ignore_errors=True)
        else:
            os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
