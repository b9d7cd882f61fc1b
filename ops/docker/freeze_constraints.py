"""Writes ops/docker/constraints.txt: the versions of ``imageqa[service]`` and everything it pulls in,
as installed in this environment (the one the tests ran in), so that the images install the same.

    .venv/bin/python ops/docker/freeze_constraints.py
"""

from __future__ import annotations

import argparse
import re
from importlib import metadata
from pathlib import Path
from typing import cast

import tomllib
from packaging.markers import default_environment
from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[2]
OUT = Path(__file__).with_name("constraints.txt")
HEADER = """\
# Versions the images install (pip --constraint): imageqa[service] and its dependencies, as tested.
# Regenerate after changing dependencies: .venv/bin/python ops/docker/freeze_constraints.py
"""


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def project_requires(extra: str) -> list[str]:
    """The project's own requirements, from pyproject.toml (its installed metadata may be older)."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    return [
        *project["dependencies"],
        *[f"{r}; extra == '{extra}'" for r in project["optional-dependencies"][extra]],
    ]


def closure(root: str, extra: str) -> dict[str, str]:
    """Installed name -> version for ``root[extra]`` and its dependencies, markers evaluated here."""
    found: dict[str, str] = {}
    todo: list[tuple[str, set[str]]] = [(root, {extra})]
    while todo:
        name, wanted = todo.pop()
        requires = project_requires(extra) if name == root else metadata.distribution(name).requires
        for text in requires or []:
            req = Requirement(text)
            base = cast("dict[str, str]", default_environment())
            environments = [{**base, "extra": e} for e in (wanted or {""})]
            if req.marker and not any(req.marker.evaluate(env) for env in environments):
                continue
            key = canonical(req.name)
            if key == canonical(root):  # e.g. imageqa[worker] -> imageqa[service]
                raise SystemExit(f"{text!r}: an extra that includes another is not supported here")
            if key not in found:
                found[key] = metadata.version(req.name)
                todo.append((req.name, set(req.extras)))
    return found


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    pins = closure("imageqa", "service")
    args.out.write_text(HEADER + "".join(f"{name}=={pins[name]}\n" for name in sorted(pins)))
    print(f"{len(pins)} pins -> {args.out}")


if __name__ == "__main__":
    main()
