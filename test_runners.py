"""Runners: compiled once per shape, outputs equal to the models, errors before tracing."""

import jax
import numpy as np
import pytest

import phoenix_index as index
import numpy_reference as ref
from conftest import A, C, D, S, tiny_ranker_config, tiny_retrieval_config
from runners import (ACTIONS, ModelRunner, RankingOutput, RecsysInferenceRunner, RecsysRetrievalInferenceRunner,
                     RetrievalModelRunner, create_dummy_batch_from_config, create_dummy_embeddings_from_config,
                     create_example_batch, create_example_corpus)


@pytest.fixture(scope="module")
def ranker():
    r = RecsysInferenceRunner(ModelRunner(tiny_ranker_config()), name="test")
    r.initialize()
    return r


@pytest.fixture(scope="module")
def retriever():
    r = RecsysRetrievalInferenceRunner(RetrievalModelRunner(tiny_retrieval_config()), name="test")
    r.initialize()
    corpus, ids = create_example_corpus(200, D)
    r.set_corpus(corpus, ids + 1000)
    return r


def test_rank_output_matches_reference_and_orders_candidates(ranker):
    batch, emb = create_example_batch(2, D, S, C, A, seed=1)
    post = np.array(batch.candidate_post_hashes)
    post[1, 0] = 0  # a padded candidate
    batch = batch._replace(candidate_post_hashes=post)
    out = ranker.rank(batch, emb)
    assert isinstance(out, RankingOutput) and out.scores.shape == (2, C, A)
    want = 1 / (1 + np.exp(-ref.ranker_logits(ranker.params, batch, emb, ranker.runner.model)))
    np.testing.assert_allclose(out.scores, want, rtol=1e-4, atol=1e-5)
    for i, a in enumerate(ACTIONS):
        np.testing.assert_array_equal(getattr(out, f"p_{a}"), out.scores[..., i])
    fav = np.asarray(out.scores[..., 0])
    ranked = np.asarray(out.ranked_indices)
    assert np.all(np.diff(fav[0, ranked[0]]) <= 0)
    assert ranked[1, -1] == 0  # padded candidate ranked last
    assert np.all(np.diff(fav[1, ranked[1, :-1]]) <= 0)


def test_rank_does_not_retrace(ranker):
    batch, emb = create_example_batch(2, D, S, C, A, seed=2)
    ranker.rank(batch, emb)
    before = ranker.trace_counts["rank"]
    for seed in range(3, 6):
        ranker.rank(*create_example_batch(2, D, S, C, A, seed=seed))
    assert ranker.trace_counts["rank"] == before
    # A new shape compiles once more (11 candidates: the shape test_rank_large_equals_rank compiles too).
    ranker.rank(*create_example_batch(2, D, S, 11, A, seed=2))
    assert ranker.trace_counts["rank"] == before + 1


def test_frozen_rank_equals_the_parameters_as_arguments(ranker, monkeypatch):
    """rank compiles the parameters in as constants (runners._frozen_rank): same scores as the
    jitted function that takes them as arguments (float32 rounding of the folded weights), rebuilt
    when the parameters are replaced, and not used above FREEZE_PARAMS_MAX_BYTES."""
    import runners

    batch, emb = create_example_batch(2, D, S, C, A, seed=7)
    frozen = ranker._frozen_rank()
    assert frozen is not None and ranker._frozen_rank() is frozen  # built once for these params
    got = np.asarray(ranker.rank(batch, emb).scores)
    want = np.asarray(ranker._rank(ranker.params, batch, emb, path=ranker.path).scores)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)
    original = ranker.params
    try:
        # New arrays from one program (eager, the multiply compiles once per parameter shape).
        scaled = jax.jit(lambda tree, factor: jax.tree.map(lambda x: x * factor, tree))
        ranker.params = scaled(original, 1.5)  # new arrays: rebuilt, not stale
        assert ranker._frozen_rank() is not frozen
        got = np.asarray(ranker.rank(batch, emb).scores)
        want = np.asarray(ranker._rank(ranker.params, batch, emb, path=ranker.path).scores)
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)
        assert np.abs(got - np.asarray(ranker._rank(original, batch, emb, path=ranker.path).scores)).max() > 1e-3
        monkeypatch.setattr(runners, "FREEZE_PARAMS_MAX_BYTES", 0)
        ranker.params = scaled(original, 1.0)
        assert ranker._frozen_rank() is None  # too large: the parameters stay arguments
        np.testing.assert_allclose(np.asarray(ranker.rank(batch, emb).scores),
                                   np.asarray(ranker._rank(original, batch, emb, path=ranker.path).scores),
                                   rtol=0, atol=1e-6)
    finally:
        ranker.params = original


def test_rank_compiler_options_keep_the_scores(ranker):
    """On CPU the ranker's functions compile with CPU_RANK_COMPILER_OPTIONS (XLA's dot kernels
    instead of YNNPACK's): the same scores as XLA's default compile to 1e-5, the same ranking,
    and the options are in the compiled executable."""
    import runners

    assert ranker.compiler_options == (runners.CPU_RANK_COMPILER_OPTIONS if jax.default_backend() == "cpu" else {})
    batch, emb = create_example_batch(2, D, S, C, A, seed=11)
    got = ranker.rank(batch, emb)
    default = jax.jit(lambda b, e: ranker._rank_fn(ranker.params, b, e, ranker.path))  # XLA's defaults
    want = default(batch, emb)
    np.testing.assert_allclose(np.asarray(got.scores), np.asarray(want.scores), rtol=0, atol=1e-5)
    np.testing.assert_array_equal(np.asarray(got.ranked_indices), np.asarray(want.ranked_indices))
    if not ranker.compiler_options:
        return
    # XLA's default puts these matmuls in YNNPACK fusions; the runner's compiles run none there.
    assert any("dot(" in line for line in _ynn_fusion_bodies(default.lower(batch, emb).compile().as_text()))
    for name, fn, args in (("rank", ranker._frozen_rank(), (batch, emb)),
                           ("encode_prefix", ranker._prefix, (ranker.params, batch, emb))):
        bodies = _ynn_fusion_bodies(fn.lower(*args).compile().as_text())
        assert not any("dot(" in line for line in bodies), f"{name}: a matmul still runs in a YNNPACK fusion"


def _ynn_fusion_bodies(hlo_text: str) -> list:
    """The lines of the computations that YNNPACK fusions call, from optimised HLO text."""
    import re

    called = {m.group(1) for line in hlo_text.splitlines() if '"__ynn_fusion"' in line
              for m in [re.search(r"calls=%([\w.\-]+)", line)] if m}
    lines, inside = [], False
    for line in hlo_text.splitlines():
        head = re.match(r"^%([\w.\-]+) ", line)
        if head:
            inside = head.group(1) in called
        elif inside:
            lines.append(line)
    return lines


def test_ranker_compiler_options_fall_back_where_refused(monkeypatch):
    """An option this XLA refuses (or another backend) gives {}: the ranker compiles with XLA's
    defaults and warns once, instead of failing at its first call."""
    import runners

    assert runners.ranker_compiler_options("gpu") == {}
    if jax.default_backend() != "cpu":
        return
    monkeypatch.setattr(runners, "CPU_RANK_COMPILER_OPTIONS",
                        {"xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_NO_SUCH_TYPE"})
    with pytest.warns(UserWarning, match="refused the ranker's compiler options"):
        assert runners.ranker_compiler_options() == {}
    r = RecsysInferenceRunner(ModelRunner(tiny_ranker_config()), name="defaults")
    r.initialize()
    assert r.compiler_options == {}
    batch, emb = create_example_batch(1, D, S, C, A, seed=12)
    assert np.all(np.isfinite(np.asarray(r.rank(batch, emb).scores)))
    monkeypatch.setattr(runners, "CPU_RANK_COMPILER_OPTIONS", {})
    assert runners.ranker_compiler_options() == {}


def test_masked_and_isolated_runner_paths_agree(ranker):
    batch, emb = create_example_batch(2, D, S, C, A, seed=4)
    masked = RecsysInferenceRunner(ranker.runner, path="masked")
    masked.initialize()
    masked.params = ranker.params
    np.testing.assert_allclose(masked.rank(batch, emb).scores, ranker.rank(batch, emb).scores, rtol=1e-5, atol=1e-6)


def test_retrieve_matches_brute_force_and_does_not_retrace(retriever):
    batch, emb = create_example_batch(3, D, S, C, A, seed=5)
    out = retriever.retrieve(batch, emb, top_k=7)
    user = np.asarray(retriever.encode_user(batch, emb))
    np.testing.assert_allclose(out.user_representation, user, rtol=1e-6, atol=1e-6)
    idx, top = ref.top_k(user @ np.asarray(retriever.corpus_embeddings).T, 7)
    np.testing.assert_array_equal(out.top_k_indices, idx)
    np.testing.assert_allclose(out.top_k_scores, top, rtol=1e-5, atol=1e-6)
    counts = dict(retriever.trace_counts)
    index_counts = dict(index.TRACE_COUNTS)
    for seed in (6, 7):
        b, e = create_example_batch(3, D, S, C, A, seed=seed)
        retriever.retrieve(b, e, top_k=7)
        retriever.encode_user(b, e)
        retriever.encode_candidates(b, e)
    retriever.encode_candidates(batch, emb)
    assert dict(index.TRACE_COUNTS) == index_counts  # the corpus index compiled once for (B, K)
    assert retriever.trace_counts["encode_user"] == counts["encode_user"]
    assert retriever.trace_counts["encode_candidates"] == 1


def test_retrieve_with_mask_and_explicit_corpus(retriever):
    batch, emb = create_example_batch(2, D, S, C, A, seed=8)
    corpus, _ = create_example_corpus(30, D, seed=9)
    mask = np.arange(30) % 3 != 0  # 20 valid entries
    out = retriever.retrieve(batch, emb, top_k=25, corpus_embeddings=corpus, corpus_mask=mask)
    idx = np.asarray(out.top_k_indices)
    assert mask[idx[:, :20]].all() and not mask[idx[:, 20:]].any()  # masked entries fill the tail
    np.testing.assert_allclose(np.asarray(out.top_k_scores)[:, 20:], -1e12)


def test_encode_candidates_unit_norm(retriever):
    batch, emb = create_example_batch(3, D, S, C, A, seed=10)  # the shape the other retriever tests compile
    cand = np.asarray(retriever.encode_candidates(batch, emb))
    assert cand.shape == (3, C, D)
    np.testing.assert_allclose(np.linalg.norm(cand, axis=-1), 1.0, rtol=1e-5)


@pytest.mark.parametrize("top_k,err", [(201, ValueError), (0, ValueError), (2.5, TypeError)],
                         ids=["above_N", "zero", "float"])
def test_retrieve_top_k_errors(retriever, top_k, err):
    batch, emb = create_example_batch(1, D, S, C, A)
    with pytest.raises(err, match="top_k"):
        retriever.retrieve(batch, emb, top_k=top_k)


def test_runner_value_checks(ranker):
    batch, emb = create_example_batch(1, D, S, C, A)
    with pytest.raises(ValueError, match=r"batch.history_post_hashes: hashes must lie in \[0, 100000\)"):
        ranker.rank(batch._replace(history_post_hashes=-np.abs(batch.history_post_hashes)), emb)
    with pytest.raises(ValueError, match=r"batch.candidate_product_surface: ids must lie in \[0, 16\)"):
        ranker.rank(batch._replace(candidate_product_surface=np.full((1, C), 16, np.int32)), emb)
    bad = np.array(emb.user_embeddings)
    bad[0, 0, 0] = np.nan
    with pytest.raises(ValueError, match="user_embeddings: contains NaN"):
        ranker.rank(batch, emb.__class__(bad, *jax.tree_util.tree_leaves(emb)[1:]))
    with pytest.raises(ValueError, match=rf"batch.history_actions: expected shape \[1, {S}, {A}\]"):
        ranker.rank(batch._replace(history_actions=batch.history_actions[..., :5]), emb)


def test_dummy_inputs_are_all_padding():
    cfg = tiny_ranker_config()
    b = create_dummy_batch_from_config(cfg.hash_config, S, C, A, batch_size=2)
    e = create_dummy_embeddings_from_config(cfg.hash_config, D, S, C, batch_size=2)
    assert b.history_post_hashes.shape == (2, S, 2) and not np.any(b.candidate_post_hashes)
    assert e.candidate_author_embeddings.shape == (2, C, 2, D)


def test_example_batch_follows_spec():
    batch, emb = create_example_batch(4, D, 10, C, A, seed=3)
    valid = batch.history_post_hashes[:, :, 0] != 0
    lengths = valid.sum(1)
    assert np.all(lengths >= 5) and np.all(lengths <= 10)
    assert np.all(valid[:, :-1] >= valid[:, 1:])  # padding only after the valid prefix
    assert batch.candidate_post_hashes.min() >= 1 and emb.user_embeddings.dtype == np.float32
    again, _ = create_example_batch(4, D, 10, C, A, seed=3)
    np.testing.assert_array_equal(again.history_post_hashes, batch.history_post_hashes)
    corpus, ids = create_example_corpus(10, D)
    np.testing.assert_allclose(np.linalg.norm(corpus, axis=1), 1.0, rtol=1e-6)


@pytest.mark.parametrize("chunk_size", [1, 3, 5, 11, 64], ids=["chunk1", "chunk3", "chunk5_ragged", "chunk_eq_C",
                                                               "chunk_gt_C"])
def test_rank_large_equals_rank(ranker, chunk_size):
    batch, emb = create_example_batch(2, D, S, 11, A, seed=11)
    post = np.array(batch.candidate_post_hashes)
    post[0, 4] = 0  # a padded candidate among the real ones
    batch = batch._replace(candidate_post_hashes=post)
    whole = ranker.rank(batch, emb)
    large = ranker.rank_large(batch, emb, chunk_size=chunk_size)
    np.testing.assert_allclose(large.scores, whole.scores, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(large.ranked_indices, whole.ranked_indices)
    np.testing.assert_array_equal(large.p_report_score, large.scores[..., ACTIONS.index("report_score")])


def test_prefix_reuse_across_requests_compiles_once(ranker):
    """One encoded user scored against several candidate sets; each equals a fresh full ranking."""
    batch, emb = create_example_batch(1, D, S, C, A, seed=12)  # one user: the other tests' B=1 shapes
    prefix = ranker.encode_prefix(batch, emb)
    before = ranker.trace_counts["score_candidates"]
    for seed in (13, 14, 15):
        other, other_emb = create_example_batch(1, D, S, C, A, seed=seed)
        cand_batch = batch._replace(candidate_post_hashes=other.candidate_post_hashes,
                                    candidate_author_hashes=other.candidate_author_hashes,
                                    candidate_product_surface=other.candidate_product_surface)
        cand_emb = emb.__class__(emb.user_embeddings, emb.history_post_embeddings,
                                 other_emb.candidate_post_embeddings, emb.history_author_embeddings,
                                 other_emb.candidate_author_embeddings)
        probs = ranker.score_candidates(prefix, cand_batch, cand_emb)
        np.testing.assert_allclose(probs, ranker.rank(cand_batch, cand_emb).scores, rtol=1e-5, atol=1e-6)
    assert ranker.trace_counts["score_candidates"] - before <= 1


def test_rank_large_bad_chunk_size(ranker):
    batch, emb = create_example_batch(1, D, S, C, A)
    with pytest.raises(ValueError, match="chunk_size"):
        ranker.rank_large(batch, emb, chunk_size=0)


def test_all_candidates_padded(ranker):
    batch, emb = create_example_batch(2, D, S, C, A, seed=16)
    batch = batch._replace(candidate_post_hashes=np.zeros_like(batch.candidate_post_hashes))
    out = ranker.rank(batch, emb)
    assert np.all(np.isfinite(out.scores))
    np.testing.assert_array_equal(out.ranked_indices, np.broadcast_to(np.arange(C), (2, C)))


def test_all_corpus_masked(retriever):
    batch, emb = create_example_batch(3, D, S, C, A, seed=17)  # the user tower's shape of the other tests
    out = retriever.retrieve(batch, emb, top_k=5, corpus_mask=np.zeros(200, bool))
    np.testing.assert_allclose(out.top_k_scores, -1e12)
    np.testing.assert_array_equal(out.top_k_indices, np.broadcast_to(np.arange(5), (3, 5)))


def _uninitialised_calls():
    batch, emb = create_example_batch(1, D, S, C, A)
    ranker = RecsysInferenceRunner(ModelRunner(tiny_ranker_config()), name="cold")
    retriever = RecsysRetrievalInferenceRunner(RetrievalModelRunner(tiny_retrieval_config()), name="cold")
    return {
        "rank": lambda: ranker.rank(batch, emb),
        "encode_prefix": lambda: ranker.encode_prefix(batch, emb),
        "score_candidates": lambda: ranker.score_candidates(None, batch, emb),
        "rank_large": lambda: ranker.rank_large(batch, emb),
        "embed": lambda: ranker.embed(batch),
        "retrieve": lambda: retriever.retrieve(batch, emb, top_k=1),
        "encode_user": lambda: retriever.encode_user(batch, emb),
        "encode_candidates": lambda: retriever.encode_candidates(batch, emb),
        "retriever-embed": lambda: retriever.embed(batch),
    }


UNINITIALISED_CALLS = _uninitialised_calls()


@pytest.mark.parametrize("call", UNINITIALISED_CALLS.values(), ids=UNINITIALISED_CALLS.keys())
def test_entry_points_before_initialize_say_so(call):
    with pytest.raises(RuntimeError, match=r"Recsys\w*InferenceRunner 'cold': call initialize\(\) first \(before \w+\("):
        call()


def test_set_corpus_before_initialize_is_fine():
    """set_corpus needs only the config, so it may come first; retrieval then uses that corpus."""
    r = RecsysRetrievalInferenceRunner(RetrievalModelRunner(tiny_retrieval_config()))
    corpus, ids = create_example_corpus(20, D)
    r.set_corpus(corpus, ids)
    r.initialize()
    batch, emb = create_example_batch(3, D, S, C, A, seed=18)  # the user tower's shape of the other tests
    user = np.asarray(r.encode_user(batch, emb))
    np.testing.assert_array_equal(r.retrieve(batch, emb, top_k=4).top_k_indices, ref.top_k(user @ corpus.T, 4)[0])


def _without_candidates(batch, emb):
    return (batch._replace(candidate_post_hashes=batch.candidate_post_hashes[:, :0],
                           candidate_author_hashes=batch.candidate_author_hashes[:, :0],
                           candidate_product_surface=batch.candidate_product_surface[:, :0]),
            emb.__class__(emb.user_embeddings, emb.history_post_embeddings, emb.candidate_post_embeddings[:, :0],
                          emb.history_author_embeddings, emb.candidate_author_embeddings[:, :0]))


# id -> (call(ranker, batch, emb, prefix), error, message)
RANKER_ERRORS = {
    "candidate_start=-1": (lambda r, b, e, p: r.score_candidates(p, b, e, candidate_start=-1), ValueError,
                           r"candidate_start: expected an int >= 0, got -1"),
    "candidate_start-float": (lambda r, b, e, p: r.score_candidates(p, b, e, candidate_start=1.5), TypeError,
                              r"candidate_start: expected an int >= 0, got float 1.5"),
    "candidate_start-bool": (lambda r, b, e, p: r.score_candidates(p, b, e, candidate_start=True), TypeError,
                             r"candidate_start:.*got bool"),
    # Used to raise a bare OverflowError from JAX ("Python integer 2147483648 out of bounds for int32").
    "candidate_start=2**31": (lambda r, b, e, p: r.score_candidates(p, b, e, candidate_start=2**31), ValueError,
                              rf"candidate_start: expected an int in \[0, {2**24 - 1 - S - C}\] \(the candidates' "
                              rf"rotary positions 1\+S\+candidate_start\+c, S={S}, C={C}, must stay below 2\*\*24, "
                              rf"which float32 counts exactly\), got 2147483648"),
    # Below int32's bound but past float32's exact integers: positions used to round silently.
    "candidate_start-past-2**24": (lambda r, b, e, p: r.score_candidates(p, b, e, candidate_start=2**24 - S - C),
                                   ValueError, rf"candidate_start: expected an int in \[0, {2**24 - 1 - S - C}\]"),
    "prefix-not-a-cache": (lambda r, b, e, p: r.score_candidates((1, 2), b, e), TypeError,
                           r"prefix: expected a PrefixCache \(from encode_prefix\), got tuple"),
    "prefix-other-model": (lambda r, b, e, p: r.score_candidates(p._replace(memory=p.memory[:1]), b, e), ValueError,
                           r"prefix: expected keys/values of 2 layers.*got 1"),
    "chunk_size-bool": (lambda r, b, e, p: r.rank_large(b, e, chunk_size=True), TypeError,
                        r"chunk_size: expected an int >= 1, got bool True"),
    "chunk_size-float": (lambda r, b, e, p: r.rank_large(b, e, chunk_size=2.0), TypeError, r"chunk_size:.*float"),
    "chunk_size-negative": (lambda r, b, e, p: r.rank_large(b, e, chunk_size=-2), ValueError,
                                  r"chunk_size: expected an int >= 1, got -2"),
    "rank_large-no-candidates": (lambda r, b, e, p: r.rank_large(*_without_candidates(b, e)), ValueError,
                                 r"batch.candidate_post_hashes: expected at least 1 candidate"),
}


@pytest.mark.parametrize("call, error, message", RANKER_ERRORS.values(), ids=RANKER_ERRORS.keys())
def test_ranker_bad_arguments_raise_clear_errors(ranker, call, error, message):
    batch, emb = create_example_batch(1, D, S, C, A, seed=19)
    prefix = ranker.encode_prefix(batch, emb)
    with pytest.raises(error, match=message):
        call(ranker, batch, emb, prefix)


def test_numpy_ints_are_valid_chunk_sizes_and_offsets(ranker):
    batch, emb = create_example_batch(2, D, S, 11, A, seed=20)  # test_rank_large_equals_rank's shapes and programs
    whole = ranker.rank(batch, emb)
    np.testing.assert_allclose(ranker.rank_large(batch, emb, chunk_size=np.int64(3)).scores, whole.scores,
                               rtol=1e-5, atol=1e-6)
    prefix = ranker.encode_prefix(batch, emb)
    np.testing.assert_array_equal(ranker.score_candidates(prefix, batch, emb, candidate_start=np.int32(2)),
                                  ranker.score_candidates(prefix, batch, emb, candidate_start=2))


def test_candidate_start_bound_is_the_last_exact_float32_position(ranker):
    """The last start whose positions float32 holds exactly (1 + S + start + C - 1 = 2**24 - 1) is
    accepted; one more is refused."""
    batch, emb = create_example_batch(1, D, S, C, A, seed=21)
    prefix = ranker.encode_prefix(batch, emb)
    last = 2**24 - 1 - S - C
    probs = ranker.score_candidates(prefix, batch, emb, candidate_start=last)
    assert probs.shape == (1, C, A) and np.all(np.isfinite(probs))
    with pytest.raises(ValueError, match=rf"candidate_start: expected an int in \[0, {last}\].*got {last + 1}$"):
        ranker.score_candidates(prefix, batch, emb, candidate_start=last + 1)


def _without_history(batch, emb):
    return (batch._replace(history_post_hashes=batch.history_post_hashes[:, :0],
                           history_author_hashes=batch.history_author_hashes[:, :0],
                           history_actions=batch.history_actions[:, :0],
                           history_product_surface=batch.history_product_surface[:, :0]),
            emb.__class__(emb.user_embeddings, emb.history_post_embeddings[:, :0], emb.candidate_post_embeddings,
                          emb.history_author_embeddings[:, :0], emb.candidate_author_embeddings))


def test_users_without_history_rank_as_the_reference(ranker):
    """S = 0 (no history positions) used to fail inside JAX on the isolated path ("integer modulo
    by zero" in a reshape); it now equals the NumPy reference of the release's arithmetic."""
    batch, emb = _without_history(*create_example_batch(2, D, S, C, A, seed=22))
    want = 1 / (1 + np.exp(-ref.ranker_logits(ranker.params, batch, emb, ranker.runner.model)))
    np.testing.assert_allclose(ranker.rank(batch, emb).scores, want, rtol=1e-4, atol=1e-5)


MISMATCHED_RUNNERS = {
    "ranker-with-retrieval-config": (lambda: ModelRunner(tiny_retrieval_config()), TypeError,
                                     r"model: expected a PhoenixModelConfig, got PhoenixRetrievalModelConfig; "
                                     r"a retrieval config goes to RecsysRetrievalInferenceRunner"),
    "retrieval-with-ranker-config": (lambda: RetrievalModelRunner(tiny_ranker_config()), TypeError,
                                     r"model: expected a PhoenixRetrievalModelConfig, got PhoenixModelConfig"),
    "ranking-runner-around-retrieval": (
        lambda: RecsysInferenceRunner(RetrievalModelRunner(tiny_retrieval_config())), TypeError,
        r"runner: expected a ModelRunner for RecsysInferenceRunner, got RetrievalModelRunner"),
    "retrieval-runner-around-ranker": (
        lambda: RecsysRetrievalInferenceRunner(ModelRunner(tiny_ranker_config())), TypeError,
        r"runner: expected a RetrievalModelRunner"),
    "bs_per_device-nan": (lambda: ModelRunner(tiny_ranker_config(), bs_per_device=float("nan")), ValueError,
                          r"bs_per_device: expected a finite number > 0, got nan"),
    "bs_per_device-zero": (lambda: ModelRunner(tiny_ranker_config(), bs_per_device=0), ValueError, r"bs_per_device"),
}


@pytest.mark.parametrize("call, error, message", MISMATCHED_RUNNERS.values(), ids=MISMATCHED_RUNNERS.keys())
def test_mismatched_configs_and_runners_are_refused_before_haiku(call, error, message):
    with pytest.raises(error, match=message):
        call()
