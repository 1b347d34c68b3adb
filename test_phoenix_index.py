"""Tests for phoenix_index.py: the contract (a score is a function of (user, row) only), exact and
sharded top-k vs brute force over `exact_scores`, adversarial corpora (hypothesis), aliasing, FAISS,
errors.

Brute force here is `exact_scores` (checked against an independent NumPy twin of its definition)
followed by a stable NumPy sort, and every exact search must equal it bit for bit: indices and
scores. Many corpora are small integers, whose dot products are exact in any order, so they also
check ties (corpus-index order) against plain float32 arithmetic.
"""

import gc
import mmap
import os
import subprocess
import sys
import textwrap

import hypothesis
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import phoenix_index as index
from phoenix_index import INF, CorpusIndex, FaissIndex, ShardedCorpusIndex, exact_scores
from phoenix_metrics import topk_recall as recall_at_k

MASKED = np.float32(-INF)  # what a masked entry scores in float32
MIN_FAISS_RECALL = 0.95  # clustered corpus, default nprobe: measured 1.0 (0.98 at nprobe=4)
# Fused multiply-add detector: with one rounding, A * A + C = 2^-24; with two (product rounded to
# float32 first, as the canonical score does), 0.
FMA_A, FMA_C = np.float32(1 + 2**-12), np.float32(-(1 + 2**-11))
# Few examples, always the same ones (CI is deterministic); shapes fixed per test so each compiles once.
PROPERTY_SETTINGS = hypothesis.settings(max_examples=8, deadline=None, derandomize=True, database=None,
                                        suppress_health_check=[hypothesis.HealthCheck.too_slow])


def brute_force(user, corpus, top_k, corpus_mask=None):
    """Reference: `exact_scores` [B, N], masked entries -INF, stable descending sort."""
    scores = np.asarray(exact_scores(np.asarray(user, np.float32), np.asarray(corpus, np.float32)))  # [B, N]
    if corpus_mask is not None:
        scores = np.where(corpus_mask[None, :], scores, MASKED)
    order = np.argsort(-scores, axis=1, kind="stable")[:, :top_k]  # [B, K]
    return order, np.take_along_axis(scores, order, axis=1)


def numpy_canonical(user, corpus):
    """The canonical score's definition in NumPy (no fused multiply-add, no flush to zero): float32
    products, zero-padded to a power of two, halved pairwise (x[:h] + x[h:]) -> [B, N]."""
    products = np.asarray(user, np.float32)[:, None, :] * np.asarray(corpus, np.float32)[None]  # [B, N, D]
    width = 1 << (products.shape[-1] - 1).bit_length()
    products = np.concatenate([products, np.zeros(products.shape[:-1] + (width - products.shape[-1],),
                                                  np.float32)], axis=-1)
    while width > 1:
        width //= 2
        products = products[..., :width] + products[..., width:]
    return products[..., 0] + np.float32(0)  # -0.0 -> +0.0


def int_corpus(num_rows, dim, batch, seed=0, valid_fraction=0.7):
    """Small-integer user [B, D], corpus [N, D] and a random mask [N]: exact scores, many ties."""
    rng = np.random.default_rng(seed)
    corpus = rng.integers(-2, 3, (num_rows, dim)).astype(np.float32)
    user = rng.integers(-2, 3, (batch, dim)).astype(np.float32)
    return user, corpus, rng.random(num_rows) < valid_fraction


def unit_rows(x):
    return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


def assert_same_as_brute_force(search_out, user, corpus, top_k, corpus_mask=None):
    """Indices and scores equal brute force's bit for bit."""
    indices, scores = (np.asarray(a) for a in search_out[:2])
    want_indices, want_scores = brute_force(user, corpus, top_k, corpus_mask)
    assert indices.dtype == np.int32 and scores.dtype == np.float32
    np.testing.assert_array_equal(indices, want_indices)
    np.testing.assert_array_equal(scores.view(np.uint32), want_scores.view(np.uint32))


# (N, D, B, K, chunk_size, block_size); None = automatic.
EXACT_CASES = {
    "B=1": (1000, 8, 1, 10, None, None),
    "auto-direct": (3000, 8, 4, 100, None, None),
    "auto-two-stage": (20000, 8, 2, 10, None, None),
    "B=16": (1000, 8, 16, 25, None, None),
    "B=16-chunked": (2000, 8, 16, 50, 256, 8),
    "ragged-last-chunk": (1000, 8, 3, 40, 96, 8),
    "ragged-last-block": (1003, 8, 2, 30, 128, 8),
    "chunk>N": (500, 8, 2, 20, 4096, 4),
    "K=N": (300, 4, 2, 300, 64, 8),
    "K=1": (700, 8, 4, 1, 64, 16),
    "K>blocks": (900, 8, 2, 200, 128, 8),
    "block=1": (600, 8, 2, 30, 64, 1),
    "block>N": (50, 4, 2, 20, None, 64),
    "N=1": (1, 4, 2, 1, None, None),
}


@pytest.mark.parametrize("masked", [False, True], ids=["no-mask", "mask"])
@pytest.mark.parametrize("case", EXACT_CASES.values(), ids=EXACT_CASES.keys())
def test_exact_matches_brute_force(case, masked):
    num_rows, dim, batch, top_k, chunk_size, block_size = case
    user, corpus, mask = int_corpus(num_rows, dim, batch)
    mask = mask if masked else None
    idx = CorpusIndex(corpus, chunk_size=chunk_size, block_size=block_size)
    assert_same_as_brute_force(idx.search(user, top_k, mask), user, corpus, top_k, mask)


def test_plan_picks_direct_or_two_stage():
    idx = CorpusIndex(np.zeros((20000, 8), np.float32))
    assert idx.plan(4, 100) == (20000, 1)  # N / K = 200: one top_k over [B, N]
    chunk, block = idx.plan(2, 10)  # N / K = 2000: block pre-selection
    assert block > 1 and chunk % block == 0


def test_exact_unit_vectors_equal_brute_force_and_float64_within_rounding():
    """Random unit vectors (the real use): brute force's indices and scores bit for bit, through the
    float32 pass's band (not a fallback), and the scores within float32 rounding of float64 dot products."""
    rng = np.random.default_rng(1)
    corpus = unit_rows(rng.standard_normal((20000, 32)))  # shapes of test_unit_vectors_are_answered_by_the_fast_passes
    user = unit_rows(rng.standard_normal((16, 32)))
    idx = CorpusIndex(corpus, chunk_size=2048, block_size=8, coarse=False)
    out = idx._search(user, 50)
    assert_same_as_brute_force(out, user, corpus, 50)
    assert index.STAGES[int(out[2])] == "float32"
    indices, scores = np.asarray(out[0]), np.asarray(out[1])
    exact = np.take_along_axis(user.astype(np.float64) @ corpus.T.astype(np.float64), indices, axis=1)  # [B, K]
    np.testing.assert_allclose(scores, exact, rtol=0, atol=index._dot_rounding(32))  # |u| = |x| = 1
    assert all(len(set(row)) == 50 for row in indices)


def test_ties_come_in_index_order():
    corpus = np.ones((900, 8), np.float32)  # every score ties; EXACT_CASES["K>blocks"]'s shape (compiled once)
    indices, scores = CorpusIndex(corpus, block_size=8, chunk_size=128).search(np.ones((2, 8)), 200)
    np.testing.assert_array_equal(np.asarray(indices), np.tile(np.arange(200), (2, 1)))
    np.testing.assert_array_equal(np.asarray(scores), np.full((2, 200), 8.0))


# --- The contract: a score is a function of (user, row) only --------------------------------------

@pytest.mark.parametrize("dim", [1, 3, 8, 20, 128])
def test_exact_scores_is_its_numpy_definition(dim):
    """`exact_scores` is float32 products summed by the fixed pairwise tree, bit for bit (NumPy has
    no fused multiply-add and no flush to zero; these values never underflow), and within float32
    rounding of the float64 dot product."""
    rng = np.random.default_rng(dim)
    user = rng.standard_normal((3, dim)).astype(np.float32)
    corpus = (rng.standard_normal((517, dim)) * np.exp(rng.uniform(-3, 3, (517, 1)))).astype(np.float32)
    got = np.asarray(exact_scores(user, corpus))  # [B, N]
    np.testing.assert_array_equal(got.view(np.uint32), numpy_canonical(user, corpus).view(np.uint32))
    magnitude = np.abs(user.astype(np.float64)) @ np.abs(corpus.T.astype(np.float64))  # sum |u_i x_i|
    assert (np.abs(got - user.astype(np.float64) @ corpus.T.astype(np.float64))
            <= index._dot_rounding(dim) * magnitude).all()


def test_exact_scores_depend_on_the_pair_only():
    """A (user, row) score does not change with the other users, the other rows, the row's position
    or the chunking of the scan (the shape-dependent rounding a matmul has)."""
    rng = np.random.default_rng(2)
    user = rng.standard_normal((5, 128)).astype(np.float32)
    corpus = rng.standard_normal((300, 128)).astype(np.float32)
    full = np.asarray(exact_scores(user, corpus))  # [B, N]
    for chunk in (1, 7, 64, 300):
        np.testing.assert_array_equal(np.asarray(index._exact_scores(jnp.asarray(user), jnp.asarray(corpus),
                                                                     chunk_size=chunk)), full)
    for b, i in [(0, 0), (4, 299), (2, 137)]:
        alone = np.asarray(exact_scores(user[b:b + 1], corpus[i:i + 1]))[0, 0]
        moved = np.asarray(exact_scores(np.tile(user[b], (3, 1)), np.roll(corpus, 41, axis=0)))[1, (i + 41) % 300]
        assert alone == moved == full[b, i]


def test_exact_scores_never_fuse_multiply_add():
    """XLA CPU contracts a * b + c into one fused multiply-add (one rounding); the canonical score
    rounds every product first, also when the corpus or the users are constants of the caller's jit
    (a constant mask would be folded away) and inside vmap."""
    row = np.zeros(20, np.float32)
    row[0], row[16] = FMA_A, FMA_C  # the tree's first level adds positions i and i + 16
    user = np.zeros((1, 20), np.float32)
    user[0, 0], user[0, 16] = FMA_A, 1.0
    corpus = np.tile(row, (300, 1))
    calls = {
        "direct": lambda: exact_scores(user, corpus),
        "corpus constant": lambda: jax.jit(lambda u: index._canonical(u[:, None, :], jnp.asarray(corpus)[None]))(user),
        "user constant": lambda: jax.jit(lambda c: index._canonical(jnp.asarray(user)[:, None, :], c[None]))(corpus),
        "vmap": lambda: jax.vmap(lambda c: index._canonical(jnp.asarray(user[0]), c))(jnp.asarray(corpus)),
    }
    for name, call in calls.items():
        np.testing.assert_array_equal(np.asarray(call()).ravel(), 0.0, err_msg=name)
    contracted = float(jax.jit(lambda a, c: a * a + c)(FMA_A, FMA_C))
    assert contracted in (0.0, 2.0**-24)  # 2^-24 where this platform fuses (the detector works)


def test_zero_scores_are_positive_zero_and_tie_by_index():
    """A zero user against all-negative rows gives products of -0.0, whose sum is -0.0; XLA's top_k
    (a total order) would put +0.0 scores before it. Scores are +0.0, so all zero scores tie and come
    in index order, as brute force (NumPy) orders them. The shapes of
    test_identical_rows_score_identically[1-float32] (compiled once)."""
    corpus = np.abs(np.random.default_rng(3).standard_normal((1000, 128))).astype(np.float32)
    corpus[::3] *= -1  # rows 0, 3, 6, ...: every product with a zero user is -0.0
    user = np.zeros((1, 128), np.float32)
    scores = np.asarray(exact_scores(user, corpus))
    np.testing.assert_array_equal(scores.view(np.uint32), 0)  # +0.0 bit patterns
    for kwargs in ({}, dict(block_size=4, chunk_size=8)):
        indices, _ = CorpusIndex(corpus, **kwargs).search(user, 7)
        np.testing.assert_array_equal(np.asarray(indices), [np.arange(7)])


@pytest.mark.parametrize("coarse", [False, True], ids=["float32", "coarse"])
@pytest.mark.parametrize("batch", [1, 2])
def test_identical_rows_score_identically(batch, coarse):
    """The issue's case: 1000 identical rows, block_size=4, chunk_size=8. Before: rows
    [24, 25, 26, 27, 0, 1, 2] with 2-4 distinct scores (a matmul rounds each row by its position).
    Now: rows 0-6, one score, brute force's."""
    rng = np.random.default_rng(128)
    corpus = np.tile(rng.standard_normal(128).astype(np.float32), (1000, 1))
    user = rng.standard_normal((batch, 128)).astype(np.float32)
    indices, scores = (np.asarray(a) for a in CorpusIndex(corpus, block_size=4, chunk_size=8,
                                                          coarse=coarse).search(user, 7))
    np.testing.assert_array_equal(indices, np.tile(np.arange(7), (batch, 1)))
    assert len(set(scores.ravel()[:7])) == 1
    assert_same_as_brute_force((indices, scores), user, corpus, 7)


def staircase(num_rows, dim, seed, steps=7):
    """One row repeated, row r with entry r % D moved (r % steps) float32 ulps up: near-ties one
    ulp apart, rows in a random order."""
    rng = np.random.default_rng(seed)
    corpus = np.tile(rng.standard_normal(dim).astype(np.float32), (num_rows, 1))
    for r in range(num_rows):
        for _ in range(r % steps):
            corpus[r, r % dim] = np.nextafter(corpus[r, r % dim], np.float32(np.inf))
    return corpus[rng.permutation(num_rows)]


@pytest.mark.parametrize("coarse", [False, True], ids=["float32", "coarse"])
def test_one_ulp_staircase_with_two_users_equals_brute_force(coarse):
    """The issue's second case: rows one float32 ulp apart searched by 2 users came back in an
    order that differed from brute force (1 user matched)."""
    corpus = staircase(2000, 32, seed=0)
    user = np.random.default_rng(1).standard_normal((2, 32)).astype(np.float32)
    idx = CorpusIndex(corpus, coarse=coarse, block_size=8 if coarse else None)
    for k in (20, 700):
        assert_same_as_brute_force(idx.search(user, k), user, corpus, k)


# Adversarial corpora: N not a multiple of any block or chunk below, D padded to 32 in the tree.
PROPERTY_ROWS, PROPERTY_DIM = 203, 20
FAMILIES = ("identical", "staircase", "duplicates", "ints", "huge", "tiny", "mixed-norms", "fma", "zero-user",
            "unit")


def adversarial(family, batch, seed, num_rows=PROPERTY_ROWS, dim=PROPERTY_DIM):
    """(user [B, D], corpus [N, D]) of one adversarial family, float32."""
    rng = np.random.default_rng(seed)
    user = rng.standard_normal((batch, dim)).astype(np.float32)
    unit = unit_rows(rng.standard_normal((num_rows, dim)))
    if family == "identical":
        corpus = np.tile(unit[0] * np.float32(10.0 ** rng.integers(-3, 4)), (num_rows, 1))
    elif family == "staircase":
        corpus = staircase(num_rows, dim, seed)
    elif family == "duplicates":  # five rows, each repeated at random positions
        corpus = unit[rng.integers(0, 5, num_rows)]
    elif family == "ints":
        corpus = rng.integers(-2, 3, (num_rows, dim)).astype(np.float32)
        user = rng.integers(-2, 3, (batch, dim)).astype(np.float32)
    elif family == "huge":  # |u| * max |x| up to 0.9e38, products near 1e37: nothing may overflow
        corpus = unit * np.float32(1e19) * rng.uniform(0.5, 1.0, (num_rows, 1)).astype(np.float32)
        user = unit_rows(user) * np.float32(9e18)
    elif family == "tiny":  # products around float32's smallest normal: flushed or not, the same everywhere
        corpus = unit * np.float32(10.0 ** rng.uniform(-21, -18))
        user = unit_rows(user) * np.float32(10.0 ** rng.uniform(-21, -18))
    elif family == "mixed-norms":
        corpus = unit * (10.0 ** rng.uniform(-30, 30, (num_rows, 1))).astype(np.float32)
        user = unit_rows(user) * np.float32(10.0 ** rng.uniform(-5, 5))
    elif family == "fma":  # rows whose tree adds A * A + C (see FMA_A), among near copies
        corpus = np.tile(unit[0], (num_rows, 1))
        corpus[::3, 0], corpus[::3, 16] = FMA_A, FMA_C
        user[:, 0], user[:, 16] = FMA_A, 1.0
    elif family == "zero-user":  # every score 0 for the zero users; all-negative rows' products are -0.0
        corpus = unit
        corpus[::4] = -np.abs(corpus[::4])
        user[::2] = 0.0
    else:
        corpus = unit
    return user.astype(np.float32), corpus.astype(np.float32)


def property_mask(rng, num_rows):
    """All rows valid, almost none, or most; drawn per example."""
    return rng.random(num_rows) < rng.choice([0.02, 0.7, 1.0])


# id: (index class, constructor kwargs); every public exact index and every kind of setting.
INDEX_SETTINGS = {
    "auto": (CorpusIndex, {}),
    "block4-chunk8": (CorpusIndex, dict(block_size=4, chunk_size=8, coarse=False)),
    "block4-chunk8-coarse": (CorpusIndex, dict(block_size=4, chunk_size=8, coarse=True)),
    "block8-chunk24": (CorpusIndex, dict(block_size=8, chunk_size=24, coarse=False)),
    "block8-coarse": (CorpusIndex, dict(block_size=8, coarse=True)),
    "block1-chunk16": (CorpusIndex, dict(block_size=1, chunk_size=16)),
    "one-block": (CorpusIndex, dict(block_size=256)),
    "sharded-auto": (ShardedCorpusIndex, {}),
    "sharded-block4-chunk8": (ShardedCorpusIndex, dict(block_size=4, chunk_size=8)),
}
# Two (B, K, masked) per setting, rotating, so every setting sees 1 user and several, and over
# the settings B = 1, 2, 3, 16 and K = 1, 37, N - 1, N all occur (one compile each).
_N = PROPERTY_ROWS
SEARCH_SHAPES = [((1, _N, False), (16, 37, True)), ((1, 1, True), (2, _N - 1, False)), ((1, 37, False), (3, _N, True))]
PROPERTY_CASES = {f"{name}-B{b}-K{k}{'-mask' if m else ''}": (name, b, k, m)
                  for i, name in enumerate(INDEX_SETTINGS) for b, k, m in SEARCH_SHAPES[i % 3]}


@pytest.mark.parametrize("setting, batch, top_k, masked", PROPERTY_CASES.values(), ids=PROPERTY_CASES.keys())
@PROPERTY_SETTINGS
@hypothesis.given(seed=st.integers(0, 2**16))
def test_every_index_equals_brute_force_on_adversarial_corpora(setting, batch, top_k, masked, seed):
    """Every family (all rows identical, 1-ulp staircases, duplicates, small-integer ties, norms near
    float32's overflow and underflow, rows a fused multiply-add would score differently, zero
    users, unit vectors): indices and scores equal brute force over `exact_scores` bit for bit, so
    identical rows score identically and ties come in index order."""
    cls, kwargs = INDEX_SETTINGS[setting]
    for family in FAMILIES:
        user, corpus = adversarial(family, batch, seed)
        mask = property_mask(np.random.default_rng(seed), PROPERTY_ROWS) if masked else None
        out = cls(corpus, **kwargs).search(user, top_k, mask)
        try:
            assert_same_as_brute_force(out, user, corpus, top_k, mask)
        except AssertionError as err:
            raise AssertionError(f"family {family}") from err


def test_top_k_above_valid_count_fills_tail_with_masked_entries():
    user, corpus, _ = int_corpus(1000, 8, 3)  # EXACT_CASES["ragged-last-chunk"]'s shape (compiled once)
    mask = np.zeros(1000, bool)
    mask[[5, 77, 300, 999]] = True
    idx = CorpusIndex(corpus, chunk_size=96, block_size=8)
    indices, scores = (np.asarray(a) for a in idx.search(user, 40, mask))
    assert set(indices[0, :4]) == {5, 77, 300, 999}
    lowest_masked = [i for i in range(1000) if not mask[i]][:36]  # 0-4, 6-36
    np.testing.assert_array_equal(indices[:, 4:], np.tile(lowest_masked, (3, 1)))
    np.testing.assert_array_equal(scores[:, 4:], MASKED)
    assert_same_as_brute_force((indices, scores), user, corpus, 40, mask)


def test_all_masked_corpus_returns_lowest_indices_at_minus_inf():
    user, corpus, _ = int_corpus(3000, 8, 4)  # EXACT_CASES["auto-direct"]'s shape (compiled once)
    indices, scores = CorpusIndex(corpus).search(user, 100, np.zeros(3000, bool))
    np.testing.assert_array_equal(np.asarray(indices), np.tile(np.arange(100), (4, 1)))
    np.testing.assert_array_equal(np.asarray(scores), MASKED)


def test_mask_changes_only_masked_entries():
    """Masking entries outside the unmasked top-k leaves the result unchanged."""
    user, corpus, _ = int_corpus(1000, 8, 1)  # EXACT_CASES["B=1"]'s shape, with and without a mask
    idx = CorpusIndex(corpus)
    indices, scores = (np.asarray(a) for a in idx.search(user, 10))
    mask = np.zeros(1000, bool)
    mask[indices[0]] = True
    masked_indices, masked_scores = (np.asarray(a) for a in idx.search(user, 10, mask))
    np.testing.assert_array_equal(masked_indices, indices)
    np.testing.assert_array_equal(masked_scores, scores)


def test_post_ids_map_indices():
    user, corpus, _ = int_corpus(3000, 8, 4)  # EXACT_CASES["auto-direct"]'s shape (compiled once)
    post_ids = 10_000 + 7 * np.arange(3000, dtype=np.int64)
    idx = CorpusIndex(corpus, post_ids)
    indices, _ = idx.search(user, 100)
    np.testing.assert_array_equal(idx.post_ids(indices), post_ids[np.asarray(indices)])
    np.testing.assert_array_equal(CorpusIndex(corpus).post_ids(indices), np.asarray(indices))


def test_bf16_query_and_jax_inputs():
    user, corpus, mask = int_corpus(1000, 8, 16)  # EXACT_CASES["B=16"]'s shape (compiled once)
    idx = CorpusIndex(jnp.asarray(corpus))
    out = idx.search(jnp.asarray(user, jnp.bfloat16), 25, jnp.asarray(mask))  # small ints: exact in bf16
    assert isinstance(out[0], jax.Array)
    assert_same_as_brute_force(out, user, corpus, 25, mask)


def test_search_compiles_once_per_shape():
    user, corpus, mask = int_corpus(900, 8, 4)
    idx = CorpusIndex(corpus)  # the direct plan: the cheapest programs to compile, the same jitted search
    assert idx.plan(4, 17)[1] == idx.plan(4, 18)[1] == 1
    before = index.TRACE_COUNTS["exact"]
    for seed in range(3):  # new values, NumPy and jax inputs: same (B, K) -> one trace
        query = np.random.default_rng(seed).standard_normal((4, 8)).astype(np.float32)
        idx.search(query if seed % 2 else jnp.asarray(query), 17)
    assert index.TRACE_COUNTS["exact"] == before + 1
    CorpusIndex(corpus).search(user, 17)  # another index of the same shape
    assert index.TRACE_COUNTS["exact"] == before + 1
    idx.search(user, 18)
    idx.search(user, 18, mask)
    assert index.TRACE_COUNTS["exact"] == before + 3


def _advised_huge(address: int) -> bool:
    """Whether the mapping holding `address` is advised for huge pages ("hg" in its VmFlags)."""
    mapping = None
    for line in open("/proc/self/smaps"):
        first = line.split()[0]
        if "-" in first and ":" not in first:  # a mapping's header: "start-end perms ..."
            low, high = (int(v, 16) for v in first.split("-"))
            mapping = low <= address < high
        elif mapping and line.startswith("VmFlags:"):
            return "hg" in line.split()
    return False


def test_large_aligned_buffers_and_the_coarse_copy_are_advised_for_huge_pages(monkeypatch):
    """The threshold is patched down (the code path is the same at any size) so that a small corpus's
    coarse copy crosses it; the searches reuse `test_identical_rows_score_identically`'s shapes."""
    if not (sys.platform.startswith("linux") and hasattr(mmap, "MADV_HUGEPAGE")) or jax.default_backend() != "cpu":
        pytest.skip("madvise(MADV_HUGEPAGE) and host aliasing: Linux, CPU backend")
    monkeypatch.setattr(index, "HUGE_PAGE_MIN_BYTES", 2**17)
    small, large = index.aligned_empty((16, 16)), index.aligned_empty((index.HUGE_PAGE_MIN_BYTES // 512, 128))
    assert large.ctypes.data % mmap.PAGESIZE == 0 and large.flags.writeable and large.flags.c_contiguous
    assert _advised_huge(large.ctypes.data) and not _advised_huge(small.ctypes.data)
    corpus = np.random.default_rng(0).standard_normal((1000, 128)).astype(np.float32)  # copy: 1000 * 256 bytes
    assert 1000 * 128 * 2 >= index.HUGE_PAGE_MIN_BYTES
    idx = CorpusIndex(corpus, coarse=True, block_size=4, chunk_size=8)
    pointer = idx.coarse_embeddings.unsafe_buffer_pointer()
    assert pointer % mmap.PAGESIZE == 0 and _advised_huge(pointer)
    want = jnp.asarray(corpus).astype(jnp.bfloat16)
    np.testing.assert_array_equal(np.asarray(idx.coarse_embeddings),
                                  np.asarray(jax.lax.bitcast_convert_type(want, jnp.uint16)))
    del corpus, large
    gc.collect()  # the index's arrays keep their buffers alive
    user = np.ones((2, 128), np.float32)
    plain = CorpusIndex(idx.corpus_embeddings, coarse=False, block_size=4, chunk_size=8)
    np.testing.assert_array_equal(np.asarray(idx.search(user, 7)[0]), np.asarray(plain.search(user, 7)[0]))


def test_aliased_corpus_becomes_read_only_and_copies_stay_writable():
    """An aligned float32 NumPy corpus is held in place on CPU, so it is made read-only, with the
    array it views: writing to it raises instead of leaving the index reading a corpus that matches
    neither version (before: the write went through, the float32 scan saw the new rows and the
    coarse copy the old ones). A corpus the index copies (not 64-byte aligned, or not float32)
    stays writable, and writing to it changes nothing the index returns."""
    if jax.default_backend() != "cpu":
        pytest.skip("zero-copy aliasing of host memory is a CPU property")
    # The shapes of test_one_ulp_staircase_with_two_users_equals_brute_force at K = 20 (its coarse
    # search compiles once); 2000 rows: one shard of whole 16-row groups.
    user, original, _ = int_corpus(2000, 32, 2)
    for cls in (CorpusIndex, ShardedCorpusIndex):
        corpus = index.aligned_empty(original.shape)
        corpus[:] = original
        idx = cls(corpus, block_size=8)
        assert idx.corpus_embeddings.addressable_shards[0].data.unsafe_buffer_pointer() == corpus.ctypes.data
        with pytest.raises(ValueError, match="read-only"):
            corpus[3] = 100.0
        with pytest.raises(ValueError, match="read-only"):
            corpus.base[:] = 0  # the buffer it is a view of
        assert_same_as_brute_force(idx.search(user, 20), user, original, 20)
    buffer = index.aligned_empty((original.size + 1,))
    for corpus in (buffer[1:].reshape(original.shape), original.astype(np.float64)):  # 4 bytes off alignment; float64
        corpus[:] = original
        idx = CorpusIndex(corpus, block_size=8, coarse=True)
        corpus[:] = -corpus  # allowed: the index holds its own copy
        assert_same_as_brute_force(idx.search(user, 20), user, original, 20)


def test_corpus_is_not_copied_when_aligned():
    if jax.default_backend() != "cpu":
        pytest.skip("zero-copy aliasing of host memory is a CPU property")
    corpus = index.aligned_empty((256, 16))
    assert corpus.ctypes.data % index.CPU_ALIGNMENT_BYTES == 0
    corpus[:] = np.random.default_rng(0).standard_normal(corpus.shape)
    idx = CorpusIndex(corpus)
    assert idx.corpus_embeddings.unsafe_buffer_pointer() == corpus.ctypes.data


def test_single_device_mesh_matches_brute_force():
    user, corpus, mask = int_corpus(1000, 8, 3)
    idx = ShardedCorpusIndex(corpus, chunk_size=128, block_size=8)
    for m in (None, mask):
        assert_same_as_brute_force(idx.search(user, 60, m), user, corpus, 60, m)


EIGHT_DEVICE_SCRIPT = textwrap.dedent("""
    import sys
    import numpy as np
    import jax
    import phoenix_index as index
    from test_phoenix_index import assert_same_as_brute_force, int_corpus, unit_rows

    assert "faiss" not in sys.modules, "phoenix_index.py must import faiss lazily"
    assert jax.device_count() == 8, jax.devices()
    # (N, D, B, K, chunk_size, block_size): N not a multiple of 8 * 16 rows, K above a shard's
    # 32 rows, ragged chunks (the adversarial families' masked shape below: compiled once); fewer
    # rows than shards; automatic sizes with B=16.
    cases = [(203, 20, 3, 37, 8, 4), (5, 4, 1, 5, None, None), (3000, 8, 16, 100, None, None)]
    for n, d, b, k, chunk, block in cases:
        user, corpus, mask = int_corpus(n, d, b, seed=n)
        sharded = index.ShardedCorpusIndex(corpus, chunk_size=chunk, block_size=block)
        assert len(sharded.corpus_embeddings.sharding.device_set) == 8
        for m in (None, mask):
            assert_same_as_brute_force(sharded.search(user, k, m), user, corpus, k, m)
    rng = np.random.default_rng(0)
    corpus, user = unit_rows(rng.standard_normal((4096, 16))), unit_rows(rng.standard_normal((2, 16)))
    got = index.ShardedCorpusIndex(corpus).search(user, 50)
    want = index.CorpusIndex(corpus).search(user, 50)
    np.testing.assert_array_equal(np.asarray(got[0]), np.asarray(want[0]))
    # jax.make_mesh's explicit axes; a corpus already sharded the way the index wants (as each
    # host would build it) is used as is, any other is padded and placed.
    # Adversarial corpora (203 rows: ragged shards), brute force over exact_scores bit for bit.
    from test_phoenix_index import FAMILIES, PROPERTY_ROWS, adversarial, property_mask
    for kwargs, b, k, masked in [({}, 1, PROPERTY_ROWS, False), (dict(block_size=4, chunk_size=8), 3, 37, True)]:
        for family in FAMILIES:
            user, corpus = adversarial(family, b, seed=7)
            m = property_mask(np.random.default_rng(7), PROPERTY_ROWS) if masked else None
            out = index.ShardedCorpusIndex(corpus, **kwargs).search(user, k, m)
            assert_same_as_brute_force(out, user, corpus, k, m)
    mesh = jax.make_mesh((8,), ("corpus",))
    for n in (800, 801):
        user, corpus, mask = int_corpus(n, 8, 2)
        placed = jax.device_put(corpus, jax.sharding.NamedSharding(mesh, jax.P("corpus", None))) if n == 800 else corpus
        sharded = index.ShardedCorpusIndex(placed, mesh=mesh)
        assert (sharded.corpus_embeddings is placed) == (n == 800), n
        assert_same_as_brute_force(sharded.search(user, 120, mask), user, corpus, 120, mask)
    print("OK")
""")


def test_eight_devices_match_brute_force_and_one_device():
    """The XLA flag must be set before jax is imported, hence a fresh interpreter."""
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
    here = os.path.dirname(os.path.abspath(__file__))
    proc = subprocess.run([sys.executable, "-c", EIGHT_DEVICE_SCRIPT], cwd=here, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.strip().endswith("OK")


def _error_cases():
    user, corpus, mask = int_corpus(50, 8, 2)
    idx = lambda **kw: CorpusIndex(corpus, **kw)
    nan_corpus, inf_corpus = corpus.copy(), corpus.copy()
    nan_corpus[17, 3] = np.nan
    inf_corpus[4, 0] = np.inf
    nan_user, inf_user = user.copy(), user.copy()
    nan_user[1, 2] = np.nan
    inf_user[0, 7] = -np.inf
    return {
        "top_k=0": (lambda: idx().search(user, 0), ValueError, r"top_k: expected 1 <= top_k <= 50.*got 0"),
        "top_k>N": (lambda: idx().search(user, 51), ValueError, r"top_k: expected 1 <= top_k <= 50.*got 51"),
        "top_k<0": (lambda: idx().search(user, -3), ValueError, r"top_k.*got -3"),
        "top_k-float": (lambda: idx().search(user, 2.5), TypeError, r"top_k: expected an int, got float"),
        "top_k-bool": (lambda: idx().search(user, True), TypeError, r"top_k: expected an int, got bool"),
        "query-wrong-D": (lambda: idx().search(user[:, :5], 3), ValueError,
                          r"user_representation: expected shape \[\*, 8\], got shape \(2, 5\)"),
        "query-1d": (lambda: idx().search(user[0], 3), ValueError, r"user_representation: expected rank 2"),
        "query-int": (lambda: idx().search(user.astype(np.int32), 3), TypeError,
                      r"user_representation: expected float dtype, got dtype int32"),
        "query-empty-batch": (lambda: idx().search(user[:0], 3), ValueError, r"user_representation.*at least one"),
        "mask-wrong-length": (lambda: idx().search(user, 3, mask[:49]), ValueError,
                              r"corpus_mask: expected shape \[50\], got shape \(49,\)"),
        "mask-not-bool": (lambda: idx().search(user, 3, mask.astype(np.int32)), TypeError,
                          r"corpus_mask: expected bool dtype, got dtype int32"),
        "mask-2d": (lambda: idx().search(user, 3, mask[None]), ValueError, r"corpus_mask: expected rank 1"),
        "corpus-empty": (lambda: CorpusIndex(np.zeros((0, 8), np.float32)), ValueError,
                         r"corpus_embeddings: expected a non-empty \[N, D\] array, got shape \(0, 8\)"),
        "corpus-1d": (lambda: CorpusIndex(np.zeros(8, np.float32)), ValueError, r"corpus_embeddings: expected rank 2"),
        "corpus-int": (lambda: CorpusIndex(corpus.astype(np.int64)), TypeError, r"corpus_embeddings: expected float"),
        "corpus-nan": (lambda: CorpusIndex(nan_corpus), ValueError, r"corpus_embeddings:.*NaN or inf in 1 rows.*row 17"),
        "corpus-inf": (lambda: CorpusIndex(inf_corpus), ValueError, r"corpus_embeddings:.*NaN or inf.*row 4"),
        "sharded-corpus-nan": (lambda: ShardedCorpusIndex(nan_corpus), ValueError, r"NaN or inf.*row 17"),
        "post-ids-length": (lambda: CorpusIndex(corpus, np.arange(49)), ValueError,
                            r"corpus_post_ids: expected shape \(50,\).*got shape \(49,\)"),
        "chunk_size=0": (lambda: CorpusIndex(corpus, chunk_size=0), ValueError, r"chunk_size: expected a positive int, got 0"),
        "block_size-float": (lambda: CorpusIndex(corpus, block_size=2.0), TypeError, r"block_size: expected a positive int"),
        "sharded-bad-axis": (lambda: ShardedCorpusIndex(corpus, axis_name="rows", mesh=jax.make_mesh((1,), ("x",))),
                             ValueError, r"axis_name: expected one of \('x',\), got 'rows'"),
        "query-nan": (lambda: idx().search(nan_user, 3), ValueError,
                      r"user_representation: expected finite values, got NaN or inf in 1 rows \(first: row 1\)"),
        "query-inf": (lambda: idx().search(inf_user, 3), ValueError, r"user_representation:.*NaN or inf.*row 0"),
        "query-nan-jax": (lambda: idx().search(jnp.asarray(nan_user), 3), ValueError,
                          r"user_representation:.*NaN or inf.*row 1"),
        "query-overflows-float32": (lambda: idx().search(np.full((1, 8), 1e39), 3), ValueError,
                                    r"user_representation:.*NaN or inf"),
        "query-nan-masked": (lambda: idx().search(nan_user, 3, mask), ValueError, r"user_representation:.*NaN"),
        "sharded-query-nan": (lambda: ShardedCorpusIndex(corpus).search(nan_user, 3), ValueError,
                              r"user_representation:.*NaN or inf.*row 1"),
        "chunk_size-bool": (lambda: CorpusIndex(corpus, chunk_size=True), TypeError,
                            r"chunk_size: expected a positive int, got bool"),
        "block_size-numpy-bool": (lambda: CorpusIndex(corpus, block_size=np.True_), TypeError, r"block_size:.*got bool"),
        "block_size=-1": (lambda: CorpusIndex(corpus, block_size=-1), ValueError,
                          r"block_size: expected a positive int, got -1"),
        "sharded-chunk_size-bool": (lambda: ShardedCorpusIndex(corpus, chunk_size=True), TypeError, r"chunk_size"),
        "post-ids-float": (lambda: CorpusIndex(corpus, np.arange(50.0)), TypeError,
                           r"corpus_post_ids: expected integer dtype, got dtype float64"),
        "post_ids-below-minus-one": (lambda: idx().post_ids(np.array([[0, -2]])), ValueError,
                                     r"indices: expected corpus indices in \[-1, 50\), got range \[-2, 0\]"),
        "post_ids-past-the-end": (lambda: CorpusIndex(corpus, np.arange(50) + 7).post_ids(np.array([[50]])),
                                  ValueError, r"indices: expected corpus indices in \[-1, 50\)"),
        "post_ids-float": (lambda: idx().post_ids(np.array([[1.0]])), TypeError, r"indices: expected integer"),
    }


ERROR_CASES = _error_cases()


@pytest.mark.parametrize("call, error, message", ERROR_CASES.values(), ids=ERROR_CASES.keys())
def test_bad_arguments_raise_clear_errors(call, error, message):
    with pytest.raises(error, match=message):
        call()


def test_numpy_ints_are_valid_sizes():
    user, corpus, mask = int_corpus(1003, 8, 2)  # EXACT_CASES["ragged-last-block"]'s shape (compiled once)
    idx = CorpusIndex(corpus, chunk_size=np.int64(128), block_size=np.int32(8))
    assert idx.plan(2, 30) == (128, 8) and type(idx.chunk_size) is int
    assert_same_as_brute_force(idx.search(user, np.int64(30), mask), user, corpus, 30, mask)


def test_finite_check_can_be_switched_off_for_trusted_loops(monkeypatch):
    """PHOENIX_VALIDATE_VALUES=0 skips the query's value check (its sync), as for the models."""
    user, corpus, _ = int_corpus(50, 8, 2)
    user[0, 0] = np.nan
    monkeypatch.setenv("PHOENIX_VALIDATE_VALUES", "0")
    _, scores = CorpusIndex(corpus).search(user, 3)
    assert np.isnan(np.asarray(scores)[0]).all()


@pytest.mark.parametrize("column", [0, 63, 127])
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf], ids=["nan", "inf", "-inf"])
def test_non_finite_value_anywhere_in_a_large_corpus_is_caught(bad, column):
    """Large enough that XLA CPU hands the row reduction to XNNPACK (whose max drops NaNs)."""
    corpus = np.full((100_000, 128), 0.5, np.float32)
    corpus[54_321, column] = bad
    with pytest.raises(ValueError, match=r"corpus_embeddings:.*NaN or inf in 1 rows \(first: row 54321\)"):
        CorpusIndex(corpus)


def clustered(num_rows, dim, num_clusters, seed, spread=0.5):
    """Unit vectors around random centres: the structure IVF relies on (and real embeddings have)."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((num_clusters, dim))
    return unit_rows(centres[rng.integers(0, num_clusters, num_rows)] + spread * rng.standard_normal((num_rows, dim)))


@pytest.fixture(scope="module")
def faiss_setup():
    import faiss  # noqa: F401 (a dev dependency: its absence is a failure, not a skip)
    corpus = clustered(20_000, 32, 50, seed=0)
    user = unit_rows(corpus[:8] + 0.1 * np.random.default_rng(1).standard_normal((8, 32)))
    return corpus, user, FaissIndex(corpus)


def test_faiss_recall_against_exact(faiss_setup):
    corpus, user, ann = faiss_setup
    exact_indices = np.asarray(CorpusIndex(corpus).search(user, 101)[0])[:, :100]  # the next test's K (compiled once)
    indices, scores = ann.search(user, 100)
    assert indices.shape == scores.shape == (8, 100)
    assert recall_at_k(indices, exact_indices) >= MIN_FAISS_RECALL
    # Every returned score is that entry's `exact_scores` value, bit for bit (FAISS's own are replaced).
    np.testing.assert_array_equal(scores, np.take_along_axis(np.asarray(exact_scores(user, corpus)), indices, 1))


def test_faiss_probing_every_list_is_exact(faiss_setup):
    """With every list scanned FAISS finds the top K by its own float32 scores; where the K-th and
    (K+1)-th exact scores are further apart than two float32 evaluations can disagree (checked),
    that is the exact top K, and the rescoring makes the result the exact index's bit for bit."""
    corpus, user, ann = faiss_setup
    want = CorpusIndex(corpus).search(user, 101)
    gap = np.asarray(want[1])[:, 99] - np.asarray(want[1])[:, 100]  # [B]
    assert (gap > 2 * 2 * index._dot_rounding(32)).all()  # |u| = |x| = 1
    ann.nprobe, nprobe = ann.nlist, ann.nprobe
    try:
        got = ann.search(user, 100)
    finally:
        ann.nprobe = nprobe
    np.testing.assert_array_equal(got[0], np.asarray(want[0])[:, :100])
    np.testing.assert_array_equal(got[1], np.asarray(want[1])[:, :100])


@pytest.mark.parametrize("family", ["identical", "duplicates", "staircase", "fma", "zero-user"])
def test_faiss_results_carry_exact_scores_in_brute_force_order(family):
    """Adversarial corpora, every list probed, with a mask: every found entry is a valid row, scores
    are `exact_scores`' (bit for bit), best first with equal scores in index order, and none scores
    below the exact K-th minus two float32 evaluations' disagreement (which tied rows FAISS returns
    is its own business)."""
    user, corpus = adversarial(family, 3, seed=5)
    mask = np.random.default_rng(5).random(len(corpus)) < 0.7
    ann = FaissIndex(corpus, nlist=4)
    ann.nprobe = ann.nlist
    indices, scores = ann.search(user, 37, mask)
    found = indices >= 0
    assert mask[indices[found]].all()
    exact = np.asarray(exact_scores(user, corpus))  # [B, N]
    np.testing.assert_array_equal(scores[found], np.take_along_axis(exact, np.maximum(indices, 0), 1)[found])
    for row, row_scores in zip(indices, scores):
        pairs = [(-s, i) for i, s in zip(row, row_scores) if i >= 0]
        assert pairs == sorted(pairs)
    _, want = brute_force(user, corpus, 37, mask)
    norms = np.linalg.norm(user, axis=1) * np.linalg.norm(corpus, axis=1).max()  # [B]
    slack = 2 * index._float32_band(norms[:, None], 1.0, corpus.shape[1])[:, 0]  # [B], |x| folded into norms
    assert (scores[found] >= (want[:, -1] - np.asarray(slack))[np.nonzero(found)[0]]).all()


def test_faiss_never_returns_masked_entries(faiss_setup):
    corpus, user, ann = faiss_setup
    mask = np.random.default_rng(2).random(len(corpus)) < 0.3
    indices, scores = ann.search(user, 50, mask)
    assert mask[indices].all()
    exact_indices, _ = CorpusIndex(corpus).search(user, 50, mask)
    assert recall_at_k(indices, exact_indices) >= MIN_FAISS_RECALL


def test_faiss_missing_results_are_minus_one(faiss_setup):
    corpus, user, ann = faiss_setup
    mask = np.zeros(len(corpus), bool)
    mask[:3] = True
    indices, scores = ann.search(user, 10, mask)
    assert (indices[:, 3:] == -1).all() and (scores[:, 3:] == MASKED).all()
    np.testing.assert_array_equal(ann.post_ids(indices)[:, 3:], -1)


def test_faiss_small_probed_lists_leave_a_documented_minus_one_tail(faiss_setup):
    """No mask: one probed list holds far fewer than K entries, so the tail is -1 / -INF."""
    corpus, user, ann = faiss_setup
    ann.nprobe, nprobe = 1, ann.nprobe
    try:
        indices, scores = ann.search(user, 1000)
    finally:
        ann.nprobe = nprobe
    missing = indices < 0
    assert missing.any() and (indices[missing] == -1).all() and (scores[missing] == MASKED).all()
    assert np.isfinite(scores[~missing]).all()
    assert (np.diff(missing.astype(int), axis=1) >= 0).all()  # found entries first, then the -1 tail
    np.testing.assert_array_equal(ann.post_ids(indices)[missing], -1)


FAISS_ERRORS = {
    "query-nan": (lambda ann, user: ann.search(np.where(np.arange(32) == 3, np.nan, user), 5), ValueError,
                  r"user_representation: expected finite values, got NaN or inf in 8 rows"),
    "nprobe=0": (lambda ann, user: setattr(ann, "nprobe", 0), ValueError, r"nprobe: expected a positive int, got 0"),
    "nprobe-bool": (lambda ann, user: setattr(ann, "nprobe", True), TypeError, r"nprobe:.*got bool"),
    "nprobe-float": (lambda ann, user: setattr(ann, "nprobe", 4.0), TypeError, r"nprobe:.*got float"),
    "nlist-bool": (lambda ann, user: FaissIndex(np.eye(4, dtype=np.float32), nlist=True), TypeError, r"nlist"),
    "seed-float": (lambda ann, user: FaissIndex(np.eye(4, dtype=np.float32), seed=0.5), TypeError, r"seed"),
    "top_k>N": (lambda ann, user: ann.search(user, 20_001), ValueError, r"top_k: expected 1 <= top_k <= 20000"),
}


@pytest.mark.parametrize("call, error, message", FAISS_ERRORS.values(), ids=FAISS_ERRORS.keys())
def test_faiss_bad_arguments_raise_clear_errors(faiss_setup, call, error, message):
    _, user, ann = faiss_setup
    nprobe = ann.nprobe
    try:
        with pytest.raises(error, match=message):
            call(ann, user)
    finally:
        ann.nprobe = nprobe


def test_faiss_missing_extra_names_the_install_command(monkeypatch):
    monkeypatch.setitem(sys.modules, "faiss", None)  # makes `import faiss` raise ImportError
    with pytest.raises(ImportError, match=r"pip install 'phoenix-recsys\[faiss\]'.*uv sync --extra faiss"):
        FaissIndex(np.eye(4, dtype=np.float32))


RECALL_GOLDEN = {
    "all-hits": ([[1, 2, 3]], [[3, 1, 2]], 1.0),
    "one-of-three": ([[1, 2, 3], [4, 5, 6]], [[3, 2, 1], [4, 7, 8]], (1 + 1 / 3) / 2),
    "none": ([[1, 2]], [[3, 4]], 0.0),
    "missing-entries": ([[5, -1, -1]], [[5, 6, 7]], 1 / 3),
}


@pytest.mark.parametrize("approx, exact, want", RECALL_GOLDEN.values(), ids=RECALL_GOLDEN.keys())
def test_recall_at_k_golden_values(approx, exact, want):
    assert recall_at_k(np.array(approx), np.array(exact)) == pytest.approx(want)


def test_recall_at_k_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match=r"approx_indices: expected shape \(1, 3\)"):
        recall_at_k(np.zeros((1, 2), int), np.zeros((1, 3), int))


@pytest.mark.parametrize("num_rows, top_k, dim", [(1, 1, 128), (1000, 1000, 128), (10**6, 1000, 128),
                                                  (10**7, 1000, 128), (5000, 10, 8)])
def test_auto_sizes_are_valid(num_rows, top_k, dim):
    block = index.auto_block_size(num_rows, top_k, dim)
    assert block >= 1 and block & (block - 1) == 0 and block <= num_rows
    for batch in (1, 16, 64):
        chunk = index.auto_chunk_size(batch, num_rows, dim, block)
        assert chunk % block == 0 and chunk >= block


@pytest.mark.parametrize("masked", [False, True], ids=["no-mask", "mask"])
@pytest.mark.parametrize("case", EXACT_CASES.values(), ids=EXACT_CASES.keys())
def test_coarse_pass_matches_brute_force(case, masked):
    """The bfloat16 coarse pass (forced on at small N) returns brute force's indices and scores."""
    num_rows, dim, batch, top_k, chunk_size, block_size = case
    user, corpus, mask = int_corpus(num_rows, dim, batch, seed=3)
    mask = mask if masked else None
    idx = CorpusIndex(corpus, chunk_size=chunk_size, block_size=block_size, coarse=True)
    assert_same_as_brute_force(idx.search(user, top_k, mask), user, corpus, top_k, mask)


def stage_of(out) -> str:
    """Which pass answered a `CorpusIndex._search` (its rescored candidates came from that pass)."""
    return index.STAGES[int(out[2])]


@pytest.mark.parametrize("batch, chunk", [(4, None), (16, 2048)], ids=["B=4", "B=16-chunked"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_unit_vectors_are_answered_by_the_fast_passes(seed, batch, chunk):
    """Real-valued rows: the coarse pass's band (bfloat16 rounding) and the float32 pass's band
    keep every needed block within their slots, so the passes built for speed answer (not a
    fallback), for clustered users too, and the result is brute force's bit for bit."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((16, 32))
    corpus = unit_rows(centres[rng.integers(0, 16, 20000)] + 0.5 * rng.standard_normal((20000, 32)))
    user = unit_rows(centres[rng.integers(0, 16, batch)] + 0.3 * rng.standard_normal((batch, 32)))
    coarse = CorpusIndex(corpus, coarse=True, block_size=8, chunk_size=chunk)
    plain = CorpusIndex(corpus, coarse=False, block_size=8, chunk_size=chunk)
    for k in (1, 50):
        got, want = coarse._search(user, k), plain._search(user, k)
        assert (stage_of(got), stage_of(want)) == ("coarse", "float32")
        assert_same_as_brute_force(got, user, corpus, k)
        assert_same_as_brute_force(want, user, corpus, k)


@pytest.fixture(scope="module")
def big_coarse_index():
    """A 2^16 x 128 index (coarse by default); tests only read it."""
    return CorpusIndex(np.random.default_rng(0).standard_normal((2**16, 128)).astype(np.float32))


@pytest.mark.parametrize("batch", [1, 3, 16])
def test_coarse_scan_is_chunked_and_never_widens_the_whole_corpus(batch, big_coarse_index):
    """The coarse scan reads chunks of the uint16 copy (never all N rows at once, whatever B),
    and no [N, D] float32 array is built from it: XLA CPU, handed a bfloat16 array, converted the
    whole corpus before the loop (3-4x slower)."""
    num_rows, dim = 2**16, 128
    chunk, block = index._plan(num_rows, dim, batch, 100, None, None, coarse=True)
    assert chunk < num_rows and index._plan(10**6, dim, batch, 1000, None, None, coarse=True)[0] < 10**6
    idx = big_coarse_index
    assert idx.num_rows == num_rows and idx.dim == dim
    assert idx.coarse and idx.coarse_embeddings.dtype == jnp.uint16 and idx.plan(batch, 100) == (chunk, block)
    float32_chunk, _ = index._plan(num_rows, dim, batch, 100, None, block)
    hlo = index._exact_top_k.lower(
        jnp.ones((batch, dim)), idx.corpus_embeddings, None, idx.max_row_norm, idx.coarse_embeddings,
        idx.coarse_error, top_k=100, chunk_size=chunk, block_size=block,
        float32_chunk_size=float32_chunk).compile().as_text()
    built = [line for line in hlo.splitlines() if f"= f32[{num_rows},{dim}]" in line
             and any(op in line for op in (" fusion(", " convert(", " copy("))]  # not parameters or aliases
    assert not built, built


@pytest.mark.parametrize("builder", ["device-loop", "host-buffer"])
@pytest.mark.parametrize("chunk_rows", [100, 2**14], ids=["chunks+tail", "one-piece"])
def test_coarse_copy_rounds_as_bfloat16(chunk_rows, builder, monkeypatch):
    """The copy's bits are bfloat16's own rounding of each float32 (nearest, ties to even: the
    halfway patterns below), and its error bound is at least the largest row norm of the rounding
    error (within 1e-5), built in chunks of rows or in one piece, by the device loop or into a host
    buffer (CPU); rows whose norm exceeds float32 leave an infinite norm bound."""
    monkeypatch.setattr(index, "COPY_CHUNK_ROWS", chunk_rows)
    if builder == "device-loop":
        coarse_copy = jax.jit(index._coarse_copy.__wrapped__)  # traced afresh with the patched chunk
    elif jax.default_backend() == "cpu":
        coarse_copy = index._build_coarse
    else:
        pytest.skip("the host-buffer builder is the CPU backend's")
    rng = np.random.default_rng(4)
    halfway = (np.arange(64, dtype=np.uint32) << 16 | 0x8000).view(np.float32) * 1.0  # ties, odd and even
    rows = np.concatenate([rng.standard_normal(4000).astype(np.float32), halfway,
                           np.array([0.0, -0.0, 1e-40, -3e-39, 3.0e15, 1.5e-38], np.float32)])
    corpus = np.resize(rows, (len(rows) // 8 + 1) * 8).reshape(-1, 8)
    assert corpus.shape[0] % 100 and corpus.shape[0] > 200  # several chunks and a tail
    coarse, (error, norm) = coarse_copy(jnp.asarray(corpus), jnp.float32(1.5))
    want = jnp.asarray(corpus).astype(jnp.bfloat16)
    np.testing.assert_array_equal(np.asarray(coarse), np.asarray(jax.lax.bitcast_convert_type(want, jnp.uint16)))
    widened = np.asarray(want.astype(jnp.float32), np.float64)
    largest = np.linalg.norm(corpus - widened, axis=1).max()
    assert largest <= float(error) <= largest * (1 + 1e-5)
    assert float(norm) == np.float32(1.5) + error  # the corpus's largest row norm + the error
    huge = np.array([[3.0e38, -3.3e38, 1.0, 0.0]], np.float32)  # row norm 4.5e38: beyond float32
    coarse, (error, norm) = coarse_copy(jnp.asarray(huge), jnp.float32(np.inf))
    np.testing.assert_array_equal(np.asarray(coarse), np.asarray(jax.lax.bitcast_convert_type(
        jnp.asarray(huge).astype(jnp.bfloat16), jnp.uint16)))
    largest = np.linalg.norm(huge.astype(np.float64) - np.asarray(index._widen(coarse), np.float64), axis=1).max()
    assert largest <= float(error) <= largest * (1 + 1e-5)  # the squares would overflow: scaled first
    assert np.isinf(float(norm))  # an infinite band: every block needed, the next pass answers


def test_widen_is_exact():
    """uint16 bfloat16 bit patterns widen to the float32 that bfloat16's own cast gives, bit for bit."""
    values = np.array([0.0, -0.0, 1.0, -2.5, 3.0e38, -3.0e38, 1e-40, -1e-45, np.inf, -np.inf, 0.1, 65504.0],
                      np.float32)
    bf16 = jnp.asarray(values).astype(jnp.bfloat16)
    bits = jax.lax.bitcast_convert_type(bf16, jnp.uint16)
    got = np.asarray(index._widen(bits)).view(np.uint32)
    np.testing.assert_array_equal(got, np.asarray(bf16.astype(jnp.float32)).view(np.uint32))
    np.testing.assert_array_equal(np.asarray(index._widen(jnp.asarray(values))), values)  # float32: as is


# Rows of the all-tied and rising corpora: all rows tied must hold more blocks (N / 8) than
# MAX_ROUNDS rounds of the coarse pass's slots (16 * 138 at K = 10).
RISING_ROWS = 32768


@pytest.mark.parametrize("coarse", [True, False], ids=["coarse", "float32"])
@pytest.mark.parametrize("batch, chunk", [(1, None), (16, 256)], ids=["B=1", "B=16-chunked"])
def test_all_rows_tied_fall_back_to_the_canonical_scan(batch, chunk, coarse):
    """All rows tie: every block is within every band, more than MAX_ROUNDS rounds of slots hold,
    so the canonical scan answers (ties in index order, as brute force). The shapes of
    test_scores_rising_with_the_index_match_brute_force at K = 10 (the float32 programs compile once)."""
    corpus = np.ones((RISING_ROWS, 4), np.float32)
    idx = CorpusIndex(corpus, block_size=8, coarse=coarse, chunk_size=chunk)
    user = np.ones((batch, 4), np.float32)
    out = idx._search(user, 10)
    np.testing.assert_array_equal(np.asarray(out[0]), np.tile(np.arange(10), (batch, 1)))
    np.testing.assert_array_equal(np.asarray(out[1]), np.full((batch, 10), 4.0))
    assert stage_of(out) == "canonical"


@pytest.mark.parametrize("coarse", [True, False], ids=["coarse", "float32"])
@pytest.mark.parametrize("batch, chunk", [(4, None), (16, 2048)], ids=["B=4", "B=16-chunked"])
def test_duplicated_rows_are_rescored_in_rounds(batch, chunk, coarse):
    """600 near-copies of one row (a few ulps apart), scattered, and users along it: they fill the
    top K and lie in ~600 blocks, all within the band, several rounds of slots but within
    MAX_ROUNDS: the pass that scanned answers (in rounds, not the slow canonical scan), exactly as
    brute force, the best copies coming from every round. The shapes of
    test_unit_vectors_are_answered_by_the_fast_passes at K = 50 (compiled once)."""
    rng = np.random.default_rng(9)
    corpus = unit_rows(rng.standard_normal((20000, 32)))
    copies = rng.choice(20000, 600, replace=False)
    corpus[copies] = corpus[0] * (1 + 1e-7 * rng.standard_normal((600, 32))).astype(np.float32)
    user = np.tile(corpus[0], (batch, 1)) + 0.01 * rng.standard_normal((batch, 32)).astype(np.float32)
    idx = CorpusIndex(corpus, coarse=coarse, block_size=8, chunk_size=chunk)
    out = idx._search(user, 50)  # 66 (float32) or 178 (coarse) slots per round
    assert stage_of(out) == ("coarse" if coarse else "float32")
    assert_same_as_brute_force(out, user, corpus, 50)


def overflow_case(scale):
    """Users of norm `scale` along rows of norm 4 (every 10th row): scores up to 4 * scale."""
    rng = np.random.default_rng(6)
    direction = np.abs(unit_rows(rng.standard_normal((3, 16))))  # positive: products never cancel
    user = (direction * np.float32(scale)).astype(np.float32)
    corpus = 4 * unit_rows(rng.standard_normal((4000, 16)))
    for b in range(3):
        corpus[b::10] = 4 * direction[b]  # rows along user b
    return user, corpus


def test_users_whose_scores_could_overflow_are_refused():
    """|u| * the largest row norm above SCORE_LIMIT (half float32's max): refused, naming the row,
    its |u| and the corpus's largest row norm (|u| computed without overflow: |u|^2 is beyond
    float32 in both cases); just below the limit the search answers, exactly."""
    user, corpus = overflow_case(1e38)
    for idx in (CorpusIndex(corpus, coarse=True, block_size=8), ShardedCorpusIndex(corpus)):
        with pytest.raises(ValueError, match=r"user_representation: expected \|u\| \* \(largest corpus row norm\) "
                                             r"<= 1\.701e\+38 .*got 4(\.\d*)?e\+38 in row 0 \(\|u\| = 1(\.\d*)?e\+38, "
                                             r"largest corpus row norm 4(\.\d*)?\)"):
            idx.search(user, 300)
        below = (user * np.float32(0.42)).astype(np.float32)  # |u| * 4 = 1.68e38
        assert_same_as_brute_force(idx.search(below, 300), below, corpus, 300)  # K: the next test's shape


@pytest.mark.parametrize("coarse", [True, False], ids=["coarse", "float32"])
def test_overflowing_scores_with_checks_off_equal_brute_force(coarse, monkeypatch):
    """With value checks off (PHOENIX_VALIDATE_VALUES=0), users whose scores overflow to +inf still
    get brute force's answer: no band can be trusted, so the canonical scan answers, and the +inf
    scores tie in index order."""
    monkeypatch.setenv("PHOENIX_VALIDATE_VALUES", "0")
    user, corpus = overflow_case(1e38)
    idx = CorpusIndex(corpus, coarse=coarse, block_size=8)
    for k in (1, 300):  # 400 infinite scores per user
        out = idx._search(user, k)
        assert stage_of(out) == "canonical"
        assert_same_as_brute_force(out, user, corpus, k)
        assert np.isinf(np.asarray(out[1])[:, 0]).all()


def test_coarse_default_and_approx_recall():
    """approx_recall: exact on CPU (no approximate kernel); the returned scores are `exact_scores`'
    and equal scores come in index order."""
    assert CorpusIndex(np.zeros((100, 4), np.float32)).coarse is False  # small corpus: no copy
    assert CorpusIndex(np.zeros((index.COARSE_MIN_ROWS, 4), np.float32)).coarse is True
    with pytest.raises(TypeError, match="coarse"):
        CorpusIndex(np.zeros((100, 4), np.float32), coarse="yes")
    user, corpus, mask = int_corpus(2000, 8, 3)
    idx = CorpusIndex(corpus)
    indices, scores = (np.asarray(a) for a in idx.search(user, 20, mask, approx_recall=0.95))
    _, want_scores = brute_force(user, corpus, 20, mask)
    np.testing.assert_array_equal(scores, want_scores)  # exact on CPU (no approximate kernel)
    own = np.where(mask[indices], np.take_along_axis(np.asarray(exact_scores(user, corpus)), indices, 1), MASKED)
    np.testing.assert_array_equal(scores, own)
    for row, row_scores in zip(indices, scores):  # ties in index order
        assert all((s0 > s1) or (s0 == s1 and i0 < i1) for i0, i1, s0, s1 in
                   zip(row, row[1:], row_scores, row_scores[1:]))
    with pytest.raises(ValueError, match="approx_recall"):
        idx.search(user, 20, approx_recall=1.5)


def test_approx_recall_returns_exact_scores_in_index_order():
    """approx_recall picks entries by float32 matmul scores but returns them with their
    `exact_scores` values (before: the matmul's, off in the last bits), re-sorted best first with
    equal scores in index order (a corpus of duplicated rows)."""
    rng = np.random.default_rng(12)
    corpus = rng.standard_normal((40, 128)).astype(np.float32)[rng.integers(0, 40, 1000)]  # 40 rows, duplicated
    user = rng.standard_normal((3, 128)).astype(np.float32)
    indices, scores = (np.asarray(a) for a in CorpusIndex(corpus).search(user, 60, approx_recall=0.9))
    np.testing.assert_array_equal(scores, np.take_along_axis(np.asarray(exact_scores(user, corpus)), indices, 1))
    for row, row_scores in zip(indices, scores):
        assert all((s0 > s1) or (s0 == s1 and i0 < i1) for i0, i1, s0, s1 in
                   zip(row, row[1:], row_scores, row_scores[1:]))


def _drop_cases():
    """[B, n] arrays for `_drop_hopeless`: order, ties, padding and a guess that fails. All [3, n]
    (rows are independent), so each k compiles one program."""
    rng = np.random.default_rng(7)
    n = 4000
    random = rng.standard_normal((3, n)).astype(np.float32)
    rising = np.tile(np.arange(n, dtype=np.float32), (3, 1))  # every entry enters a running best-K
    falling = rising[:, ::-1].copy()
    ties = rng.integers(0, 3, (3, n)).astype(np.float32)  # ~n / 3 entries tie at the top
    padded = random.copy()
    padded[:, n // 2:] = -np.inf  # PAD_SCORE tail
    padded[1] = -np.inf  # a row that is padding only
    spiky = np.zeros((3, n), np.float32)
    spiky[:, ::index.SAMPLE_STRIDE] = 1.0  # the sample sees only the spikes: guess 1.0 is verified
    lonely = np.zeros((3, n), np.float32)
    lonely[:, ::index.SAMPLE_STRIDE][:, :3] = 1.0  # too few entries reach the guess: rows kept whole
    return {"random": random, "rising": rising, "falling": falling, "ties": ties, "padded": padded,
            "spiky": spiky, "lonely": lonely}


DROP_CASES = _drop_cases()


@pytest.mark.parametrize("k", [1, 40, 300])
@pytest.mark.parametrize("name", DROP_CASES.keys())
def test_drop_hopeless_keeps_top_k_exactly(name, k):
    """top_k after the drop = top_k before it: the same entries, values and tie order."""
    x = jnp.asarray(DROP_CASES[name])
    dropped = jax.jit(index._drop_hopeless, static_argnums=1)(x, k)
    want, got = jax.lax.top_k(x, k), jax.lax.top_k(dropped, k)
    np.testing.assert_array_equal(np.asarray(got[1]), np.asarray(want[1]))
    np.testing.assert_array_equal(np.asarray(got[0]), np.asarray(want[0]))
    kept = np.asarray(dropped) > -np.inf
    if name in ("random", "rising", "falling") and k >= 40:  # it does drop most entries there
        assert kept.sum(axis=1).max() < x.shape[1] // 4
    if name == "lonely" and k > 3:  # fewer than k entries reach the guess: nothing dropped
        np.testing.assert_array_equal(np.asarray(dropped), np.asarray(x))


@pytest.mark.parametrize("k", [1, 40, 300])
@pytest.mark.parametrize("name", DROP_CASES.keys())
def test_drop_hopeless_margin_keeps_entries_near_the_kth(name, k):
    """With a margin m, every entry within m of its row's k-th largest stays (the coarse pass
    needs them), and top_k is unchanged."""
    x = np.asarray(DROP_CASES[name])
    margin = np.full((x.shape[0], 1), 0.5, np.float32)
    dropped = np.asarray(jax.jit(index._drop_hopeless, static_argnums=1)(jnp.asarray(x), k, jnp.asarray(margin)))
    kth = np.sort(x, axis=1)[:, -k:][:, :1]  # [B, 1]
    near = x >= kth - margin
    np.testing.assert_array_equal(dropped[near], x[near])
    want, got = jax.lax.top_k(jnp.asarray(x), k), jax.lax.top_k(jnp.asarray(dropped), k)
    np.testing.assert_array_equal(np.asarray(got[1]), np.asarray(want[1]))
    if name == "spiky" and k == 40:  # the guess is the k-th (1.0) itself: zeros 1.0 below it go
        assert not (np.asarray(index._drop_hopeless(jnp.asarray(x), k)) == 0).any()  # without a margin,
        wide = index._drop_hopeless(jnp.asarray(x), k, jnp.full((3, 1), 1.5))  # and stay within 1.5
        np.testing.assert_array_equal(np.asarray(wide), x)


@pytest.mark.parametrize("masked", [False, True], ids=["no-mask", "mask"])
@pytest.mark.parametrize("batch, chunk", [(1, None), (16, 256)], ids=["one-piece", "chunked"])
def test_scores_rising_with_the_index_match_brute_force(batch, chunk, masked):
    """The worst order for a running top-k (every block better than the last), and exact ties
    across blocks: the dropped blocks and the row cut still leave brute force's answer."""
    num_rows = RISING_ROWS
    rng = np.random.default_rng(5)
    corpus = np.zeros((num_rows, 4), np.float32)
    corpus[:, 0] = np.arange(num_rows) // 3  # scores rise with the index, three rows per level
    corpus[:, 1:] = rng.integers(-1, 2, (num_rows, 3))
    user = np.zeros((batch, 4), np.float32)
    user[:, 0] = 1.0
    user[1:, 1:] = rng.integers(-1, 2, (batch - 1, 3))
    mask = rng.random(num_rows) < 0.7 if masked else None
    idx = CorpusIndex(corpus, chunk_size=chunk, block_size=8, coarse=False)
    for k in (10, 50):
        assert idx.plan(batch, k)[1] == 8 and num_rows // 8 >= index.SAMPLE_MIN_ROWS_PER_K * k  # drop applies
        assert_same_as_brute_force(idx.search(user, k, mask), user, corpus, k, mask)


@pytest.mark.parametrize("batch, chunk", [(4, None), (16, 2048)], ids=["one-piece", "chunked"])
def test_near_ties_equal_brute_force(batch, chunk):
    """Rows a few float32 ulps apart around the K-th score, where the scan and the canonical
    rescoring round differently: brute force's indices and scores, bit for bit (the band and the
    row cut are what keep it; without their margins, BOUND_SAFETY = 0, this fails). The shapes of
    test_unit_vectors_are_answered_by_the_fast_passes (compiled once)."""
    rng = np.random.default_rng(11)
    base = unit_rows(rng.standard_normal((1, 32)))
    corpus = unit_rows(base + 1e-6 * rng.standard_normal((20000, 32)))  # scores within ~1e-6
    user = unit_rows(base + 1e-3 * rng.standard_normal((batch, 32)))
    idx = CorpusIndex(corpus, chunk_size=chunk, block_size=8, coarse=False)
    for k in (1, 50):
        assert_same_as_brute_force(idx.search(user, k), user, corpus, k)


def compiled_programs(call):
    """(call's result, names of the XLA programs compiled while it ran)."""
    names = []

    def listen(event, duration, **kwargs):
        if event == "/jax/core/compile/backend_compile_duration":
            names.append(kwargs.get("fun_name"))

    jax.monitoring.register_event_duration_secs_listener(listen)
    try:
        return call(), names
    finally:
        jax.monitoring.unregister_event_duration_listener(listen)


def test_checking_a_new_corpus_shape_compiles_one_program():
    """The finite check and the norm bound of a corpus of a shape not seen before are one program
    (before: the bad-row count and the first bad row compiled two more per shape)."""
    corpus = np.ones((131, 7), np.float32)  # a shape no other test builds
    idx, names = compiled_programs(lambda: CorpusIndex(corpus, coarse=False))
    assert names == ["jit(_rows_finite)"]
    assert float(idx.max_row_norm) >= np.sqrt(7)
    bad = corpus.copy()  # the index may hold `corpus` in place, read-only
    bad[[40, 99], 3] = np.nan
    with pytest.raises(ValueError, match=r"NaN or inf in 2 rows \(first: row 40\)"):
        CorpusIndex(bad)


def test_max_row_norm_bounds_the_largest_row_norm():
    corpus = np.ones((1000, 16), np.float32)
    corpus[123] *= 3.0
    assert 12.0 <= float(CorpusIndex(corpus).max_row_norm) <= 12.0 * (1 + 1e-5)
