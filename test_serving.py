"""Serving fast path: the ranking runner's compute_dtype, and bench.py's profile and device suite.

Parity is against the masked model (the release's computation) on the same random release-layout
parameters: a float32 serving pass of a bfloat16 model matches the float32 masked model to 1e-5;
serving in the model's own bfloat16 stays within bfloat16 rounding of it.
"""

import json

import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import bench
from conftest import A, C, D, S, random_release_params, tiny_ranker_config
from recsys_model import resolve_compute_dtype, with_fprop_dtype
from runners import ModelRunner, RecsysInferenceRunner, create_example_batch

F32_TOL = dict(rtol=1e-5, atol=1e-5)  # float32 serving vs float32 masked reference, probabilities
BF16_ATOL = 0.02  # bfloat16 keeps 8 mantissa bits; two layers compound a few roundings of probabilities in [0, 1]


_MASKED_APPLY = {}  # config repr -> the masked model's jitted apply, shared by the tests (one trace per shape)


def masked_probs(cfg, params, batch, emb):
    """sigmoid of the masked (release) model's logits, in cfg's fprop dtype."""
    apply = _MASKED_APPLY.get(repr(cfg))
    if apply is None:
        apply = _MASKED_APPLY[repr(cfg)] = jax.jit(hk.transform(lambda b, e: cfg.make()(b, e)).apply)
    return np.asarray(jax.nn.sigmoid(apply(params, None, batch, emb).logits.astype(jnp.float32)))


@pytest.fixture(scope="module")
def bf16_model():
    cfg = tiny_ranker_config(fprop_dtype=jnp.bfloat16)
    return cfg, random_release_params(cfg, "phoenix_model", seed=21)


def runner_for(cfg, params, **kw):
    runner = RecsysInferenceRunner(ModelRunner(cfg), **kw)
    runner.initialize()
    runner.params = params
    return runner


@pytest.mark.parametrize("compute_dtype,backend,want", [
    (None, "cpu", jnp.bfloat16), (None, "gpu", jnp.bfloat16), ("auto", "cpu", jnp.float32),
    ("auto", "gpu", jnp.bfloat16), ("auto", "tpu", jnp.bfloat16), ("float32", "gpu", jnp.float32),
    (jnp.bfloat16, "cpu", jnp.bfloat16), (np.float16, "cpu", jnp.float16)],
    ids=["none_cpu", "none_gpu", "auto_cpu", "auto_gpu", "auto_tpu", "f32_str", "bf16_type", "f16_numpy"])
def test_resolve_compute_dtype(compute_dtype, backend, want):
    assert resolve_compute_dtype(compute_dtype, jnp.bfloat16, backend) == jnp.dtype(want)


@pytest.mark.parametrize("bad", ["int8", "fast", 3, jnp.int32], ids=["int8", "unknown_name", "int", "int_type"])
def test_bad_compute_dtype_is_refused_at_construction(bad):
    with pytest.raises(ValueError, match=r"compute_dtype: expected None, 'auto', 'float32', 'bfloat16' or "
                                         r"'float16', got"):
        RecsysInferenceRunner(ModelRunner(tiny_ranker_config()), compute_dtype=bad)


def test_with_fprop_dtype_keeps_the_config_and_its_parameter_tree():
    cfg = tiny_ranker_config(fprop_dtype=jnp.bfloat16)
    assert with_fprop_dtype(cfg, jnp.bfloat16) is cfg
    f32 = with_fprop_dtype(cfg, jnp.float32)
    assert jnp.dtype(f32.fprop_dtype) == jnp.float32 and jnp.dtype(cfg.fprop_dtype) == jnp.bfloat16
    batch, emb = create_example_batch(1, D, S, C, A)
    shapes = [jax.eval_shape(hk.transform(lambda b, e, c=c: c.make()(b, e)).init, jax.random.PRNGKey(0), batch, emb)
              for c in (cfg, f32)]
    assert shapes[0] == shapes[1]


def test_default_serves_float32_on_cpu(bf16_model):
    """The default ("auto") computes a bfloat16 model in float32 on CPU; the config is unchanged."""
    cfg, params = bf16_model
    runner = runner_for(cfg, params)
    assert jax.default_backend() == "cpu" and runner.compute_dtype == "auto"
    assert runner.serving_dtype == jnp.float32 and jnp.dtype(cfg.fprop_dtype) == jnp.bfloat16


@pytest.mark.parametrize("path", ["isolated", "masked"])
def test_float32_serving_matches_float32_reference(bf16_model, path):
    cfg, params = bf16_model
    batch, emb = create_example_batch(3, D, S, C, A, seed=22)
    post = np.array(batch.candidate_post_hashes)
    post[1, 2] = 0  # a padded candidate
    batch = batch._replace(candidate_post_hashes=post)
    want = masked_probs(tiny_ranker_config(fprop_dtype=jnp.float32), params, batch, emb)
    runner = runner_for(cfg, params, path=path, compute_dtype="float32")
    np.testing.assert_allclose(runner.rank(batch, emb).scores, want, **F32_TOL)
    if path == "isolated":  # the cached-prefix entry points use the same serving dtype
        np.testing.assert_allclose(runner.rank_large(batch, emb, chunk_size=3).scores, want, **F32_TOL)
        prefix = runner.encode_prefix(batch, emb)
        assert prefix.memory[0].keys.dtype == jnp.float32
        np.testing.assert_allclose(runner.score_candidates(prefix, batch, emb), want, **F32_TOL)


def test_bf16_serving_stays_within_bf16_rounding(bf16_model):
    """compute_dtype=None keeps the release's bfloat16 arithmetic: within bf16 rounding of the masked
    bf16 model and of the float32 reference, and the float32 path is at least as close to the latter."""
    cfg, params = bf16_model
    batch, emb = create_example_batch(3, D, S, C, A, seed=23)
    runner = runner_for(cfg, params, compute_dtype=None)
    assert runner.serving_dtype == jnp.bfloat16
    got = np.asarray(runner.rank(batch, emb).scores)
    masked16 = masked_probs(cfg, params, batch, emb)
    want32 = masked_probs(tiny_ranker_config(fprop_dtype=jnp.float32), params, batch, emb)
    np.testing.assert_allclose(got, masked16, atol=BF16_ATOL)
    np.testing.assert_allclose(got, want32, atol=BF16_ATOL)
    assert np.abs(got - want32).max() > 1e-5  # really computed in bfloat16
    f32 = np.asarray(runner_for(cfg, params).rank(batch, emb).scores)
    assert np.abs(f32 - want32).max() <= np.abs(masked16 - want32).max()


def test_serving_dtype_compiles_once_per_shape(bf16_model):
    cfg, params = bf16_model
    runner = runner_for(cfg, params, compute_dtype="float32")
    for seed in range(3):  # B=3: the shape the other tests compile
        runner.rank(*create_example_batch(3, D, S, C, A, seed=seed))
    assert runner.trace_counts["rank"] == 1


# bench.py: the profile and the device suite run end to end at tiny sizes (not timed tests).

TINY = ["--history-len", "4", "--runs", "2", "--top-k", "5"]


def test_profile_rows_cover_every_part(tmp_path, capsys):
    bench.main(["--profile", "--profile-c", "6", "--rank-batches", "2", "--out", str(tmp_path / "profile"), *TINY])
    rows = json.loads((tmp_path / "profile.json").read_text())
    parts = {r["part"]: r for r in rows}
    assert set(parts) == {*bench.PROFILE_PARTS, "traced total", "rank, device inputs", "release masked, jit",
                          "host overhead"}
    # The worker traced the compiled rank: every part has operations, and their times add up.
    for name in bench.PROFILE_PARTS:
        assert parts[name]["c"] == 6 and parts[name]["b"] == 2 and parts[name]["traced_ms"] > 0, name
    total = parts["traced total"]["traced_ms"]
    assert total == pytest.approx(sum(parts[n]["traced_ms"] for n in bench.PROFILE_PARTS), abs=5e-3)
    assert sum(parts[n]["share"] for n in bench.PROFILE_PARTS) == pytest.approx(1.0, abs=5e-3)
    macs = bench.ranking_macs(bench_config(6, 4), 2, 4, 6)
    for name in ("prefix inputs", "candidate projections", "attention projections", "attention", "ffn",
                 "output head"):
        assert parts[name]["mmacs"] == round(macs[name] / 1e6, 3) and parts[name]["x_floor"] > 0
    whole = parts["rank, device inputs"]
    assert whole["min_ms"] > 0 and whole["mmacs"] == parts["traced total"]["mmacs"]
    markdown = (tmp_path / "profile.md").read_text()
    assert "| part | c | b |" in markdown and "floor_ms" in markdown and markdown.strip() in capsys.readouterr().out


def bench_config(C: int, S: int):
    from phoenix_demos import demo_ranker_config

    return demo_ranker_config(history_len=S, num_candidates=C)


def test_op_part_sorts_the_ranker_ops_by_their_trace_path():
    assert bench.op_part("jit(traced)/phoenix_model/_fast_candidate_inputs/phoenix_model/dot_general") == (
        "candidate projections")
    assert bench.op_part("jit(traced)/phoenix_model/user_sequence/phoenix_model/concatenate") == "prefix inputs"
    assert bench.op_part("args[2].history_post_embeddings") == "prefix inputs"
    assert bench.op_part("jit(traced)/phoenix_model/transformer/decoder_layer_1/multi_head_attention/exp") == (
        "attention")
    assert bench.op_part("jit(traced)/phoenix_model/transformer/decoder_layer_1/multi_head_attention/dot_general") == (
        "attention projections")
    assert bench.op_part("jit(traced)/phoenix_model/transformer/decoder_layer_0/dot_general") == "ffn"
    assert bench.op_part("jit(traced)/phoenix_model/transformer/decoder_layer_0/rms_norm_2/mul") == (
        "norms, residuals")
    assert bench.op_part("jit(traced)/top_k") == "output head"


def test_in_flight_ms_shares_overlapping_operations_and_follows_end_marks():
    """An asynchronous operation runs until its "end:" mark; time with two in flight is split
    between them; gaps count for no part; the parts add up to the busy time per call."""
    names = {"dot.1": "jit(f)/phoenix_model/transformer/decoder_layer_0/dot_general",  # ffn
             "exp.2": "jit(f)/phoenix_model/transformer/decoder_layer_0/multi_head_attention/exp",  # attention
             "sort": "jit(f)/top_k"}  # output head
    x = lambda name, ts, dur: dict(ph="X", name=name, ts=ts, dur=dur)  # noqa: E731
    events = [x("dot.1", 0, 10), x("exp.2", 10, 20), x("end: dot.1", 50, 0), x("sort", 80, 20),
              x("unrelated", 0, 500), dict(ph="i", name="sort", ts=0)]
    # per call (2 calls): dot.1 alone 0-10 us, with exp.2 10-30 (10 each), alone 30-50; sort 80-100
    parts = bench.in_flight_ms(events, names, calls=2)
    assert parts == pytest.approx({"ffn": (10 + 10 + 20) / 2e3, "attention": 10 / 2e3, "output head": 20 / 2e3})
    assert sum(parts.values()) == pytest.approx((50 + 20) / 2e3)  # the 30 us gap is nobody's
    # without its end mark the dot's own event is all it gets
    no_mark = bench.in_flight_ms([e for e in events if e["name"] != "end: dot.1"], names, calls=1)
    assert no_mark["ffn"] == pytest.approx(10e-3) and no_mark["attention"] == pytest.approx(20e-3)


def test_hlo_op_names_takes_a_nameless_fusion_from_its_body_or_operands():
    hlo = """HloModule m

%fused_computation.1 (p: f32[4]) -> f32[4] {
  %p = f32[4]{0} parameter(0)
  ROOT %exp.1 = f32[4]{0} exponential(%p), metadata={op_name="jit(f)/a/exp"}
}

%fused_computation.2 (q: f32[4]) -> f32[4] {
  %q = f32[4]{0} parameter(0)
  ROOT %dot.2 = f32[4]{0} multiply(%q, %q)
}

ENTRY %main (x: f32[4]) -> f32[4] {
  %x = f32[4]{0} parameter(0), metadata={op_name="args[0]"}
  %fusion.1 = f32[4]{0} fusion(%x), kind=kLoop, calls=%fused_computation.1
  ROOT %fusion.2 = f32[4]{0} fusion(%fusion.1), kind=kCustom, calls=%fused_computation.2
}
"""
    names = bench.hlo_op_names(hlo)
    assert names["fusion.1"] == "jit(f)/a/exp"  # from its body
    assert names["fusion.2"] == "jit(f)/a/exp"  # body nameless: from its operand
    assert names["x"] == "args[0]"


def test_device_suite_runs_on_cpu_at_tiny_sizes(tmp_path):
    out = tmp_path / "suite"
    bench.main(["--device-suite", "--suite-rank", "6x2", "--suite-sizes", "300", "--batches", "1,3",
                "--out", str(out), "--suite-serve", "--skip-small --skip-nano", *TINY])  # the load test's hook:
    # its table's header only here (test_phoenix_server.py runs scripts/bench_serve.py at tiny sizes)
    rows = json.loads(out.with_suffix(".json").read_text())
    rank = [r for r in rows if r["section"] == "suite_ranking"]
    assert {(r["method"], r["c"], r["b"]) for r in rank} == {
        (m, 6, 2) for m in ("release_masked_jit", "runner", "runner_fprop", "runner_device_inputs")}
    retrieval = [r for r in rows if r["section"] == "suite_retrieval"]
    assert {(r["method"], r["n"], r["b"]) for r in retrieval} == {
        (m, 300, b) for m in ("bare_matmul_top_k", "corpus_index", "approx_max_k") for b in (1, 3)}
    for row in retrieval:
        assert row["k"] == 5 and row["median_ms"] > 0
        if row["method"] != "approx_max_k":
            assert row["recall"] == 1.0  # the exact index returns the bare top_k's entries
    sharded = {r["method"]: r for r in rows if r["section"] == "suite_sharded"}  # one device here: equal shares
    assert set(sharded) == {"sharded", "replicated"} and all(r["n"] == 300 and r["devices"] == 1 for r in sharded.values())
    assert sharded["sharded"]["table_mib_per_device"] == sharded["replicated"]["table_mib_per_device"] > 0
    assert all(r["device"].startswith("cpu") for r in rows)
    markdown = out.with_suffix(".md").read_text()
    assert "vs_release" in markdown and "vs_bare" in markdown
    assert "## Served (scripts/bench_serve.py)\n\n| model | endpoint | clients |" in markdown


def test_plot_writes_png_or_names_the_missing_extra(tmp_path):
    rows = [dict(section="suite_ranking", method="runner", c=c, b=1, median_ms=c / 100) for c in (8, 16)]
    rows += [dict(section="suite_retrieval", method="corpus_index", n=n, b=1, median_ms=n / 1e3) for n in (100, 1000)]
    path = tmp_path / "plot.png"
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        with pytest.raises(SystemExit, match="--plot needs matplotlib, an optional extra: uv sync --extra plot"):
            bench.plot_rows(rows, str(path))
        return
    bench.plot_rows(rows, str(path))
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plot_without_out_is_a_usage_error():
    with pytest.raises(SystemExit):
        bench.parse_args(["--device-suite", "--plot"])
