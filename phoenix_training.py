"""Trainers for both Phoenix models (jitted, donated train steps) and the fit loop.

Shape glossary
  B  batch (users)          S  history length          C  candidates per user
  D  embedding size         A  actions                 Hi number of post hashes

A trainer's parameters are the hash embedding tables (phoenix_inputs.HashEmbeddings, under
`hash_embeddings/`) and the model's; one gradient step trains both. Parameters stay float32; the
models compute in their fprop dtype and every loss (phoenix_losses.py) is computed in float32.
The optimiser and the sparse table updates are in phoenix_optim.py; resumable runs' checkpoint
handling in phoenix_resume.py. The train step donates its state, so parameters and optimiser
state are updated in place.

Determinism: a fixed seed gives bit-identical parameters on CPU. On GPU the gradient of a table
lookup is a scatter-add with atomics; run with XLA_FLAGS=--xla_gpu_deterministic_ops=true for
bit-identical runs there (this module does not set flags: no side effects at import).
"""

import collections
import functools
import inspect
import math
import os
import sys
import time
from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax
import tqdm
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

import phoenix_checkpoint as checkpoint
import phoenix_configs as configs
import phoenix_sharded_checkpoint as sharded_checkpoint
import phoenix_sharding as sharding
from phoenix_forward import ModelForward, both_towers
from phoenix_inputs import ACTIONS, TABLE_MODULE, HashConfig, RecsysBatch
# The losses, optimiser and resume machinery are re-exported: `training.X` is the one-stop API.
from phoenix_losses import (DEFAULT_TEMPERATURE, MASKED_LOGIT, RankingLossTerms, RetrievalLossTerms,  # noqa: F401
                            check_action_weights, check_ranking_targets, check_retrieval_targets,
                            check_temperature, ranking_loss, ranking_loss_terms, retrieval_loss,
                            listwise_loss, retrieval_loss_terms, sigmoid_cross_entropy)
from phoenix_optim import (TABLE_FIELDS, TABLE_SIZE_FIELDS, LazyAdamState, OptimizerConfig,  # noqa: F401
                           RowwiseAdagradState, clip_by_global_norm, compact_table_lookups,
                           learning_rate_schedule, make_optimizer, rowwise_adagrad, sparse_table_update,
                           split_tables, table_optimizer_init)
from phoenix_resume import (DEFAULT_KEEP_CHECKPOINTS, LOCK_FILE, ResumeError, RunLock,  # noqa: F401
                            check_checkpoint_args, config_differences, decode_json, encode_json, json_normal,
                            list_step_checkpoints, prune_step_checkpoints, resume_point, run_devices,
                            step_checkpoint_path, xla_cpu_threads)
from phoenix_stop import TrainingStopped, deferred, stop_on_signals, stop_requested  # noqa: F401
from phoenix_validation import check_batch, check_number, check_values
from recsys_model import PhoenixModelConfig
from recsys_retrieval_model import PhoenixRetrievalModelConfig

__all__ = [
    # trainers and the fit loop
    "TrainState", "Trainer", "RankingTrainer", "RetrievalTrainer", "make_ranking_trainer", "make_retrieval_trainer",
    "fit", "seconds_per_step",
    # re-exported from phoenix_losses
    "DEFAULT_TEMPERATURE", "MASKED_LOGIT", "RankingLossTerms", "RetrievalLossTerms", "check_action_weights",
    "check_ranking_targets", "check_retrieval_targets", "check_temperature", "ranking_loss", "ranking_loss_terms",
    "retrieval_loss", "listwise_loss", "retrieval_loss_terms", "sigmoid_cross_entropy",
    # re-exported from phoenix_optim
    "TABLE_FIELDS", "TABLE_SIZE_FIELDS", "LazyAdamState", "OptimizerConfig", "RowwiseAdagradState",
    "clip_by_global_norm", "compact_table_lookups", "learning_rate_schedule", "make_optimizer", "rowwise_adagrad",
    "sparse_table_update", "split_tables", "table_optimizer_init",
    # re-exported from phoenix_resume (its __all__) and phoenix_stop
    "DEFAULT_KEEP_CHECKPOINTS", "LOCK_FILE", "ResumeError", "RunLock", "list_step_checkpoints",
    "prune_step_checkpoints", "run_devices", "step_checkpoint_path", "xla_cpu_threads",
    "TrainingStopped", "deferred", "stop_on_signals", "stop_requested",
]


# --------------------------------------------------------------------------- trainers


class TrainState(NamedTuple):
    params: Any  # Haiku params: hash tables under `hash_embeddings/`, then the model's
    opt_state: Any
    step: jax.Array  # [] int32, optimiser steps taken
    rng: jax.Array  # PRNG key, split once per step (for stochastic layers; the models use none yet)
    metric_sums: dict  # running on-device sums of per-step metrics since the host last read them


def _candidate_mask(batch: RecsysBatch) -> jax.Array:
    return batch.candidate_post_hashes[:, :, 0] != 0  # [B, C]


def _data_mesh(data_parallel, shard_tables: bool = False) -> Optional[Mesh]:
    """None for False; a 1-D "data" mesh over every device for True; a given Mesh with a "data" axis
    (with shard_tables, also a 2-D ("data", "table") one: phoenix_sharding)."""
    if isinstance(data_parallel, Mesh) and shard_tables:
        sharding.check_mesh(data_parallel)
        return data_parallel
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

    Subclasses provide `forward` (phoenix_forward.ModelForward: tables + model) and `_outputs(params,
    rng, batch)` (what the loss needs, by one `forward.apply`), `_loss(params, rng, batch, *args) ->
    (loss, metrics dict)`, `_metric_shapes` {name: shape}, and may override `_prepare_batch`.
    `trace_counts["step"]` counts traces of the train step (a retrace means a recompile).
    """

    forward: ModelForward
    _metric_shapes: dict

    def __init__(self, optimizer_config: Optional[OptimizerConfig], data_parallel=False, shard_tables: bool = False):
        self.optimizer_config = config = optimizer_config or OptimizerConfig()
        self.sparse = config.sparse_table_updates
        self.optimizer = make_optimizer(config, dense_only=self.sparse)
        self._schedule = learning_rate_schedule(config)
        self.trace_counts = collections.Counter()
        if not isinstance(shard_tables, (bool, np.bool_)):
            raise TypeError(f"shard_tables: expected a bool, got {type(shard_tables).__name__} {shard_tables!r}")
        if shard_tables and (data_parallel is False or data_parallel is None):
            raise ValueError("shard_tables: needs a mesh to split the tables over (data_parallel=True or a "
                             "jax.sharding.Mesh; run_train.py: --shard-tables with --data-parallel), got "
                             f"data_parallel={data_parallel!r}")
        self.mesh = _data_mesh(data_parallel, bool(shard_tables))
        # Rows of each table split over this many devices (phoenix_sharding); None: tables replicated.
        self.table_shards = sharding.table_shards(self.mesh) if shard_tables else None
        if self.table_shards is not None:  # shardings set inside the step (_constrain): they follow the state
            self._jit_step = jax.jit(self._train_step, donate_argnums=0)
            self._jit_init = jax.jit(self._init)
        elif self.mesh is None:
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
        n = int(self.mesh.shape["data"])
        B = jax.tree_util.tree_leaves(per_example[0])[0].shape[0]
        if B % n:
            raise ValueError(f"batch: with data_parallel the batch size must be a multiple of the {n} devices, "
                             f"got B={B}")
        return sharding.place_global(per_example, NamedSharding(self.mesh, PartitionSpec("data")))

    def _place_state(self, state: "TrainState") -> "TrainState":
        if self.mesh is None:
            return state
        if self.table_shards is not None:
            state = state._replace(params=sharding.pad_tables(state.params, self.hash_config, self.table_shards),
                                   opt_state=sharding.pad_tables(state.opt_state, self.hash_config, self.table_shards))
            return sharding.place_global(state, sharding.state_shardings(state, self.mesh))
        return sharding.place_global(state, NamedSharding(self.mesh, PartitionSpec()))

    def host_params(self, params):
        """A NumPy copy of `params` on the host, tables as the hash config sizes them (padding rows of
        sharded tables dropped; in a multi-process run every process gathers the shards)."""
        if self.table_shards is not None:
            params = sharding.unpad_tables(params, self.hash_config)
        if jax.process_count() > 1:
            params = multihost_utils.process_allgather(params, tiled=True)
        return jax.tree.map(np.array, jax.device_get(params))

    def _constrain(self, tree):
        """With sharded tables: table leaves row-split, the rest replicated (inside jit)."""
        if self.table_shards is None:
            return tree
        return jax.lax.with_sharding_constraint(tree, sharding.state_shardings(tree, self.mesh))

    def _gather_tables(self, params, batch: RecsysBatch):
        """(params, batch) to run the model on. With sharded tables, the batch's rows gathered from the
        shards (phoenix_sharding.gather_rows) and its hashes renumbered to them; else unchanged."""
        if self.table_shards is None:
            return params, batch
        compact_batch, rows = compact_table_lookups(batch)
        dense, tables = split_tables(params)
        return {**dense, **sharding.gather_rows(self.mesh, tables, rows)}, compact_batch

    def _jit_replicated(self, fn):
        """jit of `fn` whose outputs every process can read (replicated over a mesh with sharded tables)."""
        if self.table_shards is None:
            return jax.jit(fn)
        return jax.jit(fn, out_shardings=NamedSharding(self.mesh, PartitionSpec()))

    def _outputs(self, params, rng, batch):
        raise NotImplementedError

    def _loss(self, params, rng, batch, *args):
        raise NotImplementedError

    def _prepare_batch(self, batch: RecsysBatch) -> RecsysBatch:
        return batch

    def _zero_metrics(self) -> dict:
        sums = {name: jnp.zeros(shape, jnp.float32) for name, shape in self._metric_shapes.items()}
        return {**sums, "grad_norm": jnp.zeros([], jnp.float32), "learning_rate": jnp.zeros([], jnp.float32),
                "count": jnp.zeros([], jnp.float32)}

    def _init(self, rng, example_batch) -> TrainState:
        init_rng, state_rng = jax.random.split(rng)
        drawn = {}  # sharded tables: {name: [Mp, D] row-split}, each shard's rows drawn on its own device

        def draw_sharded(name, key, shape, dtype):  # the replicated init's values (phoenix_sharding.normal_table)
            drawn[name] = sharding.normal_table(self.mesh, key, shape[0], shape[1], self.forward.table_init_stddev)
            return jnp.zeros(shape, dtype)  # haiku's [M, D] stand-in, replaced below (unused: XLA drops it)

        params = self.forward.init(init_rng, self._prepare_batch(example_batch), call=self._outputs_call,
                                   table_init=None if self.table_shards is None else draw_sharded)
        if self.table_shards is not None:  # the tables drawn shard by shard, padded, in place of the stand-ins
            params = {**params, TABLE_MODULE: {name: drawn[name] for name in params[TABLE_MODULE]}}
        if self.sparse:
            dense, tables = split_tables(params)
            opt_state = {"dense": self.optimizer.init(dense),
                         "tables": table_optimizer_init(self.optimizer_config, tables)}
        else:
            opt_state = self.optimizer.init(params)
        if self.table_shards is not None:  # zero rows that no hash reaches: each shard holds the same count
            params = sharding.pad_tables(params, self.hash_config, self.table_shards)
            opt_state = sharding.pad_tables(opt_state, self.hash_config, self.table_shards)
        return self._constrain(TrainState(params, opt_state, jnp.zeros([], jnp.int32), state_rng,
                                          self._zero_metrics()))

    def init(self, rng, example_batch: RecsysBatch) -> TrainState:
        """Fresh parameters (tables and model) and optimiser state; deterministic in `rng`."""
        self._validate(example_batch)
        return self._jit_init(rng, example_batch)

    def _validate(self, batch: RecsysBatch):
        """Host-side checks before tracing: field shapes/dtypes, and values that a gather would
        silently clamp (hashes beyond a table, surfaces beyond the vocabulary) or the model would
        misread (actions other than 0/1). -> (B, S, C)."""
        cfg = self.model_config
        shape = check_batch(batch, self.hash_config, getattr(cfg, "num_actions", None))
        check_values(batch, None, cfg.product_surface_vocab_size, self.hash_config)
        return shape

    def _dense_update(self, state, rng, batch, args):
        """Reference path: gradients of whole tables, one optax update of everything (with sharded
        tables, each shard's gradient and update cover its own rows)."""
        def loss_fn(params):
            gathered, looked_up = self._gather_tables(params, batch)  # unchanged without sharded tables
            return self._loss(gathered, rng, looked_up, *args)

        (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
        updates, opt_state = self.optimizer.update(grads, state.opt_state, state.params)
        return optax.apply_updates(state.params, updates), opt_state, loss, metrics, optax.tree.norm(grads)

    def _sparse_update(self, state, rng, batch, args):
        """Differentiates with respect to the looked-up rows only, then scatters the updates: the
        model runs with each table replaced by `table[rows]` (K rows) and the batch's hashes
        renumbered to positions in `rows`, which looks up exactly the same embeddings (the
        forward's lookup reads each table's own shape)."""
        config = self.optimizer_config
        compact_batch, rows = compact_table_lookups(batch)
        dense, tables = split_tables(state.params)
        if self.table_shards is None:
            table_rows = {m: {name: table[rows[name]] for name, table in named.items()}
                          for m, named in tables.items()}  # {module: {table: [K, D]}}
        else:
            table_rows = sharding.gather_rows(self.mesh, tables, rows)

        def loss_fn(dense, table_rows):
            return self._loss({**dense, **table_rows}, rng, compact_batch, *args)

        (loss, metrics), grads = jax.value_and_grad(loss_fn, argnums=(0, 1), has_aux=True)(dense, table_rows)
        (dense_grads, row_grads), norm = clip_by_global_norm(grads, config.clip_global_norm)
        updates, dense_state = self.optimizer.update(dense_grads, state.opt_state["dense"], dense)
        if self.table_shards is None:
            tables, table_state = sparse_table_update(config, tables, state.opt_state["tables"], rows, row_grads,
                                                      state.step)
        else:
            tables, table_state = sharding.sparse_update(self.mesh, config, tables, state.opt_state["tables"], rows,
                                                         row_grads, state.step)
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
        return self._constrain((TrainState(params, opt_state, state.step + 1, rng, sums), metrics))

    def pop_metrics(self, state: TrainState) -> tuple[TrainState, dict]:
        """Means of the metrics over the steps since the last pop, read to the host (this syncs),
        and the state with its sums reset."""
        sums = jax.device_get(state.metric_sums)
        count = float(sums.pop("count"))
        means = {name: np.asarray(value) / max(count, 1.0) for name, value in sums.items()}
        means = {name: float(v) if v.ndim == 0 else v for name, v in means.items()}
        means["steps"] = int(count)
        zeros = self._zero_metrics()
        if self.mesh is not None:  # as the step returns them: a different placement would recompile it
            zeros = sharding.place_global(zeros, NamedSharding(self.mesh, PartitionSpec()))
        return state._replace(metric_sums=zeros), means

    def learning_rate(self, step: int) -> float:
        return float(self._schedule(step))

    # ---- checkpoints

    def _config_for_checkpoint(self) -> dict:
        # The tables' config separately: it may differ from model_config.hash_config in table sizes.
        return {"model": self.model_config, "hash_config": self.hash_config, "optimizer": self.optimizer_config}

    def save(self, path, state: TrainState, extra: Optional[dict] = None, aux=None, sharded: bool = False) -> str:
        """Writes params, optimiser state, step, rng, the metric sums not yet popped and configs as a
        checkpoint (phoenix_checkpoint.py), plus the caller's JSON `extra` and `aux` arrays. A stop signal
        arriving meanwhile takes effect once the checkpoint is complete (phoenix_stop.deferred).
        `sharded` (with sharded tables): a sharded checkpoint (phoenix_sharded_checkpoint.py), each
        process writing the table rows its devices hold, no table gathered; `load` reads either kind."""
        rng = np.asarray(jax.device_get(jax.random.key_data(state.rng) if jnp.issubdtype(
            state.rng.dtype, jax.dtypes.prng_key) else state.rng))
        # Sums are float32; tolist() gives floats that convert back to the same float32 values.
        sums = {name: np.asarray(value).tolist() for name, value in jax.device_get(state.metric_sums).items()}
        if sharded:
            if self.table_shards is None:
                raise ValueError("save: sharded=True needs sharded tables (shard_tables=True), got replicated ones")
            with deferred():
                return sharded_checkpoint.save_sharded_checkpoint(
                    path, state.params, state.opt_state, step=int(jax.device_get(state.step)),
                    config=configs.config_to_dict(self._config_for_checkpoint()), aux=aux,
                    extra={"rng": rng.tolist(), "trainer": type(self).__name__, "metric_sums": sums, **(extra or {})},
                    is_split=sharding.is_table_path, rows_of=lambda p: sharding.table_rows(p, self.hash_config))
        params, opt_state = state.params, state.opt_state
        if self.table_shards is not None:  # the replicated format: padding rows dropped
            params, opt_state = sharding.unpad_tables((params, opt_state), self.hash_config)
        if jax.process_count() > 1:  # every process takes part in the gather; the first one writes
            params, opt_state = multihost_utils.process_allgather((params, opt_state), tiled=True)
            if jax.process_index() != 0:
                multihost_utils.sync_global_devices(f"phoenix save {os.fspath(path)}")
                return os.fspath(path)
        with deferred():
            try:
                return checkpoint.save_checkpoint(
                    path, params, opt_state, step=int(jax.device_get(state.step)),
                config=configs.config_to_dict(self._config_for_checkpoint()), aux=aux,
                    extra={"rng": rng.tolist(), "trainer": type(self).__name__, "metric_sums": sums, **(extra or {})})
            finally:
                if jax.process_count() > 1:
                    multihost_utils.sync_global_devices(f"phoenix save {os.fspath(path)}")

    def restore(self, path, example_batch: Optional[RecsysBatch] = None, like: Optional[TrainState] = None
                ) -> TrainState:
        """The TrainState saved by `save`, checked against this trainer's parameter and optimiser
        layout (a mismatch raises ValueError naming the parameter), taken from `like` (a state of
        this trainer) or else from `example_batch`. Metric sums continue from the saved ones
        (zero for checkpoints that hold none), so a resumed run logs the same means."""
        return self.load(path, example_batch, like)[0]

    def load(self, path, example_batch: Optional[RecsysBatch] = None, like: Optional[TrainState] = None
             ) -> tuple[TrainState, checkpoint.Checkpoint]:
        """(the TrainState that `restore` returns, the checkpoint it came from): the checkpoint's
        config decoded by phoenix_configs ({"model", "hash_config", "optimizer"}), its `extra` and
        `aux` as saved (phoenix_resume reads a run's history and data-stream state from them)."""
        if like is None and example_batch is None:
            raise TypeError("load / restore: pass example_batch (a RecsysBatch) or like (a TrainState of this "
                            "trainer), got neither")
        template = like if like is not None else jax.eval_shape(self._init, jax.random.PRNGKey(0), example_batch)
        if sharded_checkpoint.is_sharded_checkpoint(path):  # each device's rows read from the shards holding them
            shardings = None if self.table_shards is None else {
                "params": sharding.state_shardings(template.params, self.mesh),
                "opt_state": sharding.state_shardings(template.opt_state, self.mesh)}
            if self.table_shards is None:
                template = jax.eval_shape(lambda t: sharding.unpad_tables(t, self.hash_config), template)
            ckpt = sharded_checkpoint.load_sharded_checkpoint(
                path, template.params, template.opt_state, is_split=sharding.is_table_path, shardings=shardings,
                decode_config=configs.config_from_dict)
        else:
            if self.table_shards is not None:  # checkpoints hold tables unpadded
                template = jax.eval_shape(lambda t: sharding.unpad_tables(t, self.hash_config), template)
            ckpt = checkpoint.load_checkpoint(path, params_template=template.params,
                                              opt_state_template=template.opt_state,
                                              decode_config=configs.config_from_dict)
        extra = ckpt.extra or {}
        rng = extra.get("rng")
        rng = jax.random.PRNGKey(0) if rng is None else jnp.asarray(np.asarray(rng, np.uint32))
        sums = self._zero_metrics()
        saved = extra.get("metric_sums") or {}
        if set(saved) == set(sums):
            sums = {name: jnp.asarray(np.asarray(saved[name], np.float32).reshape(sums[name].shape))
                    for name in sums}
        if ckpt.step > np.iinfo(np.int32).max:  # TrainState.step is int32
            raise checkpoint.CheckpointError(f"{path}: step {ckpt.step} does not fit a trainer's int32 step counter "
                                             f"(at most 2**31 - 1)")
        params, opt_state = ckpt.params, ckpt.opt_state
        if self.table_shards is not None:
            params, opt_state = sharding.pad_tables((params, opt_state), self.hash_config, self.table_shards)
        if self.mesh is None:
            params, opt_state = jax.device_put(params), jax.device_put(opt_state)
        state = TrainState(params, opt_state, jnp.asarray(ckpt.step, jnp.int32), rng, sums)
        return self._place_state(state), ckpt


def _check_hash_config(model_hash: HashConfig, table_hash: HashConfig) -> None:
    for field in ("num_user_hashes", "num_item_hashes", "num_author_hashes"):
        if getattr(model_hash, field) != getattr(table_hash, field):
            raise ValueError(f"hash_config.{field} ({getattr(table_hash, field)}) differs from the model "
                             f"config's ({getattr(model_hash, field)})")


class RankingTrainer(Trainer):
    """Trains HashEmbeddings + PhoenixModel with `ranking_loss` (plus, with listwise_weight > 0,
    that weight times `listwise_loss` of one action: a softmax over each user's candidates).

    step(state, batch, labels [B, C, A], label_mask=None [B, C, A]) -> (state, metrics)
    predict(params, batch) -> logits [B, C, A] float32
    evaluate(params, batch, labels, label_mask=None) -> {"loss", "per_action_loss" [A]} (pointwise only)
    """

    def __init__(self, model_config: PhoenixModelConfig, hash_config: Optional[HashConfig] = None,
                 optimizer_config: Optional[OptimizerConfig] = None, action_weights=None,
                 table_init_stddev: Optional[float] = None, data_parallel=False,
                 listwise_weight: float = 0.0, listwise_action: str = "click_score", shard_tables: bool = False):
        self.model_config = model_config.initialize()
        self.hash_config = hash_config or self.model_config.hash_config
        _check_hash_config(self.model_config.hash_config, self.hash_config)
        num_actions = self.model_config.num_actions
        self.action_weights = None if action_weights is None else np.asarray(action_weights, np.float32)
        if self.action_weights is not None:
            check_action_weights(self.action_weights, num_actions)
        check_number(listwise_weight, "listwise_weight", "a finite float >= 0", lambda v: v >= 0)
        if listwise_action not in ACTIONS[:num_actions]:
            raise ValueError(f"listwise_action: expected one of the model's {num_actions} actions "
                             f"{ACTIONS[:num_actions]}, got {listwise_action!r}")
        # loss = pointwise + listwise_weight * listwise_loss (softmax over each user's candidates) of
        # action `listwise_action`; weight 0 (default) is the pointwise loss alone.
        self.listwise_weight = float(listwise_weight)
        self.listwise_index = ACTIONS.index(listwise_action)
        self.forward = ModelForward(self.model_config, self.hash_config, table_init_stddev)
        self._metric_shapes = {"loss": (), "per_action_loss": (num_actions,)}
        super().__init__(optimizer_config, data_parallel, shard_tables)
        self._jit_predict = self._jit_replicated(self._predict)
        self._jit_evaluate = self._jit_replicated(self._evaluate)

    _outputs_call = "__call__"

    def _outputs(self, params, rng, batch):
        return self.forward.apply(params, batch, rng=rng).logits  # [B, C, A]

    def _loss(self, params, rng, batch, labels, label_mask):
        logits = self._outputs(params, rng, batch)  # [B, C, A]
        mask = _candidate_mask(batch)  # [B, C]
        terms = ranking_loss_terms(logits, labels, mask, label_mask, self.action_weights)
        loss = terms.loss
        if self.listwise_weight:
            a = self.listwise_index
            listed = mask if label_mask is None else mask & (label_mask[:, :, a] != 0)  # [B, C]
            loss = loss + self.listwise_weight * listwise_loss(logits[:, :, a], labels[:, :, a], listed)
        return loss, {"per_action_loss": terms.per_action_loss}

    def _validate_with_labels(self, batch, labels, label_mask) -> None:
        B, _, C = self._validate(batch)
        check_ranking_targets(labels, label_mask, B, C, self.model_config.num_actions)

    def step(self, state: TrainState, batch: RecsysBatch, labels, label_mask=None):
        """One optimiser step. `state` is donated: use the returned one."""
        self._validate_with_labels(batch, labels, label_mask)
        return self._jit_step(state, *self._place(batch, labels, label_mask))

    def _predict(self, params, batch):
        params, batch = self._gather_tables(params, batch)
        return self._outputs(params, None, batch).astype(jnp.float32)

    def predict(self, params, batch: RecsysBatch) -> jax.Array:
        """Logits [B, C, A] in float32 (sigmoid gives the action probabilities)."""
        self._validate(batch)
        return self._jit_predict(params, batch)

    def _evaluate(self, params, batch, labels, label_mask):
        params, batch = self._gather_tables(params, batch)
        logits = self._outputs(params, None, batch)
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
                 table_init_stddev: Optional[float] = None, data_parallel=False, shard_tables: bool = False):
        self.model_config = model_config.initialize()
        self.hash_config = hash_config or self.model_config.hash_config
        _check_hash_config(self.model_config.hash_config, self.hash_config)
        check_temperature(temperature)
        self.temperature = float(temperature)
        self.forward = ModelForward(self.model_config, self.hash_config, table_init_stddev)
        self._metric_shapes = {"loss": (), "accuracy": ()}
        super().__init__(optimizer_config, data_parallel, shard_tables)
        self._jit_predict = self._jit_replicated(self._predict)
        self._jit_evaluate = self._jit_replicated(self._evaluate)

    def _prepare_batch(self, batch: RecsysBatch) -> RecsysBatch:
        # Before the sparse step collects looked-up rows: the ignored slots must not count as used.
        return positive_slot_batch(batch)

    _outputs_call = staticmethod(both_towers)

    def _outputs(self, params, rng, batch):
        return self.forward.apply(params, batch, call=both_towers, rng=rng)

    def _terms(self, params, rng, batch, log_q, positive_ids) -> RetrievalLossTerms:
        """Loss terms of a batch already cut to its positive slot."""
        user, candidates, candidate_mask = self._outputs(params, rng, batch)
        valid = (batch.user_hashes[:, 0] != 0) & candidate_mask[:, 0]  # [B]
        ids = batch.candidate_post_hashes[:, 0, :] if positive_ids is None else positive_ids  # [B, Hi] or [B]
        return retrieval_loss_terms(user, candidates[:, 0], self.temperature, ids, log_q, valid)

    def _loss(self, params, rng, batch, log_q, positive_ids):
        terms = self._terms(params, rng, batch, log_q, positive_ids)
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
        params, batch = self._gather_tables(params, batch)
        return self._outputs(params, None, batch)

    def predict(self, params, batch: RecsysBatch):
        """(user [B, D], candidates [B, C, D], candidate_mask [B, C]): unit-norm representations."""
        self._validate(batch)
        return self._jit_predict(params, batch)

    def _evaluate(self, params, batch, log_q, positive_ids):
        params, batch = self._gather_tables(params, positive_slot_batch(batch))
        terms = self._terms(params, None, batch, log_q, positive_ids)
        return {"loss": terms.loss, "accuracy": terms.accuracy}

    def evaluate(self, params, batch: RecsysBatch, log_q=None, positive_ids=None) -> dict:
        """In-batch loss and top-1 accuracy on one batch, as device arrays (no host sync of the results)."""
        self._validate_with_targets(batch, log_q, positive_ids)
        return self._jit_evaluate(params, batch, log_q, positive_ids)


def make_ranking_trainer(model_config: PhoenixModelConfig, hash_config: Optional[HashConfig] = None,
                         optimizer_config: Optional[OptimizerConfig] = None, **kwargs) -> RankingTrainer:
    """A RankingTrainer (kwargs: action_weights [A], table_init_stddev, data_parallel, shard_tables,
    listwise_weight, listwise_action). `data_parallel`: True or a jax Mesh; `shard_tables=True` splits
    the hash tables' rows over it (phoenix_sharding)."""
    return RankingTrainer(model_config, hash_config, optimizer_config, **kwargs)


def make_retrieval_trainer(model_config: PhoenixRetrievalModelConfig, hash_config: Optional[HashConfig] = None,
                           optimizer_config: Optional[OptimizerConfig] = None, **kwargs) -> RetrievalTrainer:
    """A RetrievalTrainer (kwargs: temperature, table_init_stddev, data_parallel, shard_tables: as
    make_ranking_trainer)."""
    return RetrievalTrainer(model_config, hash_config, optimizer_config, **kwargs)


# --------------------------------------------------------------------------- fit loop


def _format_duration(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, seconds = divmod(rest, 60)
    return f"{hours}h{minutes:02d}m{seconds:02d}s" if hours else f"{minutes}m{seconds:02d}s"


def seconds_per_step(trainer: Trainer, state: TrainState, item, steps: int = 8) -> float:
    """Measured seconds per train step of `trainer` on batch `item` (a batch iterator's item): one step
    that compiles, then the median of `steps` steps timed one by one (a moment of load on a shared
    machine moves a median little), on a copy of `state` (the step donates its state: `state` itself
    is left as it was). The compiled step stays cached for training with the same shapes."""
    probe = jax.tree.map(lambda x: x.copy(), state)
    probe, _ = _step_call(trainer, probe, item)  # not fit's _call_step: these are no training steps
    jax.block_until_ready(probe.step)
    seconds = []
    for _ in range(steps):
        start = time.perf_counter()
        probe, _ = _step_call(trainer, probe, item)
        jax.block_until_ready(probe.step)
        seconds.append(time.perf_counter() - start)
    return float(np.median(seconds))


def _call_step(trainer: Trainer, state: TrainState, item):
    """One training step of fit on an iterator item (_step_call's)."""
    return _step_call(trainer, state, item)


def _step_call(trainer: Trainer, state: TrainState, item):
    """An iterator item is a tuple of step arguments after the state, a dict of keyword
    arguments, or a lone batch. Anything else, or arguments that `trainer.step` does not take,
    raises TypeError saying what an item must be, before the step runs."""
    if isinstance(item, RecsysBatch):
        args, kwargs = (item,), {}
    elif isinstance(item, dict):
        args, kwargs = (), item
    elif isinstance(item, tuple):
        args, kwargs = item, {}
    else:
        raise TypeError(_bad_item(trainer, item))
    step = trainer.step
    try:  # binds the arguments only (microseconds): a wrong item is named before anything runs
        _signature(getattr(step, "__func__", step)).bind(*((trainer,) if hasattr(step, "__func__") else ()),
                                                         state, *args, **kwargs)
    except TypeError as e:
        raise TypeError(_bad_item(trainer, item, str(e))) from None
    return step(state, *args, **kwargs)


@functools.lru_cache(maxsize=None)
def _signature(fn) -> inspect.Signature:
    return inspect.signature(fn)


def _bad_item(trainer: Trainer, item, why: Optional[str] = None) -> str:
    """What an item of fit's batch_iterator must be, for this trainer, and what `item` is."""
    name = type(trainer).__name__
    try:
        params = list(_signature(type(trainer).step).parameters.values())[2:]  # after self and state
        accepted = ", ".join(p.name if p.default is p.empty else f"{p.name}={p.default!r}" for p in params)
    except (TypeError, ValueError):
        accepted = "..."
    if isinstance(item, RecsysBatch):
        got = "a RecsysBatch alone"
    elif isinstance(item, (tuple, list, dict)):
        got = f"a {type(item).__name__} of {len(item)}"
    else:
        got = f"a {type(item).__name__}"
    return (f"batch_iterator: expected each item to be a RecsysBatch, a tuple of {name}.step's arguments "
            f"after the state ({accepted}) or a dict of them by name; got {got}" + (f" ({why})" if why else ""))


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


# --------------------------------------------------------------------------- fit loop


def fit(trainer: Trainer, state: TrainState, batch_iterator, num_steps: int, log_every: int = 100,
        eval_fn: Optional[Callable[[TrainState], dict]] = None, eval_every: Optional[int] = None,
        stream=None, checkpoint_dir=None, checkpoint_every: int = 0,
        keep_checkpoints: int = DEFAULT_KEEP_CHECKPOINTS, resume: bool = False, run_config=None,
        aux=None, on_log: Optional[Callable[[dict], None]] = None,
        should_stop: Optional[Callable[[], bool]] = None) -> tuple[TrainState, list[dict]]:
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
    Early stopping: `should_stop() -> bool`, asked before the first step and after each evaluation
    (e.g. patience on the metrics `eval_fn` saw, kept in `aux` so that a resumed run asks it the same);
    True ends the run there (saved as at its end; no further evaluation: the last one just ran).

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
    saved and restored with the state (e.g. counters that the data stream updates). The devices are
    part of a run (phoenix_resume.run_devices: platform, device count, data-parallel mesh, XLA's CPU
    thread pool): a resume on others raises ResumeError listing them. With sharded tables the step
    checkpoints are sharded ones (phoenix_sharded_checkpoint: no table gathered on one host). In a
    multi-process run every process calls `fit` alike: each writes its shards of every save, process
    0 holds the lock, writes the rest and prunes, and all resume from the same checkpoint.

    Clean stops (phoenix_stop: a command-line entry's SIGTERM / SIGINT). A stop signal takes effect
    between two steps: the step in flight (and its logging, evaluation and save) finishes, the state
    is saved as a step checkpoint when `checkpoint_dir` is given, and TrainingStopped (signal, step,
    saved path) is raised; resuming from that checkpoint loses no step.
    """
    stream = sys.stderr if stream is None else stream
    _check_fit_args(num_steps, log_every, eval_every, eval_fn, stream)
    if on_log is not None and not callable(on_log):
        raise TypeError(f"on_log: expected a callable (entry dict -> None) or None, got {type(on_log).__name__}")
    check_checkpoint_args(checkpoint_dir, checkpoint_every, keep_checkpoints, resume, batch_iterator, aux)
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
        if jax.process_index() == 0:  # a multi-process run's first process holds it for the run
            lock = RunLock(checkpoint_dir, write_line)
    try:
        restored = None
        if checkpoint_dir is not None:
            expected = json_normal({"config": trainer._config_for_checkpoint(), "trainer": type(trainer).__name__,
                                     "run_config": run_config, "run_start_step": start_step,
                                     "devices": run_devices(trainer.mesh)})
            restored = resume_point(trainer, state, checkpoint_dir, resume, expected, end_step, aux, write_line)
            if restored is not None:
                state, history = restored
                done = int(state.step) - start_step
        last_saved = None if restored is None else int(state.step)
        iterator = iter(batch_iterator(start_step + done) if callable(batch_iterator) else batch_iterator)
        if callable(batch_iterator):
            opened = iterator  # ours to close (e.g. to stop a prefetch thread)

        def log_progress(final: bool) -> None:
            nonlocal state, window_start, window_steps, bar
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
            path = step_checkpoint_path(checkpoint_dir, step)
            try:  # sharded tables: a sharded checkpoint, each process writing its devices' rows
                trainer.save(path, state, aux=None if aux is None else aux.state_dict(), extra={
                    "run_config": expected["run_config"], "run_start_step": start_step,
                    "devices": expected["devices"], "history": encode_json(history)},
                    sharded=trainer.table_shards is not None)
            except OSError as e:
                newest = list_step_checkpoints(checkpoint_dir)
                kept = newest[-1][1] if newest else "none yet"
                why = e.strerror if e.errno is not None else str(e)  # str(e) would repeat "[Errno N]"
                raise OSError(e.errno, f"checkpoint of step {step} was not written, training stopped: {why}. "
                                       f"The newest complete checkpoint, intact: {kept}") from e
            if jax.process_index() == 0:  # after the save's last barrier: every process has written
                prune_step_checkpoints(checkpoint_dir, keep_checkpoints)
            last_saved = step

        def stop() -> None:
            """A stop signal arrived (phoenix_stop): the steps taken are saved (if this run keeps
            checkpoints), then TrainingStopped ends the run. The metric sums not yet logged travel
            in the checkpoint, so a resumed run logs what an uninterrupted one would."""
            if checkpoint_dir is not None and done and last_saved != start_step + done:
                save()
            saved = None if last_saved is None else step_checkpoint_path(checkpoint_dir, last_saved)
            raise TrainingStopped(stop_requested(), start_step + done, end_step, saved)

        # From here a stop signal only marks the stop (no step, save or evaluation is cut short); it
        # is acted on before the next step, and after the last one's save and evaluation.
        with deferred():
            first = True
            early = should_stop is not None and bool(should_stop())  # a resumed run that had stopped early
            while done < num_steps and not early:
                if stop_requested() is not None:
                    stop()
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
                    early = should_stop is not None and bool(should_stop())
                    if early:
                        write_line(f"early stop at step {start_step + done} of {end_step}")
                if checkpoint_dir is not None and ((checkpoint_every and done % checkpoint_every == 0)
                                                   or done == num_steps):
                    save()
            if done and done % log_every and done != num_steps:
                log_progress(final=True)
            if checkpoint_dir is not None and last_saved != start_step + done:
                save()  # the iterator ran out or the run stopped early: keep what was trained
            if eval_fn is not None and not early:
                run_eval()
            if stop_requested() is not None:
                stop()
    finally:
        if bar is not None:
            bar.close()
        if callable(getattr(opened, "close", None)):
            opened.close()
        if lock is not None:
            lock.release()
    return state, history
