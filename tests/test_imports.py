"""No import circles between hashmoe's modules, counting imports inside functions too (a lazy import hides a
circle from the interpreter, not from the reader): models/ and trainer/ form a directed acyclic graph. And the
graph runs one way through trainer/'s folders, from the command line down to models/ (../shared/design.md,
"trainer/ by concern")."""

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
    assert "trainer.parallel.slurm_env" in graph()["trainer.run.loop"]  # imported inside train()
    assert "models.modeling_hashmoe" not in graph()["models.staircase"]


# Top to bottom; a module may import its own folder and any folder of a lower layer, never a higher one or a
# sibling of its own layer. trainer.hf is, like the command line, an entry point (users' own HF Trainer).
LAYERS = (("cli",), ("publish",), ("cluster", "analysis"), ("run",), ("parallel", "data"), ("leaves",),
          ("models",))
RANK = {concern: rank for rank, concerns in enumerate(LAYERS) for concern in concerns}


def concern(module: str) -> str:
    parts = module.split(".")
    if parts[0] == "models":
        return "models"
    if len(parts) == 1 or parts[1] in ("errors", "fileio"):
        return "leaves"
    if parts[1] in ("cli", "hf"):
        return "cli"
    return parts[1]


def layer_violations(edges: dict[str, set[str]]) -> list[str]:
    found = []
    for module, targets in sorted(edges.items()):
        for target in sorted(targets):
            here, there = concern(module), concern(target)
            if here != there and RANK[there] <= RANK[here]:
                found.append(f"{module} ({here}) imports {target} ({there}), which is not below it")
    return found


def test_every_module_sits_in_a_known_folder():
    assert {concern(m) for m in graph()} <= set(RANK), sorted({concern(m) for m in graph()} - set(RANK))


def test_imports_run_down_the_layers():
    violations = layer_violations(graph())
    assert not violations, "imports that run up or sideways:\n" + "\n".join(violations)


def test_the_layer_check_names_an_upward_import():
    planted = {"trainer.parallel.distributed": {"trainer.run.config"}, "trainer.cluster.slurm": {"trainer.analysis"},
               "trainer.run.loop": {"trainer.parallel.distributed", "trainer.run.checkpoint"}}
    assert layer_violations(planted) == [
        "trainer.cluster.slurm (cluster) imports trainer.analysis (analysis), which is not below it",
        "trainer.parallel.distributed (parallel) imports trainer.run.config (run), which is not below it"]


def test_models_import_neither_trainer_nor_deepspeed():
    for path in (ROOT / "models").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level else []
            assert not any(n.split(".")[0] in ("trainer", "deepspeed") for n in names), (path, names)
