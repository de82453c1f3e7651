"""The layout keeps its promises: every import of mmcore (at module level and inside functions) points
down the table of layers or stays in its layer, no import circle, click only in the CLI, and the CLI
reaches the rest through ``commands/`` only. docs/architecture.md shows the same table."""

import ast
from pathlib import Path

import mmcore

ROOT = Path(mmcore.__file__).parent

#: module prefix -> layer; a module imports only from its own layer or below (docs/architecture.md, "Layers")
LAYERS = {
    # 0: the plugin face and what every layer shares
    "mmcore": 0,
    "mmcore.interfaces": 0,
    "mmcore.errors": 0,
    "mmcore.validators": 0,
    "mmcore.io": 0,
    "mmcore.bounded": 0,
    "mmcore.dist": 0,
    "mmcore.devices": 0,
    "mmcore.progress": 0,
    "mmcore.textsource": 0,
    "mmcore.plugins": 0,
    "mmcore.builtin": 0,
    "mmcore.kit": 0,
    # 1: everything on disk that outlives a run
    "mmcore.store": 1,
    # 2: rows, models, recipes, run directories, and what measures them
    "mmcore.data": 2,
    "mmcore.ocr": 2,
    "mmcore.model": 2,
    "mmcore.recipe": 2,
    "mmcore.rundir": 2,
    "mmcore.evaluation": 2,
    "mmcore.quality": 2,
    # 3: what trains a model (and restores a trained one)
    "mmcore.engine": 3,
    # 4: features built on the engine
    "mmcore.scoring": 4,
    "mmcore.export": 4,
    "mmcore.serve": 4,
    "mmcore.tune": 4,
    # 5: what each command (and each verb of the Python API) does
    "mmcore.commands": 5,
    # 6: the ways in: the CLI, the Python API, the contract checks plugins call, process entry points
    "mmcore.cli": 6,
    "mmcore.api": 6,
    "mmcore.integrations": 6,
    "mmcore.testing": 6,
    "mmcore.__main__": 6,
    "mmcore.tune.__main__": 6,
}


def _modules():
    modules = {}
    for path in ROOT.rglob("*.py"):
        if "templates" in path.parts:
            continue
        parts = ("mmcore", *path.relative_to(ROOT).with_suffix("").parts)
        modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return modules


def _imports(name, path, modules):
    """``(imported mmcore module, line)`` for every import statement of the module, wherever it is."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from the package, up level - 1
                base = ".".join([*package.split(".")[: len(package.split(".")) - node.level + 1], *filter(None, [base])])
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base for alias in node.names]
        else:
            continue
        for target in targets:
            while target not in modules and "." in target:
                target = target.rpartition(".")[0]
            if target in modules and target != name and target.split(".")[0] == "mmcore":
                found.append((target, node.lineno))
    return list(dict.fromkeys(found))  # ``from m import a, b``: one entry


def _import_graph(modules):
    """Module -> the mmcore modules it imports, at module level and inside functions."""
    return {name: {target for target, _ in _imports(name, path, modules)} for name, path in modules.items()}


def layer_of(module, layers=LAYERS):
    """The layer of ``module``: its longest prefix in ``layers`` (None when no prefix is there)."""
    prefixes = [prefix for prefix in layers if module == prefix or module.startswith(prefix + ".")]
    return layers[max(prefixes, key=len)] if prefixes else None


def upward_imports(modules, layers=LAYERS, root=ROOT.parent):
    """``file:line: a (layer i) imports b (layer j > i)`` for every import that points up the table."""
    found = []
    for name, path in sorted(modules.items()):
        for target, line in _imports(name, path, modules):
            if layer_of(target, layers) > layer_of(name, layers):
                found.append(f"{path.relative_to(root)}:{line}: {name} (layer {layer_of(name, layers)}) imports "
                             f"{target} (layer {layer_of(target, layers)})")
    return found


def _cycles(graph):
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on, found, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in graph:
        if v not in index:
            visit(v)
    return found


def _circle_lines(modules, cycle):
    """The import lines that close a circle: ``file:line: a imports b`` between its members."""
    members = set(cycle)
    return [f"{modules[name].relative_to(ROOT.parent)}:{line}: {name} imports {target}"
            for name in cycle for target, line in _imports(name, modules[name], modules) if target in members]


def test_every_module_has_a_layer():
    assert [name for name in sorted(_modules()) if layer_of(name) is None] == []


def test_no_import_points_up_the_layers():
    offenders = upward_imports(_modules())
    assert offenders == [], "\n" + "\n".join(offenders)


def test_no_import_circle_among_mmcore_modules():
    modules = _modules()
    cycles = _cycles(_import_graph(modules))
    assert cycles == [], "\n" + "\n".join(line for cycle in cycles for line in _circle_lines(modules, cycle))


def test_the_checks_find_a_circle_and_an_upward_import(tmp_path):
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    low, high = tmp_path / "low.py", tmp_path / "high.py"
    low.write_text("import os\n\n\ndef late():\n    from mmcore.high import thing\n", encoding="utf-8")
    high.write_text("from mmcore.low import late\n", encoding="utf-8")
    modules = {"mmcore.low": low, "mmcore.high": high}
    assert upward_imports(modules, {"mmcore.low": 0, "mmcore.high": 1}, root=tmp_path) == [
        "low.py:5: mmcore.low (layer 0) imports mmcore.high (layer 1)"]  # inside a function, found
    assert _cycles(_import_graph(modules)) == [["mmcore.high", "mmcore.low"]]


def test_click_is_imported_only_by_the_cli():
    offenders = []
    for name, path in _modules().items():
        if name.startswith("mmcore.cli"):
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import) and any(a.name.split(".")[0] == "click" for a in node.names):
                offenders.append(name)
            elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "click":
                offenders.append(name)
    assert offenders == []


def test_the_cli_reaches_the_rest_through_commands_only():
    """A command's work is ``commands/``'s (the Python API shares it); the CLI parses, calls one, prints.
    Besides ``commands/`` it imports only the bottom layer (errors, the --device words, progress)."""
    modules = _modules()
    offenders = [
        f"{modules[name].relative_to(ROOT.parent)}:{line}: {name} imports {target}"
        for name in sorted(modules) if name.startswith("mmcore.cli")
        for target, line in _imports(name, modules[name], modules)
        if not target.startswith(("mmcore.commands", "mmcore.cli")) and layer_of(target) != 0
    ]
    assert offenders == [], "\n" + "\n".join(offenders)


def test_nothing_but_the_ways_in_imports_commands():
    """``commands/`` is the top layer below the CLI, the Python API and process entry points."""
    modules = _modules()
    offenders = [
        f"{modules[name].relative_to(ROOT.parent)}:{line}: {name} imports {target}"
        for name in sorted(modules) if not name.startswith("mmcore.commands") and layer_of(name) < LAYERS["mmcore.cli"]
        for target, line in _imports(name, modules[name], modules) if target.startswith("mmcore.commands")
    ]
    assert offenders == [], "\n" + "\n".join(offenders)


def _documented_modules():
    """The modules the tree of docs/architecture.md lists, in order (``store/locks.py``, ``io.py``)."""
    text = (ROOT.parent / "docs" / "architecture.md").read_text(encoding="utf-8")
    block = text.split("## The tree", 1)[1].split("```", 2)[1]
    listed, folders = [], []  # folders: [(indent, "store/")]
    for line in block.splitlines():
        tokens = line.split()
        if not tokens:
            continue
        indent = len(line) - len(line.lstrip())
        folders = [(i, name) for i, name in folders if i < indent]
        if tokens[0].endswith("/"):
            folders.append((indent, tokens[0]))
            continue
        for token in tokens:
            if not token.endswith(".py"):
                break
            listed.append("".join(name for _, name in folders[1:]) + token)  # below mmcore/
    return listed


def test_docs_architecture_lists_every_module_once():
    listed = _documented_modules()
    actual = {path.relative_to(ROOT).as_posix() for path in _modules().values()
              if path.name != "__init__.py" or path.parent == ROOT}
    assert sorted(name for name in set(listed) if listed.count(name) > 1) == []
    assert sorted(set(listed) ^ actual) == []
