"""The package's shape, read from its source with ``ast`` (nothing is imported): layers, sizes, names.

Layers, lowest first (DESIGN.md): a module may import its own sub-package and anything in a lower layer;
sub-packages in the same layer never import each other (a backbone never knows the solver, the denoiser
never knows which policy runs). Function-level imports count like module-level ones.
"""
from __future__ import annotations

import ast
import re
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "diffcache"

LAYERS = [
    {"utils"},                    # leaf helpers: hashing, figures, console, config resolvers
    {"backbones", "solvers"},     # models and samplers' maths, blind to each other
    {"context"},                  # StepContext, run_with: what the loop tells a bound policy
    {"policies", "denoiser"},     # cache policies; the backbone seen through a solver
    {"sampling"},                 # the one loop
    {"data"},
    {"metrics"},                  # cost counter, latency, quality (the MNIST classifier lives here)
    {"search"},                   # searched schedules: runs the sampler, reads the cost counter
    {"modules", "callbacks"},     # LightningModules and callbacks
    {"tasks", "plot", "export_schedule"},  # entry points' bodies and module CLIs
]
LAYER = {name: i for i, group in enumerate(LAYERS) for name in group}
# package imports that stay inside a function: the registry fills itself with the model files on first use,
# so ``import diffcache.backbones`` (weights, base class) does not build every family's module
LAZY = {("backbones", f"backbones.{family}") for family in ("dit", "uvit", "pixart")}


def _modules():
    for path in sorted(SRC.rglob("*.py")):
        parts = path.relative_to(SRC.parent).with_suffix("").parts
        yield (parts[:-1] if parts[-1] == "__init__" else parts), path


def _imports(parts: tuple[str, ...], path: Path):
    """(imported module, line, inside a function) for every import of the package in ``path``."""
    package = parts if path.name == "__init__.py" else parts[:-1]
    tree = ast.parse(path.read_text())
    inner = {id(n) for f in ast.walk(tree) if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef))
             for n in ast.walk(f)}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = package[:len(package) - node.level + 1] if node.level else ()
            if node.module:
                names = [".".join(base + tuple(node.module.split(".")))]
            else:  # ``from . import x``: the sub-modules themselves
                names = [".".join(base + (a.name,)) for a in node.names]
        else:
            continue
        for name in names:
            if name == "diffcache" or name.startswith("diffcache."):
                yield name, node.lineno, id(node) in inner


def _sub(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else None


def _edges():
    for parts, path in _modules():
        src = ".".join(parts)
        for target, line, lazy in _imports(parts, path):
            yield src, target, f"{path.relative_to(SRC.parent)}:{line}", lazy


def test_every_subpackage_has_a_layer():
    subs = {p[1] for p, _ in _modules() if len(p) > 1}
    assert subs == set(LAYER), f"place these in LAYERS: {sorted(subs ^ set(LAYER))}"


def test_no_upward_or_sideways_import():
    bad = []
    for src, target, where, _ in _edges():
        a, b = _sub(src), _sub(target)
        if a is None or b is None or a == b:
            continue  # the package root registers the config resolvers; a sub-package may import itself
        if LAYER[b] >= LAYER[a]:
            bad.append(f"{where}: {a} (layer {LAYER[a]}) imports {b} (layer {LAYER[b]})")
    assert not bad, "\n".join(bad)


def test_package_root_imports_only_utils():
    targets = {_sub(t) for parts, path in _modules() if len(parts) == 1 for t, _, _ in _imports(parts, path)}
    assert targets <= {"utils"}, targets


def test_no_cycle_between_subpackages():
    graph: dict[str, set[str]] = {}
    for src, target, _, _ in _edges():
        a, b = _sub(src), _sub(target)
        if a and b and a != b:
            graph.setdefault(a, set()).add(b)

    def reaches(start, goal, seen):
        return any(n == goal or (n not in seen and reaches(n, goal, seen | {n})) for n in graph.get(start, ()))

    cycles = sorted(a for a in graph if reaches(a, a, {a}))
    assert not cycles, cycles


def test_package_imports_are_module_level():
    """A function-level import hides an edge of the graph from a reader; only the listed ones remain."""
    lazy = {(src.removeprefix("diffcache."), t.removeprefix("diffcache.")): where
            for src, t, where, is_lazy in _edges() if is_lazy}
    assert set(lazy) <= LAZY, "\n".join(f"{w}: {s} -> {t}" for (s, t), w in lazy.items() if (s, t) not in LAZY)


def _functions(tree, prefix=""):
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            yield prefix + node.name, node
        if isinstance(node, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            yield from _functions(node, f"{prefix}{node.name}.")


def test_functions_and_files_are_short():
    long_files, long_functions = [], {}
    for _, path in _modules():
        text, where = path.read_text(), path.relative_to(SRC).as_posix()
        if len(text.splitlines()) > 400:
            long_files.append(f"{where}: {len(text.splitlines())} lines")
        for name, node in _functions(ast.parse(text)):
            if node.end_lineno - node.lineno + 1 > 60:
                long_functions[f"{where} {name}"] = node.end_lineno - node.lineno + 1
    assert not long_files, long_files
    assert not long_functions, long_functions



def test_models_and_solvers_name_no_policy():
    """Backbones expose shapes and solvers step; neither knows which cache policy runs."""
    hits = [f"{p.relative_to(SRC)}:{i}: {line.strip()}"
            for sub in ("backbones", "solvers") for p in sorted((SRC / sub).rglob("*.py"))
            for i, line in enumerate(p.read_text().splitlines(), 1)
            if any(s in line.lower() for s in ('"l2c"', "'l2c'", '"toca"', "'toca'", '"fora"', "'fora'"))]
    assert not hits, "\n".join(hits)


def test_only_backbones_tell_families_apart_by_name():
    """A variant's family (and where its weights come from) is the backbone class's business: no code outside
    backbones/ parses an arch name for "DiT" / "U-ViT" / "PixArt"."""
    pattern = re.compile(r"""startswith\(\s*\(?\s*["'](DiT|U-ViT|PixArt)""")
    hits = [f"{p.relative_to(SRC)}:{i}: {line.strip()}"
            for p in sorted(SRC.rglob("*.py")) if "backbones" not in p.relative_to(SRC).parts
            for i, line in enumerate(p.read_text().splitlines(), 1) if pattern.search(line)]
    assert not hits, "\n".join(hits)
