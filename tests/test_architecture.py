"""The house rules, checked on the source (docs/INTERFACES.md):

- no import cycles between modules, counting imports inside functions (a lazy import that only
  hides a cycle is still a cycle);
- no branching on a compression family's name outside raypress/families/, nor on a searcher's
  name outside the searcher registry;
- the trial keys (`_rp_*`) are spelled only in raypress/trial.py;
- no module above 600 lines.
"""
from __future__ import annotations

import ast
from pathlib import Path

from raypress.families import FAMILIES
from raypress.search.registry import SEARCHERS

PKG = Path(__file__).resolve().parents[1] / "raypress"


def _modules() -> dict[str, Path]:
    out = {}
    for f in PKG.rglob("*.py"):
        parts = f.relative_to(PKG.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = f
    return out


def _imports(name: str, f: Path, mods: dict) -> set[str]:
    deps = set()
    is_pkg = f.name == "__init__.py"
    for node in ast.walk(ast.parse(f.read_text())):
        targets = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".")
                base = base[: len(base) - node.level + (1 if is_pkg else 0)]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            targets = [f"{mod}.{a.name}" if f"{mod}.{a.name}" in mods else mod for a in node.names]
        for t in targets:
            while t not in mods and "." in t:
                t = t.rsplit(".", 1)[0]
            if t in mods and t != name:
                deps.add(t)
    return deps


def test_no_import_cycles():
    mods = _modules()
    graph = {m: _imports(m, f, mods) for m, f in mods.items()}
    # a package importing its own submodules (re-exports) is not a cycle; a submodule importing a
    # sibling through the package is resolved to the sibling above
    for m in graph:
        graph[m] = {d for d in graph[m] if not (m.startswith(d + ".") and mods[d].name == "__init__.py")}
    index, low, stack, on, cycles, counter = {}, {}, [], set(), [], [0]

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
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                cycles.append(sorted(comp))

    for v in graph:
        if v not in index:
            visit(v)
    assert not cycles, f"import cycles: {cycles}"


def _name_compares(f: Path, names: set[str], subject: str) -> list[str]:
    """`x == "name"`, `x in ("a", "b")` where x's source mentions `subject` and a literal is one of names."""
    src = f.read_text()
    hits = []
    for node in ast.walk(ast.parse(src)):
        if not isinstance(node, ast.Compare):
            continue
        parts = [node.left, *node.comparators]
        lits = set()
        for p in parts:
            if isinstance(p, ast.Constant) and isinstance(p.value, str):
                lits.add(p.value)
            elif isinstance(p, (ast.Tuple, ast.List, ast.Set)):
                lits |= {e.value for e in p.elts if isinstance(e, ast.Constant) and isinstance(e.value, str)}
        other = " ".join(ast.get_source_segment(src, p) or "" for p in parts if not isinstance(p, ast.Constant))
        if lits & names and subject in other:
            hits.append(f"{f.relative_to(PKG.parent)}:{node.lineno}: {ast.get_source_segment(src, node)}")
    return hits


def test_no_family_dispatch_outside_the_registry():
    hits = []
    for f in PKG.rglob("*.py"):
        if "families" not in f.relative_to(PKG).parts:
            hits += _name_compares(f, set(FAMILIES), "family")
    assert not hits, "family-name dispatch outside raypress/families/:\n" + "\n".join(hits)


def test_no_searcher_dispatch_outside_the_registry():
    hits = []
    for f in PKG.rglob("*.py"):
        if f.name != "registry.py":
            hits += _name_compares(f, set(SEARCHERS), "searcher")
    assert not hits, "searcher-name dispatch outside raypress/search/registry.py:\n" + "\n".join(hits)


def test_trial_keys_are_defined_once():
    spelled = [str(f.relative_to(PKG.parent)) for f in PKG.rglob("*.py")
               if f.name != "trial.py" and '"_rp_' in f.read_text()]
    assert not spelled, f"trial keys spelled outside raypress/trial.py: {spelled}"


def test_no_module_hides_two_ideas():
    big = {str(f.relative_to(PKG.parent)): n for f in PKG.rglob("*.py")
           if (n := len(f.read_text().splitlines())) > 600}
    assert not big, f"modules over 600 lines: {big}"
