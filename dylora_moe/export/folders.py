"""The output folder of an export: written only when new, empty, or an earlier export of ours.

An export writes a marker file (:data:`MARKER`, JSON: the format and the entries it wrote) before anything else, so
a later export to the same folder knows what it may replace: only the entries its marker lists. A folder holding
anything else (a user's files, a checkpoint, a model) is refused before anything is written.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from .source import ExportError

MARKER = ".dylora_moe_export.json"


def earlier_entries(out: Path) -> list[str]:
    """What an earlier export into ``out`` wrote (its marker's list); refuse a folder that is not one of ours."""
    if not out.exists():
        return []
    if not out.is_dir():
        raise ExportError(f"{out} is a file, not a folder; choose a folder for the export")
    present = sorted(p.name for p in out.iterdir())
    if not present:
        return []
    try:
        marker = json.loads((out / MARKER).read_text())
        entries = [str(e) for e in marker["entries"]]
    except (OSError, ValueError, KeyError, TypeError):
        shown = ", ".join(present[:4]) + (" ..." if len(present) > 4 else "")
        raise ExportError(
            f"{out} holds files this exporter did not write ({shown}); it writes only into a new or empty folder or "
            "over its own earlier export (nothing was written)"
        ) from None
    return [e for e in entries if e != MARKER and "/" not in e and e not in ("", ".", "..")]


def prepare(out: Path, entries: list[str], fmt: str) -> None:
    """Make ``out`` ready to receive ``entries``: refuse a foreign folder, remove what our earlier export wrote,
    and write the marker listing the new entries (before any of them)."""
    earlier = earlier_entries(out)
    clashes = [e for e in entries if (out / e).exists() and e not in earlier]
    if clashes:
        shown = ", ".join(clashes)
        raise ExportError(f"{out} already holds {shown}, which no earlier export wrote (nothing was written)")
    for name in earlier:
        path = out / name
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        elif path.exists() or path.is_symlink():
            path.unlink()
    out.mkdir(parents=True, exist_ok=True)
    write_marker(out, entries, fmt, complete=False)


def write_marker(out: Path, entries: list[str], fmt: str, complete: bool) -> None:
    record = {"writer": "python -m dylora_moe.export", "format": fmt, "entries": entries, "complete": complete}
    (out / MARKER).write_text(json.dumps(record, indent=2) + "\n")
