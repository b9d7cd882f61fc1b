"""The README's module map ("Where things are") names exactly the modules of the tree."""

from __future__ import annotations

import re

from tests.helpers import ROOT


def _mapped() -> set[str]:
    text = ROOT.joinpath("README.md").read_text()
    section = text.split("### Where things are", 1)[1].split("\n## ", 1)[0]
    names: set[str] = set()
    for cell in re.findall(r"^\| `([^`]+)` \|([^|]*)\|", section, flags=re.M):
        path, what = cell
        if path.endswith("/"):  # a subpackage: its files are named in the row as `file.py`
            names |= {path + f for f in re.findall(r"`([a-z_]+\.py)`", what)}
        else:
            names.add(path)
    return names


def _tree() -> set[str]:
    files = [*ROOT.glob("producer/**/*.py"), *ROOT.glob("workers/**/*.py")]
    return {str(p.relative_to(ROOT)) for p in files if p.name != "__init__.py"}


def test_the_module_map_names_every_module_and_no_other():
    mapped, tree = _mapped(), _tree()
    assert not tree - mapped, f"modules missing from README's 'Where things are': {sorted(tree - mapped)}"
    assert not mapped - tree, f"README's module map names missing modules: {sorted(mapped - tree)}"
