"""Phoenix ranking model.

Shape glossary
  B  batch (users)                 S  history length
  C  candidates per user           D  embedding size (emb_size)
  A  actions                       T  sequence length = 1 + S + C
  Hu / Hi / Ha  number of user / item (post) / author hashes
"""

import dataclasses
import logging
from typing import Any, NamedTuple, Optional

import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np

from grok import RMSNorm, Transformer, TransformerConfig, defers_norms, layer_norm
# The input types are the release's names in this module; they live in phoenix_inputs.
from phoenix_inputs import HashConfig, RecsysBatch, RecsysEmbeddings  # noqa: F401
from phoenix_validation import check_candidate_inputs, check_inputs

__all__ = [
    # the release's names (shared/phoenix-spec.md section 1); the input types live in phoenix_inputs
    "HashConfig", "RecsysEmbeddings", "RecsysModelOutput", "RecsysBatch", "block_user_reduce", "block_history_reduce",
    "block_candidate_reduce", "PhoenixModelConfig", "PhoenixModel",
    # serving
    "PrefixCache", "resolve_compute_dtype", "with_fprop_dtype", "SERVING_DTYPES",
    "PhoenixConfigMethods", "SURFACE_TABLE",
]

logger = logging.getLogger(__name__)

SURFACE_TABLE = "product_surface_embedding_table"  # shared by history and candidates


class RecsysModelOutput(NamedTuple):
    logits: jax.Array  # [B, C, A]


def _transposed_init(scale: float):
    """VarianceScaling(scale, fan_out) drawn for the transposed shape, as the release does."""
    init = hk.initializers.VarianceScaling(scale, mode="fan_out")
    return lambda shape, dtype: init(list(reversed(shape)), dtype).T


def _project(x: jax.Array, name: str, out_size: int, embed_init_scale: float) -> jax.Array:
    """x [..., K] @ float32 parameter `name` [K, out] in float32, cast back to x's dtype."""
    w = hk.get_parameter(name, [x.shape[-1], out_size], jnp.float32, init=_transposed_init(embed_init_scale))
    return jnp.dot(x.astype(jnp.float32), w).astype(x.dtype)


def block_user_reduce(user_hashes, user_embeddings, num_user_hashes, emb_size, embed_init_scale=1.0):
    """User hashes' embeddings [B, Hu, D] -> ([B, 1, D], valid [B, 1]) via proj_mat_1."""
    B = user_embeddings.shape[0]
    x = user_embeddings.reshape(B, 1, num_user_hashes * emb_size)  # [B, 1, Hu*D]
    user_embedding = _project(x, "proj_mat_1", emb_size, embed_init_scale)  # [B, 1, D]
    return user_embedding, (user_hashes[:, 0] != 0).reshape(B, 1)


def block_history_reduce(history_post_hashes, history_post_embeddings, history_author_embeddings,
                         history_product_surface_embeddings, history_actions_embeddings, num_item_hashes,
                         num_author_hashes, embed_init_scale=1.0):
    """History -> ([B, S, D], valid [B, S]) via proj_mat_3 over [post, author, actions, surface]."""
    B, S, _, D = history_post_embeddings.shape
    x = jnp.concatenate([
        history_post_embeddings.reshape(B, S, num_item_hashes * D),  # [B, S, Hi*D]
        history_author_embeddings.reshape(B, S, num_author_hashes * D),  # [B, S, Ha*D]
        history_actions_embeddings,  # [B, S, D]
        history_product_surface_embeddings,  # [B, S, D]
    ], axis=-1)  # [B, S, (Hi+Ha+2)*D]
    history_embedding = _project(x, "proj_mat_3", D, embed_init_scale)  # [B, S, D]
    return history_embedding, history_post_hashes[:, :, 0] != 0


def block_candidate_reduce(candidate_post_hashes, candidate_post_embeddings, candidate_author_embeddings,
                           candidate_product_surface_embeddings, num_item_hashes, num_author_hashes,
                           embed_init_scale=1.0):
    """Candidates -> ([B, C, D], valid [B, C]) via proj_mat_2 over [post, author, surface]."""
    B, C, _, D = candidate_post_embeddings.shape
    x = jnp.concatenate([
        candidate_post_embeddings.reshape(B, C, num_item_hashes * D),  # [B, C, Hi*D]
        candidate_author_embeddings.reshape(B, C, num_author_hashes * D),  # [B, C, Ha*D]
        candidate_product_surface_embeddings,  # [B, C, D]
    ], axis=-1)  # [B, C, (Hi+Ha+1)*D]
    candidate_embedding = _project(x, "proj_mat_2", D, embed_init_scale)  # [B, C, D]
    return candidate_embedding, candidate_post_hashes[:, :, 0] != 0


class PhoenixConfigMethods:
    """initialize() / make() shared by the ranking and the retrieval configs."""

    _initialized = False
    DEFAULT_NAME = "phoenix_model"

    def model_class(self) -> type:
        return PhoenixModel

    def initialize(self):
        if self.hash_config is None:
            self.hash_config = HashConfig()
        validate_model_config(self)
        self._initialized = True
        return self

    def make(self):
        if not self._initialized:
            logger.warning(f"{type(self).__name__}.make() called before initialize(); initialising now.")
            self.initialize()
        return self.model_class()(model=self.model.make(), config=self, fprop_dtype=self.fprop_dtype,
                                  name=self.name or self.DEFAULT_NAME)


@dataclasses.dataclass
class PhoenixModelConfig(PhoenixConfigMethods):
    """Ranking model configuration. `.make()` builds a `PhoenixModel`."""

    model: TransformerConfig  # the shared transformer; its emb_size must equal emb_size
    emb_size: int  # D
    num_actions: int  # A, engagement actions predicted per candidate
    history_seq_len: int = 128  # S the runners build dummy inputs with; the model accepts any S
    candidate_seq_len: int = 32  # C likewise
    name: Optional[str] = None
    fprop_dtype: Any = jnp.bfloat16  # activations' dtype; parameters stay float32
    hash_config: Optional[HashConfig] = None  # -> HashConfig() by initialize()
    product_surface_vocab_size: int = 16


def validate_model_config(cfg) -> None:
    """Rejects configurations that cannot work, naming the field (shared with the retrieval config)."""
    kind = type(cfg).__name__
    for field in ("emb_size", "history_seq_len", "candidate_seq_len", "product_surface_vocab_size") + (
            ("num_actions",) if hasattr(cfg, "num_actions") else ()):
        value = getattr(cfg, field)
        if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value <= 0:
            raise ValueError(f"{kind}.{field} must be a positive int, got {value!r}")
    if not isinstance(cfg.model, TransformerConfig):
        raise TypeError(f"{kind}.model must be a TransformerConfig, got {type(cfg.model).__name__}")
    if cfg.model.emb_size != cfg.emb_size:
        raise ValueError(f"{kind}: model.emb_size ({cfg.model.emb_size}) must equal emb_size ({cfg.emb_size})")
    for field in ("num_user_hashes", "num_item_hashes", "num_author_hashes"):
        value = getattr(cfg.hash_config, field)
        if not isinstance(value, (int, np.integer)) or value <= 0:
            raise ValueError(f"{kind}.hash_config.{field} must be a positive int, got {value!r}")
    if jnp.dtype(cfg.fprop_dtype) not in (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)):
        raise ValueError(f"{kind}.fprop_dtype must be float32, bfloat16 or float16, got {cfg.fprop_dtype}")


SERVING_DTYPES = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))


def resolve_compute_dtype(compute_dtype, fprop_dtype, backend: Optional[str] = None) -> jnp.dtype:
    """The activations' dtype a serving runner computes in (parameters stay float32 either way).

    None: the model's `fprop_dtype` (the release's arithmetic). "auto": float32 on CPU, where
    XLA's bfloat16 path converts around every op and is no faster; `fprop_dtype` on GPU/TPU,
    whose matrix units run bfloat16 at several times float32's rate. Or float32 / bfloat16 /
    float16 explicitly. `backend` defaults to jax.default_backend().
    """
    if compute_dtype is None:
        return jnp.dtype(fprop_dtype)
    if isinstance(compute_dtype, str) and compute_dtype == "auto":
        cpu = (backend or jax.default_backend()) == "cpu"
        return jnp.dtype(jnp.float32) if cpu else jnp.dtype(fprop_dtype)
    try:
        dtype = jnp.dtype(compute_dtype)
    except (TypeError, ValueError):
        dtype = None
    if dtype not in SERVING_DTYPES:
        raise ValueError(f"compute_dtype: expected None, 'auto', 'float32', 'bfloat16' or 'float16', "
                         f"got {compute_dtype!r}")
    return dtype


def with_fprop_dtype(cfg: PhoenixModelConfig, dtype) -> PhoenixModelConfig:
    """An initialised copy of `cfg` computing in `dtype` (the same parameter tree), or cfg itself."""
    if jnp.dtype(dtype) == jnp.dtype(cfg.fprop_dtype):
        return cfg
    return dataclasses.replace(cfg, fprop_dtype=jnp.dtype(dtype).type).initialize()


class PhoenixModel(hk.Module):
    """Transformer ranker with candidate isolation and multi-action logits."""

    def __init__(self, model: Transformer, config: PhoenixModelConfig, fprop_dtype=jnp.bfloat16,
                 name: Optional[str] = None):
        super().__init__(name=name or "phoenix_model")
        self.model = model
        self.config = config
        self.fprop_dtype = fprop_dtype

    def _get_action_embeddings(self, actions: jax.Array) -> jax.Array:
        """Multi-hot actions [B, S, A] -> (2*actions - 1) @ action_projection, zero where none is set."""
        A = actions.shape[-1]
        w = hk.get_parameter("action_projection", [A, self.config.emb_size], jnp.float32,
                             init=hk.initializers.VarianceScaling(1.0, mode="fan_out"))
        signed = (2 * actions - 1).astype(jnp.float32)  # [B, S, A]
        emb = jnp.dot(signed, w) * jnp.any(actions != 0, axis=-1, keepdims=True)  # [B, S, D]
        return emb.astype(self.fprop_dtype)

    def _single_hot_to_embeddings(self, input, vocab_size: int, emb_size: int, name: str) -> jax.Array:
        """Ids [B, S] -> one-hot @ table [vocab, D], cast to fprop dtype (release arithmetic)."""
        table = hk.get_parameter(name, [vocab_size, emb_size], jnp.float32,
                                 init=hk.initializers.VarianceScaling(1.0, mode="fan_out"))
        return jnp.dot(jax.nn.one_hot(input, vocab_size), table).astype(self.fprop_dtype)  # [B, S, D]

    def _get_unembedding(self) -> jax.Array:
        return hk.get_parameter("unembeddings", [self.config.emb_size, self.config.num_actions], jnp.float32,
                                init=hk.initializers.VarianceScaling(1.0, mode="fan_in"))

    def _user_history_inputs(self, batch: RecsysBatch, recsys_embeddings: RecsysEmbeddings, fast: bool = False):
        """User [B, 1, D] and history [B, S, D] inputs with their validity masks.

        fast: block_history_reduce's result without its [B, S, (Hi+Ha+2)*D] concatenation, as
        `_fast_candidate_inputs` does it: proj_mat_3 splits by rows into post, author, action and
        surface blocks; the surface block is applied to the [vocab, D] table once, and in float32
        the action block to the [A, D] action projection once (in bfloat16 the release rounds the
        action embeddings first, so they keep their own matmul). Same products, another order.
        """
        if fast:
            return self._fast_user_history_inputs(batch, recsys_embeddings)
        cfg = self.config
        hc = cfg.hash_config
        hist_surface = self._single_hot_to_embeddings(
            batch.history_product_surface, cfg.product_surface_vocab_size, cfg.emb_size, SURFACE_TABLE)
        hist_actions = self._get_action_embeddings(batch.history_actions)
        user, user_mask = block_user_reduce(batch.user_hashes, recsys_embeddings.user_embeddings,
                                            hc.num_user_hashes, cfg.emb_size)
        history, history_mask = block_history_reduce(
            batch.history_post_hashes, recsys_embeddings.history_post_embeddings,
            recsys_embeddings.history_author_embeddings, hist_surface, hist_actions,
            hc.num_item_hashes, hc.num_author_hashes)
        return user, user_mask, history, history_mask

    def _projected_surface(self, ids: jax.Array, table: jax.Array, w_surface: jax.Array) -> jax.Array:
        """Product-surface ids [B, L] -> their rows of (table @ w_surface) [B, L, D] in float32.

        The release rounds the surface embedding to the fprop dtype before the projection; the
        [vocab, D] product is taken once. A one-hot matmul (not a gather): out-of-range ids give
        zero rows, as in the release.
        """
        projected = jnp.dot(table.astype(self.fprop_dtype).astype(jnp.float32), w_surface)  # [vocab, D]
        return jnp.dot(jax.nn.one_hot(ids, table.shape[0]), projected)  # [B, L, D]

    def _fast_user_history_inputs(self, batch: RecsysBatch, recsys_embeddings: RecsysEmbeddings):
        cfg = self.config
        hc = cfg.hash_config
        D, vocab = cfg.emb_size, cfg.product_surface_vocab_size
        B, S, A = batch.history_actions.shape
        # Parameters in the order the release's path creates them: table, action projection,
        # proj_mat_1 (block_user_reduce), proj_mat_3.
        table = hk.get_parameter(SURFACE_TABLE, [vocab, D], jnp.float32,
                                 init=hk.initializers.VarianceScaling(1.0, mode="fan_out"))
        actions = batch.history_actions
        fold_actions = jnp.dtype(self.fprop_dtype) == jnp.float32  # else the release rounds them first
        if fold_actions:
            action_projection = hk.get_parameter("action_projection", [A, D], jnp.float32,
                                                 init=hk.initializers.VarianceScaling(1.0, mode="fan_out"))
        else:
            action_embeddings = self._get_action_embeddings(actions).astype(jnp.float32)  # rounded [B, S, D]
        user, user_mask = block_user_reduce(batch.user_hashes, recsys_embeddings.user_embeddings,
                                            hc.num_user_hashes, D)
        w = hk.get_parameter("proj_mat_3", [(hc.num_item_hashes + hc.num_author_hashes + 2) * D, D], jnp.float32,
                             init=_transposed_init(1.0))
        # Explicit widths, not -1: with S = 0 (no history) a -1 has no size to infer and JAX divides by 0.
        post = recsys_embeddings.history_post_embeddings.reshape(
            B, S, hc.num_item_hashes * D).astype(jnp.float32)  # [B, S, Hi*D]
        author = recsys_embeddings.history_author_embeddings.reshape(
            B, S, hc.num_author_hashes * D).astype(jnp.float32)  # [B, S, Ha*D]
        w_post, w_author, w_actions, w_surface = jnp.split(
            w, np.cumsum([post.shape[-1], author.shape[-1], D]).tolist())
        if fold_actions:
            signed = (2 * actions - 1).astype(jnp.float32)  # [B, S, A]
            acted = jnp.dot(signed, jnp.dot(action_projection, w_actions)) * jnp.any(actions != 0, axis=-1,
                                                                                     keepdims=True)
        else:
            acted = jnp.dot(action_embeddings, w_actions)
        surface = self._projected_surface(batch.history_product_surface, table, w_surface)  # [B, S, D]
        history = jnp.dot(post, w_post) + jnp.dot(author, w_author) + acted + surface  # [B, S, D] float32
        return user, user_mask, history.astype(self.fprop_dtype), batch.history_post_hashes[:, :, 0] != 0

    def _fast_candidate_inputs(self, batch: RecsysBatch, recsys_embeddings: RecsysEmbeddings):
        """block_candidate_reduce's result without its [B, C, (Hi+Ha+1)*D] concatenation.

        proj_mat_2 splits by rows into post, author and surface blocks; the surface block only
        ever meets the vocab's rows of the table, so it is applied to the [vocab, D] table once
        and its rows picked. Same float32 products, summed in another order.
        """
        cfg = self.config
        hc = cfg.hash_config
        D, vocab = cfg.emb_size, cfg.product_surface_vocab_size
        table = hk.get_parameter(SURFACE_TABLE, [vocab, D], jnp.float32,
                                 init=hk.initializers.VarianceScaling(1.0, mode="fan_out"))
        w = hk.get_parameter("proj_mat_2", [(hc.num_item_hashes + hc.num_author_hashes + 1) * D, D], jnp.float32,
                             init=_transposed_init(1.0))
        B, C = batch.candidate_product_surface.shape
        post = recsys_embeddings.candidate_post_embeddings.reshape(B, C, -1).astype(jnp.float32)  # [B, C, Hi*D]
        author = recsys_embeddings.candidate_author_embeddings.reshape(B, C, -1).astype(jnp.float32)  # [B, C, Ha*D]
        w_post, w_author, w_surface = jnp.split(w, [post.shape[-1], post.shape[-1] + author.shape[-1]])
        surface = self._projected_surface(batch.candidate_product_surface, table, w_surface)  # [B, C, D]
        cand = jnp.dot(post, w_post) + jnp.dot(author, w_author) + surface
        return cand, batch.candidate_post_hashes[:, :, 0] != 0  # [B, C, D] float32, [B, C]

    def _candidate_inputs(self, batch: RecsysBatch, recsys_embeddings: RecsysEmbeddings):
        cfg = self.config
        hc = cfg.hash_config
        cand_surface = self._single_hot_to_embeddings(
            batch.candidate_product_surface, cfg.product_surface_vocab_size, cfg.emb_size, SURFACE_TABLE)
        return block_candidate_reduce(
            batch.candidate_post_hashes, recsys_embeddings.candidate_post_embeddings,
            recsys_embeddings.candidate_author_embeddings, cand_surface, hc.num_item_hashes,
            hc.num_author_hashes)

    def _check(self, batch, recsys_embeddings, need_candidates=True):
        cfg = self.config
        check_inputs(batch, recsys_embeddings, cfg.hash_config, cfg.emb_size, getattr(cfg, "num_actions", None),
                     need_candidates=need_candidates)

    def build_inputs(self, batch: RecsysBatch, recsys_embeddings: RecsysEmbeddings):
        """-> (embeddings [B, 1+S+C, D] fprop dtype, padding_mask [B, 1+S+C], candidate_start_offset 1+S)."""
        self._check(batch, recsys_embeddings)
        user, user_mask, history, history_mask = self._user_history_inputs(batch, recsys_embeddings)
        cand, cand_mask = self._candidate_inputs(batch, recsys_embeddings)
        embeddings = jnp.concatenate([user, history, cand], axis=1)  # [B, 1+S+C, D]
        padding_mask = jnp.concatenate([user_mask, history_mask, cand_mask], axis=1)  # [B, 1+S+C]
        candidate_start_offset = user_mask.shape[1] + history_mask.shape[1]
        return embeddings.astype(self.fprop_dtype), padding_mask, candidate_start_offset

    @hk.transparent  # the final norm must be named phoenix_model/rms_norm, not ~_logits/rms_norm
    def _logits(self, candidate_outputs: jax.Array, fused: bool = False) -> RecsysModelOutput:
        """Final RMSNorm, then candidate outputs [B, C, D] @ unembeddings [D, A] in float32.

        fused (the fast path, float32): the norm deferred into the matmul (grok.DeferredNorm),
        (x @ (scale * unembeddings)) * inv_rms.
        """
        if fused and defers_norms(candidate_outputs):
            h = RMSNorm().deferred(candidate_outputs)
            logits = jnp.dot(h.x, h.scale[:, None] * self._get_unembedding()) * h.inv_rms  # [B, C, A]
        else:
            h = layer_norm(candidate_outputs)
            logits = jnp.dot(h.astype(jnp.float32), self._get_unembedding())  # [B, C, A]
        return RecsysModelOutput(logits.astype(self.fprop_dtype))

    def __call__(self, batch: RecsysBatch, recsys_embeddings: RecsysEmbeddings, *,
                 isolated: bool = False) -> RecsysModelOutput:
        """Candidate logits [B, C, A].

        isolated=False (default): the release's full-sequence pass over [user, history, candidates]
          with the candidate-isolation mask, O((1+S+C)^2).
        isolated=True: what `score_candidates(encode_prefix(...))` computes, in one pass over the
          [user, history, candidates] rows: user+history attend causally among themselves (never to
          candidates), each candidate to that prefix plus itself, O((1+S+C)*(1+S)) attention
          (grok.row_attention); row-wise work (norms, projections, FFN) runs once over all rows and
          the last layer computes candidate rows only. Equal to the masked pass up to float rounding,
          with the same parameters.
        """
        if isolated:
            self._check(batch, recsys_embeddings)
            x, x_mask = self.user_sequence(batch, recsys_embeddings, fast=True)  # [B, 1+S, D], [B, 1+S]
            cand, cand_mask = self._fast_candidate_inputs(batch, recsys_embeddings)
            rows = jnp.concatenate([x, cand.astype(self.fprop_dtype)], axis=1)  # [B, 1+S+C, D]
            rows_mask = jnp.concatenate([x_mask, cand_mask], axis=1)  # [B, 1+S+C]
            out = self.model(rows, rows_mask, candidate_start_offset=x.shape[1], fused=True).embeddings
            return self._logits(out, fused=True)  # out: the candidate rows [B, C, D]
        embeddings, padding_mask, offset = self.build_inputs(batch, recsys_embeddings)
        out = self.model(embeddings, padding_mask, candidate_start_offset=offset).embeddings
        return self._logits(out[:, offset:, :])

    # The public methods name their submodules like __call__ does, so every entry point creates
    # and reads the release's parameter names (phoenix_model/rms_norm, not ~encode_prefix/...).

    @hk.experimental.name_like("__call__")
    def user_sequence(self, batch: RecsysBatch, recsys_embeddings: RecsysEmbeddings, fast: bool = False):
        """-> (inputs [B, 1+S, D] fprop dtype, mask [B, 1+S]): the user and history rows of the
        sequence the transformer reads (candidate fields are not read). fast: the fast path's
        history projection (`_user_history_inputs`), equal up to float summation order."""
        user, user_mask, history, history_mask = self._user_history_inputs(batch, recsys_embeddings, fast=fast)
        x = jnp.concatenate([user, history], axis=1).astype(self.fprop_dtype)  # [B, 1+S, D]
        return x, jnp.concatenate([user_mask, history_mask], axis=1)  # [B, 1+S]

    @hk.experimental.name_like("__call__")
    def encode_prefix(self, batch: RecsysBatch, recsys_embeddings: RecsysEmbeddings) -> "PrefixCache":
        """User+history through every layer once -> PrefixCache (each layer's keys/values).

        Candidate fields are not read (they may be empty, C = 0).
        """
        self._check(batch, recsys_embeddings, need_candidates=False)
        x, x_mask = self.user_sequence(batch, recsys_embeddings, fast=True)
        memory = self.model(x, x_mask, candidate_start_offset=None, fused=True).memory
        return PrefixCache(memory, x_mask)

    @hk.experimental.name_like("__call__")
    def score_candidates(self, batch: RecsysBatch, recsys_embeddings: RecsysEmbeddings, prefix: "PrefixCache",
                         candidate_start: Any = 0) -> RecsysModelOutput:
        """Logits [B, C, A] of the batch's candidates against a cached prefix (user/history fields unused).

        Candidate c sits at rotary position 1 + S + candidate_start + c, its slot in the full
        candidate list, so scoring a list in chunks (candidate_start = chunk offset) gives the same
        logits as one call.
        """
        if not isinstance(prefix, PrefixCache):
            raise TypeError(f"prefix: expected a PrefixCache (from encode_prefix), got {type(prefix).__name__}")
        check_candidate_inputs(batch, recsys_embeddings, self.config.hash_config, self.config.emb_size)
        cand, cand_mask = self._fast_candidate_inputs(batch, recsys_embeddings)
        C = cand.shape[1]
        P = prefix.mask.shape[1]
        positions = (P + candidate_start + jnp.arange(C, dtype=jnp.float32))[None, :]  # [1, C]
        out = self.model(cand.astype(self.fprop_dtype), cand_mask, positions=positions,
                         prefix=prefix.memory, fused=True).embeddings  # [B, C, D]
        return self._logits(out, fused=True)


class PrefixCache(NamedTuple):
    """User+history keys/values of every layer: what isolated ranking reuses across candidates."""

    memory: list  # num_layers x grok.KVMemory, keys/values [B, 1+S, h, d]
    mask: jax.Array  # [B, 1+S] bool, valid user/history positions
