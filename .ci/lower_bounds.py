"""Print pyproject.toml's dependency lower bounds as exact pins (`name==version`), for `bash .ci/lock --lowest`.

Every requirement of the project and of its `train`, `eval` and `dev` extras that has a `>=` bound is pinned to
that bound; requirements without one are left to the resolver (newest allowed).
"""

import re
import sys
from pathlib import Path

import tomllib

project = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())["project"]
requirements = list(project["dependencies"])
for extra in project.get("optional-dependencies", {}).values():
    requirements += [r for r in extra if not r.startswith("dylora-moe")]
pins = {}
for requirement in requirements:
    match = re.match(r"^\s*([A-Za-z0-9_.\-]+)(?:\[[^\]]*\])?\s*>=\s*([^,;\s]+)", requirement)
    if match:
        pins[match.group(1).lower()] = match.group(2)
if not pins:
    sys.exit("pyproject.toml declares no lower bounds")
print("\n".join(f"{name}=={version}" for name, version in sorted(pins.items())))
