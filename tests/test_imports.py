"""Every postdiff module imports on its own, and the layers above the library (command line, generation,
evaluation, the embedded model, metrics) import one another without a cycle: a cycle works or breaks
depending on which module happens to be imported first."""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import postdiff

PACKAGE = Path(postdiff.__file__).parent
LAYERS = ("postdiff.cli", "postdiff.generate", "postdiff.evaluation", "postdiff.testbed", "postdiff.metrics")

# Each module is imported with no postdiff module loaded (those of the previous import are dropped), so what
# one import leaves behind cannot hide another's cycle, and the order of the list does not matter.
IMPORT_EACH = """
import importlib, json, sys
failures = {}
for name in sys.argv[1:]:
    for loaded in [m for m in sys.modules if m == "postdiff" or m.startswith("postdiff.")]:
        del sys.modules[loaded]
    try:
        importlib.import_module(name)
    except Exception as error:
        failures[name] = repr(error)
print(json.dumps(failures))
"""


def module_names() -> dict[str, Path]:
    names = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        names[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return names


def imported_modules(name: str, path: Path, known: set[str]) -> set[str]:
    """The postdiff modules `name` imports, at module level or inside a function (a lazy import is a
    dependency all the same: it was one that made `cli` and `generate` import each other)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1]) if node.level else ""
            source = ".".join(part for part in (base, node.module) if part)
            found |= {f"{source}.{alias.name}" if f"{source}.{alias.name}" in known else source for alias in node.names}
    return {module for module in found if module in known}


def layer_of(module: str) -> str:
    return next((layer for layer in LAYERS if module == layer or module.startswith(layer + ".")), module)


def dependency_graph() -> dict[str, set[str]]:
    """Module dependencies with every layer's modules merged into one node."""
    modules = module_names()
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        targets = {layer_of(module) for module in imported_modules(name, path, set(modules))}
        graph.setdefault(layer_of(name), set()).update(targets - {layer_of(name)})
    return graph


def path_between(graph: dict[str, set[str]], start: str, goal: str) -> list[str] | None:
    """A shortest dependency path start -> ... -> goal, or None."""
    paths, seen = [[start]], {start}
    while paths:
        path = paths.pop(0)
        for following in sorted(graph.get(path[-1], ())):
            if following == goal:
                return path + [goal]
            if following not in seen:
                seen.add(following)
                paths.append(path + [following])
    return None


def test_the_layers_import_each_other_without_a_cycle():
    graph = dependency_graph()
    cycles = [" -> ".join(cycle) for layer in LAYERS if (cycle := path_between(graph, layer, layer))]
    assert not cycles, f"import cycles: {cycles}"


def test_metrics_is_a_leaf_that_imports_nothing_from_postdiff():
    modules = module_names()
    assert imported_modules("postdiff.metrics", modules["postdiff.metrics"], set(modules)) == set()


def test_the_cycle_check_sees_lazy_and_relative_imports(tmp_path):
    known = {"postdiff.generate", "postdiff.cli", "postdiff.config"}
    source = tmp_path / "generate.py"
    source.write_text("from .config import x\n\ndef run():\n    from .cli import build_config\n")
    assert imported_modules("postdiff.generate", source, known) == {"postdiff.config", "postdiff.cli"}
    assert path_between({"a": {"b"}, "b": {"c", "a"}}, "a", "a") == ["a", "b", "a"]


def test_every_module_imports_on_its_own_in_a_fresh_interpreter():
    names = sorted(module_names())
    result = subprocess.run([sys.executable, "-c", IMPORT_EACH, *names], capture_output=True, text=True, check=True,
                            env=dict(os.environ, HF_HUB_OFFLINE="1"))
    assert json.loads(result.stdout.strip().splitlines()[-1]) == {}


@pytest.mark.parametrize("found, warns", [("0.42.1", False), ("0.42.5", False), ("0.41.0", True), ("0.43.0", True),
                                          ("0.44.0.dev0", True)])
def test_an_untested_diffusers_gets_one_warning_naming_the_tested_range(monkeypatch, found, warns):
    import importlib.metadata
    import warnings

    monkeypatch.setattr(importlib.metadata, "version", lambda name: found)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        postdiff._check_diffusers_version()
    messages = [str(w.message) for w in caught]
    assert messages == ([f"postdiff is tested with diffusers >=0.42.1,<0.43; this is diffusers {found}: pipelines may "
                         "behave differently under PostDiff"] if warns else [])
