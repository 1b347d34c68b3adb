"""Retrieval model: release parity, unit norms, top-k vs NumPy brute force, the guide's usage."""

import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import numpy_reference as ref
from conftest import A, C, D, S, random_release_params, release_layout, tiny_retrieval_config
from recsys_retrieval_model import INF, RetrievalOutput
from runners import create_example_batch, create_example_corpus

F32_TOL = dict(rtol=1e-4, atol=2e-5)


@pytest.fixture(scope="module")
def cfg():
    return tiny_retrieval_config()


@pytest.fixture(scope="module")
def params(cfg):
    return random_release_params(cfg, "phoenix_retrieval_model", retrieval=True)


def transformed(cfg, method=None):
    if method is None:
        return hk.transform(lambda *a, **kw: cfg.make()(*a, **kw))
    return hk.transform(lambda *a: getattr(cfg.make(), method)(*a))


def example(B=3, S_=S, C_=C, seed=0):
    return create_example_batch(B, D, S_, C_, A, seed=seed)


_JITTED = {}  # (config repr, method, jit options) -> jitted apply: equal configs share compiled programs


def jitted(cfg, method=None, **jit_kw):
    """One jitted apply per (config, method), reused across tests, so a shape compiles once."""
    key = (repr(cfg), method, tuple(sorted(jit_kw.items())))
    if key not in _JITTED:
        _JITTED[key] = jax.jit(transformed(cfg, method).apply, **jit_kw)
    return _JITTED[key]


def call(cfg, params, *args, **kw):
    """The model applied to the given inputs, traced abstractly (jax.eval_shape): the argument checks
    see the same concrete inputs as an eager call, and nothing is compiled or run."""
    return jax.eval_shape(lambda p: transformed(cfg).apply(p, None, *args, **kw), params)


def test_param_tree_is_release_layout(cfg):
    batch, emb = example()
    corpus, _ = create_example_corpus(20, D)

    def both(b, e, c):
        m = cfg.make()
        return m(b, e, c, 5), m.build_candidate_representation(b, e)

    # Shapes only: jax.eval_shape traces the same init without compiling or running it.
    p = jax.eval_shape(hk.transform(both).init, jax.random.PRNGKey(0), batch, emb, corpus)
    shapes = {m: {n: tuple(v.shape) for n, v in d.items()} for m, d in p.items()}
    assert shapes == release_layout(cfg, "phoenix_retrieval_model", retrieval=True)


@pytest.mark.parametrize("bidirectional", [False, True], ids=["causal", "bidirectional"])
def test_user_representation_matches_reference(bidirectional, params):
    cfg = tiny_retrieval_config(bidirectional_history=bidirectional)
    batch, emb = example()
    user, norm = jitted(cfg, "build_user_representation")(params, None, batch, emb)
    want_user, want_norm = ref.user_representation(params, batch, emb, cfg)
    np.testing.assert_allclose(user, want_user, **F32_TOL)
    np.testing.assert_allclose(norm, want_norm, rtol=1e-4)
    np.testing.assert_allclose(np.linalg.norm(user, axis=-1), 1.0, rtol=1e-5)


def test_candidate_representation_matches_reference_and_is_unit_norm(cfg, params):
    batch, emb = example()
    batch = batch._replace(candidate_post_hashes=np.where(np.arange(C)[None, :, None] == 2, 0,
                                                          batch.candidate_post_hashes))
    cand, mask = jitted(cfg, "build_candidate_representation")(params, None, batch, emb)
    assert cand.shape == (3, C, D) and mask.shape == (3, C)
    np.testing.assert_array_equal(mask, np.broadcast_to(np.arange(C)[None, :] != 2, (3, C)))
    np.testing.assert_allclose(cand, ref.candidate_representation(params, emb), **F32_TOL)
    np.testing.assert_allclose(np.linalg.norm(cand, axis=-1), 1.0, rtol=1e-5)


@pytest.mark.parametrize("use_mask", [False, True], ids=["no_mask", "corpus_mask"])
@pytest.mark.parametrize("k", [1, 10, 50], ids=["k1", "k10", "k_eq_N"])
def test_top_k_equals_numpy_brute_force(cfg, params, use_mask, k):
    batch, emb = example()
    corpus, _ = create_example_corpus(50, D)
    mask = np.random.default_rng(0).random(50) < 0.7 if use_mask else None
    out = jitted(cfg, static_argnums=5)(params, None, batch, emb, corpus, k, mask)
    assert isinstance(out, RetrievalOutput)
    scores = np.asarray(out.user_representation) @ corpus.T
    if use_mask:
        scores = np.where(mask[None], scores, -INF)
    idx, top = ref.top_k(scores, k)
    np.testing.assert_array_equal(out.top_k_indices, idx)
    np.testing.assert_allclose(out.top_k_scores, top, rtol=1e-6, atol=1e-6)
    if use_mask:
        n_valid = int(mask.sum())
        assert mask[np.asarray(out.top_k_indices)[:, : min(k, n_valid)]].all()  # valid entries come first


def test_guide_usage_scores_batch_candidates(cfg, params):
    """model(batch, embeddings) ranks the batch's own candidates, padded ones last, best first."""
    batch, emb = example(C_=6)
    post = np.array(batch.candidate_post_hashes)
    post[0, [0, 3]] = 0
    batch = batch._replace(candidate_post_hashes=post)
    apply = jitted(cfg, static_argnames="top_k")
    out = apply(params, None, batch, emb)
    assert out.top_k_indices.shape == (3, 6)  # top_k defaults to all candidates
    user = ref.user_representation(params, batch, emb, cfg)[0]
    cand = ref.candidate_representation(params, emb)
    scores = np.einsum("bd,bcd->bc", user, cand)
    scores = np.where(post[:, :, 0] != 0, scores, -INF)
    idx, top = ref.top_k(scores, 6)
    np.testing.assert_array_equal(out.top_k_indices, idx)
    np.testing.assert_allclose(out.top_k_scores, top, rtol=1e-4, atol=1e-5)
    assert set(np.asarray(out.top_k_indices)[0, -2:]) == {0, 3}
    assert np.all(np.diff(np.asarray(out.top_k_scores), axis=1) <= 0)
    assert apply(params, None, batch, emb, top_k=2).top_k_indices.shape == (3, 2)


@pytest.mark.parametrize("B,S_,C_", [(1, S, C), (2, 1, 1), (1, 1, C)], ids=["B1", "S1_C1", "B1_S1"])
def test_shape_edge_cases(cfg, params, B, S_, C_):
    batch, emb = example(B, S_, C_)
    out = jitted(cfg, static_argnames="top_k")(params, None, batch, emb)
    assert out.user_representation.shape == (B, D) and out.top_k_indices.shape == (B, C_)


def test_all_padding_history_and_user(cfg, params):
    batch, emb = example()
    batch = batch._replace(user_hashes=np.zeros_like(batch.user_hashes),
                           history_post_hashes=np.zeros_like(batch.history_post_hashes))
    user, norm = jitted(cfg, "build_user_representation")(params, None, batch, emb)
    # no valid position: the masked mean is 0, the EPS clamp keeps it finite (norm = sqrt(EPS))
    assert np.all(np.isfinite(user))
    np.testing.assert_allclose(norm, np.sqrt(1e-12), rtol=1e-3)


def test_padding_invariance(cfg, params):
    batch, emb = example()
    valid = np.asarray(batch.history_post_hashes[:, :, 0] != 0)
    hpe = np.where(valid[:, :, None, None], emb.history_post_embeddings, 50.0).astype(np.float32)
    emb2 = emb.__class__(emb.user_embeddings, hpe, emb.candidate_post_embeddings, emb.history_author_embeddings,
                         emb.candidate_author_embeddings)
    f = jitted(cfg, "build_user_representation")
    np.testing.assert_allclose(f(params, None, batch, emb2)[0], f(params, None, batch, emb)[0], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("top_k,match", [(51, "top_k: expected 1 <= top_k <= 50"), (0, "top_k"), (-3, "top_k")])
def test_top_k_out_of_range_is_a_clear_error(cfg, params, top_k, match):
    batch, emb = example()
    corpus, _ = create_example_corpus(50, D)
    with pytest.raises(ValueError, match=match):
        call(cfg, params, batch, emb, corpus, top_k)


def test_top_k_above_candidates_is_a_clear_error(cfg, params):
    batch, emb = example()
    with pytest.raises(ValueError, match=f"top_k: expected 1 <= top_k <= {C}"):
        call(cfg, params, batch, emb, top_k=C + 1)


def test_corpus_errors(cfg, params):
    batch, emb = example()
    corpus, _ = create_example_corpus(50, D)
    with pytest.raises(ValueError, match=r"corpus_embeddings: expected shape \[50, 16\]"):
        call(cfg, params, batch, emb, corpus[:, :8], 5)
    with pytest.raises(ValueError, match="corpus_mask"):
        call(cfg, params, batch, emb, corpus, 5, np.ones(49, bool))
    with pytest.raises(TypeError, match="corpus_mask: expected bool dtype"):
        call(cfg, params, batch, emb, corpus, 5, np.ones(50, np.int32))


def test_bf16_user_representation_close_to_f32(params):
    batch, emb = example()
    f32 = jitted(tiny_retrieval_config(), "build_user_representation")(params, None, batch, emb)[0]
    b16 = jitted(tiny_retrieval_config(fprop_dtype=jnp.bfloat16), "build_user_representation")(
        params, None, batch, emb)[0]
    assert np.max(np.abs(np.float32(b16) - np.asarray(f32))) < 0.05  # unit vectors, bf16 rounding compounded


def _cut_history(batch, emb, s):
    """The batch with history slots 0..s-1 only."""
    import dataclasses
    batch = batch._replace(**{f: getattr(batch, f)[:, :s] for f in batch._fields if f.startswith("history_")})
    emb = dataclasses.replace(emb, history_post_embeddings=emb.history_post_embeddings[:, :s],
                              history_author_embeddings=emb.history_author_embeddings[:, :s])
    return batch, emb


def test_user_sequence_pools_to_the_representation_and_is_causal(cfg, params):
    """build_user_sequence's masked mean, normalised, is build_user_representation; with causal
    attention its position p equals the last position of the batch cut to history slots 0..p-1."""
    batch, emb = example()
    sequence = jitted(cfg, "build_user_sequence")  # one jitted function, compiled per shape
    out, mask = sequence(params, None, batch, emb)  # [B, 1+S, D]
    assert out.shape == (3, 1 + S, D) and mask.shape == (3, 1 + S)
    user, _ = jitted(cfg, "build_user_representation")(params, None, batch, emb)
    m = np.asarray(mask, np.float32)[:, :, None]
    mean = (np.asarray(out, np.float32) * m).sum(1) / np.maximum(m.sum(1), 1.0)
    np.testing.assert_allclose(mean / np.linalg.norm(mean, axis=-1, keepdims=True), user, **F32_TOL)
    for p in (1, S // 2, S):
        cut_out, _ = sequence(params, None, *_cut_history(batch, emb, p))
        np.testing.assert_allclose(cut_out[:, -1], out[:, p], **F32_TOL)


# --------------------------------------------------------------------------- pooling


def _pooled(pooling, params, batch, emb):
    cfg = tiny_retrieval_config()
    cfg.pooling = pooling
    return jitted(cfg.initialize(), "build_user_representation")(params, None, batch, emb)


def test_last_pooling_is_the_last_valid_position_by_hand(params):
    """pooling="last": the normalised transformer output at each row's last valid position
    (histories of different lengths, one with a padded slot in the middle), not the mean."""
    batch, emb = example()
    post = np.array(batch.history_post_hashes)
    post[0, 5:] = 0  # row 0: history slots 0..4 valid, so position 5 (1 + slot 4) is the last
    post[2, S - 1] = post[1, S - 1]  # row 2: every slot valid
    post[1, S - 1] = 0
    post[1, 2] = 0  # row 1: a gap; the last valid slot is S - 2, position S - 1
    batch = batch._replace(history_post_hashes=post)
    out, mask = jitted(tiny_retrieval_config(), "build_user_sequence")(params, None, batch, emb)
    last = [5, S - 1, S]
    want = np.asarray(out)[np.arange(3), last]  # [B, D]
    want = want / np.linalg.norm(want, axis=-1, keepdims=True)
    user, norm = _pooled("last", params, batch, emb)
    np.testing.assert_allclose(user, want, **F32_TOL)
    np.testing.assert_allclose(norm[:, 0], np.linalg.norm(np.asarray(out)[np.arange(3), last], axis=-1), rtol=1e-4)
    assert not np.allclose(user, _pooled("mean", params, batch, emb)[0], atol=1e-3)


def test_last_pooling_of_all_padding_is_finite_zero(params):
    batch, emb = example()
    batch = batch._replace(user_hashes=np.zeros_like(batch.user_hashes),
                           history_post_hashes=np.zeros_like(batch.history_post_hashes))
    user, norm = _pooled("last", params, batch, emb)
    assert np.all(np.isfinite(user))
    np.testing.assert_allclose(norm, np.sqrt(1e-12), rtol=1e-3)  # as mean pooling: no valid position, 0


def _right_padded(batch, emb, extra: int):
    """The batch with `extra` more padded history slots on the right (their embeddings garbage)."""
    import dataclasses
    B = batch.user_hashes.shape[0]

    def pad(x, value=0):
        return np.concatenate([np.asarray(x), np.full((B, extra) + np.shape(x)[2:], value, np.asarray(x).dtype)], 1)

    batch = batch._replace(**{f: pad(getattr(batch, f)) for f in batch._fields if f.startswith("history_")})
    emb = dataclasses.replace(emb, history_post_embeddings=pad(emb.history_post_embeddings, 7.0),
                              history_author_embeddings=pad(emb.history_author_embeddings, -7.0))
    return batch, emb


@pytest.mark.parametrize("pooling", ["mean", "last"])
def test_pooling_is_invariant_to_right_padding(params, pooling):
    """More padded history slots (S -> S + 3, garbage embeddings there) leave the representation unchanged."""
    batch, emb = example()
    post = np.array(batch.history_post_hashes)
    post[0, 4:] = 0  # a short history too
    batch = batch._replace(history_post_hashes=post)
    np.testing.assert_allclose(_pooled(pooling, params, *_right_padded(batch, emb, 3))[0],
                               _pooled(pooling, params, batch, emb)[0], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("pooling", ["max", "", None, 1], ids=["max", "empty", "None", "int"])
def test_unknown_pooling_is_a_clear_error(pooling):
    cfg = tiny_retrieval_config()
    with pytest.raises(ValueError, match=r"PhoenixRetrievalModelConfig.pooling: expected one of \('mean', 'last'\)"):
        type(cfg)(model=cfg.model, emb_size=cfg.emb_size, pooling=pooling)
    cfg.pooling = pooling  # set after construction: refused by initialize(), before any tracing
    with pytest.raises(ValueError, match="pooling"):
        cfg.initialize()


def test_pooling_round_trips_through_the_checkpoint_config():
    """pooling is saved with the config; an older config without the field loads as "mean"."""
    import phoenix_configs as configs
    cfg = tiny_retrieval_config()
    cfg.pooling = "last"
    saved = configs.config_to_dict(cfg)
    assert configs.config_from_dict(saved).pooling == "last"
    old = {k: v for k, v in saved.items() if k != "pooling"}
    assert configs.config_from_dict(old).pooling == "mean"
    with pytest.raises(ValueError, match="pooling"):
        configs.config_from_dict({**saved, "pooling": "max"})
