"""Imports flow one way through the package; the test reads every import statement, including those inside
functions, so a cycle cannot hide behind a deferred import."""

import ast
from pathlib import Path

import mmalign

PACKAGE = Path(mmalign.__file__).parent

#: lower layers first; a module may import its own layer and the ones before it. The world is built on the
#: generic layers and reached by them only through import-path tables (reward registry, pipeline, prompt and
#: model sources), so only the demos and the command line import it. The demos (gradio) sit on everything below.
LAYERS = [
    {"media", "config", "prompts", "kernels", "files", "__init__", "seeds"},
    {"rewards"},
    {"models"},
    {"eval"},
    {"inference"},
    {"trainers"},
    {"world"},
    {"demos"},
    {"cli", "__main__"},
]


def _module(path: Path) -> str:
    parts = ["mmalign", *path.relative_to(PACKAGE).with_suffix("").parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> set[str]:
    """mmalign modules that ``path`` imports, anywhere in the file (absolute and relative imports)."""
    module, is_package = _module(path), path.name == "__init__.py"
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = module.split(".")[: len(module.split(".")) - node.level + is_package]
                found.add(".".join(base + ([node.module] if node.module else [])))
            else:
                found.add(node.module)
    return {name for name in found if name == "mmalign" or name.startswith("mmalign.")}


def _layer(module: str) -> int:
    part = module.split(".")[1] if "." in module else "__init__"
    return next(i for i, names in enumerate(LAYERS) if part.removesuffix(".py") in names)


GRAPH = {_module(p): _imports(p) for p in PACKAGE.rglob("*.py")}


def test_every_module_has_a_layer():
    for module in GRAPH:
        _layer(module)


def test_no_import_goes_against_the_layer_order():
    backwards = sorted(
        f"{source} imports {target}"
        for source, targets in GRAPH.items()
        for target in targets
        if _layer(target) > _layer(source)
    )
    assert not backwards, "imports against the order media < rewards < models < eval < inference < trainers < world < demos < cli:\n" + "\n".join(backwards)


def test_no_import_cycles():
    """Between modules (a package counts as its ``__init__``), by depth-first search."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(module: str) -> None:
        state[module] = 1
        stack.append(module)
        for target in sorted(GRAPH.get(module, ())):
            target = target if target in GRAPH else target.rpartition(".")[0]  # `from pkg import name`
            if state.get(target) == 1:
                cycle = stack[stack.index(target):] + [target]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if target in GRAPH and not state.get(target):
                visit(target)
        stack.pop()
        state[module] = 2

    for module in sorted(GRAPH):
        if not state.get(module):
            visit(module)
