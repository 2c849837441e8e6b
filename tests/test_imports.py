"""No import circles between hashmoe's modules, counting imports inside functions too (a lazy import hides a
circle from the interpreter, not from the reader): models/ and trainer/ form a directed acyclic graph."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("models", "trainer")


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path) -> set[str]:
    """The hashmoe modules `path` imports: `from pkg import mod` names the submodule, `from pkg import f` the
    package (whose __init__ runs)."""
    package = module_name(path) if path.name == "__init__.py" else module_name(path).rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            if base.split(".")[0] not in PACKAGES:
                continue
            for alias in node.names:
                candidate = f"{base}.{alias.name}"
                is_module = (ROOT / Path(*candidate.split("."))).with_suffix(".py").is_file()
                found.add(candidate if is_module else base)
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.split(".")[0] in PACKAGES}
    return found - {module_name(path)}


def graph() -> dict[str, set[str]]:
    return {module_name(p): imports_of(p) for package in PACKAGES for p in (ROOT / package).rglob("*.py")}


def test_the_import_graph_has_no_circles():
    edges = graph()
    circles = []
    state = {}  # module -> "open" while on the current path, "done" after

    def visit(module, path):
        state[module] = "open"
        for target in sorted(edges.get(module, ())):
            if state.get(target) == "open":
                circles.append(" -> ".join(path[path.index(target):] + [target]))
            elif target not in state:
                visit(target, path + [target])
        state[module] = "done"

    for module in sorted(edges):
        if module not in state:
            visit(module, [module])
    assert not circles, "import circles:\n" + "\n".join(circles)


def test_the_graph_sees_lazy_imports():
    assert "trainer.slurm_env" in graph()["trainer.loop"]  # imported inside train()
    assert "models.modeling_hashmoe" not in graph()["models.staircase"]
