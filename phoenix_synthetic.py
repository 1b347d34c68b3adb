"""A synthetic recommendation world with planted signal, its training streams and its evaluators.

    world = phoenix_synthetic.SyntheticWorld(phoenix_synthetic.world_config())
    train_ids, held_out = world.split_users()
    batches = phoenix_synthetic.ranking_stream(world, train_ids, 128, 0, HashConfig(), user_id_dropout=1.0)

The synthetic experiment (train_synthetic.py, `run_train.py --data synthetic`) and the demos
(run_ranker.py, run_retrieval.py) train on it; the oracle and a popularity baseline are the
yardsticks their figures are measured against (docs/notes.md, "The synthetic world").

Shape glossary
  B  batch (users)        S  history length        C  candidates per user
  A  actions (19, runners.ACTIONS order)           L  latent dimension
  U  users                N  posts                 Na  authors
  I  impressions drawn per user                    Np  product surfaces
  E  evaluation examples  U'  distinct evaluated users   K  recall cut-off (RECALL_K)

Generative model (NumPy, deterministic by WorldConfig.seed)
  users u and authors m:  latent x ~ N(0, I_L).
  posts n:  author m(n) (every author has >= 1 post; lognormal author weights make some prolific),
            latent p_n = sqrt(1 - s^2) x_m(n) + s eps with s = author_spread (unit variance),
            popularity pop_n ~ N(0, popularity_std^2).
  affinity(u, n) = <x_u, p_n> / sqrt(L), about N(0, 1) over random pairs.
  P(action a | u, n, surface k) = sigmoid(base[a] + surface_shift[k, a]
                                          + sign[a] * scale[a] * affinity_scale * affinity(u, n)
                                          + [a is positive] * popularity_weight * pop_n)
  sign[a] = -1 for the NEGATIVE_ACTIONS (not_interested, block_author, mute_author, report), +1 for
  the rest; `dwell_time` is a binary "long dwell" label. `true_probabilities` is this oracle.
  Impressions of user u: with probability impression_affinity_share an author drawn from
  softmax(affinity(u, author) / impression_temperature) and a uniform post of that author, else a
  post drawn from softmax(pop); surfaces uniform; actions ~ Bernoulli(P). An impression is
  engaged iff it has at least one positive action.
  History: the user's engaged impressions in time order, cut to a random length in
  [min_history_len, S] (shorter only if too few were engaged), then padded.
  Ranking candidates: a share `candidate_relevant_fraction` drawn by the affinity sampler, the rest
  uniform over all posts, in random order; labels ~ Bernoulli(oracle).
  Retrieval positive: the engaged impression right after the history (the user's next engagement).

Raw ids are indices: users 0..U-1, posts 0..N-1, authors 0..Na-1 (int64).
Padding (phoenix_hashing.py's convention): post and author ids PAD_ID (-1), actions 0, surface 0.

A realistic interaction log (make_log, write_log; scripts/make_log.py) is the other half of this
module: a plain user/item/time table, no oracle, for the own-data pipeline (docs/synthetic.md).

Cost: the world is O(N L) memory; a batch costs O(B (Na + I A)) and never touches all N posts, so
batches are generated on the fly (docs/synthetic.md has the timings).
"""

import dataclasses
import gzip
import itertools
import math
import os
from pathlib import Path
from typing import Iterator, Optional

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from phoenix_batching import chunks, prefetch, take
from phoenix_inputs import ACTIONS, PAD_ID, HashConfig, RawBatch, RecsysBatch
from phoenix_metrics import auc, recall_at_k
from phoenix_optim import OptimizerConfig
from phoenix_validation import check_int, check_number

__all__ = ["SyntheticWorld", "WorldConfig", "world_config", "split_users", "to_recsys_batch", "to_retrieval_batch",
           "ranking_stream", "retrieval_stream", "PopularityCounts", "held_out_examples", "evaluate_ranker",
           "evaluate_retrieval", "retrieval_oracle_scores", "corpus_batch", "gap_closed", "optimizer_config",
           "unknown_user_id", "ACTIONS", "NEGATIVE_ACTIONS", "make_log", "write_log", "default_log_sizes",
           "LOG_FORMATS"]

NEGATIVE_ACTIONS = ("not_interested_score", "block_author_score", "mute_author_score",
                    "report_score")

# (base logit, affinity scale) per action. Base logits order the rates as in a real feed (dwell
# common, reports rare); impressions drawn by affinity lift the absolute rates (favorite ~35% of
# candidates with the defaults), so a short demo sees enough positives of every action. Scales say
# how personal an action is (follows and shares more than photo expands).
ACTION_PARAMS = {
    "favorite_score": (-2.0, 1.0),
    "reply_score": (-4.0, 1.2),
    "repost_score": (-3.5, 1.2),
    "photo_expand_score": (-3.0, 0.6),
    "click_score": (-2.0, 0.8),
    "profile_click_score": (-3.5, 1.0),
    "vqv_score": (-2.5, 0.6),
    "share_score": (-4.5, 1.2),
    "share_via_dm_score": (-5.0, 1.2),
    "share_via_copy_link_score": (-5.5, 1.0),
    "dwell_score": (-1.0, 0.8),
    "quote_score": (-5.0, 1.2),
    "quoted_click_score": (-4.5, 0.8),
    "follow_author_score": (-5.0, 1.5),
    "not_interested_score": (-4.0, 1.0),
    "block_author_score": (-6.0, 1.2),
    "mute_author_score": (-5.5, 1.2),
    "report_score": (-7.0, 1.0),
    "dwell_time": (-1.5, 1.0),
}

MAX_PRODUCT_SURFACES = 16  # the models' product_surface_vocab_size default
# Rows that got too few engaged impressions are redrawn this many times before we give up.
_MAX_REDRAWS = 20
# Independent random streams derived from the world seed (SeedSequence spawn keys).
_WORLD_STREAM, _SPLIT_STREAM, _EXAMPLE_STREAM, _RANKING_STREAM, _RETRIEVAL_STREAM = range(5)


# Smallest allowed value of each integer field of WorldConfig (None: any int).
_INT_FIELDS = {"num_users": 1, "num_posts": 1, "num_authors": 1, "latent_dim": 1, "num_product_surfaces": 1,
               "history_len": 1, "num_candidates": 1, "min_history_len": 0, "seed": None}
# Closed range [low, high] of each real field; all must be finite (impression_temperature: > 0).
_REAL_FIELDS = {"affinity_scale": (0.0, math.inf), "popularity_std": (0.0, math.inf),
                "popularity_weight": (0.0, math.inf), "surface_shift_std": (0.0, math.inf),
                "author_spread": (0.0, 1.0), "impression_affinity_share": (0.0, 1.0),
                "impression_temperature": (0.0, math.inf), "impressions_per_slot": (1.0, math.inf),
                "candidate_relevant_fraction": (0.0, 1.0)}


def _check_real(value, name: str, low: float = -math.inf, high: float = math.inf) -> float:
    """A finite real number (not bool) in [low, high]."""
    check_number(value, name, f"a finite number in [{low}, {high}]", lambda v: low <= v <= high)
    return float(value)


def _check_ids(ids, name: str, size: int, size_name: str, ndim: Optional[int] = None,
               nonempty: bool = False) -> np.ndarray:
    """Ids as int64: an integer array (`ndim` dims if given) with values in [0, size).

    NumPy would wrap negative ids around to the last rows and truncate float ids; both are refused.
    """
    ids = np.asarray(ids)
    if ids.size == 0 and ids.dtype == np.float64:
        ids = ids.astype(np.int64)  # np.asarray([]) is float64; an empty list is a fine empty batch
    if not np.issubdtype(ids.dtype, np.integer):  # bool is not an np.integer
        raise TypeError(f"{name}: expected integer ids, got dtype {ids.dtype}")
    if ndim is not None and ids.ndim != ndim:
        raise ValueError(f"{name}: expected a {ndim}-D array of ids, got shape {ids.shape}")
    if nonempty and ids.size == 0:
        raise ValueError(f"{name}: expected at least one id, got shape {ids.shape}")
    if ids.size and (ids.min() < 0 or ids.max() >= size):
        raise ValueError(f"{name}: expected ids in [0, {size}) ({size_name}), got range "
                         f"[{ids.min()}, {ids.max()}]")
    return ids.astype(np.int64, copy=False)


@dataclasses.dataclass(frozen=True)
class WorldConfig:
    """Sizes and knobs of a `SyntheticWorld`; defaults are the laptop demo (quick to build: docs/synthetic.md)."""

    num_users: int = 1_000
    num_posts: int = 5_000
    num_authors: int = 200  # each author has >= 1 post, so num_authors <= num_posts
    latent_dim: int = 16  # L; affinity is a dot product in this space
    num_product_surfaces: int = 4  # Np <= 16, the models' surface vocabulary
    history_len: int = 32  # S
    num_candidates: int = 16  # C
    min_history_len: int = 4  # histories are cut to a uniform length in [min_history_len, S]
    # Multiplies affinity in every action logit: the strength of the personal signal.
    affinity_scale: float = 1.5
    popularity_std: float = 1.0  # spread of pop_n; also the skew of popularity sampling
    popularity_weight: float = 0.75  # how much popularity lifts positive-action logits
    surface_shift_std: float = 0.5  # spread of the per-(surface, action) logit shifts
    author_spread: float = 0.5  # 0: posts copy their author's latent, 1: independent of it
    impression_affinity_share: float = 0.7  # rest of the impressions are drawn by popularity
    impression_temperature: float = 0.5  # lower: impressions concentrate on the closest authors
    impressions_per_slot: float = 3.0  # I = ceil(this * S) impressions drawn per user
    candidate_relevant_fraction: float = 0.5  # share of candidates drawn by affinity
    seed: int = 0

    def __post_init__(self):
        for name, low in _INT_FIELDS.items():
            check_int(getattr(self, name), f"WorldConfig.{name}", low)
        for name, (low, high) in _REAL_FIELDS.items():
            _check_real(getattr(self, name), f"WorldConfig.{name}", low, high)
        if not self.impression_temperature > 0:  # it divides the affinity logits
            raise ValueError(f"WorldConfig.impression_temperature: expected > 0, got {self.impression_temperature}")
        if self.num_authors > self.num_posts:
            raise ValueError(f"WorldConfig.num_authors: expected <= num_posts ({self.num_posts}; every author "
                             f"has a post), got {self.num_authors}")
        if self.num_product_surfaces > MAX_PRODUCT_SURFACES:
            raise ValueError(f"WorldConfig.num_product_surfaces: expected <= {MAX_PRODUCT_SURFACES} (the "
                             f"models' surface vocabulary), got {self.num_product_surfaces}")
        if self.min_history_len > self.history_len:
            raise ValueError(f"WorldConfig.min_history_len: expected <= history_len ({self.history_len}), "
                             f"got {self.min_history_len}")

    @property
    def num_impressions(self) -> int:
        return math.ceil(self.impressions_per_slot * self.history_len)

    @classmethod
    def large(cls, **overrides) -> "WorldConfig":
        """1M posts, 100k users, 10k authors, S=128, C=32 (the models' default sequence lengths)."""
        kwargs = dict(num_users=100_000, num_posts=1_000_000, num_authors=10_000,
                      history_len=128, num_candidates=32, min_history_len=16)
        return cls(**{**kwargs, **overrides})


def _generator(seed: int, stream: int, sub_seed: int = 0) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([seed & (2**63 - 1), stream, sub_seed]))


def split_users(num_users: int, held_out_fraction: float = 0.1, seed: int = 0):
    """Deterministic split of user ids 0..U-1 into (train_ids, held_out_ids), both sorted int64."""
    check_int(num_users, "num_users", 0)
    _check_real(held_out_fraction, "held_out_fraction", 0.0, 1.0)
    perm = _generator(seed, _SPLIT_STREAM).permutation(num_users)  # [U]
    num_held_out = int(round(held_out_fraction * num_users))
    return np.sort(perm[num_held_out:]).astype(np.int64), np.sort(perm[:num_held_out]).astype(np.int64)


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * x))  # overflow-free


def _searchsorted_right(sorted_array: np.ndarray, queries: np.ndarray) -> np.ndarray:
    """np.searchsorted(side="right") with the queries sorted first: faster for large arrays
    (docs/synthetic.md), because the binary searches then walk memory in order."""
    flat = queries.ravel()
    order = np.argsort(flat)
    idx = np.empty(flat.shape, np.int64)
    idx[order] = np.searchsorted(sorted_array, flat[order], side="right")
    return idx.reshape(queries.shape)


class _RowSampler:
    """Categorical draws from one distribution per row, probs [B, K]; build once per batch.

    Row r's CDF is shifted by r so that all rows live in one sorted array and one searchsorted
    serves every row (or any subset of rows, for redraws).
    """

    def __init__(self, probs: np.ndarray):
        self.num_rows, self.num_classes = probs.shape
        cdf = np.cumsum(probs, axis=1, dtype=np.float64)  # [B, K]
        cdf[:, -1] = 1.0  # absorb rounding so every uniform in [0, 1) lands in its row
        self.flat_cdf = (cdf + np.arange(self.num_rows)[:, None]).ravel()  # [B*K], sorted

    def draw(self, rows: np.ndarray, num: int, rng) -> np.ndarray:
        """`num` draws for each of `rows` [b] -> class indices [b, num]."""
        queries = rng.random((len(rows), num)) + rows[:, None]  # [b, num]
        idx = _searchsorted_right(self.flat_cdf, queries) - rows[:, None] * self.num_classes
        return np.minimum(idx, self.num_classes - 1)


class SyntheticWorld:
    """Users, authors and posts with latent vectors, and the oracle engagement model above."""

    def __init__(self, cfg: WorldConfig = WorldConfig()):
        self.cfg = cfg
        rng = _generator(cfg.seed, _WORLD_STREAM)
        num_users, num_posts, num_authors, dim = (cfg.num_users, cfg.num_posts, cfg.num_authors,
                                                  cfg.latent_dim)
        self.user_latent = rng.standard_normal((num_users, dim), dtype=np.float32)  # [U, L]
        self.author_latent = rng.standard_normal((num_authors, dim), dtype=np.float32)  # [Na, L]
        # One post per author first (so none is empty), the rest by lognormal author weights.
        weights = rng.lognormal(0.0, 1.0, num_authors)  # [Na]
        extra = rng.choice(num_authors, num_posts - num_authors, p=weights / weights.sum())
        self.post_author = rng.permutation(
            np.concatenate([np.arange(num_authors), extra])).astype(np.int64)  # [N]
        noise = rng.standard_normal((num_posts, dim), dtype=np.float32)  # [N, L]
        spread = np.float32(cfg.author_spread)
        self.post_latent = np.sqrt(np.float32(1.0) - spread**2) * self.author_latent[
            self.post_author] + spread * noise  # [N, L]
        self.post_popularity = (cfg.popularity_std * rng.standard_normal(num_posts)).astype(
            np.float32)  # [N]
        self.surface_shift = (cfg.surface_shift_std * rng.standard_normal(
            (cfg.num_product_surfaces, len(ACTIONS)))).astype(np.float32)  # [Np, A]

        self.action_base = np.array([ACTION_PARAMS[a][0] for a in ACTIONS], np.float32)  # [A]
        self.action_sign = np.array([-1.0 if a in NEGATIVE_ACTIONS else 1.0 for a in ACTIONS],
                                    np.float32)  # [A]
        self.action_scale = np.array([ACTION_PARAMS[a][1] for a in ACTIONS], np.float32)  # [A]
        self.positive_actions = self.action_sign > 0  # [A] bool

        # Samplers: popularity CDF over posts; posts grouped by author for the affinity sampler.
        pop_weights = np.exp(self.post_popularity.astype(np.float64))  # [N]
        self.popularity_probs = pop_weights / pop_weights.sum()  # [N]
        self._popularity_cdf = np.cumsum(self.popularity_probs)  # [N]
        self._posts_by_author = np.argsort(self.post_author, kind="stable")  # [N]
        self.author_num_posts = np.bincount(self.post_author, minlength=num_authors)  # [Na]
        self._author_offsets = np.concatenate([[0], np.cumsum(self.author_num_posts)])  # [Na+1]

    # ----------------------------------------------------------------------------- oracle

    def _check_users(self, user_ids, name: str = "user_ids", **kwargs) -> np.ndarray:
        return _check_ids(user_ids, name, self.cfg.num_users, "num_users", **kwargs)

    def _check_posts(self, post_ids, name: str = "post_ids") -> np.ndarray:
        return _check_ids(post_ids, name, self.cfg.num_posts, "num_posts")

    def _check_surfaces(self, surfaces) -> np.ndarray:
        return _check_ids(surfaces, "surfaces", self.cfg.num_product_surfaces, "num_product_surfaces")

    def affinity(self, user_ids, post_ids) -> np.ndarray:
        """<x_u, p_n> / sqrt(L) for broadcastable user_ids and post_ids -> [...] float32."""
        return self._affinity(self._check_users(user_ids), self._check_posts(post_ids))

    def _affinity(self, user_ids, post_ids) -> np.ndarray:
        users = self.user_latent[user_ids]  # [..., L]
        posts = self.post_latent[post_ids]  # [..., L]
        return (users * posts).sum(-1) / np.float32(math.sqrt(self.cfg.latent_dim))

    def probabilities_from_affinity(self, affinity, popularity, surfaces) -> np.ndarray:
        """The link function: affinity, popularity, surfaces (broadcastable [...]) -> [..., A]."""
        for name, x in (("affinity", affinity), ("popularity", popularity)):
            if not np.all(np.isfinite(np.asarray(x, np.float64))):
                raise ValueError(f"{name}: expected finite values, got NaN or inf")
        return self._link(affinity, popularity, self._check_surfaces(surfaces))

    def _link(self, affinity, popularity, surfaces) -> np.ndarray:
        cfg = self.cfg
        affinity = np.asarray(affinity, np.float32)[..., None]  # [..., 1]
        popularity = np.asarray(popularity, np.float32)[..., None]  # [..., 1]
        logits = (self.action_base + self.surface_shift[surfaces]
                  + self.action_sign * self.action_scale * np.float32(cfg.affinity_scale) * affinity
                  + self.positive_actions * np.float32(cfg.popularity_weight) * popularity)
        return _sigmoid(logits).astype(np.float32)  # [..., A]

    def true_probabilities(self, user_ids, post_ids, surfaces) -> np.ndarray:
        """Oracle P(action | user, post, surface) for broadcastable ids [...] -> [..., A] float32."""
        return self._true_probabilities(self._check_users(user_ids), self._check_posts(post_ids),
                                        self._check_surfaces(surfaces))

    def _true_probabilities(self, user_ids, post_ids, surfaces) -> np.ndarray:
        return self._link(self._affinity(user_ids, post_ids), self.post_popularity[post_ids], surfaces)

    # ----------------------------------------------------------------------------- samplers

    def author_probabilities(self, user_ids) -> np.ndarray:
        """softmax(affinity(u, author) / impression_temperature): user_ids [B] -> [B, Na] float32."""
        return self._author_probabilities(self._check_users(user_ids, ndim=1))

    def _author_probabilities(self, user_ids) -> np.ndarray:
        users = self.user_latent[user_ids]  # [B, L]
        logits = users @ self.author_latent.T  # [B, Na]
        logits *= np.float32(1.0 / (math.sqrt(self.cfg.latent_dim) * self.cfg.impression_temperature))
        logits -= logits.max(axis=1, keepdims=True)
        probs = np.exp(logits, out=logits)
        return probs / probs.sum(axis=1, keepdims=True, dtype=np.float64).astype(np.float32)

    def _author_sampler(self, user_ids) -> _RowSampler:
        return _RowSampler(self._author_probabilities(user_ids))

    def _affinity_posts(self, sampler: _RowSampler, rows, num: int, rng) -> np.ndarray:
        """Posts drawn by affinity for the users at `rows` [b] of `sampler` -> post ids [b, num]."""
        authors = sampler.draw(rows, num, rng)  # [b, num]
        within = np.floor(rng.random(authors.shape) * self.author_num_posts[authors]).astype(np.int64)
        return self._posts_by_author[self._author_offsets[authors] + within]  # [b, num]

    def _popular_posts(self, shape, rng) -> np.ndarray:
        idx = _searchsorted_right(self._popularity_cdf, rng.random(shape))
        return np.minimum(idx, self.cfg.num_posts - 1).astype(np.int64)

    def impression_probabilities(self, user_ids, chunk: int = 1024) -> np.ndarray:
        """Exact probability [N] that an impression of a user drawn uniformly from user_ids is post n."""
        share = self.cfg.impression_affinity_share
        user_ids = self._check_users(user_ids, ndim=1, nonempty=True)
        chunk = check_int(chunk, "chunk")
        author_probs = np.zeros(self.cfg.num_authors)  # [Na]
        for start in range(0, len(user_ids), chunk):
            author_probs += self._author_probabilities(user_ids[start:start + chunk]).sum(
                axis=0, dtype=np.float64)
        author_probs /= len(user_ids)
        per_post = author_probs[self.post_author] / self.author_num_posts[self.post_author]  # [N]
        return share * per_post + (1.0 - share) * self.popularity_probs

    def _impression_posts(self, sampler: _RowSampler, rows, num: int, rng):
        """`num` impressions for each user at `rows` [b] of `sampler`: post ids, surfaces [b, num]."""
        shape = (len(rows), num)
        by_affinity = rng.random(shape) < self.cfg.impression_affinity_share  # [b, num]
        posts = np.where(by_affinity, self._affinity_posts(sampler, rows, num, rng),
                         self._popular_posts(shape, rng))  # [b, num]
        return posts, rng.integers(0, self.cfg.num_product_surfaces, size=shape)

    def _impressions(self, user_ids, sampler: _RowSampler, rows, rng):
        """I impressions per user in time order: post ids [b, I], surfaces [b, I], actions [b, I, A]."""
        posts, surfaces = self._impression_posts(sampler, rows, self.cfg.num_impressions, rng)
        probs = self._true_probabilities(user_ids[rows][:, None], posts, surfaces)  # [b, I, A]
        actions = (rng.random(probs.shape) < probs).astype(np.float32)  # [b, I, A]
        return posts, surfaces, actions

    def _is_engaged(self, actions) -> np.ndarray:
        """At least one positive action: actions [..., A] -> [...] bool."""
        return (actions[..., self.positive_actions] > 0).any(-1)

    def _engaged_sequences(self, user_ids, sampler: _RowSampler, rng, min_engaged: int):
        """Engaged impressions first, in time order: posts, surfaces [B, I], actions [B, I, A], counts [B].

        Users with fewer than `min_engaged` engagements are redrawn (up to _MAX_REDRAWS times).
        """
        user_ids = np.asarray(user_ids)
        posts, surfaces, actions = self._impressions(user_ids, sampler, np.arange(len(user_ids)),
                                                     rng)
        for _ in range(_MAX_REDRAWS):
            short = np.flatnonzero(self._is_engaged(actions).sum(axis=1) < min_engaged)
            if len(short) == 0:
                break
            posts[short], surfaces[short], actions[short] = self._impressions(user_ids, sampler,
                                                                              short, rng)
        engaged = self._is_engaged(actions)  # [B, I]
        counts = engaged.sum(axis=1)  # [B]
        order = np.argsort(~engaged, axis=1, kind="stable")  # [B, I]: engaged first, time kept
        rows = np.arange(len(user_ids))[:, None]
        return posts[rows, order], surfaces[rows, order], actions[rows, order], counts

    def _history(self, posts, surfaces, actions, lengths):
        """First `lengths` [B] of the engaged sequences as padded history arrays of length S."""
        history_len = self.cfg.history_len
        valid = np.arange(history_len)[None, :] < lengths[:, None]  # [B, S]
        post_ids = np.where(valid, posts[:, :history_len], PAD_ID)  # [B, S]
        return {
            "history_post_ids": post_ids,
            "history_author_ids": np.where(valid, self.post_author[np.maximum(post_ids, 0)],
                                           PAD_ID),  # [B, S]
            "history_actions": actions[:, :history_len] * valid[..., None],  # [B, S, A]
            "history_surfaces": np.where(valid, surfaces[:, :history_len], 0).astype(np.int32),
            "history_lengths": lengths.astype(np.int32),  # [B]
        }

    def _rng(self, rng_or_seed) -> np.random.Generator:
        if isinstance(rng_or_seed, np.random.Generator):
            return rng_or_seed
        return _generator(self.cfg.seed, _EXAMPLE_STREAM, check_int(rng_or_seed, "rng_or_seed", 0))

    # ----------------------------------------------------------------------------- examples

    def split_users(self, held_out_fraction: float = 0.1):
        """`split_users` of this world's users with its seed: (train_ids, held_out_ids)."""
        return split_users(self.cfg.num_users, held_out_fraction, self.cfg.seed)

    def ranking_examples(self, user_ids, rng_or_seed=0) -> dict:
        """One ranking example per user id [B]: history, C candidates, labels and oracle.

        Keys: user_ids [B] int64; history_post_ids, history_author_ids [B, S] int64 (PAD_ID after
        history_lengths [B]); history_actions [B, S, A] float32; history_surfaces [B, S] int32;
        candidate_post_ids, candidate_author_ids [B, C] int64; candidate_surfaces [B, C] int32;
        labels [B, C, A] float32 sampled from oracle [B, C, A] float32.
        """
        cfg, rng = self.cfg, self._rng(rng_or_seed)
        user_ids = self._check_users(user_ids, ndim=1)
        batch = len(user_ids)
        sampler = self._author_sampler(user_ids)
        posts, surfaces, actions, counts = self._engaged_sequences(user_ids, sampler, rng,
                                                                   cfg.min_history_len)
        target = rng.integers(cfg.min_history_len, cfg.history_len + 1, size=batch)  # [B]
        example = {"user_ids": user_ids,
                   **self._history(posts, surfaces, actions, np.minimum(target, counts))}

        num_relevant = int(round(cfg.candidate_relevant_fraction * cfg.num_candidates))
        candidates = np.concatenate([
            self._affinity_posts(sampler, np.arange(batch), num_relevant, rng),
            rng.integers(0, cfg.num_posts, size=(batch, cfg.num_candidates - num_relevant)),
        ], axis=1)  # [B, C]
        # Shuffle so that a candidate's slot says nothing about how it was drawn.
        candidates = rng.permuted(candidates, axis=1)
        candidate_surfaces = rng.integers(0, cfg.num_product_surfaces, size=candidates.shape)
        oracle = self._true_probabilities(user_ids[:, None], candidates, candidate_surfaces)
        example.update(
            candidate_post_ids=candidates,
            candidate_author_ids=self.post_author[candidates],  # [B, C]
            candidate_surfaces=candidate_surfaces.astype(np.int32),  # [B, C]
            labels=(rng.random(oracle.shape) < oracle).astype(np.float32),  # [B, C, A]
            oracle=oracle,  # [B, C, A]
        )
        return example

    def retrieval_examples(self, user_ids, rng_or_seed=0) -> dict:
        """One retrieval example per user id [B]: history and the next engaged post (the positive).

        Keys: the history keys of `ranking_examples` (user_ids, history_* [B, S], history_lengths)
        plus positive_post_ids, positive_author_ids [B] int64 and positive_surfaces [B] int32.
        The history holds >= 1 engagement unless a user had only one after all redraws.
        """
        cfg, rng = self.cfg, self._rng(rng_or_seed)
        user_ids = self._check_users(user_ids, ndim=1)
        posts, surfaces, actions, counts = self._engaged_sequences(
            user_ids, self._author_sampler(user_ids), rng, cfg.min_history_len + 1)
        if np.any(counts < 1):
            raise RuntimeError("a user engaged with nothing in all redraws; raise "
                               "impressions_per_slot or the base rates")
        target = rng.integers(cfg.min_history_len, cfg.history_len + 1, size=len(user_ids))
        lengths = np.minimum(target, counts - 1)  # [B], leaves the next engagement for the positive
        rows = np.arange(len(user_ids))
        positives = posts[rows, lengths]  # [B]
        return {
            "user_ids": user_ids,
            **self._history(posts, surfaces, actions, lengths),
            "positive_post_ids": positives,
            "positive_author_ids": self.post_author[positives],
            "positive_surfaces": surfaces[rows, lengths].astype(np.int32),
        }

    def corpus(self) -> dict:
        """All posts, for recall@K over the full corpus: post_ids [N] and author_ids [N], int64."""
        return {"post_ids": np.arange(self.cfg.num_posts, dtype=np.int64),
                "author_ids": self.post_author.copy()}

    def engagement_probability(self, user_ids, post_ids, surfaces) -> np.ndarray:
        """P(at least one positive action) for broadcastable ids [...] -> [...] float64."""
        return self._engagement_probability(self._check_users(user_ids), self._check_posts(post_ids),
                                            self._check_surfaces(surfaces))

    def _engagement_probability(self, user_ids, post_ids, surfaces) -> np.ndarray:
        probs = self._true_probabilities(user_ids, post_ids, surfaces)[..., self.positive_actions]
        return 1.0 - np.prod(1.0 - probs.astype(np.float64), axis=-1)

    def positive_frequencies(self, user_ids, num_users: int = 20_000, seed: int = 0,
                             impressions_per_user: int = 16, pseudo_counts_per_post: float = 0.5,
                             chunk: int = 1024) -> np.ndarray:
        """Probability [N] (float64, sums to 1) that a post is the positive of a retrieval example.

        For logQ correction of in-batch softmax: log_q = log(freq[positive_post_ids]).
        Impressions are i.i.d. given the user, so a user's next engaged post is distributed as
        P(n | u) e(u, n) / Z_u, with e the engagement probability and Z_u its mean over P(. | u).
        We sample `num_users` users from user_ids (as `retrieval_batches` does) and
        `impressions_per_user` impressions each, and add e / (K * Z_hat_u) per impression: every
        sampled user contributes mass 1 without sampling any actions (Rao-Blackwellised, so far
        less noisy than counting sampled positives). `pseudo_counts_per_post * N` pseudo-users
        spread as the impression distribution (`impression_probabilities`) smooth the estimate so
        that unseen posts keep a sensible non-zero frequency.
        """
        cfg = self.cfg
        user_ids = self._check_users(user_ids, ndim=1, nonempty=True)
        num_users, chunk = check_int(num_users, "num_users"), check_int(chunk, "chunk")
        impressions_per_user = check_int(impressions_per_user, "impressions_per_user")
        _check_real(pseudo_counts_per_post, "pseudo_counts_per_post", 0.0)
        rng = _generator(cfg.seed, _RETRIEVAL_STREAM, 2**32 + check_int(seed, "seed", 0))
        users = rng.choice(user_ids, size=num_users)  # [U']
        mass = np.zeros(cfg.num_posts)  # [N]
        for start in range(0, num_users, chunk):
            batch = users[start:start + chunk]  # [b]
            posts, surfaces = self._impression_posts(self._author_sampler(batch),
                                                     np.arange(len(batch)), impressions_per_user,
                                                     rng)  # [b, K]
            engage = self._engagement_probability(batch[:, None], posts, surfaces)  # [b, K]
            weights = engage / engage.sum(axis=1, keepdims=True)  # [b, K], rows sum to 1
            mass += np.bincount(posts.ravel(), weights.ravel(), minlength=cfg.num_posts)
        prior_users = users[:chunk * 4]  # the prior is a smoother: a few thousand users suffice
        freq = mass + pseudo_counts_per_post * cfg.num_posts * self.impression_probabilities(
            prior_users)
        return freq / freq.sum()

    # ----------------------------------------------------------------------------- streams

    def ranking_batches(self, user_ids, batch_size: int, seed: int = 0,
                        hash_config: HashConfig | None = None) -> Iterator:
        """Endless ranking batches of users drawn with replacement from user_ids (deterministic by seed).

        Yields `ranking_examples` dicts, or (RecsysBatch, labels, oracle) when hash_config is given.
        """
        user_ids = self._check_users(user_ids, ndim=1, nonempty=True)
        batch_size = check_int(batch_size, "batch_size")
        rng = _generator(self.cfg.seed, _RANKING_STREAM, check_int(seed, "seed", 0))
        while True:
            examples = self.ranking_examples(rng.choice(user_ids, size=batch_size), rng)
            yield examples if hash_config is None else to_recsys_batch(examples, hash_config)

    def retrieval_batches(self, user_ids, batch_size: int, seed: int = 0,
                          hash_config: HashConfig | None = None) -> Iterator:
        """Endless retrieval batches (deterministic by seed).

        Yields `retrieval_examples` dicts, or (RecsysBatch with the positive in candidate slot 0,
        positive_post_ids [B]) when hash_config is given.
        """
        user_ids = self._check_users(user_ids, ndim=1, nonempty=True)
        batch_size = check_int(batch_size, "batch_size")
        rng = _generator(self.cfg.seed, _RETRIEVAL_STREAM, check_int(seed, "seed", 0))
        while True:
            examples = self.retrieval_examples(rng.choice(user_ids, size=batch_size), rng)
            if hash_config is None:
                yield examples
            else:
                yield to_retrieval_batch(examples, hash_config), examples["positive_post_ids"]


def to_recsys_batch(examples: dict, hash_config: HashConfig):
    """`ranking_examples` dict -> (RecsysBatch of NumPy arrays, labels [B, C, A], oracle [B, C, A])."""
    raw = RawBatch.with_candidates(examples, examples["candidate_post_ids"], examples["candidate_author_ids"],
                                   examples["candidate_surfaces"])
    return raw.hashed(hash_config), examples["labels"], examples["oracle"]


def to_retrieval_batch(examples: dict, hash_config: HashConfig) -> RecsysBatch:
    """`retrieval_examples` dict -> RecsysBatch whose single candidate slot (C = 1) is the positive."""
    return RawBatch.with_candidates(examples, examples["positive_post_ids"][:, None],
                                    examples["positive_author_ids"][:, None],
                                    examples["positive_surfaces"][:, None]).hashed(hash_config)


# ---------------------------------------------------------------------------------------------
# The experiments' world and training settings
# ---------------------------------------------------------------------------------------------


# The synthetic world of the experiments: WorldConfig defaults except two knobs.
WORLD_OVERRIDES = {
    "min_history_len": 16,  # default 4: a 4-post history says little about a new user's taste
    "impression_temperature": 0.3,  # default 0.5: feeds concentrate on the user's closest authors
}
TABLE_INIT_STDDEV = 0.1  # hash-table rows start small, so Adam's fixed-size steps move them fast


def world_config(**overrides) -> WorldConfig:
    """The experiments' world: WorldConfig defaults, then WORLD_OVERRIDES, then `overrides`."""
    return WorldConfig(**{**WORLD_OVERRIDES, **overrides})


def optimizer_config(learning_rate: float, steps: int, warmup_steps: int = 50) -> OptimizerConfig:
    """AdamW, linear warmup, cosine decay to 10% at the last step; dense table updates."""
    warmup = min(warmup_steps, max(steps - 1, 0))
    return OptimizerConfig(learning_rate=learning_rate, warmup_steps=warmup,
                           decay_steps=steps if steps > warmup else None, sparse_table_updates=False)


# ---------------------------------------------------------------------------------------------
# Training streams
# ---------------------------------------------------------------------------------------------


# Keys of the per-step batch generators (step_rng), one per training stream.
TRAIN_RANKING_STREAM, TRAIN_RETRIEVAL_STREAM = 1, 2
# How training batches are drawn; recorded in checkpoints so that a resume never mixes two ways.
STREAM_VERSION = "per-step rng of (world seed, stream, seed, step)"


def unknown_user_id(world_cfg: WorldConfig) -> int:
    """The id standing for "a user without a trained row": one past the last real user."""
    return world_cfg.num_users


def drop_user_ids(user_ids: np.ndarray, rate: float, rng: np.random.Generator, unknown: int) -> np.ndarray:
    """User ids [B] with a share `rate` (each independently) replaced by the unknown-user id."""
    if rate <= 0:
        return user_ids
    return np.where(rng.random(user_ids.shape) < rate, unknown, user_ids)


class PopularityCounts:
    """Non-personal ranking baseline: label rates per (post, action) and per (surface, action),
    counted on training examples and added in logit space (a naive-Bayes popularity x surface)."""

    PRIOR = 5.0  # pseudo-impressions at the action's overall rate, so rarely seen posts stay sane

    def __init__(self, num_posts: int, num_surfaces: int, num_actions: int):
        self.post = np.zeros((num_posts, num_actions))  # [N, A] label sums
        self.post_n = np.zeros(num_posts)  # [N] impressions
        self.surface = np.zeros((num_surfaces, num_actions))
        self.surface_n = np.zeros(num_surfaces)

    def state_dict(self) -> dict:
        """The counts as arrays, for a checkpoint (a resumed run continues counting from them)."""
        return {"post": self.post, "post_n": self.post_n, "surface": self.surface, "surface_n": self.surface_n}

    def load_state_dict(self, arrays: dict) -> None:
        for name, current in self.state_dict().items():
            value = np.asarray(arrays.get(name))
            if value.shape != current.shape:
                raise ValueError(f"PopularityCounts.{name}: expected shape {list(current.shape)}, "
                                 f"got {list(value.shape)}")
            setattr(self, name, value.astype(current.dtype))

    def add(self, examples: dict) -> None:
        posts = examples["candidate_post_ids"].ravel()  # [B*C]
        surfaces = examples["candidate_surfaces"].ravel()  # [B*C]
        labels = examples["labels"].reshape(len(posts), -1)  # [B*C, A]
        np.add.at(self.post, posts, labels)
        self.post_n += np.bincount(posts, minlength=len(self.post_n))
        np.add.at(self.surface, surfaces, labels)
        self.surface_n += np.bincount(surfaces, minlength=len(self.surface_n))

    def scores(self, examples: dict) -> np.ndarray:
        """Logits [B, C, A] for the examples' candidates."""
        overall = (self.post.sum(0) + 1.0) / (self.post_n.sum() + 2.0)  # [A]
        post_rate = (self.post + self.PRIOR * overall) / (self.post_n[:, None] + self.PRIOR)  # [N, A]
        surface_rate = (self.surface + self.PRIOR * overall) / (self.surface_n[:, None] + self.PRIOR)  # [Np, A]

        def logit(p):
            return np.log(p) - np.log1p(-p)

        return (logit(post_rate)[examples["candidate_post_ids"]]
                + logit(surface_rate)[examples["candidate_surfaces"]] - logit(overall))


def step_rng(world_cfg: WorldConfig, stream: int, seed: int, step: int) -> np.random.Generator:
    """The generator of one training batch, a function of (world seed, stream, seed, step) alone:
    a run resumed at step k draws exactly the batches k, k+1, ... of an uninterrupted one."""
    mask = 2**63 - 1  # SeedSequence takes non-negative entropy; seeds may be negative
    return np.random.default_rng(np.random.SeedSequence([world_cfg.seed & mask, stream, seed & mask, step]))


def ranking_examples_stream(world, user_ids, batch_size, seed, hashes, user_id_dropout, start_step=0):
    """Endless (examples dict, RecsysBatch, labels [B, C, A]) of `user_ids` for the steps
    start_step, start_step + 1, ...: users drawn with replacement, ids dropped as configured."""
    unknown = unknown_user_id(world.cfg)
    for step in itertools.count(start_step):
        rng = step_rng(world.cfg, TRAIN_RANKING_STREAM, seed, step)
        examples = world.ranking_examples(rng.choice(user_ids, size=batch_size), rng)
        batch_ids = drop_user_ids(examples["user_ids"], user_id_dropout, rng, unknown)
        batch, labels, _ = to_recsys_batch({**examples, "user_ids": batch_ids}, hashes)
        yield examples, batch, labels


def ranking_stream(world, user_ids, batch_size, seed, hashes, user_id_dropout, counts=None, start_step=0):
    """Endless (RecsysBatch, labels) step arguments from `start_step` on, generated in a background
    thread; `counts` (PopularityCounts) sees exactly the examples handed to the trainer."""
    items = prefetch(ranking_examples_stream(world, user_ids, batch_size, seed, hashes, user_id_dropout,
                                             start_step))
    try:
        for examples, batch, labels in items:
            if counts is not None:
                counts.add(examples)
            yield batch, labels
    finally:
        items.close()


def retrieval_stream(world, user_ids, batch_size, seed, hashes, user_id_dropout, log_freq, start_step=0):
    """Endless {"batch", "log_q" [B]} step arguments (positive in candidate slot 0) from
    `start_step` on, prefetched."""
    def generate():
        unknown = unknown_user_id(world.cfg)
        for step in itertools.count(start_step):
            rng = step_rng(world.cfg, TRAIN_RETRIEVAL_STREAM, seed, step)
            examples = world.retrieval_examples(rng.choice(user_ids, size=batch_size), rng)
            examples["user_ids"] = drop_user_ids(examples["user_ids"], user_id_dropout, rng, unknown)
            yield {"batch": to_retrieval_batch(examples, hashes),
                   "log_q": log_freq[examples["positive_post_ids"]].astype(np.float32)}

    return prefetch(generate())


def example_ranking_batch(world, hashes) -> RecsysBatch:
    """A small batch of the world's shapes, for parameter init."""
    return to_recsys_batch(world.ranking_examples(np.zeros(2, np.int64), 0), hashes)[0]


def corpus_batch(world, hashes) -> RecsysBatch:
    """One unknown user with an empty history and every post of the world as its candidates
    [1, N]: what the candidate tower encodes to build the full corpus."""
    corpus = world.corpus()
    n = len(corpus["post_ids"])
    return RawBatch(np.array([unknown_user_id(world.cfg)]), np.full((1, 1), PAD_ID), np.full((1, 1), PAD_ID),
                    np.zeros((1, 1, len(ACTIONS)), np.float32), np.zeros((1, 1), np.int32),
                    corpus["post_ids"][None], corpus["author_ids"][None], np.zeros((1, n), np.int32)).hashed(hashes)


# ---------------------------------------------------------------------------------------------
# Evaluation on held-out users
# ---------------------------------------------------------------------------------------------


FAVORITE = ACTIONS.index("favorite_score")
RECALL_K = 100
EVAL_BATCH = 250  # rows per predict call in evaluation; the default 5,000 examples split evenly


def held_out_examples(world, held_out, repeats: int, kind: str, seed: int) -> dict:
    """`repeats` examples per held-out user ("ranking" or "retrieval"). `user_ids` is the
    unknown-user id (their rows were never trained); `true_user_ids` keeps who they are."""
    users = np.repeat(np.asarray(held_out, np.int64), repeats)
    make = world.ranking_examples if kind == "ranking" else world.retrieval_examples
    examples = make(users, 10_000 + seed)  # example streams 10_000+: disjoint from demo displays
    examples["true_user_ids"] = examples["user_ids"]
    examples["user_ids"] = np.full_like(users, unknown_user_id(world.cfg))
    return examples


def ranker_logits(trainer, params, examples: dict, batch_size: int = EVAL_BATCH) -> np.ndarray:
    """Model logits [E, C, A] of ranking examples."""
    out = []
    for rows in chunks(len(examples["user_ids"]), batch_size):
        batch, _, _ = to_recsys_batch(take(examples, rows), trainer.hash_config)
        out.append(np.asarray(trainer.predict(params, batch)))
    return np.concatenate(out)


def per_action_auc(scores: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """AUC [A] of scores [..., A] against labels [..., A], pooled over all leading axes."""
    return np.array([auc(scores[..., a], labels[..., a]) for a in range(labels.shape[-1])])


def gap_closed(value: float, oracle: float, chance: float = 0.5) -> float:
    """Share of the way from chance to the oracle: (value - chance) / (oracle - chance)."""
    return (value - chance) / (oracle - chance)


def evaluate_ranker(trainer, params, examples: dict, counts: PopularityCounts) -> dict:
    """Per-action AUC [A] of the model, the oracle and the popularity baseline, and positives [A]."""
    labels = examples["labels"]
    return {"model": per_action_auc(ranker_logits(trainer, params, examples), labels),
            "oracle": per_action_auc(examples["oracle"], labels),
            "popularity": per_action_auc(counts.scores(examples), labels),
            "positives": labels.sum(axis=(0, 1))}


def retrieval_oracle_scores(world, user_ids) -> np.ndarray:
    """True P(next engaged post = n | user) up to a per-user factor, [U', N]: impressions are
    i.i.d. given the user, so it is P(impression = n | u) x P(engaged | u, n), surfaces averaged."""
    cfg = world.cfg
    posts = np.arange(cfg.num_posts)
    scores = np.empty((len(user_ids), cfg.num_posts))
    for i, user in enumerate(np.asarray(user_ids)):
        impression = world.impression_probabilities([user])  # [N]
        engage = np.mean([world.engagement_probability(user, posts, s)
                          for s in range(cfg.num_product_surfaces)], axis=0)  # [N]
        scores[i] = impression * engage
    return scores


def encode_corpus(trainer, params, world) -> np.ndarray:
    """Candidate-tower representations [N, D] of every post."""
    _, candidates, _ = trainer.predict(params, corpus_batch(world, trainer.hash_config))
    return np.asarray(candidates[0])


def user_representations(trainer, params, examples: dict, batch_size: int = EVAL_BATCH) -> np.ndarray:
    """User-tower representations [E, D] of retrieval examples."""
    out = []
    for rows in chunks(len(examples["user_ids"]), batch_size):
        batch = to_retrieval_batch(take(examples, rows), trainer.hash_config)
        out.append(np.asarray(trainer.predict(params, batch)[0]))
    return np.concatenate(out)


def evaluate_retrieval(trainer, params, world, examples: dict, popularity: np.ndarray, k: int = RECALL_K) -> dict:
    """Recall@k over the full corpus of the model, the oracle and the popularity baseline [N]."""
    model_scores = user_representations(trainer, params, examples) @ encode_corpus(trainer, params, world).T
    positives = examples["positive_post_ids"]
    unique, inverse = np.unique(examples["true_user_ids"], return_inverse=True)
    oracle_scores = retrieval_oracle_scores(world, unique)[inverse]  # [E, N]
    popularity_scores = np.broadcast_to(popularity, model_scores.shape)
    return {name: recall_at_k(scores, positives, k)
            for name, scores in (("model", model_scores), ("oracle", oracle_scores),
                                 ("popularity", popularity_scores))}


# ---------------------------------------------------------------------------------------------
# A realistic interaction log (make_log, write_log)
# ---------------------------------------------------------------------------------------------

_LOG_STREAM = 16  # make_log's random stream (apart from the world's streams above)
CATEGORIES = 20  # default item categories (fewer only where there are fewer items)
ROWS_PER_USER = 33  # default users: num_rows / 33 (197k rows -> about 6,000 users)
# Default items: 3,000 at 197k rows, growing as rows^0.85 (12,000 at 1M rows: catalogs grow slower than logs).
ITEMS_AT_REFERENCE, REFERENCE_ROWS, ITEM_GROWTH = 3_000, 197_000, 0.85
MIN_USER_ROWS = 3  # every user has a training, a validation and a test interaction (leave-one-out)
LOG_TIMESTAMPS = ("iso", "unix")
LOG_FORMATS = {".csv": ("csv", None), ".csv.gz": ("csv", "gzip"), ".tsv": ("tsv", None),
               ".tsv.gz": ("tsv", "gzip"), ".parquet": ("parquet", None)}
_EPOCH_START = "2024-01-01"  # the first possible timestamp
_SPAN_S = 365 * 86_400  # users start within a year and stay active for a share of it
GZIP_LEVEL = 6  # gzip's own default: its usual size at a few seconds per million rows
_ISO_FORMAT = "%Y-%m-%dT%H:%M:%SZ"  # UTC, whole seconds (phoenix_log reads it as UTC)


def default_log_sizes(num_rows: int) -> tuple[int, int]:
    """(users, items) make_log uses when not given: num_rows / ROWS_PER_USER users and
    ITEMS_AT_REFERENCE x (num_rows / REFERENCE_ROWS)^ITEM_GROWTH items."""
    users = max(1, round(num_rows / ROWS_PER_USER))
    items = max(2, round(ITEMS_AT_REFERENCE * (num_rows / REFERENCE_ROWS) ** ITEM_GROWTH))
    return users, items


def _segment_starts(lengths: np.ndarray) -> np.ndarray:
    """[U] offset of each user's first row in a flat array of consecutive users."""
    return np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)


def _string_ids(prefix: str, count: int, rng: np.random.Generator) -> pa.Array:
    """[V] string ids "<prefix><zero-padded number>" of codes 0..V-1, numbered in a random order (so
    that an id says nothing of how it was generated); a row's id is then an Arrow take, per id not per row."""
    width = len(str(count - 1))
    return pc.take(pa.array([f"{prefix}{k:0{width}d}" for k in range(count)]), pa.array(rng.permutation(count)))


def make_log(num_rows: int, seed: int = 0, *, num_users: Optional[int] = None, num_items: Optional[int] = None,
             num_categories: Optional[int] = None, zipf_exponent: float = 0.8, series_follow: float = 0.35,
             mean_series_len: float = 4.0, repeat_prob: float = 0.03, taste_concentration: float = 0.5,
             drift: float = 0.6, length_sigma: float = 1.0, timestamps: str = "iso", shuffle: bool = True,
             truth_columns: bool = False) -> pa.Table:
    """A realistic interaction log as an Arrow table (columns user_id, item_id, timestamp; read it with
    phoenix_log.from_arrays, write it with write_log). Deterministic from `seed`; NumPy-vectorised over
    users (one step per position in the longest history, never one per row).

    Users ("u000123", num_users, default default_log_sizes: 1 per ROWS_PER_USER rows) have
    MIN_USER_ROWS + a multinomial share of the rest of the rows, by lognormal(0, length_sigma)
    weights (heavy users and light ones). Items ("sku-0042", num_items) each belong to one of
    num_categories categories (default CATEGORIES, at most one per item); popularity is Zipf
    (weight 1 / rank^zipf_exponent, ranks in random order). Items of a category form "series" of
    consecutive items (geometric lengths, mean mean_series_len, never across categories). A user's
    interaction, in time order:
      1. after an item with a next item in its series, that next item with probability series_follow;
      2. else, with probability repeat_prob (after the first), one of the user's earlier items
         (uniform: a re-consumption);
      3. else a fresh item: a category from the user's taste, then an item of it by popularity.
    Tastes drift: a user has two Dirichlet(taste_concentration) category distributions, early and
    late, and at progress f in [0, 1] through their history draws from the late one with
    probability drift x f. Timestamps: each user starts at a uniform time in a year from 2024-01-01
    and their gaps are exponential (at least 1 s, strictly increasing per user); "iso" gives
    ISO-8601 UTC text ("2024-03-05T17:02:11Z"), "unix" int64 Unix seconds. `shuffle`: rows in
    random order (else by user, then time). `truth_columns`: add the item's category ("c07") and
    the next item of its series ("series_next", "" for none), columns Phoenix ignores (for checks
    of the log's properties).
    """
    check_int(num_rows, "num_rows", 1)
    check_int(seed, "seed", 0)
    users, items = default_log_sizes(num_rows)
    users = users if num_users is None else check_int(num_users, "num_users", 1)
    items = items if num_items is None else check_int(num_items, "num_items", 2)
    if num_categories is None:
        num_categories = min(CATEGORIES, items)
    check_int(num_categories, "num_categories", 1)
    if num_categories > items:
        raise ValueError(f"num_categories: expected at most num_items ({items}) categories (each has an item), "
                         f"got {num_categories}")
    if num_rows < MIN_USER_ROWS * users:
        raise ValueError(f"num_rows: expected at least {MIN_USER_ROWS} rows per user ({MIN_USER_ROWS * users} for "
                         f"{users} users), got {num_rows}; pass fewer num_users")
    for name, value, low, high in (("zipf_exponent", zipf_exponent, 0.0, 10.0),
                                   ("series_follow", series_follow, 0.0, 1.0),
                                   ("mean_series_len", mean_series_len, 1.0, math.inf),
                                   ("repeat_prob", repeat_prob, 0.0, 1.0),
                                   ("taste_concentration", taste_concentration, 1e-3, math.inf),
                                   ("drift", drift, 0.0, 1.0), ("length_sigma", length_sigma, 0.0, 5.0)):
        _check_real(value, name, low, high)
    if timestamps not in LOG_TIMESTAMPS:
        raise ValueError(f"timestamps: expected one of {LOG_TIMESTAMPS}, got {timestamps!r}")
    rng = _generator(seed, _LOG_STREAM)

    # Users: lengths, sorted longest first so that the users active at step t are a prefix.
    weights = rng.lognormal(0.0, length_sigma, users)  # [U]
    lengths = MIN_USER_ROWS + rng.multinomial(num_rows - MIN_USER_ROWS * users, weights / weights.sum())  # [U]
    lengths = -np.sort(-lengths)  # [U]
    starts = _segment_starts(lengths)  # [U]
    active = np.searchsorted(-lengths, -np.arange(int(lengths[0])), side="left")  # [T] users with > t rows

    # Items: categories in blocks, Zipf popularity in random rank order, series of consecutive items.
    per_category = 1 + rng.multinomial(items - num_categories, np.full(num_categories, 1 / num_categories))  # [Cat]
    item_category = np.repeat(np.arange(num_categories), per_category)  # [N], ascending
    popularity = (1.0 + rng.permutation(items)) ** -zipf_exponent  # [N]
    cum = np.cumsum(popularity)  # [N]
    category_start = _segment_starts(per_category)  # [Cat]
    before = np.concatenate([[0.0], cum])[category_start]  # [Cat] mass of earlier categories
    within = (cum - before[item_category]) / (cum[category_start + per_category - 1] - before)[item_category]
    item_key = item_category + within  # [N] ascending: category c's items span (c, c + 1]
    item_key[category_start + per_category - 1] = np.arange(num_categories) + 1.0  # absorb rounding
    series_start = rng.random(items) < 1.0 / mean_series_len  # [N]
    series_start[category_start] = True
    successor = np.where(np.append(series_start[1:], True), -1, np.arange(1, items + 1))  # [N], -1: none

    # Tastes: early rows 0..U-1, late rows U..2U-1 of one row sampler.
    tastes = rng.dirichlet(np.full(num_categories, taste_concentration), 2 * users)  # [2U, Cat]
    tastes_sampler = _RowSampler(tastes)
    del tastes
    progress_scale = drift / np.maximum(lengths - 1, 1)  # [U] P(late taste) per step of progress

    item = np.empty(num_rows, np.int64)  # [R] by user (sorted order), then time
    for t, n in enumerate(active):
        rows = np.arange(n)  # [n] the users with more than t interactions
        late = rng.random(n) < progress_scale[:n] * t
        category = tastes_sampler.draw(rows + users * late, 1, rng)[:, 0]  # [n]
        fresh = np.searchsorted(item_key, category + rng.random(n), side="right")  # [n]
        fresh = np.minimum(fresh, category_start[category] + per_category[category] - 1)
        if t == 0:
            item[starts[:n]] = fresh
            continue
        after = successor[item[starts[:n] + t - 1]]  # [n]
        follow = (after >= 0) & (rng.random(n) < series_follow)
        repeat = ~follow & (rng.random(n) < repeat_prob)
        earlier = item[starts[:n] + (rng.random(n) * t).astype(np.int64)]  # [n] one of the user's earlier items
        item[starts[:n] + t] = np.where(follow, after, np.where(repeat, earlier, fresh))

    # Timestamps: strictly increasing per user; exponential gaps with a per-user mean.
    duration = _SPAN_S * rng.uniform(0.05, 0.5, users)  # [U] seconds a user is active
    begin = rng.uniform(0, _SPAN_S - duration)  # [U]
    user_of_row = np.repeat(np.arange(users), lengths)  # [R]
    gap = 1 + np.floor(rng.exponential(1.0, num_rows) * (duration / lengths)[user_of_row]).astype(np.int64)  # [R]
    total = np.cumsum(gap)  # [R]
    seconds = begin.astype(np.int64)[user_of_row] + total - (total[starts] - gap[starts])[user_of_row]  # [R]

    # Its own stream: the shuffled log holds the same rows (ids included) as the unshuffled one.
    order = _generator(seed, _LOG_STREAM, 1).permutation(num_rows) if shuffle else np.arange(num_rows)  # [R]
    user_of_row, item, seconds = user_of_row[order], item[order], seconds[order]
    epoch = np.datetime64(_EPOCH_START, "s").astype(np.int64)
    if timestamps == "iso":
        time_column = pc.strftime(pa.array(epoch + seconds, pa.timestamp("s")), format=_ISO_FORMAT)
    else:
        time_column = pa.array(epoch + seconds)
    item_ids = _string_ids("sku-", items, rng)  # [N]
    columns = {"user_id": pc.take(_string_ids("u", users, rng), pa.array(user_of_row)),
               "item_id": pc.take(item_ids, pa.array(item)), "timestamp": time_column}
    if truth_columns:
        width = len(str(num_categories - 1))
        names = pa.array([f"c{c:0{width}d}" for c in range(num_categories)])
        columns["category"] = pc.take(names, pa.array(item_category[item]))
        after = successor[item]  # [R]
        columns["series_next"] = pc.if_else(pa.array(after >= 0), pc.take(item_ids, pa.array(np.maximum(after, 0))),
                                            "")
    return pa.table(columns)


def _log_format(path: Path) -> tuple[str, Optional[str]]:
    for suffix in sorted(LOG_FORMATS, key=len, reverse=True):
        if path.name.endswith(suffix) and len(path.name) > len(suffix):
            return LOG_FORMATS[suffix]
    raise ValueError(f"{path}: expected a name ending in one of {', '.join(LOG_FORMATS)} (the format), "
                     f"got {path.name!r}")


def write_log(path, table: pa.Table) -> Path:
    """Writes `table` (make_log's) at `path` in the format its name says (LOG_FORMATS: CSV, TSV, their
    gzip forms, Parquet), atomically: a temporary file beside it, then os.replace. Returns the path."""
    import pyarrow.csv as arrow_csv
    import pyarrow.parquet as parquet

    path = Path(path)
    kind, compression = _log_format(path)
    if not path.parent.is_dir():
        raise FileNotFoundError(f"{path}: its directory {path.parent} does not exist")
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        if kind == "parquet":
            parquet.write_table(table, tmp)
        else:
            options = arrow_csv.WriteOptions(delimiter="\t" if kind == "tsv" else ",")
            with open(tmp, "wb") as raw:
                if compression:  # Python's gzip at its usual level: ~4x faster than Arrow's stream, same size
                    with gzip.GzipFile(fileobj=raw, mode="wb", compresslevel=GZIP_LEVEL, mtime=0) as packed:
                        arrow_csv.write_csv(table, pa.PythonFile(packed, mode="w"), options)
                else:
                    arrow_csv.write_csv(table, raw, options)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def main() -> None:
    """Prints per-action label rates and oracle AUCs of the default world (a few seconds)."""
    world = SyntheticWorld(WorldConfig())
    train_ids, _ = world.split_users()
    ex = world.ranking_examples(train_ids[:512], 0)
    print(f"history lengths: mean {ex['history_lengths'].mean():.1f} of {world.cfg.history_len}")
    print(f"{'action':<28} {'rate':>7} {'oracle AUC':>10}")
    for a, name in enumerate(ACTIONS):
        labels = ex["labels"][..., a]
        print(f"{name:<28} {labels.mean():>7.4f} {auc(ex['oracle'][..., a], labels):>10.3f}")


if __name__ == "__main__":
    main()
