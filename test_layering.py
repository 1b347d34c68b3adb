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
    ("core", ["grok", "phoenix_validation", "phoenix_hashing", "phoenix_metrics", "numpy_reference", "phoenix_stop",
              "phoenix_paths", "phoenix_batching",
              "phoenix_exported"]),  # phoenix_exported: JAX + NumPy only, by design
    # A format knows no model: the checkpoint directory stores configs as opaque JSON.
    ("formats", ["phoenix_checkpoint", "phoenix_sharded_checkpoint"]),
    ("inputs", ["phoenix_inputs"]),
    ("models", ["recsys_model", "recsys_retrieval_model", "phoenix_forward", "phoenix_losses", "phoenix_optim",
                "phoenix_sharding", "phoenix_index"]),
    ("configs", ["phoenix_configs", "phoenix_sizes"]),  # configs <-> JSON; configs from sizes
    ("data", ["phoenix_log", "phoenix_split", "phoenix_evaluation"]),  # the generic data core: knows no dataset
    ("training", ["phoenix_resume", "phoenix_training"]),
    ("serving", ["runners"]),
    ("pipeline", ["phoenix_two_stage", "phoenix_sasrec", "phoenix_protocols", "phoenix_run_dir", "phoenix_serving",
                  "phoenix_pipeline", "phoenix_export", "phoenix_server"]),
    # Datasets are adapters on top of the generic core: nothing below this layer may import one.
    ("datasets", ["movielens", "phoenix_synthetic"]),
    ("experiments", ["phoenix_demos", "train_synthetic"]),
    ("scripts", ["run_train", "run_ranker", "run_retrieval", "run_recommend", "run_serve", "bench",
                 "resume_harness"]),
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


def imports_argparse(module: str) -> bool:
    tree = ast.parse(open(os.path.join(ROOT, module + ".py")).read())
    return any(isinstance(node, ast.Import) and any(a.name == "argparse" for a in node.names)
               or isinstance(node, ast.ImportFrom) and node.module == "argparse" for node in ast.walk(tree))


def test_flags_live_in_scripts_only():
    """argparse is the scripts' alone: library functions take dataclasses (Recipe, Columns, RunOptions, ...)."""
    scripts = set(dict(LAYERS)["scripts"])
    assert sorted(m for m in GRAPH if m not in scripts and imports_argparse(m)) == []
    assert imports_argparse("run_train")  # the check sees an import where there is one


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
