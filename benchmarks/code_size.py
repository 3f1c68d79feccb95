"""Module sizes and the longest functions of a tree: what a reader meets.

    python benchmarks/code_size.py dask_hetzner [-n10]

Prints each module's line count, the N longest functions (lines from ``def`` to its end,
signature and docstring included) and how many are over 60 lines.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path


def main(argv: list[str]) -> None:
    top = 10
    paths: list[Path] = []
    for arg in argv:
        if arg.startswith("-n"):
            top = int(arg[2:] or 10)
        else:
            p = Path(arg)
            paths += sorted(p.rglob("*.py")) if p.is_dir() else [p]
    functions: list[tuple[int, str]] = []
    for path in paths:
        text = path.read_text()
        print(f"{len(text.splitlines()):6d} {path}")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = (node.end_lineno or node.lineno) - node.lineno + 1
                functions.append((length, f"{path}:{node.lineno} {node.name}"))
    functions.sort(reverse=True)
    print("longest functions:")
    for length, where in functions[:top]:
        print(f"{length:6d} {where}")
    print("functions over 60 lines:", sum(1 for length, _ in functions if length > 60))


if __name__ == "__main__":
    main(sys.argv[1:])
