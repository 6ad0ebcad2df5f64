"""The functional-evaluation tests (a package, so that its conftest is ``evaluate.conftest`` and never replaces the
top-level ``conftest`` module the other test files import from)."""
