"""Where a result came from: the machine and the commit (run.json, benchmark rows, reports). One implementation,
in ``dylora_moe.kernels.provenance`` (the compile report uses it and kernels import nothing outside themselves)."""

from dylora_moe.kernels.provenance import COMMIT_ENV, REPO, commit, machine

__all__ = ["COMMIT_ENV", "REPO", "commit", "machine"]
