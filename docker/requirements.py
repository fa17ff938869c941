"""Print the requirements of the project and of the named extras, read from pyproject.toml alone.

The images install their dependencies in a layer of their own, before the code is copied, so that a
code change does not reinstall them. That layer cannot build the project itself (its version is read
from the code, `[tool.setuptools.dynamic]`), so it installs what this prints:

    python requirements.py pyproject.toml service,ray > requirements.txt && pip install -r requirements.txt

The project's own extras named inside an extra (`r3-reward[service]`) are expanded in place. Standard
library only: it runs before anything is installed.
"""

from __future__ import annotations

import re
import sys
import tomllib
from pathlib import Path

# A requirement naming extras: `name[extra,...]` and what follows (a version or a marker).
_WITH_EXTRAS = re.compile(r"^\s*(?P<name>[\w.-]+)\s*\[(?P<extras>[^\]]*)\]\s*(?P<rest>.*)$")


def normalized(name: str) -> str:
    """A distribution name as PEP 503 compares it."""
    return re.sub(r"[-_.]+", "-", name).lower()


def requirements(project: dict, extras: list[str]) -> list[str]:
    """The base dependencies and those of `extras`, self-references expanded, each once, in order."""
    own_name = normalized(project["name"])
    optional = project.get("optional-dependencies", {})
    found: list[str] = list(project.get("dependencies", []))
    pending, seen = list(extras), set()
    while pending:
        extra = pending.pop(0)
        if extra in seen:
            continue
        if extra not in optional:
            raise SystemExit(f"no extra {extra!r} in pyproject.toml (it has: {', '.join(sorted(optional))})")
        seen.add(extra)
        for requirement in optional[extra]:
            match = _WITH_EXTRAS.match(requirement)
            if match and normalized(match["name"]) == own_name:
                if match["rest"].strip():
                    raise SystemExit(f"{requirement!r}: a self-reference with a marker is not supported")
                pending.extend(e.strip() for e in match["extras"].split(",") if e.strip())
            else:
                found.append(requirement)
    return list(dict.fromkeys(found))


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        raise SystemExit("usage: requirements.py PYPROJECT EXTRA[,EXTRA...]")
    project = tomllib.loads(Path(argv[0]).read_text())["project"]
    extras = [e.strip() for e in argv[1].split(",") if e.strip()]
    print("\n".join(requirements(project, extras)))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
