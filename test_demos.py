"""The demos run end to end in-process: untrained release-style demo, a short training run that
caches its checkpoint (under $PHOENIX_CACHE_DIR, never the working directory), and a second run that
loads that cache instead of retraining."""

import dataclasses
import sys

import numpy as np
import pytest

import phoenix_checkpoint as checkpoint
import phoenix_demos as demos
import phoenix_metrics as metrics
import run_ranker
import run_retrieval
import run_train

TINY_MODEL = ["--emb-size", "16", "--num-layers", "1", "--history-len", "8"]
TINY_WORLD = ["--num-users", "60", "--num-posts", "200", "--num-authors", "20", "--eval-examples", "8"]


@pytest.fixture(autouse=True)
def cache_dir(tmp_path, monkeypatch):
    """Every demo here runs with $PHOENIX_CACHE_DIR in tmp_path and an empty working directory."""
    cache = tmp_path / "phoenix_cache"
    monkeypatch.setenv("PHOENIX_CACHE_DIR", str(cache))
    (tmp_path / "cwd").mkdir()
    monkeypatch.chdir(tmp_path / "cwd")
    return cache


def test_default_checkpoints_live_under_the_cache_dir(cache_dir):
    assert run_ranker.parse_args([]).checkpoint == str(cache_dir / "checkpoints" / "demo_ranker")
    assert run_retrieval.parse_args([]).checkpoint == str(cache_dir / "checkpoints" / "demo_retrieval")
    assert run_ranker.parse_args(["--checkpoint", "mine"]).checkpoint == "mine"
    assert demos.RankerDemo().checkpoint == str(cache_dir / "checkpoints" / "demo_ranker")  # read when made


@pytest.mark.parametrize("module, options", [(run_ranker, demos.RankerDemo), (run_retrieval, demos.RetrievalDemo)],
                         ids=["ranker", "retrieval"])
def test_a_demos_flags_are_its_options_fields(module, options, capsys):
    """Every field of the demo's options is a flag with the field's default; --help says what each does."""
    assert module.parse_args([]) == options()
    assert module.parse_args(["--steps", "3", "--no-train"]) == dataclasses.replace(module.parse_args([]), steps=3,
                                                                                    no_train=True)
    with pytest.raises(SystemExit):
        module.parse_args(["--help"])
    text = capsys.readouterr().out
    for field in dataclasses.fields(options):
        assert "--" + field.name.replace("_", "-") in text
    assert "held-out examples for the figures" in text


@pytest.mark.parametrize("module", [run_ranker, run_retrieval, run_train], ids=lambda m: m.__name__)
def test_console_script_entry_returns_none(module, monkeypatch):
    # The console-script wrapper calls sys.exit(cli()): a dict there prints and exits with status 1.
    calls = []
    monkeypatch.setattr(module, "main", lambda argv=None: calls.append(argv) or {"scores": 1})
    monkeypatch.setattr(sys, "argv", ["phoenix-x", "--seed", "1"])
    assert module.cli() is None and calls == [None]


def test_ranker_demo_untrained(capsys):
    out = run_ranker.main(["--no-train", *TINY_MODEL, "--num-candidates", "4"])
    text = capsys.readouterr().out
    assert "random init, untrained" in text and "steady-state rank()" in text
    spread = out["scores"].max(axis=1) - out["scores"].min(axis=1)  # [B, A] across candidates
    assert np.all(spread > 1e-4)


def test_retrieval_demo_untrained(capsys):
    out = run_retrieval.main(["--no-train", *TINY_MODEL, "--corpus-size", "50", "--top-k", "5"])
    text = capsys.readouterr().out
    assert "(random init)" in text and "steady-state retrieve()" in text
    assert np.all(np.diff(out["scores"], axis=1) <= 0)  # best first
    assert len(np.unique(out["scores"])) > 1


def test_ranker_demo_trains_then_reuses_its_cache(cache_dir, tmp_path, capsys):
    argv = ["--steps", "3", *TINY_MODEL, "--num-candidates", "4", *TINY_WORLD]  # default --checkpoint
    first = run_ranker.main(argv)
    text = capsys.readouterr().out
    assert not first["loaded"] and "training the demo ranker: 3 steps" in text
    saved = cache_dir / "checkpoints" / "demo_ranker"
    assert f"saved to {saved}" in text and demos.cached_checkpoint(str(saved), "none") == "stale"
    assert not list((tmp_path / "cwd").iterdir())  # nothing written into the working directory
    assert "true P(fav)" in text and "Spearman rank correlation" in text and "P(favorite):" in text
    assert np.isfinite(first["spearman_favorite"]) and -1 <= first["spearman_favorite"] <= 1
    assert np.all(first["scores"].max(axis=1) - first["scores"].min(axis=1) > 0)  # not constant over candidates

    second = run_ranker.main(argv)
    text = capsys.readouterr().out
    assert second["loaded"] and "loading the cached demo ranker" in text and "training" not in text
    np.testing.assert_allclose(second["scores"], first["scores"], rtol=1e-6)
    assert second["spearman_favorite"] == pytest.approx(first["spearman_favorite"])


def test_retrieval_demo_trains_then_reuses_its_cache(tmp_path, capsys):
    argv = ["--steps", "3", "--checkpoint", str(tmp_path / "retrieval"), *TINY_MODEL, *TINY_WORLD, "--top-k", "5"]
    first = run_retrieval.main(argv)
    text = capsys.readouterr().out
    assert not first["loaded"] and "training the demo retrieval model: 3 steps" in text
    assert "true top-5" in text and "overlap of the retrieved top-5" in text and "recall@100" in text
    assert first["retrieved"].shape == (2, 100) and len(np.unique(first["retrieved"][0])) == 100
    check_true_top_is_sorted_by_printed_p_next(text, top_k=5)

    second = run_retrieval.main(argv)
    text = capsys.readouterr().out
    assert second["loaded"] and "loading the cached demo retrieval model" in text and "training" not in text
    np.testing.assert_array_equal(second["retrieved"], first["retrieved"])
    assert second["recall"] == first["recall"]


def check_true_top_is_sorted_by_printed_p_next(text: str, top_k: int):
    """The printed table shows P(next) for both halves and the true top-K is sorted by it."""
    assert "sorted by P(next)" in text and text.count("affinity  P(next)") == 4  # 2 users x 2 halves
    rows = [line.split("|") for line in text.splitlines()
            if "|" in line and line.split()[0].isdigit()]  # [2 * top_k] table rows
    assert len(rows) == 2 * top_k
    percent = lambda cell: float(cell.rstrip("%")) / 100
    for user in range(2):
        block = rows[user * top_k:(user + 1) * top_k]
        left = [(percent(l.split()[6]), int(l.split()[7])) for l, _ in block]  # (P(next), true rank)
        right = [percent(r.split()[-1]) for _, r in block]
        assert right == sorted(right, reverse=True) and right[0] > 0
        for p, true_rank in left:  # a retrieved post's probability sits where its true rank says
            assert p <= right[0]
            if true_rank <= top_k:
                assert p == right[true_rank - 1]


def test_cache_is_keyed_and_a_stale_cache_is_not_reused(tmp_path):
    path = str(tmp_path / "ckpt")
    assert demos.cached_checkpoint(path, "k") == "missing"
    checkpoint.save_checkpoint(path, {"m": {"w": np.zeros(2, np.float32)}}, extra={"cache_key": "k"})
    assert demos.cached_checkpoint(path, "k") == "hit"
    assert demos.cached_checkpoint(path, "other") == "stale"
    # Every part of the key matters: model config, world, seed, steps.
    options = run_ranker.parse_args([*TINY_MODEL, *TINY_WORLD])
    world_cfg = demos.demo_world_config(options)
    cfg = demos.demo_ranker_config(16, 1, 8, 4, hash_config=demos.demo_hash_config(world_cfg))
    deeper = demos.demo_ranker_config(16, 2, 8, 4, hash_config=demos.demo_hash_config(world_cfg))
    other_world = dataclasses.replace(world_cfg, seed=1)
    base = demos.cache_key(cfg, world_cfg, 0, 2)
    assert base == demos.cache_key(cfg, world_cfg, 0, 2)
    keys = {base, demos.cache_key(cfg, world_cfg, 1, 2), demos.cache_key(cfg, world_cfg, 0, 3),
            demos.cache_key(deeper, world_cfg, 0, 2), demos.cache_key(cfg, other_world, 0, 2)}
    assert len(keys) == 5


@pytest.mark.parametrize("x, y, want", [
    ([1, 2, 3, 4], [10, 20, 30, 40], 1.0),
    ([1, 2, 3, 4], [4, 3, 2, 1], -1.0),
    ([1, 2, 3, 4, 5], [2, 1, 4, 3, 5], 0.8),  # 1 - 6 * sum(d^2) / (n (n^2 - 1)) = 1 - 6*4/120
    ([1, 1, 2, 3], [1, 2, 3, 4], 0.9486832980505138),  # ties: Pearson of mid-ranks [1.5, 1.5, 3, 4]
], ids=["identical", "reversed", "swaps", "ties"])
def test_spearman_golden(x, y, want):
    assert metrics.spearman(np.array(x, float), np.array(y, float)) == pytest.approx(want)


def test_spearman_along_axes_matches_rows():
    rng = np.random.default_rng(0)
    x, y = rng.standard_normal((5, 7)), rng.standard_normal((5, 7))
    rows = [metrics.spearman(a, b) for a, b in zip(x, y)]
    np.testing.assert_allclose(metrics.spearman(x, y, axis=1), rows, rtol=1e-12)
    np.testing.assert_allclose(metrics.spearman(x.T, y.T, axis=0), rows, rtol=1e-12)
    np.testing.assert_array_equal(metrics.rankdata([3.0, 1.0, 3.0, 2.0]), [3.5, 1.0, 3.5, 2.0])
    assert np.isnan(metrics.spearman(np.ones(4), np.arange(4.0)))
