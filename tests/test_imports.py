"""The package's import layers: every module of fused_resnet/ and kernels/ (installed as
fused_resnet.kernels) is parsed with `ast`, and its imports, module-level and inside functions,
must point at its own layer or one below it (LAYERS, top to bottom) and must not go round in a
circle. Nothing is imported: the source is read, so this takes well under a second.

Lazy (function-level) imports count like the others. A lazy import keeps the interpreter from
tripping over a circle at import time but not the reader: `ops/conv.py` once reached up to the
CLI's verify command from inside a function, and `tuning` and `_info` imported each other, one
of them lazily. Importing a submodule also runs its parent packages' `__init__`; that is how
Python packages work, not an edge between layers, so it is not counted."""

import ast
import pathlib
from typing import NamedTuple

REPO = pathlib.Path(__file__).resolve().parents[1]
# {package name: its source directory}; kernels/ is installed as fused_resnet.kernels (setup.py)
SOURCE_ROOTS = {"fused_resnet": REPO / "fused_resnet", "fused_resnet.kernels": REPO / "kernels"}
# compiled modules, imported like Python ones but with no source to parse
COMPILED = {"fused_resnet._C"}


class Layer(NamedTuple):
    name: str
    modules: tuple  # "a.b" is that module; "a.b.*" is the package a.b and everything in it


# Top to bottom: a module may import its own layer or any layer below, never one above.
LAYERS = (
    # The commands and what only they use: the CLI and `python -m fused_resnet`, `fused-resnet
    # tune` / `demo` / `verify`, the bench (whole models, roofline table, floors), the AOT
    # builds and the GPU rehearsal. They may use anything.
    Layer("tools", ("fused_resnet.cli", "fused_resnet.__main__", "fused_resnet.tune",
                    "fused_resnet.demo", "fused_resnet.verify", "fused_resnet.bench.*",
                    "fused_resnet.aot.*")),
    # The public package (`import fused_resnet`: fuse_, unfuse_, the functional ops, info())
    # and the info() report, which asks the layers below what runs.
    Layer("api", ("fused_resnet", "fused_resnet._info")),
    # fuse_ / unfuse_: walk a model and put the fused modules in place of torchvision's.
    Layer("swap", ("fused_resnet.swap",)),
    # The fused nn.Modules (blocks, stem, conv-BN-act, norms, stages).
    Layer("modules", ("fused_resnet.modules.*",)),
    # The functional ops the modules (and users) call.
    Layer("functional", ("fused_resnet.functional",)),
    # The torch.library ops: autograd glue, fakes, the per-shape dispatcher, the eager paths.
    Layer("ops", ("fused_resnet.ops.*",)),
    # Which implementation runs (Triton, C++/CUDA, eager), decided from what is available.
    Layer("backend", ("fused_resnet.backend",)),
    # The kernels: Triton kernels and launchers, the C++/CUDA extension and its loader, and
    # the tuning cache the Triton conv reads its tile choices from (its entries record the _C
    # source stamp, hence the lazy _extension import in tuning).
    Layer("kernels", ("fused_resnet.kernels.*", "fused_resnet._C", "fused_resnet._extension",
                      "fused_resnet.tuning")),
    # The plain-PyTorch reference computations (BN statistics, scale and shift) the kernels
    # and ops fall back to and are tested against, and BN folding built on them.
    Layer("reference", ("fused_resnet.reference", "fused_resnet.fold")),
    # The floor: leaf helpers that import nothing above them. Version and build stamp, the
    # numeric comparison verify and the ops share, memory layout and mask sizes, tracing /
    # fake-tensor tests, device queries, the weight cache, the progress display, and the
    # CIFAR model zoo (plain torch; modules.blocks recognises its PlainBlock).
    Layer("floor", ("fused_resnet._version", "fused_resnet._build_stamp", "fused_resnet.compare",
                    "fused_resnet.layout", "fused_resnet.tracing", "fused_resnet.devices",
                    "fused_resnet.weight_cache", "fused_resnet.progress",
                    "fused_resnet.models")),
)


class Import(NamedTuple):
    target: str
    line: int
    lazy: bool  # inside a function


# ---- the checker ------------------------------------------------------------------------------
def module_files(roots: dict) -> dict:
    """{module name: source path} for every .py file under the roots."""
    modules = {}
    for package, root in roots.items():
        for path in sorted(root.rglob("*.py")):
            parts = list(path.relative_to(root).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            modules[".".join([package] + parts)] = path
    return modules


def _function_lines(tree: ast.AST) -> set:
    """Ids of the import nodes that sit inside a function (lazy imports)."""
    inside = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            inside |= {id(n) for n in ast.walk(node) if isinstance(n, (ast.Import,
                                                                        ast.ImportFrom))}
    return inside


def _from_base(node: ast.ImportFrom, module: str, is_package: bool) -> str:
    """The absolute module a `from ... import` names, resolving relative levels."""
    if not node.level:
        return node.module or ""
    parts = module.split(".")
    package = parts if is_package else parts[:-1]
    base = package[:len(package) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def imports_of(source: str, module: str, is_package: bool, known: set, prefix: str) -> list:
    """The project modules `module` imports: `from pkg import name` counts as importing the
    submodule pkg.name where that is a module, else pkg itself."""
    tree = ast.parse(source)
    lazy = _function_lines(tree)
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = _from_base(node, module, is_package)
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base
                       for a in node.names]
        else:
            continue
        found += [Import(t, node.lineno, id(node) in lazy) for t in targets
                  if (t == prefix or t.startswith(prefix + ".")) and t != module]
    return found


def import_graph(roots: dict = SOURCE_ROOTS, compiled: set = COMPILED) -> dict:
    """{module: [Import]} for every module under the roots."""
    files = module_files(roots)
    known = set(files) | compiled
    prefix = min(roots, key=len)
    return {name: imports_of(path.read_text(), name, path.name == "__init__.py", known, prefix)
            for name, path in files.items()}


def layer_index(module: str, layers: tuple = LAYERS):
    """Position of the module's layer (0 = top), from the most specific entry; None if the
    table does not place it."""
    best, index = -1, None
    for i, layer in enumerate(layers):
        for entry in layer.modules:
            exact = entry == module
            inside = entry.endswith(".*") and (module == entry[:-2]
                                               or module.startswith(entry[:-1]))
            if (exact or inside) and len(entry) > best:
                best, index = len(entry), i
    return index


def unplaced(graph: dict, layers: tuple = LAYERS) -> list:
    names = set(graph) | {imp.target for imps in graph.values() for imp in imps}
    return sorted(name for name in names if layer_index(name, layers) is None)


def upward_imports(graph: dict, layers: tuple = LAYERS) -> list:
    """'a (layer) -> b (layer), line N' for every import of a module in a higher layer."""
    found = []
    for module, imps in sorted(graph.items()):
        here = layer_index(module, layers)
        for imp in imps:
            there = layer_index(imp.target, layers)
            if here is not None and there is not None and there < here:
                found.append(f"{module} ({layers[here].name}) -> {imp.target} "
                             f"({layers[there].name}), line {imp.line}"
                             + (" (lazy)" if imp.lazy else ""))
    return found


def circles(graph: dict) -> list:
    """Every group of modules that import each other round a circle (the strongly connected
    components of more than one module, by Tarjan's algorithm), each sorted."""
    edges = {m: sorted({imp.target for imp in imps if imp.target in graph})
             for m, imps in graph.items()}
    index, low, stack, on_stack, groups = {}, {}, [], set(), []

    def visit(node):
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in edges[node]:
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            group = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                group.append(member)
                if member == node:
                    break
            if len(group) > 1:
                groups.append(sorted(group))

    for node in sorted(edges):
        if node not in index:
            visit(node)
    return sorted(groups)


def reaches(graph: dict, start: str, goal: str) -> bool:
    seen, todo = set(), [start]
    while todo:
        node = todo.pop()
        if node == goal:
            return True
        if node not in seen:
            seen.add(node)
            todo += [imp.target for imp in graph.get(node, ())]
    return False


# ---- the package ------------------------------------------------------------------------------
def test_every_module_has_a_layer():
    graph = import_graph()
    assert "fused_resnet.kernels.conv" in graph and "fused_resnet.ops.conv" in graph
    assert not unplaced(graph), "put these modules in a layer of LAYERS"


def test_no_module_imports_a_layer_above_it():
    assert upward_imports(import_graph()) == []


def test_no_import_circle():
    assert circles(import_graph()) == []


def test_the_circles_once_here_are_gone():
    graph = import_graph()
    assert not reaches(graph, "fused_resnet.tuning", "fused_resnet._info")
    assert not reaches(graph, "fused_resnet.ops.conv", "fused_resnet.verify")
    # what both sides needed moved down: the version, and the numeric comparison
    assert any(i.target == "fused_resnet._version" for i in graph["fused_resnet.tuning"])
    assert any(i.target == "fused_resnet.compare" for i in graph["fused_resnet.ops.conv"])
    assert any(i.target == "fused_resnet.compare" for i in graph["fused_resnet.verify"])


# ---- the checker can fail ---------------------------------------------------------------------
TOY_LAYERS = (Layer("top", ("toy.cli",)), Layer("middle", ("toy.ops.*",)),
              Layer("bottom", ("toy.util",)))


def _toy(tmp_path, files: dict) -> dict:
    root = tmp_path / "toy"
    for name, text in {"__init__.py": "", "ops/__init__.py": "", **files}.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    return import_graph({"toy": root}, set())


def test_checker_finds_a_lazy_upward_import_through_a_relative_import(tmp_path):
    graph = _toy(tmp_path, {
        "cli.py": "from toy.ops import conv\nimport os\n",
        "ops/conv.py": "from .. import util\n\ndef check():\n    from ..cli import main\n",
        "util.py": "import math\n"})
    assert {i.target for i in graph["toy.ops.conv"]} == {"toy.util", "toy.cli"}
    assert upward_imports(graph, TOY_LAYERS) == [
        "toy.ops.conv (middle) -> toy.cli (top), line 4 (lazy)"]
    assert circles(graph) == [["toy.cli", "toy.ops.conv"]]


def test_checker_finds_a_circle_within_a_layer_and_an_unplaced_module(tmp_path):
    graph = _toy(tmp_path, {
        "ops/a.py": "import toy.ops.b\n",
        "ops/b.py": "from toy.ops import c\n",
        "ops/c.py": "def f():\n    from . import a\n",
        "extra.py": "from toy import util\n",
        "util.py": ""})
    assert upward_imports(graph, TOY_LAYERS) == []
    assert circles(graph) == [["toy.ops.a", "toy.ops.b", "toy.ops.c"]]
    assert unplaced(graph, TOY_LAYERS) == ["toy", "toy.extra"]
