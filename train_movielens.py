"""MovieLens-100K end to end: train the two-tower retrieval model and the ranker, evaluate both stages.

    uv run run_train.py --data movielens-100k [--seed 0] [--dump-topk PATH] [--checkpoint-dir DIR]
    uv run run_train.py --data movielens-100k --help     # every Recipe field is a flag too

Prints, on stderr, each stage's progress bar (training.fit: step, loss, steps/s, ETA; the first
step's compile time on its own line) and its validation HR@10 / NDCG@10 four times; the best of
those (by NDCG@10) is saved with Trainer.save to DIR/retrieval and DIR/ranker (default
$PHOENIX_CACHE_DIR/checkpoints/movielens/, $PHOENIX_CACHE_DIR defaulting to ~/.cache/phoenix;
runners.*.from_checkpoint load them) and read back for the final evaluation. On stdout: a markdown
table of HR@10, NDCG@10, HR@50 and MRR on validation and test for popularity, transition,
retrieval alone and two-stage, with the seed and wall time. With
--dump-topk, every test user's final top-10 (raw MovieLens ids) goes to PATH as CSV
(movielens.dump_topk) and movielens.recompute_from_dump's HR@10 / NDCG@10 of that file are printed
next to the table's.

Takes about 6 minutes on a 2-core CPU shared with another training job (measured 5 min 50 s at a
load average of 2.7-5.2, median 4.3): retrieval 65 s, negative mining 3 s, ranker 276 s,
evaluation 3 s, the rest loading and compiling (each train step compiles in ~8 s).

Protocol (movielens.py): leave-one-out; every catalog movie is ranked except the user's earlier
ones, never the target. Two-stage: the retrieval model's top K = 100 of all movies, re-ranked by
the ranker; HR@50 and MRR rank the re-ranked 100 first, then the rest in retrieval order.

Recipe, and why
  Both models: D = 64, 2 layers, 2 heads of 32, float32 (bf16 is slower on CPU here). Hash tables of
  20k rows for users and movies, 4k for authors (genre signatures), 2 hashes each: of 943 users,
  1,682 movies and 216 authors none shares both rows with another (printed at start). Table init
  std 0.05. AdamW at 2e-3, 100 warmup steps, cosine decay to 10% over each stage.

  Retrieval: S = 5. The user tower mean-pools the transformer outputs over [user, history], so
  each of S movies weighs 1/(S+1) and the latest cannot dominate, while ML-100K's next movie
  depends most on the last few (the transition baseline, 0.145, uses the last one alone). Val
  HR@10 after 10 epochs at lr 1e-3 (windows per step scaled to ~1,300 examples): S=50 0.163,
  S=20 0.193, S=10 0.212, S=5 0.230. The user-id embedding carries the long-term taste, the five
  movies the session.
  Trained per prefix, as SASRec: a window of S + 1 movies passes the causal user tower once and
  the running mean of its outputs is the user representation of each of its S prefixes (equal to
  the model's pooled representation of that prefix; tested), so one pass yields S examples. One
  epoch over the 97,171 examples (every position t >= 1 of the training parts) is ~20k windows:
  ~8 s here (S=5), where one history per example measured 1.1 s per step of 256 examples at
  S=50: 7 min per epoch. Window cuts move each epoch (random offset per user), so a target's history length varies.
  256 windows per step put ~1,200 examples in the in-batch softmax (the other rows' next movies,
  most of the catalog, are the negatives), temperature 0.05, logQ correction with
  movielens.item_sampling_frequencies, accidental hits (the same movie in another row) masked by
  raw movie id. 8 epochs (620 steps): validation peaks there; 20 epochs at lr 1e-3 peaked at
  epoch 12 and fell. Temperature 0.1, D = 128, and replacing the user id of 30% of the windows
  by a shared one measured the same within noise (943 users: one standard error of HR@10 is 0.013).

  Ranker: trained per example (its candidates attend to the whole history, so no prefix trick),
  S = 5 (S = 20 was no better and twice as slow), C = 8 candidates: the next movie labelled with
  its rating's actions (click; favorite at >= 4 stars; share at 5; not_interested at <= 2), 6
  negatives drawn from the retrieval model's top 100 for that example (movies the user had rated
  before and the target removed: what the ranker must re-order at evaluation) and 1 uniform random
  negative, all labels 0. The positive sits at a random slot: a candidate's rotary position is its
  slot, and a fixed slot would give it away. BCE on the 4 actions ratings set (the other 15 get
  weight 0). Warm-started from the retrieval model's hash tables, transformer and input
  projections. 4 epochs of 256 examples per step; 16 candidates (14 hard) measured the same.
  Re-ranking score: ranker click logit + w * retrieval cosine / temperature, w chosen on validation
  from RETRIEVAL_WEIGHTS (the ranker alone re-ranks worse than retrieval: val HR@10 ~0.20 vs 0.23;
  the two together beat both). The 100 are scored in chunks of C, the slots the ranker was trained
  at; candidate isolation makes each score independent of its chunk mates (tested).

Measured: `uv run run_train.py --data movielens-100k --seed 0 --dump-topk top10.csv`
  | split | model | HR@10 | NDCG@10 | HR@50 | MRR |
  |---|---|---:|---:|---:|---:|
  | val | popularity | 0.0742 | 0.0345 | 0.2301 | 0.0333 |
  | val | transition | 0.1432 | 0.0748 | 0.3319 | 0.0659 |
  | val | retrieval | 0.2333 | 0.1326 | 0.5440 | 0.1193 |
  | val | two-stage | 0.2460 | 0.1399 | 0.5525 | 0.1253 |
  | test | popularity | 0.0859 | 0.0449 | 0.1983 | 0.0416 |
  | test | transition | 0.1453 | 0.0793 | 0.3393 | 0.0719 |
  | test | retrieval | 0.1951 | 0.0985 | 0.5111 | 0.0875 |
  | test | two-stage | 0.2089 | 0.1103 | 0.5239 | 0.0981 |
  (re-ranking weight w = 1 chosen on validation; the dump recomputes to the same 0.2089 / 0.1103).
  Seeds move these more than the recipe choices above did: seed 1 (7 min, w = 1) gives test
  retrieval 0.2153 / 0.1141 and two-stage 0.2280 / 0.1206 (HR@10 / NDCG@10), val two-stage 0.2418.
  Test sits below validation for both stages (in every configuration tried) while the transition
  baseline does not move; our guess: the user-id embedding learns where each user's rating session
  stands at the end of the training part, which the validation target follows directly and the
  test target one step later.
"""

import argparse
import dataclasses
import math
import os
import sys
import time
from typing import Optional

import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np

import phoenix_checkpoint as checkpoint
import phoenix_hashing as hashing
import phoenix_metrics as metrics
import movielens as ml
import phoenix_training as training
from grok import TransformerConfig
from recsys_model import HashConfig, PhoenixModelConfig
from recsys_retrieval_model import PhoenixRetrievalModelConfig, l2_normalize

# Shape glossary
#   U  evaluated users (one target each)   N  catalog movies         E  training examples
#   B  batch                               S  history length         C  ranker candidates per row
#   D  embedding size                      A  actions (19)           K  retrieved per user (100)
#   P  hard-negative pool per example

NUM_ACTIONS = len(ml.ACTIONS)
RETRIEVE_K = 100  # the retrieval stage hands this many movies per user to the ranker
FINAL_K = 10  # the list a user sees (and the dump holds)
# Actions the ratings can set (movielens.RATING_ACTIONS); the other 15 are always 0 and only
# dilute the ranking loss, so they get weight 0.
TRAINED_ACTIONS = ("click_score", "favorite_score", "share_score", "not_interested_score")
SCORE_ACTION = "click_score"  # the ranker's re-ranking score: P(the user watches this next)
EVAL_BATCH = 256  # rows per predict call in evaluation (fixed, so one compilation)


@dataclasses.dataclass(frozen=True)
class Recipe:
    """Model sizes and training schedule of both stages (the module docstring says why)."""

    emb_size: int = 64  # D, both models
    num_layers: int = 2
    num_heads: int = 2  # of D / heads = 32 dimensions each
    history_len: int = 5  # S of the retrieval user tower: its mean pooling dilutes longer histories
    ranker_history_len: int = 5  # S of the ranker
    retrieval_batch_size: int = 256  # windows of S + 1 movies per step: ~1,200 rows of the softmax
    ranker_batch_size: int = 256  # examples per step, each with C candidates
    retrieval_epochs: float = 8.0  # passes over the 97k training examples; longer overfits
    ranker_epochs: float = 4.0
    learning_rate: float = 2e-3  # AdamW peak, cosine decay to 10% over each stage
    warmup_steps: int = 100
    temperature: float = 0.05  # in-batch softmax over cosines: logits in [-20, 20]
    hard_negatives: int = 6  # ranker negatives drawn from the retrieval model's top `negative_pool`
    random_negatives: int = 1  # ranker negatives drawn uniformly from the catalog
    negative_pool: int = RETRIEVE_K  # the list the ranker re-ranks at evaluation
    retrieve_k: int = RETRIEVE_K  # K: movies the retrieval stage hands to the ranker per user
    table_init_stddev: float = 0.05  # small rows move fast relative to their size under Adam
    user_table_size: int = 20_000  # 943 users, 1,682 movies, 216 authors: with 2 hashes no id
    post_table_size: int = 20_000  # shares both rows with another (run() prints the count)
    author_table_size: int = 4_000
    num_hashes: int = 2
    evals_per_stage: int = 4  # validation evaluations (and best-checkpoint chances) per stage
    ranker_init_from_retrieval: bool = True  # start from the retrieval model's tables and transformer
    retrieval_weight: Optional[float] = None  # None: chosen on validation from RETRIEVAL_WEIGHTS

    @property
    def num_candidates(self) -> int:  # C
        return 1 + self.hard_negatives + self.random_negatives


# Weights of the retrieval logit in the re-ranking score tried on validation (rerank_scores).
RETRIEVAL_WEIGHTS = (0.0, 0.25, 0.5, 1.0, 2.0, 4.0)


# ---------------------------------------------------------------------------------------------
# Configs
# ---------------------------------------------------------------------------------------------


def hash_config(recipe: Recipe) -> HashConfig:
    return HashConfig(num_user_hashes=recipe.num_hashes, num_item_hashes=recipe.num_hashes,
                      num_author_hashes=recipe.num_hashes, user_table_size=recipe.user_table_size,
                      post_table_size=recipe.post_table_size, author_table_size=recipe.author_table_size)


def transformer_config(recipe: Recipe) -> TransformerConfig:
    key_size = recipe.emb_size // recipe.num_heads
    return TransformerConfig(emb_size=recipe.emb_size, key_size=key_size, num_q_heads=recipe.num_heads,
                             num_kv_heads=recipe.num_heads, num_layers=recipe.num_layers, widening_factor=4.0,
                             attn_output_multiplier=1.0 / math.sqrt(key_size))


def retrieval_config(recipe: Recipe) -> PhoenixRetrievalModelConfig:
    return PhoenixRetrievalModelConfig(model=transformer_config(recipe), emb_size=recipe.emb_size,
                                       history_seq_len=recipe.history_len, candidate_seq_len=1,
                                       fprop_dtype=np.float32, hash_config=hash_config(recipe)).initialize()


def ranker_config(recipe: Recipe) -> PhoenixModelConfig:
    return PhoenixModelConfig(model=transformer_config(recipe), emb_size=recipe.emb_size, num_actions=NUM_ACTIONS,
                              history_seq_len=recipe.ranker_history_len, candidate_seq_len=recipe.num_candidates,
                              fprop_dtype=np.float32, hash_config=hash_config(recipe)).initialize()


def optimizer_config(recipe: Recipe, num_steps: int) -> training.OptimizerConfig:
    warmup = min(recipe.warmup_steps, max(num_steps // 4, 1))
    return training.OptimizerConfig(learning_rate=recipe.learning_rate, warmup_steps=warmup,
                                    decay_steps=max(num_steps, warmup + 1))


def action_weights() -> np.ndarray:
    weights = np.zeros(NUM_ACTIONS, np.float32)  # [A]
    for name in TRAINED_ACTIONS:
        weights[ml.ACTIONS.index(name)] = 1.0
    return weights


# ---------------------------------------------------------------------------------------------
# Batches
# ---------------------------------------------------------------------------------------------


def take(examples: dict, rows) -> dict:
    return {key: value[rows] for key, value in examples.items()}


def epoch_batches(num_examples: int, batch_size: int, rng: np.random.Generator):
    """Endless example-index batches [B]: a fresh permutation per epoch, the last partial batch dropped
    (fixed shapes: the train step compiles once)."""
    per_epoch = num_examples // batch_size
    if per_epoch == 0:
        raise ValueError(f"batch_size {batch_size} exceeds the {num_examples} training examples")
    while True:
        order = rng.permutation(num_examples)
        for i in range(per_epoch):
            yield order[i * batch_size:(i + 1) * batch_size]


def training_windows(split: ml.Split, history_len: int, rng: Optional[np.random.Generator] = None):
    """Windows of up to S + 1 consecutive training movies that cover every training target once.

    Returns (user rows [W], start positions [W] into split.items, lengths [W]). Within a window the
    movie at slot j >= 1 is the target of the prefix of slots 0..j-1, so a window of n movies holds
    n - 1 examples. Window boundaries fall at r, r + S, r + 2S, ... of each user's training part,
    with r = 0 without `rng` and r uniform in [0, S) per user with it (a new cut every epoch, so a
    target's history length varies between epochs instead of being fixed by where the cuts fall).
    """
    rows, starts, lengths = [], [], []
    for user in range(len(split.user_ids)):
        length = int(split.train_len[user])  # targets are positions 1 .. length - 1
        if length < 2:
            continue
        shift = int(rng.integers(0, history_len)) if rng is not None else 0
        cuts = ([0] if shift > 0 else []) + list(range(shift, length - 1, history_len))
        for begin, end in zip(cuts, cuts[1:] + [length - 1]):  # movies begin..end, end - begin <= S
            rows.append(user)
            starts.append(split.offsets[user] + begin)
            lengths.append(end - begin + 1)
    return np.array(rows, np.int64), np.array(starts, np.int64), np.array(lengths, np.int64)


def window_examples(split: ml.Split, rows, starts, lengths, history_len: int):
    """The windows as histories: (examples dict with history fields [W, S + 1], their positions
    [W, S + 1] into split.items, valid [W, S + 1])."""
    slots = np.arange(history_len + 1)[None, :]  # [1, S+1]
    valid = slots < lengths[:, None]  # [W, S+1]
    positions = np.where(valid, starts[:, None] + slots, 0)  # [W, S+1]
    items = np.where(valid, split.items[positions], ml.PAD_ID)  # [W, S+1]
    examples = {"user_ids": split.user_ids[rows], "history_post_ids": items,
                "history_author_ids": split.authors_of(items),
                "history_actions": ml.rating_actions(split.ratings[positions]) & valid[..., None],
                "history_surfaces": np.full(items.shape, ml.SURFACE, np.int32)}
    return examples, positions, valid


def window_batch(split: ml.Split, examples: dict, hashes: HashConfig):
    """A RecsysBatch whose history is each window and whose candidates are the window's movies 1..S
    (candidate c is the target of the prefix ending at slot c)."""
    return ml.phoenix_batch(split, examples, hashes, examples["history_post_ids"][:, 1:])


def retrieval_batches(split: ml.Split, recipe: Recipe, hashes: HashConfig, rng: np.random.Generator):
    """Endless (batch, log_q [B, S], positive_ids [B, S]) for SequenceRetrievalTrainer.step, B windows
    each. log q is a target's share among training targets (logQ correction); raw movie ids mark
    accidental hits (the same movie as another row's positive)."""
    q = ml.item_sampling_frequencies(split)  # [N]
    log_q = np.log(np.where(q > 0, q, 1.0)).astype(np.float32)  # [N]; unsampled movies are never targets
    pending = np.zeros((0, 3), np.int64)
    B, S = recipe.retrieval_batch_size, recipe.history_len
    while True:
        while len(pending) < B:  # the next epoch: new cuts, new order
            windows = np.stack(training_windows(split, S, rng), axis=1)  # [W, 3]
            pending = np.concatenate([pending, windows[rng.permutation(len(windows))]])
        (rows, starts, lengths), pending = pending[:B].T, pending[B:]
        examples, positions, valid = window_examples(split, rows, starts, lengths, S)
        targets = valid[:, 1:]  # [B, S]
        yield (window_batch(split, examples, hashes),
               np.where(targets, log_q[split.item_columns[positions[:, 1:]]], 0.0).astype(np.float32),
               examples["history_post_ids"][:, 1:].astype(np.int32))


def prefix_user_representations(model, batch, embeddings) -> jax.Array:
    """[B, 1+S, D]: at position p, the user tower's representation of the history before slot p,
    i.e. `build_user_representation` of the batch cut to history slots 0..p-1.

    Causal attention makes the transformer output at position p depend on positions 0..p only, and
    a right-padded history puts slot j at rotary position 1 + j in both cases, so the running mean
    of the outputs over valid positions is that representation (tested against it).
    """
    user, user_mask, history, history_mask = model._user_history_inputs(batch, embeddings)
    x = jnp.concatenate([user, history], axis=1).astype(model.fprop_dtype)  # [B, 1+S, D]
    mask = jnp.concatenate([user_mask, history_mask], axis=1)  # [B, 1+S]
    out = model.model(x, mask, candidate_start_offset=None).embeddings  # [B, 1+S, D]
    mask_f = mask.astype(jnp.float32)[:, :, None]  # [B, 1+S, 1]
    running = jnp.cumsum(out * mask_f, axis=1) / jnp.maximum(jnp.cumsum(mask_f, axis=1), 1.0)  # [B, 1+S, D]
    return l2_normalize(running)[0]


class SequenceRetrievalTrainer(training.RetrievalTrainer):
    """RetrievalTrainer whose train step takes every prefix of a window as an example (SASRec-style).

    A batch holds windows of S + 1 movies as histories and movies 1..S as candidates; the row of
    candidate c pairs the prefix representation before slot c + 1 with that movie, so one pass of
    the user tower over B windows yields up to B * S examples of the in-batch softmax (with logQ
    correction and accidental-hit masking, training.retrieval_loss_terms), instead of B. Parameters,
    checkpoints, `predict` and the runners are those of the plain RetrievalTrainer.

    step(state, batch, log_q [B, S], positive_ids [B, S]) -> (state, metrics)
    predict_windows(params, batch) -> (users [B, S, D], candidates [B, S, D], valid [B, S])
    """

    def __init__(self, model_config: PhoenixRetrievalModelConfig, hash_config: Optional[HashConfig] = None,
                 optimizer_config: Optional[training.OptimizerConfig] = None,
                 temperature: float = training.DEFAULT_TEMPERATURE, table_init_stddev: Optional[float] = None):
        super().__init__(model_config, hash_config, optimizer_config, temperature, table_init_stddev)
        init_stddev = hashing.DEFAULT_INIT_STDDEV if table_init_stddev is None else table_init_stddev

        def forward(batch, table_sizes=None):
            sizes = {training.TABLE_SIZE_FIELDS[name]: size for name, size in (table_sizes or {}).items()}
            tables = dataclasses.replace(self.hash_config, **sizes)
            embeddings = hashing.HashEmbeddings(tables, self.model_config.emb_size, init_stddev)(batch)
            model = self.model_config.make()
            users = prefix_user_representations(model, batch, embeddings)[:, 1:-1]  # [B, S, D]
            candidates, candidate_mask = model.build_candidate_representation(batch, embeddings)  # [B, S, D]
            valid = candidate_mask & (batch.user_hashes[:, :1] != 0)  # [B, S]
            return users.astype(jnp.float32), candidates.astype(jnp.float32), valid

        self._windows = hk.transform(forward)
        self._jit_predict_windows = jax.jit(lambda params, batch: self._windows.apply(params, None, batch))

    def _prepare_batch(self, batch):
        return batch  # every candidate slot is a positive (RetrievalTrainer keeps slot 0 only)

    def step(self, state, batch, log_q, positive_ids):
        """One optimiser step on B windows (C = S candidates each). `state` is donated."""
        B, _, C = self._validate(batch)
        for name, value in (("log_q", log_q), ("positive_ids", positive_ids)):
            if np.shape(value) != (B, C):
                raise ValueError(f"{name}: expected shape {(B, C)}, got {np.shape(value)}")
        if not np.all(np.isfinite(log_q)):
            raise ValueError("log_q: contains NaN or inf")
        return self._jit_step(state, batch, log_q, positive_ids)

    def _loss(self, params, rng, batch, log_q, positive_ids, table_sizes=None):
        users, candidates, valid = self._windows.apply(params, rng, batch, table_sizes)
        D = users.shape[-1]
        terms = training.retrieval_loss_terms(users.reshape(-1, D), candidates.reshape(-1, D), self.temperature,
                                              positive_ids.reshape(-1), log_q.reshape(-1), valid.reshape(-1))
        return terms.loss, {"accuracy": terms.accuracy}

    def predict_windows(self, params, batch):
        return self._jit_predict_windows(params, batch)


def ranker_candidates(examples: dict, rows, pool: Optional[np.ndarray], num_hard: int, num_random: int,
                      num_items: int, rng: np.random.Generator):
    """Candidate columns [B, C] with the target at a random slot, and that slot [B].

    Negatives: `num_hard` distinct entries of each example's hard-negative pool (P columns, target and
    earlier items already removed) and `num_random` uniform catalog columns other than the target. The
    target's slot is random because a candidate's rotary position is its slot: a fixed slot would let
    the ranker recognise the positive by position.
    """
    target = examples["target_columns"][rows]  # [B]
    B = len(rows)
    parts = [target[:, None]]
    if num_hard:
        if pool is None:
            raise ValueError("hard negatives need a pool (hard_negative_pool)")
        pick = np.argsort(rng.random((B, pool.shape[1])), axis=1)[:, :num_hard]  # [B, num_hard]
        parts.append(np.take_along_axis(pool[rows], pick, axis=1))
    if num_random:
        random = rng.integers(0, num_items - 1, (B, num_random))  # [B, num_random], skipping the target:
        parts.append(random + (random >= target[:, None]))
    columns = np.concatenate(parts, axis=1)  # [B, C], target first
    order = np.argsort(rng.random(columns.shape), axis=1)  # [B, C] random permutation per row
    columns = np.take_along_axis(columns, order, axis=1)
    return columns, np.argmax(order == 0, axis=1)


def ranker_batches(split: ml.Split, examples: dict, pool: Optional[np.ndarray], recipe: Recipe,
                   hashes: HashConfig, rng: np.random.Generator):
    """Endless (batch, labels [B, C, A]) for RankingTrainer.step: the target carries its rating's
    actions, sampled negatives all-zero labels."""
    num_items = len(split.item_ids)
    for rows in epoch_batches(len(examples["user_ids"]), recipe.ranker_batch_size, rng):
        columns, slot = ranker_candidates(examples, rows, pool, recipe.hard_negatives, recipe.random_negatives,
                                          num_items, rng)
        labels = np.zeros(columns.shape + (NUM_ACTIONS,), np.float32)  # [B, C, A]
        labels[np.arange(len(rows)), slot] = examples["target_actions"][rows]
        yield ml.phoenix_batch(split, take(examples, rows), hashes, split.item_ids[columns]), labels


def padded_chunks(num_rows: int, size: int):
    """(rows [size] padded by repeating the last row, number of real rows) covering 0..num_rows-1."""
    for start in range(0, num_rows, size):
        rows = np.arange(start, min(start + size, num_rows))
        yield np.concatenate([rows, np.full(size - len(rows), rows[-1])]), len(rows)


# ---------------------------------------------------------------------------------------------
# Retrieval stage: representations and scores
# ---------------------------------------------------------------------------------------------


def encode_items(trainer: training.RetrievalTrainer, params, split: ml.Split) -> np.ndarray:
    """Candidate-tower representations [N, D] of every catalog movie (unit norm), in one call."""
    ids = split.item_ids[None, :]  # [1, N]
    examples = {"user_ids": split.user_ids[:1], "history_post_ids": np.full((1, 1), ml.PAD_ID),
                "history_author_ids": np.full((1, 1), ml.PAD_ID),
                "history_actions": np.zeros((1, 1, NUM_ACTIONS), bool),
                "history_surfaces": np.zeros((1, 1), np.int32)}
    _, candidates, _ = trainer.predict(params, ml.phoenix_batch(split, examples, trainer.hash_config, ids))
    return np.asarray(candidates[0])  # [N, D]


def encode_users(trainer: training.RetrievalTrainer, params, split: ml.Split, examples: dict,
                 batch_size: int = EVAL_BATCH) -> np.ndarray:
    """User-tower representations [E, D] (unit norm) of the examples' histories."""
    out = []
    for rows, real in padded_chunks(len(examples["user_ids"]), batch_size):
        user, _, _ = trainer.predict(params, ml.phoenix_batch(split, take(examples, rows), trainer.hash_config))
        out.append(np.asarray(user)[:real])
    return np.concatenate(out)


def eval_mask(split: ml.Split, which: str) -> np.ndarray:
    """[U, N]: items ranked for nobody: the user's earlier items, except the target (phoenix_metrics.py's rule)."""
    exclude = split.exclude_mask(which)
    exclude[np.arange(exclude.shape[0]), split.targets(which)] = False
    return exclude


def first_positions(split: ml.Split) -> np.ndarray:
    """[U, N] int32: position (within the user's sequence) of the user's first rating of each movie,
    or a large number where the user never rated it."""
    first = np.full((len(split.user_ids), len(split.item_ids)), np.iinfo(np.int32).max, np.int32)
    owner = np.repeat(np.arange(len(split.user_ids)), split.lengths)  # [R]
    within = np.arange(len(split.items)) - split.offsets[owner]  # [R]
    np.minimum.at(first, (owner, split.item_columns), within.astype(np.int32))
    return first


def example_representations(trainer: SequenceRetrievalTrainer, params, split: ml.Split, history_len: int,
                            batch_size: int = EVAL_BATCH) -> np.ndarray:
    """User representations [E, D] of every training example (phoenix_examples order) from one pass
    over the windows of training_windows (cuts at 0, S, 2S, ...): an example's history is then the
    movies since its window's start (1..S of them), not always the last S; good enough to mine negatives
    and ~S times cheaper than encoding each example's own history."""
    rows, starts, lengths = training_windows(split, history_len)
    by_position = np.zeros((len(split.items), trainer.model_config.emb_size), np.float32)  # [R, D]
    for chunk, real in padded_chunks(len(rows), batch_size):
        examples, positions, valid = window_examples(split, rows[chunk], starts[chunk], lengths[chunk], history_len)
        users, _, _ = trainer.predict_windows(params, window_batch(split, examples, trainer.hash_config))
        keep = valid[:real, 1:]  # [b, S]
        by_position[positions[:real, 1:][keep]] = np.asarray(users)[:real][keep]
    return by_position[split.target_positions("train")[1]]


def hard_negative_pool(trainer: SequenceRetrievalTrainer, params, split: ml.Split, history_len: int,
                       pool_size: int, chunk: int = 4096) -> np.ndarray:
    """[E, P] catalog columns: the retrieval model's top-P for each training example among the movies
    the user had not rated before the target, the target excluded (so every entry is a negative)."""
    items = encode_items(trainer, params, split)  # [N, D]
    users = example_representations(trainer, params, split, history_len)  # [E, D]
    first = first_positions(split)
    rows, positions = split.target_positions("train")
    within = positions - split.offsets[rows]  # [E] the target's position within its user
    targets = split.item_columns[positions]  # [E]
    if not 0 < pool_size < len(split.item_ids) - int(split.lengths.max()):
        raise ValueError(f"negative pool {pool_size} must be below the movies a user has not rated")
    pool = np.empty((len(users), pool_size), np.int32)
    for start in range(0, len(users), chunk):
        sl = slice(start, start + chunk)
        scores = users[sl] @ items.T  # [e, N]
        scores[first[rows[sl]] < within[sl, None]] = -np.inf
        scores[np.arange(scores.shape[0]), targets[sl]] = -np.inf
        pool[sl] = np.argpartition(-scores, pool_size, axis=1)[:, :pool_size]
    return pool


class StageOne:
    """Retrieval evaluation of one split: scores, the target's full rank and the top-K lists."""

    def __init__(self, trainer, params, split: ml.Split, which: str, history_len: int, k: int = RETRIEVE_K,
                 items=None):
        self.examples = ml.phoenix_examples(split, which, history_len)
        self.target = split.targets(which)  # [U]
        self.exclude = eval_mask(split, which)  # [U, N]
        items = encode_items(trainer, params, split) if items is None else items  # [N, D]
        users = encode_users(trainer, params, split, self.examples)  # [U, D]
        self.scores = users @ items.T  # [U, N] cosines
        self.ranks = metrics.target_ranks(self.scores, self.target, self.exclude)  # [U]
        self.topk = metrics.topk_columns(self.scores, k, self.exclude)  # [U, K], best first
        if (self.topk == metrics.NOT_RANKED).any():
            raise ValueError(f"k={k} exceeds the movies some user can be recommended")

    def metrics(self) -> dict:
        return metrics.metrics_from_ranks(self.ranks)


# ---------------------------------------------------------------------------------------------
# Ranking stage
# ---------------------------------------------------------------------------------------------


def ranker_logits(trainer: training.RankingTrainer, params, split: ml.Split, examples: dict,
                  columns: np.ndarray, num_candidates: int, batch_size: int = EVAL_BATCH) -> np.ndarray:
    """Ranker logits [U, K, A] of candidate columns [U, K] for each example's history.

    Candidates are scored in chunks of the training C (slots 0..C-1, the rotary positions the ranker
    was trained on); candidate isolation makes a candidate's logits independent of its chunk mates.
    """
    U, K = columns.shape
    num_chunks = -(-K // num_candidates)
    padded = np.full((U, num_chunks * num_candidates), -1, np.int64)  # [U, K'] -1 = padding
    padded[:, :K] = columns
    chunk_columns = padded.reshape(U * num_chunks, num_candidates)  # [U*chunks, C]
    owners = np.repeat(np.arange(U), num_chunks)  # [U*chunks]
    ids = np.where(chunk_columns >= 0, split.item_ids[np.maximum(chunk_columns, 0)], ml.PAD_ID)
    out = []
    for rows, real in padded_chunks(len(owners), batch_size):
        batch = ml.phoenix_batch(split, take(examples, owners[rows]), trainer.hash_config, ids[rows])
        out.append(np.asarray(trainer.predict(params, batch))[:real])
    logits = np.concatenate(out).reshape(U, num_chunks * num_candidates, -1)  # [U, K', A]
    return logits[:, :K]


def two_stage_ranks(stage_one: StageOne, rerank_scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(full-ranking ranks [U], re-ranked top-K columns [U, K]).

    The K retrieved movies are re-ordered by `rerank_scores` [U, K] (ties keep retrieval order); the
    rest follow in retrieval order, so a target outside the top-K keeps its retrieval rank.
    """
    order = np.argsort(-rerank_scores, axis=1, kind="stable")  # [U, K]
    reranked = np.take_along_axis(stage_one.topk, order, axis=1)  # [U, K]
    in_list = metrics.ranks_in_topk(reranked, stage_one.target)  # [U]
    ranks = np.where(in_list == metrics.NOT_RANKED, stage_one.ranks, in_list)
    return ranks, reranked


def rerank_scores(logits: np.ndarray, retrieval_scores: np.ndarray, weight: float, temperature: float):
    """Ranker click logit + weight * retrieval logit (cosine / temperature), both [U, K]."""
    return logits[..., ml.ACTIONS.index(SCORE_ACTION)] + weight * retrieval_scores / temperature


class TwoStage:
    """Two-stage evaluation of one split: the ranker re-scores the retrieval model's top-K."""

    def __init__(self, stage_one: StageOne, ranker, ranker_params, split, which: str, recipe: Recipe):
        self.stage_one = stage_one
        examples = ml.phoenix_examples(split, which, recipe.ranker_history_len)
        self.logits = ranker_logits(ranker, ranker_params, split, examples, stage_one.topk,
                                    recipe.num_candidates)  # [U, K, A]
        self.retrieval = np.take_along_axis(stage_one.scores, stage_one.topk, axis=1)  # [U, K]

    def evaluate(self, weight: float, temperature: float):
        """(metrics, re-ranked top-K columns [U, K]) with the given retrieval weight."""
        ranks, reranked = two_stage_ranks(self.stage_one,
                                          rerank_scores(self.logits, self.retrieval, weight, temperature))
        return metrics.metrics_from_ranks(ranks), reranked


# ---------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------


def host_copy(tree):
    return jax.tree.map(np.array, jax.device_get(tree))


def _fit_keeping_best(trainer, state, batches, steps: int, evaluate, path: str, extra: dict, evals: int, stream):
    """training.fit with `evaluate(params) -> metrics` on validation `evals` times (the last at the
    end); the best by NDCG@10 is saved to `path` and returned as (host params, its metrics)."""
    best = {"NDCG@10": -math.inf}
    kept = {}

    def validate(state):
        nonlocal best
        result = evaluate(state.params)
        if result["NDCG@10"] > best["NDCG@10"]:
            best = {**result, "step": int(state.step)}
            kept["params"] = host_copy(state.params)
            trainer.save(path, state, extra={**extra, "val": best})
        return {k: result[k] for k in ("HR@10", "NDCG@10")}

    training.fit(trainer, state, batches, steps, log_every=max(1, min(50, steps // 10)), eval_fn=validate,
                 eval_every=max(1, -(-steps // evals)), stream=stream)
    return kept["params"], best


def _with_first(first, rest):
    yield first
    yield from rest


def train_retrieval(split, recipe: Recipe, seed: int, checkpoint_dir: str, stream=None):
    """Trains the two-tower model; returns (trainer, best params, best val metrics)."""
    windows_per_epoch = len(training_windows(split, recipe.history_len)[0])
    steps = max(1, round(recipe.retrieval_epochs * windows_per_epoch / recipe.retrieval_batch_size))
    trainer = SequenceRetrievalTrainer(retrieval_config(recipe), hash_config(recipe), optimizer_config(recipe, steps),
                                       temperature=recipe.temperature, table_init_stddev=recipe.table_init_stddev)
    batches = retrieval_batches(split, recipe, trainer.hash_config, np.random.default_rng([seed, 1]))
    first = next(batches)
    state = trainer.init(jax.random.PRNGKey(seed), first[0])
    print(f"retrieval: {steps} steps of {recipe.retrieval_batch_size} windows ({windows_per_epoch} windows "
          f"per epoch)", file=stream)
    params, best = _fit_keeping_best(
        trainer, state, _with_first(first, batches), steps,
        lambda params: StageOne(trainer, params, split, "val", recipe.history_len, recipe.retrieve_k).metrics(),
        os.path.join(checkpoint_dir, "retrieval"), {"recipe": dataclasses.asdict(recipe), "seed": seed},
        recipe.evals_per_stage, stream)
    return trainer, params, best


def warm_start(ranker_params, retrieval_params):
    """Ranker params with every parameter the retrieval model also has (hash tables, transformer,
    input projections, action and surface embeddings) copied from it; the rest stay as initialised."""
    out = {}
    for module, named in ranker_params.items():
        source = retrieval_params.get(module.replace("phoenix_model", "phoenix_retrieval_model", 1), {})
        out[module] = {name: (np.asarray(source[name]) if name in source and
                              np.shape(source[name]) == np.shape(value) else value)
                       for name, value in named.items()}
    return out


def train_ranker(split, pool, recipe: Recipe, seed: int, checkpoint_dir: str, val_stage_one: StageOne,
                 retrieval_params=None, stream=None):
    """Trains the ranker; returns (trainer, best params, best val metrics). Model selection by the
    validation two-stage NDCG@10 of the ranker's own score (retrieval weight 0)."""
    examples = ml.phoenix_examples(split, "train", recipe.ranker_history_len)
    steps = max(1, round(recipe.ranker_epochs * len(examples["user_ids"]) / recipe.ranker_batch_size))
    trainer = training.make_ranking_trainer(ranker_config(recipe), hash_config(recipe),
                                            optimizer_config(recipe, steps), action_weights=action_weights(),
                                            table_init_stddev=recipe.table_init_stddev)
    batches = ranker_batches(split, examples, pool, recipe, trainer.hash_config, np.random.default_rng([seed, 2]))
    first = next(batches)
    state = trainer.init(jax.random.PRNGKey(seed + 1), first[0])
    if retrieval_params is not None:
        state = state._replace(params=jax.device_put(warm_start(host_copy(state.params), retrieval_params)))
    print(f"ranker: {steps} steps of {recipe.ranker_batch_size} examples x {recipe.num_candidates} candidates",
          file=stream)
    params, best = _fit_keeping_best(
        trainer, state, _with_first(first, batches), steps,
        lambda params: TwoStage(val_stage_one, trainer, params, split, "val", recipe).evaluate(
            0.0, recipe.temperature)[0],
        os.path.join(checkpoint_dir, "ranker"), {"recipe": dataclasses.asdict(recipe), "seed": seed},
        recipe.evals_per_stage, stream)
    return trainer, params, best


def evaluate_stages(split: ml.Split, retrieval, retrieval_params, ranker, ranker_params, recipe: Recipe):
    """Validation and test rows of the table, baselines included.

    The re-ranking weight of the retrieval logit is recipe.retrieval_weight, or the one of
    RETRIEVAL_WEIGHTS with the best validation NDCG@10. Returns (table {(split, name): metrics},
    re-ranked top-K columns {split: [U, K]}, StageOne per split, TwoStage per split, weight).
    """
    table, reranked, stage_one, two_stage = {}, {}, {}, {}
    for which in ("val", "test"):
        stage_one[which] = StageOne(retrieval, retrieval_params, split, which, recipe.history_len, recipe.retrieve_k)
        two_stage[which] = TwoStage(stage_one[which], ranker, ranker_params, split, which, recipe)
    weight = recipe.retrieval_weight
    if weight is None:
        weight = max(RETRIEVAL_WEIGHTS,
                     key=lambda w: two_stage["val"].evaluate(w, recipe.temperature)[0]["NDCG@10"])
    for which in ("val", "test"):
        for name in ml.BASELINES:
            table[(which, name)] = ml.evaluate_baseline(split, which, name)
        table[(which, "retrieval")] = stage_one[which].metrics()
        table[(which, "two-stage")], reranked[which] = two_stage[which].evaluate(weight, recipe.temperature)
    return table, reranked, stage_one, two_stage, weight


def hash_collisions(split: ml.Split, hashes: HashConfig) -> dict:
    """{id type: (ids, ids sharing both their rows with another id, ids sharing at least one row)}."""
    out = {}
    for name, ids in (("user", split.user_ids), ("post", split.item_ids), ("author", np.unique(split.item_authors))):
        values = hashing.hash_ids(ids, hashes, name)  # [V, H]
        one = np.zeros(len(ids), bool)
        for h in range(values.shape[1]):
            one |= hashing.colliding_mask(values[:, h:h + 1])
        out[name] = (len(ids), int(hashing.colliding_mask(values).sum()), int(one.sum()))
    return out


# ---------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------


def format_table(rows: dict) -> str:
    """Markdown table from {(split, name): metrics dict}."""
    lines = ["| split | model | HR@10 | NDCG@10 | HR@50 | MRR |", "|---|---|---:|---:|---:|---:|"]
    for (which, name), m in rows.items():
        cells = [f"{m[k]:.4f}" if k in m else "n/a" for k in ("HR@10", "NDCG@10", "HR@50", "MRR")]
        lines.append(f"| {which} | {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def parse_args(argv):
    defaults = Recipe()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default=ml.SOURCE_ML100K, help=f"{ml.SOURCE_ML100K!r} or a directory")
    parser.add_argument("--cache-dir", default=None, help="download cache (movielens.py)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--checkpoint-dir", default=str(ml.cache_dir() / "checkpoints" / "movielens"),
                        help="where retrieval/ and ranker/ are saved (default: under $PHOENIX_CACHE_DIR)")
    parser.add_argument("--dump-topk", default=None, metavar="PATH",
                        help="write every test user's final top-10 (raw movie ids) as CSV and re-check it")
    for field in dataclasses.fields(Recipe):
        flag = "--" + field.name.replace("_", "-")
        default = getattr(defaults, field.name)
        if isinstance(default, bool):
            parser.add_argument(flag, type=lambda s: s.lower() in ("1", "true", "yes"), default=default,
                                help=f"Recipe.{field.name}, default {default}")
        else:
            parser.add_argument(flag, type=float if default is None else type(default), default=default,
                                help=f"Recipe.{field.name}, default {default}")
    args = parser.parse_args(argv)
    recipe = Recipe(**{f.name: getattr(args, f.name) for f in dataclasses.fields(Recipe)})
    return args, recipe


def run(args, recipe: Recipe, stream=None) -> dict:
    """The whole experiment; prints the table (stdout) and progress (`stream`, default stderr).
    Returns {"table": {(split, name): metrics}, "dump_check", "wall_s", "retrieval_weight", ...}."""
    stream = sys.stderr if stream is None else stream
    start = time.perf_counter()
    ratings = ml.load_ratings(args.data, args.cache_dir)
    split = ml.leave_one_out(ratings)
    print(f"data {ratings.source}: {len(split.user_ids)} users, {len(split.item_ids)} movies, "
          f"{len(split.target_positions('train')[0])} training examples; seed {args.seed}\n{recipe}", file=stream)
    print("hash collisions (ids, sharing all rows, sharing a row): " + ", ".join(
        f"{name}s {c}" for name, c in hash_collisions(split, hash_config(recipe)).items()), file=stream)

    print("\n== stage 1: retrieval (in-batch softmax, logQ correction, accidental-hit masking)", file=stream)
    t0 = time.perf_counter()
    retrieval, retrieval_params, retrieval_best = train_retrieval(split, recipe, args.seed, args.checkpoint_dir,
                                                                  stream)
    times = {"retrieval": time.perf_counter() - t0}
    print(f"retrieval: best val NDCG@10 {retrieval_best['NDCG@10']:.4f} at step {retrieval_best['step']}, "
          f"{times['retrieval']:.0f} s", file=stream)

    t0 = time.perf_counter()
    pool = (hard_negative_pool(retrieval, retrieval_params, split, recipe.history_len, recipe.negative_pool)
            if recipe.hard_negatives else None)
    val_one = StageOne(retrieval, retrieval_params, split, "val", recipe.history_len, recipe.retrieve_k)
    times["mining"] = time.perf_counter() - t0

    print(f"\n== stage 2: ranker (target + {recipe.hard_negatives} hard + {recipe.random_negatives} random "
          f"negatives, multi-action BCE); negatives mined in {times['mining']:.0f} s", file=stream)
    t0 = time.perf_counter()
    ranker, ranker_params, ranker_best = train_ranker(
        split, pool, recipe, args.seed, args.checkpoint_dir, val_one,
        retrieval_params if recipe.ranker_init_from_retrieval else None, stream)
    times["ranker"] = time.perf_counter() - t0
    print(f"ranker: best val NDCG@10 {ranker_best['NDCG@10']:.4f} at step {ranker_best['step']}, "
          f"{times['ranker']:.0f} s", file=stream)

    t0 = time.perf_counter()
    # The final evaluation reads the best weights back from the saved checkpoints.
    retrieval_params = checkpoint.load_checkpoint(os.path.join(args.checkpoint_dir, "retrieval"),
                                                  params_template=retrieval_params).params
    ranker_params = checkpoint.load_checkpoint(os.path.join(args.checkpoint_dir, "ranker"),
                                               params_template=ranker_params).params
    table, reranked, stage_one, two_stage, weight = evaluate_stages(split, retrieval, retrieval_params, ranker,
                                                                    ranker_params, recipe)
    times["evaluation"] = time.perf_counter() - t0
    wall = time.perf_counter() - start
    print(f"evaluation {times['evaluation']:.0f} s; re-ranking score = ranker {SCORE_ACTION} logit + {weight:g} x "
          f"retrieval cosine / {recipe.temperature:g} (weight chosen on validation)", file=stream)

    print(f"\nMovieLens ({ratings.source}), leave-one-out, all {len(split.item_ids)} movies ranked, "
          f"seed {args.seed}, wall time {wall:.0f} s (" + ", ".join(f"{k} {v:.0f} s" for k, v in times.items())
          + ")\n")
    print(format_table(table))

    check = None
    if args.dump_topk:
        users = split.user_ids[split.eval_users()]
        ml.dump_topk(args.dump_topk, users, split.item_ids[reranked["test"][:, :FINAL_K]])
        check = ml.recompute_from_dump(args.dump_topk, args.data, args.cache_dir, k=FINAL_K)
        ours = table[("test", "two-stage")]
        print(f"\ndump {args.dump_topk}: table HR@10 {ours['HR@10']:.4f} NDCG@10 {ours['NDCG@10']:.4f}; "
              f"recomputed from the dump HR@10 {check['HR@10']:.4f} NDCG@10 {check['NDCG@10']:.4f} "
              f"({check['num_users']} users, history items in the top-10s: {check['history_items_in_topk']})")
    return {"table": table, "dump_check": check, "wall_s": wall, "times": times, "retrieval_weight": weight,
            "retrieval_best": retrieval_best, "ranker_best": ranker_best, "retrieval": retrieval,
            "retrieval_params": retrieval_params, "ranker": ranker, "ranker_params": ranker_params,
            "stage_one": stage_one, "two_stage": two_stage}


def main(argv=None):
    args, recipe = parse_args(sys.argv[1:] if argv is None else argv)
    return run(args, recipe)


if __name__ == "__main__":
    main()
