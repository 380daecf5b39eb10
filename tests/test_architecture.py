"""The import graph points one way: ``vllm_nm16.format`` (the spec) <- ``offline`` and <- the plugin; no cycles; the
development helpers (``nm16_dev``) sit above both and neither runtime package imports them.

Every ``import`` / ``from ... import`` in the packages ``vllm_nm16``, ``offline`` and ``nm16_dev`` is read with ``ast``, including
the ones inside functions (lazy imports still tie the modules together) and under ``if TYPE_CHECKING``. An edge goes
to the most specific module of these packages that the statement names: ``from vllm_nm16 import format`` is an edge
to ``vllm_nm16.format``, ``from vllm_nm16.kernels import repack`` one to ``vllm_nm16.kernels`` (its ``__init__``).
Imports of anything else (torch, vllm, ...) are ignored. Pure static analysis: nothing is imported, so this runs
without vLLM, torch or a GPU.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("vllm_nm16", "offline", "nm16_dev")
RUNTIME = ("vllm_nm16", "offline")

# Import cycles allowed: none (the kernel-backend rework removed the kernel side's three). An entry here must be a
# cycle that exists (test_known_cycles_exist); any other cycle fails test_no_import_cycle.
KNOWN_CYCLES: set[tuple[str, ...]] = set()


def module_files() -> dict[str, Path]:
    """Dotted module name -> file, for every .py file of the packages."""
    mods = {}
    for pkg in PACKAGES:
        for path in sorted((ROOT / pkg).rglob("*.py")):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            mods[".".join(parts)] = path
    return mods


def _imported_names(node: ast.AST, module: str, is_package: bool) -> list[str]:
    """The dotted names an import statement may refer to, most specific first within each alternative."""
    if isinstance(node, ast.Import):
        return [a.name for a in node.names]
    assert isinstance(node, ast.ImportFrom)
    if node.level:  # relative: resolve against the importing module's package
        base = module.split(".") if is_package else module.split(".")[:-1]
        base = base[:len(base) - (node.level - 1)]
        stem = ".".join(base + ([node.module] if node.module else []))
    else:
        stem = node.module or ""
    return [f"{stem}.{a.name}" for a in node.names] + [stem]


def import_graph() -> dict[str, set[str]]:
    """module -> the modules of PACKAGES it imports (anywhere in its body)."""
    mods = module_files()
    graph: dict[str, set[str]] = {m: set() for m in mods}
    for mod, path in mods.items():
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        for node in ast.walk(tree):
            if not isinstance(node, (ast.Import, ast.ImportFrom)):
                continue
            names = _imported_names(node, mod, path.name == "__init__.py")
            if isinstance(node, ast.ImportFrom):
                # `from pkg import a, b`: a and b are submodules or names defined in pkg
                subs = [n for n in names[:-1] if n in mods]
                targets = subs + ([names[-1]] if len(subs) < len(names) - 1 else [])
            else:
                targets = names
            for name in targets:
                while name and name not in mods:  # `import vllm_nm16.kernels.x.y`: the deepest module we know
                    name = name.rpartition(".")[0]
                if name and name != mod:
                    graph[mod].add(name)
    return graph


def elementary_cycles(graph: dict[str, set[str]]) -> set[tuple[str, ...]]:
    """Every simple cycle, each written from its smallest node on (the graph is small: plain DFS)."""
    cycles = set()

    def dfs(start: str, node: str, path: list[str], on_path: set[str]) -> None:
        for nxt in graph.get(node, ()):
            if nxt == start:
                cycles.add(tuple(path))
            elif nxt > start and nxt not in on_path:  # each cycle is found from its smallest node only
                on_path.add(nxt)
                path.append(nxt)
                dfs(start, nxt, path, on_path)
                path.pop()
                on_path.discard(nxt)

    for start in sorted(graph):
        dfs(start, start, [start], {start})
    return cycles


def test_graph_sees_lazy_imports():
    graph = import_graph()
    # offline.evaluate(engine="vllm") imports offline.eval_vllm inside the function
    assert "offline.eval_vllm" in graph["offline"]
    assert "vllm_nm16.format" in graph["offline.compressor"]
    assert "vllm_nm16.plugin" in graph["vllm_nm16"]  # register() imports it lazily


def test_cycle_finder():
    g = {"a": {"b"}, "b": {"c", "a"}, "c": {"a"}, "d": {"a"}}
    assert elementary_cycles(g) == {("a", "b"), ("a", "b", "c")}


def test_plugin_does_not_import_offline():
    bad = sorted(f"{m} -> {t}" for m, ts in import_graph().items() if m.split(".")[0] == "vllm_nm16"
                 for t in ts if t.split(".")[0] == "offline")
    assert not bad, "the vLLM plugin must not depend on the offline compressor: " + ", ".join(bad)


def test_runtime_does_not_import_dev_helpers():
    bad = sorted(f"{m} -> {t}" for m, ts in import_graph().items() if m.split(".")[0] in RUNTIME
                 for t in ts if t.split(".")[0] == "nm16_dev")
    assert not bad, "nm16_dev holds test/dev helpers only: " + ", ".join(bad)


def test_no_import_cycle():
    new = elementary_cycles(import_graph()) - KNOWN_CYCLES
    assert not new, "import cycles: " + "; ".join(" -> ".join(c + (c[0],)) for c in sorted(new))


def test_known_cycles_exist():
    gone = KNOWN_CYCLES - elementary_cycles(import_graph())
    assert not gone, f"remove these fixed cycles from KNOWN_CYCLES: {sorted(gone)}"
