"""The package layout as a checked contract: import layers, no circles, short units."""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "pollen"

#: Longest function body, in lines, before it must be split along its roles.
MAX_FUNCTION_LINES = 80
#: Most parameters a function takes before they belong in a settings object.
MAX_PARAMETERS = 8


def _lint_imports() -> list[str]:
    found = shutil.which("lint-imports", path=str(Path(sys.executable).parent))
    return [found] if found else [sys.executable, "-m", "importlinter.cli"]


def test_import_contracts_hold() -> None:
    """The [tool.importlinter] contracts of pyproject.toml: layers, client/server, no cycles."""
    proc = subprocess.run(
        [*_lint_imports(), "--no-cache"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "0 broken" in proc.stdout


#: A comment that names why a function takes more than MAX_PARAMETERS, on its signature lines.
WIDE_REASON = "# parameters:"


def _functions() -> list[tuple[str, ast.FunctionDef | ast.AsyncFunctionDef, str]]:
    """Every function of the package: where it is, its node, its signature's source lines."""
    out = []
    for path in sorted(PACKAGE.rglob("*.py")):
        text = path.read_text(encoding="utf-8")
        lines = text.splitlines()
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                first = node.body[0].lineno - 1 if node.body else node.lineno
                signature = "\n".join(lines[node.lineno - 1 : first])
                out.append((f"{path.relative_to(ROOT)}:{node.lineno} {node.name}", node, signature))
    return out


def _body_lines(node: ast.FunctionDef | ast.AsyncFunctionDef) -> int:
    """Lines of a function's code, its docstring left out."""
    body = node.body
    if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
        body = body[1:]
    if not body:
        return 0
    return (node.end_lineno or node.lineno) - body[0].lineno + 1


def test_no_function_is_longer_than_the_limit() -> None:
    long = [
        f"{where} ({_body_lines(n)} lines)"
        for where, n, _ in _functions()
        if _body_lines(n) > MAX_FUNCTION_LINES
    ]
    assert not long, f"split these along their roles (> {MAX_FUNCTION_LINES} lines): {long}"


def test_no_signature_takes_more_parameters_than_the_limit() -> None:
    """Unless a ``# parameters: <why>`` comment on the signature says why it must."""

    def count(node: ast.FunctionDef | ast.AsyncFunctionDef) -> int:
        a = node.args
        names = [x.arg for x in a.posonlyargs + a.args + a.kwonlyargs]
        return len([n for n in names if n not in ("self", "cls")])

    wide = [
        f"{where} ({count(n)})"
        for where, n, signature in _functions()
        if count(n) > MAX_PARAMETERS and WIDE_REASON not in signature
    ]
    assert not wide, f"group these parameters into a settings object (> {MAX_PARAMETERS}): {wide}"


def test_the_architecture_test_sees_a_long_function() -> None:
    """The length check itself works: a 90-line function is counted as 90 lines."""
    source = "def f():\n    '''Doc.'''\n" + "    x = 1\n" * 90
    node = ast.parse(source).body[0]
    assert isinstance(node, ast.FunctionDef)
    assert _body_lines(node) == 90
