"""train_synthetic: a tiny end-to-end run whose checkpoints reproduce the reported figures through the
inference runners, its run config (what a resume must match) and its command line (run_train.py)."""

import dataclasses

import numpy as np
import pytest

import run_train
import train_synthetic as ts
from phoenix_paths import DEFAULT_CACHE_DIR
from phoenix_synthetic import (FAVORITE, RECALL_K, SyntheticWorld, corpus_batch, gap_closed, held_out_examples,
                               per_action_auc, to_recsys_batch, to_retrieval_batch)
from runners import ACTIONS, RecsysInferenceRunner, RecsysRetrievalInferenceRunner

TINY = ["--num-users", "200", "--num-posts", "500", "--num-authors", "20", "--history-len", "8",
        "--min-history-len", "4", "--num-candidates", "4", "--emb-size", "16", "--num-layers", "1",
        "--key-size", "8", "--user-table-size", "401", "--post-table-size", "1009", "--author-table-size", "41",
        "--batch-size", "32", "--retrieval-batch-size", "64", "--steps-ranker", "80", "--steps-retrieval", "80",
        "--eval-repeats", "5", "--log-every", "40"]


def parse(argv) -> ts.SyntheticRun:
    """run_train.py --data synthetic's flags as the experiment's options."""
    return run_train.parse_args(["--data", "synthetic", *argv]).run


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    options = parse([*TINY, "--checkpoint-dir", str(tmp_path_factory.mktemp("synthetic"))])
    return options, ts.run(options)


def test_tiny_run_learns_and_reports(tiny_run, capsys):
    _, result = tiny_run
    ranker, retrieval = result["ranker"], result["retrieval"]
    assert ranker["model"].shape == (len(ACTIONS),)
    # Both models learn something in 80 steps on the tiny world (deterministic on CPU).
    assert ranker["model"][FAVORITE] > 0.55 and np.nanmean(ranker["model"]) > 0.55
    # Retrieval beats chance (K of N posts) by 2x and its loss falls. Against popularity, strong in a
    # world of 500 posts, 80 steps are a coin flip (1.03x with the old batch stream, 0.98x now).
    assert retrieval["model"] > 2 * RECALL_K / 500
    losses = [h["loss"] for h in retrieval["history"] if "loss" in h]
    assert losses[-1] < 0.9 * losses[0]
    assert np.all(ranker["oracle"][np.isfinite(ranker["oracle"])] > 0.6)
    assert result["gap_closed_favorite"] == pytest.approx(gap_closed(ranker["model"][0], ranker["oracle"][0]))


def test_checkpoints_reproduce_the_reported_figures(tiny_run):
    options, result = tiny_run
    world = SyntheticWorld(options.world())
    _, held_out = world.split_users()

    ranker = RecsysInferenceRunner.from_checkpoint(result["ranker"]["checkpoint"])
    examples = held_out_examples(world, held_out, options.eval_repeats, "ranking", options.seed)
    batch, labels, _ = to_recsys_batch(examples, ranker.runner.model.hash_config)
    probs = np.asarray(ranker.rank(batch).scores)  # [n, C, A]
    np.testing.assert_allclose(per_action_auc(probs, labels), result["ranker"]["model"], atol=2e-3)

    retriever = RecsysRetrievalInferenceRunner.from_checkpoint(result["retrieval"]["checkpoint"])
    hashes = retriever.runner.model.hash_config
    corpus = np.asarray(retriever.encode_candidates(corpus_batch(world, hashes))[0])  # [N, D]
    retriever.set_corpus(corpus)
    examples = held_out_examples(world, held_out, options.eval_repeats, "retrieval", options.seed)
    top = np.asarray(retriever.retrieve(to_retrieval_batch(examples, hashes), top_k=RECALL_K).top_k_indices)
    recall = np.mean([p in row for p, row in zip(examples["positive_post_ids"], top)])
    assert recall == pytest.approx(result["retrieval"]["model"], abs=0.01)


def test_default_checkpoint_dir_is_under_phoenix_cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("PHOENIX_CACHE_DIR", str(tmp_path))
    assert parse([]).checkpoint_dir == str(tmp_path / "checkpoints" / "synthetic")
    assert ts.SyntheticRun().checkpoint_dir == str(tmp_path / "checkpoints" / "synthetic")  # read when made
    monkeypatch.delenv("PHOENIX_CACHE_DIR")
    assert parse([]).checkpoint_dir == str(DEFAULT_CACHE_DIR / "checkpoints" / "synthetic")
    assert parse(["--checkpoint-dir", "mine"]).checkpoint_dir == "mine"


def test_the_command_line_is_the_options_dataclass():
    """Every SyntheticRun field is a flag with the field's default, and flags land in the field they name."""
    assert parse([]) == ts.SyntheticRun()
    options = parse(TINY)
    assert (options.num_posts, options.key_size, options.steps_ranker) == (500, 8, 80)
    assert dataclasses.replace(ts.SyntheticRun(), **{k: getattr(options, k) for k in ("num_posts", "key_size")}) \
        == parse(["--num-posts", "500", "--key-size", "8"])
    with pytest.raises(ValueError, match=r"SyntheticRun: steps_ranker: expected an int >= 1, got 0; overwrite and "
                                         r"resume: "):
        ts.SyntheticRun(steps_ranker=0, overwrite=True, resume=True)


# --------------------------------------------------------------------------- resumable runs


def test_run_config_holds_what_changes_results_only():
    base = ts.run_config(parse([]), "ranker")
    assert base == ts.run_config(parse(["--log-every", "7", "--checkpoint-every", "50", "--resume",
                                        "--keep-checkpoints", "1", "--checkpoint-dir", "x",
                                        "--steps-retrieval", "3", "--temperature", "0.1"]), "ranker")
    assert base != ts.run_config(parse(["--seed", "1"]), "ranker")
    assert base != ts.run_config(parse(["--steps-ranker", "10"]), "ranker")
    assert ts.run_config(parse([]), "retrieval") != ts.run_config(parse(["--temperature", "0.1"]), "retrieval")
    assert ts.resumable(parse([]), "ranker") == {}  # no flag, no step checkpoints: as before


@pytest.mark.parametrize("flags, message", [
    (["--checkpoint-every", "-1"], "--checkpoint-every: expected an int >= 0"),
    (["--keep-checkpoints", "0"], "--keep-checkpoints: expected an int >= 1"),
], ids=["negative_every", "keep_0"])
def test_bad_preemption_flags(flags, message, capsys):
    with pytest.raises(SystemExit):
        parse(flags)
    assert message in capsys.readouterr().err
