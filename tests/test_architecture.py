"""The package's shape, enforced from its source (nothing is imported): layers, no import cycle,
no cross-module private names, no function-local imports of our own modules, short functions.

The layer table is the one in docs/architecture.md; change both together.
"""
from __future__ import annotations

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "sedflow_jax"
NAME = PKG.name

#: layer of each top-level part of the package (a module may import its own layer or lower)
LAYERS = {
    "version": 0, "util": 0, "batching": 0, "parallel": 0,
    "sed": 1, "nn": 1,
    "sim": 2,
    "io": 3,
    "sbi": 4, "mcmc": 4,
    "eval": 5,
    "cli": 6, "demo": 6, "data": 6,  # data/: package data and the script that makes them
}
#: pairs in one layer that must not import each other (either way)
SEPARATE = [("sed", "nn"), ("sbi", "mcmc")]
#: parts that import nothing of the package
LEAVES = {"version", "parallel"}
#: the longest a function may be without a reason written beside it (``# long: <why>``)
MAX_LINES = 80


def _modules() -> dict:
    mods = {}
    for f in sorted(PKG.rglob("*.py")):
        parts = list(f.relative_to(PKG.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        mods[".".join(parts)] = f
    return mods


MODS = _modules()
TREES = {m: ast.parse(f.read_text()) for m, f in MODS.items()}


def _part(mod: str) -> str:
    return mod.split(".")[1] if mod.count(".") else ""


def _resolve(cur: str, node) -> list:
    """(target module, imported name or None, node) for each package module an import names."""
    out = []
    if isinstance(node, ast.Import):
        for a in node.names:
            if a.name.split(".")[0] == NAME:
                out.append((a.name, None))
        return [(m, n) for m, n in out]
    base = node.module or ""
    if node.level:
        is_pkg = MODS[cur].name == "__init__.py"
        anchor = cur.split(".") if is_pkg else cur.split(".")[:-1]
        anchor = anchor[: len(anchor) - (node.level - 1)]
        base = ".".join(anchor + ([base] if base else []))
    if base.split(".")[0] != NAME:
        return []
    for a in node.names:
        cand = f"{base}.{a.name}"
        out.append((cand, None) if cand in MODS else (base, a.name))
    return out


def _imports():
    """(importer, imported module, imported name or None, is function-local, lineno)."""
    rows = []
    for m, tree in TREES.items():
        local = set()
        for fn in ast.walk(tree):
            if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                for n in ast.walk(fn):
                    if isinstance(n, (ast.Import, ast.ImportFrom)):
                        local.add(id(n))
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                for target, name in _resolve(m, node):
                    while target and target not in MODS:
                        target = target.rsplit(".", 1)[0]
                    if target and target != m:
                        rows.append((m, target, name, id(node) in local, node.lineno))
    return rows


IMPORTS = _imports()


def test_layer_table_names_every_part():
    parts = {_part(m) for m in MODS if m != NAME}
    assert parts <= set(LAYERS), f"parts without a layer: {sorted(parts - set(LAYERS))}"


def test_no_upward_imports_between_layers():
    bad = []
    for src, dst, _, _, line in IMPORTS:
        if src == NAME:  # the lazy public face may name anything
            continue
        a, b = _part(src), _part(dst)
        if dst == NAME:
            bad.append(f"{src}:{line} imports the top-level package")
        elif b == "cli" and a != "cli":
            bad.append(f"{src}:{line} imports the CLI")
        elif a in LEAVES and a != b:
            bad.append(f"{src}:{line} ({a} is a leaf) imports {dst}")
        elif LAYERS[b] > LAYERS[a]:
            bad.append(f"{src}:{line} (layer {LAYERS[a]}) imports {dst} (layer {LAYERS[b]})")
        elif {a, b} in [set(p) for p in SEPARATE]:
            bad.append(f"{src}:{line}: {a} and {b} must not import each other")
    assert not bad, "\n".join(bad)


def test_no_import_cycles():
    graph = {m: set() for m in MODS}
    for src, dst, _, _, _ in IMPORTS:
        if not src.startswith(dst + ".") and dst != NAME:
            graph[src].add(dst)
    idx, low, on, stack, sccs, counter = {}, {}, set(), [], [], [0]

    def visit(v):
        idx[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in idx:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], idx[w])
        if low[v] == idx[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                sccs.append(sorted(comp))

    for v in graph:
        if v not in idx:
            visit(v)
    assert not sccs, f"import cycles: {sccs}"


def test_no_function_local_imports_of_our_modules():
    bad = [f"{src}:{line} imports {dst} inside a function" for src, dst, _, local, line
           in IMPORTS if local]
    assert not bad, "\n".join(bad)


def _module_aliases(tree, cur) -> dict:
    """local name -> package module, for ``from X import mod [as y]`` / ``import X.mod as y``."""
    out = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            for (target, name), a in zip(_resolve(cur, node), node.names):
                if name is None and target in MODS:
                    out[a.asname or a.name] = target
        elif isinstance(node, ast.Import):
            for a in node.names:
                if a.name.split(".")[0] == NAME and a.asname:
                    out[a.asname] = a.name
    return out


def _private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def test_no_cross_module_private_names():
    bad = []
    for src, dst, name, _, line in IMPORTS:
        if name is not None and _private(name):
            bad.append(f"{src}:{line} imports {dst}.{name}")
    for m, tree in TREES.items():
        aliases = _module_aliases(tree, m)
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) \
                    and node.value.id in aliases and _private(node.attr):
                bad.append(f"{m}:{node.lineno} uses {aliases[node.value.id]}.{node.attr}")
    assert not bad, "\n".join(bad)


def test_functions_are_short_or_say_why():
    long = []
    for m, f in MODS.items():
        lines = f.read_text().splitlines()
        for node in ast.walk(TREES[m]):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                where = range(max(0, node.lineno - 3), node.lineno)
                said = any("# long:" in lines[i] for i in where)
                if n > MAX_LINES and not said:
                    long.append(f"{f.relative_to(PKG.parent)}:{node.lineno} {node.name} ({n} lines)")
    assert not long, "functions over %d lines without '# long: <why>':\n%s" % (
        MAX_LINES, "\n".join(long))


def test_package_never_reads_the_shared_folder():
    hits = [str(f.relative_to(PKG.parent)) for f in MODS.values() if "../shared" in f.read_text()]
    assert not hits, f"../shared named in {hits}"
