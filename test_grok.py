"""Transformer pieces vs the release's formulas restated in NumPy."""

import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import grok
import numpy_reference as ref
from conftest import tiny_transformer


@pytest.mark.parametrize("emb_size,widening,expected", [
    (128, 2, 176), (64, 2, 88), (128, 4, 344), (16, 2, 24), (6, 1.5, 8), (48, 3, 96)])
def test_ffn_size_matches_rule(emb_size, widening, expected):
    # expected values worked by hand: int(w*D)*2//3 rounded up to a multiple of 8
    assert grok.ffn_size(emb_size, widening) == expected == ref.ffn_size(emb_size, widening)


@pytest.mark.parametrize("T,offset", [(5, 1), (6, 3), (8, 7), (1, 0), (4, 4), (10, 2)],
                         ids=["offset1", "mid", "single_candidate", "T1_all_candidates", "no_candidates",
                              "many_candidates"])
@pytest.mark.parametrize("bidirectional", [False, True], ids=["causal", "bidirectional"])
def test_recsys_attn_mask_structure(T, offset, bidirectional):
    # Traced, as the model builds it: one program per case (eager, each op compiles per shape).
    got = np.asarray(jax.jit(grok.make_recsys_attn_mask, static_argnums=(0, 1), static_argnames="bidirectional_prefix")(
        T, offset, bidirectional_prefix=bidirectional))
    assert got.shape == (1, 1, T, T) and got.dtype == np.float32
    np.testing.assert_array_equal(got[0, 0], ref.recsys_mask(T, offset, bidirectional))


def test_recsys_attn_mask_dtype_and_known_values():
    m = np.asarray(grok.make_recsys_attn_mask(4, 2, dtype=jnp.bfloat16).astype(jnp.float32))[0, 0]
    # rows 0-1 causal prefix; candidates 2, 3 see the prefix and themselves only (worked by hand)
    np.testing.assert_array_equal(m, [[1, 0, 0, 0], [1, 1, 0, 0], [1, 1, 1, 0], [1, 1, 0, 1]])
    assert grok.make_recsys_attn_mask(4, 2, dtype=jnp.bfloat16).dtype == jnp.bfloat16


def test_rms_norm_matches_formula():
    x = np.random.default_rng(0).standard_normal((3, 5, 16)).astype(np.float32)
    scale = np.random.default_rng(1).standard_normal(16).astype(np.float32)
    f = hk.transform(lambda x: grok.RMSNorm()(x))
    apply = jax.jit(f.apply)  # jitted: eager, each op compiles its own program
    out = apply({"rms_norm": {"scale": scale}}, None, x)
    np.testing.assert_allclose(out, ref.rms_norm(np.float64(x), scale), rtol=1e-5, atol=1e-6)
    # bf16 in -> bf16 out, computed in float32
    out16 = apply({"rms_norm": {"scale": scale}}, None, jnp.asarray(x, jnp.bfloat16))
    assert out16.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.float32(out16), ref.rms_norm(np.float64(x), scale), rtol=2e-2, atol=2e-2)


def test_rms_norm_default_scale_is_one():
    params = jax.jit(hk.transform(lambda x: grok.hk_rms_norm(x)).init)(jax.random.PRNGKey(0), jnp.ones((2, 4)))
    np.testing.assert_array_equal(params["rms_norm"]["scale"], np.ones(4))


def test_rotate_half_and_rope_match_formula():
    x = np.random.default_rng(0).standard_normal((2, 7, 3, 8)).astype(np.float32)
    np.testing.assert_array_equal(jax.jit(grok.rotate_half)(x), ref.rotate_half(x))
    # jitted: eager, each op compiles its own program
    got = jax.jit(hk.transform(lambda x: grok.RotaryEmbedding(8)(x, seq_dim=1, offset=0)).apply)({}, None, x)
    np.testing.assert_allclose(got, ref.rope(np.float64(x), np.arange(7.0)), rtol=1e-5, atol=1e-5)
    # explicit positions equal an offset
    off = jax.jit(hk.transform(lambda x: grok.RotaryEmbedding(8)(x, offset=3)).apply)({}, None, x)
    np.testing.assert_allclose(off, ref.rope(np.float64(x), np.arange(3.0, 10.0)), rtol=1e-5, atol=1e-5)


def test_rope_position_zero_is_identity_and_norm_preserving():
    x = np.random.default_rng(2).standard_normal((1, 5, 1, 16)).astype(np.float32)
    y = np.asarray(jax.jit(hk.transform(lambda x: grok.RotaryEmbedding(16)(x)).apply)({}, None, x))
    np.testing.assert_allclose(y[:, 0], x[:, 0], atol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(y, axis=-1), np.linalg.norm(x, axis=-1), rtol=1e-5)


@pytest.mark.parametrize("logit", [-1000.0, -30.0, -1.0, 0.0, 0.5, 29.0, 90.0])
def test_soft_cap_formula(logit):
    assert float(grok.soft_cap(jnp.float32(logit))) == pytest.approx(30 * np.tanh(logit / 30), rel=1e-6, abs=1e-6)


def random_param(rng, path, shape) -> np.ndarray:
    """float32 values for the parameter at `path`: RMSNorm scales near 1, matrices scaled by 1/sqrt(fan-in)."""
    if jax.tree_util.keystr(path).endswith("['scale']"):
        return (1.0 + 0.1 * rng.standard_normal(shape)).astype(np.float32)
    return (rng.standard_normal(shape) / np.sqrt(shape[0])).astype(np.float32)


@pytest.mark.parametrize("num_q_heads,num_kv_heads", [(4, 4), (4, 2), (4, 1)], ids=["mha", "gqa", "mqa"])
def test_transformer_matches_numpy_reference(num_q_heads, num_kv_heads):
    cfg = tiny_transformer(num_q_heads=num_q_heads, num_kv_heads=num_kv_heads)
    rng = np.random.default_rng(0)
    B, T, offset = 2, 9, 5
    x = rng.standard_normal((B, T, cfg.emb_size)).astype(np.float32)
    pad = np.ones((B, T), bool)
    pad[1, 3:5] = False  # padded history positions
    pad[0, 7] = False  # a padded candidate
    f = hk.transform(lambda x, m: cfg.make()(x, m, candidate_start_offset=offset).embeddings)
    # Random values in init's tree (names and shapes from jax.eval_shape: compiling init's initialisers
    # costs several times the forward pass; test_fused_projections_equal_separate_ones runs init).
    params = jax.tree_util.tree_map_with_path(lambda path, p: random_param(rng, path, p.shape),
                                              jax.eval_shape(f.init, jax.random.PRNGKey(1), x, pad))
    got = np.asarray(jax.jit(f.apply)(params, None, x, pad))
    layers = [{
        "mha": {n: np.float64(params[f"transformer/decoder_layer_{i}/multi_head_attention/{n}"]["w"])
                for n in ("query", "key", "value", "linear")},
        **{n: np.float64(params[f"transformer/decoder_layer_{i}/{n}"]["w"]) for n in ("linear", "linear_v", "linear_1")},
        **{n: np.float64(params[f"transformer/decoder_layer_{i}/{n}"]["scale"])
           for n in ("rms_norm", "rms_norm_1", "rms_norm_2", "rms_norm_3")}} for i in range(cfg.num_layers)]
    mask = pad[:, None, :] * ref.recsys_mask(T, offset)[None]
    want = ref.transformer(np.float64(x), mask, layers, cfg)
    valid = pad  # rows of padded positions are never read downstream
    np.testing.assert_allclose(got[valid], want[valid], rtol=1e-4, atol=2e-5)


def test_config_rejects_impossible_values():
    with pytest.raises(ValueError, match="num_q_heads"):
        tiny_transformer(num_q_heads=3, num_kv_heads=2)
    with pytest.raises(ValueError, match="key_size"):
        tiny_transformer(key_size=7)
    with pytest.raises(ValueError, match="num_layers"):
        tiny_transformer(num_layers=0)


@pytest.mark.parametrize("num_kv_heads", [1, 2, 4], ids=["mqa", "gqa", "mha"])
def test_fused_projections_equal_separate_ones(num_kv_heads):
    """fused=True (one Q/K/V matmul, one FFN input matmul) creates the same parameters, in the same
    order, and computes the same embeddings and prefix memory as the release's separate matmuls."""
    cfg = tiny_transformer(num_kv_heads=num_kv_heads)
    x = jnp.asarray(np.random.default_rng(0).standard_normal((2, 7, cfg.emb_size)), jnp.float32)
    mask = jnp.asarray(np.arange(7)[None, :] < np.array([[7], [5]]))  # [B, T], second row padded

    def run(fused):
        return hk.transform(lambda x, m: cfg.make()(x, m, candidate_start_offset=None, fused=fused))

    # Jitted: an eager init dispatches (and compiles) op by op.
    params = jax.jit(run(False).init)(jax.random.PRNGKey(0), x, mask)
    fused_params = jax.jit(run(True).init)(jax.random.PRNGKey(0), x, mask)
    jax.tree_util.tree_map(np.testing.assert_array_equal, fused_params, params)  # same names, order, values
    separate, fused = (jax.jit(run(f).apply)(params, None, x, mask) for f in (False, True))
    np.testing.assert_allclose(fused.embeddings, separate.embeddings, rtol=1e-5, atol=1e-5)
    for a, b in zip(fused.memory, separate.memory):
        np.testing.assert_allclose(a.keys, b.keys, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(a.values, b.values, rtol=1e-5, atol=1e-5)


def test_deferred_norm_matmul_equals_the_normalised_rows_matmul():
    """A DeferredNorm handed to fused_linear: (x @ (scale * w)) * inv_rms equals RMSNorm(x) @ w
    (float32 rounding), under the same parameter names; bfloat16 rows keep the release's order."""
    rng = np.random.default_rng(3)
    x = jnp.asarray(rng.standard_normal((2, 9, 16)) * 3, jnp.float32)

    def net(x, defer):
        rows = grok.RMSNorm().deferred(x) if defer else grok.RMSNorm()(x)
        return grok.fused_linear(rows, [grok.Linear(8, with_bias=False, name="a"),
                                        grok.Linear(24, with_bias=False, name="b")])

    f = hk.transform(net)
    # Jitted: eager, each op compiles its own program. The deferred init's tree by jax.eval_shape.
    params = jax.jit(f.init, static_argnums=2)(jax.random.PRNGKey(0), x, False)
    assert jax.tree_util.tree_structure(jax.eval_shape(lambda r, x: f.init(r, x, True), jax.random.PRNGKey(0), x)) == (
        jax.tree_util.tree_structure(params))
    params["rms_norm"]["scale"] = jnp.asarray(rng.standard_normal(16), jnp.float32)  # a learned scale, not ones
    apply = jax.jit(f.apply, static_argnums=3)
    want = apply(params, None, x, False)
    got = apply(params, None, x, True)
    assert [g.shape for g in got] == [(2, 9, 8), (2, 9, 24)]
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5)
    rows = jax.jit(hk.transform(lambda x: grok.RMSNorm().deferred(x)).apply)(params, None, x)
    np.testing.assert_allclose(rows.x * rows.inv_rms * rows.scale, ref.rms_norm(np.float64(x), params["rms_norm"]["scale"]),
                               rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="float32"):
        hk.transform(lambda x: grok.RMSNorm().deferred(x)).init(jax.random.PRNGKey(0), x.astype(jnp.bfloat16))
    # pre_norm defers only on the fused float32 path; elsewhere it returns the normalised rows
    for dtype, fused, deferred in ((jnp.float32, True, True), (jnp.float32, False, False),
                                   (jnp.bfloat16, True, False)):
        out = jax.eval_shape(hk.transform(lambda x: grok.pre_norm(x, fused)).apply, params, None, x.astype(dtype))
        assert isinstance(out, grok.DeferredNorm) == deferred
