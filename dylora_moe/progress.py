"""Progress bars for the long waits (generation, scoring, sweeps, compile loops): a count and an estimate on a
terminal, nothing at all in a log file.

One rule everywhere, as transformers and datasets do: a bar (tqdm) on stderr when stderr is a terminal, none when it
is redirected or when the command got ``--disable_tqdm`` (:func:`disable`). ``DYLORA_PROGRESS=1`` forces bars on
(tests, a ``tee`` to a terminal), ``DYLORA_PROGRESS=0`` off.
"""

from __future__ import annotations

import os
import sys

_disabled = False


def disable(value: bool = True) -> None:
    """``--disable_tqdm``: no bar for the rest of the process (or bars again with ``value=False``)."""
    global _disabled
    _disabled = value


def enabled(stream=None) -> bool:
    """Whether a bar would be drawn on ``stream`` (default stderr)."""
    if _disabled:
        return False
    forced = os.environ.get("DYLORA_PROGRESS", "").strip()
    if forced in ("0", "1"):
        return forced == "1"
    return bool(getattr(stream or sys.stderr, "isatty", lambda: False)())


def bar(total: int | None = None, desc: str = "", unit: str = "it", iterable=None, **kwargs):
    """A tqdm bar with a count, rate and time left (``iterable`` or ``total`` + ``update``); a disabled one (same
    methods, no output) when :func:`enabled` says no."""
    from tqdm.auto import tqdm

    stream = kwargs.pop("file", None) or sys.stderr
    return tqdm(
        iterable, total=total, desc=desc, unit=unit, file=stream, disable=not enabled(stream), dynamic_ncols=True,
        **kwargs,
    )  # fmt: skip
