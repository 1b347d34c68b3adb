"""phoenix_export.py and phoenix_exported.py: the exported functions compute what the in-process
library computes, and load with JAX and NumPy alone.

The tiny run is test_phoenix_serving's (`trained`, trained once for this module and
test_phoenix_server: `tiny_run`; string ids, varied actions, both re-ranking weights non-zero); its
recipe has C = 4 ranker candidates and retrieve_k = 12, so K spans three ranker chunks. Tolerances:
float32 1e-5 (absolute and relative) between exported and in-process logits / cosines, which are
separate XLA compilations of the same arithmetic; recommend lists are compared for equality (same
items, same order) and their scores at 1e-5.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import phoenix_export
import phoenix_exported
import phoenix_pipeline as pipeline
import phoenix_serving as serving
import phoenix_split
import phoenix_two_stage as two_stage
from test_phoenix_server import tiny_run  # noqa: F401  (the tiny run, trained once for both modules)

REPO = Path(__file__).resolve().parent
TOL = dict(rtol=1e-5, atol=1e-5)


@pytest.fixture(scope="module")
def exported(tiny_run):  # noqa: F811
    """(served run, export directory, phoenix_exported.load of it)."""
    tmp = tiny_run
    run = pipeline.load_run(tmp / "run")
    path = phoenix_export.export_run(run)
    return run, path, phoenix_exported.load(path)


def in_process_retrieval(run, rows):
    """(cosines [U, K], columns [U, K]) as phoenix_serving.top_items computes them."""
    split, recipe = run.split, run.recipe
    ends = split.offsets[rows + 1]
    examples = phoenix_split.histories(split, rows, ends, recipe.history_len)
    examples["target_post_ids"] = split.items[ends - 1]
    users = two_stage.encode_users(run.retrieval, run.retrieval_params, split, examples)
    found = two_stage.retrieval_topk(users, run.item_vectors, recipe.retrieve_k,
                                     lambda a, b: serving.history_mask(split, rows[a:b], ends[a:b]))
    return found.scores, found.columns


@pytest.mark.parametrize("batch", [1, 3, 8], ids=lambda b: f"B={b}")
def test_exported_retrieve_equals_in_process(exported, batch):
    run, _, ex = exported
    rows = np.arange(batch) * 3 % len(run.split.user_ids)
    scores, columns = ex.retrieve(rows)
    want_scores, want_columns = in_process_retrieval(run, rows)
    np.testing.assert_array_equal(columns, want_columns)
    np.testing.assert_allclose(scores, want_scores, **TOL)


@pytest.mark.parametrize("batch,candidates", [(1, 1), (3, 4), (8, 11), (3, 12)], ids=lambda v: str(v))
def test_exported_rank_equals_ranker_logits(exported, batch, candidates):
    """Any candidate count (1, C, more than C and not a multiple of it) ranks as ranker_logits does in
    chunks of the training C."""
    run, _, ex = exported
    rng = np.random.default_rng(batch * 100 + candidates)
    rows = rng.choice(len(run.split.user_ids), batch, replace=False)
    columns = rng.integers(0, len(run.split.item_ids), (batch, candidates))
    split = run.split
    examples = phoenix_split.histories(split, rows, split.offsets[rows + 1], run.recipe.ranker_history_len)
    want = two_stage.ranker_logits(run.ranker, run.ranker_params, split, examples, columns, run.recipe.num_candidates)
    got = ex.rank_columns(rows, columns)
    assert got.shape == (batch, candidates, len(ex.actions))
    np.testing.assert_allclose(got, want, **TOL)


def test_candidate_isolation_survives_export(exported):
    """A candidate's logits do not move when the other rows of the batch or the other candidates of its
    row change: bit for bit at one shape, within float32 tolerance across shapes."""
    run, _, ex = exported
    N, U = len(run.split.item_ids), len(run.split.user_ids)
    rng = np.random.default_rng(0)
    columns = rng.integers(0, N, (3, 9))
    base = ex.rank_columns(np.array([0, 1, 2]), columns)  # [3, 9, A]
    others = rng.integers(0, N, (3, 9))
    others[0, 4] = columns[0, 4]  # the watched candidate: user 0, slot 4
    changed = ex.rank_columns(np.array([0, U - 1, U - 2]), others)
    np.testing.assert_array_equal(changed[0, 4], base[0, 4])
    alone = ex.rank_columns(np.array([0]), np.array([[N - 1, N - 2, N - 3, N - 4, columns[0, 4]]]))
    np.testing.assert_allclose(alone[0, 4], base[0, 4], **TOL)
    # ... and the slot does matter (rotary position c mod C): the check above could fail (the shape
    # of `alone`, compiled once)
    moved = ex.rank_columns(np.array([0]), np.array([[columns[0, 4]] * 5]))
    assert not np.allclose(moved[0, 1], base[0, 4], rtol=0, atol=1e-7)


def test_exported_recommend_equals_recommend_for_every_user(exported):
    """For every user of the tiny run (the test users among them): same items, same order."""
    run, _, ex = exported
    for user in run.user_tokens(np.arange(len(run.split.user_ids))):
        want, got = pipeline.recommend(run, user, 10), ex.recommend(user, 10)
        assert [item for item, _ in got] == [item for item, _ in want], user
        np.testing.assert_allclose([s for _, s in got], [s for _, s in want], **TOL)


def test_manifest_describes_the_artifacts(exported):
    run, path, ex = exported
    manifest = json.loads(Path(path, "manifest.json").read_text())
    import jax
    assert manifest["jax_version"] == jax.__version__
    assert set(manifest["sha256"]) == {"retrieve.stablehlo", "rank.stablehlo", "params.npz", "vocab.npz"}
    rank_inputs = manifest["functions"]["rank"]["inputs"]
    assert rank_inputs["candidate_post_hashes"] == {"shape": "[b, c, 2]", "dtype": "int32"}
    assert manifest["functions"]["retrieve"]["inputs"]["exclude"]["shape"] == f"[b, {len(run.split.item_ids)}]"
    assert manifest["functions"]["retrieve"]["outputs"][1] == {"shape": f"[b, {run.recipe.retrieve_k}]",
                                                               "dtype": "int32"}
    assert manifest["serving"]["retrieval_weight"] == 0.5 and manifest["vocabulary"]["id_kinds"]["user"] == "string"
    assert not [n for n in os.listdir(os.path.dirname(path)) if n.startswith(".export")]  # no temporary left


def test_a_changed_file_is_refused(exported, tmp_path):
    _, path, _ = exported
    copy = tmp_path / "export"
    copy.mkdir()
    for name in os.listdir(path):
        (copy / name).write_bytes(Path(path, name).read_bytes())
    data = bytearray((copy / "params.npz").read_bytes())
    data[-100] ^= 1
    (copy / "params.npz").write_bytes(bytes(data))
    with pytest.raises(ValueError, match=r"params.npz: sha256 .* the manifest says"):
        phoenix_exported.load(copy)


def test_bad_ids_are_refused_naming_them(exported):
    run, _, ex = exported
    user = run.user_tokens([0])[0]
    with pytest.raises(ValueError, match=r"user: expected a user of the run's log .* got 'nobody'"):
        ex.recommend("nobody")
    with pytest.raises(ValueError, match=r"items\[1\]: expected an item of the run's catalog .* got 'x'"):
        ex.rank(user, [run.item_tokens([0])[0], "x"])
    with pytest.raises(ValueError, match=r"items: expected at least one item id"):
        ex.rank(user, [])
    with pytest.raises(ValueError, match=r"k: expected an int in \[1, 12\]"):
        ex.recommend(user, 13)


LOADER_ONLY = """
import json, sys
import phoenix_exported
served = phoenix_exported.load(sys.argv[1])
user, items = sys.argv[2], json.loads(sys.argv[3])
out = {"recommend": served.recommend(user, 10), "rank": served.rank(user, items).tolist(),
       "modules": sorted(m for m in sys.modules if m.split(".")[0] in
                         ("haiku", "grok", "recsys_model", "recsys_retrieval_model", "runners", "optax")
                         or (m.startswith("phoenix_") and m != "phoenix_exported"))}
print(json.dumps(out))
"""


def test_loading_needs_jax_and_numpy_only(exported):
    """A fresh process loads the directory and serves from it without importing any Phoenix model
    code (or Haiku), and answers as the in-process library does."""
    run, path, _ = exported
    user, items = run.user_tokens([5])[0], run.item_tokens([0, 7, 3])
    done = subprocess.run([sys.executable, "-c", LOADER_ONLY, path, user, json.dumps(items)], capture_output=True,
                          text=True, timeout=300, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout)
    assert out["modules"] == []
    want = pipeline.recommend(run, user, 10)
    assert [item for item, _ in out["recommend"]] == [item for item, _ in want]
    split = run.split
    row = np.array([5])
    examples = phoenix_split.histories(split, row, split.offsets[row + 1], run.recipe.ranker_history_len)
    logits = two_stage.ranker_logits(run.ranker, run.ranker_params, split, examples, np.array([[0, 7, 3]]),
                                     run.recipe.num_candidates)[0]
    np.testing.assert_allclose(out["rank"], 1 / (1 + np.exp(-logits)), **TOL)


def test_run_serve_export_replaces_the_directory_atomically(exported, tiny_run):  # noqa: F811
    """`run_serve.py --run DIR --export` over an existing DIR/export: the new directory replaces the
    old one whole (nothing left beside it) and serves the same lists."""
    import run_serve

    run, path, _ = exported
    tmp = tiny_run
    before = os.stat(path).st_ino
    assert run_serve.main(["--run", str(tmp / "run"), "--export"]) == 0
    assert os.stat(path).st_ino != before
    assert not [n for n in os.listdir(os.path.dirname(path)) if n.startswith(".export")]
    again = phoenix_exported.load(path)
    user = run.user_tokens([2])[0]
    assert [i for i, _ in again.recommend(user, 5)] == [i for i, _ in pipeline.recommend(run, user, 5)]


def test_ensembles_export_as_evaluated(exported, tmp_path):
    """Two-member ensembles of both stages (the second member's parameters scaled, so members
    differ): the exported recommend equals phoenix_pipeline.recommend of the in-process ensembles."""
    import dataclasses

    import jax

    run, _, _ = exported
    other = lambda params: jax.tree.map(lambda x: x * 1.05, params)  # noqa: E731
    pair = dataclasses.replace(
        run, retrieval=two_stage.RetrievalEnsemble([run.retrieval, run.retrieval]),
        retrieval_params=(run.retrieval_params, other(run.retrieval_params)),
        ranker=two_stage.RankerEnsemble([run.ranker, run.ranker]),
        ranker_params=(run.ranker_params, other(run.ranker_params)), _items=None)
    ex = phoenix_exported.load(phoenix_export.export_run(pair, tmp_path / "export"))
    assert [len(ex.params[stage]) for stage in ("retrieval", "ranker")] == [2, 2]
    user = run.user_tokens([0])[0]  # the second members count (else the check below could not fail)
    assert [s for _, s in pipeline.recommend(pair, user, 10)] != [s for _, s in pipeline.recommend(run, user, 10)]
    for user in run.user_tokens(np.arange(0, len(run.split.user_ids), 3)):
        want, got = pipeline.recommend(pair, user, 10), ex.recommend(user, 10)
        assert [item for item, _ in got] == [item for item, _ in want], user
        np.testing.assert_allclose([s for _, s in got], [s for _, s in want], **TOL)
