"""The import graph runs one way (docs/ARCHITECTURE.md): no cycles, no upward imports.

Parses every module of ``avatar/``, ``service/``, ``recipes/`` and ``bench/`` with :mod:`ast` (nothing
is imported; the folders' package names, ``avatar_service`` & co., come from pyproject's
``package-dir``) and collects every import, at module level *and* inside functions (a lazy import is
a dependency too; it only hides a cycle until the function runs). ``avatar/cli.py``'s
``COMMAND_MODULES`` (loaded through importlib) count as imports of the CLI.

Layers, lowest first; a module may import its own unit or any unit of a lower layer, never a unit of
its own layer (siblings stay independent) or of a higher one. The ``base`` and ``cli`` layers are one
unit each (their modules may import each other; cycles are still refused):

    base      avatar (package), errors, atomic, config, logs, runtime, timebase
    media     avatar.media
    signals   avatar.audio, avatar.face
    formats   avatar.data, avatar.store
    stages    avatar.motion, avatar.nerf
    pipeline  avatar.pipeline
    api       avatar.api
    apps      avatar_recipes, avatar_service
    cli       avatar.cli and every ``commands`` module (``avatar/*/commands.py``, ``service/commands.py``)
    bench     avatar_bench
"""

from __future__ import annotations

import ast
import tomllib
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
#: folder -> installed package name (pyproject [tool.setuptools.package-dir]; docs/ARCHITECTURE.md "Packaging")
PACKAGES = {"avatar": "avatar"} | {
    folder: name
    for name, folder in tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"][
        "package-dir"
    ].items()
}

LAYERS: list[tuple[str, tuple[str, ...]]] = [
    (
        "base",
        (
            "avatar",
            "avatar.errors",
            "avatar.atomic",
            "avatar.config",
            "avatar.logs",
            "avatar.runtime",
            "avatar.timebase",
        ),
    ),
    ("media", ("avatar.media",)),
    ("signals", ("avatar.audio", "avatar.face")),
    ("formats", ("avatar.data", "avatar.store")),
    ("stages", ("avatar.motion", "avatar.nerf")),
    ("pipeline", ("avatar.pipeline",)),
    ("api", ("avatar.api",)),
    ("apps", ("avatar_recipes", "avatar_service")),
    ("cli", ("avatar.cli",)),
    ("bench", ("avatar_bench",)),
]

#: layers whose modules form one unit
SINGLE_UNIT = ("base", "cli")

#: cycles inside one unit that are known and owned, each with the way out. The test fails when a
#: cycle appears that is not listed here, and when a listed one is gone (then delete its entry).
KNOWN_CYCLES: dict[frozenset[str], str] = {}  # none left; add one only with the way out written beside it


def _modules() -> dict[str, Path]:
    mods = {}
    for folder, package in PACKAGES.items():
        for path in sorted((ROOT / folder).rglob("*.py")):
            if "__pycache__" in path.parts:
                continue
            name = ".".join((package, *path.relative_to(ROOT / folder).with_suffix("").parts))
            mods[name.removesuffix(".__init__")] = path
    return mods


MODULES = _modules()


def _known(name: str) -> str | None:
    """The longest known module that ``name`` is, or is inside (``avatar.x.y.func`` -> ``avatar.x.y``)."""
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


def _command_modules(tree: ast.Module) -> list[str]:
    for node in tree.body:
        target = (
            node.target
            if isinstance(node, ast.AnnAssign)
            else (node.targets[0] if isinstance(node, ast.Assign) and len(node.targets) == 1 else None)
        )
        if isinstance(target, ast.Name) and target.id == "COMMAND_MODULES":
            return list(ast.literal_eval(node.value))
    raise AssertionError("avatar/cli.py has no COMMAND_MODULES list")


def _imports() -> dict[str, dict[str, int]]:
    """module -> {imported project module: first line}."""
    graph: dict[str, dict[str, int]] = defaultdict(dict)
    for mod, path in MODULES.items():
        tree = ast.parse(path.read_text(), filename=str(path))
        is_pkg = path.name == "__init__.py"
        targets: list[tuple[str, int]] = []
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                targets += [(a.name, node.lineno) for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = mod.split(".") if is_pkg else mod.split(".")[:-1]
                    base = base[: len(base) - (node.level - 1)]
                    prefix = ".".join(base + ([node.module] if node.module else []))
                else:
                    prefix = node.module or ""
                # `from pkg import submodule` imports the submodule; `from mod import name` the module
                targets += [
                    (f"{prefix}.{a.name}" if f"{prefix}.{a.name}" in MODULES else prefix, node.lineno)
                    for a in node.names
                ]
        if mod == "avatar.cli":
            targets += [(name, 0) for name in _command_modules(tree)]
        for name, line in targets:
            dep = _known(name)
            if dep and dep != mod:
                graph[mod].setdefault(dep, line)
    return graph


GRAPH = _imports()


def _unit(mod: str) -> tuple[int, str]:
    """(layer index, unit) of a module: its longest listed prefix; ``commands`` modules are the CLI."""
    if mod.rpartition(".")[2] == "commands":
        return next(i for i, (name, _) in enumerate(LAYERS) if name == "cli"), "cli"
    best: tuple[int, str] | None = None
    for i, (_, units) in enumerate(LAYERS):
        for unit in units:
            if (mod == unit or mod.startswith(unit + ".")) and (best is None or len(unit) > len(best[1])):
                best = (i, unit)
    assert best is not None, f"{mod} is in no layer: add it to LAYERS in tests/test_architecture.py"
    return (best[0], LAYERS[best[0]][0]) if LAYERS[best[0]][0] in SINGLE_UNIT else best


def _cycles(graph: dict[str, dict[str, int]]) -> list[frozenset[str]]:
    """Strongly connected components with more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[frozenset[str]] = []
    counter = 0
    for root in sorted(MODULES):
        if root in index:
            continue
        work = [(root, iter(sorted(graph.get(root, {}))))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            v, it = work[-1]
            w = next(it, None)
            if w is not None:
                if w not in index:
                    index[w] = low[w] = counter
                    counter += 1
                    stack.append(w)
                    on_stack.add(w)
                    work.append((w, iter(sorted(graph.get(w, {})))))
                elif w in on_stack:
                    low[v] = min(low[v], index[w])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[v])
            if low[v] == index[v]:
                comp = set()
                while True:
                    w = stack.pop()
                    on_stack.discard(w)
                    comp.add(w)
                    if w == v:
                        break
                if len(comp) > 1:
                    found.append(frozenset(comp))
    return found


def test_nothing_imports_a_folder_name():
    """``service`` / ``recipes`` / ``bench`` are folder names, not packages: an import by that name only
    works with the repository root on ``sys.path`` and breaks in an installed wheel (the tests too)."""
    folders = {f for f, p in PACKAGES.items() if f != p}
    assert folders == {"service", "recipes", "bench"}
    bad = []
    for path in sorted([*MODULES.values(), *(ROOT / "tests").glob("*.py")]):
        for node in ast.walk(ast.parse(path.read_text())):
            names = (
                [a.name for a in node.names]
                if isinstance(node, ast.Import)
                else [node.module or ""]
                if isinstance(node, ast.ImportFrom) and not node.level
                else []
            )
            bad += [f"{path.relative_to(ROOT)}:{node.lineno}: {n}" for n in names if n.split(".")[0] in folders]
    assert not bad, "import the installed names (avatar_service, avatar_recipes, avatar_bench):\n" + "\n".join(bad)


def test_every_module_has_a_layer():
    for mod in MODULES:
        _unit(mod)


def test_command_modules_exist():
    tree = ast.parse((ROOT / "avatar" / "cli.py").read_text())
    missing = [name for name in _command_modules(tree) if name not in MODULES]
    assert not missing, f"avatar/cli.py COMMAND_MODULES names modules that do not exist: {missing}"


def test_imports_only_run_downward():
    bad = []
    for mod, deps in sorted(GRAPH.items()):
        layer, unit = _unit(mod)
        for dep, line in sorted(deps.items()):
            dep_layer, dep_unit = _unit(dep)
            if dep_unit == unit or dep_layer < layer:
                continue
            where = "sibling" if dep_layer == layer else "upward"
            bad.append(
                f"{MODULES[mod].relative_to(ROOT)}:{line}: {mod} ({LAYERS[layer][0]}) imports {dep} "
                f"({LAYERS[dep_layer][0]}): {where}"
            )
    assert not bad, (
        "imports must run downward (docs/ARCHITECTURE.md): move the shared piece down a layer, "
        "or pass it in from above\n" + "\n".join(bad)
    )


def test_no_import_cycles():
    cycles = _cycles(GRAPH)
    new = [sorted(c) for c in cycles if c not in KNOWN_CYCLES]
    assert not new, (
        "import cycles (lazy imports included; docs/ARCHITECTURE.md): move what both sides need "
        "into a module below them\n" + "\n".join(" <-> ".join(c) for c in new)
    )
    gone = [sorted(c) for c in KNOWN_CYCLES if c not in cycles]
    assert not gone, f"a known cycle is gone or changed; update KNOWN_CYCLES in tests/test_architecture.py: {gone}"


def test_no_dynamic_imports_outside_the_cli():
    """importlib / __import__ hide edges from this test; only the CLI's COMMAND_MODULES may use them."""
    bad = []
    for mod, path in MODULES.items():
        if mod == "avatar.cli":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call):
                fn = node.func
                name = fn.attr if isinstance(fn, ast.Attribute) else getattr(fn, "id", "")
                if name in ("import_module", "__import__"):
                    bad.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert not bad, f"dynamic imports: {bad}"


#: ``avatar/nerf`` by role (nerfstudio's field / model with its losses / data manager / trainer split,
#: docs/ARCHITECTURE.md "Inside avatar/nerf"), highest first; a module imports its own row and rows below
NERF_ROLES: list[tuple[str, ...]] = [
    ("trainer", "evaluate"),
    ("checkpoint",),
    ("losses",),
    ("datamanager",),
    ("inference",),
    ("model",),
    ("render", "cuda_sampler", "rays"),
    ("occupancy",),
    ("fields", "encoding", "triton_hashgrid", "grid", "presets"),
]


def test_nerf_roles_import_downward():
    """The NeRF trainer stays split: the data manager, losses and checkpoint never import the trainer (or
    each other upwards), so each role can be read and tested on its own."""
    row = {f"avatar.nerf.{name}": i for i, names in enumerate(NERF_ROLES) for name in names}
    listed = {m for m in MODULES if m.startswith("avatar.nerf.")} - {"avatar.nerf.commands"}
    assert listed == set(row), f"add new avatar/nerf modules to NERF_ROLES: {sorted(listed ^ set(row))}"
    bad = [
        f"{mod} imports {dep}"
        for mod in sorted(row)
        for dep in GRAPH.get(mod, {})
        if dep in row and row[dep] < row[mod]
    ]
    assert not bad, "avatar/nerf imports must run down NERF_ROLES:\n" + "\n".join(bad)
