"""The two-stage model on a log split: its recipe, training batches, and both stages' evaluation.

The retrieval stage (SequenceRetrievalTrainer: every prefix of a window is an example; or a
RetrievalEnsemble of several trained from different seeds, Recipe.retrieval_members) retrieves
RETRIEVE_K items per user; the ranker (or a RankerEnsemble, Recipe.ranker_members) re-scores them
(TwoStage): its logit + w x the retrieval logit + b x log(1 + the item's visible interactions),
(w, b) chosen on validation (choose_rerank_weights).
phoenix_pipeline.run trains both.

Recipe
  Tuned on MovieLens-100K (docs/notes.md); MOVIELENS_RECIPE, what `run_train.py --data movielens-100k`
  trains, differs in two fields. Fields left None adapt to the log: hash tables of
  max(20k, 4 x ids) rows (4k for authors); retrieve_k and negative_pool 100, or fewer when some
  user has seen all but fewer items; ranker_batch_size 256, or the number of training examples.
  A value given explicitly is kept, and refused (RecipeError naming the flag) if the log cannot
  support it. --rating-actions "favorite_score=8:,not_interested_score=:3" remaps a rating scale.

Shape glossary
  R  interactions   U  users (evaluated users: one target each)   N  catalog items
  E  training examples   B  batch   S  history length   C  ranker candidates per row
  D  embedding size      A  actions (19)   K  retrieved per user   Kn  hard-negative pool per example
  Nw  windows (retrieval training)
"""

import dataclasses
import math
from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np

import phoenix_metrics as metrics
import phoenix_sizes
import phoenix_training as training
from phoenix_batching import padded_chunks, take
from phoenix_evaluation import popularity_counts, transition_table
from phoenix_inputs import ACTIONS, PAD_ID, HashConfig
from phoenix_log import NUM_ACTIONS, LogError
from phoenix_split import SURFACE, LogSplit, Split, item_sampling_frequencies, phoenix_batch, phoenix_examples
from recsys_model import PhoenixModelConfig
from recsys_retrieval_model import POOLINGS, PhoenixRetrievalModelConfig, check_pooling, l2_normalize, last_valid

__all__ = ["Recipe", "RecipeError", "MOVIELENS_RECIPE", "LOG_RECIPE", "RECIPES", "BUDGET_SHARES", "resolve_recipe",
           "check_recipe", "hash_config",
           "retrieval_config", "ranker_config", "StageOne", "TwoStage", "RetrievalEnsemble", "RankerEnsemble",
           "SequenceRetrievalTrainer", "encode_items", "encode_users", "retrieval_scores", "retrieval_topk",
           "RetrievalTopK", "eval_chunk", "ranker_logits", "rerank_scores",
           "choose_rerank_weights", "transition_pairs", "transition_prior", "last_columns", "TRANSITION_WEIGHTS",
           "validation_rows",
           "VALIDATION_USERS", "start_retrieval",
           "start_ranker", "stage_steps", "member_stage",
           "RETRIEVE_K", "FINAL_K"]

RETRIEVE_K = 100  # the retrieval stage hands this many items per user to the ranker
FINAL_K = 10  # the list a user sees (and the dump holds)
EVAL_BATCH = 256  # rows per predict call in evaluation (fixed, so one compilation)
MIN_TABLE_ROWS_PER_ID = 4  # auto table sizes: >= 4 rows per id, so few ids share both their rows


class RecipeError(ValueError):
    """A Recipe the log cannot support (a batch or top-k larger than the data); names the flag."""


# ---------------------------------------------------------------------------------------------
# Recipe and configs
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Recipe:
    """Model sizes and training schedule of both stages (docs/notes.md says why)."""

    emb_size: int = 64  # D, both models
    num_layers: int = 2
    num_heads: int = 2  # of D / heads = 32 dimensions each
    history_len: int = 5  # S of the retrieval user tower: its mean pooling dilutes longer histories
    pooling: str = "mean"  # the user tower's pooling (recsys_retrieval_model.POOLINGS)
    ranker_history_len: int = 5  # S of the ranker
    retrieval_batch_size: int = 256  # windows of S + 1 items per step: ~1,200 rows of the softmax
    ranker_batch_size: Optional[int] = None  # examples per step, each with C candidates; None: 256 (fewer
    # if the log has fewer training examples)
    retrieval_epochs: float = 8.0  # passes over the training examples; longer overfits on MovieLens
    ranker_epochs: float = 4.0
    learning_rate: float = 2e-3  # AdamW peak, cosine decay to 10% over each stage
    warmup_steps: int = 100
    temperature: float = 0.05  # in-batch softmax over cosines: logits in [-20, 20]
    hard_negatives: int = 6  # ranker negatives drawn from the retrieval model's top `negative_pool`
    random_negatives: int = 1  # ranker negatives drawn uniformly from the catalog
    negative_pool: Optional[int] = None  # the list the ranker re-ranks at evaluation; None: retrieve_k's default
    retrieve_k: Optional[int] = None  # K: items the retrieval stage hands to the ranker per user; None: 100
    # (fewer if some user has seen all but fewer items)
    table_init_stddev: float = 0.05  # small rows move fast relative to their size under Adam
    user_table_size: Optional[int] = None  # None: max(20k, 4 x users); MovieLens's 943 users get 20k
    post_table_size: Optional[int] = None  # None: max(20k, 4 x items)
    author_table_size: Optional[int] = None  # None: max(4k, 4 x authors)
    num_hashes: int = 2
    evals_per_stage: int = 4  # validation evaluations (and best-checkpoint chances) per stage
    ranker_init_from_retrieval: bool = True  # start from the retrieval model's tables and transformer
    retrieval_weight: Optional[float] = None  # None: chosen on validation from RETRIEVAL_WEIGHTS
    popularity_weight: Optional[float] = None  # of log(1 + the item's visible interactions) in the
    # re-ranking score; None: chosen on validation from POPULARITY_WEIGHTS (with retrieval_weight)
    score_action: str = "click_score"  # the ranker logit that re-ranks: P(the user picks this next)
    ranker_listwise_weight: float = 0.0  # + this x softmax cross-entropy of score_action over each
    # example's candidates (training.listwise_loss); 0: the pointwise (per-action BCE) loss alone
    retrieval_members: int = 1  # two-tower models trained from different seeds and read as one
    # (RetrievalEnsemble: the mean of their cosines); 1: a single model
    ranker_members: int = 1  # rankers trained from different seeds, their logits averaged (RankerEnsemble)
    transition_weight: Optional[float] = 0.0  # of log(1 + how often the item followed the user's last
    # item) in the re-ranking score (the transition baseline's counts as a prior); None: chosen on
    # validation from TRANSITION_WEIGHTS (with retrieval_weight and popularity_weight)
    patience: int = 0  # a stage stops after this many validation evaluations in a row without a better
    # NDCG@10 (its best checkpoint is kept); 0: it runs all its steps
    time_budget: Optional[float] = None  # seconds of training steps for both stages together
    # (BUDGET_SHARES); a stage whose epochs would take longer runs fewer steps, as many as its share
    # fits at its measured speed (phoenix_pipeline.budget_steps); None: the epochs alone

    @property
    def num_candidates(self) -> int:  # C
        return 1 + self.hard_negatives + self.random_negatives


# MovieLens's recipe (`run_train.py --data movielens-100k`): last pooling (chosen on validation over
# seeds 0-2) and a retrieval ensemble of four two-tower models with one ranker; docs/notes.md
# ("MovieLens-100K") has the measurements. `--pooling mean` is the release's pooling,
# `--retrieval-members 1` a single two-tower model.
MOVIELENS_RECIPE = Recipe(pooling="last", retrieval_members=4)
# Your log's recipe (`run_train.py --data LOG.csv`), chosen on validation over realistic logs
# (docs/recipes.md has the table): last pooling carries the sequence (a first-order chain is
# the baseline to beat), 64 windows per step give the sparse item rows four times the updates of
# 256 at the same epochs, early stopping ends a stage that no longer improves, and the time budget
# caps both stages so that a million-row log trains in about ten minutes on two cores; the
# re-ranking score may add the transition counts as a prior, with a weight chosen on validation.
LOG_RECIPE = Recipe(pooling="last", retrieval_batch_size=64, evals_per_stage=6, patience=2, time_budget=540.0,
                    transition_weight=None)
# Named recipes (`run_train.py --recipe NAME`; flags given beside it override its fields).
RECIPES = {"log": LOG_RECIPE, "movielens": MOVIELENS_RECIPE, "mean": Recipe()}
# Shares of Recipe.time_budget each stage's training steps may take (ensemble members split theirs).
BUDGET_SHARES = {"retrieval": 0.4, "ranker": 0.6}


# Weights of the retrieval logit and of the popularity prior in the re-ranking score tried on
# validation (rerank_scores; every pair, choose_rerank_weights).
RETRIEVAL_WEIGHTS = (0.0, 0.25, 0.5, 1.0, 2.0, 4.0)
POPULARITY_WEIGHTS = (0.0, 0.1, 0.25, 0.5)
TRANSITION_WEIGHTS = (0.0, 0.5, 1.0, 2.0)
RANKER_BATCH = 256  # default examples per ranker step
# Auto table sizes (Recipe fields left None): minimum rows.
_TABLE_MINIMUM = {"user_table_size": 20_000, "post_table_size": 20_000, "author_table_size": 4_000}


def recommendable(split: Split) -> int:
    """Items every evaluated user can still be recommended at test time (the catalog minus the most
    any user has seen)."""
    return len(split.item_ids) - int(split.num_distinct("test")[split.eval_users()].max())


def resolve_recipe(recipe: Recipe, split: Split) -> Recipe:
    """The recipe with its auto fields (None) filled in from the split: table sizes from the id
    counts; retrieve_k, negative_pool and ranker_batch_size at their defaults unless the log is too
    small for them. Values given explicitly are kept (check_recipe refuses those that do not fit)."""
    counts = {"user_table_size": len(split.user_ids), "post_table_size": len(split.item_ids),
              "author_table_size": len(np.unique(split.item_authors))}
    auto = {name: max(minimum, MIN_TABLE_ROWS_PER_ID * counts[name]) for name, minimum in _TABLE_MINIMUM.items()}
    auto["retrieve_k"] = min(RETRIEVE_K, recommendable(split))
    auto["negative_pool"] = max(1, min(RETRIEVE_K, len(split.item_ids) - int(split.num_distinct().max()) - 1))
    auto["ranker_batch_size"] = max(1, min(RANKER_BATCH, len(split.target_positions("train")[0])))
    return dataclasses.replace(recipe, **{name: value for name, value in auto.items() if getattr(recipe, name) is None})


def hash_config(recipe: Recipe) -> HashConfig:
    """The hash tables of a recipe; auto sizes (None) not yet resolved (resolve_recipe) take the minimum."""
    sizes = [getattr(recipe, name) or minimum for name, minimum in _TABLE_MINIMUM.items()]
    return HashConfig(num_user_hashes=recipe.num_hashes, num_item_hashes=recipe.num_hashes,
                      num_author_hashes=recipe.num_hashes, user_table_size=sizes[0], post_table_size=sizes[1],
                      author_table_size=sizes[2])


def model_sizes(recipe: Recipe) -> phoenix_sizes.ModelSizes:
    """Both stages' transformer: emb_size split over num_heads, widening 4."""
    return phoenix_sizes.ModelSizes(recipe.emb_size, recipe.num_layers, recipe.num_heads)


def retrieval_config(recipe: Recipe) -> PhoenixRetrievalModelConfig:
    return phoenix_sizes.retrieval_config(model_sizes(recipe), recipe.history_len, hash_config(recipe),
                                          pooling=recipe.pooling)


def ranker_config(recipe: Recipe) -> PhoenixModelConfig:
    return phoenix_sizes.ranker_config(model_sizes(recipe), recipe.ranker_history_len, recipe.num_candidates,
                                       hash_config(recipe))


def optimizer_config(recipe: Recipe, num_steps: int) -> training.OptimizerConfig:
    warmup = min(recipe.warmup_steps, max(num_steps // 4, 1))
    return training.OptimizerConfig(learning_rate=recipe.learning_rate, warmup_steps=warmup,
                                    decay_steps=max(num_steps, warmup + 1))


def action_weights(split: LogSplit) -> np.ndarray:
    """[A]: 1 for each action the log ever sets, 0 for the others (they would only dilute the loss)."""
    return split.actions.any(axis=0).astype(np.float32)


def check_recipe(split: LogSplit, recipe: Recipe) -> None:
    """Recipe sizes (after resolve_recipe) the log can support; each error names the flag to change."""
    if recipe.score_action not in ACTIONS or not action_weights(split)[ACTIONS.index(recipe.score_action)]:
        raise RecipeError(f"score_action (--score-action): expected an action the log sets, one of "
                         f"{[a for a, w in zip(ACTIONS, action_weights(split)) if w]}, got {recipe.score_action!r}")
    if recipe.pooling not in POOLINGS:
        raise RecipeError(f"pooling (--pooling): expected one of {POOLINGS}, got {recipe.pooling!r}")
    room = recommendable(split)
    if not 0 < recipe.retrieve_k <= room:
        raise RecipeError(f"retrieve_k (--retrieve-k): expected in [1, {room}] (the {len(split.item_ids)} items minus "
                          f"the most one user has seen), got {recipe.retrieve_k}")
    unseen = len(split.item_ids) - int(split.num_distinct().max())  # the fewest items a user has not seen
    if recipe.hard_negatives and not 0 < recipe.negative_pool < unseen:
        raise RecipeError(f"negative_pool (--negative-pool): expected in [1, {unseen}) (items a user has not seen), "
                          f"got {recipe.negative_pool}")
    if recipe.hard_negatives > recipe.negative_pool:
        raise RecipeError(f"hard_negatives (--hard-negatives): expected <= negative_pool {recipe.negative_pool}, "
                         f"got {recipe.hard_negatives}")
    examples = len(split.target_positions("train")[0])
    if examples == 0:
        raise LogError(f"{split.log.source}: no training examples (no user has 2 interactions before their "
                       "validation target)")
    if recipe.retrieval_batch_size < 1:  # more windows than the log holds are fine: they span epochs
        raise RecipeError(f"retrieval_batch_size (--retrieval-batch-size): expected >= 1, got "
                         f"{recipe.retrieval_batch_size}")
    if not 0 < recipe.ranker_batch_size <= examples:
        raise RecipeError(f"ranker_batch_size (--ranker-batch-size): expected in [1, {examples}] (the log's "
                         f"training examples), got {recipe.ranker_batch_size}")
    for name in ("retrieval_members", "ranker_members"):
        value = getattr(recipe, name)
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
            raise RecipeError(f"{name} (--{name.replace('_', '-')}): expected an int >= 1, got {value!r}")
    if not (math.isfinite(recipe.ranker_listwise_weight) and recipe.ranker_listwise_weight >= 0):
        raise RecipeError(f"ranker_listwise_weight (--ranker-listwise-weight): expected a finite float >= 0, "
                         f"got {recipe.ranker_listwise_weight}")
    if isinstance(recipe.patience, bool) or not isinstance(recipe.patience, (int, np.integer)) or recipe.patience < 0:
        raise RecipeError(f"patience (--patience): expected an int >= 0 (0: no early stopping), got "
                          f"{recipe.patience!r}")
    if recipe.time_budget is not None and not (math.isfinite(recipe.time_budget) and recipe.time_budget > 0):
        raise RecipeError(f"time_budget (--time-budget): expected seconds > 0 or None (the epochs alone), got "
                          f"{recipe.time_budget}")
    for name in ("retrieval_weight", "popularity_weight", "transition_weight"):
        value = getattr(recipe, name)
        if value is not None and not math.isfinite(value):
            raise RecipeError(f"{name} (--{name.replace('_', '-')}): expected a finite float or None (chosen on "
                             f"validation), got {value}")


# ---------------------------------------------------------------------------------------------
# Batches
# ---------------------------------------------------------------------------------------------


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


def training_windows(split: Split, history_len: int, rng: Optional[np.random.Generator] = None):
    """Windows of up to S + 1 consecutive training items that cover every training target once.

    Returns (user rows [Nw], start positions [Nw] into split.items, lengths [Nw]). Within a window the
    item at slot j >= 1 is the target of the prefix of slots 0..j-1, so a window of n items holds
    n - 1 examples. Window boundaries fall at r, r + S, r + 2S, ... of each user's training part,
    with r = 0 without `rng` and r uniform in [0, S) per user with it (a new cut every epoch, so a
    target's history length varies between epochs instead of being fixed by where the cuts fall).
    """
    train_len = split.train_len
    users = np.flatnonzero(train_len >= 2)  # [U'] targets are positions 1 .. length - 1
    length = train_len[users]
    # One draw per such user, in user order (as many draws as one rng.integers call each would take).
    shift = rng.integers(0, history_len, size=len(users)) if rng is not None else np.zeros(len(users), np.int64)
    lead = (shift > 0).astype(np.int64)  # [U'] a first window 0..shift before the regular cuts
    regular = np.maximum(-(-(length - 1 - shift) // history_len), 0)  # [U'] cuts shift, shift + S, ... < length - 1
    count = lead + regular  # [U'] windows per user
    owner = np.repeat(np.arange(len(users)), count)  # [Nw]
    j = np.arange(count.sum()) - np.repeat(np.cumsum(count) - count, count)  # [Nw] window index within its user
    begin = np.where((lead[owner] == 1) & (j == 0), 0, shift[owner] + (j - lead[owner]) * history_len)  # [Nw]
    last = j == count[owner] - 1
    end = np.where(last, length[owner] - 1, shift[owner] + (j + 1 - lead[owner]) * history_len)  # items begin..end
    rows = users[owner].astype(np.int64)
    return rows, (split.offsets[rows] + begin).astype(np.int64), (end - begin + 1).astype(np.int64)


def window_examples(split: LogSplit, rows, starts, lengths, history_len: int):
    """The windows as histories: (examples dict with history fields [Nw, S + 1], their positions
    [Nw, S + 1] into split.items, valid [Nw, S + 1])."""
    slots = np.arange(history_len + 1)[None, :]  # [1, S+1]
    valid = slots < lengths[:, None]  # [Nw, S+1]
    positions = np.where(valid, starts[:, None] + slots, 0)  # [Nw, S+1]
    items = np.where(valid, split.items[positions], PAD_ID)  # [Nw, S+1]
    examples = {"user_ids": split.user_ids[rows], "history_post_ids": items,
                "history_author_ids": split.authors_of(items),
                "history_actions": split.actions[positions] & valid[..., None],
                "history_surfaces": np.full(items.shape, SURFACE, np.int32)}
    return examples, positions, valid


def window_batch(split: Split, examples: dict, hashes: HashConfig, targets=None):
    """A RecsysBatch whose history is each window and whose candidates are the window's items 1..S
    (candidate c is the target of the prefix ending at slot c); `targets` [Nw, S] bool (default all):
    the other slots' candidates are padding (a kept repeat is history, never a target)."""
    candidates = examples["history_post_ids"][:, 1:]  # [Nw, S]
    if targets is not None:
        candidates = np.where(targets, candidates, PAD_ID)
    return phoenix_batch(split, examples, hashes, candidates)


def retrieval_batches(split: LogSplit, recipe: Recipe, hashes: HashConfig, rng: np.random.Generator,
                      skip: int = 0):
    """Endless (batch, log_q [B, S], positive_ids [B, S]) for SequenceRetrievalTrainer.step, B windows
    each. log q is a target's share among training targets (logQ correction); positive_ids, the
    targets' catalog columns (-1: padding), mark accidental hits (the same item as another row's positive).
    `skip`: the first `skip` batches are drawn from `rng` but not built or yielded (a resumed stream)."""
    q = item_sampling_frequencies(split)  # [N]
    log_q = np.log(np.where(q > 0, q, 1.0)).astype(np.float32)  # [N]; unsampled items are never targets
    pending = np.zeros((0, 3), np.int64)
    B, S = recipe.retrieval_batch_size, recipe.history_len
    drawn = 0
    while True:
        while len(pending) < B:  # the next epoch: new cuts, new order
            windows = np.stack(training_windows(split, S, rng), axis=1)  # [Nw, 3]
            pending = np.concatenate([pending, windows[rng.permutation(len(windows))]])
        (rows, starts, lengths), pending = pending[:B].T, pending[B:]
        drawn += 1
        if drawn <= skip:
            continue
        examples, positions, valid = window_examples(split, rows, starts, lengths, S)
        targets = valid[:, 1:]  # [B, S]
        if split.first_time is not None:  # kept repeats (duplicates="keep") are history, never targets
            targets = targets & split.first_time[positions[:, 1:]]
        # Accidental hits by catalog column, not raw id: a hashed string id needs 63 bits, and the
        # jitted step sees int32 (-1 marks padding, as PAD_ID did).
        yield (window_batch(split, examples, hashes, None if split.first_time is None else targets),
               np.where(targets, log_q[split.item_columns[positions[:, 1:]]], 0.0).astype(np.float32),
               np.where(targets, split.item_columns[positions[:, 1:]], PAD_ID).astype(np.int32))


def ranker_candidates(examples: dict, rows, pool: Optional[np.ndarray], num_hard: int, num_random: int,
                      num_items: int, rng: np.random.Generator):
    """Candidate columns [B, C] with the target at a random slot, and that slot [B].

    Negatives: `num_hard` distinct entries of each example's hard-negative pool (Kn columns, target and
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


def ranker_batches(split: Split, examples: dict, pool: Optional[np.ndarray], recipe: Recipe,
                   hashes: HashConfig, rng: np.random.Generator, skip: int = 0):
    """Endless (batch, labels [B, C, A]) for RankingTrainer.step: the target carries its actions,
    sampled negatives all-zero labels. `skip`: the first `skip` batches are drawn from `rng` (their
    rows and candidates) but not built or yielded (a resumed stream)."""
    num_items = len(split.item_ids)
    for drawn, rows in enumerate(epoch_batches(len(examples["user_ids"]), recipe.ranker_batch_size, rng), start=1):
        columns, slot = ranker_candidates(examples, rows, pool, recipe.hard_negatives, recipe.random_negatives,
                                          num_items, rng)
        if drawn <= skip:
            continue
        labels = np.zeros(columns.shape + (NUM_ACTIONS,), np.float32)  # [B, C, A]
        labels[np.arange(len(rows)), slot] = examples["target_actions"][rows]
        yield phoenix_batch(split, take(examples, rows), hashes, split.item_ids[columns]), labels


# ---------------------------------------------------------------------------------------------
# Retrieval stage: the per-prefix trainer, representations and scores
# ---------------------------------------------------------------------------------------------


def prefix_user_representations(model, batch, embeddings) -> jax.Array:
    """[B, 1+S, D]: at position p, the user tower's representation of the history before slot p,
    i.e. `build_user_representation` of the batch cut to history slots 0..p-1.

    Causal attention makes the transformer output at position p depend on positions 0..p only, and
    a right-padded history puts slot j at rotary position 1 + j in both cases, so pooling the
    outputs up to p gives that representation (tested against it): the running mean over valid
    positions for "mean" pooling, the output at the last valid position <= p for "last".
    """
    if model.config.model.bidirectional_history:
        raise ValueError("prefix_user_representations: needs causal attention over the history "
                         "(model.bidirectional_history=False): with bidirectional attention a position "
                         "sees later slots, so no prefix's representation can be read off one pass")
    out, mask = model.build_user_sequence(batch, embeddings)  # [B, 1+S, D], [B, 1+S]
    if check_pooling(model.config.pooling) == "last":
        return l2_normalize(last_valid(out, mask))[0]  # [B, 1+S, D]
    mask_f = mask.astype(jnp.float32)[:, :, None]  # [B, 1+S, 1]
    running = jnp.cumsum(out * mask_f, axis=1) / jnp.maximum(jnp.cumsum(mask_f, axis=1), 1.0)  # [B, 1+S, D]
    return l2_normalize(running)[0]


def window_towers(model, batch, embeddings):
    """(users [B, S, D], candidates [B, S, D], valid [B, S]) float32 of a batch of windows: the
    representation of each prefix and the item that follows it."""
    users = prefix_user_representations(model, batch, embeddings)[:, 1:-1]  # [B, S, D]
    candidates, candidate_mask = model.build_candidate_representation(batch, embeddings)  # [B, S, D]
    valid = candidate_mask & (batch.user_hashes[:, :1] != 0)  # [B, S]
    return users.astype(jnp.float32), candidates.astype(jnp.float32), valid


class SequenceRetrievalTrainer(training.RetrievalTrainer):
    """RetrievalTrainer whose train step takes every prefix of a window as an example (SASRec-style).

    A batch holds windows of S + 1 items as histories and items 1..S as candidates; the row of
    candidate c pairs the prefix representation before slot c + 1 with that item, so one pass of
    the user tower over B windows yields up to B * S examples of the in-batch softmax (with logQ
    correction and accidental-hit masking, training.retrieval_loss_terms), instead of B. Parameters,
    checkpoints, `predict` and the runners are those of the plain RetrievalTrainer.

    step(state, batch, log_q [B, S], positive_ids [B, S]) -> (state, metrics)
    predict_windows(params, batch) -> (users [B, S, D], candidates [B, S, D], valid [B, S])
    """

    def __init__(self, model_config: PhoenixRetrievalModelConfig, hash_config: Optional[HashConfig] = None,
                 optimizer_config: Optional[training.OptimizerConfig] = None,
                 temperature: float = training.DEFAULT_TEMPERATURE, table_init_stddev: Optional[float] = None,
                 data_parallel=False, shard_tables: bool = False):
        super().__init__(model_config, hash_config, optimizer_config, temperature, table_init_stddev, data_parallel,
                         shard_tables)
        self._jit_predict_windows = jax.jit(lambda params, batch: self._windows(params, None, batch))

    def _windows(self, params, rng, batch):
        return self.forward.apply(params, batch, call=window_towers, rng=rng)

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
        return self._jit_step(state, *self._place(batch, log_q, positive_ids))

    def _loss(self, params, rng, batch, log_q, positive_ids):
        users, candidates, valid = self._windows(params, rng, batch)
        D = users.shape[-1]
        terms = training.retrieval_loss_terms(users.reshape(-1, D), candidates.reshape(-1, D), self.temperature,
                                              positive_ids.reshape(-1), log_q.reshape(-1), valid.reshape(-1))
        return terms.loss, {"accuracy": terms.accuracy}

    def predict_windows(self, params, batch):
        return self._jit_predict_windows(params, batch)


class _Ensemble:
    """Models of one stage trained alike from different seeds (members), called with a tuple of
    their params."""

    def __init__(self, members):
        self.members = tuple(members)
        if not self.members:
            raise ValueError(f"{type(self).__name__}: expected at least one member, got none")
        self.hash_config = self.members[0].hash_config

    def _outputs(self, method: str, params, batch) -> list:
        if len(params) != len(self.members):
            raise ValueError(f"params: expected {len(self.members)} members' params, got {len(params)}")
        return [getattr(member, method)(p, batch) for member, p in zip(self.members, params)]


class RetrievalEnsemble(_Ensemble):
    """Two-tower models trained alike from different seeds, read as one two-tower model.

    Each member's user and item representations are unit vectors [.., D]; the ensemble's are the
    members' concatenated and scaled by 1/sqrt(M) [.., M*D]: unit vectors again, whose dot product
    is the mean of the members' cosines. So everything that takes a retrieval trainer (StageOne,
    hard_negative_pool, the re-ranking score's cosine / temperature, a CorpusIndex over
    encode_items) takes the ensemble as a single model. `params`: a tuple of the members' params.

    predict(params, batch) -> (user [B, M*D], candidates [B, C, M*D], candidate_mask [B, C])
    predict_windows(params, batch) -> (users [B, S, M*D], candidates [B, S, M*D], valid [B, S])
    """

    def _joined(self, method: str, params, batch):
        outs = self._outputs(method, params, batch)
        scale = 1.0 / math.sqrt(len(self.members))
        users = jnp.concatenate([out[0] for out in outs], axis=-1) * scale
        candidates = jnp.concatenate([out[1] for out in outs], axis=-1) * scale
        return users, candidates, outs[0][2]  # the mask depends on the batch alone

    def predict(self, params, batch):
        return self._joined("predict", params, batch)

    def predict_windows(self, params, batch):
        return self._joined("predict_windows", params, batch)


class RankerEnsemble(_Ensemble):
    """Rankers trained alike from different seeds, read as one: predict(params, batch) -> the mean
    of the members' logits [B, C, A] (params: a tuple of the members'). ranker_logits and TwoStage
    take it as a single ranker."""

    def predict(self, params, batch):
        return sum(self._outputs("predict", params, batch)) / len(self.members)


def member_stage(member: int, stage: str = "retrieval") -> str:
    """Checkpoint directory and metrics stage name of ensemble member `member` of `stage`
    ("retrieval" or "ranker"): the stage's own name for the first (a single model's, as before
    ensembles), "<stage>.1", "<stage>.2", ... after it."""
    return stage if member == 0 else f"{stage}.{member}"


def ensemble(members, params, kind=RetrievalEnsemble):
    """(model, its params): the single member and its params as they are, or a `kind`
    (RetrievalEnsemble, RankerEnsemble) of several and the tuple of their params."""
    members, params = list(members), list(params)
    if len(members) == 1:
        return members[0], params[0]
    return kind(members), tuple(params)


def item_examples(split: Split) -> dict:
    """A one-row examples dict with an empty history: the carrier of candidate-only batches."""
    return {"user_ids": split.user_ids[:1], "history_post_ids": np.full((1, 1), PAD_ID),
            "history_author_ids": np.full((1, 1), PAD_ID), "history_actions": np.zeros((1, 1, NUM_ACTIONS), bool),
            "history_surfaces": np.zeros((1, 1), np.int32)}


def encode_items(trainer: training.RetrievalTrainer, params, split: Split) -> np.ndarray:
    """Candidate-tower representations [N, D] of every catalog item (unit norm), in one call."""
    ids = split.item_ids[None, :]  # [1, N]
    _, candidates, _ = trainer.predict(params, phoenix_batch(split, item_examples(split), trainer.hash_config, ids))
    return np.asarray(candidates[0])  # [N, D]


def encode_users(trainer: training.RetrievalTrainer, params, split: Split, examples: dict,
                 batch_size: int = EVAL_BATCH) -> np.ndarray:
    """User-tower representations [E, D] (unit norm) of the examples' histories."""
    out = []
    for rows, real in padded_chunks(len(examples["user_ids"]), batch_size):
        user, _, _ = trainer.predict(params, phoenix_batch(split, take(examples, rows), trainer.hash_config))
        out.append(np.asarray(user)[:real])
    return np.concatenate(out)


def retrieval_scores(users: np.ndarray, items: np.ndarray, batch_size: int = EVAL_BATCH) -> np.ndarray:
    """Cosines [U, N] of users [U, D] with items [N, D], computed `batch_size` rows at a time, the last
    block padded to full size, so every product has the shape [batch_size, D] x [D, N].

    A user's row then does not depend on how many users are scored with it: a one-row product (a
    BLAS gemv) can differ from a many-row one (gemm) in the last bits and reorder near-ties, so the
    evaluation (StageOne) and serving (phoenix_serving) both score through here.
    """
    out = np.empty((len(users), len(items)), np.result_type(users, items))  # [U, N]
    for rows, real in padded_chunks(len(users), batch_size):
        out[rows[:real]] = (users[rows] @ items.T)[:real]  # [batch_size, N]
    return out


def eval_mask(split: Split, which: str, eval_rows=None) -> np.ndarray:
    """[U, N]: items ranked for nobody: the user's earlier items, except the target (phoenix_metrics.py's rule);
    `eval_rows` [u] (indices into split.eval_users()): those users' rows [u, N] only."""
    exclude = split.exclude_mask(which, eval_rows)
    targets = split.targets(which) if eval_rows is None else split.targets(which)[eval_rows]
    exclude[np.arange(exclude.shape[0]), targets] = False
    return exclude


VALIDATION_USERS = 4096  # validation users behind each in-training evaluation (validation_rows)


def validation_rows(split: Split, limit: int = VALIDATION_USERS, seed: int = 0) -> Optional[np.ndarray]:
    """The eval-user indices (ascending) that the validations during training score: every user (None)
    up to `limit`, else a fixed random `limit` of them (seeded by `seed` alone), so that choosing the
    best checkpoint and stopping early cost the same on a log of any size. The table and the re-ranking
    weights are computed on every user."""
    users = len(split.eval_users())
    if users <= limit:
        return None
    return np.sort(np.random.default_rng(seed).choice(users, limit, replace=False))


def first_positions(split: Split, rows=None) -> np.ndarray:
    """[U, N] int32: position (within the user's sequence) of the user's first interaction with each
    item, or a large number where the user never had one; `rows` [u] (user rows): those users' [u, N]."""
    rows = np.arange(len(split.user_ids)) if rows is None else np.asarray(rows, np.int64)
    lengths = split.lengths[rows]  # [u]
    first = np.full((len(rows), len(split.item_ids)), np.iinfo(np.int32).max, np.int32)
    owner = np.repeat(np.arange(len(rows)), lengths)  # [sum lengths]
    within = np.arange(len(owner)) - np.repeat(np.cumsum(lengths) - lengths, lengths)  # [sum lengths]
    np.minimum.at(first, (owner, split.item_columns[split.offsets[rows][owner] + within]), within.astype(np.int32))
    return first


CHUNK_ENTRIES = 1 << 24  # users x items scored at once by retrieval_topk (64 MB of float32 cosines)


def eval_chunk(num_items: int) -> int:
    """Users ranked at once by retrieval_topk: about CHUNK_ENTRIES / N, a multiple of EVAL_BATCH."""
    return max(1, CHUNK_ENTRIES // max(num_items, 1) // EVAL_BATCH) * EVAL_BATCH


class RetrievalTopK(NamedTuple):
    """Retrieval's verdict on U users, without their [U, N] cosines."""

    columns: np.ndarray  # [U, K] int64 catalog columns, best first (phoenix_metrics' tie rule); NOT_RANKED
    # where fewer than K items are left
    scores: np.ndarray  # [U, K] their cosines (column 0's where NOT_RANKED)
    ranks: Optional[np.ndarray]  # [U] int64 the target's rank among all non-excluded items; None without targets


def retrieval_topk(users: np.ndarray, items: np.ndarray, k: int, exclude, targets=None,
                   chunk: Optional[int] = None, batch_size: int = EVAL_BATCH) -> RetrievalTopK:
    """retrieval_scores, metrics.topk_columns and metrics.target_ranks of users [U, D] with items [N, D],
    `chunk` users at a time: peak memory O(chunk x N), not O(U x N).

    exclude(start, stop) -> [stop - start, N] bool: the excluded items of users start..stop-1;
    targets [U] catalog columns (or None). `chunk` is a multiple of `batch_size`, so every cosine comes
    from the very [batch_size, D] x [D, N] product that retrieval_scores(users, items, batch_size)
    computes: the result is bit for bit that of the whole [U, N] matrix. Default: eval_chunk(N).
    """
    chunk = eval_chunk(len(items)) if chunk is None else chunk
    if chunk <= 0 or chunk % batch_size:
        raise ValueError(f"chunk: expected a positive multiple of batch_size={batch_size}, got {chunk}")
    columns, scores, ranks = [], [], []
    for start in range(0, len(users), chunk):
        stop = min(start + chunk, len(users))
        block = retrieval_scores(users[start:stop], items, batch_size)  # [u, N]
        mask = exclude(start, stop)  # [u, N]
        top = metrics.topk_columns(block, k, mask)  # [u, K]
        columns.append(top)
        scores.append(np.take_along_axis(block, np.where(top == metrics.NOT_RANKED, 0, top), axis=1))
        if targets is not None:
            ranks.append(metrics.target_ranks(block, targets[start:stop], mask))
    if not columns:  # no users
        return RetrievalTopK(np.zeros((0, k), np.int64), np.zeros((0, k), np.result_type(users, items)),
                             None if targets is None else np.zeros(0, np.int64))
    return RetrievalTopK(np.concatenate(columns), np.concatenate(scores),
                         None if targets is None else np.concatenate(ranks))


def example_representations(trainer: SequenceRetrievalTrainer, params, split: LogSplit, history_len: int,
                            batch_size: int = EVAL_BATCH) -> np.ndarray:
    """User representations [E, D] of every training example (phoenix_examples order) from one pass
    over the windows of training_windows (cuts at 0, S, 2S, ...): an example's history is then the
    items since its window's start (1..S of them), not always the last S; good enough to mine negatives
    and ~S times cheaper than encoding each example's own history."""
    rows, starts, lengths = training_windows(split, history_len)
    by_position = None  # [R, D]
    for chunk, real in padded_chunks(len(rows), batch_size):
        examples, positions, valid = window_examples(split, rows[chunk], starts[chunk], lengths[chunk], history_len)
        users, _, _ = trainer.predict_windows(params, window_batch(split, examples, trainer.hash_config))
        if by_position is None:
            by_position = np.zeros((len(split.items), users.shape[-1]), np.float32)
        keep = valid[:real, 1:]  # [b, S]
        by_position[positions[:real, 1:][keep]] = np.asarray(users)[:real][keep]
    return by_position[split.target_positions("train")[1]]


POOL_SUBCHUNK = 256  # examples masked and partitioned at once (the [e, N] int64 argpartition of 4096 is 8 x N KB)


def hard_negative_pool(trainer: SequenceRetrievalTrainer, params, split: LogSplit, history_len: int,
                       pool_size: int, chunk: int = 4096) -> np.ndarray:
    """[E, Kn] catalog columns: the retrieval model's top-Kn for each training example among the items
    the user had not seen before the target, the target excluded (so every entry is a negative)."""
    items = encode_items(trainer, params, split)  # [N, D]
    users = example_representations(trainer, params, split, history_len)  # [E, D]
    rows, positions = split.target_positions("train")
    within = positions - split.offsets[rows]  # [E] the target's position within its user
    targets = split.item_columns[positions]  # [E]
    if not 0 < pool_size < len(split.item_ids) - int(split.num_distinct().max()):
        raise ValueError(f"negative pool {pool_size} must be below the items a user has not seen")
    pool = np.empty((len(users), pool_size), np.int32)
    for start in range(0, len(users), chunk):
        sl = slice(start, start + chunk)
        scores = users[sl] @ items.T  # [e, N]; the product's shape as ever (a row's last bits may depend on it)
        for sub in range(0, len(scores), POOL_SUBCHUNK):  # the rest row by row, a few rows at a time
            part = scores[sub:sub + POOL_SUBCHUNK]  # [e', N] a view
            at = slice(start + sub, start + sub + len(part))
            owners, owner_of = np.unique(rows[at], return_inverse=True)  # its users [u], each example's [e']
            part[first_positions(split, owners)[owner_of] < within[at, None]] = -np.inf  # seen before the target
            part[np.arange(len(part)), targets[at]] = -np.inf
            pool[at] = np.argpartition(-part, pool_size, axis=1)[:, :pool_size]
    return pool


class StageOne:
    """Retrieval evaluation of one split: the target's full rank, the top-K lists and their cosines
    (retrieval_topk: [U, K] kept, never the [U, N] cosines)."""

    def __init__(self, trainer, params, split: LogSplit, which: str, history_len: int, k: int = RETRIEVE_K,
                 items=None, chunk: Optional[int] = None, rows: Optional[np.ndarray] = None):
        self.rows = rows  # [U] eval-user indices evaluated (validation_rows), None: every eval user
        self.examples = phoenix_examples(split, which, history_len, rows)
        self.target = split.targets(which) if rows is None else split.targets(which)[rows]  # [U]
        items = encode_items(trainer, params, split) if items is None else items  # [N, D]
        users = encode_users(trainer, params, split, self.examples)  # [U, D]
        every = np.arange(len(self.target)) if rows is None else rows  # [U] eval rows
        found = retrieval_topk(users, items, k, lambda start, stop: eval_mask(split, which, every[start:stop]),
                               self.target, chunk)
        self.ranks = found.ranks  # [U]
        self.topk = found.columns  # [U, K], best first
        self.topk_scores = found.scores  # [U, K] cosines
        if (self.topk == metrics.NOT_RANKED).any():
            raise ValueError(f"k={k} exceeds the items some user can be recommended")

    def metrics(self) -> dict:
        return metrics.metrics_from_ranks(self.ranks)


# ---------------------------------------------------------------------------------------------
# Ranking stage
# ---------------------------------------------------------------------------------------------


def ranker_logits(trainer: training.RankingTrainer, params, split: Split, examples: dict,
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
    ids = np.where(chunk_columns >= 0, split.item_ids[np.maximum(chunk_columns, 0)], PAD_ID)
    out = []
    for rows, real in padded_chunks(len(owners), batch_size):
        batch = phoenix_batch(split, take(examples, owners[rows]), trainer.hash_config, ids[rows])
        out.append(np.asarray(trainer.predict(params, batch))[:real])
    logits = np.concatenate(out).reshape(U, num_chunks * num_candidates, -1)  # [U, K', A]
    return logits[:, :K]


def two_stage_ranks(stage_one: StageOne, rerank_scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(full-ranking ranks [U], re-ranked top-K columns [U, K]).

    The K retrieved items are re-ordered by `rerank_scores` [U, K] (ties keep retrieval order); the
    rest follow in retrieval order, so a target outside the top-K keeps its retrieval rank.
    """
    order = np.argsort(-rerank_scores, axis=1, kind="stable")  # [U, K]
    reranked = np.take_along_axis(stage_one.topk, order, axis=1)  # [U, K]
    in_list = metrics.ranks_in_topk(reranked, stage_one.target)  # [U]
    ranks = np.where(in_list == metrics.NOT_RANKED, stage_one.ranks, in_list)
    return ranks, reranked


def rerank_scores(logits: np.ndarray, retrieval_scores: np.ndarray, weight: float, temperature: float,
                  score_action: str = "click_score", popularity=None, popularity_weight: float = 0.0,
                  transition=None, transition_weight: float = 0.0):
    """Ranker `score_action` logit + weight * retrieval logit (cosine / temperature)
    + popularity_weight * popularity (log(1 + visible interactions) of each item), all [U, K].

    The popularity term puts back the prior that training takes out: the retrieval softmax is
    logQ-corrected (its logits rank items as if all were sampled alike) and the ranker sees a
    positive among negatives drawn from retrieval's own top list.
    """
    scores = logits[..., ACTIONS.index(score_action)] + weight * retrieval_scores / temperature
    if popularity_weight:
        scores = scores + popularity_weight * popularity
    if transition_weight:  # + transition_weight * log(1 + count(last item -> item)) [U, K] (transition_prior)
        scores = scores + transition_weight * transition
    return scores


def transition_pairs(table: tuple) -> tuple[np.ndarray, np.ndarray]:
    """(keys [P] ascending, counts [P]) of phoenix_evaluation.transition_table's CSR (indptr [N + 1],
    to [P], counts [P]): key i * N + j for the pair i -> j. Built once per table, looked up by
    transition_prior as often as needed."""
    indptr, following, counts = table
    num_items = len(indptr) - 1
    return np.repeat(np.arange(num_items, dtype=np.int64), np.diff(indptr)) * num_items + following, counts


def transition_prior(pairs: tuple, num_items: int, last: np.ndarray, columns: np.ndarray) -> np.ndarray:
    """[U, K] float64 log(1 + how often item `columns` [U, K] followed item `last` [U] in the counted
    sequences), from transition_pairs of N = `num_items` items; 0 for a pair never seen (and for
    NOT_RANKED columns)."""
    keys, counts = pairs
    if not len(keys):
        return np.zeros(np.shape(columns), np.float64)
    wanted = np.asarray(last, np.int64)[:, None] * num_items + np.maximum(columns, 0)  # [U, K]
    at = np.minimum(np.searchsorted(keys, wanted), len(keys) - 1)  # [U, K]
    found = (keys[at] == wanted) & (columns >= 0)  # [U, K]
    return np.log1p(np.where(found, counts[at], 0).astype(np.float64))


def last_columns(split: Split, which: str) -> np.ndarray:
    """[U_eval] the catalog column of each eval user's newest visible item when `which` is predicted."""
    users = split.eval_users()
    return split.item_columns[split.offsets[users] + split.visible_len(which)[users] - 1]


def log_popularity(split: LogSplit, which: Optional[str]) -> np.ndarray:
    """log(1 + interactions) [N] of each catalog item visible when `which` ("val", "test") is
    predicted; None: every interaction the log holds (serving after it)."""
    counts = (np.bincount(split.item_columns, minlength=len(split.item_ids)) if which is None
              else popularity_counts(split, which))
    return np.log1p(counts.astype(np.float64))


class TwoStage:
    """Two-stage evaluation of one split: the ranker re-scores the retrieval model's top-K."""

    def __init__(self, stage_one: StageOne, ranker, ranker_params, split, which: str, recipe: Recipe):
        self.stage_one = stage_one  # its users (stage_one.rows) are this evaluation's
        self.score_action = recipe.score_action
        rows = stage_one.rows
        examples = phoenix_examples(split, which, recipe.ranker_history_len, rows)
        self.logits = ranker_logits(ranker, ranker_params, split, examples, stage_one.topk,
                                    recipe.num_candidates)  # [U, K, A]
        self.retrieval = stage_one.topk_scores  # [U, K]
        self.popularity = log_popularity(split, which)[stage_one.topk]  # [U, K]
        last = last_columns(split, which) if rows is None else last_columns(split, which)[rows]  # [U]
        self.transition = transition_prior(transition_pairs(transition_table(split, which)), len(split.item_ids),
                                           last, stage_one.topk)  # [U, K]

    def evaluate(self, weight: float, temperature: float, popularity_weight: float = 0.0,
                 transition_weight: float = 0.0):
        """(metrics, re-ranked top-K columns [U, K]) with the given retrieval, popularity and transition weights."""
        scores = rerank_scores(self.logits, self.retrieval, weight, temperature, self.score_action,
                               self.popularity, popularity_weight, self.transition, transition_weight)
        ranks, reranked = two_stage_ranks(self.stage_one, scores)
        return metrics.metrics_from_ranks(ranks), reranked


def choose_rerank_weights(two_stage_val: "TwoStage", recipe: Recipe) -> tuple[float, float, float]:
    """(retrieval weight, popularity weight, transition weight): the recipe's where set, else the triple of
    RETRIEVAL_WEIGHTS x POPULARITY_WEIGHTS x TRANSITION_WEIGHTS with the best validation NDCG@10 (ties:
    the first)."""
    weights = RETRIEVAL_WEIGHTS if recipe.retrieval_weight is None else (recipe.retrieval_weight,)
    priors = POPULARITY_WEIGHTS if recipe.popularity_weight is None else (recipe.popularity_weight,)
    transitions = TRANSITION_WEIGHTS if recipe.transition_weight is None else (recipe.transition_weight,)
    triples = [(w, p, t) for w in weights for p in priors for t in transitions]
    return max(triples, key=lambda triple: two_stage_val.evaluate(triple[0], recipe.temperature, triple[1],
                                                                  triple[2])[0]["NDCG@10"])


# ---------------------------------------------------------------------------------------------
# Starting a stage's training
# ---------------------------------------------------------------------------------------------


def host_copy(tree):
    """A NumPy copy on the host of a tree of (device) arrays."""
    return jax.tree.map(np.array, jax.device_get(tree))


def with_first(first, rest):
    """The batch stream `rest` with `first` (already drawn, e.g. to initialise) put back in front."""
    yield first
    yield from rest


def resumable_stream(first, rest, make):
    """training.fit's `batch_iterator` of a stage: first_step -> the batches from that step on. Step 0
    is the stream already started (`first` drawn, `rest` to come); a later step (a resumed run) is
    `make(first_step)`, a fresh stream that draws and skips the batches before it without building
    them, so it yields exactly what the uninterrupted stream yields from there. `batches.first` is
    the first batch, for timing a step without starting the stream. No prefetch thread: building a
    batch costs a small fraction of a step (docs/recipes.md, "Where a training step's time goes")."""
    def batches(first_step: int):
        return with_first(first, rest) if first_step == 0 else make(first_step)
    batches.first = first
    return batches


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


def stage_steps(split: LogSplit, recipe: Recipe) -> tuple[int, int]:
    """(retrieval, ranker) steps of the recipe's schedules on `split`'s training part: its epochs over
    the training windows / examples."""
    windows = len(training_windows(split, recipe.history_len)[0])
    examples = len(split.target_positions("train")[0])
    return (max(1, round(recipe.retrieval_epochs * windows / recipe.retrieval_batch_size)),
            max(1, round(recipe.ranker_epochs * examples / recipe.ranker_batch_size)))


def start_retrieval(split: LogSplit, recipe: Recipe, seed: int, data_parallel=False, steps: Optional[int] = None,
                    member: int = 0, shard_tables: bool = False):
    """(trainer, state, batches, steps): the retrieval stage ready for training.fit on `split` (`batches`:
    first_step -> the batch stream from that step, resumable_stream): the
    learning-rate schedule spans `steps` (default the recipe's, stage_steps), the state is seeded by
    `seed`, the batch stream by (seed, 1). Ensemble member m > 0 (Recipe.retrieval_members) seeds
    both with m too: fold_in(PRNGKey(seed), m) and (seed, 1, m), never another seed's streams."""
    steps = stage_steps(split, recipe)[0] if steps is None else steps
    trainer = SequenceRetrievalTrainer(retrieval_config(recipe), hash_config(recipe), optimizer_config(recipe, steps),
                                       temperature=recipe.temperature, table_init_stddev=recipe.table_init_stddev,
                                       data_parallel=data_parallel, shard_tables=shard_tables)
    stream_seed = [seed, 1] if member == 0 else [seed, 1, member]

    def stream(skip=0):
        return retrieval_batches(split, recipe, trainer.hash_config, np.random.default_rng(stream_seed), skip)

    batches = stream()
    first = next(batches)
    key = jax.random.PRNGKey(seed) if member == 0 else jax.random.fold_in(jax.random.PRNGKey(seed), member)
    state = trainer.init(key, first[0])
    return trainer, state, resumable_stream(first, batches, stream), steps


def start_ranker(split: LogSplit, pool, recipe: Recipe, seed: int, retrieval_params=None, data_parallel=False,
                 steps: Optional[int] = None, member: int = 0, shard_tables: bool = False):
    """(trainer, state, batches, steps): the ranker ready for training.fit on `split` (hard negatives
    from `pool`), warm-started from `retrieval_params` if given; schedule and seeds as start_retrieval's
    (state seed + 1, stream (seed, 2); ensemble member m > 0, Recipe.ranker_members:
    fold_in(PRNGKey(seed + 1), m) and (seed, 2, m))."""
    examples = phoenix_examples(split, "train", recipe.ranker_history_len)
    steps = stage_steps(split, recipe)[1] if steps is None else steps
    trainer = training.make_ranking_trainer(ranker_config(recipe), hash_config(recipe),
                                            optimizer_config(recipe, steps), action_weights=action_weights(split),
                                            table_init_stddev=recipe.table_init_stddev, data_parallel=data_parallel,
                                            shard_tables=shard_tables,
                                            listwise_weight=recipe.ranker_listwise_weight,
                                            listwise_action=recipe.score_action)
    stream_seed = [seed, 2] if member == 0 else [seed, 2, member]

    def stream(skip=0):
        return ranker_batches(split, examples, pool, recipe, trainer.hash_config, np.random.default_rng(stream_seed),
                              skip)

    batches = stream()
    first = next(batches)
    key = jax.random.PRNGKey(seed + 1) if member == 0 else jax.random.fold_in(jax.random.PRNGKey(seed + 1), member)
    state = trainer.init(key, first[0])
    if retrieval_params is not None:
        state = trainer._place_state(state._replace(params=jax.device_put(warm_start(trainer.host_params(state.params),
                                                                                     retrieval_params))))
    return trainer, state, resumable_stream(first, batches, stream), steps
