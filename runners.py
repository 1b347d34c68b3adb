"""Runners: parameter init and compiled inference for the ranker and the retrieval model.

Shape glossary
  B batch   S history length   C candidates   D embedding size   A actions   N corpus   K top-k

Unlike the release, which re-dispatched every op on every call, each runner entry point is one
`jax.jit` function: it compiles once per input shape (and top-k) and is reused afterwards.
`trace_counts` records how often each was traced, so tests can prove there is no retracing.
"""

import collections
import functools
import os
import warnings
from typing import NamedTuple, Optional

import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

import phoenix_checkpoint as checkpoint
import phoenix_configs as configs
import phoenix_sharded_checkpoint as sharded_checkpoint
import phoenix_sharding as sharding
from grok import TrainingState
# ACTIONS and the example factories are the release's names in this module.
from phoenix_forward import ModelForward, both_towers
from phoenix_inputs import TABLE_MODULE, embed
from phoenix_inputs import (ACTIONS, create_dummy_batch_from_config,  # noqa: F401
                            create_dummy_embeddings_from_config, create_example_batch, create_example_corpus)
from phoenix_inputs import RecsysBatch, RecsysEmbeddings
from recsys_model import PhoenixModelConfig, PrefixCache, resolve_compute_dtype, with_fprop_dtype
from phoenix_index import CorpusIndex, ShardedCorpusIndex
# RetrievalOutput is the model's; the release names it in this module too.
from recsys_retrieval_model import PhoenixRetrievalModelConfig, RetrievalOutput, l2_normalize, retrieve_top_k  # noqa: F401
from phoenix_validation import (INF, MAX_EXACT_POSITION, check_array, check_candidate_inputs, check_hash_range,
                                check_inputs, check_int, check_number, check_top_k, check_values, values_enabled)


class RankingOutput(NamedTuple):
    """Ranking result: probabilities [B, C, A], candidates best-first [B, C], one [B, C] per action.

    A `p_<action>` field is None when the model predicts fewer actions than ACTIONS lists.
    """

    scores: jax.Array  # [B, C, A] sigmoid probabilities
    ranked_indices: jax.Array  # [B, C] by the first action's probability, padded candidates last
    p_favorite_score: Optional[jax.Array] = None
    p_reply_score: Optional[jax.Array] = None
    p_repost_score: Optional[jax.Array] = None
    p_photo_expand_score: Optional[jax.Array] = None
    p_click_score: Optional[jax.Array] = None
    p_profile_click_score: Optional[jax.Array] = None
    p_vqv_score: Optional[jax.Array] = None
    p_share_score: Optional[jax.Array] = None
    p_share_via_dm_score: Optional[jax.Array] = None
    p_share_via_copy_link_score: Optional[jax.Array] = None
    p_dwell_score: Optional[jax.Array] = None
    p_quote_score: Optional[jax.Array] = None
    p_quoted_click_score: Optional[jax.Array] = None
    p_follow_author_score: Optional[jax.Array] = None
    p_not_interested_score: Optional[jax.Array] = None
    p_block_author_score: Optional[jax.Array] = None
    p_mute_author_score: Optional[jax.Array] = None
    p_report_score: Optional[jax.Array] = None
    p_dwell_time: Optional[jax.Array] = None


# RecsysInferenceRunner.rank compiles the parameters in as constants up to this size (_frozen_rank).
FREEZE_PARAMS_MAX_BYTES = 64 * 2**20
# XLA CPU options the ranker's compiled functions use (rank, encode_prefix, score_candidates):
# YNNPACK keeps the reductions (the norms' sums) and leaves the matmuls to XLA's own dot kernels,
# which run this model's many mid-sized matmuls faster (measured: docs/speed.md, "How the fast
# ranking path is built"). Same arithmetic: float32 dots,
# summed in another order (1e-6 apart). Used only on the CPU backend and only where this jaxlib
# accepts them (`ranker_compiler_options`); set to {} to compile with XLA's defaults.
CPU_RANK_COMPILER_OPTIONS = {"xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_REDUCE"}


def ranker_compiler_options(backend: Optional[str] = None) -> dict:
    """CPU_RANK_COMPILER_OPTIONS on the CPU backend where this jaxlib accepts them, else {}.

    Accepted means a one-line function compiles with them (checked once per backend and option
    set): an XLA that does not know an option or one of its values raises at compile time, and
    the ranker then compiles with XLA's defaults instead of failing.
    """
    backend = backend or jax.default_backend()
    if backend != "cpu" or not CPU_RANK_COMPILER_OPTIONS:
        return {}
    return dict(_accepted_options(backend, tuple(sorted(CPU_RANK_COMPILER_OPTIONS.items()))))


@functools.lru_cache(maxsize=None)
def _accepted_options(backend: str, options: tuple) -> tuple:
    try:
        x = jax.device_put(np.zeros(2, np.float32), jax.local_devices(backend=backend)[0])
        jax.jit(lambda x: x + 1).lower(x).compile(compiler_options=dict(options))
    except jax.errors.JaxRuntimeError as error:
        warnings.warn(f"runners: XLA refused the ranker's compiler options {dict(options)} ({error}); "
                      "compiling with its defaults")
        return ()
    return options


# The kind of model a checkpoint holds, by the class of the model config saved in it.
MODEL_KINDS = {"PhoenixModelConfig": "ranker", "PhoenixRetrievalModelConfig": "retrieval"}
# Each kind's model, as error messages name it, and the runner that serves it.
_RUNNER_OF_KIND = {"ranker": ("ranking", "RecsysInferenceRunner"),
                   "retrieval": ("retrieval", "RecsysRetrievalInferenceRunner")}


class CheckpointInfo(NamedTuple):
    """What `describe_checkpoint` returns."""

    kind: Optional[str]  # "ranker", "retrieval", or None when no model config was saved
    model_config_type: Optional[str]  # e.g. "PhoenixModelConfig"
    step: int
    format_version: int
    save_id: Optional[str]  # None for version-1 checkpoints


def _meta_dir(path) -> str:
    """The directory holding a checkpoint's meta.json: `path`, or a sharded checkpoint's dense part."""
    if sharded_checkpoint.is_sharded_checkpoint(path):
        return os.path.join(os.fspath(path), sharded_checkpoint.DENSE_DIR)
    return path


def describe_checkpoint(path) -> CheckpointInfo:
    """The kind of model a checkpoint holds (from the type of its saved config, or of the config's
    "model" entry as a Trainer saves it), with its step and save id.

    Reads meta.json's JSON only, before any model is built: a ranker checkpoint given to the
    retrieval runner (or back) would otherwise fail deep inside Haiku. A sharded checkpoint's is in
    its dense part.
    """
    meta = checkpoint.read_meta(_meta_dir(path))
    config = meta.get("config")
    if isinstance(config, dict) and configs.TYPE_TAG not in config:  # a trainer's {"model": ..., ...}
        config = config.get("model")
    type_name = config.get(configs.TYPE_TAG) if isinstance(config, dict) else None
    return CheckpointInfo(kind=MODEL_KINDS.get(type_name), model_config_type=type_name, step=meta["step"],
                          format_version=meta["format_version"], save_id=meta.get("save_id"))


def _check_checkpoint_kind(path, want: type) -> None:
    """Raises CheckpointError unless the checkpoint at `path` holds a `want` model config (or none)."""
    saved = describe_checkpoint(path).model_config_type
    if saved is None or saved == want.__name__:
        return
    if saved in MODEL_KINDS:
        kind, runner = _RUNNER_OF_KIND[MODEL_KINDS[saved]]
        raise checkpoint.CheckpointError(
            f"{path}: holds a {kind} model checkpoint ({saved}); load it with {runner}.from_checkpoint "
            f"(this runner needs a {want.__name__})")
    raise checkpoint.CheckpointError(f"{path}: holds a {saved} config, expected a {want.__name__}")


def _check_model_config(model, want: type):
    if not isinstance(model, want):
        other = _RUNNER_OF_KIND.get(MODEL_KINDS.get(type(model).__name__))
        hint = f"; a {other[0]} config goes to {other[1]}" if other else ""
        raise TypeError(f"model: expected a {want.__name__}, got {type(model).__name__}{hint}")
    return model


# ---------------------------------------------------------------------------------------------
# Model runners: build the transformed forward function and its parameters.


class BaseModelRunner:
    """Holds a model config, builds `self.forward` (an hk.Transformed) and initialises parameters.

    With `checkpoint_path` (a directory written by phoenix_checkpoint.py / a training.Trainer),
    `load_or_init` loads the model's parameters from it instead of initialising them, checking
    every parameter's path, shape and dtype against the model (a mismatch names the parameter and
    the file; a checkpoint of the other model kind is refused before anything is built). Hash tables saved beside the model (`hash_embeddings/*`) are loaded into
    `self.hash_tables`, so inference runners can embed raw batches themselves: whole on the host, or,
    with `table_mesh` set (an inference runner's `shard_tables`), split by rows over the mesh's table
    axis (phoenix_sharding; each device reads its own rows from a sharded checkpoint's shards).
    Regular and sharded checkpoints (phoenix_sharded_checkpoint) load either way.
    """

    CONFIG: type  # the model config class this runner builds

    def __init__(self, bs_per_device: float = 2.0, rng_seed: int = 42, checkpoint_path: Optional[str] = None):
        check_number(bs_per_device, "bs_per_device", "a finite number > 0", lambda v: v > 0)
        # jax.random.PRNGKey takes an int64 seed.
        check_number(rng_seed, "rng_seed", "an int in [-2**63, 2**63)", lambda v: -2**63 <= v < 2**63, integer=True)
        if checkpoint_path is not None and not isinstance(checkpoint_path, (str, os.PathLike)):
            raise TypeError(f"checkpoint_path: expected a checkpoint directory's path (str or os.PathLike) or None, "
                            f"got {type(checkpoint_path).__name__} {checkpoint_path!r}")
        self.bs_per_device = bs_per_device
        self.rng_seed = rng_seed
        self.checkpoint_path = checkpoint_path
        self.hash_tables = None
        self.table_mesh: Optional[Mesh] = None  # set: tables split by rows over it, padded (phoenix_sharding)

    def _load_or_init(self, init_fn) -> TrainingState:
        """init_fn() -> TrainingState; its shapes are the template a checkpoint must match."""
        if self.checkpoint_path is None:
            return init_fn()
        _check_checkpoint_kind(self.checkpoint_path, type(self.model))
        template = jax.eval_shape(lambda: init_fn().params)
        cfg = self.model
        D, hc = cfg.emb_size, cfg.hash_config
        tables = {"hash_embeddings": {
            name: jax.ShapeDtypeStruct((size, D), jnp.float32)
            for name, size in (("user_table", hc.user_table_size), ("post_table", hc.post_table_size),
                               ("author_table", hc.author_table_size))}}
        meta = checkpoint.read_meta(_meta_dir(self.checkpoint_path))
        has_tables = any(p.startswith("hash_embeddings/") for p in meta["params"])
        if sharded_checkpoint.is_sharded_checkpoint(self.checkpoint_path):
            if self.table_mesh is not None:  # each device's rows, padded, read from the shards holding them
                shards = sharding.table_shards(self.table_mesh)
                tables = jax.tree.map(lambda t: jax.ShapeDtypeStruct((sharding.padded_rows(t.shape[0], shards),
                                                                      t.shape[1]), t.dtype), tables)
            full = {**template, **tables}
            ckpt = sharded_checkpoint.load_sharded_checkpoint(
                self.checkpoint_path, full, is_split=sharding.is_table_path, ignore_unexpected=True,
                shardings=None if self.table_mesh is None else
                {"params": sharding.state_shardings(full, self.table_mesh), "opt_state": None})
        else:
            ckpt = checkpoint.load_checkpoint(self.checkpoint_path, params_template={**template, **tables}
                                              if has_tables else template, ignore_unexpected=True)
        params = dict(ckpt.params)
        if has_tables:
            self.hash_tables = {"hash_embeddings": params.pop("hash_embeddings")}
            if self.table_mesh is not None and not isinstance(jax.tree.leaves(self.hash_tables)[0], jax.Array):
                shards = sharding.table_shards(self.table_mesh)  # a regular checkpoint: whole tables, split here
                padded = sharding.pad_tables(jax.tree.map(np.asarray, self.hash_tables), hc, shards)
                self.hash_tables = sharding.place_global(padded, sharding.state_shardings(padded, self.table_mesh))
        return TrainingState(params=params)

    def initialize(self):
        self.model.initialize()
        self.batch_size = max(1, int(self.bs_per_device * jax.local_device_count()))
        self.forward = self.make_forward_fn()

    def make_forward_fn(self) -> hk.Transformed:
        """forward.apply(params, rng, batch, emb, call="__call__", **kw): the model of phoenix_forward
        (the ranker's __call__ -> RecsysModelOutput; any model method by name, or a function)."""
        return ModelForward(self.model).transformed


class _ConfiguredModelRunner(BaseModelRunner):
    """A model runner built from a model config of class CONFIG (refused otherwise, naming the right runner)."""

    def __init__(self, model, bs_per_device: float = 2.0, rng_seed: int = 42, checkpoint_path: Optional[str] = None):
        super().__init__(bs_per_device, rng_seed, checkpoint_path)
        self.model = _check_model_config(model, self.CONFIG)


class ModelRunner(_ConfiguredModelRunner):
    """Ranking model runner: `forward(batch, recsys_embeddings) -> RecsysModelOutput`."""

    CONFIG = PhoenixModelConfig

    def init(self, rng, data: RecsysBatch, embeddings: RecsysEmbeddings) -> TrainingState:
        # Jitted: eager init re-dispatches every initializer op (several times slower: docs/speed.md).
        return TrainingState(params=jax.jit(self.forward.init)(rng, data, embeddings))

    def load_or_init(self, init_data: RecsysBatch, init_embeddings: RecsysEmbeddings) -> TrainingState:
        return self._load_or_init(lambda: self.init(jax.random.PRNGKey(self.rng_seed), init_data, init_embeddings))


class RetrievalModelRunner(_ConfiguredModelRunner):
    """Retrieval runner: its forward also runs the candidate tower, so init creates its params."""

    CONFIG = PhoenixRetrievalModelConfig

    def init(self, rng, data, embeddings, corpus_embeddings=None, top_k=None) -> TrainingState:
        """Both towers' parameters (the corpus arguments, kept for the release's signature, are not
        needed: the parameters do not depend on them)."""
        init = jax.jit(lambda rng, b, e: self.forward.init(rng, b, e, both_towers))
        return TrainingState(params=init(rng, data, embeddings))

    def load_or_init(self, init_data, init_embeddings, corpus_embeddings, top_k) -> TrainingState:
        return self._load_or_init(lambda: self.init(jax.random.PRNGKey(self.rng_seed), init_data, init_embeddings,
                                                    corpus_embeddings, top_k))


# ---------------------------------------------------------------------------------------------
# Inference runners: compiled entry points.


class BaseInferenceRunner:
    """Shared machinery: traced-count jit, input checks, and optional data parallelism.

    With `data_parallel=True` and several local devices, parameters are replicated and every
    batch is split along B over a 1-D device mesh ("data"); the same compiled functions then run
    on all devices (XLA partitions them). B must then be a multiple of the device count.
    Multi-host: call `jax.distributed.initialize()` first; each host feeds its own slice of users.

    With `shard_tables=True` the hash tables loaded from a checkpoint are split by rows over the
    devices (the data mesh, or one of every device without data parallelism): each device holds 1/n of
    every table, and `embed` looks rows up in `shard_map` (phoenix_sharding.sharded_embed: each device
    its own rows, a psum adds them), then the model runs as without it. docs/sharding.md, "Serving".
    """

    MODEL_RUNNER: type = BaseModelRunner  # the model runner (and so the config) this runner drives

    def __init__(self, runner: BaseModelRunner, name: str = "phoenix", data_parallel: bool = False,
                 shard_tables: bool = False):
        if not isinstance(runner, self.MODEL_RUNNER):
            raise TypeError(f"runner: expected a {self.MODEL_RUNNER.__name__} for {type(self).__name__}, "
                            f"got {type(runner).__name__}")
        if not isinstance(name, str):
            raise TypeError(f"name: expected a str, got {type(name).__name__} {name!r}")
        _check_bool(data_parallel, "data_parallel")
        _check_bool(shard_tables, "shard_tables")
        self.runner = runner
        self.name = name
        self.trace_counts = collections.Counter()  # entry point -> number of traces (compiles)
        self._initialized = False  # set by initialize(); the entry points need its compiled functions
        # Auto axes: XLA partitions the unchanged model code (explicit axes would need per-op shardings).
        self.mesh = (jax.make_mesh((jax.device_count(),), ("data",), axis_types=(AxisType.Auto,))
                     if data_parallel else None)
        # The tables' rows split over this mesh's axis ("data": phoenix_sharding.table_axis); None: whole.
        self.table_mesh = None
        if shard_tables:
            self.table_mesh = self.mesh or jax.make_mesh((jax.device_count(),), ("data",),
                                                         axis_types=(AxisType.Auto,))
            runner.table_mesh = self.table_mesh

    @classmethod
    def from_checkpoint(cls, path: str, name: Optional[str] = None, **kwargs):
        """An initialised runner whose config, parameters and hash tables come from a checkpoint.

        A checkpoint of the other model kind (a ranker's for the retrieval runner, or back) raises
        CheckpointError naming the runner that loads it.
        """
        _check_checkpoint_kind(path, cls.MODEL_RUNNER.CONFIG)
        config = configs.load_checkpoint_config(_meta_dir(path))
        model_config = config.get("model") if isinstance(config, dict) else config
        if not isinstance(model_config, cls.MODEL_RUNNER.CONFIG):
            raise checkpoint.CheckpointError(f"{path}: holds no {cls.MODEL_RUNNER.CONFIG.__name__} config")
        if isinstance(config, dict) and config.get("hash_config") is not None:
            model_config.hash_config = config["hash_config"]  # the tables' sizes, as trained
        model_runner = cls.MODEL_RUNNER(model_config, checkpoint_path=path)
        runner = cls(model_runner, name=name or os.path.basename(os.path.normpath(path)), **kwargs)
        runner.initialize()
        return runner

    def _init_embedder(self):
        if self.table_mesh is None:
            self._embed = self._jit("embed", lambda tables, b: embed(tables[TABLE_MODULE], b))
        else:
            mesh = self.table_mesh
            self._embed = self._jit("embed", lambda tables, b: sharding.sharded_embed(mesh, tables[TABLE_MODULE], b))
        self._initialized = True  # the last step of every initialize()

    def _require_initialized(self, method: str) -> None:
        if not self._initialized:
            raise RuntimeError(f"{type(self).__name__} {self.name!r}: call initialize() first "
                               f"(before {method}(); from_checkpoint returns an initialised runner)")

    def embed(self, batch: RecsysBatch) -> RecsysEmbeddings:
        """Looks the batch's hashes up in the hash tables loaded from the checkpoint."""
        self._require_initialized("embed")
        if self.runner.hash_tables is None:
            raise ValueError("recsys_embeddings: not given, and this runner has no hash tables "
                             "(load a checkpoint saved by a training.Trainer, or pass embeddings)")
        check_hash_range(batch, self.runner.model.hash_config)
        return self._embed(self.runner.hash_tables, batch)

    def _embedded(self, batch, recsys_embeddings):
        return self.embed(batch) if recsys_embeddings is None else recsys_embeddings

    def _replicate(self, tree):
        if self.mesh is None:
            return tree
        return jax.device_put(tree, NamedSharding(self.mesh, PartitionSpec()))

    def _shard(self, *trees):
        """Places inputs split along their leading (batch) axis over the mesh."""
        if self.mesh is None:
            return trees if len(trees) > 1 else trees[0]
        n = self.mesh.size
        B = jax.tree_util.tree_leaves(trees[0])[0].shape[0]
        if B % n:
            raise ValueError(f"batch: with data_parallel=True the batch size must be a multiple of the "
                             f"{n} devices, got B={B}; pad with all-padding users (hash 0)")
        placed = jax.device_put(trees, NamedSharding(self.mesh, PartitionSpec("data")))
        return placed if len(trees) > 1 else placed[0]

    def _jit(self, name: str, fn, **jit_kwargs):
        """jax.jit of fn that counts its traces under `name`."""
        def traced(*args, **kwargs):
            self.trace_counts[name] += 1
            return fn(*args, **kwargs)
        return jax.jit(traced, **jit_kwargs)

    def _check(self, batch, recsys_embeddings, need_candidates=True):
        cfg = self.runner.model
        if not isinstance(batch, RecsysBatch):
            raise TypeError(f"batch: expected a RecsysBatch, got {type(batch).__name__}")
        if not isinstance(recsys_embeddings, RecsysEmbeddings):
            raise TypeError(f"recsys_embeddings: expected RecsysEmbeddings, got {type(recsys_embeddings).__name__}")
        check_inputs(batch, recsys_embeddings, cfg.hash_config, cfg.emb_size, getattr(cfg, "num_actions", None),
                     need_candidates=need_candidates)
        self._check_values(batch, recsys_embeddings)

    def _check_values(self, batch, recsys_embeddings):
        """Value checks (phoenix_validation.check_values): hashes against this model's tables on
        every path, given embeddings or not, surfaces, 0/1 actions, finite embeddings."""
        cfg = self.runner.model
        check_values(batch, recsys_embeddings, cfg.product_surface_vocab_size, cfg.hash_config)


def _check_bool(value, name: str) -> None:
    """A flag must be a bool: "no" or 0.5 would be read as True or False silently."""
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name}: expected a bool, got {type(value).__name__} {value!r}")


def _check_candidate_start(candidate_start: int, prefix_len: int, num_candidates: int) -> None:
    """Candidate c sits at rotary position prefix_len + candidate_start + c, computed in float32
    (recsys_model.score_candidates): every position must stay below MAX_EXACT_POSITION, where
    float32 still counts in steps of 1. The model takes any sequence length, so this, not a
    config field, is the bound; it also keeps the start inside int32, which it is passed as."""
    limit = MAX_EXACT_POSITION - prefix_len - num_candidates
    if candidate_start > limit:
        raise ValueError(f"candidate_start: expected an int in [0, {limit}] (the candidates' rotary positions "
                         f"1+S+candidate_start+c, S={prefix_len - 1}, C={num_candidates}, must stay below 2**24, "
                         f"which float32 counts exactly), got {candidate_start}")


def _candidate_chunks(batch: RecsysBatch, emb: RecsysEmbeddings, chunk: int):
    """The candidate fields split into chunks of `chunk` (the last padded with padding candidates,
    hash 0): [(batch, embeddings)] whose arrays stay where they are (device arrays stay on device)."""
    C = batch.candidate_post_hashes.shape[1]
    pad = -C % chunk

    def padded(x):
        x = jnp.asarray(x)
        return jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2)) if pad else x

    fields = [padded(x) for x in (batch.candidate_post_hashes, batch.candidate_author_hashes,
                                  batch.candidate_product_surface, emb.candidate_post_embeddings,
                                  emb.candidate_author_embeddings)]
    for start in range(0, C + pad, chunk):
        post, author, surface, post_emb, author_emb = (x[:, start:start + chunk] for x in fields)
        yield start, (batch._replace(candidate_post_hashes=post, candidate_author_hashes=author,
                                     candidate_product_surface=surface),
                      RecsysEmbeddings(emb.user_embeddings, emb.history_post_embeddings, post_emb,
                                       emb.history_author_embeddings, author_emb))


def _input_signature(batch, recsys_embeddings) -> Optional[tuple]:
    """What the checks of shapes and dtypes and jit's compile depend on: the trees' structure
    (container types included) and each leaf's type, shape and dtype; None for inputs it cannot
    describe (they then go through every check)."""
    try:
        leaves, treedef = jax.tree_util.tree_flatten((batch, recsys_embeddings))
        return treedef, tuple((type(x), np.shape(x), np.dtype(x.dtype) if hasattr(x, "dtype") else None)
                              for x in leaves)
    except Exception:  # noqa: BLE001 - anything odd is simply checked in full
        return None


def ranking_output(probs: jax.Array, candidate_mask: jax.Array) -> RankingOutput:
    """probabilities [B, C, A] -> RankingOutput; ranked by the first action, padded candidates last."""
    key = jnp.where(candidate_mask, probs[..., 0], -1.0)  # probabilities lie in [0, 1]
    _, ranked = jax.lax.top_k(key, key.shape[-1])  # [B, C]; ties keep candidate order
    per_action = {f"p_{a}": probs[..., i] for i, a in enumerate(ACTIONS[: probs.shape[-1]])}
    return RankingOutput(scores=probs, ranked_indices=ranked, **per_action)


class RecsysInferenceRunner(BaseInferenceRunner):
    """Ranks candidates: `rank(batch, recsys_embeddings) -> RankingOutput` (compiled per shape).

    `path` picks the ranker's computation: "isolated" (default; user+history once, each candidate
    against that prefix, O(C*S)) or "masked" (the release's full-sequence pass, the reference).
    `compute_dtype` picks the activations' dtype on every path (recsys_model.resolve_compute_dtype):
    "auto" (default) computes in float32 on CPU and in the model's fprop_dtype (the release's
    bfloat16) on GPU/TPU; None always uses fprop_dtype; or a dtype. Parameters are float32
    either way, so one checkpoint serves every choice; `serving_dtype` holds the one in use.
    """

    MODEL_RUNNER = ModelRunner

    def __init__(self, runner: ModelRunner, name: str = "ranker", path: str = "isolated",
                 data_parallel: bool = False, compute_dtype="auto", shard_tables: bool = False):
        super().__init__(runner, name, data_parallel, shard_tables)
        if path not in ("isolated", "masked"):
            raise ValueError(f"path: expected 'isolated' or 'masked', got {path!r}")
        self.path = path
        resolve_compute_dtype(compute_dtype, jnp.float32)  # refuses a bad value before initialize()
        self.compute_dtype = compute_dtype

    def initialize(self):
        runner = self.runner
        runner.initialize()
        cfg = runner.model
        # One user: the parameters do not depend on B, and a large bs_per_device would only allocate.
        dummy_batch = create_dummy_batch_from_config(cfg.hash_config, cfg.history_seq_len, cfg.candidate_seq_len,
                                                     cfg.num_actions)
        dummy_emb = create_dummy_embeddings_from_config(cfg.hash_config, cfg.emb_size, cfg.history_seq_len,
                                                        cfg.candidate_seq_len)
        self.params = self._replicate(runner.load_or_init(dummy_batch, dummy_emb).params)
        self.serving_dtype = resolve_compute_dtype(self.compute_dtype, cfg.fprop_dtype)
        forward = ModelForward(with_fprop_dtype(cfg, self.serving_dtype))

        def rank_fn(params, batch, emb, path):
            logits = forward.apply(params, batch, emb, isolated=path == "isolated").logits
            # inside jit: 19 eager per-action slices outside it would cost more than the model
            return ranking_output(jax.nn.sigmoid(logits.astype(jnp.float32)), batch.candidate_post_hashes[:, :, 0] != 0)

        def score_fn(params, batch, emb, prefix, start):
            logits = forward.apply(params, batch, emb, "score_candidates", prefix=prefix, candidate_start=start).logits
            return jax.nn.sigmoid(logits.astype(jnp.float32))

        self._rank_fn = rank_fn
        # XLA options of the ranking functions (CPU_RANK_COMPILER_OPTIONS on CPU; {} elsewhere).
        self.compiler_options = ranker_compiler_options()
        options = dict(compiler_options=self.compiler_options or None)
        self._rank = self._jit("rank", rank_fn, static_argnames="path", **options)
        self._frozen = None  # (params' leaves, size limit, jitted rank or None) decided for, see _frozen_rank
        self._ran_signatures = set()  # input signatures rank checked whole and ran (see rank)
        self._prefix = self._jit("encode_prefix", lambda p, b, e: forward.apply(p, b, e, "encode_prefix"), **options)
        self._score = self._jit("score_candidates", score_fn, **options)
        self._order = self._jit("order", ranking_output)
        self._init_embedder()

    def rank(self, batch: RecsysBatch, recsys_embeddings: Optional[RecsysEmbeddings] = None) -> RankingOutput:
        self._require_initialized("rank")
        recsys_embeddings = self._embedded(batch, recsys_embeddings)
        # Inputs of a structure, shapes and dtypes that passed the checks and ran before need no
        # shape checks again, and their value checks (NaN/inf, hash, surface and action values; they
        # cannot change what runs, only its result) run while the dispatched computation works:
        # a bad value raises the same error and the result is dropped. New inputs are checked
        # whole before anything is traced. It saves a little per call (docs/speed.md, "Figures behind
        # the code's choices").
        frozen = self._frozen_rank()
        signature = (id(frozen), _input_signature(batch, recsys_embeddings))  # new parameters: checked first
        seen = signature[1] is not None and signature in self._ran_signatures
        if not seen:
            self._check(batch, recsys_embeddings)
        placed = self._shard(batch, recsys_embeddings)
        if frozen is not None:
            out = frozen(*placed)
        else:
            out = self._rank(self.params, *placed, path=self.path)
        if seen:
            self._check_values(batch, recsys_embeddings)
        elif signature[1] is not None:
            self._ran_signatures.add(signature)
        return out

    def _frozen_rank(self):
        """`_rank` with the parameters as compile-time constants, or None where they are not frozen.

        XLA then folds everything that depends on the parameters alone (the fused Q/K/V and FFN
        weight concatenations, the split of the candidate projection, the product-surface table's
        projection) once at compile time instead of on every call (measured: docs/speed.md,
        "Parameters compiled in"). Frozen when the
        runner is not data-parallel and the parameters hold at most FREEZE_PARAMS_MAX_BYTES (the
        executable keeps its own copy). Replacing `self.params`, or any array in it, rebuilds it
        (one more compile) on the next call; the arrays are compared by identity, so a NumPy
        array changed in place would go unnoticed (jax.Arrays cannot be).
        """
        if self.mesh is not None:
            return None
        leaves = jax.tree_util.tree_leaves(self.params)
        if self._frozen is not None and self._frozen[1] == FREEZE_PARAMS_MAX_BYTES and len(leaves) == len(
                self._frozen[0]) and all(a is b for a, b in zip(leaves, self._frozen[0])):
            return self._frozen[2]  # the decision for these arrays and limit: a function or None
        frozen = None
        if sum(np.size(x) * np.dtype(x.dtype).itemsize for x in leaves) <= FREEZE_PARAMS_MAX_BYTES:
            params, path, rank_fn = self.params, self.path, self._rank_fn
            frozen = self._jit("rank", lambda batch, emb: rank_fn(params, batch, emb, path),
                               compiler_options=self.compiler_options or None)
        self._frozen = (leaves, FREEZE_PARAMS_MAX_BYTES, frozen)
        return frozen

    # Serving with a cached prefix: encode a user once, score any number of candidate sets.

    def encode_prefix(self, batch: RecsysBatch, recsys_embeddings: Optional[RecsysEmbeddings] = None) -> PrefixCache:
        """User+history once -> PrefixCache (each layer's keys/values [B, 1+S, h, d]).

        Candidate fields of `batch`/`recsys_embeddings` are not read (they may be empty, C = 0).
        """
        self._require_initialized("encode_prefix")
        recsys_embeddings = self._embedded(batch, recsys_embeddings)
        self._check(batch, recsys_embeddings, need_candidates=False)
        return self._prefix(self.params, *self._shard(batch, recsys_embeddings))

    def score_candidates(self, prefix: PrefixCache, batch: RecsysBatch,
                         recsys_embeddings: Optional[RecsysEmbeddings] = None,
                         candidate_start: int = 0) -> jax.Array:
        """Probabilities [B, C, A] of the batch's candidates against a cached prefix.

        Only the candidate fields are read. Candidate c takes rotary slot `candidate_start + c`, its
        index in the full candidate list; with that, scores equal ranking the whole list in one call.
        `candidate_start` is traced, so every chunk of one shape reuses one compiled function.
        """
        self._require_initialized("score_candidates")
        cfg = self.runner.model
        candidate_start = check_int(candidate_start, "candidate_start", 0)
        self._check_prefix(prefix)
        recsys_embeddings = self._embedded(batch, recsys_embeddings)
        check_candidate_inputs(batch, recsys_embeddings, cfg.hash_config, cfg.emb_size,
                               batch_size=prefix.mask.shape[0])
        _check_candidate_start(candidate_start, prefix.mask.shape[1], batch.candidate_post_hashes.shape[1])
        self._check_values(batch, recsys_embeddings)
        batch, recsys_embeddings = self._shard(batch, recsys_embeddings)
        return self._score(self.params, batch, recsys_embeddings, prefix, jnp.int32(candidate_start))

    def rank_large(self, batch: RecsysBatch, recsys_embeddings: Optional[RecsysEmbeddings] = None,
                   chunk_size: int = 1024) -> RankingOutput:
        """Ranks any number of candidates with memory bounded by `chunk_size`.

        Encodes the prefix once, scores the candidates in chunks of `chunk_size` (the last chunk is
        padded, so one compiled function serves every chunk), then ranks all of them. Equal to
        `rank` on the same inputs; peak activation memory grows with chunk_size, not with C. Inputs
        already on device stay there: the chunks are sliced and padded by XLA, not on the host.
        """
        self._require_initialized("rank_large")
        chunk_size = check_int(chunk_size, "chunk_size")
        recsys_embeddings = self._embedded(batch, recsys_embeddings)
        self._check(batch, recsys_embeddings)
        prefix = self._prefix(self.params, *self._shard(batch, recsys_embeddings))
        C = batch.candidate_post_hashes.shape[1]  # >= 1 (checked), so the chunk below is too
        chunk = min(chunk_size, C)
        probs = [self._score(self.params, *self._shard(cb, ce), prefix, jnp.int32(start))
                 for start, (cb, ce) in _candidate_chunks(batch, recsys_embeddings, chunk)]
        probs = jnp.concatenate(probs, axis=1)[:, :C]  # [B, C, A]
        return self._order(probs, batch.candidate_post_hashes[:, :, 0] != 0)

    def _check_prefix(self, prefix) -> None:
        """A PrefixCache from encode_prefix of a model with this runner's layer count."""
        if not isinstance(prefix, PrefixCache):
            raise TypeError(f"prefix: expected a PrefixCache (from encode_prefix), got {type(prefix).__name__}")
        num_layers = self.runner.model.model.num_layers
        if len(prefix.memory) != num_layers:
            raise ValueError(f"prefix: expected keys/values of {num_layers} layers (this runner's model), "
                             f"got {len(prefix.memory)}")
        check_array(prefix.mask, "prefix.mask", (None, None), "bool")


class RecsysRetrievalInferenceRunner(BaseInferenceRunner):
    """Encodes users and candidates and retrieves top-k from a corpus (compiled per shape and k)."""

    MODEL_RUNNER = RetrievalModelRunner

    def __init__(self, runner: RetrievalModelRunner, name: str = "retrieval", data_parallel: bool = False,
                 shard_tables: bool = False):
        super().__init__(runner, name, data_parallel, shard_tables)
        self.index = None  # CorpusIndex / ShardedCorpusIndex built by set_corpus
        self.corpus_embeddings = None
        self.corpus_post_ids = None

    def initialize(self):
        runner = self.runner
        runner.initialize()
        cfg = runner.model
        num_actions = len(ACTIONS)
        # One user: the parameters do not depend on B, and a large bs_per_device would only allocate.
        dummy_batch = create_dummy_batch_from_config(cfg.hash_config, cfg.history_seq_len, cfg.candidate_seq_len,
                                                     num_actions)
        dummy_emb = create_dummy_embeddings_from_config(cfg.hash_config, cfg.emb_size, cfg.history_seq_len,
                                                        cfg.candidate_seq_len)
        dummy_corpus = np.zeros((1, cfg.emb_size), np.float32)
        self.params = self._replicate(runner.load_or_init(dummy_batch, dummy_emb, dummy_corpus, 1).params)
        forward = ModelForward(cfg)

        def encode_user(params, batch, emb):
            return forward.apply(params, batch, emb, "build_user_representation")[0]  # [B, D]

        def retrieve_fn(params, batch, emb, corpus, corpus_mask, top_k):
            user = encode_user(params, batch, emb)
            indices, scores = retrieve_top_k(user, corpus, top_k, corpus_mask)
            return RetrievalOutput(user, indices, scores)

        self._encode_user = self._jit("encode_user", encode_user)
        self._encode_candidates = self._jit(
            "encode_candidates", lambda p, b, e: forward.apply(p, b, e, "build_candidate_representation")[0])
        self._retrieve = self._jit("retrieve", retrieve_fn, static_argnames="top_k")
        self._init_embedder()

    def encode_user(self, batch: RecsysBatch, recsys_embeddings: Optional[RecsysEmbeddings] = None) -> jax.Array:
        """-> user representations [B, D], unit norm."""
        self._require_initialized("encode_user")
        recsys_embeddings = self._embedded(batch, recsys_embeddings)
        self._check(batch, recsys_embeddings, need_candidates=False)
        return self._encode_user(self.params, *self._shard(batch, recsys_embeddings))

    def encode_candidates(self, batch: RecsysBatch, recsys_embeddings: Optional[RecsysEmbeddings] = None) -> jax.Array:
        """-> candidate representations [B, C, D], unit norm."""
        self._require_initialized("encode_candidates")
        recsys_embeddings = self._embedded(batch, recsys_embeddings)
        self._check(batch, recsys_embeddings)
        return self._encode_candidates(self.params, *self._shard(batch, recsys_embeddings))

    def _checked_corpus(self, corpus_embeddings):
        """A per-call corpus: checked like set_corpus's, placed on device (replicated if data-parallel)."""
        check_array(corpus_embeddings, "corpus_embeddings", (None, self.runner.model.emb_size), "float")
        if corpus_embeddings.shape[0] == 0:
            raise ValueError("corpus_embeddings: expected at least one row, got an empty corpus")
        with np.errstate(over="ignore"):  # float64 beyond float32's range becomes inf: refused below
            corpus = self._replicate(jnp.asarray(corpus_embeddings, jnp.float32))
        if values_enabled() and not bool(_all_finite(corpus)):
            raise ValueError("corpus_embeddings: contains NaN or inf (as float32, the dtype it is scored in)")
        return corpus

    def set_corpus(self, corpus_embeddings, corpus_post_ids=None, normalize: bool = False):
        """Builds the exact top-k index over the corpus [N, D] once (phoenix_index.py).

        The corpus stays on device (a 64-byte-aligned float32 NumPy array is used in place and made
        read-only, so a later write raises instead of changing what the index reads; see
        index.aligned_empty), is scored in chunks with bounded memory, and with data_parallel=True
        is sharded row-wise over the devices (ShardedCorpusIndex). Rows should be L2-normalised:
        a corpus that is not gives a warning, or is normalised (a copy) with normalize=True.
        """
        D = self.runner.model.emb_size
        check_array(corpus_embeddings, "corpus_embeddings", (None, D), "float")
        _check_bool(normalize, "normalize")
        if normalize:
            corpus_embeddings = _normalize_rows(jnp.asarray(corpus_embeddings, jnp.float32))
        if self.mesh is not None:
            mesh = Mesh(self.mesh.devices, ("corpus",))
            self.index = ShardedCorpusIndex(corpus_embeddings, corpus_post_ids, mesh=mesh)
        else:
            self.index = CorpusIndex(corpus_embeddings, corpus_post_ids)
        norm_error = float(_max_norm_error(self.index.corpus_embeddings))
        if norm_error > NORM_TOLERANCE:
            warnings.warn(f"corpus_embeddings: rows are not L2-normalised (max |norm - 1| = {norm_error:.3g}); "
                          f"scores are then not cosine similarities. Pass normalize=True to normalise.",
                          stacklevel=2)
        self.corpus_embeddings = self.index.corpus_embeddings[: self.index.num_rows]
        self.corpus_post_ids = (np.arange(self.index.num_rows) if self.index.corpus_post_ids is None
                                else self.index.corpus_post_ids)

    def retrieve(self, batch: RecsysBatch, recsys_embeddings: Optional[RecsysEmbeddings] = None, top_k: int = 100,
                 corpus_embeddings=None, corpus_mask=None) -> RetrievalOutput:
        """Top-k corpus entries per user (indices into the corpus; map with `corpus_post_ids`).

        With the corpus from `set_corpus`: the user tower (compiled per batch shape), then the
        exact index (compiled per (B, K)). With `corpus_embeddings` given for this call: one fused
        compiled function (user tower + matmul + top_k). Masked entries (corpus_mask False) score
        -1e12 and come after every valid entry; with top_k above the number of valid entries they
        fill the tail.
        """
        self._require_initialized("retrieve")
        recsys_embeddings = self._embedded(batch, recsys_embeddings)
        self._check(batch, recsys_embeddings, need_candidates=False)
        if corpus_embeddings is None:
            if self.index is None:
                raise ValueError("corpus_embeddings: none given and no corpus set; call set_corpus(...) first")
            N = self.index.num_rows
            top_k = check_top_k(top_k, N, "corpus size")
            if corpus_mask is not None:
                check_array(corpus_mask, "corpus_mask", (N,), "bool")
            user = self._encode_user(self.params, *self._shard(batch, recsys_embeddings))
            indices, scores = self.index.search(user, top_k, corpus_mask)
            return RetrievalOutput(user, indices, scores)
        corpus = self._checked_corpus(corpus_embeddings)
        N = corpus.shape[0]
        top_k = check_top_k(top_k, N, "corpus size")
        if corpus_mask is not None:
            check_array(corpus_mask, "corpus_mask", (N,), "bool")
        batch, recsys_embeddings = self._shard(batch, recsys_embeddings)
        corpus_mask = None if corpus_mask is None else self._replicate(jnp.asarray(corpus_mask))
        return self._retrieve(self.params, batch, recsys_embeddings, corpus, corpus_mask, top_k=top_k)


NORM_TOLERANCE = 1e-3  # corpus rows whose L2 norm is further than this from 1 trigger a warning


@jax.jit
def _all_finite(corpus):
    return jnp.isfinite(jnp.sum(corpus * 0.0))  # NaN/inf propagate through the sum; fused, no [N, D] temp


@jax.jit
def _max_norm_error(corpus):
    return jnp.max(jnp.abs(jnp.sqrt(jnp.sum(corpus * corpus, axis=1)) - 1.0))


@jax.jit
def _normalize_rows(corpus):
    return l2_normalize(corpus)[0]


__all__ = [
    "ACTIONS", "BaseInferenceRunner", "BaseModelRunner", "CheckpointInfo", "INF", "MODEL_KINDS", "ModelRunner",
    "RankingOutput", "RecsysInferenceRunner", "RecsysRetrievalInferenceRunner", "RetrievalModelRunner",
    "RetrievalOutput", "create_dummy_batch_from_config", "create_dummy_embeddings_from_config",
    "create_example_batch", "create_example_corpus", "describe_checkpoint",
]
