"""Where a result came from: the machine and the commit (run.json, benchmark rows, reports). One implementation, in
``dylora_moe.kernels.provenance`` (the compile report uses it and kernels import nothing outside themselves); it is
imported when first asked for, because importing ``dylora_moe.kernels`` imports torch and train.py's ``--help`` and
flag errors must not."""

from __future__ import annotations


def commit(*paths: str) -> str:
    """Short hash of HEAD (``+dirty`` when tracked files under ``paths`` differ): kernels.provenance.commit."""
    from dylora_moe.kernels import provenance

    return provenance.commit(*paths)


def machine() -> str:
    """The GPU's name and count, else the CPU's: kernels.provenance.machine."""
    from dylora_moe.kernels import provenance

    return provenance.machine()


def __getattr__(name: str):
    if name in ("COMMIT_ENV", "REPO"):
        from dylora_moe.kernels import provenance

        return getattr(provenance, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
