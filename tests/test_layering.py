"""The package's imports run one way, down the layers of DESIGN: no cycle, no upward import,
no Lightning in ``measures``."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "lightning_registers"
# Higher layers may import lower ones, never the reverse, and two parts of one layer never
# import each other.
LAYERS = {
    "models": 0,
    "data": 0,
    "measures": 1,
    "objectives": 2,
    "callbacks": 2,
    "analysis": 3,
    "runs": 3,
    "shipped_configs": 3,
    "slurm": 4,
    "cli": 5,
    "benchmarks": 6,
    "__main__": 6,
}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path) -> set[str]:
    """Every module this file imports, anywhere in it (function-level imports included)."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = package.split(".")
            if node.level:
                base = base[: len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module
            found.add(target)
            found.update(f"{target}.{alias.name}" for alias in node.names)
    return found


def graph() -> dict[str, set[str]]:
    modules = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    return {
        name: {target for target in imports(path) if target in modules and target != name}
        for name, path in modules.items()
    }


def part(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def test_every_part_of_the_package_has_a_layer():
    assert {part(m) for m in graph()} - {""} <= set(LAYERS)


def test_no_upward_or_sideways_import_between_parts():
    bad = [
        f"{src} imports {dst}"
        for src, targets in graph().items()
        for dst in targets
        if part(src) and part(dst) and part(src) != part(dst)
        if LAYERS[part(dst)] >= LAYERS[part(src)]
    ]
    assert not bad, "\n".join(bad)


def test_no_import_cycle():
    edges = graph()
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    cycles = []

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(edges[node]):
            if state.get(nxt) == 1:
                cycles.append(" -> ".join(path[path.index(nxt) :] + [node, nxt]))
            elif nxt not in state:
                visit(nxt, [*path, node])
        state[node] = 2

    for node in sorted(edges):
        if node not in state:
            visit(node, [])
    assert not cycles, "\n".join(cycles)


def test_measures_import_no_lightning():
    for path in (PACKAGE / "measures").rglob("*.py"):
        roots = {target.split(".")[0] for target in imports(path)}
        assert not roots & {"lightning", "pytorch_lightning"}, path.name
