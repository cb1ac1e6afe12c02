"""The house rules between the project's top-level packages, checked from the source.

Floors, from the ground up: ``pallas_kernels`` (kernels), ``coda_jax`` (the
engine), ``convert`` (checkpoint formats), ``coda_db`` (the product) and
``train`` (training and evaluation). A package may import only packages on
lower floors: never one above, never in a circle. Every import statement
counts, at module level or inside a function.

    python tools/check_floors.py [ROOT]     prints the arrows; exits 1 on a breach
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

FLOORS = ("pallas_kernels", "coda_jax", "convert", "coda_db", "train")


def package_imports(root: Path) -> dict[tuple[str, str], str]:
    """(importer, imported) -> the first file where a package imports another."""
    arrows: dict[tuple[str, str], str] = {}
    for package in FLOORS:
        for path in sorted((root / package).rglob("*.py")):
            tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
            for node in ast.walk(tree):
                if isinstance(node, ast.Import):
                    names = [alias.name for alias in node.names]
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    names = [node.module]
                else:
                    continue
                for name in names:
                    top = name.split(".")[0]
                    if top in FLOORS and top != package:
                        arrows.setdefault((package, top), str(path.relative_to(root)))
    return arrows


def cycles(arrows: dict[tuple[str, str], str]) -> list[list[str]]:
    """Every package that can reach itself, with one such path."""
    graph: dict[str, set[str]] = {}
    for a, b in arrows:
        graph.setdefault(a, set()).add(b)
    found = []
    for start in FLOORS:
        stack = [(start, [start])]
        seen: set[str] = set()
        while stack:
            node, path = stack.pop()
            for nxt in sorted(graph.get(node, ())):
                if nxt == start:
                    found.append(path + [start])
                    stack.clear()
                    break
                if nxt not in seen:
                    seen.add(nxt)
                    stack.append((nxt, path + [nxt]))
    return found


def breaches(root: Path) -> list[str]:
    """The rules broken under ``root``, in words (empty: the floors hold)."""
    arrows = package_imports(root)
    floor = {name: i for i, name in enumerate(FLOORS)}
    problems = [f"{a} imports {b}, a floor above it ({where})"
                for (a, b), where in sorted(arrows.items()) if floor[b] > floor[a]]
    problems += [f"import cycle: {' -> '.join(c)}" for c in cycles(arrows)]
    return problems


def main(argv: list[str] | None = None) -> int:
    root = Path((argv or sys.argv[1:] or ["."])[0])
    for (a, b), where in sorted(package_imports(root).items()):
        print(f"{a} -> {b}  ({where})")
    problems = breaches(root)
    for problem in problems:
        print(f"BROKEN: {problem}")
    if not problems:
        print(f"the floors hold: {' < '.join(FLOORS)}")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
