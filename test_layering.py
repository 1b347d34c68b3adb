"""The import graph of the library: layered bottom to top, no module imports a higher layer, no cycles.

Read from the source (every `import`, at module level or inside a function), so a lazy import
cannot hide a cycle. A new module must be given a layer here.
"""

import ast
import glob
import os

import pytest

ROOT = os.path.dirname(os.path.abspath(__file__))

# Bottom to top; a module may import its own layer (acyclically) and the layers below it.
LAYERS = [
    ("core", ["grok", "phoenix_validation", "phoenix_hashing", "phoenix_metrics", "numpy_reference", "phoenix_stop"]),
    ("inputs", ["phoenix_inputs"]),
    ("models", ["recsys_model", "recsys_retrieval_model", "phoenix_forward", "phoenix_losses", "phoenix_optim",
                "phoenix_index"]),
    ("checkpoints", ["phoenix_checkpoint"]),
    ("training", ["phoenix_resume", "phoenix_training"]),
    ("serving", ["runners"]),
    ("experiments", ["movielens", "phoenix_datasets", "phoenix_experiment", "phoenix_log", "phoenix_two_stage",
                     "phoenix_sasrec", "phoenix_protocols", "phoenix_run_dir", "phoenix_pipeline", "train_synthetic",
                     "train_movielens"]),
    ("demos", ["run_ranker", "run_retrieval", "run_train", "bench", "resume_harness"]),
]
LAYER_OF = {module: rank for rank, (_, modules) in enumerate(LAYERS) for module in modules}


def library_modules() -> list[str]:
    names = [os.path.basename(p)[:-3] for p in glob.glob(os.path.join(ROOT, "*.py"))]
    return sorted(n for n in names if not n.startswith("test_") and n != "conftest")


def imports_of(module: str) -> set[str]:
    """The library modules `module` imports anywhere in its source."""
    tree = ast.parse(open(os.path.join(ROOT, module + ".py")).read())
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module.split(".")[0])
    return found & set(library_modules())


GRAPH = {m: imports_of(m) for m in library_modules()}


def test_every_module_has_a_layer():
    assert sorted(set(GRAPH) - set(LAYER_OF)) == []
    assert sorted(set(LAYER_OF) - set(GRAPH)) == []  # no stale entry either


@pytest.mark.parametrize("module", sorted(GRAPH))
def test_no_upward_import(module):
    upward = sorted(m for m in GRAPH[module] if LAYER_OF[m] > LAYER_OF[module])
    assert upward == [], f"{module} ({LAYERS[LAYER_OF[module]][0]}) imports higher layers: {upward}"


def test_no_cycle():
    state = {}  # module -> "open" while on the DFS stack, "done" after

    def visit(module, path):
        if state.get(module) == "done":
            return
        assert state.get(module) != "open", "import cycle: " + " -> ".join(path + [module])
        state[module] = "open"
        for dep in sorted(GRAPH[module]):
            visit(dep, path + [module])
        state[module] = "done"

    for module in sorted(GRAPH):
        visit(module, [])


def test_the_checks_catch_a_cycle_and_an_upward_import():
    """The graph walk sees what it must: phoenix_inputs -> phoenix_hashing is a real edge, and an
    edge added by hand from the bottom layer to the top one is upward and closes a cycle."""
    assert "phoenix_hashing" in GRAPH["phoenix_inputs"]
    assert "phoenix_training" in GRAPH["runners"] or "phoenix_forward" in GRAPH["runners"]
    GRAPH["grok"] = GRAPH["grok"] | {"run_ranker"}
    try:
        with pytest.raises(AssertionError, match="imports higher layers"):
            test_no_upward_import("grok")
        with pytest.raises(AssertionError, match="import cycle"):
            test_no_cycle()
    finally:
        GRAPH["grok"] = GRAPH["grok"] - {"run_ranker"}
