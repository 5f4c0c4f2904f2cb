"""The package's architecture, checked: dependencies point one way and no module reaches into
another's privates (docs/design.md's module table)."""
from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "pdistill_jax"

# What each part may import (besides itself). Lower layers never import higher ones.
ALLOWED = {
    "base": set(),  # config, files, log, retrieval, signals
    "model": {"base"},
    "weights": {"base", "model"},
    "datagen": {"base", "model", "weights"},
    "infer": {"base", "model", "weights"},
    "train": {"base", "model", "weights", "datagen"},  # training reads datagen's dataset format
    "pipeline": {"base", "model", "weights", "datagen", "infer", "train"},
    "cli": {"base", "model", "weights", "datagen", "infer", "train", "pipeline", "cli"},
}


def _part(module: str) -> str:
    parts = module.split(".")
    if len(parts) < 2 or parts[1] in ("config", "files", "log", "retrieval", "signals", "__init__"):
        return "base"
    return "cli" if parts[1] in ("cli", "commands") else parts[1]


def _module_name(path: Path) -> str:
    rel = path.relative_to(PACKAGE.parent).with_suffix("")
    return ".".join(rel.parts).removesuffix(".__init__")


def _imports(path: Path) -> list[tuple[str, list[str], int]]:
    """(imported module, names, line) of every import in the file, lazy ones included."""
    here = _module_name(path).split(".")
    package = here if path.name == "__init__.py" else here[:-1]
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom):
            base = ".".join(package[:len(package) - node.level + 1]) if node.level else ""
            module = ".".join(p for p in (base, node.module or "") if p)
            if module.startswith("pdistill_jax"):
                found.append((module, [a.name for a in node.names], node.lineno))
        elif isinstance(node, ast.Import):
            found += [(a.name, [], node.lineno) for a in node.names if a.name.startswith("pdistill_jax")]
    return found


def _graph() -> dict[str, list[tuple[str, list[str], int]]]:
    return {_module_name(p): _imports(p) for p in sorted(PACKAGE.rglob("*.py"))}


def test_dependencies_point_one_way():
    wrong = []
    for module, imports in _graph().items():
        for target, _, line in imports:
            here, there = _part(module), _part(target)
            if there != here and there not in ALLOWED[here]:
                wrong.append(f"{module}:{line} ({here}) imports {target} ({there})")
    assert not wrong, "\n".join(wrong)


def test_no_private_names_cross_modules():
    wrong = [f"{module}:{line} imports {name} from {target}"
             for module, imports in _graph().items() for target, names, line in imports
             for name in names if name.startswith("_") and name != "__version__" and target != module]
    assert not wrong, "\n".join(wrong)


def test_no_import_cycles():
    graph = _graph()
    edges = {m: {t for t, names, _ in imps if t in graph and t != m} |
             {f"{t}.{n}" for t, names, _ in imps for n in names if f"{t}.{n}" in graph}
             for m, imps in graph.items()}
    for package in [m for m in graph if (PACKAGE.parent / m.replace(".", "/") / "__init__.py").exists()]:
        for m in edges.values():
            m.discard(package)  # importing a package runs only its (empty) __init__
    state: dict[str, int] = {}
    cycle: list[str] = []

    def visit(node: str, path: list[str]) -> bool:
        state[node] = 1
        for nxt in sorted(edges[node]):
            if state.get(nxt) == 1:
                cycle.extend(path[path.index(nxt):] + [node, nxt] if nxt in path else [node, nxt])
                return True
            if nxt not in state and visit(nxt, path + [node]):
                return True
        state[node] = 2
        return False

    for node in sorted(edges):
        if node not in state and visit(node, []):
            break
    assert not cycle, " -> ".join(cycle)


def test_every_script_imports_names_the_package_has():
    # Scripts import inside main(), so a moved function breaks them only when run; check here.
    import importlib

    missing = []
    for script in sorted((PACKAGE.parent / "scripts").glob("*.py")):
        for node in ast.walk(ast.parse(script.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("pdistill_jax"):
                module = importlib.import_module(node.module)
                missing += [f"{script.name}:{node.lineno}: {node.module}.{a.name}"
                            for a in node.names if not hasattr(module, a.name)]
    assert not missing, missing
