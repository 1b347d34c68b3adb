"""Tests of phoenix_training.py: loss golden values, masking, NumPy references, optimiser, trainers, fit."""

import io
import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import phoenix_checkpoint as checkpoint
import phoenix_configs as configs
import phoenix_training as training
from grok import TransformerConfig
from recsys_model import HashConfig, PhoenixModelConfig, RecsysBatch
from recsys_retrieval_model import PhoenixRetrievalModelConfig

# Tiny sizes: the train step compiles in seconds on a shared 2-core machine.
B, S, C, A, D = 4, 5, 3, 5, 16
HASHES = HashConfig(user_table_size=50, post_table_size=60, author_table_size=40)
TRANSFORMER = TransformerConfig(emb_size=D, key_size=8, num_q_heads=2, num_kv_heads=1, num_layers=1,
                                widening_factor=2.0)
OPTIMIZER = training.OptimizerConfig(learning_rate=1e-2, warmup_steps=5)
LOG2 = math.log(2.0)


def random_batch(seed: int, batch_size: int = B, num_candidates: int = C) -> RecsysBatch:
    """Hashes in [1, table size) (the last history position padded), actions multi-hot."""
    r = np.random.default_rng(seed)
    hc, Bs, Cs = HASHES, batch_size, num_candidates
    history_post = r.integers(1, hc.post_table_size, (Bs, S, hc.num_item_hashes)).astype(np.int32)
    history_post[:, -1] = 0
    return RecsysBatch(
        user_hashes=r.integers(1, hc.user_table_size, (Bs, hc.num_user_hashes)).astype(np.int32),
        history_post_hashes=history_post,
        history_author_hashes=r.integers(1, hc.author_table_size, (Bs, S, hc.num_author_hashes)).astype(np.int32),
        history_actions=(r.random((Bs, S, A)) < 0.3).astype(np.float32),
        history_product_surface=r.integers(0, 16, (Bs, S)).astype(np.int32),
        candidate_post_hashes=r.integers(1, hc.post_table_size, (Bs, Cs, hc.num_item_hashes)).astype(np.int32),
        candidate_author_hashes=r.integers(1, hc.author_table_size, (Bs, Cs, hc.num_author_hashes)).astype(np.int32),
        candidate_product_surface=r.integers(0, 16, (Bs, Cs)).astype(np.int32))


def three_ranker_steps(**trainer_kwargs):
    """(trainer, state, losses) of a tiny ranking trainer (`trainer_kwargs`: data_parallel, shard_tables,
    ...) after 3 steps on 8 seeded random examples: the run test_multidevice repeats on other meshes."""
    cfg = PhoenixModelConfig(model=TRANSFORMER, emb_size=D, num_actions=A, history_seq_len=S, candidate_seq_len=C,
                             hash_config=HASHES, fprop_dtype=jnp.float32)
    trainer = training.make_ranking_trainer(cfg, optimizer_config=OPTIMIZER, **trainer_kwargs)
    state = trainer.init(jax.random.PRNGKey(0), random_batch(0, 8))
    losses = []
    for i in range(3):
        labels = (np.random.default_rng(100 + i).random((8, C, A)) < 0.3).astype(np.float32)
        state, metrics = trainer.step(state, random_batch(i, 8), labels)
        losses.append(float(metrics["loss"]))
    return trainer, state, losses


def random_labels(seed: int) -> np.ndarray:
    return (np.random.default_rng(seed).random((B, C, A)) < 0.3).astype(np.float32)  # [B, C, A]


def leaves(tree) -> list[np.ndarray]:
    return [np.asarray(x) for x in jax.tree.leaves(tree)]


# --------------------------------------------------------------------------- ranking loss


@pytest.mark.parametrize("x, y, expected", [
    (0.0, 1.0, LOG2),                                   # log(1 + e^0)
    (2.0, 1.0, math.log1p(math.exp(-2.0))),             # 0.126928
    (-3.0, 1.0, 3.0 + math.log1p(math.exp(-3.0))),      # 3.048587
    (1.0, 0.0, 1.0 + math.log1p(math.exp(-1.0))),       # 1.313262
    (0.0, 0.5, LOG2),                                   # soft label: max(0,0) - 0 + log 2
    (100.0, 0.0, 100.0),                                # no overflow to inf
    (-100.0, 0.0, 0.0),                                 # log1p(e^-100) = 3.7e-44
], ids=["x0y1", "x2y1", "xm3y1", "x1y0", "soft", "large_pos", "large_neg"])
def test_sigmoid_cross_entropy_golden(x, y, expected):
    got = training.sigmoid_cross_entropy(jnp.float32(x), jnp.float32(y))
    np.testing.assert_allclose(float(got), expected, rtol=1e-6, atol=1e-7)


def test_sigmoid_cross_entropy_of_bf16_logits_is_float32():
    got = training.sigmoid_cross_entropy(jnp.asarray([2.0], jnp.bfloat16), jnp.asarray([1.0], jnp.bfloat16))
    assert got.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(got), [math.log1p(math.exp(-2.0))], rtol=1e-6)


# One user, two candidates, two actions. Cross-entropies (see the golden test above):
#   candidate 0: x=0,y=1 -> log 2 = 0.693147;    x=2,y=1 -> 0.126928
#   candidate 1: x=-3,y=1 -> 3.048587;           x=1,y=0 -> 1.313262
GOLDEN_LOGITS = np.array([[[0.0, 2.0], [-3.0, 1.0]]], np.float32)  # [1, 2, 2]
GOLDEN_LABELS = np.array([[[1.0, 1.0], [1.0, 0.0]]], np.float32)  # [1, 2, 2]
CE = np.array([[LOG2, math.log1p(math.exp(-2.0))],
               [3.0 + math.log1p(math.exp(-3.0)), 1.0 + math.log1p(math.exp(-1.0))]])  # [C, A]


@pytest.mark.parametrize("candidate_mask, label_mask, action_weights, loss, per_action", [
    ([True, True], None, None, CE.mean(), CE.mean(axis=0)),  # 1.295481; [1.870867, 0.720095]
    ([True, False], None, None, CE[0].mean(), CE[0]),  # 0.410038: candidate 1 is padding
    ([True, False], None, [1.0, 3.0], (CE[0, 0] + 3 * CE[0, 1]) / 4, CE[0]),  # 0.268483
    ([True, True], [[1, 0], [1, 1]], None, (CE[0, 0] + CE[1, 0] + CE[1, 1]) / 3,
     [(CE[0, 0] + CE[1, 0]) / 2, CE[1, 1]]),  # 1.684999: label (0, 1) unknown
    ([True, True], [[1, 0], [0, 1]], [2.0, 0.5], (2 * CE[0, 0] + 0.5 * CE[1, 1]) / 2.5,
     [CE[0, 0], CE[1, 1]]),  # 0.817170
    ([False, False], None, None, 0.0, [0.0, 0.0]),  # nothing to learn from: 0, not NaN
], ids=["all", "padded_candidate", "action_weights", "label_mask", "label_mask_and_weights", "all_masked"])
def test_ranking_loss_golden(candidate_mask, label_mask, action_weights, loss, per_action):
    label_mask = None if label_mask is None else np.asarray(label_mask, bool)[None]
    terms = training.ranking_loss_terms(GOLDEN_LOGITS, GOLDEN_LABELS, np.asarray([candidate_mask]), label_mask,
                                        action_weights)
    np.testing.assert_allclose(float(terms.loss), loss, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(np.asarray(terms.per_action_loss), per_action, rtol=1e-6, atol=1e-7)
    assert float(training.ranking_loss(GOLDEN_LOGITS, GOLDEN_LABELS, np.asarray([candidate_mask]), label_mask,
                                       action_weights)) == float(terms.loss)


def test_masked_labels_and_candidates_change_neither_loss_nor_gradient():
    r = np.random.default_rng(0)
    logits = r.standard_normal((3, 4, A)).astype(np.float32)  # [B, C, A]
    labels = (r.random((3, 4, A)) < 0.4).astype(np.float32)
    candidate_mask = np.array([[1, 1, 0, 1], [1, 0, 0, 0], [1, 1, 1, 1]], bool)  # [B, C]
    label_mask = r.random((3, 4, A)) < 0.7  # [B, C, A]
    masked = ~(candidate_mask[:, :, None] & label_mask)  # [B, C, A]
    assert masked.any() and not masked.all()
    other = logits.copy()
    other[masked] = r.choice([1e4, -1e4, np.inf, np.nan], masked.sum())  # even non-finite logits

    def value_and_grad(x):
        return jax.value_and_grad(training.ranking_loss)(x, labels, candidate_mask, label_mask,
                                                         np.arange(1, A + 1, dtype=np.float32))

    loss, grad = value_and_grad(logits)
    other_loss, other_grad = value_and_grad(other)
    assert np.isfinite(float(loss))
    np.testing.assert_array_equal(float(other_loss), float(loss))
    np.testing.assert_array_equal(np.asarray(other_grad), np.asarray(grad))
    assert np.all(np.asarray(grad)[masked] == 0) and np.any(np.asarray(grad)[~masked] != 0)


# --------------------------------------------------------------------------- retrieval loss


def listwise_reference(logits, labels, mask):
    """NumPy: per user with a positive, -sum(y / sum y * log softmax over valid candidates); mean."""
    losses = []
    for x, y, m in zip(logits.astype(np.float64), labels.astype(np.float64), mask):
        if y[m].sum() == 0:
            continue
        z = x[m] - x[m].max()
        log_p = z - np.log(np.exp(z).sum())
        losses.append(-(y[m] / y[m].sum() * log_p).sum())
    return float(np.mean(losses)) if losses else 0.0


def test_listwise_loss_golden():
    # Two equal logits, the first positive: log 2. A user without a positive adds nothing.
    logits = jnp.array([[0.0, 0.0], [5.0, -1.0]])
    labels = jnp.array([[1.0, 0.0], [0.0, 0.0]])
    assert float(training.listwise_loss(logits, labels, jnp.ones((2, 2), bool))) == pytest.approx(LOG2, abs=1e-7)
    assert float(training.listwise_loss(logits, jnp.zeros((2, 2)), jnp.ones((2, 2), bool))) == 0.0


def test_listwise_loss_matches_numpy_and_ignores_padded_candidates():
    r = np.random.default_rng(3)
    logits = r.normal(size=(6, 7)).astype(np.float32) * 3
    labels = (r.random((6, 7)) < 0.3).astype(np.float32)
    labels[0] = 0.0  # no positive: left out of the mean
    mask = r.random((6, 7)) < 0.8
    mask[:, 0] = True
    expected = listwise_reference(logits, labels, mask)
    got = float(training.listwise_loss(jnp.asarray(logits), jnp.asarray(labels), jnp.asarray(mask)))
    assert got == pytest.approx(expected, rel=1e-6)
    # Padded candidates: any logit (even NaN) and any label there change neither loss nor gradient.
    poisoned = np.where(mask, logits, np.nan).astype(np.float32)
    relabelled = np.where(mask, labels, 1.0).astype(np.float32)
    assert float(training.listwise_loss(jnp.asarray(poisoned), jnp.asarray(relabelled), jnp.asarray(mask))) == (
        pytest.approx(got, rel=1e-6))
    grad = jax.grad(lambda x: training.listwise_loss(x, jnp.asarray(labels), jnp.asarray(mask)))(jnp.asarray(poisoned))
    assert np.all(np.isfinite(np.asarray(grad))) and np.all(np.asarray(grad)[~mask] == 0)


def test_retrieval_loss_golden():
    eye = np.eye(2, dtype=np.float32)  # user i and positive i are the same unit vector
    ids = np.array([3, 7])
    # logits [[1, 0], [0, 1]]: each row log(e^1 + e^0) - 1 = log(1 + e^-1) = 0.313262.
    np.testing.assert_allclose(float(training.retrieval_loss(eye, eye, 1.0, ids)), math.log1p(math.exp(-1)),
                               rtol=1e-6)
    # Temperature 0.5 doubles the logits: log(1 + e^-2) = 0.126928.
    np.testing.assert_allclose(float(training.retrieval_loss(eye, eye, 0.5, ids)), math.log1p(math.exp(-2)),
                               rtol=1e-6)
    # logQ: column 1 was sampled with probability 1/2, so its logits drop by log 2 in both rows:
    #   row 0 [1, -log 2]     -> log(1 + e^(-log 2 - 1)) = log(1 + 1/(2e))         = 0.168790
    #   row 1 [0, 1 - log 2]  -> log(1 + e^(log 2 - 1))  = log(1 + 2/e)            = 0.551445
    log_q = np.array([0.0, -LOG2], np.float32)
    expected = (math.log1p(0.5 / math.e) + math.log1p(2 / math.e)) / 2
    np.testing.assert_allclose(float(training.retrieval_loss(eye, eye, 1.0, ids, log_q=log_q)), expected, rtol=1e-6)
    # Same item in both rows: each row's only other column is an accidental hit, so the loss is 0.
    assert float(training.retrieval_loss(eye, eye, 1.0, np.array([5, 5]))) == 0.0
    # Row 1 invalid: it adds nothing and its item is not row 0's negative.
    assert float(training.retrieval_loss(eye, eye, 1.0, ids, valid=np.array([True, False]))) == 0.0
    assert float(training.retrieval_loss(eye, eye, 1.0, ids, valid=np.array([False, False]))) == 0.0


def numpy_retrieval_loss(user, positive, temperature, ids, log_q, valid) -> float:
    """Row by row: the positive against the valid, non-identical items of other rows."""
    ids = ids.reshape(len(ids), -1)
    losses = []
    for i in np.flatnonzero(valid):
        scores = [float(user[i] @ positive[j]) / temperature - log_q[j] for j in range(len(user))]
        negatives = [scores[j] for j in range(len(user))
                     if j != i and valid[j] and not np.array_equal(ids[j], ids[i])]
        all_scores = np.array([scores[i]] + negatives, np.float64)
        losses.append(np.log(np.sum(np.exp(all_scores - all_scores.max()))) + all_scores.max() - scores[i])
    return float(np.mean(losses)) if losses else 0.0


@pytest.mark.parametrize("ids_shape", ["ids_1d", "hashes_2d"])
def test_retrieval_loss_matches_numpy_reference(ids_shape):
    r = np.random.default_rng(1)
    R = 9
    user = r.standard_normal((R, D)).astype(np.float32)
    user /= np.linalg.norm(user, axis=1, keepdims=True)
    positive = r.standard_normal((R, D)).astype(np.float32)
    positive /= np.linalg.norm(positive, axis=1, keepdims=True)
    ids = np.array([4, 8, 4, 1, 9, 8, 8, 2, 5])  # accidental hits among rows {0, 2} and {1, 5, 6}
    if ids_shape == "hashes_2d":
        # Rows 7 and 8 share their first hash but not their second: different items.
        ids = np.stack([ids, ids * 10], axis=1)
        ids[8] = [2, 99]
    log_q = np.log(r.uniform(0.01, 0.5, R)).astype(np.float32)
    valid = np.array([1, 1, 1, 1, 0, 1, 1, 1, 1], bool)
    temperature = 0.1
    got = training.retrieval_loss(user, positive, temperature, ids, log_q=log_q, valid=valid)
    expected = numpy_retrieval_loss(user, positive, temperature, ids, log_q, valid)
    # float32 logits up to |1/0.1 + log 100| ~ 15: relative error ~1e-6.
    np.testing.assert_allclose(float(got), expected, rtol=1e-5)
    without_masking = numpy_retrieval_loss(user, positive, temperature, np.arange(R), log_q, valid)
    assert abs(without_masking - expected) > 1e-3  # the hits do matter in this example


def test_retrieval_accuracy_counts_rows_whose_positive_wins():
    user = np.eye(3, dtype=np.float32)
    # Scores user i . positive j: row 0 [1, 0.6, 0] and row 2 [0, 0, 0.44] rank their positive
    # first; row 1 [0, 0.8, 0.9] prefers row 2's item, a miss.
    positive = np.array([[1, 0, 0], [0.6, 0.8, 0], [0, 0.9, math.sqrt(1 - 0.81)]], np.float32)
    terms = training.retrieval_loss_terms(user, positive, 1.0, np.arange(3))
    np.testing.assert_allclose(float(terms.accuracy), 2 / 3, rtol=1e-6)
    # A tie counts as a miss: row 1's positive scoring exactly as row 2's item.
    positive[2] = [0, 0.8, 0.6]
    np.testing.assert_allclose(float(training.retrieval_loss_terms(user, positive, 1.0, np.arange(3)).accuracy),
                               2 / 3, rtol=1e-6)
    assert float(terms.num_valid) == 3


# --------------------------------------------------------------------------- optimiser


@pytest.mark.parametrize("decay_steps, step, expected", [
    (12, 0, 0.25), (12, 1, 0.5), (12, 3, 1.0),  # warmup over 4 steps: (step + 1) / 4
    (12, 4, 1.0),  # cosine starts at its peak
    (12, 8, 0.1 + 0.9 * 0.5),  # half way through the decay: floor + (1 - floor) * (1 + cos(pi/2)) / 2
    (12, 12, 0.1), (12, 1000, 0.1),  # floor reached and kept
    (None, 1, 0.5), (None, 1000, 1.0),  # constant after warmup
], ids=["w0", "w1", "w3", "peak", "half", "end", "after", "const_w1", "const"])
def test_learning_rate_schedule_golden(decay_steps, step, expected):
    config = training.OptimizerConfig(learning_rate=1.0, warmup_steps=4, decay_steps=decay_steps,
                                      final_learning_rate_fraction=0.1)
    np.testing.assert_allclose(float(training.learning_rate_schedule(config)(step)), expected, rtol=1e-6)


def toy_params():
    return {"hash_embeddings": {"post_table": jnp.ones((3, 2))},
            "phoenix_model": {"proj_mat_1": jnp.ones((2, 2))},
            "phoenix_model/rms_norm": {"scale": jnp.ones((2,))}}


def test_weight_decay_hits_matrices_only():
    # Zero gradients isolate AdamW's decoupled decay: p <- p - lr * wd * p for decayed parameters.
    config = training.OptimizerConfig(learning_rate=0.1, warmup_steps=0, weight_decay=0.5)
    optimizer = training.make_optimizer(config)
    params = toy_params()
    updates, _ = optimizer.update(jax.tree.map(jnp.zeros_like, params), optimizer.init(params), params)
    np.testing.assert_allclose(np.asarray(updates["phoenix_model"]["proj_mat_1"]), -0.05 * np.ones((2, 2)), rtol=1e-6)
    assert not np.any(np.asarray(updates["hash_embeddings"]["post_table"]))
    assert not np.any(np.asarray(updates["phoenix_model/rms_norm"]["scale"]))


def test_gradient_clipping_caps_global_norm():
    # Adam's first moment after one step is (1 - b1) * (clipped gradient), so its global norm reads
    # the clipped gradient's norm: 0.1 * 1.0 with clipping at 1, 0.1 * 10 * sqrt(12) without.
    params = toy_params()  # 12 entries
    grads = jax.tree.map(lambda p: 10.0 * jnp.ones_like(p), params)
    for clip, expected_norm in [(1.0, 0.1), (None, 0.1 * 10 * math.sqrt(12))]:
        optimizer = training.make_optimizer(training.OptimizerConfig(clip_global_norm=clip))
        _, state = optimizer.update(grads, optimizer.init(params), params)
        adam_state = [s for s in jax.tree.leaves(state, is_leaf=lambda x: hasattr(x, "mu")) if hasattr(s, "mu")]
        assert len(adam_state) == 1
        np.testing.assert_allclose(float(optax.tree.norm(adam_state[0].mu)), expected_norm, rtol=1e-5)


def test_rowwise_adagrad_golden():
    # lr 0.1. Row 0: grad [3, 4], acc = (9 + 16) / 2 = 12.5, update -0.1 * [3, 4] / sqrt(12.5).
    # Row 1: zero grad, acc stays 0, update exactly 0. Row 2: grad [1, 1], acc 1, update -0.1.
    # Second identical step: row 0 acc 25 -> -0.1 * [3, 4] / 5 = [-0.06, -0.08]; row 2 acc 2.
    optimizer = training.rowwise_adagrad(0.1)
    table = jnp.asarray([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]])
    grad = jnp.asarray([[3.0, 4.0], [0.0, 0.0], [1.0, 1.0]])
    state = optimizer.init(table)
    first, state = optimizer.update(grad, state)
    second, state = optimizer.update(grad, state)
    np.testing.assert_allclose(np.asarray(first), [[-0.3 / math.sqrt(12.5), -0.4 / math.sqrt(12.5)], [0, 0],
                                                   [-0.1, -0.1]], rtol=1e-6)
    np.testing.assert_allclose(np.asarray(second), [[-0.06, -0.08], [0, 0], [-0.1 / math.sqrt(2)] * 2], rtol=1e-6)
    assert np.all(np.asarray(first)[1] == 0) and np.all(np.asarray(second)[1] == 0)


def test_rowwise_adagrad_tables_in_full_optimizer():
    config = training.OptimizerConfig(learning_rate=0.1, warmup_steps=0, table_optimizer="rowwise_adagrad",
                                      table_learning_rate=0.5, clip_global_norm=None)
    optimizer = training.make_optimizer(config)
    params = toy_params()
    grads = jax.tree.map(jnp.ones_like, params)
    grads["hash_embeddings"]["post_table"] = jnp.asarray([[2.0, 2.0], [0.0, 0.0], [1.0, -1.0]])
    updates, _ = optimizer.update(grads, optimizer.init(params), params)
    np.testing.assert_allclose(np.asarray(updates["hash_embeddings"]["post_table"]),
                               [[-0.5, -0.5], [0, 0], [-0.5, 0.5]], rtol=1e-6)  # -0.5 * g / rms(g)
    # Adam's first step is -lr * sign(g) (bias-corrected m / sqrt(v) = 1), plus decay 0.1*0.01*p.
    np.testing.assert_allclose(np.asarray(updates["phoenix_model"]["proj_mat_1"]), -0.1 - 0.001, rtol=1e-4)


# --------------------------------------------------------------------------- sparse table updates


def test_compact_table_lookups_look_up_the_same_rows():
    batch = random_batch(0)
    batch.candidate_post_hashes[0, 0] = 0  # a padded candidate
    compact, rows = training.compact_table_lookups(batch)
    r = np.random.default_rng(0)
    for table, fields in training.TABLE_FIELDS.items():
        size = getattr(HASHES, training.TABLE_SIZE_FIELDS[table])
        values = r.standard_normal((size, 2))
        index = np.asarray(rows[table])
        used = np.concatenate([np.ravel(getattr(batch, f)) for f in fields])
        assert index[0] == 0 and index.shape == (1 + used.size,)
        distinct = np.unique(used[used != 0])
        np.testing.assert_array_equal(index[1:1 + distinct.size], distinct)  # then 0 fill
        assert not np.any(index[1 + distinct.size:])
        for field in fields:
            original, renumbered = getattr(batch, field), np.asarray(getattr(compact, field))
            np.testing.assert_array_equal(values[index][renumbered], values[original])
            np.testing.assert_array_equal(renumbered == 0, original == 0)  # padding stays padding


def dense_table_steps(config, table, grads_per_step):
    optimizer = training.make_optimizer(config)
    params = {"hash_embeddings": {"post_table": jnp.asarray(table)}}
    state = optimizer.init(params)
    for grad in grads_per_step:
        updates, state = optimizer.update({"hash_embeddings": {"post_table": jnp.asarray(grad)}}, state, params)
        params = optax.apply_updates(params, updates)
    return np.asarray(params["hash_embeddings"]["post_table"])


def sparse_table_steps(config, table, rows_per_step, grads_per_step):
    tables = {"hash_embeddings": {"post_table": jnp.asarray(table)}}
    state = training.table_optimizer_init(config, tables)
    for step, (rows, grad) in enumerate(zip(rows_per_step, grads_per_step, strict=True)):
        rows = np.asarray(rows)
        tables, state = training.sparse_table_update(
            config, tables, state, {"post_table": jnp.asarray(rows)},
            {"hash_embeddings": {"post_table": jnp.asarray(grad[rows])}}, step)
    return np.asarray(tables["hash_embeddings"]["post_table"]), state


@pytest.mark.parametrize("table_optimizer, rows_per_step", [
    ("adamw", [[0, 1, 4, 6, 0], [0, 1, 4, 6, 0]]),  # lazy = dense Adam when the same rows recur
    ("rowwise_adagrad", [[0, 1, 4, 6, 0], [0, 2, 4, 0, 0], [0, 5, 0, 0, 0]]),  # equal for any rows
], ids=["lazy_adamw", "rowwise_adagrad"])
def test_sparse_table_update_matches_dense_optax(table_optimizer, rows_per_step):
    config = training.OptimizerConfig(learning_rate=0.1, warmup_steps=2, table_optimizer=table_optimizer,
                                      clip_global_norm=None)
    r = np.random.default_rng(0)
    table = r.standard_normal((8, 3)).astype(np.float32)
    grads = []
    for rows in rows_per_step:
        grad = np.zeros_like(table)
        real = [i for i in rows if i]
        grad[real] = r.standard_normal((len(real), 3))
        grads.append(grad)
    dense = dense_table_steps(config, table, grads)
    sparse, _ = sparse_table_steps(config, table, rows_per_step, grads)
    # Same arithmetic on the same values; XLA may fuse differently: float32 rounding only.
    np.testing.assert_allclose(sparse, dense, rtol=1e-6, atol=1e-7)
    untouched = sorted(set(range(8)) - {i for rows in rows_per_step for i in rows})
    np.testing.assert_array_equal(sparse[untouched], table[untouched])


def test_lazy_adam_leaves_rows_outside_the_batch_alone():
    # Row 3 gets a gradient at step 0 only. Dense Adam keeps moving it at step 1 on its stale
    # momentum; the lazy update leaves row and moments as step 0 left them.
    config = training.OptimizerConfig(learning_rate=0.1, warmup_steps=0, clip_global_norm=None)
    table = np.ones((5, 2), np.float32)
    grads = [np.zeros_like(table), np.zeros_like(table)]
    grads[0][3] = [1.0, -1.0]
    grads[1][1] = [2.0, 2.0]
    after_one, _ = sparse_table_steps(config, table, [[0, 3, 0]], grads[:1])
    after_two, state = sparse_table_steps(config, table, [[0, 3, 0], [0, 1, 0]], grads)
    np.testing.assert_array_equal(after_two[3], after_one[3])
    np.testing.assert_allclose(after_two[3], [0.9, 1.1], rtol=1e-6)  # Adam's first step: -lr * sign(g)
    np.testing.assert_allclose(np.asarray(state.mu["hash_embeddings"]["post_table"])[3], [0.1, -0.1], rtol=1e-6)
    dense = dense_table_steps(config, table, grads)
    assert np.all(np.abs(dense[3] - after_one[3]) > 1e-3)


# --------------------------------------------------------------------------- trainers


@pytest.fixture(scope="module")
def ranking():
    config = PhoenixModelConfig(model=TRANSFORMER, emb_size=D, num_actions=A, history_seq_len=S,
                                candidate_seq_len=C, hash_config=HASHES)
    return training.make_ranking_trainer(config, optimizer_config=OPTIMIZER)


@pytest.fixture(scope="module")
def retrieval():
    config = PhoenixRetrievalModelConfig(model=TRANSFORMER, emb_size=D, history_seq_len=S, candidate_seq_len=C,
                                         hash_config=HASHES)
    return training.make_retrieval_trainer(config, optimizer_config=OPTIMIZER)


def run_steps(trainer, seed: int, batches, num_steps: int):
    state = trainer.init(jax.random.PRNGKey(seed), batches[0][0])
    for i in range(num_steps):
        state, _ = trainer.step(state, *batches[i % len(batches)])
    return state


def test_ranking_trainer_trains_tables_and_model(ranking):
    batch, labels = random_batch(0), random_labels(0)
    state = ranking.init(jax.random.PRNGKey(0), batch)
    assert set(state.params["hash_embeddings"]) == {"user_table", "post_table", "author_table"}
    assert state.params["hash_embeddings"]["post_table"].shape == (HASHES.post_table_size, D)
    assert "phoenix_model" in state.params and "transformer/decoder_layer_0/linear" in state.params
    before = jax.tree.map(np.array, state.params)
    start = float(ranking.evaluate(state.params, batch, labels)["loss"])
    for _ in range(40):
        state, _ = ranking.step(state, batch, labels)
    end = float(ranking.evaluate(state.params, batch, labels)["loss"])
    # Overfitting one batch: observed 0.53 -> ~0.02 in 40 steps; demand a 5x drop.
    assert end < start / 5, (start, end)
    assert int(state.step) == 40
    # Both the rows this batch uses and the model moved; rows it never uses did not.
    post_rows = np.unique(np.concatenate([batch.history_post_hashes.ravel(), batch.candidate_post_hashes.ravel()]))
    table_before = before["hash_embeddings"]["post_table"]
    table_after = np.asarray(state.params["hash_embeddings"]["post_table"])
    assert np.all(np.any(table_before[post_rows[post_rows != 0]] != table_after[post_rows[post_rows != 0]], axis=1))
    unused = np.setdiff1d(np.arange(HASHES.post_table_size), post_rows)
    np.testing.assert_array_equal(table_before[unused], table_after[unused])
    assert np.any(before["phoenix_model"]["unembeddings"] != np.asarray(state.params["phoenix_model"]["unembeddings"]))
    logits = ranking.predict(state.params, batch)
    assert logits.shape == (B, C, A) and logits.dtype == jnp.float32


def test_ranking_trainer_listwise_weight_adds_the_listwise_term(ranking):
    config = ranking.model_config
    listwise = training.make_ranking_trainer(config, optimizer_config=OPTIMIZER, listwise_weight=0.5,
                                             listwise_action="click_score")
    batch, labels = random_batch(1), random_labels(1)
    params = ranking.init(jax.random.PRNGKey(0), batch).params
    a = training.ACTIONS.index("click_score")
    mask = np.asarray(batch.candidate_post_hashes[:, :, 0] != 0)

    @jax.jit  # one compiled program instead of three eager passes over the model
    def outputs_and_losses(params, batch, labels):
        logits = ranking._outputs(params, None, batch).astype(jnp.float32)  # as _loss computes them
        return logits, ranking._loss(params, None, batch, labels, None)[0], listwise._loss(params, None, batch, labels,
                                                                                           None)[0]

    logits, pointwise, combined = outputs_and_losses(params, batch, labels)
    expected = float(pointwise) + 0.5 * listwise_reference(np.asarray(logits)[:, :, a], labels[:, :, a], mask)
    assert float(combined) == pytest.approx(expected, rel=1e-5)
    with pytest.raises(ValueError, match="listwise_weight"):
        training.make_ranking_trainer(config, listwise_weight=-1.0)
    with pytest.raises(ValueError, match="listwise_action.*'nope'"):
        training.make_ranking_trainer(config, listwise_action="nope")


def test_ranking_trainer_is_deterministic(ranking):
    batches = [(random_batch(i), random_labels(i)) for i in range(3)]
    first = leaves(run_steps(ranking, 7, batches, 4).params)
    second = leaves(run_steps(ranking, 7, batches, 4).params)
    other_seed = leaves(run_steps(ranking, 8, batches, 4).params)
    for a, b in zip(first, second, strict=True):
        np.testing.assert_array_equal(a, b)
    assert any(np.any(a != c) for a, c in zip(first, other_seed, strict=True))


def test_ranking_step_compiles_once_for_new_data(ranking):
    state = ranking.init(jax.random.PRNGKey(0), random_batch(0))
    state, _ = ranking.step(state, random_batch(1), random_labels(1))
    traces = ranking.trace_counts["step"]
    assert traces >= 1
    for seed in range(2, 6):
        state, _ = ranking.step(state, random_batch(seed), random_labels(seed))
    assert ranking.trace_counts["step"] == traces


def test_metrics_accumulate_on_device_until_popped(ranking):
    batch, labels = random_batch(3), random_labels(3)
    state = ranking.init(jax.random.PRNGKey(1), batch)
    losses, per_action = [], []
    for _ in range(3):
        state, metrics = ranking.step(state, batch, labels)
        losses.append(float(metrics["loss"]))
        per_action.append(np.asarray(metrics["per_action_loss"]))
    state, means = ranking.pop_metrics(state)
    assert means["steps"] == 3
    np.testing.assert_allclose(means["loss"], np.mean(losses), rtol=1e-6)
    np.testing.assert_allclose(means["per_action_loss"], np.mean(per_action, axis=0), rtol=1e-6)
    np.testing.assert_allclose(means["learning_rate"], np.mean([ranking.learning_rate(i) for i in range(3)]),
                               rtol=1e-6)
    state, means = ranking.pop_metrics(state)
    assert means["steps"] == 0 and means["loss"] == 0.0


class TerminalStream(io.StringIO):
    """A StringIO that says it is a terminal, as sys.stderr does in an interactive shell."""

    def isatty(self) -> bool:
        return True


def fit_five_steps(ranking, stream):
    """5 steps, logs every 2, evals every 4 -> (final state, history, evaluated steps)."""
    batch, labels = random_batch(4), random_labels(4)
    state = ranking.init(jax.random.PRNGKey(2), batch)
    evals = []

    def eval_fn(s):
        evals.append(int(s.step))
        return ranking.evaluate(s.params, batch, labels)

    state, history = training.fit(ranking, state, iter([(batch, labels)] * 5), num_steps=5, log_every=2,
                                  eval_fn=eval_fn, eval_every=4, stream=stream)
    return state, history, evals


REPORT = r"step {}/5  loss \d+\.\d{{4}}  (\d+\.\d\d|nan) steps/s  ETA (\dm\d\ds|\?)"
EVAL = r"eval at step {}: loss \d+\.\d{{4}}  per_action_loss \d+\.\d{{4}}"


@pytest.mark.parametrize("tty", [True, False], ids=["terminal", "file"])
def test_fit_logs_progress_and_history(ranking, tty):
    stream = TerminalStream() if tty else io.StringIO()
    state, history, evals = fit_five_steps(ranking, stream)
    text = stream.getvalue()
    first = r"first step \(trace \+ compile \+ run\): \d+\.\d\d s\n"
    if tty:
        # A tqdm bar advanced at each report (2, 4, 5 of 5) with the loss; eval lines printed above
        # it on lines of their own; the bar ends with its final state.
        bar = r"\r *\d+%\|[^|]*\| {}/5 \[[^\]]*\]"
        with_loss = r"\r *\d+%\|[^|]*\| {}/5 \[[^\]]*, loss \d+\.\d{{4}}\]"
        pattern = (first + bar.format(1) + with_loss.format(2) + with_loss.format(4) + r"\r *\r"
                   + EVAL.format(4) + r"\n" + with_loss.format(4) + with_loss.format(5) + r" *\n" + EVAL.format(5) + r"\n")
    else:
        # A log file gets one plain line per report and no carriage returns.
        assert "\r" not in text
        pattern = first + "".join(line + r"\n" for line in (REPORT.format(2), REPORT.format(4), EVAL.format(4),
                                                             REPORT.format(5), EVAL.format(5)))
    assert re.fullmatch(pattern, text), repr(text)
    logs = [h for h in history if "loss" in h]
    assert [h["step"] for h in logs] == [2, 4, 5] and [h["steps"] for h in logs] == [2, 2, 1]
    assert evals == [4, 5] and int(state.step) == 5


def test_fit_reports_an_exhausted_iterator_on_its_own_line(ranking):
    batch, labels = random_batch(4), random_labels(4)
    state = ranking.init(jax.random.PRNGKey(2), batch)
    stream = TerminalStream()
    state, history = training.fit(ranking, state, iter([(batch, labels)] * 3), num_steps=5, log_every=2,
                                  stream=stream)
    text = stream.getvalue()
    # On a line of its own above the bar (tqdm clears the bar's line first), then the bar's last state.
    assert re.search(r"(\n|\r *\r)batch iterator exhausted after 3 of 5 steps\n", text), repr(text)
    assert re.search(r"\| 3/5 \[[^\]]*, loss \d+\.\d{4}\]\s*$", text), repr(text)
    assert [h["step"] for h in history] == [2, 3] and int(state.step) == 3


def test_fit_calls_on_log_with_each_history_entry_as_it_is_made(ranking):
    batch, labels = random_batch(6), random_labels(6)
    state = ranking.init(jax.random.PRNGKey(3), batch)
    seen = []

    def on_log(entry):
        seen.append((entry["step"], len(seen)))  # the entry arrives before the next one is made

    _, history = training.fit(ranking, state, iter([(batch, labels)] * 5), num_steps=5, log_every=2,
                              eval_fn=lambda s: {"loss": 0.0}, eval_every=4, stream=io.StringIO(), on_log=on_log)
    assert [step for step, _ in seen] == [h["step"] for h in history] == [2, 4, 4, 5, 5]
    with pytest.raises(TypeError, match="on_log: expected a callable"):
        training.fit(ranking, state, iter([]), num_steps=1, stream=io.StringIO(), on_log="metrics.jsonl")


def test_trainer_checkpoint_resumes_bit_identically(ranking, tmp_path):
    batch, labels = random_batch(5), random_labels(5)
    state = run_steps(ranking, 3, [(batch, labels)], 2)
    ranking.save(tmp_path / "ckpt", state)
    restored = ranking.restore(tmp_path / "ckpt", batch)
    assert int(restored.step) == 2
    saved = checkpoint.load_checkpoint(tmp_path / "ckpt", decode_config=configs.config_from_dict)
    assert saved.config == {"model": ranking.model_config, "hash_config": HASHES, "optimizer": OPTIMIZER}
    for a, b in zip(leaves((state.params, state.opt_state, state.rng)),
                    leaves((restored.params, restored.opt_state, restored.rng)), strict=True):
        np.testing.assert_array_equal(a, b)
    continued, _ = ranking.step(state, batch, labels)
    resumed, _ = ranking.step(restored, batch, labels)
    for a, b in zip(leaves(continued.params), leaves(resumed.params), strict=True):
        np.testing.assert_array_equal(a, b)


def test_retrieval_trainer_overfits_one_batch(retrieval):
    batch = random_batch(10, batch_size=8, num_candidates=1)
    # Row 7 is a padded user; rows 1 and 4 share their positive item (an accidental hit).
    batch.user_hashes[7] = 0
    batch.candidate_post_hashes[4] = batch.candidate_post_hashes[1]
    state = retrieval.init(jax.random.PRNGKey(0), batch)
    start = retrieval.evaluate(state.params, batch)
    for _ in range(30):
        state, metrics = retrieval.step(state, batch)
    end = retrieval.evaluate(state.params, batch)
    # Initial loss ~log(6) (6 distinct other items per row); observed < 0.01 after 30 steps.
    assert float(end["loss"]) < float(start["loss"]) / 10, (start, end)
    assert float(end["accuracy"]) == 1.0
    user, candidates, mask = retrieval.predict(state.params, batch)
    assert user.shape == (8, D) and candidates.shape == (8, 1, D) and mask.shape == (8, 1)
    np.testing.assert_allclose(np.linalg.norm(np.asarray(user)[:7], axis=-1), 1.0, rtol=1e-5)
    assert retrieval.trace_counts["step"] == 1


def test_optimizer_config_round_trips_through_checkpoint_json():
    config = training.OptimizerConfig(decay_steps=1000, table_optimizer="rowwise_adagrad", clip_global_norm=None)
    text = configs.config_to_json(config)
    assert configs.config_from_json(text, extra_types=(training.OptimizerConfig,)) == config


def test_sparse_and_dense_table_updates_train_identically(ranking):
    # On a fixed batch every used row gets a gradient at every step and unused rows none, so lazy
    # Adam equals dense Adam; the two paths differ only in float32 rounding of the summation.
    config = PhoenixModelConfig(model=TRANSFORMER, emb_size=D, num_actions=A, history_seq_len=S,
                                candidate_seq_len=C, hash_config=HASHES)
    dense_trainer = training.make_ranking_trainer(
        config, optimizer_config=training.OptimizerConfig(learning_rate=1e-2, warmup_steps=5,
                                                          sparse_table_updates=False))
    assert ranking.sparse and not dense_trainer.sparse
    batch, labels = random_batch(6), random_labels(6)
    sparse_state = ranking.init(jax.random.PRNGKey(0), batch)
    # The dense trainer's state from the same parameters (saves compiling its init).
    # Copies, since each step donates (deletes) the buffers of the state it is given.
    dense_state = jax.tree.map(jnp.copy, sparse_state)
    dense_state = dense_state._replace(opt_state=dense_trainer.optimizer.init(dense_state.params))
    for _ in range(3):
        sparse_state, _ = ranking.step(sparse_state, batch, labels)
        dense_state, _ = dense_trainer.step(dense_state, batch, labels)
    for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(sparse_state.params)[0],
                            jax.tree.leaves(dense_state.params), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-5, atol=2e-6,
                                   err_msg=jax.tree_util.keystr(path))
