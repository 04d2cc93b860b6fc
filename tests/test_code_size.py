"""The package stays readable: no module in keras_cwsn/ over 400 lines, no function over 60."""

import ast
import pathlib

PACKAGE = pathlib.Path(__file__).resolve().parent.parent / "keras_cwsn"
MAX_MODULE_LINES, MAX_FUNCTION_LINES = 400, 60


def oversized():
    """["path: N lines" for modules, "path:line name: N lines" for functions] over the limits."""
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        text = path.read_text(encoding="utf-8")
        name = path.relative_to(PACKAGE.parent)
        if len(text.splitlines()) > MAX_MODULE_LINES:
            found.append(f"{name}: {len(text.splitlines())} lines")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1
                if length > MAX_FUNCTION_LINES:
                    found.append(f"{name}:{node.lineno} {node.name}: {length} lines")
    return found


def test_no_module_or_function_over_the_limits():
    assert oversized() == []


if __name__ == "__main__":
    print("\n".join(oversized()) or "none over the limits")
