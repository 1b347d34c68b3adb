"""Ranking model: release parity, candidate isolation, padding invariance, fast paths, trainable init."""

import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import numpy_reference as ref
from conftest import A, C, D, S, random_release_params, release_layout, tiny_ranker_config
from phoenix_forward import ModelForward
from recsys_model import PrefixCache, RecsysEmbeddings
from runners import create_example_batch

F32_TOL = dict(rtol=1e-4, atol=2e-5)  # float32 model vs float64 NumPy reference
PATH_TOL = dict(rtol=1e-5, atol=1e-5)  # float32 isolated/cached paths vs the masked path


def forward(cfg):
    return hk.transform(lambda b, e, **kw: cfg.make()(b, e, **kw))


_APPLY_FNS = {}  # id(cfg) -> (cfg, jitted apply): one jitted function per config, so repeated shapes do not retrace


def apply_fn(cfg):
    cached = _APPLY_FNS.get(id(cfg))
    if cached is None or cached[0] is not cfg:  # the config is kept alive in the entry, so its id is not reused
        cached = _APPLY_FNS[id(cfg)] = (cfg, jax.jit(forward(cfg).apply, static_argnames=("isolated",)))
    return cached[1]


def example(B=3, S_=S, C_=C, seed=0):
    return create_example_batch(B, D, S_, C_, A, seed=seed)


def logits_of(cfg, params, batch, emb, **kw):
    return np.asarray(apply_fn(cfg)(params, None, batch, emb, **kw).logits, np.float32)


def pad_candidates(batch, b, cs):
    post = np.array(batch.candidate_post_hashes)
    post[b, cs] = 0
    return batch._replace(candidate_post_hashes=post)


@pytest.fixture(scope="module")
def cfg():
    return tiny_ranker_config()


@pytest.fixture(scope="module")
def release_params(cfg):
    return random_release_params(cfg, "phoenix_model")


def test_param_tree_is_release_layout(cfg):
    batch, emb = example()
    # Shapes and dtypes only: jax.eval_shape traces the same init without compiling or running it.
    params = jax.eval_shape(forward(cfg).init, jax.random.PRNGKey(0), batch, emb)
    shapes = {m: {n: tuple(v.shape) for n, v in d.items()} for m, d in params.items()}
    assert shapes == release_layout(cfg, "phoenix_model")
    assert all(v.dtype == jnp.float32 for v in jax.tree_util.tree_leaves(params))


@pytest.mark.parametrize("bidirectional", [False, True], ids=["causal", "bidirectional"])
def test_release_params_match_numpy_reference_f32(bidirectional):
    cfg = tiny_ranker_config(bidirectional_history=bidirectional)
    params = random_release_params(cfg, "phoenix_model", seed=3)
    batch, emb = example()
    batch = pad_candidates(batch, 0, [1])
    got = logits_of(cfg, params, batch, emb)
    want = ref.ranker_logits(params, batch, emb, cfg)
    assert got.shape == (3, C, A)
    np.testing.assert_allclose(got, want, **F32_TOL)


def test_bf16_within_bf16_rounding(release_params):
    cfg16 = tiny_ranker_config(fprop_dtype=jnp.bfloat16)
    batch, emb = example()
    got = apply_fn(cfg16)(release_params, None, batch, emb).logits
    assert got.dtype == jnp.bfloat16
    want = ref.ranker_logits(release_params, batch, emb, cfg16)
    # bf16 keeps 8 mantissa bits (relative step 2^-8 ~ 0.4%); a 2-layer pass compounds a few of those
    err = np.abs(np.float32(got) - want)
    assert np.max(err) < 0.1 * np.max(np.abs(want)) and np.mean(err) < 0.02 * np.mean(np.abs(want))


def test_jit_equals_eager(cfg, release_params):
    batch, emb = example()
    eager = forward(cfg).apply(release_params, None, batch, emb).logits
    jitted = apply_fn(cfg)(release_params, None, batch, emb).logits  # the other tests' compiled program
    np.testing.assert_allclose(jitted, eager, rtol=1e-6, atol=1e-6)


def test_candidate_isolation(cfg, release_params):
    """Changing other candidates' embeddings, hashes or surfaces leaves candidate 0 unchanged."""
    batch, emb = example()
    base = logits_of(cfg, release_params, batch, emb)
    rng = np.random.default_rng(7)
    cpe = np.array(emb.candidate_post_embeddings)
    cpe[:, 1:] = rng.standard_normal(cpe[:, 1:].shape)
    cae = np.array(emb.candidate_author_embeddings)
    cae[:, 1:] *= -3.0
    cps = np.array(batch.candidate_product_surface)
    cps[:, 1:] = (cps[:, 1:] + 5) % 16
    batch2 = pad_candidates(batch._replace(candidate_product_surface=cps), 1, [2, 3])
    emb2 = RecsysEmbeddings(emb.user_embeddings, emb.history_post_embeddings, cpe, emb.history_author_embeddings,
                            cae)
    changed = logits_of(cfg, release_params, batch2, emb2)
    np.testing.assert_allclose(changed[:, 0], base[:, 0], rtol=1e-6, atol=1e-6)
    assert np.abs(changed[:, 1] - base[:, 1]).max() > 1e-3  # the changes did reach the other candidates


def test_padding_invariance(cfg, release_params):
    """Embeddings, actions and surfaces at padded history positions change nothing."""
    batch, emb = example()
    valid = np.asarray(batch.history_post_hashes[:, :, 0] != 0)
    assert (~valid).any()
    rng = np.random.default_rng(3)
    hpe = np.where(valid[:, :, None, None], emb.history_post_embeddings,
                   100 * rng.standard_normal(emb.history_post_embeddings.shape)).astype(np.float32)
    hae = np.where(valid[:, :, None, None], emb.history_author_embeddings, -7.0).astype(np.float32)
    acts = np.where(valid[:, :, None], batch.history_actions, 1.0).astype(np.float32)
    emb2 = RecsysEmbeddings(emb.user_embeddings, hpe, emb.candidate_post_embeddings, hae,
                            emb.candidate_author_embeddings)
    batch2 = batch._replace(history_actions=acts)
    for path in ("masked", "isolated"):
        np.testing.assert_allclose(logits_of(cfg, release_params, batch2, emb2, isolated=path == "isolated"),
                                   logits_of(cfg, release_params, batch, emb, isolated=path == "isolated"), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("B,S_,C_", [(1, S, C), (2, S, 1), (2, 1, C), (1, 1, 1)],
                         ids=["B1", "C1", "S1", "all_ones"])
def test_shape_edge_cases(cfg, release_params, B, S_, C_):
    batch, emb = example(B, S_, C_)
    got = logits_of(cfg, release_params, batch, emb)
    assert got.shape == (B, C_, A)
    np.testing.assert_allclose(got, ref.ranker_logits(release_params, batch, emb, cfg), **F32_TOL)


def test_all_padding_history(cfg, release_params):
    batch, emb = example()
    zero = np.zeros_like(batch.history_post_hashes)
    batch = batch._replace(history_post_hashes=zero, history_author_hashes=np.zeros_like(zero))
    got = logits_of(cfg, release_params, batch, emb)
    assert np.all(np.isfinite(got))
    np.testing.assert_allclose(got, ref.ranker_logits(release_params, batch, emb, cfg), **F32_TOL)


@pytest.mark.parametrize("kw", [{}, {"bidirectional_history": True}, {"num_kv_heads": 1}, {"num_kv_heads": 4}],
                         ids=["causal", "bidirectional", "mqa", "mha"])
def test_isolated_path_equals_masked(kw):
    cfg = tiny_ranker_config(**kw)
    params = random_release_params(cfg, "phoenix_model", seed=5)
    batch, emb = example()  # the shapes of the other tests: the causal case's programs are theirs
    batch = pad_candidates(batch, 2, [0, 2])  # padded candidates too (history padding comes from the example)
    masked = logits_of(cfg, params, batch, emb)
    isolated = logits_of(cfg, params, batch, emb, isolated=True)
    np.testing.assert_allclose(isolated, masked, **PATH_TOL)


@pytest.mark.parametrize("S_", [7, 12, 15])  # P = 1 + S = 8 (aligned), 13 and 16 (aligned) vs KEY_PAD_MULTIPLE 8
def test_isolated_path_equals_masked_for_every_key_alignment(S_):
    """The fast path pads the prefix keys to a multiple of grok.KEY_PAD_MULTIPLE with masked rows:
    logits equal the masked model's whether P needs padding or not, with padded history and
    candidates too; the prefix cache keeps its P unpadded rows."""
    import dataclasses

    import grok

    assert grok.KEY_PAD_MULTIPLE == 8  # the parametrisation above is written for it
    cfg = dataclasses.replace(tiny_ranker_config(), history_seq_len=S_)
    params = random_release_params(cfg, "phoenix_model", seed=9)
    batch, emb = example(B=2, S_=S_, C_=5, seed=4)
    batch = pad_candidates(batch, 1, [0, 3])
    masked = logits_of(cfg, params, batch, emb)
    np.testing.assert_allclose(logits_of(cfg, params, batch, emb, isolated=True), masked, **PATH_TOL)
    f = ModelForward(cfg)
    prefix = jax.jit(lambda p, b, e: f.apply(p, b, e, "encode_prefix"))(params, batch, emb)
    assert all(layer.keys.shape[1] == 1 + S_ for layer in prefix.memory)
    cached = jax.jit(lambda p, b, e, pre: f.apply(p, b, e, "score_candidates", prefix=pre, candidate_start=0))(
        params, batch, emb, prefix).logits
    np.testing.assert_allclose(np.asarray(cached), masked, **PATH_TOL)


def test_self_logits_equal_the_einsum():
    """grok._self_logits (float32: products times a 0/1 block matrix) equals the einsum it replaces
    to float32 rounding; other dtypes take the einsum itself (bit for bit)."""
    import grok

    rng = np.random.default_rng(0)  # NumPy draws: an eager jax.random call compiles its own programs
    q = jnp.asarray(rng.standard_normal((2, 5, 3, 2, 8)), jnp.float32)  # [B, R, h, g, d]
    k = jnp.asarray(rng.standard_normal((2, 5, 3, 8)), jnp.float32)  # [B, R, h, d]
    want = np.einsum("brhgd,brhd->brhg", np.asarray(q, np.float64), np.asarray(k, np.float64))
    got = jax.jit(grok._self_logits)(q, k)
    assert got.shape == (2, 5, 3, 2) and got.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5)
    qb, kb = q.astype(jnp.bfloat16), k.astype(jnp.bfloat16)
    np.testing.assert_array_equal(np.asarray(grok._self_logits(qb, kb), np.float32),
                                  np.asarray(jnp.einsum("brhgd,brhd->brhg", qb, kb), np.float32))


def test_prefix_cache_in_chunks_equals_one_call(cfg, release_params):
    """Encode user+history once, score candidates in chunks: same logits as ranking all at once."""
    batch, emb = example(B=2, C_=7)
    full = logits_of(cfg, release_params, batch, emb)
    f = ModelForward(cfg)
    prefix = jax.jit(lambda p, b, e: f.apply(p, b, e, "encode_prefix"))(release_params, batch, emb)
    assert isinstance(prefix, PrefixCache)
    score = jax.jit(lambda p, b, e, pre, start: f.apply(p, b, e, "score_candidates", prefix=pre,
                                                        candidate_start=start))
    chunks = []
    for start, stop in [(0, 3), (3, 6), (6, 7)]:
        sub_b = batch._replace(candidate_post_hashes=batch.candidate_post_hashes[:, start:stop],
                               candidate_author_hashes=batch.candidate_author_hashes[:, start:stop],
                               candidate_product_surface=batch.candidate_product_surface[:, start:stop])
        sub_e = RecsysEmbeddings(emb.user_embeddings, emb.history_post_embeddings,
                                 emb.candidate_post_embeddings[:, start:stop], emb.history_author_embeddings,
                                 emb.candidate_author_embeddings[:, start:stop])
        chunks.append(np.asarray(score(release_params, sub_b, sub_e, prefix, start).logits))
    np.testing.assert_allclose(np.concatenate(chunks, axis=1), full, **PATH_TOL)


def test_bidirectional_history_changes_prefix_but_keeps_isolation(release_params):
    causal, bidir = tiny_ranker_config(), tiny_ranker_config(bidirectional_history=True)
    batch, emb = example()
    a, b = logits_of(causal, release_params, batch, emb), logits_of(bidir, release_params, batch, emb)
    assert np.abs(a - b).max() > 1e-3  # the option changes the computation
    # Isolation: with bidirectional history, candidate 0's logits do not move when every other
    # candidate's embeddings change (masked pass, where candidates share one sequence).
    other = np.array(emb.candidate_post_embeddings)
    other[:, 1:] = np.random.default_rng(7).standard_normal(other[:, 1:].shape)
    changed = logits_of(bidir, release_params, batch, RecsysEmbeddings(
        emb.user_embeddings, emb.history_post_embeddings, other, emb.history_author_embeddings,
        emb.candidate_author_embeddings))
    assert np.abs(changed[:, 1:] - b[:, 1:]).max() > 1e-3  # the change reached the other candidates
    np.testing.assert_allclose(changed[:, 0], b[:, 0], rtol=1e-5, atol=1e-5)


def test_default_init_is_trainable(cfg):
    """Logits vary at init and a ranking loss sends a non-zero gradient to every parameter."""
    batch, emb = example()  # the shape the other tests compile (apply_fn)
    f = forward(cfg)
    params = jax.jit(f.init)(jax.random.PRNGKey(0), batch, emb)  # jitted: eager init dispatches op by op
    logits = logits_of(cfg, params, batch, emb)
    assert logits.std(axis=1).mean() > 1e-2 and logits.std(axis=2).mean() > 1e-2
    labels = (np.random.default_rng(0).random(logits.shape) < 0.3).astype(np.float32)

    def loss(p):
        lg = f.apply(p, None, batch, emb).logits.astype(jnp.float32)
        return jnp.mean(jnp.maximum(lg, 0) - lg * labels + jnp.log1p(jnp.exp(-jnp.abs(lg))))

    grads = jax.jit(jax.grad(loss))(params)
    for path, g in jax.tree_util.tree_flatten_with_path(grads)[0]:
        assert np.abs(np.asarray(g)).max() > 0, f"zero gradient for {jax.tree_util.keystr(path)}"


def test_bad_inputs_raise_clear_errors(cfg, release_params):
    batch, emb = example()
    f = forward(cfg)

    def apply(batch, emb):  # traced abstractly: the checks see the concrete inputs; nothing compiles or runs
        return jax.eval_shape(lambda p: f.apply(p, None, batch, emb), release_params)

    with pytest.raises(ValueError, match=r"recsys_embeddings.user_embeddings: expected shape \[3, 2, 16\]"):
        apply(batch, RecsysEmbeddings(np.zeros((3, 2, 8), np.float32), *jax.tree_util.tree_leaves(emb)[1:]))
    with pytest.raises(ValueError, match="batch.history_author_hashes"):
        apply(batch._replace(history_author_hashes=batch.history_author_hashes[:, :2]), emb)
    with pytest.raises(TypeError, match="batch.candidate_post_hashes: expected int dtype"):
        apply(batch._replace(candidate_post_hashes=batch.candidate_post_hashes.astype(np.float32)), emb)
    with pytest.raises(TypeError, match="prefix: expected a PrefixCache"):
        jax.eval_shape(lambda p: ModelForward(cfg).apply(p, batch, emb, "score_candidates", prefix=None),
                       release_params)


def test_recsys_embeddings_is_pytree():
    _, emb = example()
    leaves, treedef = jax.tree_util.tree_flatten(emb)
    assert len(leaves) == 5
    back = jax.tree_util.tree_unflatten(treedef, leaves)
    assert isinstance(back, RecsysEmbeddings)
    doubled = jax.jit(lambda e: jax.tree_util.tree_map(lambda x: 2 * x, e))(emb)
    np.testing.assert_array_equal(doubled.user_embeddings, 2 * emb.user_embeddings)


@pytest.mark.parametrize("fprop_dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
def test_fast_candidate_inputs_equal_block_candidate_reduce(release_params, fprop_dtype):
    """The isolated path's candidate projection (proj_mat_2 split by blocks, the surface block applied
    to the table once) equals the release's concatenate-then-project, out-of-range surfaces included."""
    cfg = tiny_ranker_config(fprop_dtype=fprop_dtype)
    batch, emb = example()
    surface = np.array(batch.candidate_product_surface)
    surface[0, 0], surface[1, 1] = 16, -1  # outside [0, vocab): a zero one-hot row in the release
    batch = batch._replace(candidate_product_surface=surface)

    def inputs(method):  # jitted: an eager apply dispatches (and compiles) op by op
        return jax.jit(hk.transform(lambda b, e: getattr(cfg.make(), method)(b, e)).apply)(release_params, None,
                                                                                          batch, emb)

    (want, want_mask), (got, got_mask) = inputs("_candidate_inputs"), inputs("_fast_candidate_inputs")
    np.testing.assert_allclose(np.float32(got), np.float32(want), rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(got_mask, want_mask)


def test_isolated_path_creates_the_release_layout(cfg):
    batch, emb = example()
    # Shapes only: jax.eval_shape traces the same init without compiling or running it.
    params = jax.eval_shape(lambda r, b, e: forward(cfg).init(r, b, e, isolated=True), jax.random.PRNGKey(0), batch, emb)
    shapes = {m: {n: tuple(v.shape) for n, v in d.items()} for m, d in params.items()}
    assert shapes == release_layout(cfg, "phoenix_model")
