"""phoenix_sasrec.py: the full-softmax loss against NumPy, causality, padding invariance, the
training windows and evaluation histories against hand-built ones, the evaluation path against
phoenix_metrics on the pipeline's mask, and learning a planted next-item rule.

Models are tiny (D = 16, one layer) so each jitted function compiles in a second or two.
"""

import dataclasses

import jax
import numpy as np
import pytest

import phoenix_metrics as metrics
import phoenix_pipeline as pipeline
import phoenix_sasrec as sasrec
import phoenix_two_stage as two_stage

TINY = sasrec.SasrecRecipe(emb_size=16, num_layers=1, num_heads=2, history_len=6, dropout=0.0, batch_size=8,
                           epochs=2, warmup_steps=2, evals=2)
N = 11


def tiny_params(recipe=TINY, num_items=N, seed=0, S=None):
    """The model with init and apply jitted (one compiled program per input shape, as in training and
    scoring, instead of every op compiled eagerly per shape) and its params."""
    transformed = sasrec.make_model(recipe, num_items)
    model = type(transformed)(init=jax.jit(transformed.init, static_argnums=2),
                              apply=jax.jit(transformed.apply, static_argnums=3))
    S = recipe.history_len if S is None else S
    return model, model.init(jax.random.PRNGKey(seed), np.ones((2, S), np.int32), False)


@pytest.fixture(scope="module")
def tiny_model():
    """tiny_params() once for the tests that only read the model: one jitted init and apply for all."""
    return tiny_params()


def numpy_cross_entropy(logits, targets, valid):
    logits = logits.astype(np.float64)
    shifted = logits - logits.max(-1, keepdims=True)
    log_softmax = shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))  # [B, S, N]
    nll = -np.take_along_axis(log_softmax, targets[..., None], axis=-1)[..., 0]  # [B, S]
    return (nll * valid).sum() / max(valid.sum(), 1)


def test_full_softmax_loss_equals_numpy_log_softmax_cross_entropy():
    rng = np.random.default_rng(0)
    logits = (3 * rng.normal(size=(3, 4, 7))).astype(np.float32)
    targets = rng.integers(0, 7, (3, 4)).astype(np.int32)
    valid = rng.random((3, 4)) < 0.7
    valid[0, 0] = True
    got = float(sasrec.full_softmax_loss(logits, targets, valid))
    assert abs(got - numpy_cross_entropy(logits, targets, valid)) < 1e-5
    # invalid positions do not matter, whatever their targets and logits
    logits2, targets2 = logits.copy(), targets.copy()
    logits2[~valid] = 50.0
    targets2[~valid] = 0
    assert abs(float(sasrec.full_softmax_loss(logits2, targets2, valid)) - got) < 1e-6
    assert float(sasrec.full_softmax_loss(logits, targets, np.zeros_like(valid))) == 0.0


def test_model_loss_is_full_softmax_over_all_items(tiny_model):
    """The training loss of the model equals NumPy's cross-entropy over all N logits of its output."""
    model, params = tiny_model
    inputs = np.array([[3, 5, 2, 9, 0, 0], [1, 2, 3, 4, 5, 6]], np.int32)
    targets = np.array([[4, 1, 8, 0, 0, 0], [1, 2, 3, 4, 5, 10]], np.int32)
    valid = np.array([[1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 1]], bool)
    logits = np.asarray(model.apply(params, None, inputs, False))
    assert logits.shape == (2, 6, N)
    expected = numpy_cross_entropy(logits, targets, valid)
    got = float(sasrec.full_softmax_loss(model.apply(params, None, inputs, False), targets, valid))
    assert abs(got - expected) < 1e-5


def test_causality_scores_at_p_unchanged_when_later_items_change(tiny_model):
    model, params = tiny_model
    rng = np.random.default_rng(1)
    inputs = rng.integers(1, N + 1, (2, 6)).astype(np.int32)  # the shape of the loss test's: compiled once
    base = np.asarray(model.apply(params, None, inputs, False))
    for p in range(5):
        changed = inputs.copy()
        changed[:, p + 1:] = rng.integers(1, N + 1, changed[:, p + 1:].shape)
        out = np.asarray(model.apply(params, None, changed, False))
        np.testing.assert_allclose(out[:, :p + 1], base[:, :p + 1], atol=1e-5)
        assert not np.allclose(out[:, p + 1:], base[:, p + 1:], atol=1e-5)  # later positions do move


def test_padding_invariance(tiny_model):
    """Right padding (any amount) leaves the valid positions' logits unchanged, and the evaluation
    score is the logit row at the last valid slot."""
    model, params = tiny_model
    seq = np.array([[4, 7, 1, 9]], np.int32)
    short = np.asarray(model.apply(params, None, seq, False))[0]  # [4, N]
    for S in (5, 6, 9):
        padded = np.zeros((1, S), np.int32)
        padded[0, :4] = seq
        out = np.asarray(model.apply(params, None, padded, False))[0]
        np.testing.assert_allclose(out[:4], short, atol=1e-5)
    recipe = dataclasses.replace(TINY, history_len=9)
    m = sasrec.Sasrec(recipe, N, sasrec.OptimizerConfig(warmup_steps=1))
    padded = np.zeros((3, 9), np.int32)
    padded[:, :4] = seq
    scores = m.scores(params, padded, np.array([3, 3, 3]), batch_size=2)  # batch padding too
    np.testing.assert_allclose(scores, np.repeat(short[3:4], 3, axis=0), atol=1e-5)


def tiny_split(num_users=12, num_items=N, seed=0):
    """Users walk consecutive items (item m followed by m + 1 mod N), 6-10 each."""
    rng = np.random.default_rng(seed)
    users, items, stamps = [], [], []
    for u in range(num_users):
        start, length = int(rng.integers(num_items)), int(rng.integers(6, 11))
        for t in range(length):
            users.append(u)
            items.append((start + t) % num_items)
            stamps.append(100 * u + t)
    log = pipeline.from_arrays({"user_id": users, "item_id": items, "timestamp": stamps})
    return pipeline.split_log(log)


def test_windows_and_histories_match_hand_built():
    split = tiny_split()
    rows, starts, lengths = two_stage.training_windows(split, TINY.history_len)
    inputs, targets, valid = sasrec.window_arrays(split, rows, starts, lengths, TINY.history_len)
    covered = []
    for w in range(len(rows)):
        window = [int(split.item_columns[starts[w] + j]) for j in range(lengths[w])]
        for j in range(TINY.history_len):
            assert inputs[w, j] == (window[j] + 1 if j < len(window) else 0)
            assert valid[w, j] == (j + 1 < len(window))
            if valid[w, j]:
                assert targets[w, j] == window[j + 1]
                covered.append(starts[w] + j + 1)
    assert sorted(covered) == sorted(split.target_positions("train")[1].tolist())  # every training target once
    for which in ("val", "test"):
        hist, last = sasrec.histories(split, which, 4)
        user_rows, ends = split.target_positions(which)
        for u, (row, end) in enumerate(zip(user_rows, ends)):
            before = [int(c) + 1 for c in split.item_columns[split.offsets[row]:end]][-4:]
            assert hist[u, :len(before)].tolist() == before and (hist[u, len(before):] == 0).all()
            assert last[u] == len(before) - 1
        # test histories end with the validation target; validation histories never hold it
        if which == "test":
            assert (hist[np.arange(len(last)), last] == split.targets("val") + 1).all()


def test_evaluation_is_the_pipeline_rule():
    """evaluate() = phoenix_metrics on the pipeline's eval_mask: history excluded, target kept."""
    split = tiny_split()
    rng = np.random.default_rng(2)
    scores = rng.normal(size=(len(split.eval_users()), len(split.item_ids))).astype(np.float32)
    for which in ("val", "test"):
        target = split.targets(which)
        boosted = scores.copy()
        exclude = two_stage.eval_mask(split, which)
        boosted[exclude] += 100.0  # history items score highest: they must still never be ranked
        got, topk = sasrec.evaluate(split, which, boosted, two_stage.eval_mask, k=5)
        assert got == metrics.evaluate_scores(boosted, target, exclude)
        ranked = topk != metrics.NOT_RANKED  # fewer than k items left to recommend to some users
        assert ranked.any() and not np.take_along_axis(exclude, np.maximum(topk, 0), axis=1)[ranked].any()
        visible = split.exclude_mask(which)
        assert not visible[np.arange(len(target)), target].any()  # the target is never in its own history


def test_learns_a_planted_next_item_rule():
    """Next item = previous + 1 (mod N): after training, validation HR@1 is near 1 (vs 1/N by chance)
    and the best checkpoint is the one reported."""
    split = tiny_split(num_users=40, seed=3)
    recipe = dataclasses.replace(TINY, epochs=60, batch_size=8, learning_rate=1e-2, evals=3, warmup_steps=5)
    rows, info = sasrec.reference_rows(split, recipe, 0, two_stage.training_windows, two_stage.eval_mask,
                                       stream=open("/dev/null", "w"))
    assert rows[("val", "sasrec")]["HR@10"] == 1.0
    assert rows[("val", "sasrec")]["MRR"] > 0.9
    assert rows[("test", "sasrec")]["MRR"] > 0.9
    assert info["best"]["NDCG@10"] == rows[("val", "sasrec")]["NDCG@10"]
    # the top-1 of every test user is the item after its last one
    hist, last = sasrec.histories(split, "test", recipe.history_len)
    assert (info["test_topk"][:, 0] == (hist[np.arange(len(last)), last] - 1 + 1) % N).mean() > 0.9


def test_train_val_split_adds_exactly_the_validation_targets():
    import phoenix_protocols as protocols
    split = tiny_split()
    ext = protocols.train_val_split(split)
    before = set(split.target_positions("train")[1].tolist())
    after = set(ext.target_positions("train")[1].tolist())
    assert after - before == set(split.target_positions("val")[1].tolist())
    assert before <= after and not after & set(split.target_positions("test")[1].tolist())


def test_cli_protocol_train_val_and_sasrec_rows(tmp_path, capsys):
    """run_train.py on a tiny CSV with --protocol train+val --sasrec: the table gains the sasrec
    rows and the train+val rows; val-select rows are unchanged in kind."""
    import run_train
    from test_phoenix_pipeline import TINY_FLAGS, write_log
    write_log(tmp_path / "log.csv")
    result = run_train.main(["--data", str(tmp_path / "log.csv"), *TINY_FLAGS, "--checkpoint-dir", str(tmp_path / "run"),
                             "--protocol", "train+val", "--sasrec", "--sasrec-epochs", "3", "--sasrec-history-len", "5",
                             "--sasrec-train-val"])
    table = result["table"]
    assert list(table)[:2] == [("val", "popularity"), ("val", "transition")]
    for key in [("val", "sasrec"), ("test", "sasrec"), ("test (train+val)", "retrieval"),
                ("test (train+val)", "two-stage"), ("test (train+val)", "sasrec")]:
        assert key in table and 0 <= table[key]["HR@10"] <= 1
    labels = [which for which, _ in table]
    assert labels == sorted(labels, key=["val", "test", "test (train+val)"].index)  # grouped by protocol
    out = capsys.readouterr().out
    assert "| test (train+val) | two-stage |" in out and "| val | sasrec |" in out
    assert (tmp_path / "run" / "train+val" / "ranker").exists()


@pytest.mark.parametrize("members", ["1", "2"])
def test_train_val_without_added_targets_reproduces_the_selected_checkpoint(tmp_path, monkeypatch, members):
    """Protocol train+val = the val-select run replayed on more data up to the step validation chose:
    with no targets added (train_val_split patched to the identity) it retrains the very retrieval
    and ranker checkpoints val-select kept (same seed, batches and schedule), so its test rows equal
    val-select's; with ensembles of both stages, every member stops at its own chosen step."""
    import phoenix_protocols as protocols
    import run_train
    from test_phoenix_pipeline import TINY_FLAGS, write_log
    write_log(tmp_path / "log.csv")
    monkeypatch.setattr(protocols, "train_val_split", lambda split: split)
    result = run_train.main(["--data", str(tmp_path / "log.csv"), *TINY_FLAGS, "--checkpoint-dir", str(tmp_path / "run"),
                             "--protocol", "train+val", "--retrieval-members", members, "--ranker-members", members])
    table = result["table"]
    if members == "2":
        assert len(result["retrieval_best"]["steps"]) == len(result["ranker_best"]["steps"]) == 2
        assert (tmp_path / "run" / "train+val" / "retrieval.1").exists()
        assert (tmp_path / "run" / "train+val" / "ranker.1").exists()
    for model in ("retrieval", "two-stage"):
        for metric in ("HR@10", "NDCG@10", "MRR"):
            assert table[("test (train+val)", model)][metric] == pytest.approx(table[("test", model)][metric], abs=1e-6)
