"""Check the house limits of issue 19 on a package: module and function sizes.

Limits: no module over 400 lines, no function over 60 lines, no function with more than
8 parameters (positional, keyword-only and ``*args``/``**kwargs`` all count; ``self`` and
``cls`` do not). Triton ``@triton.jit`` kernels are exempt from the parameter limit only
(TRITON_REASON says why).

Usage: python scripts/check_house.py [PACKAGE_DIR ...]   (default: src/dpvision)
Prints one line per violation and exits 1 if there is any, 0 otherwise.
"""
from __future__ import annotations

import ast
import sys
from pathlib import Path

MAX_MODULE_LINES = 400
MAX_FUNCTION_LINES = 60
MAX_PARAMETERS = 8

# Exempt from the parameter limit only (their length is still checked).
TRITON_REASON = ("Triton @triton.jit kernels take pointers, strides and block sizes as "
                 "separate scalars; a kernel cannot receive a grouped object")


def _is_triton_kernel(node: ast.AST) -> bool:
    for dec in getattr(node, "decorator_list", []):
        target = dec.func if isinstance(dec, ast.Call) else dec
        if ast.unparse(target) in ("triton.jit", "jit"):
            return True
    return False


def _parameter_count(args: ast.arguments) -> int:
    names = [a.arg for a in args.posonlyargs + args.args + args.kwonlyargs]
    names = [n for n in names if n not in ("self", "cls")]
    return len(names) + (args.vararg is not None) + (args.kwarg is not None)


def check_file(path: Path, rel: str) -> list[str]:
    source = path.read_text(encoding="utf-8")
    problems = []
    n_lines = len(source.splitlines())
    if n_lines > MAX_MODULE_LINES:
        problems.append(f"{rel}: module has {n_lines} lines (max {MAX_MODULE_LINES})")
    for node in ast.walk(ast.parse(source, filename=str(path))):
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        where = f"{rel}:{node.lineno} {node.name}"
        length = node.end_lineno - node.lineno + 1
        if length > MAX_FUNCTION_LINES:
            problems.append(f"{where}: function has {length} lines (max {MAX_FUNCTION_LINES})")
        count = _parameter_count(node.args)
        if count > MAX_PARAMETERS and not _is_triton_kernel(node):
            problems.append(f"{where}: function has {count} parameters (max {MAX_PARAMETERS})")
    return problems


def check_package(root: Path) -> list[str]:
    problems = []
    for path in sorted(root.rglob("*.py")):
        problems += check_file(path, path.relative_to(root).as_posix())
    return problems


def main(argv: list[str]) -> int:
    roots = [Path(a) for a in argv] or [Path(__file__).resolve().parents[1] / "src" / "dpvision"]
    problems = [p for root in roots for p in check_package(root)]
    for line in problems:
        print(line)
    print(f"{len(problems)} violation(s)" if problems else "house limits: OK")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
