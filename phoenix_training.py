"""Training for both Phoenix models: losses, optimiser, jitted train steps, and a fit loop.

Shape glossary
  B  batch (users)          S  history length          C  candidates per user
  D  embedding size         A  actions                 R  rows of the in-batch softmax
  M  rows of a hash table   H  hashes per id (Hi for posts)

The hash embedding tables (hashing.HashEmbeddings) and the model live in one `hk.transform`, so
one gradient step trains both. Parameters stay float32; the models compute in their fprop dtype
and every loss is computed in float32.

Large tables. A table of M rows costs M*D*4 bytes; AdamW keeps two more copies (first and
second moments), and a dense gradient would be one more: 4x, or 6 GB for three 1M x 128 tables,
with every step reading and writing all of it (~5 s per step on a 2-core CPU). By default
(`OptimizerConfig.sparse_table_updates`) the step differentiates with respect to the rows the
batch looks up only, and gathers/scatters those rows of the tables and their moments: no dense
gradient, and a step costs the same with 1M-row tables as with 1k-row ones. AdamW on tables then
acts as "lazy" Adam. `table_optimizer="rowwise_adagrad"` replaces the two moment copies by one
float per row (the DLRM/FBGEMM choice for big tables). The train step donates its state, so
parameters and optimiser state are updated in place.

Determinism: a fixed seed gives bit-identical parameters on CPU. On GPU the gradient of a table
lookup is a scatter-add with atomics; run with XLA_FLAGS=--xla_gpu_deterministic_ops=true for
bit-identical runs there (this module does not set flags: no side effects at import).
"""

import collections
import dataclasses
import fcntl
import json
import math
import os
import sys
import time
from typing import Any, Callable, Iterable, NamedTuple, Optional

import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np
import optax
import tqdm
from jax.sharding import Mesh, NamedSharding, PartitionSpec

import phoenix_checkpoint as checkpoint
from phoenix_hashing import HashEmbeddings
from recsys_model import HashConfig, PhoenixModelConfig, RecsysBatch
from recsys_retrieval_model import PhoenixRetrievalModelConfig
from phoenix_validation import (check_array, check_at_least_one, check_batch, check_binary, check_finite,
                                check_hash_range, check_number, check_range, check_values)

# A finite stand-in for -inf on masked softmax logits: exp() underflows to exactly 0, and unlike
# -inf it never produces inf - inf = NaN in a row whose entries are all masked.
MASKED_LOGIT = -1e9
# Name of the HashEmbeddings module; parameters under it are the hash tables.
TABLE_MODULE = "hash_embeddings"
# Added under the square root of row-wise Adagrad, as in FBGEMM's default.
ROWWISE_ADAGRAD_EPS = 1e-8
# Default softmax temperature of the retrieval loss. Scores are cosines in [-1, 1]; dividing by
# 0.05 spans logits over [-20, 20], enough for a sharp softmax (the common range is 0.02-0.1).
DEFAULT_TEMPERATURE = 0.05


# --------------------------------------------------------------------------- losses


def sigmoid_cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Elementwise -[y log s(x) + (1-y) log(1-s(x))] in the overflow-free form
    max(x, 0) - x*y + log(1 + exp(-|x|)), computed in float32."""
    x = logits.astype(jnp.float32)
    y = labels.astype(jnp.float32)
    return jnp.maximum(x, 0.0) - x * y + jnp.log1p(jnp.exp(-jnp.abs(x)))


def _guarded(denominator: jax.Array) -> jax.Array:
    """The denominator where positive, 1 where zero, so an all-masked batch gives loss 0, not NaN."""
    return jnp.where(denominator > 0, denominator, 1.0)


class RankingLossTerms(NamedTuple):
    loss: jax.Array  # [] weighted mean cross-entropy over unmasked labels
    per_action_loss: jax.Array  # [A] mean cross-entropy over each action's unmasked labels
    label_weight: jax.Array  # [] the loss's normaliser: sum of label weights


def check_ranking_targets(labels, label_mask, B: int, C: int, A: int) -> None:
    """Shapes [B, C, A] of labels and label_mask; on host values (not traced ones), labels finite
    in [0, 1] and masks 0/1. NaN or a label of 2 would otherwise give a silently wrong loss."""
    check_array(labels, "labels", (B, C, A), "number")
    check_range(labels, "labels", 0.0, 1.0, " (0/1 or soft labels)")
    if label_mask is not None:
        check_array(label_mask, "label_mask", (B, C, A), "number")
        check_binary(label_mask, "label_mask")


def check_action_weights(action_weights, A: int) -> None:
    """[A] weights, finite and >= 0 (a negative weight would reward the wrong predictions)."""
    weights = action_weights if hasattr(action_weights, "shape") else np.asarray(action_weights)
    check_array(weights, "action_weights", (A,), "number")
    check_range(weights, "action_weights", 0.0)


def ranking_loss_terms(logits, labels, candidate_mask, label_mask=None, action_weights=None) -> RankingLossTerms:
    """Per-action sigmoid cross-entropy of the ranker's multi-action logits (spec section 5).

    logits, labels [B, C, A]; candidate_mask [B, C] (False for padded candidates);
    label_mask [B, C, A] (optional, False/0 where a label is unknown); action_weights [A] (optional).
    Labels lie in [0, 1]: 0/1 engagements, or soft labels (e.g. smoothed), which sigmoid
    cross-entropy takes as target probabilities. Masks hold 0/1; action weights are >= 0.
    Each label's weight is candidate_mask * label_mask * action_weight; the loss is the weighted sum
    of cross-entropies divided by the sum of weights (0 if every label is masked). Masked entries
    are selected away with `where`, so their logits, even inf/NaN, reach neither loss nor gradient.
    """
    check_array(logits, "logits", (None, None, None), "float")
    B, C, A = logits.shape
    check_ranking_targets(labels, label_mask, B, C, A)
    check_array(candidate_mask, "candidate_mask", (B, C), "number")
    check_binary(candidate_mask, "candidate_mask")
    if action_weights is not None:
        check_action_weights(action_weights, A)
    mask = jnp.broadcast_to(candidate_mask[:, :, None], logits.shape).astype(jnp.float32)  # [B, C, A]
    if label_mask is not None:
        mask = mask * label_mask.astype(jnp.float32)
    keep = mask > 0  # [B, C, A]
    safe_logits = jnp.where(keep, logits.astype(jnp.float32), 0.0)
    ce = jnp.where(keep, sigmoid_cross_entropy(safe_logits, labels), 0.0)  # [B, C, A]
    action_sum = jnp.sum(ce * mask, axis=(0, 1))  # [A]
    action_count = jnp.sum(mask, axis=(0, 1))  # [A]
    weights = jnp.ones(logits.shape[-1], jnp.float32) if action_weights is None else (
        jnp.asarray(action_weights, jnp.float32))  # [A]
    total_weight = jnp.sum(weights * action_count)
    loss = jnp.sum(weights * action_sum) / _guarded(total_weight)
    return RankingLossTerms(loss, action_sum / _guarded(action_count), total_weight)


def ranking_loss(logits, labels, candidate_mask, label_mask=None, action_weights=None) -> jax.Array:
    """Scalar ranking loss; see `ranking_loss_terms` (which also gives the per-action losses)."""
    return ranking_loss_terms(logits, labels, candidate_mask, label_mask, action_weights).loss


class RetrievalLossTerms(NamedTuple):
    loss: jax.Array  # [] mean over valid rows
    accuracy: jax.Array  # [] share of valid rows whose positive outscores every in-batch negative
    num_valid: jax.Array  # [] number of valid rows


def _same_item(positive_ids: jax.Array) -> jax.Array:
    """[R] or [R, H] ids -> [R, R] bool: rows i, j hold the same item (all H ids equal)."""
    ids = positive_ids if positive_ids.ndim == 2 else positive_ids[:, None]  # [R, H]
    return jnp.all(ids[:, None, :] == ids[None, :, :], axis=-1)  # [R, R]


def check_temperature(temperature) -> None:
    """A finite scalar > 0 (0 or NaN would make every logit inf or NaN); traced values pass."""
    if isinstance(temperature, jax.core.Tracer):
        return
    value = np.asarray(temperature)
    if value.ndim:
        raise ValueError(f"temperature: expected a scalar > 0, got shape {list(value.shape)}")
    check_number(value.item(), "temperature", "> 0 and finite", lambda t: t > 0)


def check_retrieval_targets(positive_ids, log_q, valid, num_rows: int, letter: str) -> None:
    """positive_ids [R] or [R, H] ints (H >= 1), log_q [R] finite floats, valid [R] 0/1 (R = num_rows,
    called `letter` in messages); None skips a check. An [R, 0] id array would make every pair an
    accidental hit, leaving no negatives."""
    if positive_ids is not None:
        if hasattr(positive_ids, "shape") and np.ndim(positive_ids) not in (1, 2):
            raise ValueError(f"positive_ids: expected [{letter}] or [{letter}, H] item ids, got shape "
                             f"{list(np.shape(positive_ids))}")
        check_array(positive_ids, "positive_ids", (num_rows,) + (None,) * (np.ndim(positive_ids) - 1), "int")
        if np.ndim(positive_ids) == 2:
            check_at_least_one(positive_ids, "positive_ids", 1, "id per item (H >= 1)")
    if log_q is not None:
        check_array(log_q, "log_q", (num_rows,), "float")
        check_finite(log_q, "log_q", " (log sampling probabilities; an item sampled with probability 0?)")
    if valid is not None:
        check_array(valid, "valid", (num_rows,), "number")
        check_binary(valid, "valid")


def retrieval_loss_terms(user, positive, temperature, positive_ids, log_q=None, valid=None) -> RetrievalLossTerms:
    """In-batch sampled softmax for the two-tower model.

    user, positive [R, D]: row i's user and the item it engaged with; the other rows' positives
    are its negatives. logits = user @ positive.T / temperature, in float32.
    log_q [R]: log probability with which each positive was sampled into batches; it is subtracted
      from every logit of that item's column (logQ correction, Yi et al. 2019, "Sampling-bias-
      corrected neural modeling for large corpus item recommendations", eq. 3), which removes the
      popularity bias of in-batch negatives.
    positive_ids [R] (or [R, H], e.g. an item's hash values: equal iff all H equal): a column j != i
      holding the same item as row i is an accidental hit, not a negative, and is masked out.
    valid [R] bool: invalid rows add nothing to the loss, and their items are no one's negative.
    R >= 2: with one row there is no negative, and the loss would be 0 whatever the model.
    Returns the mean over valid rows of logsumexp(row) - logit(positive) (0 if none is valid).
    """
    check_array(user, "user", (None, None), "float")
    num_rows, D = user.shape
    if num_rows < 2:
        raise ValueError(f"user: expected at least 2 rows (R >= 2; a row's negatives are the other rows' "
                         f"positives), got shape {list(user.shape)}")
    check_array(positive, "positive", (num_rows, D), "float")
    if positive_ids is None:
        raise ValueError("positive_ids: expected [R] or [R, H] item ids, got None")
    check_retrieval_targets(positive_ids, log_q, valid, num_rows, "R")
    check_temperature(temperature)
    logits = jnp.einsum("id,jd->ij", user.astype(jnp.float32), positive.astype(jnp.float32))  # [R, R]
    logits = logits / temperature
    if log_q is not None:
        logits = logits - log_q.astype(jnp.float32)[None, :]
    valid = jnp.ones(num_rows, bool) if valid is None else valid.astype(bool)  # [R]
    diagonal = jnp.eye(num_rows, dtype=bool)  # [R, R]
    accidental_hit = _same_item(positive_ids) & ~diagonal  # [R, R]
    keep = (diagonal | ~accidental_hit) & valid[None, :]  # [R, R]
    logits = jnp.where(keep, logits, MASKED_LOGIT)
    positive_logit = jnp.diagonal(logits)  # [R]
    row_loss = jax.nn.logsumexp(logits, axis=1) - positive_logit  # [R]
    num_valid = jnp.sum(valid.astype(jnp.float32))
    loss = jnp.sum(jnp.where(valid, row_loss, 0.0)) / _guarded(num_valid)
    # Ties count as misses; negatives are the kept off-diagonal columns.
    best_negative = jnp.max(jnp.where(diagonal, MASKED_LOGIT, logits), axis=1)  # [R]
    correct = (positive_logit > best_negative) & valid
    accuracy = jnp.sum(correct.astype(jnp.float32)) / _guarded(num_valid)
    return RetrievalLossTerms(loss, accuracy, num_valid)


def retrieval_loss(user, positive, temperature, positive_ids, log_q=None, valid=None) -> jax.Array:
    """Scalar in-batch sampled-softmax loss; see `retrieval_loss_terms`."""
    return retrieval_loss_terms(user, positive, temperature, positive_ids, log_q, valid).loss


# --------------------------------------------------------------------------- optimiser


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
    """AdamW with global-norm clipping and a linear-warmup / cosine (or constant) schedule."""

    learning_rate: float = 1e-3  # peak; AdamW's usual safe value for small transformers
    # Linear ramp from learning_rate/warmup_steps up to the peak: Adam's first second-moment
    # estimates are noisy, and full steps on them can blow up a fresh transformer.
    warmup_steps: int = 100
    # Step at which the cosine decay reaches its floor (counted from step 0, warmup included);
    # None keeps the peak rate after warmup, for runs of unknown length.
    decay_steps: Optional[int] = None
    final_learning_rate_fraction: float = 0.1  # cosine floor as a fraction of the peak
    b1: float = 0.9  # Adam's defaults
    b2: float = 0.999
    eps: float = 1e-8
    # Decoupled weight decay on weight matrices only: norm scales are not decayed (decay would
    # pull them toward 0, not toward their identity value 1), nor are hash tables (decay applied
    # densely every step would shrink the rows of rare ids that get no gradient to balance it).
    weight_decay: float = 0.01
    clip_global_norm: Optional[float] = 1.0  # caps rare huge gradients (a bad batch); None = off
    # Optimiser of the hash tables: "adamw" (same as the rest, 2 extra copies of each table) or
    # "rowwise_adagrad" (one accumulator per row; for tables of millions of rows).
    table_optimizer: str = "adamw"
    table_learning_rate: Optional[float] = None  # None = learning_rate; scheduled like it
    # Update only the table rows the batch looks up (gradient, moments and rows gathered and
    # scattered back), so a step costs O(rows used), not O(table size): ~20x faster steps with
    # 1M-row tables. AdamW then becomes "lazy" Adam (TF LazyAdam, torch SparseAdam): rows not in
    # the batch keep their moments and do not drift on stale momentum. Row-wise Adagrad is
    # unchanged by it (a zero-gradient row gets a zero update either way). False: dense updates
    # of whole tables through optax, the reference this path is tested against.
    sparse_table_updates: bool = True

    def __post_init__(self):
        """Every field checked here: a NaN rate or b1 = 1 would otherwise train to NaN silently."""
        def field(name, expected, ok, integer=False, optional=False):
            value = getattr(self, name)
            if not (optional and value is None):
                check_number(value, f"OptimizerConfig.{name}", expected + (", or None" if optional else ""), ok,
                             integer=integer)

        positive = "a finite number > 0"
        field("learning_rate", positive, lambda v: v > 0)
        field("table_learning_rate", positive, lambda v: v > 0, optional=True)
        field("warmup_steps", "an int >= 0", lambda v: v >= 0, integer=True)
        field("decay_steps", f"an int > warmup_steps ({self.warmup_steps})",
              lambda v: v > self.warmup_steps, integer=True, optional=True)
        field("final_learning_rate_fraction", "a number in [0, 1]", lambda v: 0 <= v <= 1)
        field("b1", "a number in [0, 1)", lambda v: 0 <= v < 1)  # b = 1: bias correction divides by 0
        field("b2", "a number in [0, 1)", lambda v: 0 <= v < 1)
        field("eps", positive, lambda v: v > 0)  # eps = 0: 0/0 for a parameter with zero gradient
        field("weight_decay", "a finite number >= 0", lambda v: v >= 0)
        field("clip_global_norm", positive, lambda v: v > 0, optional=True)
        if self.table_optimizer not in ("adamw", "rowwise_adagrad"):
            raise ValueError(f"OptimizerConfig.table_optimizer: expected 'adamw' or 'rowwise_adagrad', "
                             f"got {self.table_optimizer!r}")
        if not isinstance(self.sparse_table_updates, (bool, np.bool_)):
            raise TypeError(f"OptimizerConfig.sparse_table_updates: expected a bool, "
                            f"got {type(self.sparse_table_updates).__name__} {self.sparse_table_updates!r}")


def learning_rate_schedule(config: OptimizerConfig, peak: Optional[float] = None) -> Callable:
    """step -> learning rate: peak * min(1, (step+1)/warmup) * cosine factor.

    The cosine factor is f + (1-f) * (1 + cos(pi * p)) / 2 with f the final fraction and
    p = clip((step - warmup) / (decay_steps - warmup), 0, 1); it is 1 when decay_steps is None.
    Warmup counts from step+1 so that the very first update is not wasted at rate 0.
    """
    peak = config.learning_rate if peak is None else peak

    def schedule(step):
        step = jnp.asarray(step, jnp.float32)
        warm = jnp.minimum(1.0, (step + 1.0) / config.warmup_steps) if config.warmup_steps else 1.0
        if config.decay_steps is None:
            decay = 1.0
        else:
            progress = jnp.clip((step - config.warmup_steps) / (config.decay_steps - config.warmup_steps), 0.0, 1.0)
            cosine = 0.5 * (1.0 + jnp.cos(math.pi * progress))
            floor = config.final_learning_rate_fraction
            decay = floor + (1.0 - floor) * cosine
        return peak * warm * decay

    return schedule


def _module_is_table(module_name: str) -> bool:
    return module_name == TABLE_MODULE or module_name.endswith("/" + TABLE_MODULE)


def _is_table_path(path) -> bool:
    """Haiku params are {module name: {param name: array}}; the first key is the module."""
    return _module_is_table(str(path[0].key))


def _decay_mask(params):
    """True for weight matrices outside the hash tables (see OptimizerConfig.weight_decay).
    Mapping over leaves keeps the parts optax.multi_transform masked out (no leaves) as they are."""
    return jax.tree_util.tree_map_with_path(lambda path, p: p.ndim >= 2 and not _is_table_path(path), params)


def _table_labels(params):
    return jax.tree_util.tree_map_with_path(lambda path, p: "table" if _is_table_path(path) else "dense", params)


class RowwiseAdagradState(NamedTuple):
    accumulators: Any  # per parameter [M] sum over steps of the row's mean squared gradient


def rowwise_adagrad(learning_rate) -> optax.GradientTransformation:
    """Row-wise Adagrad (the DLRM/FBGEMM embedding optimiser) for [M, D] tables:
    acc[m] += mean_d g[m, d]^2;  update[m] = -lr * g[m] / sqrt(acc[m] + eps).

    One float of state per row instead of Adam's 2*D, and a row with zero gradient gets an update
    of exactly zero. `learning_rate` is a float or a schedule (step -> rate).
    """

    def init(params):
        return (optax.ScaleByScheduleState(count=jnp.zeros([], jnp.int32)),
                RowwiseAdagradState(jax.tree.map(lambda p: jnp.zeros(p.shape[:1], jnp.float32), params)))

    def update(updates, state, params=None):
        del params
        count_state, adagrad_state = state
        rate = learning_rate(count_state.count) if callable(learning_rate) else learning_rate
        accumulators = jax.tree.map(
            lambda acc, g: acc + jnp.mean(jnp.square(g.astype(jnp.float32)), axis=tuple(range(1, g.ndim))),
            adagrad_state.accumulators, updates)
        updates = jax.tree.map(
            lambda g, acc: -rate * g / jnp.sqrt(acc + ROWWISE_ADAGRAD_EPS).reshape(acc.shape + (1,) * (g.ndim - 1)),
            updates, accumulators)
        return updates, (optax.ScaleByScheduleState(count=optax.safe_increment(count_state.count)),
                         RowwiseAdagradState(accumulators))

    return optax.GradientTransformation(init, update)


def make_optimizer(config: OptimizerConfig, dense_only: bool = False) -> optax.GradientTransformation:
    """The optax transformation described by `config`: global-norm clipping, then AdamW (and
    row-wise Adagrad on the tables if so configured), updating whole tables densely.
    `dense_only`: AdamW alone, unclipped, for the non-table parameters of the sparse path (which
    clips gradients itself, over dense and table gradients together)."""
    adamw = optax.adamw(learning_rate_schedule(config), b1=config.b1, b2=config.b2, eps=config.eps,
                        weight_decay=config.weight_decay, mask=_decay_mask)
    if dense_only:
        return adamw
    if config.table_optimizer == "adamw":
        update = adamw
    else:
        table_rate = config.learning_rate if config.table_learning_rate is None else config.table_learning_rate
        update = optax.multi_transform(
            {"dense": adamw, "table": rowwise_adagrad(learning_rate_schedule(config, table_rate))},
            _table_labels)
    if config.clip_global_norm is None:
        return update
    return optax.chain(optax.clip_by_global_norm(config.clip_global_norm), update)


# --------------------------------------------------------------------------- sparse table updates

# Which RecsysBatch fields index each HashEmbeddings table (hashing.HashEmbeddings.__call__:
# history and candidates share the post and author tables). Row = hash value; 0 is padding.
TABLE_FIELDS = {
    "user_table": ("user_hashes",),
    "post_table": ("history_post_hashes", "candidate_post_hashes"),
    "author_table": ("history_author_hashes", "candidate_author_hashes"),
}
# The HashConfig field holding each table's number of rows.
TABLE_SIZE_FIELDS = {"user_table": "user_table_size", "post_table": "post_table_size",
                     "author_table": "author_table_size"}


def split_tables(params) -> tuple[dict, dict]:
    """Haiku params -> (non-table params, {table module: {table name: [M, D]}})."""
    dense = {m: v for m, v in params.items() if not _module_is_table(m)}
    tables = {m: v for m, v in params.items() if _module_is_table(m)}
    return dense, tables


def compact_table_lookups(batch: RecsysBatch) -> tuple[RecsysBatch, dict]:
    """Renumbers each table's hashes to positions in the sorted list of the rows the batch uses.

    Returns (batch with renumbered hashes, {table name: rows [K]}), K = 1 + number of lookups
    (static). rows[0] = 0 (padding keeps position 0, so padding stays padding); then the distinct
    hash values, ascending; then 0s filling up to K. Looking up position p of `table[rows]` equals
    looking up hash rows[p] of `table`.
    """
    replaced, rows = {}, {}
    for table, fields in TABLE_FIELDS.items():
        hashes = [getattr(batch, f) for f in fields]
        flat = jnp.concatenate([jnp.zeros(1, jnp.int32)] + [h.reshape(-1).astype(jnp.int32) for h in hashes])  # [K]
        unique, inverse = jnp.unique(flat, size=flat.shape[0], fill_value=0, return_inverse=True)  # [K], [K]
        inverse = inverse.reshape(-1)[1:]
        offset = 0
        for field, h in zip(fields, hashes, strict=True):
            replaced[field] = inverse[offset:offset + h.size].reshape(h.shape).astype(jnp.int32)
            offset += h.size
        rows[table] = unique
    return batch._replace(**replaced), rows


class LazyAdamState(NamedTuple):
    mu: Any  # {module: {table: [M, D]}} first moments
    nu: Any  # second moments


def _table_optimizer_init(config: OptimizerConfig, tables):
    if config.table_optimizer == "adamw":
        zeros = jax.tree.map(jnp.zeros_like, tables)
        return LazyAdamState(zeros, jax.tree.map(jnp.zeros_like, tables))
    return RowwiseAdagradState(jax.tree.map(lambda t: jnp.zeros(t.shape[:1], jnp.float32), tables))


def sparse_table_update(config: OptimizerConfig, tables, state, rows: dict, row_grads, step):
    """Updates only `rows` (from compact_table_lookups) of each table, given gradients
    `row_grads` {module: {table: [K, D]}} for `table[rows]` (already clipped) and `step` updates
    done so far. Same arithmetic per row as the dense optax path (AdamW without decay, bias
    correction by the global step, or row-wise Adagrad). Returns (tables, state)."""
    peak = config.learning_rate if config.table_learning_rate is None else config.table_learning_rate
    rate = learning_rate_schedule(config, peak)(step)
    count = optax.safe_increment(jnp.asarray(step, jnp.int32))  # optax's count after this update
    new_tables = {m: {} for m in tables}
    new_state = jax.tree.map(lambda x: x, state)  # a copy of the containers, filled below
    for module, named in tables.items():
        for name, table in named.items():
            index = rows[name]  # [K]
            real = index != 0  # [K]: padding and fill entries are not written back
            write = jnp.where(real, index, table.shape[0])  # [K]; out of range -> dropped
            grad = row_grads[module][name]  # [K, D]

            def scatter(target, values, write=write):
                return target.at[write].set(values, mode="drop", unique_indices=True)

            if config.table_optimizer == "adamw":
                mu = config.b1 * state.mu[module][name][index] + (1 - config.b1) * grad  # [K, D]
                nu = config.b2 * state.nu[module][name][index] + (1 - config.b2) * jnp.square(grad)
                mu_hat = mu / (1 - config.b1 ** count).astype(mu.dtype)
                nu_hat = nu / (1 - config.b2 ** count).astype(nu.dtype)
                step_rows = -rate * (mu_hat / (jnp.sqrt(nu_hat) + config.eps))  # [K, D]
                new_state.mu[module][name] = scatter(state.mu[module][name], mu)
                new_state.nu[module][name] = scatter(state.nu[module][name], nu)
            else:
                acc = state.accumulators[module][name][index] + jnp.mean(jnp.square(grad), axis=1)  # [K]
                step_rows = -rate * grad / jnp.sqrt(acc + ROWWISE_ADAGRAD_EPS)[:, None]  # [K, D]
                new_state.accumulators[module][name] = scatter(state.accumulators[module][name], acc)
            new_tables[module][name] = scatter(table, table[index] + step_rows)
    return new_tables, new_state


def clip_by_global_norm(grads, max_norm: Optional[float]):
    """(grads scaled to global norm <= max_norm, the norm before); optax's formula."""
    norm = optax.tree.norm(grads)
    if max_norm is None:
        return grads, norm
    return jax.tree.map(lambda g: jnp.where(norm < max_norm, g, (g / norm.astype(g.dtype)) * max_norm), grads), norm


# --------------------------------------------------------------------------- trainers


class TrainState(NamedTuple):
    params: Any  # Haiku params: hash tables under `hash_embeddings/`, then the model's
    opt_state: Any
    step: jax.Array  # [] int32, optimiser steps taken
    rng: jax.Array  # PRNG key, split once per step (for stochastic layers; the models use none yet)
    metric_sums: dict  # running on-device sums of per-step metrics since the host last read them


def _candidate_mask(batch: RecsysBatch) -> jax.Array:
    return batch.candidate_post_hashes[:, :, 0] != 0  # [B, C]


def _data_mesh(data_parallel) -> Optional[Mesh]:
    """None for False; a 1-D "data" mesh over every device for True; a given Mesh with a "data" axis."""
    if isinstance(data_parallel, Mesh):
        if "data" not in data_parallel.axis_names or data_parallel.devices.ndim != 1:
            raise ValueError(f"data_parallel: expected a 1-D Mesh with axis 'data', got axes "
                             f"{data_parallel.axis_names}")
        return data_parallel
    if not isinstance(data_parallel, bool):
        raise TypeError(f"data_parallel: expected a bool or a jax.sharding.Mesh, got {type(data_parallel).__name__}")
    return Mesh(np.array(jax.devices()), ("data",)) if data_parallel else None


class Trainer:
    """Shared machinery: init, the jitted donated train step, on-device metric sums.

    Subclasses provide `_transformed` (hk.Transformed of HashEmbeddings + model, whose forward
    takes `(batch, table_sizes=None)`), `_loss(params, rng, batch, *args, table_sizes=None) ->
    (loss, metrics dict)`, `_metric_shapes` {name: shape}, and may override `_prepare_batch`.
    `trace_counts["step"]` counts traces of the train step (a retrace means a recompile).
    """

    _transformed: hk.Transformed
    _metric_shapes: dict

    def __init__(self, optimizer_config: Optional[OptimizerConfig], data_parallel=False):
        self.optimizer_config = config = optimizer_config or OptimizerConfig()
        self.sparse = config.sparse_table_updates
        self.optimizer = make_optimizer(config, dense_only=self.sparse)
        self._schedule = learning_rate_schedule(config)
        self.trace_counts = collections.Counter()
        self.mesh = _data_mesh(data_parallel)
        if self.mesh is None:
            self._jit_step = jax.jit(self._train_step, donate_argnums=0)
            self._jit_init = jax.jit(self._init)
        else:  # the state stays replicated on every device; XLA all-reduces the gradients
            replicated = NamedSharding(self.mesh, PartitionSpec())
            self._jit_step = jax.jit(self._train_step, donate_argnums=0, out_shardings=replicated)
            self._jit_init = jax.jit(self._init, out_shardings=replicated)

    def _place(self, *per_example):
        """Per-example inputs (batch, labels, masks, log_q, ids; None passes through) split along
        their leading axis over the data mesh; unchanged without one."""
        if self.mesh is None:
            return per_example
        n = self.mesh.size
        B = jax.tree_util.tree_leaves(per_example[0])[0].shape[0]
        if B % n:
            raise ValueError(f"batch: with data_parallel the batch size must be a multiple of the {n} devices, "
                             f"got B={B}")
        return jax.device_put(per_example, NamedSharding(self.mesh, PartitionSpec("data")))

    def _place_state(self, state: "TrainState") -> "TrainState":
        if self.mesh is None:
            return state
        return jax.device_put(state, NamedSharding(self.mesh, PartitionSpec()))

    def _loss(self, params, rng, batch, *args, table_sizes=None):
        raise NotImplementedError

    def _prepare_batch(self, batch: RecsysBatch) -> RecsysBatch:
        return batch

    def _zero_metrics(self) -> dict:
        sums = {name: jnp.zeros(shape, jnp.float32) for name, shape in self._metric_shapes.items()}
        return {**sums, "grad_norm": jnp.zeros([], jnp.float32), "learning_rate": jnp.zeros([], jnp.float32),
                "count": jnp.zeros([], jnp.float32)}

    def _init(self, rng, example_batch) -> TrainState:
        init_rng, state_rng = jax.random.split(rng)
        params = self._transformed.init(init_rng, self._prepare_batch(example_batch))
        if self.sparse:
            dense, tables = split_tables(params)
            opt_state = {"dense": self.optimizer.init(dense),
                         "tables": _table_optimizer_init(self.optimizer_config, tables)}
        else:
            opt_state = self.optimizer.init(params)
        return TrainState(params, opt_state, jnp.zeros([], jnp.int32), state_rng, self._zero_metrics())

    def init(self, rng, example_batch: RecsysBatch) -> TrainState:
        """Fresh parameters (tables and model) and optimiser state; deterministic in `rng`."""
        self._validate(example_batch)
        return self._jit_init(rng, example_batch)

    def _validate(self, batch: RecsysBatch):
        """Host-side checks before tracing: field shapes/dtypes, and values that a gather would
        silently clamp (hashes beyond a table, surfaces beyond the vocabulary). -> (B, S, C)."""
        cfg = self.model_config
        shape = check_batch(batch, self.hash_config, getattr(cfg, "num_actions", None))
        check_values(batch, None, cfg.product_surface_vocab_size)
        check_hash_range(batch, self.hash_config)
        return shape

    def _dense_update(self, state, rng, batch, args):
        """Reference path: gradients of whole tables, one optax update of everything."""
        (loss, metrics), grads = jax.value_and_grad(self._loss, has_aux=True)(state.params, rng, batch, *args)
        updates, opt_state = self.optimizer.update(grads, state.opt_state, state.params)
        return optax.apply_updates(state.params, updates), opt_state, loss, metrics, optax.tree.norm(grads)

    def _sparse_update(self, state, rng, batch, args):
        """Differentiates with respect to the looked-up rows only, then scatters the updates: the
        model runs with each table replaced by `table[rows]` (K rows; HashEmbeddings built for
        that size) and the batch's hashes renumbered to positions in `rows`, which looks up
        exactly the same embeddings."""
        config = self.optimizer_config
        compact_batch, rows = compact_table_lookups(batch)
        dense, tables = split_tables(state.params)
        table_rows = {m: {name: table[rows[name]] for name, table in named.items()}
                      for m, named in tables.items()}  # {module: {table: [K, D]}}

        table_sizes = {name: int(r.shape[0]) for name, r in rows.items()}

        def loss_fn(dense, table_rows):
            return self._loss({**dense, **table_rows}, rng, compact_batch, *args, table_sizes=table_sizes)

        (loss, metrics), grads = jax.value_and_grad(loss_fn, argnums=(0, 1), has_aux=True)(dense, table_rows)
        (dense_grads, row_grads), norm = clip_by_global_norm(grads, config.clip_global_norm)
        updates, dense_state = self.optimizer.update(dense_grads, state.opt_state["dense"], dense)
        tables, table_state = sparse_table_update(config, tables, state.opt_state["tables"], rows, row_grads,
                                                  state.step)
        params = {**optax.apply_updates(dense, updates), **tables}
        return params, {"dense": dense_state, "tables": table_state}, loss, metrics, norm

    def _train_step(self, state: TrainState, batch: RecsysBatch, *args):
        self.trace_counts["step"] += 1
        rng, step_rng = jax.random.split(state.rng)
        update = self._sparse_update if self.sparse else self._dense_update
        params, opt_state, loss, metrics, grad_norm = update(state, step_rng, self._prepare_batch(batch), args)
        metrics = {**metrics, "loss": loss, "grad_norm": grad_norm,
                   "learning_rate": jnp.asarray(self._schedule(state.step), jnp.float32)}
        sums = {name: total + (1.0 if name == "count" else metrics[name])
                for name, total in state.metric_sums.items()}
        return TrainState(params, opt_state, state.step + 1, rng, sums), metrics

    def pop_metrics(self, state: TrainState) -> tuple[TrainState, dict]:
        """Means of the metrics over the steps since the last pop, read to the host (this syncs),
        and the state with its sums reset."""
        sums = jax.device_get(state.metric_sums)
        count = float(sums.pop("count"))
        means = {name: np.asarray(value) / max(count, 1.0) for name, value in sums.items()}
        means = {name: float(v) if v.ndim == 0 else v for name, v in means.items()}
        means["steps"] = int(count)
        return state._replace(metric_sums=self._zero_metrics()), means

    def learning_rate(self, step: int) -> float:
        return float(self._schedule(step))

    # ---- checkpoints

    def _config_for_checkpoint(self) -> dict:
        # The tables' config separately: it may differ from model_config.hash_config in table sizes.
        return {"model": self.model_config, "hash_config": self.hash_config, "optimizer": self.optimizer_config}

    def save(self, path, state: TrainState, extra: Optional[dict] = None, aux=None) -> str:
        """Writes params, optimiser state, step, rng, the metric sums not yet popped and configs as a
        checkpoint (phoenix_checkpoint.py), plus the caller's JSON `extra` and `aux` arrays."""
        rng = np.asarray(jax.device_get(jax.random.key_data(state.rng) if jnp.issubdtype(
            state.rng.dtype, jax.dtypes.prng_key) else state.rng))
        # Sums are float32; tolist() gives floats that convert back to the same float32 values.
        sums = {name: np.asarray(value).tolist() for name, value in jax.device_get(state.metric_sums).items()}
        return checkpoint.save_checkpoint(
            path, state.params, state.opt_state, step=int(jax.device_get(state.step)),
            config=self._config_for_checkpoint(), aux=aux,
            extra={"rng": rng.tolist(), "trainer": type(self).__name__, "metric_sums": sums, **(extra or {})})

    def restore(self, path, example_batch: Optional[RecsysBatch] = None, like: Optional[TrainState] = None
                ) -> TrainState:
        """The TrainState saved by `save`, checked against this trainer's parameter and optimiser
        layout (a mismatch raises ValueError naming the parameter), taken from `like` (a state of
        this trainer) or else from `example_batch`. Metric sums continue from the saved ones
        (zero for checkpoints that hold none), so a resumed run logs the same means."""
        return self._load(path, example_batch, like)[0]

    def _load(self, path, example_batch=None, like=None) -> tuple[TrainState, checkpoint.Checkpoint]:
        if like is None and example_batch is None:
            raise TypeError("restore: pass example_batch (a RecsysBatch) or like (a TrainState of this trainer)")
        template = like if like is not None else jax.eval_shape(self._init, jax.random.PRNGKey(0), example_batch)
        ckpt = checkpoint.load_checkpoint(path, params_template=template.params,
                                          opt_state_template=template.opt_state,
                                          config_types=(OptimizerConfig,))
        extra = ckpt.extra or {}
        rng = extra.get("rng")
        rng = jax.random.PRNGKey(0) if rng is None else jnp.asarray(np.asarray(rng, np.uint32))
        sums = self._zero_metrics()
        saved = extra.get("metric_sums") or {}
        if set(saved) == set(sums):
            sums = {name: jnp.asarray(np.asarray(saved[name], np.float32).reshape(sums[name].shape))
                    for name in sums}
        state = TrainState(jax.device_put(ckpt.params), jax.device_put(ckpt.opt_state),
                           jnp.asarray(ckpt.step, jnp.int32), rng, sums)
        return self._place_state(state), ckpt


def _compact_hash_config(hash_config: HashConfig, table_sizes: Optional[dict]) -> HashConfig:
    """The hash config with table sizes replaced by the compact sizes of the sparse step
    ({table name: K}), so that HashEmbeddings creates (and looks up) tables of K rows."""
    if table_sizes is None:
        return hash_config
    return dataclasses.replace(hash_config, **{TABLE_SIZE_FIELDS[name]: size for name, size in table_sizes.items()})


def _check_hash_config(model_hash: HashConfig, table_hash: HashConfig) -> None:
    for field in ("num_user_hashes", "num_item_hashes", "num_author_hashes"):
        if getattr(model_hash, field) != getattr(table_hash, field):
            raise ValueError(f"hash_config.{field} ({getattr(table_hash, field)}) differs from the model "
                             f"config's ({getattr(model_hash, field)})")


class RankingTrainer(Trainer):
    """Trains HashEmbeddings + PhoenixModel with `ranking_loss`.

    step(state, batch, labels [B, C, A], label_mask=None [B, C, A]) -> (state, metrics)
    predict(params, batch) -> logits [B, C, A] float32
    evaluate(params, batch, labels, label_mask=None) -> {"loss", "per_action_loss" [A]}
    """

    def __init__(self, model_config: PhoenixModelConfig, hash_config: Optional[HashConfig] = None,
                 optimizer_config: Optional[OptimizerConfig] = None, action_weights=None,
                 table_init_stddev: Optional[float] = None, data_parallel=False):
        self.model_config = model_config.initialize()
        self.hash_config = hash_config or self.model_config.hash_config
        _check_hash_config(self.model_config.hash_config, self.hash_config)
        num_actions = self.model_config.num_actions
        self.action_weights = None if action_weights is None else np.asarray(action_weights, np.float32)
        if self.action_weights is not None:
            check_action_weights(self.action_weights, num_actions)
        table_kwargs = {} if table_init_stddev is None else {"init_stddev": table_init_stddev}

        def forward(batch, table_sizes=None):
            hash_config = _compact_hash_config(self.hash_config, table_sizes)
            embeddings = HashEmbeddings(hash_config, self.model_config.emb_size, **table_kwargs)(batch)
            return self.model_config.make()(batch, embeddings).logits  # [B, C, A]

        self._transformed = hk.transform(forward)
        self._metric_shapes = {"loss": (), "per_action_loss": (num_actions,)}
        super().__init__(optimizer_config, data_parallel)
        self._jit_predict = jax.jit(self._predict)
        self._jit_evaluate = jax.jit(self._evaluate)

    def _loss(self, params, rng, batch, labels, label_mask, table_sizes=None):
        logits = self._transformed.apply(params, rng, batch, table_sizes)  # [B, C, A]
        terms = ranking_loss_terms(logits, labels, _candidate_mask(batch), label_mask, self.action_weights)
        return terms.loss, {"per_action_loss": terms.per_action_loss}

    def _validate_with_labels(self, batch, labels, label_mask) -> None:
        B, _, C = self._validate(batch)
        check_ranking_targets(labels, label_mask, B, C, self.model_config.num_actions)

    def step(self, state: TrainState, batch: RecsysBatch, labels, label_mask=None):
        """One optimiser step. `state` is donated: use the returned one."""
        self._validate_with_labels(batch, labels, label_mask)
        return self._jit_step(state, *self._place(batch, labels, label_mask))

    def _predict(self, params, batch):
        return self._transformed.apply(params, None, batch).astype(jnp.float32)

    def predict(self, params, batch: RecsysBatch) -> jax.Array:
        """Logits [B, C, A] in float32 (sigmoid gives the action probabilities)."""
        self._validate(batch)
        return self._jit_predict(params, batch)

    def _evaluate(self, params, batch, labels, label_mask):
        logits = self._transformed.apply(params, None, batch)
        terms = ranking_loss_terms(logits, labels, _candidate_mask(batch), label_mask, self.action_weights)
        return {"loss": terms.loss, "per_action_loss": terms.per_action_loss}

    def evaluate(self, params, batch: RecsysBatch, labels, label_mask=None) -> dict:
        """Loss and per-action losses on one batch, as device arrays (no host sync of the results)."""
        self._validate_with_labels(batch, labels, label_mask)
        return self._jit_evaluate(params, batch, labels, label_mask)


def positive_slot_batch(batch: RecsysBatch) -> RecsysBatch:
    """The batch cut to candidate slot 0, which holds each user's positive in retrieval training."""
    return batch._replace(candidate_post_hashes=batch.candidate_post_hashes[:, :1],
                          candidate_author_hashes=batch.candidate_author_hashes[:, :1],
                          candidate_product_surface=batch.candidate_product_surface[:, :1])


class RetrievalTrainer(Trainer):
    """Trains HashEmbeddings + PhoenixRetrievalModel (both towers) with `retrieval_loss`.

    Each batch row is one (user, engaged item) example: the item sits in candidate slot 0 (other
    slots are ignored; C = 1 is fine). A row is valid iff its user and its positive are not padding.
    Negatives are the other rows' positives.

    step(state, batch, log_q=None [B], positive_ids=None [B] or [B, H]) -> (state, metrics)
      positive_ids default to the positive's post hashes [B, Hi] (same item iff all hashes equal).
    predict(params, batch) -> (user [B, D], candidates [B, C, D], candidate_mask [B, C]) float32
    evaluate(params, batch, log_q=None, positive_ids=None) -> {"loss", "accuracy"}
    """

    def __init__(self, model_config: PhoenixRetrievalModelConfig, hash_config: Optional[HashConfig] = None,
                 optimizer_config: Optional[OptimizerConfig] = None, temperature: float = DEFAULT_TEMPERATURE,
                 table_init_stddev: Optional[float] = None, data_parallel=False):
        self.model_config = model_config.initialize()
        self.hash_config = hash_config or self.model_config.hash_config
        _check_hash_config(self.model_config.hash_config, self.hash_config)
        check_temperature(temperature)
        self.temperature = float(temperature)
        table_kwargs = {} if table_init_stddev is None else {"init_stddev": table_init_stddev}

        def forward(batch, table_sizes=None):
            hash_config = _compact_hash_config(self.hash_config, table_sizes)
            embeddings = HashEmbeddings(hash_config, self.model_config.emb_size, **table_kwargs)(batch)
            model = self.model_config.make()
            user, _ = model.build_user_representation(batch, embeddings)  # [B, D]
            candidates, candidate_mask = model.build_candidate_representation(batch, embeddings)  # [B, C, D]
            return user.astype(jnp.float32), candidates.astype(jnp.float32), candidate_mask

        self._transformed = hk.transform(forward)
        self._metric_shapes = {"loss": (), "accuracy": ()}
        super().__init__(optimizer_config, data_parallel)
        self._jit_predict = jax.jit(self._predict)
        self._jit_evaluate = jax.jit(self._evaluate)

    def _prepare_batch(self, batch: RecsysBatch) -> RecsysBatch:
        # Before the sparse step collects looked-up rows: the ignored slots must not count as used.
        return positive_slot_batch(batch)

    def _terms(self, params, rng, batch, log_q, positive_ids, table_sizes=None) -> RetrievalLossTerms:
        """Loss terms of a batch already cut to its positive slot."""
        user, candidates, candidate_mask = self._transformed.apply(params, rng, batch, table_sizes)
        valid = (batch.user_hashes[:, 0] != 0) & candidate_mask[:, 0]  # [B]
        ids = batch.candidate_post_hashes[:, 0, :] if positive_ids is None else positive_ids  # [B, Hi] or [B]
        return retrieval_loss_terms(user, candidates[:, 0], self.temperature, ids, log_q, valid)

    def _loss(self, params, rng, batch, log_q, positive_ids, table_sizes=None):
        terms = self._terms(params, rng, batch, log_q, positive_ids, table_sizes)
        return terms.loss, {"accuracy": terms.accuracy}

    def _validate_with_targets(self, batch, log_q, positive_ids) -> None:
        B, _, _ = self._validate(batch)
        if B < 2:
            raise ValueError(f"batch.user_hashes: expected at least 2 users (B >= 2; a row's negatives are "
                             f"the other rows' positives), got shape {list(batch.user_hashes.shape)}")
        check_retrieval_targets(positive_ids, log_q, None, B, "B")

    def step(self, state: TrainState, batch: RecsysBatch, log_q=None, positive_ids=None):
        """One optimiser step. `state` is donated: use the returned one."""
        self._validate_with_targets(batch, log_q, positive_ids)
        return self._jit_step(state, *self._place(batch, log_q, positive_ids))

    def _predict(self, params, batch):
        return self._transformed.apply(params, None, batch)

    def predict(self, params, batch: RecsysBatch):
        """(user [B, D], candidates [B, C, D], candidate_mask [B, C]): unit-norm representations."""
        self._validate(batch)
        return self._jit_predict(params, batch)

    def _evaluate(self, params, batch, log_q, positive_ids):
        terms = self._terms(params, None, positive_slot_batch(batch), log_q, positive_ids)
        return {"loss": terms.loss, "accuracy": terms.accuracy}

    def evaluate(self, params, batch: RecsysBatch, log_q=None, positive_ids=None) -> dict:
        """In-batch loss and top-1 accuracy on one batch, as device arrays (no host sync of the results)."""
        self._validate_with_targets(batch, log_q, positive_ids)
        return self._jit_evaluate(params, batch, log_q, positive_ids)


def make_ranking_trainer(model_config: PhoenixModelConfig, hash_config: Optional[HashConfig] = None,
                         optimizer_config: Optional[OptimizerConfig] = None, **kwargs) -> RankingTrainer:
    """A RankingTrainer (kwargs: action_weights [A], table_init_stddev, data_parallel)."""
    return RankingTrainer(model_config, hash_config, optimizer_config, **kwargs)


def make_retrieval_trainer(model_config: PhoenixRetrievalModelConfig, hash_config: Optional[HashConfig] = None,
                           optimizer_config: Optional[OptimizerConfig] = None, **kwargs) -> RetrievalTrainer:
    """A RetrievalTrainer (kwargs: temperature, table_init_stddev, data_parallel)."""
    return RetrievalTrainer(model_config, hash_config, optimizer_config, **kwargs)


# --------------------------------------------------------------------------- fit loop


def _format_duration(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, seconds = divmod(rest, 60)
    return f"{hours}h{minutes:02d}m{seconds:02d}s" if hours else f"{minutes}m{seconds:02d}s"


def _call_step(trainer: Trainer, state: TrainState, item):
    """An iterator item is a tuple of step arguments after the state, a dict of keyword
    arguments, or a lone batch."""
    if isinstance(item, dict):
        return trainer.step(state, **item)
    if isinstance(item, tuple) and not isinstance(item, RecsysBatch):
        return trainer.step(state, *item)
    return trainer.step(state, item)


def _is_tty(stream) -> bool:
    isatty = getattr(stream, "isatty", None)
    try:
        return bool(isatty()) if callable(isatty) else False
    except ValueError:  # isatty() on a closed file
        return False


def _check_fit_args(num_steps, log_every, eval_every, eval_fn, stream) -> None:
    check_number(num_steps, "num_steps", "an int >= 0", lambda v: v >= 0, integer=True)
    check_number(log_every, "log_every", "an int >= 1", lambda v: v >= 1, integer=True)
    if eval_every is not None:
        check_number(eval_every, "eval_every", "an int >= 0 (0 or None: evaluate at the end only), or None",
                     lambda v: v >= 0, integer=True)
    if eval_fn is not None and not callable(eval_fn):
        raise TypeError(f"eval_fn: expected a callable (state -> dict) or None, got {type(eval_fn).__name__}")
    if not callable(getattr(stream, "write", None)):
        raise TypeError(f"stream: expected a text stream with .write(), got {type(stream).__name__}")


# --------------------------------------------------------------------------- resumable runs

# Step checkpoints a resumable run keeps: the newest, and older ones to fall back on should the
# newest be damaged after its save (its sha256 no longer matching).
DEFAULT_KEEP_CHECKPOINTS = 3
# The file a run holds an exclusive lock on, in its checkpoint directory, while it trains.
LOCK_FILE = ".lock"
ARRAY_TAG = "__array__"  # JSON tag of an array in a saved history
FLOAT_TAG = "__float__"  # JSON tag of nan / inf, which strict JSON has no literal for


class ResumeError(ValueError):
    """A run cannot continue from the checkpoints in its directory: they were written with another
    configuration (the message lists what differs), or they belong to an earlier run and resuming
    was not asked for."""


def _check_checkpoint_args(checkpoint_dir, checkpoint_every, keep_checkpoints, resume, batch_iterator, aux) -> None:
    check_number(checkpoint_every, "checkpoint_every", "an int >= 0 (0: save at the end only)",
                 lambda v: v >= 0, integer=True)
    check_number(keep_checkpoints, "keep_checkpoints", "an int >= 1", lambda v: v >= 1, integer=True)
    if checkpoint_dir is None:
        for name, value in (("resume", resume), ("checkpoint_every", checkpoint_every)):
            if value:
                raise ValueError(f"{name}: needs checkpoint_dir (where step checkpoints are kept), got {value!r} "
                                 f"with checkpoint_dir None")
        return
    if not callable(batch_iterator):
        raise TypeError(f"batch_iterator: a resumable run (checkpoint_dir given) needs a callable "
                        f"first_step -> iterable yielding the batches from that step on, got "
                        f"{type(batch_iterator).__name__}")
    if aux is not None and not (callable(getattr(aux, "state_dict", None))
                                and callable(getattr(aux, "load_state_dict", None))):
        raise TypeError(f"aux: expected an object with state_dict() -> {{name: array}} and "
                        f"load_state_dict(dict), got {type(aux).__name__}")


def _finite_or_text(values):
    """Nested lists with nan / inf as the strings 'nan' / 'inf' / '-inf' (numpy parses them back)."""
    if isinstance(values, list):
        return [_finite_or_text(v) for v in values]
    return repr(values) if isinstance(values, float) and not math.isfinite(values) else values


def encode_json(value):
    """Histories and results as strict JSON: arrays (numpy, JAX) tagged with their dtype, numpy
    scalars as numbers, nan / inf tagged."""
    if isinstance(value, dict):
        return {k: encode_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [encode_json(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return {FLOAT_TAG: repr(value)}
    if hasattr(value, "shape") and hasattr(value, "dtype"):
        array = np.asarray(jax.device_get(value))
        return {ARRAY_TAG: _finite_or_text(array.tolist()), "dtype": array.dtype.name}
    return value


def decode_json(value):
    """Inverse of `encode_json` (arrays come back as numpy arrays of their dtype)."""
    if isinstance(value, dict):
        if ARRAY_TAG in value:
            return np.asarray(value[ARRAY_TAG], dtype=np.dtype(value["dtype"]))
        if FLOAT_TAG in value:
            return float(value[FLOAT_TAG])
        return {k: decode_json(v) for k, v in value.items()}
    if isinstance(value, list):
        return [decode_json(v) for v in value]
    return value


def _json_normal(value):
    """`value` as it reads back from a checkpoint's JSON (configs tagged, tuples tagged, ...)."""
    return json.loads(json.dumps(checkpoint.config_to_dict(value)))


def config_differences(saved, current, where: str = "") -> list[str]:
    """'path: checkpoint X, now Y' for every value that differs between two JSON-like trees."""
    if isinstance(saved, dict) and isinstance(current, dict):
        out = []
        for key in sorted(set(saved) | set(current), key=str):
            sub = f"{where}.{key}" if where else str(key)
            if key not in saved:
                out.append(f"{sub}: absent in the checkpoint, now {current[key]!r}")
            elif key not in current:
                out.append(f"{sub}: checkpoint {saved[key]!r}, now absent")
            else:
                out.extend(config_differences(saved[key], current[key], sub))
        return out
    return [] if saved == current else [f"{where or 'value'}: checkpoint {saved!r}, now {current!r}"]


def _check_resumable(meta: dict, path: str, expected: dict) -> None:
    """Raises ResumeError listing every difference between the run a checkpoint was written by
    (configs, trainer, the caller's run config, first step) and this one."""
    extra = meta.get("extra") or {}
    saved = {"config": meta.get("config"), "trainer": extra.get("trainer"),
             "run_config": extra.get("run_config"), "run_start_step": extra.get("run_start_step")}
    problems = config_differences(saved, expected)
    if problems:
        listed = problems[:checkpoint.MAX_LISTED_PROBLEMS]
        if len(problems) > len(listed):
            listed.append(f"... and {len(problems) - len(listed)} more")
        raise ResumeError(f"{path}: cannot resume, the checkpoint was written by a run configured otherwise "
                          f"({len(problems)} difference(s)):\n  " + "\n  ".join(listed)
                          + "\nRun with the same configuration, or start afresh in another directory.")


class RunLock:
    """An exclusive lock on a run's checkpoint directory (flock on LOCK_FILE), so that two processes
    never write one run; the kernel releases it when its holder dies, even by SIGKILL."""

    def __init__(self, directory: str, notify: Callable[[str], None]):
        path = os.path.join(directory, LOCK_FILE)
        try:
            os.makedirs(directory, exist_ok=True)
            self._fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise OSError(e.errno, f"checkpoint_dir {directory}: cannot create the run lock {path} ({e.strerror}); "
                                   f"checkpoints could not be written there either") from e
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(self._fd, 32, 0).decode(errors="replace").strip() or "?"
            notify(f"{directory}: another process (pid {holder}) is training this run; waiting for it to stop")
            fcntl.flock(self._fd, fcntl.LOCK_EX)
        os.ftruncate(self._fd, 0)
        os.pwrite(self._fd, str(os.getpid()).encode(), 0)

    def release(self) -> None:
        os.close(self._fd)  # closing drops the flock


def _resume_point(trainer: Trainer, state: TrainState, checkpoint_dir: str, resume: bool, expected: dict,
                  end_step: int, aux, notify) -> Optional[tuple[TrainState, list]]:
    """The state and history of the newest readable step checkpoint in `checkpoint_dir` (None if
    there is none), after checking that it belongs to this run. A checkpoint damaged after its save
    is reported and skipped for the one before it; one of another configuration raises ResumeError."""
    found = checkpoint.list_step_checkpoints(checkpoint_dir)
    if found and not resume:
        raise ResumeError(f"checkpoint_dir {checkpoint_dir}: holds checkpoints of an earlier run (newest "
                          f"{os.path.basename(found[-1][1])}); pass resume=True (--resume) to continue it, or "
                          f"use another directory (nothing there was changed)")
    if not found:
        if resume:
            notify(f"no checkpoint in {checkpoint_dir} to resume from: starting at step {int(state.step)}")
        return None
    damaged = []
    for step, path in reversed(found):
        try:
            _check_resumable(checkpoint.read_meta(path), path, expected)
            if step > end_step:
                raise ResumeError(f"{path}: cannot resume, the checkpoint is at step {step}, past this run's "
                                  f"last step {end_step}")
            restored, ckpt = trainer._load(path, like=state)
        except checkpoint.CheckpointError as e:
            notify(f"skipping damaged checkpoint {path}: {e}")
            damaged.append(path)
            continue
        if aux is not None:
            if ckpt.aux is None:
                raise ResumeError(f"{path}: cannot resume, it holds no aux arrays and this run keeps some "
                                  f"({type(aux).__name__})")
            aux.load_state_dict(ckpt.aux)
        notify(f"resuming from {path} (step {step} of {end_step})")
        return restored, decode_json((ckpt.extra or {}).get("history") or [])
    raise checkpoint.CheckpointError(f"checkpoint_dir {checkpoint_dir}: none of its {len(found)} checkpoints "
                                     f"can be read ({', '.join(damaged)}); remove them to start afresh")


# --------------------------------------------------------------------------- fit loop


def fit(trainer: Trainer, state: TrainState, batch_iterator, num_steps: int, log_every: int = 100,
        eval_fn: Optional[Callable[[TrainState], dict]] = None, eval_every: Optional[int] = None,
        stream=None, checkpoint_dir=None, checkpoint_every: int = 0,
        keep_checkpoints: int = DEFAULT_KEEP_CHECKPOINTS, resume: bool = False, run_config=None,
        aux=None, on_log: Optional[Callable[[dict], None]] = None) -> tuple[TrainState, list[dict]]:
    """Runs `num_steps` train steps from `state`; returns the final state and the logged history.

    Items of `batch_iterator`: `(batch, labels)` / `(batch, labels, label_mask)` for the ranker,
    `batch` or `(batch, log_q)` for retrieval, or a dict of step keyword arguments. It may also be a
    callable `first_step -> iterable` of the items from that step on (required for resuming).
    The host reads metrics only every `log_every` steps (between reads the device runs ahead), then
    reports step, loss, steps/s and ETA on `stream` (default stderr): on a terminal as a tqdm bar
    (advanced once per report); elsewhere (a log file, a pipe) as one plain line per report.
    The first step's time (tracing + compilation + one step) is reported on its own line and kept
    out of steps/s. `eval_fn(state) -> dict` runs every `eval_every` steps (None or 0: at the end only).
    History entries: {"step", "loss", ..., "steps_per_s"} per log, {"step", "eval/...": ...} per eval;
    `on_log(entry)`, if given, is called with each as it is made (e.g. to append to a metrics file).

    Resumable runs (`checkpoint_dir` given). The state is saved as `checkpoint_dir/step-N` (a
    Trainer checkpoint, plus the history so far, `run_config` and `aux.state_dict()`) every
    `checkpoint_every` steps (0: only at the end) and after the last step; once a save is complete,
    all but the `keep_checkpoints` newest are deleted. With `resume`, the run continues from the newest
    readable checkpoint there: its configs (model, tables, optimiser), trainer type, `run_config`
    (JSON data describing everything else that shapes the run, e.g. data seed and batch size) and
    first step must equal this run's, else ResumeError lists the differences; the returned history
    then covers the whole run. With a data stream reproducible from the step, the result is bit for
    bit that of an uninterrupted run (on CPU). Without `resume`, checkpoints already there raise
    ResumeError. A failed save (disk full, read-only) raises OSError naming the newest checkpoint,
    which is intact. `aux`: an object with state_dict() -> {name: array} and load_state_dict(dict),
    saved and restored with the state (e.g. counters that the data stream updates).
    """
    stream = sys.stderr if stream is None else stream
    _check_fit_args(num_steps, log_every, eval_every, eval_fn, stream)
    if on_log is not None and not callable(on_log):
        raise TypeError(f"on_log: expected a callable (entry dict -> None) or None, got {type(on_log).__name__}")
    _check_checkpoint_args(checkpoint_dir, checkpoint_every, keep_checkpoints, resume, batch_iterator, aux)
    tty = _is_tty(stream)
    history: list[dict] = []
    start_step = int(jax.device_get(state.step))  # the run's first step: steps count from here
    end_step = start_step + num_steps
    window_start = None
    window_steps = 0
    done = 0
    line_open = False  # plain mode: a progress line is on the stream, not yet ended by "\n"
    bar = None  # terminal mode: a tqdm bar, advanced once per log interval (no per-step host sync)

    def write_line(text: str) -> None:
        """`text` on a line of its own (above the bar on a terminal)."""
        nonlocal line_open
        if bar is not None:
            bar.write(text, file=stream)
            return
        stream.write(("\n" if line_open else "") + text + "\n")
        line_open = False
        stream.flush()

    lock = opened = None
    if checkpoint_dir is not None:
        checkpoint_dir = os.path.abspath(os.fspath(checkpoint_dir))
        lock = RunLock(checkpoint_dir, write_line)
    try:
        restored = None
        if checkpoint_dir is not None:
            expected = _json_normal({"config": trainer._config_for_checkpoint(), "trainer": type(trainer).__name__,
                                     "run_config": run_config, "run_start_step": start_step})
            restored = _resume_point(trainer, state, checkpoint_dir, resume, expected, end_step, aux, write_line)
            if restored is not None:
                state, history = restored
                done = int(state.step) - start_step
        last_saved = None if restored is None else int(state.step)
        iterator = iter(batch_iterator(start_step + done) if callable(batch_iterator) else batch_iterator)
        if callable(batch_iterator):
            opened = iterator  # ours to close (e.g. to stop a prefetch thread)

        def log_progress(final: bool) -> None:
            nonlocal state, window_start, window_steps, line_open, bar
            state, means = trainer.pop_metrics(state)  # syncs with the device
            now = time.perf_counter()
            rate = window_steps / (now - window_start) if window_steps and now > window_start else float("nan")
            eta = (num_steps - done) / rate if math.isfinite(rate) and rate > 0 else float("nan")
            history.append({"step": start_step + done, **means, "steps_per_s": rate})
            if on_log is not None:
                on_log(history[-1])
            loss = means.get("loss", float("nan"))
            report = (f"step {start_step + done}/{end_step}  loss {loss:.4f}  "
                      f"{rate:.2f} steps/s  ETA {_format_duration(eta)}")
            if bar is not None:
                bar.set_postfix_str(f"loss {loss:.4f}", refresh=False)
                bar.update(start_step + done - bar.n)  # tqdm's own rate and ETA over the steps
                if final:
                    bar.close()
                    bar = None
            else:
                write_line(report)
            window_start, window_steps = time.perf_counter(), 0

        def run_eval() -> None:
            results = eval_fn(state)
            entry = {"step": start_step + done, **{f"eval/{k}": v for k, v in results.items()}}
            history.append(entry)
            if on_log is not None:
                on_log(entry)
            shown = "  ".join(f"{k} {float(np.mean(v)):.4f}" for k, v in results.items())
            write_line(f"eval at step {start_step + done}: {shown}")

        def save() -> None:
            nonlocal last_saved
            step = start_step + done
            path = checkpoint.step_checkpoint_path(checkpoint_dir, step)
            try:
                trainer.save(path, state, aux=None if aux is None else aux.state_dict(), extra={
                    "run_config": expected["run_config"], "run_start_step": start_step,
                    "history": encode_json(history)})
            except OSError as e:
                newest = checkpoint.list_step_checkpoints(checkpoint_dir)
                kept = newest[-1][1] if newest else "none yet"
                why = e.strerror if e.errno is not None else str(e)  # str(e) would repeat "[Errno N]"
                raise OSError(e.errno, f"checkpoint of step {step} was not written, training stopped: {why}. "
                                       f"The newest complete checkpoint, intact: {kept}") from e
            checkpoint.prune_step_checkpoints(checkpoint_dir, keep_checkpoints)
            last_saved = step

        first = True
        while done < num_steps:
            try:
                item = next(iterator)
            except StopIteration:
                write_line(f"batch iterator exhausted after {done} of {num_steps} steps")
                break
            if first:
                first_start = time.perf_counter()
                state, _ = _call_step(trainer, state, item)
                jax.block_until_ready(state.step)
                write_line(f"first step (trace + compile + run): {time.perf_counter() - first_start:.2f} s")
                window_start = time.perf_counter()
                first = False
                if tty:  # its clock starts after compilation, like steps/s
                    bar = tqdm.tqdm(total=end_step, initial=start_step + done + 1, file=stream, unit="step",
                                    dynamic_ncols=True, mininterval=0)
            else:
                state, _ = _call_step(trainer, state, item)
                window_steps += 1
            done += 1
            if done % log_every == 0 or done == num_steps:
                log_progress(final=done == num_steps)
            if eval_fn is not None and eval_every and done % eval_every == 0 and done != num_steps:
                run_eval()
            if checkpoint_dir is not None and ((checkpoint_every and done % checkpoint_every == 0)
                                               or done == num_steps):
                save()
        if done and done % log_every and done != num_steps:
            log_progress(final=True)
        if checkpoint_dir is not None and last_saved != start_step + done:
            save()  # the iterator ran out: keep what was trained
        if eval_fn is not None:
            run_eval()
    finally:
        if bar is not None:
            bar.close()
        if callable(getattr(opened, "close", None)):
            opened.close()
        if lock is not None:
            lock.release()
    return state, history
