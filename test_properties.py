"""Property-based tests (hypothesis) of the models' invariants.

Shapes stay fixed so each jitted function compiles once; hypothesis varies the values: which
candidates or history positions change or are padded, and by how much. Tolerances are float32
round-off of a two-layer pass (1e-5).
"""

import haiku as hk
import jax
import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

import numpy_reference as ref
import phoenix_training as training
from conftest import A, D, random_release_params, tiny_ranker_config, tiny_retrieval_config
from recsys_model import RecsysEmbeddings
from recsys_retrieval_model import INF, retrieve_top_k
from runners import create_example_batch

B, S_, C_ = 2, 5, 5
CFG = tiny_ranker_config()
PARAMS = random_release_params(CFG, "phoenix_model", seed=11)
RANK = jax.jit(hk.transform(lambda b, e, **kw: CFG.make()(b, e, **kw)).apply, static_argnames="isolated")
RCFG = tiny_retrieval_config()
RPARAMS = random_release_params(RCFG, "phoenix_retrieval_model", retrieval=True, seed=12)
USER = jax.jit(hk.transform(lambda b, e: RCFG.make().build_user_representation(b, e)).apply)
TOPK = jax.jit(retrieve_top_k, static_argnums=2)
MATMUL = jax.jit(lambda u, c: u @ c.T)
SETTINGS = settings(max_examples=15, deadline=None)


def logits(batch, emb, path="masked"):
    return np.asarray(RANK(PARAMS, None, batch, emb, isolated=path == "isolated").logits)


def with_candidates(batch, emb, post_emb, post_hashes):
    return (batch._replace(candidate_post_hashes=post_hashes),
            RecsysEmbeddings(emb.user_embeddings, emb.history_post_embeddings, post_emb,
                             emb.history_author_embeddings, emb.candidate_author_embeddings))


@SETTINGS
@given(seed=st.integers(0, 2**16), keep=st.integers(0, C_ - 1), scale=st.floats(0.1, 10.0),
       pad_others=st.lists(st.booleans(), min_size=C_, max_size=C_), path=st.sampled_from(["masked", "isolated"]))
def test_candidate_isolation_property(seed, keep, scale, pad_others, path):
    """Candidate `keep` scores the same whatever the other candidates are, and whether they are padded."""
    batch, emb = create_example_batch(B, D, S_, C_, A, seed=seed)
    base = logits(batch, emb, path)[:, keep]
    rng = np.random.default_rng(seed + 1)
    post_emb = np.array(emb.candidate_post_embeddings)
    others = np.arange(C_) != keep
    post_emb[:, others] = scale * rng.standard_normal(post_emb[:, others].shape)
    hashes = np.array(batch.candidate_post_hashes)
    pad = np.array(pad_others) & others
    hashes[:, pad] = 0
    changed = logits(*with_candidates(batch, emb, post_emb, hashes), path)[:, keep]
    np.testing.assert_allclose(changed, base, rtol=1e-5, atol=1e-5)


@SETTINGS
@given(seed=st.integers(0, 2**16), fill=st.floats(-100.0, 100.0))
def test_padding_invariance_property(seed, fill):
    """Whatever sits at padded history positions (embeddings, actions), nothing changes."""
    batch, emb = create_example_batch(B, D, S_, C_, A, seed=seed)
    valid = np.asarray(batch.history_post_hashes[:, :, 0] != 0)
    hpe = np.where(valid[:, :, None, None], emb.history_post_embeddings, fill).astype(np.float32)
    acts = np.where(valid[:, :, None], batch.history_actions, 1.0).astype(np.float32)
    emb2 = RecsysEmbeddings(emb.user_embeddings, hpe, emb.candidate_post_embeddings, emb.history_author_embeddings,
                            emb.candidate_author_embeddings)
    batch2 = batch._replace(history_actions=acts)
    np.testing.assert_allclose(logits(batch2, emb2), logits(batch, emb), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(USER(RPARAMS, None, batch2, emb2)[0], USER(RPARAMS, None, batch, emb)[0],
                               rtol=1e-5, atol=1e-5)


@SETTINGS
@given(seed=st.integers(0, 2**16), n=st.integers(1, 40), k_frac=st.floats(0.0, 1.0),
       mask_p=st.sampled_from([None, 0.0, 0.3, 0.9, 1.0]), ties=st.booleans())
def test_top_k_equals_brute_force_property(seed, n, k_frac, mask_p, ties):
    rng = np.random.default_rng(seed)
    users = rng.standard_normal((3, 8)).astype(np.float32)
    corpus = rng.standard_normal((n, 8)).astype(np.float32)
    if ties:  # duplicated rows give exactly tied scores: lower index must come first
        corpus[n // 2:] = corpus[: n - n // 2]
    k = max(1, int(round(k_frac * n)))
    mask = None if mask_p is None else rng.random(n) >= mask_p
    idx, scores = TOPK(users, corpus, k, mask)
    # brute force over the same float32 products XLA computes, so exact ties stay ties
    s = np.asarray(MATMUL(users, corpus))
    if mask is not None:
        s = np.where(mask[None], s, -INF)
    want_idx, want_scores = ref.top_k(s, k)
    np.testing.assert_array_equal(np.asarray(idx), want_idx)
    np.testing.assert_allclose(np.asarray(scores), want_scores, rtol=1e-6, atol=1e-6)


RANK_LOSS = jax.jit(lambda lg, lb, cm, lm: training.ranking_loss(lg, lb, cm, lm))
RETR_LOSS = jax.jit(lambda u, p, ids, lq, v: training.retrieval_loss(u, p, 0.1, ids, lq, v))


@SETTINGS
@given(seed=st.integers(0, 2**16), scale=st.floats(0.01, 50.0), mask_p=st.floats(0.0, 1.0))
def test_ranking_loss_non_negative_and_blind_to_masked_labels(seed, scale, mask_p):
    rng = np.random.default_rng(seed)
    logits = (scale * rng.standard_normal((3, 4, 5))).astype(np.float32)
    labels = (rng.random((3, 4, 5)) < 0.4).astype(np.float32)
    cand_mask = rng.random((3, 4)) >= mask_p
    label_mask = rng.random((3, 4, 5)) >= mask_p / 2
    loss = float(RANK_LOSS(logits, labels, cand_mask, label_mask))
    assert loss >= 0.0 and np.isfinite(loss)
    keep = cand_mask[:, :, None] & label_mask
    changed_logits = np.where(keep, logits, -logits * 7 + 3).astype(np.float32)
    changed_labels = np.where(keep, labels, 1 - labels).astype(np.float32)
    np.testing.assert_allclose(float(RANK_LOSS(changed_logits, changed_labels, cand_mask, label_mask)), loss,
                               rtol=1e-5, atol=1e-6)


@SETTINGS
@given(seed=st.integers(0, 2**16), rows=st.integers(1, 6), dup=st.booleans())
def test_retrieval_loss_non_negative_and_blind_to_invalid_rows(seed, rows, dup):
    rng = np.random.default_rng(seed)
    user = rng.standard_normal((6, 8)).astype(np.float32)
    pos = rng.standard_normal((6, 8)).astype(np.float32)
    ids = np.arange(6, dtype=np.int32) % (3 if dup else 6)  # duplicates are accidental hits
    log_q = np.log(rng.uniform(0.01, 1.0, 6)).astype(np.float32)
    valid = np.arange(6) < rows
    loss = float(RETR_LOSS(user, pos, ids, log_q, valid))
    assert loss >= -1e-6 and np.isfinite(loss)
    # invalid rows' own vectors change nothing: they are neither a query nor anyone's negative
    user2, pos2 = user.copy(), pos.copy()
    user2[~valid] *= -5
    pos2[~valid] = rng.standard_normal(pos2[~valid].shape)
    np.testing.assert_allclose(float(RETR_LOSS(user2, pos2, ids, log_q, valid)), loss, rtol=1e-5, atol=1e-6)


RANK_LOSS_WEIGHTED = jax.jit(training.ranking_loss)


@SETTINGS
@given(seed=st.integers(0, 2**16), soft=st.booleans(), int_masks=st.booleans(), zero_weight=st.booleans())
def test_ranking_loss_value_checks_accept_every_valid_input(seed, soft, int_masks, zero_weight):
    """The host value checks (labels in [0, 1], 0/1 masks, weights >= 0) reject nothing valid:
    soft or hard labels including the bounds 0 and 1, bool or 0/1 int masks, a zero action weight.
    Eager calls run the checks, jitted calls skip them (traced values); both give the same loss."""
    rng = np.random.default_rng(seed)
    logits = rng.standard_normal((3, 4, 5)).astype(np.float32)
    labels = rng.random((3, 4, 5)) if soft else (rng.random((3, 4, 5)) < 0.4)
    labels = np.where(rng.random((3, 4, 5)) < 0.2, rng.integers(0, 2, (3, 4, 5)), labels).astype(np.float32)
    cand_mask, label_mask = rng.random((3, 4)) < 0.8, rng.random((3, 4, 5)) < 0.8
    if int_masks:
        cand_mask, label_mask = cand_mask.astype(np.int32), label_mask.astype(np.float32)
    weights = rng.uniform(0.0, 3.0, 5).astype(np.float32)
    if zero_weight:
        weights[rng.integers(0, 5)] = 0.0
    eager = float(training.ranking_loss(logits, labels, cand_mask, label_mask, weights))
    jitted = float(RANK_LOSS_WEIGHTED(logits, labels, cand_mask, label_mask, weights))
    assert np.isfinite(eager) and eager >= 0.0
    np.testing.assert_allclose(eager, jitted, rtol=1e-6, atol=1e-7)
