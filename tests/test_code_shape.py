"""Small modules with one job: no product module over 600 lines, no function over 60.

A function may be longer where the line(s) just above its ``def`` (or its
decorators) carry a comment saying ``longer than 60 lines:`` and why; a
module has no such way out (split it). scripts/ is not product code.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
PRODUCT = ("daemon", "client", "sandbox")
MODULE_MAX = 600
FUNCTION_MAX = 60
REASON = "longer than 60 lines:"


def modules() -> list[Path]:
    return sorted(p for top in PRODUCT for p in (REPO / top).rglob("*.py"))


def excused(lines: list[str], node: ast.FunctionDef | ast.AsyncFunctionDef) -> bool:
    """Whether the comment lines just above the function (and its decorators) give a reason."""
    first = min([node.lineno, *(d.lineno for d in node.decorator_list)])
    index = first - 2  # the line above, 0-based
    while index >= 0 and lines[index].strip().startswith("#"):
        if REASON in lines[index]:
            return True
        index -= 1
    return False


def long_functions(text: str, where: str) -> list[str]:
    """The functions in ``text`` over the limit without a reason, named ``where:LINE NAME``."""
    lines = text.splitlines()
    found = []
    for node in ast.walk(ast.parse(text, where)):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            length = node.end_lineno - node.lineno + 1
            if length > FUNCTION_MAX and not excused(lines, node):
                found.append(f"{where}:{node.lineno} {node.name} ({length} lines)")
    return found


def test_the_product_code_is_where_this_test_looks():
    names = {p.relative_to(REPO).as_posix() for p in modules()}
    assert {"daemon/server.py", "client/cli.py", "sandbox/store.py"} <= names


def test_no_module_is_over_600_lines():
    long = [
        f"{p.relative_to(REPO)} ({n} lines)"
        for p in modules()
        if (n := len(p.read_text(encoding="utf-8").splitlines())) > MODULE_MAX
    ]
    assert long == [], "\n".join(long)


def test_no_function_is_over_60_lines_without_a_reason():
    long = [
        found
        for path in modules()
        for found in long_functions(path.read_text(encoding="utf-8"), str(path.relative_to(REPO)))
    ]
    assert long == [], "\n".join(long)


@pytest.mark.parametrize(
    ("above", "counted"),
    [
        ("", True),
        ("# a plain comment\n", True),
        ("# longer than 60 lines: one table of cases, read top to bottom\n", False),
        ("# longer than 60 lines: the reason,\n# continued on a second line\n", False),
        ("# longer than 60 lines: above the decorator\n@staticmethod\n", False),
        ("# longer than 60 lines: not just above\n\n", True),
    ],
)
def test_the_reason_is_a_comment_just_above_the_def(above: str, counted: bool):
    body = "".join(f"    x{i} = {i}\n" for i in range(FUNCTION_MAX))  # 61 lines with the def
    assert bool(long_functions(f"{above}def f():\n{body}", "m.py")) is counted
