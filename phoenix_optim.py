"""Optimiser machinery: AdamW with a warmup / cosine schedule, and sparse updates of hash tables.

Shape glossary
  M  rows of a hash table   D  embedding size
  Mb rows of one table a batch looks up: 1 + its lookups (distinct rows, then 0s)

Large tables. A table of M rows costs M*D*4 bytes; AdamW keeps two more copies (first and
second moments), and a dense gradient would be one more: 4x, or 6 GB for three 1M x 128 tables,
with every step reading and writing all of it (timings: docs/notes.md). By default
(`OptimizerConfig.sparse_table_updates`) the step differentiates with respect to the rows the
batch looks up only, and gathers/scatters those rows of the tables and their moments: no dense
gradient, and a step costs the same with 1M-row tables as with 1k-row ones. AdamW on tables then
acts as "lazy" Adam. `table_optimizer="rowwise_adagrad"` replaces the two moment copies by one
float per row (the DLRM/FBGEMM choice for big tables).
"""

import dataclasses
import math
from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax

from phoenix_inputs import TABLE_MODULE, RecsysBatch
from phoenix_validation import check_number

__all__ = [
    # the optimiser
    "OptimizerConfig", "make_optimizer", "learning_rate_schedule", "clip_by_global_norm", "rowwise_adagrad",
    "RowwiseAdagradState", "ROWWISE_ADAGRAD_EPS",
    # sparse hash-table updates
    "split_tables", "compact_table_lookups", "table_optimizer_init", "sparse_table_update", "LazyAdamState",
    "TABLE_FIELDS", "TABLE_SIZE_FIELDS",
]

# Added under the square root of row-wise Adagrad, as in FBGEMM's default.
ROWWISE_ADAGRAD_EPS = 1e-8


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
    # scattered back), so a step costs O(rows used), not O(table size) (measured with 1M-row tables:
    # docs/notes.md). AdamW then becomes "lazy" Adam (TF LazyAdam, torch SparseAdam): rows not in
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


# ---------------------------------------------------------------------------------------------
# Sparse table updates

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

    Returns (batch with renumbered hashes, {table name: rows [Mb]}), Mb = 1 + number of lookups
    (static). rows[0] = 0 (padding keeps position 0, so padding stays padding); then the distinct
    hash values, ascending; then 0s filling up to Mb. Looking up position p of `table[rows]` equals
    looking up hash rows[p] of `table`.
    """
    replaced, rows = {}, {}
    for table, fields in TABLE_FIELDS.items():
        hashes = [getattr(batch, f) for f in fields]
        flat = jnp.concatenate([jnp.zeros(1, jnp.int32)] + [h.reshape(-1).astype(jnp.int32) for h in hashes])  # [Mb]
        unique, inverse = jnp.unique(flat, size=flat.shape[0], fill_value=0, return_inverse=True)  # [Mb], [Mb]
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


def table_optimizer_init(config: OptimizerConfig, tables):
    if config.table_optimizer == "adamw":
        zeros = jax.tree.map(jnp.zeros_like, tables)
        return LazyAdamState(zeros, jax.tree.map(jnp.zeros_like, tables))
    return RowwiseAdagradState(jax.tree.map(lambda t: jnp.zeros(t.shape[:1], jnp.float32), tables))


def sparse_table_update(config: OptimizerConfig, tables, state, rows: dict, row_grads, step, shard_index=None):
    """Updates only `rows` (from compact_table_lookups) of each table, given gradients
    `row_grads` {module: {table: [Mb, D]}} for `table[rows]` (already clipped) and `step` updates
    done so far. Same arithmetic per row as the dense optax path (AdamW without decay, bias
    correction by the global step, or row-wise Adagrad). Returns (tables, state).
    `shard_index` (phoenix_sharding, inside shard_map): the tables and their state are shard i of
    row-split ones, holding rows [i * M, (i + 1) * M) with M their own rows; only those are updated."""
    peak = config.learning_rate if config.table_learning_rate is None else config.table_learning_rate
    rate = learning_rate_schedule(config, peak)(step)
    count = optax.safe_increment(jnp.asarray(step, jnp.int32))  # optax's count after this update
    new_tables = {m: {} for m in tables}
    new_state = jax.tree.map(lambda x: x, state)  # a copy of the containers, filled below
    for module, named in tables.items():
        for name, table in named.items():
            index = rows[name]  # [Mb]
            real = index != 0  # [Mb]: padding and fill entries are not written back
            if shard_index is not None:  # global rows -> this shard's; rows held elsewhere are not written
                local = index - shard_index * table.shape[0]  # [Mb]
                real = real & (local >= 0) & (local < table.shape[0])
                index = jnp.where(real, local, 0)
            write = jnp.where(real, index, table.shape[0])  # [Mb]; out of range -> dropped
            grad = row_grads[module][name]  # [Mb, D]

            def scatter(target, values, write=write):
                return target.at[write].set(values, mode="drop", unique_indices=True)

            if config.table_optimizer == "adamw":
                mu = config.b1 * state.mu[module][name][index] + (1 - config.b1) * grad  # [Mb, D]
                nu = config.b2 * state.nu[module][name][index] + (1 - config.b2) * jnp.square(grad)
                mu_hat = mu / (1 - config.b1 ** count).astype(mu.dtype)
                nu_hat = nu / (1 - config.b2 ** count).astype(nu.dtype)
                step_rows = -rate * (mu_hat / (jnp.sqrt(nu_hat) + config.eps))  # [Mb, D]
                new_state.mu[module][name] = scatter(state.mu[module][name], mu)
                new_state.nu[module][name] = scatter(state.nu[module][name], nu)
            else:
                acc = state.accumulators[module][name][index] + jnp.mean(jnp.square(grad), axis=1)  # [Mb]
                step_rows = -rate * grad / jnp.sqrt(acc + ROWWISE_ADAGRAD_EPS)[:, None]  # [Mb, D]
                new_state.accumulators[module][name] = scatter(state.accumulators[module][name], acc)
            new_tables[module][name] = scatter(table, table[index] + step_rows)
    return new_tables, new_state


def clip_by_global_norm(grads, max_norm: Optional[float]):
    """(grads scaled to global norm <= max_norm, the norm before); optax's formula."""
    norm = optax.tree.norm(grads)
    if max_norm is None:
        return grads, norm
    return jax.tree.map(lambda g: jnp.where(norm < max_norm, g, (g / norm.astype(g.dtype)) * max_norm), grads), norm
