"""Tests of phoenix_synthetic.py: the world (determinism, shapes, padding, the planted signal and its oracle),
its training streams and its evaluators against hand and brute-force values."""

import itertools
import math

import jax
import numpy as np
import pytest

import phoenix_metrics as metrics
import phoenix_synthetic as synthetic
from phoenix_synthetic import ACTIONS, NEGATIVE_ACTIONS, SyntheticWorld, WorldConfig
from phoenix_hashing import hash_post_ids, hash_user_ids
from phoenix_inputs import PAD_ID
from recsys_model import HashConfig, RecsysBatch

A = len(ACTIONS)
SMALL = WorldConfig(num_users=300, num_posts=2_000, num_authors=100, history_len=16,
                    num_candidates=8, min_history_len=2, num_product_surfaces=3, seed=11)
POSITIVE = np.array([a not in NEGATIVE_ACTIONS for a in ACTIONS])


@pytest.fixture(scope="module")
def world():
    return SyntheticWorld(SMALL)


@pytest.fixture(scope="module")
def ranking(world):
    return world.ranking_examples(np.arange(SMALL.num_users), 0)


@pytest.fixture(scope="module")
def retrieval(world):
    return world.retrieval_examples(np.arange(SMALL.num_users), 0)


def test_actions_are_the_release_list():
    assert ACTIONS[:3] == ["favorite_score", "reply_score", "repost_score"]
    assert len(ACTIONS) == 19 and ACTIONS[-1] == "dwell_time"
    assert set(synthetic.ACTION_PARAMS) == set(ACTIONS)
    assert set(NEGATIVE_ACTIONS) < set(ACTIONS)


@pytest.mark.parametrize(
    "overrides",
    [dict(num_product_surfaces=17), dict(num_authors=10, num_posts=5), dict(min_history_len=40),
     dict(author_spread=1.5), dict(impressions_per_slot=0.5)],
    ids=["too-many-surfaces", "authors>posts", "min-history>S", "spread>1", "too-few-impressions"],
)
def test_config_validation(overrides):
    with pytest.raises(ValueError):
        WorldConfig(**overrides)


BAD_CONFIGS = {
    "nan-affinity_scale": (dict(affinity_scale=float("nan")), ValueError, r"WorldConfig.affinity_scale:.*got nan"),
    "inf-popularity_std": (dict(popularity_std=math.inf), ValueError, r"WorldConfig.popularity_std:.*got inf"),
    "negative-popularity_std": (dict(popularity_std=-1.0), ValueError, r"WorldConfig.popularity_std:.*got -1.0"),
    "negative-surface_shift_std": (dict(surface_shift_std=-0.1), ValueError, r"WorldConfig.surface_shift_std"),
    "negative-popularity_weight": (dict(popularity_weight=-0.5), ValueError, r"WorldConfig.popularity_weight"),
    "negative-affinity_scale": (dict(affinity_scale=-1.0), ValueError, r"WorldConfig.affinity_scale"),
    "nan-author_spread": (dict(author_spread=float("nan")), ValueError, r"WorldConfig.author_spread:.*got nan"),
    "nan-share": (dict(impression_affinity_share=float("nan")), ValueError, r"WorldConfig.impression_affinity_share"),
    "share>1": (dict(impression_affinity_share=1.5), ValueError, r"WorldConfig.impression_affinity_share"),
    "zero-temperature": (dict(impression_temperature=0.0), ValueError,
                         r"WorldConfig.impression_temperature: expected > 0, got 0.0"),
    "nan-temperature": (dict(impression_temperature=float("nan")), ValueError, r"WorldConfig.impression_temperature"),
    "inf-impressions": (dict(impressions_per_slot=math.inf), ValueError, r"WorldConfig.impressions_per_slot"),
    "nan-relevant-fraction": (dict(candidate_relevant_fraction=float("nan")), ValueError,
                              r"WorldConfig.candidate_relevant_fraction"),
    "float-num_users": (dict(num_users=10.5), TypeError, r"WorldConfig.num_users: expected an int >= 1, got float"),
    "bool-num_candidates": (dict(num_candidates=True), TypeError, r"WorldConfig.num_candidates: expected an int"),
    "zero-latent_dim": (dict(latent_dim=0), ValueError, r"WorldConfig.latent_dim: expected an int >= 1, got 0"),
    "zero-history_len": (dict(history_len=0, min_history_len=0), ValueError, r"WorldConfig.history_len"),
    "negative-min_history": (dict(min_history_len=-1), ValueError, r"WorldConfig.min_history_len"),
    "string-affinity_scale": (dict(affinity_scale="1.5"), TypeError, r"WorldConfig.affinity_scale: expected a finite"),
    "authors>posts": (dict(num_authors=10, num_posts=5), ValueError,
                      r"WorldConfig.num_authors: expected <= num_posts \(5.*got 10"),
}


@pytest.mark.parametrize("overrides, error, message", BAD_CONFIGS.values(), ids=BAD_CONFIGS.keys())
def test_config_rejects_bad_values_naming_the_field(overrides, error, message):
    with pytest.raises(error, match=message):
        WorldConfig(**overrides)


def test_config_accepts_numpy_numbers():
    cfg = WorldConfig(num_users=np.int64(10), num_posts=np.int32(50), num_authors=np.int64(5),
                      affinity_scale=np.float32(2.0))
    assert SyntheticWorld(cfg).user_latent.shape == (10, cfg.latent_dim)


def _bad_id_calls():
    w = SyntheticWorld(SMALL)
    U, N, P = SMALL.num_users, SMALL.num_posts, SMALL.num_product_surfaces
    users = rf"user_ids: expected ids in \[0, {U}\) \(num_users\)"
    posts = rf"post_ids: expected ids in \[0, {N}\) \(num_posts\)"
    return {
        "ranking-negative": (lambda: w.ranking_examples([-1]), ValueError, users + r", got range \[-1, -1\]"),
        "ranking-too-large": (lambda: w.ranking_examples([U]), ValueError, users + rf", got range \[{U}, {U}\]"),
        "ranking-float": (lambda: w.ranking_examples([1.0, 2.0]), TypeError,
                          r"user_ids: expected integer ids, got dtype float64"),
        "ranking-bool": (lambda: w.ranking_examples(np.array([True])), TypeError, r"user_ids:.*got dtype bool"),
        "ranking-2d": (lambda: w.ranking_examples([[1, 2]]), ValueError,
                       r"user_ids: expected a 1-D array of ids, got shape \(1, 2\)"),
        "ranking-scalar": (lambda: w.ranking_examples(3), ValueError, r"user_ids: expected a 1-D.*shape \(\)"),
        "ranking-float-seed": (lambda: w.ranking_examples([1], 1.5), TypeError, r"rng_or_seed: expected an int"),
        "retrieval-negative": (lambda: w.retrieval_examples(np.array([3, -2])), ValueError,
                               users + r", got range \[-2, 3\]"),
        "retrieval-float": (lambda: w.retrieval_examples(np.array([0.5])), TypeError, r"user_ids: expected integer"),
        "affinity-negative-user": (lambda: w.affinity(-1, 3), ValueError, users),
        "affinity-negative-post": (lambda: w.affinity(1, -3), ValueError, posts),
        "affinity-post-too-large": (lambda: w.affinity(1, N), ValueError, posts),
        "true-prob-float-post": (lambda: w.true_probabilities(1, 2.0, 0), TypeError, r"post_ids: expected integer"),
        "true-prob-surface": (lambda: w.true_probabilities(1, 2, P), ValueError,
                              rf"surfaces: expected ids in \[0, {P}\) \(num_product_surfaces\)"),
        "true-prob-negative-surface": (lambda: w.true_probabilities(1, 2, -1), ValueError, r"surfaces:"),
        "engagement-negative-user": (lambda: w.engagement_probability([0, -1], [1, 2], [0, 0]), ValueError, users),
        "engagement-negative-post": (lambda: w.engagement_probability(0, -1, 0), ValueError, posts),
        "link-nan-affinity": (lambda: w.probabilities_from_affinity(np.nan, 0.0, 0), ValueError,
                              r"affinity: expected finite"),
        "link-bad-surface": (lambda: w.probabilities_from_affinity(0.0, 0.0, P), ValueError, r"surfaces:"),
        "author-probs-2d": (lambda: w.author_probabilities([[0]]), ValueError, r"user_ids: expected a 1-D"),
        "author-probs-negative": (lambda: w.author_probabilities([-1]), ValueError, users),
        "impressions-empty": (lambda: w.impression_probabilities([]), ValueError, r"user_ids: expected at least one"),
        "frequencies-negative": (lambda: w.positive_frequencies([-1], num_users=4), ValueError, users),
        "ranking-batches-empty": (lambda: next(w.ranking_batches([], 4)), ValueError, r"user_ids: expected at least"),
        "ranking-batches-bool-size": (lambda: next(w.ranking_batches([0], True)), TypeError, r"batch_size"),
        "retrieval-batches-negative": (lambda: next(w.retrieval_batches([-1], 2)), ValueError, users),
        "split-nan-fraction": (lambda: synthetic.split_users(10, float("nan")), ValueError, r"held_out_fraction"),
        "auc-length-mismatch": (lambda: metrics.auc(np.zeros(3), np.zeros(2)), ValueError, r"labels: expected 3"),
        "auc-nan-score": (lambda: metrics.auc(np.array([0.1, np.nan]), np.array([0, 1])), ValueError, r"scores:"),
    }


BAD_ID_CALLS = _bad_id_calls()


@pytest.mark.parametrize("call, error, message", BAD_ID_CALLS.values(), ids=BAD_ID_CALLS.keys())
def test_bad_ids_and_arguments_raise_clear_errors(call, error, message):
    """NumPy would silently wrap -1 to the last user and truncate float ids: both must raise."""
    with pytest.raises(error, match=message):
        call()


def test_valid_ids_in_any_integer_dtype_and_empty_batches(world):
    want = world.ranking_examples(np.array([3, 7], np.int64), 0)
    got = world.ranking_examples(np.array([3, 7], np.int32), 0)
    assert_dicts_equal(got, want)
    assert world.ranking_examples([], 0)["candidate_post_ids"].shape == (0, SMALL.num_candidates)
    np.testing.assert_array_equal(world.affinity(np.uint16(SMALL.num_users - 1), 0),
                                  world.affinity(SMALL.num_users - 1, 0))


# ---------------------------------------------------------------------------------------------
# Determinism
# ---------------------------------------------------------------------------------------------


def assert_dicts_equal(a: dict, b: dict):
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def test_world_is_deterministic_by_seed(world):
    again = SyntheticWorld(SMALL)
    for name in ("user_latent", "author_latent", "post_latent", "post_author", "post_popularity",
                 "surface_shift"):
        np.testing.assert_array_equal(getattr(world, name), getattr(again, name), err_msg=name)
    other = SyntheticWorld(WorldConfig(**{**SMALL.__dict__, "seed": 12}))
    assert not np.allclose(world.user_latent, other.user_latent)


def test_examples_are_deterministic_by_seed(world, ranking):
    users = np.arange(SMALL.num_users)
    assert_dicts_equal(ranking, world.ranking_examples(users, 0))
    assert not np.array_equal(ranking["labels"], world.ranking_examples(users, 1)["labels"])
    assert_dicts_equal(world.retrieval_examples(users[:50], 3),
                       world.retrieval_examples(users[:50], 3))


@pytest.mark.parametrize("kind", ["ranking_batches", "retrieval_batches"])
def test_streams_are_deterministic_and_endless(world, kind):
    users = np.arange(100)
    first = list(itertools.islice(getattr(world, kind)(users, 16, seed=5), 3))
    second = list(itertools.islice(getattr(world, kind)(users, 16, seed=5), 3))
    for a, b in zip(first, second):
        assert_dicts_equal(a, b)
    assert not np.array_equal(first[0]["user_ids"], first[1]["user_ids"])  # the stream moves on
    other = next(getattr(world, kind)(users, 16, seed=6))
    assert not np.array_equal(first[0]["history_post_ids"], other["history_post_ids"])
    assert np.isin(first[0]["user_ids"], users).all()


def test_split_users_deterministic_disjoint_complete():
    train, held_out = synthetic.split_users(1000, 0.2, seed=3)
    again = synthetic.split_users(1000, 0.2, seed=3)
    np.testing.assert_array_equal(train, again[0])
    np.testing.assert_array_equal(held_out, again[1])
    assert len(held_out) == 200 and len(np.intersect1d(train, held_out)) == 0
    np.testing.assert_array_equal(np.union1d(train, held_out), np.arange(1000))
    assert not np.array_equal(held_out, synthetic.split_users(1000, 0.2, seed=4)[1])


# ---------------------------------------------------------------------------------------------
# Shapes, dtypes, padding
# ---------------------------------------------------------------------------------------------


def test_ranking_examples_shapes_and_dtypes(ranking):
    B, S, C = SMALL.num_users, SMALL.history_len, SMALL.num_candidates
    expected = {
        "user_ids": ((B,), np.int64), "history_post_ids": ((B, S), np.int64),
        "history_author_ids": ((B, S), np.int64), "history_actions": ((B, S, A), np.float32),
        "history_surfaces": ((B, S), np.int32), "history_lengths": ((B,), np.int32),
        "candidate_post_ids": ((B, C), np.int64), "candidate_author_ids": ((B, C), np.int64),
        "candidate_surfaces": ((B, C), np.int32), "labels": ((B, C, A), np.float32),
        "oracle": ((B, C, A), np.float32),
    }
    assert {k: (v.shape, v.dtype) for k, v in ranking.items()} == expected


def test_retrieval_examples_shapes_and_dtypes(retrieval):
    B, S = SMALL.num_users, SMALL.history_len
    assert retrieval["history_post_ids"].shape == (B, S)
    assert retrieval["history_actions"].shape == (B, S, A)
    for key in ("positive_post_ids", "positive_author_ids"):
        assert retrieval[key].shape == (B,) and retrieval[key].dtype == np.int64
    assert retrieval["positive_surfaces"].dtype == np.int32


@pytest.mark.parametrize("kind", ["ranking", "retrieval"])
def test_history_padding_convention(world, ranking, retrieval, kind):
    ex = ranking if kind == "ranking" else retrieval
    lengths = ex["history_lengths"]
    valid = np.arange(SMALL.history_len)[None, :] < lengths[:, None]  # [B, S]
    assert lengths.max() <= SMALL.history_len and lengths.min() >= 1
    # With the default knobs every user has enough engagements for the drawn length.
    assert lengths.min() >= SMALL.min_history_len
    np.testing.assert_array_equal(ex["history_post_ids"][~valid], PAD_ID)
    np.testing.assert_array_equal(ex["history_author_ids"][~valid], PAD_ID)
    np.testing.assert_array_equal(ex["history_actions"][~valid], 0.0)
    np.testing.assert_array_equal(ex["history_surfaces"][~valid], 0)
    posts = ex["history_post_ids"][valid]
    assert posts.min() >= 0 and posts.max() < SMALL.num_posts
    np.testing.assert_array_equal(ex["history_author_ids"][valid], world.post_author[posts])
    # Every history entry is an engagement: at least one positive action.
    assert np.all(ex["history_actions"][valid][:, POSITIVE].sum(-1) >= 1)
    assert np.all(ex["history_surfaces"] < SMALL.num_product_surfaces)
    # Lengths vary (a random valid length per user), not always S.
    assert len(np.unique(lengths)) > SMALL.history_len // 2


def test_candidates_are_consistent(world, ranking):
    cands = ranking["candidate_post_ids"]
    assert cands.min() >= 0 and cands.max() < SMALL.num_posts
    np.testing.assert_array_equal(ranking["candidate_author_ids"], world.post_author[cands])
    np.testing.assert_allclose(
        ranking["oracle"],
        world.true_probabilities(ranking["user_ids"][:, None], cands, ranking["candidate_surfaces"]),
        rtol=1e-6)
    # Labels are Bernoulli(oracle): 300*8*19 = 45600 draws, std of the mean < 0.003.
    assert abs(ranking["labels"].mean() - ranking["oracle"].mean()) < 0.01
    assert set(np.unique(ranking["labels"])) == {0.0, 1.0}


def test_candidate_slot_says_nothing_about_relevance(world, ranking):
    # Half the candidates are drawn by affinity (mean affinity ~1.3), half at random (~0). If they
    # were not shuffled, the first half of the slots would carry the relevant ones.
    aff = world.affinity(ranking["user_ids"][:, None], ranking["candidate_post_ids"])  # [B, C]
    half = SMALL.num_candidates // 2
    # 1200 values per half with std ~1.2: the difference of means has std ~0.05.
    assert abs(aff[:, :half].mean() - aff[:, half:].mean()) < 0.2


def test_retrieval_positive_is_a_valid_post(world, retrieval):
    pos = retrieval["positive_post_ids"]
    assert pos.min() >= 0 and pos.max() < SMALL.num_posts
    np.testing.assert_array_equal(retrieval["positive_author_ids"], world.post_author[pos])
    assert len(np.unique(pos)) > SMALL.num_users // 3


def test_corpus(world):
    corpus = world.corpus()
    np.testing.assert_array_equal(corpus["post_ids"], np.arange(SMALL.num_posts))
    np.testing.assert_array_equal(corpus["author_ids"], world.post_author)
    # Every author has at least one post.
    assert len(np.unique(corpus["author_ids"])) == SMALL.num_authors


def test_to_recsys_batch(ranking):
    cfg = HashConfig(num_item_hashes=3, post_table_size=1009)
    batch, labels, oracle = synthetic.to_recsys_batch(ranking, cfg)
    assert isinstance(batch, RecsysBatch)
    assert batch.history_post_hashes.shape == (SMALL.num_users, SMALL.history_len, 3)
    padded = ranking["history_post_ids"] == PAD_ID
    np.testing.assert_array_equal(batch.history_post_hashes[padded], 0)
    np.testing.assert_array_equal(batch.history_author_hashes[padded], 0)
    assert np.all(batch.history_post_hashes[~padded] > 0)
    np.testing.assert_array_equal(batch.user_hashes, hash_user_ids(ranking["user_ids"], cfg))
    assert labels is ranking["labels"] and oracle is ranking["oracle"]


def test_to_retrieval_batch_puts_positive_in_candidate_slot(retrieval):
    cfg = HashConfig()
    batch = synthetic.to_retrieval_batch(retrieval, cfg)
    assert batch.candidate_post_hashes.shape == (SMALL.num_users, 1, 2)
    np.testing.assert_array_equal(batch.candidate_post_hashes[:, 0],
                                  hash_post_ids(retrieval["positive_post_ids"], cfg))
    np.testing.assert_array_equal(batch.candidate_product_surface[:, 0],
                                  retrieval["positive_surfaces"])


def test_streams_with_hash_config_yield_batches(world):
    cfg = HashConfig()
    batch, labels, oracle = next(world.ranking_batches(np.arange(10), 4, hash_config=cfg))
    assert isinstance(batch, RecsysBatch) and labels.shape == oracle.shape == (4, 8, A)
    batch, positive_ids = next(world.retrieval_batches(np.arange(10), 4, hash_config=cfg))
    assert batch.candidate_post_hashes.shape == (4, 1, 2) and positive_ids.shape == (4,)


# ---------------------------------------------------------------------------------------------
# The planted signal
# ---------------------------------------------------------------------------------------------


def test_link_function_golden_value(world):
    # One hand-evaluated logit: favorite (base -2.0, scale 1.0) at affinity 0.4, popularity -0.2,
    # surface 1: -2.0 + shift + 1.5 * 1.0 * 0.4 + 0.75 * (-0.2).
    fav = ACTIONS.index("favorite_score")
    report = ACTIONS.index("report_score")  # negative: base -7.0, scale 1.0, no popularity term
    probs = world.probabilities_from_affinity(0.4, -0.2, 1)
    shift = world.surface_shift[1]
    assert probs[fav] == pytest.approx(1 / (1 + math.exp(-(-2.0 + shift[fav] + 0.6 - 0.15))),
                                       rel=1e-5)
    assert probs[report] == pytest.approx(1 / (1 + math.exp(-(-7.0 + shift[report] - 0.6))),
                                          rel=1e-5)


def test_true_probabilities_compose_affinity_and_link(world):
    rng = np.random.default_rng(0)
    users = rng.integers(0, SMALL.num_users, (7, 5))
    posts = rng.integers(0, SMALL.num_posts, (7, 5))
    surfaces = rng.integers(0, SMALL.num_product_surfaces, (7, 5))
    aff = (world.user_latent[users] * world.post_latent[posts]).sum(-1) / math.sqrt(
        SMALL.latent_dim)
    np.testing.assert_allclose(world.affinity(users, posts), aff, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(
        world.true_probabilities(users, posts, surfaces),
        world.probabilities_from_affinity(aff, world.post_popularity[posts], surfaces),
        rtol=1e-5)
    # Affinity is ~N(0, 1) over random pairs (unit-variance latents, 1/sqrt(L) scaling).
    many = world.affinity(rng.integers(0, 300, 20_000), rng.integers(0, 2000, 20_000))
    assert abs(many.mean()) < 0.05 and abs(many.std() - 1.0) < 0.1


@pytest.mark.parametrize("surface", [0, 2])
@pytest.mark.parametrize("popularity", [-1.5, 0.0, 2.0])
def test_positive_actions_rise_and_negative_actions_fall_with_affinity(world, surface, popularity):
    grid = np.linspace(-4.0, 4.0, 33)  # [G]
    probs = world.probabilities_from_affinity(grid, popularity, surface)  # [G, A]
    steps = np.diff(probs.astype(np.float64), axis=0)  # [G-1, A]
    assert np.all(steps[:, POSITIVE] > 0)
    assert np.all(steps[:, ~POSITIVE] < 0)


def test_popularity_lifts_positive_actions_only(world):
    low = world.probabilities_from_affinity(0.0, -1.0, 0)
    high = world.probabilities_from_affinity(0.0, 1.0, 0)
    assert np.all(high[POSITIVE] > low[POSITIVE])
    np.testing.assert_array_equal(high[~POSITIVE], low[~POSITIVE])


def test_surfaces_shift_base_rates(world):
    def logit(p):
        return np.log(p) - np.log1p(-p)

    by_surface = np.stack([world.probabilities_from_affinity(0.3, 0.1, s)
                           for s in range(SMALL.num_product_surfaces)]).astype(np.float64)  # [P, A]
    # The logit moves by exactly the surface shift, the same for every (user, post).
    np.testing.assert_allclose(logit(by_surface) - logit(by_surface[0]),
                               world.surface_shift - world.surface_shift[0], atol=2e-3)
    assert np.abs(world.surface_shift).mean() > 0.2  # std 0.5: the shifts are material


def test_oracle_auc_on_sampled_labels(ranking, world):
    aucs = {}
    for a, name in enumerate(ACTIONS):
        labels = ranking["labels"][..., a]
        if 30 <= labels.sum() <= labels.size - 30:
            aucs[name] = metrics.auc(ranking["oracle"][..., a], labels)
    assert len(aucs) >= 15, aucs
    assert min(aucs.values()) > 0.7, aucs
    # Popularity alone is a meaningful but beatable baseline for favorites.
    fav = ACTIONS.index("favorite_score")
    pop_auc = metrics.auc(world.post_popularity[ranking["candidate_post_ids"]],
                           ranking["labels"][..., fav])
    assert 0.55 < pop_auc < aucs["favorite_score"] - 0.1


def test_histories_reflect_user_affinity(world, ranking):
    valid = ranking["history_post_ids"] >= 0
    users = np.broadcast_to(ranking["user_ids"][:, None], valid.shape)
    history_affinity = world.affinity(users[valid], ranking["history_post_ids"][valid]).mean()
    random_posts = np.random.default_rng(0).integers(0, SMALL.num_posts, valid.sum())
    random_affinity = world.affinity(users[valid], random_posts).mean()
    # Random pairs average ~0 (std 1); history posts are drawn by affinity and kept if engaged.
    assert history_affinity > random_affinity + 0.5


def test_retrieval_positives_reflect_user_affinity(world, retrieval):
    users = retrieval["user_ids"]
    positive = world.affinity(users, retrieval["positive_post_ids"]).mean()
    random = world.affinity(users, np.random.default_rng(1).integers(0, SMALL.num_posts,
                                                                     len(users))).mean()
    assert positive > random + 0.5


# ---------------------------------------------------------------------------------------------
# Samplers and frequencies
# ---------------------------------------------------------------------------------------------


def test_row_sampler_matches_probabilities():
    probs = np.array([[0.5, 0.0, 0.3, 0.2], [0.1, 0.1, 0.1, 0.7], [0.0, 0.0, 0.0, 1.0]])
    sampler = synthetic._RowSampler(probs)
    rng = np.random.default_rng(0)
    draws = sampler.draw(np.array([0, 1, 2]), 40_000, rng)  # [3, 40k]
    for row in range(3):
        freq = np.bincount(draws[row], minlength=4) / 40_000
        # Binomial std <= 0.0025; 0.01 is four of them.
        np.testing.assert_allclose(freq, probs[row], atol=0.01)
    # Drawing for a subset of rows (as redraws do) uses those rows' distributions.
    subset = sampler.draw(np.array([2, 0]), 1000, rng)
    assert np.all(subset[0] == 3) and not np.any(subset[1] == 1)


def test_auc_golden():
    # Positives 0.35 and 0.8 vs negatives 0.1 and 0.4: 3 of 4 pairs ordered -> 0.75.
    assert metrics.auc([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1]) == pytest.approx(0.75)
    assert metrics.auc([1.0, 1.0], [1, 0]) == pytest.approx(0.5)  # a tie counts half
    assert metrics.auc([0.2, 0.9, 0.5], [0, 1, 1]) == pytest.approx(1.0)
    assert math.isnan(metrics.auc([0.2, 0.9], [1, 1]))


def test_impression_probabilities_sum_to_one(world):
    p = world.impression_probabilities(np.arange(SMALL.num_users), chunk=64)
    assert p.shape == (SMALL.num_posts,) and np.all(p > 0)
    assert p.sum() == pytest.approx(1.0, abs=1e-9)


def test_positive_frequencies_match_empirical_positives():
    # A tiny world so that 41k sampled positives pin the empirical distribution over 200 posts
    # (its total-variation noise is ~0.03).
    cfg = WorldConfig(num_users=50, num_posts=200, num_authors=20, history_len=8,
                      num_candidates=4, min_history_len=1)
    world = SyntheticWorld(cfg)
    users = np.arange(50)
    counts = np.zeros(cfg.num_posts)
    for examples in itertools.islice(world.retrieval_batches(users, 4096, seed=1), 10):
        counts += np.bincount(examples["positive_post_ids"], minlength=cfg.num_posts)
    empirical = counts / counts.sum()
    freq = world.positive_frequencies(users, num_users=20_000)
    assert freq.shape == (cfg.num_posts,) and np.all(freq > 0)
    assert freq.sum() == pytest.approx(1.0)

    def tv(p, q):
        return 0.5 * np.abs(p - q).sum()

    # Measured 0.027; the impression distribution (no engagement weighting) is 0.051 away.
    assert tv(freq, empirical) < 0.04
    assert tv(freq, empirical) < 0.75 * tv(world.impression_probabilities(users), empirical)


def test_million_post_world_builds_and_serves_batches():
    world = SyntheticWorld(WorldConfig.large(num_users=2_000))
    assert world.post_latent.shape == (1_000_000, 16) and world.post_latent.dtype == np.float32
    ex = world.ranking_examples(np.arange(8), 0)
    assert ex["history_post_ids"].shape == (8, 128) and ex["labels"].shape == (8, 32, A)
    assert ex["candidate_post_ids"].max() < 1_000_000


# --------------------------------------------------------------------------- the evaluators and baselines


def brute_force_recall(scores, positives, k):
    hits = []
    for row, positive in zip(scores, positives):
        # Rank the positive last among its ties (a tie counts against it).
        order = sorted(range(len(row)), key=lambda j: (-row[j], j == positive))
        hits.append(positive in order[:k])
    return float(np.mean(hits))


@pytest.mark.parametrize("k", [1, 3, 10], ids=["k=1", "k=3", "k=N"])
def test_recall_at_k_matches_brute_force(k):
    rng = np.random.default_rng(0)
    scores = rng.integers(0, 4, size=(50, 10)).astype(float)  # many ties
    positives = rng.integers(0, 10, size=50)
    assert metrics.recall_at_k(scores, positives, k) == pytest.approx(brute_force_recall(scores, positives, k))
    if k == 10:
        assert metrics.recall_at_k(scores, positives, k) == 1.0


def test_recall_at_k_golden():
    scores = np.array([[0.9, 0.5, 0.1], [0.2, 0.2, 0.7], [0.3, 0.6, 0.6]])
    # row 0: positive best; row 1: positive ties for 2nd with another; row 2: positive ties for 1st.
    assert metrics.recall_at_k(scores, np.array([0, 0, 1]), 1) == pytest.approx(1 / 3)
    assert metrics.recall_at_k(scores, np.array([0, 0, 1]), 2) == pytest.approx(2 / 3)


def test_gap_closed_golden():
    assert synthetic.gap_closed(0.8, 0.9) == pytest.approx(0.75)
    assert synthetic.gap_closed(0.5, 0.9) == 0.0
    assert synthetic.gap_closed(0.9, 0.9) == 1.0


def test_popularity_counts_golden():
    counts = synthetic.PopularityCounts(num_posts=2, num_surfaces=2, num_actions=1)
    counts.PRIOR = 0.0  # raw rates
    # post 0: labels 1, 1 | 1, 0 on surfaces 0, 0 | 1, 1 -> rate 3/4; post 1: 1, 0 | 0, 0 -> 1/4.
    # surface 0: 1, 1, 1, 0 -> 3/4; surface 1: 1, 0, 0, 0 -> 1/4; overall (4 + 1) / (8 + 2) = 1/2.
    examples = {"candidate_post_ids": np.array([[0, 0, 0, 0, 1, 1, 1, 1]]),
                "candidate_surfaces": np.array([[0, 0, 1, 1, 0, 0, 1, 1]]),
                "labels": np.array([1, 1, 1, 0, 1, 0, 0, 0], np.float32)[None, :, None]}
    counts.add(examples)
    np.testing.assert_array_equal(counts.post_n, [4, 4])
    query = {"candidate_post_ids": np.array([[0, 0, 1]]), "candidate_surfaces": np.array([[0, 1, 1]])}
    log3 = np.log(3.0)  # logit(3/4) = log 3, logit(1/4) = -log 3, logit(1/2) = 0
    np.testing.assert_allclose(counts.scores(query)[0, :, 0], [2 * log3, 0.0, -2 * log3], atol=1e-12)
    # With the prior an unseen post scores at the overall rate, between a good and a bad post.
    counts = synthetic.PopularityCounts(num_posts=3, num_surfaces=2, num_actions=1)
    counts.add(examples)
    ranked = counts.scores({"candidate_post_ids": np.array([[0, 1, 2]]), "candidate_surfaces": np.array([[0, 0, 0]])})
    assert ranked[0, 0, 0] > ranked[0, 2, 0] > ranked[0, 1, 0]


def test_drop_user_ids():
    rng = np.random.default_rng(0)
    ids = np.arange(1000)
    np.testing.assert_array_equal(synthetic.drop_user_ids(ids, 0.0, rng, 7777), ids)
    np.testing.assert_array_equal(synthetic.drop_user_ids(ids, 1.0, rng, 7777), np.full(1000, 7777))
    half = synthetic.drop_user_ids(ids, 0.5, rng, 7777)
    assert 400 < np.sum(half == 7777) < 600 and np.all((half == ids) | (half == 7777))


def test_retrieval_oracle_is_the_distribution_of_positives():
    """Sampled next-engaged posts of one user follow the normalised oracle, not popularity."""
    world = SyntheticWorld(WorldConfig(num_users=5, num_posts=40, num_authors=8, history_len=4, min_history_len=1,
                                       impression_temperature=0.3))
    user = 3
    oracle = synthetic.retrieval_oracle_scores(world, [user])[0]
    oracle /= oracle.sum()
    positives = world.retrieval_examples(np.full(40_000, user), 0)["positive_post_ids"]
    empirical = np.bincount(positives, minlength=40) / len(positives)
    popularity = world.positive_frequencies(np.arange(5), num_users=2_000)
    tv_oracle = 0.5 * np.abs(empirical - oracle).sum()
    assert tv_oracle < 0.03  # sampling noise of 40k draws over 40 posts is ~0.02
    assert tv_oracle < 0.5 * 0.5 * np.abs(empirical - popularity).sum()


def test_held_out_examples_hide_user_ids():
    world = SyntheticWorld(WorldConfig(num_users=50, num_posts=100, num_authors=10, history_len=6,
                                       min_history_len=2, num_candidates=3))
    _, held_out = world.split_users()
    for kind in ("ranking", "retrieval"):
        ex = synthetic.held_out_examples(world, held_out, 3, kind, seed=0)
        np.testing.assert_array_equal(ex["user_ids"], np.full(len(held_out) * 3, 50))
        np.testing.assert_array_equal(ex["true_user_ids"], np.repeat(held_out, 3))


@pytest.mark.parametrize("kind", ["ranking", "retrieval"])
def test_batch_streams_restart_at_any_step(kind):
    """Resuming at step k yields exactly the batches k, k+1, ... of an uninterrupted stream."""
    world = SyntheticWorld(WorldConfig(num_users=30, num_posts=60, num_authors=6, history_len=4, min_history_len=2,
                                       num_candidates=3))
    train_ids, _ = world.split_users()
    hashes = HashConfig(user_table_size=61, post_table_size=127, author_table_size=13)

    def first(start_step, n):
        if kind == "ranking":
            stream = synthetic.ranking_stream(world, train_ids, 5, 3, hashes, 0.5, start_step=start_step)
        else:
            stream = synthetic.retrieval_stream(world, train_ids, 5, 3, hashes, 0.5, np.zeros(60),
                                                start_step=start_step)
        items = [next(stream) for _ in range(n)]
        stream.close()
        return [np.concatenate([np.ravel(x) for x in jax.tree.leaves(item)]) for item in items]

    whole = first(0, 6)
    for k in (1, 4):
        for a, b in zip(first(k, 6 - k), whole[k:], strict=True):
            np.testing.assert_array_equal(a, b)
    assert not np.array_equal(whole[0], whole[1])


def test_popularity_counts_state_round_trip():
    counts = synthetic.PopularityCounts(num_posts=3, num_surfaces=2, num_actions=1)
    counts.add({"candidate_post_ids": np.array([[0, 2]]), "candidate_surfaces": np.array([[1, 1]]),
                "labels": np.array([[[1.0], [0.0]]], np.float32)})
    other = synthetic.PopularityCounts(num_posts=3, num_surfaces=2, num_actions=1)
    other.load_state_dict({k: v.copy() for k, v in counts.state_dict().items()})
    query = {"candidate_post_ids": np.array([[0, 1, 2]]), "candidate_surfaces": np.array([[0, 1, 1]])}
    np.testing.assert_array_equal(other.scores(query), counts.scores(query))
    with pytest.raises(ValueError, match=r"PopularityCounts.post: expected shape \[3, 1\], got \[4, 1\]"):
        other.load_state_dict({**counts.state_dict(), "post": np.zeros((4, 1))})
