"""The error catalog: one list of codes, used at every raise site and documented in the README."""

import ast
import re
from pathlib import Path

import pytest

from producer import errors
from producer.contract import ErrorInfo
from producer.errors import MEANINGS, ErrorCode, ImageQAError

ROOT = Path(__file__).resolve().parent.parent
SOURCES = sorted(p for folder in ("producer", "workers", "ops") for p in (ROOT / folder).rglob("*.py"))


def readme_error_codes() -> list[str]:
    """The codes in the first column of the README's error tables (rows under "| error code |")."""
    codes: list[str] = []
    in_table = False
    for line in (ROOT / "README.md").read_text("utf-8").splitlines():
        if line.startswith("| error code |"):
            in_table = True
        elif in_table and line.startswith("|"):
            codes += re.findall(r"`([a-z_]+)`", line.split("|")[1])
        else:
            in_table = False
    return codes


def test_the_readme_lists_every_code_of_the_catalog_once():
    listed = readme_error_codes()
    assert sorted(listed) == sorted(set(listed)), "a code is listed twice"
    assert set(listed) == {code.value for code in ErrorCode}


def test_every_code_has_a_one_line_meaning():
    assert set(MEANINGS) == set(ErrorCode)
    assert all(m.strip() and "\n" not in m for m in MEANINGS.values())


def test_a_code_is_its_plain_string_wherever_it_goes():
    code = ErrorCode.CANCELLED
    assert code == "cancelled" and str(code) == "cancelled" and f"failed:{code}" == "failed:cancelled"
    assert "%s" % code == "cancelled"  # noqa: UP031 - how logging formats it
    info = ErrorInfo(code=code, message="m")
    assert type(info.code) is str
    assert info.model_dump_json() == '{"code":"cancelled","message":"m"}'


def test_every_error_class_is_in_the_one_tree_with_a_catalog_code():
    classes = [c for c in vars(errors).values() if isinstance(c, type) and issubclass(c, Exception)]
    moved_in = {"PromptError", "DataFlowError", "StorageError", "ClusterServingError"}
    assert moved_in <= {c.__name__ for c in classes}
    for cls in classes:
        assert issubclass(cls, ImageQAError) and isinstance(cls.code, ErrorCode), cls


def test_the_error_classes_are_importable_where_they_are_used():
    from workers.dataflow import ClusterServingError, DataFlowError, StorageError

    assert (DataFlowError, StorageError, ClusterServingError) == (
        errors.DataFlowError,
        errors.StorageError,
        errors.ClusterServingError,
    )
    assert issubclass(DataFlowError, ValueError), "DataFlow raises ValueError there"


def string_codes(tree: ast.AST) -> list[tuple[int, str]]:
    """``code="..."`` keywords, ``code = "..."`` assignments and ``.code == "..."`` comparisons."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.keyword) and node.arg == "code":
            values = [node.value]
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            named = any(ast.unparse(t).split(".")[-1] == "code" for t in targets)
            values = [node.value] if named and node.value is not None else []
            if isinstance(node.value, ast.IfExp):
                values = [node.value.body, node.value.orelse] if named else []
        elif isinstance(node, ast.Compare) and ast.unparse(node.left).endswith("code"):
            values = node.comparators
        else:
            continue
        strings = [v for v in values if isinstance(v, ast.Constant) and isinstance(v.value, str)]
        found += [(v.lineno, v.value) for v in strings]
    return found


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(ROOT)))
def test_no_source_file_spells_an_error_code_as_a_string(path):
    literals = string_codes(ast.parse(path.read_text("utf-8")))
    assert literals == [], f"{path.name}: use ErrorCode members, not {literals}"
