"""The package's shape: no import cycle, modules a reader can take in one sitting, and a core free of
platform workarounds (the one room for those is tuning.py)."""

import ast
import os

import pytest

ROOT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "mistral_jax")
CORE = ("model.py", "attention.py", "rope.py", "params.py", "kv_cache.py", "lora.py")


def _modules():
    out = {}
    for base, _, files in os.walk(ROOT):
        for f in files:
            if f.endswith(".py"):
                path = os.path.join(base, f)
                rel = os.path.relpath(path, os.path.dirname(ROOT))[:-3].replace(os.sep, ".")
                out[rel.removesuffix(".__init__")] = path
    return out


def _imports(name, path, modules):
    """Package modules imported by module `name` at import time or inside functions."""
    package = name if path.endswith("__init__.py") else name.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(open(path).read())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                target = f"{base}.{node.module}" if node.module else base
            else:
                target = node.module or ""
            for alias in node.names:
                if f"{target}.{alias.name}" in modules:
                    found.add(f"{target}.{alias.name}")
                elif target in modules:
                    found.add(target)
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name in modules}
    found.discard(name)
    return found


def test_no_import_cycle():
    modules = _modules()
    graph = {m: _imports(m, p, modules) for m, p in modules.items()}
    # A package's __init__ re-exporting its submodules is not a cycle of ideas.
    for m in graph:
        graph[m] = {d for d in graph[m] if not (d == m.rsplit(".", 1)[0] and modules[d].endswith("__init__.py"))}
    state = {}

    def visit(m, stack):
        state[m] = "open"
        for d in sorted(graph[m]):
            if state.get(d) == "open":
                pytest.fail("import cycle: " + " -> ".join(stack[stack.index(d) :] + [d]))
            if d not in state:
                visit(d, stack + [d])
        state[m] = "done"

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])


def test_library_modules_are_short():
    long = {m: n for m, p in _modules().items() if (n := sum(1 for _ in open(p))) > 420}
    assert not long, f"modules over 420 lines: {long}"


@pytest.mark.parametrize("name", CORE)
def test_core_has_no_platform_workarounds(name):
    text = open(os.path.join(ROOT, name)).read()
    for banned in ("optimization_barrier", "compiler_options", "XLA:CPU", "xla_backend", "ynn"):
        assert banned not in text, f"{name} mentions {banned!r}"
