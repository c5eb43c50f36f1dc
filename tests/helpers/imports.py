"""The project's own modules a module imports, directly or through others (lazy imports too)."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGES = ("noisy_student", "tasks", "flows")


def module_file(root: Path, module: str) -> Path | None:
    base = root / Path(*module.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def imported_modules(path: Path) -> set[str]:
    """Every project module ``path`` names in an import statement, at any depth of its code."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return {m for m in found if m.split(".")[0] in PACKAGES}


def closure(root: Path, start: Path) -> set[Path]:
    """The files of every project module ``start`` runs: itself, what it imports, and the
    ``__init__.py`` of every package on the way (Python runs those too)."""
    seen: set[Path] = set()
    todo = [start]
    while todo:
        path = todo.pop()
        if path in seen:
            continue
        seen.add(path)
        for module in imported_modules(path):
            parts = module.split(".")
            for depth in range(1, len(parts) + 1):
                file = module_file(root, ".".join(parts[:depth]))
                if file is not None and file not in seen:
                    todo.append(file)
    return {p.relative_to(root) for p in seen}
