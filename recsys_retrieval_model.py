"""Phoenix two-tower retrieval model.

Shape glossary
  B  batch (users)        S  history length       C  candidates per user
  D  embedding size       N  corpus size          K  top-k
  H  hashes per candidate (Hi + Ha)

User tower: the shared transformer over [user, history] (causal, no candidates), pooled over
valid positions (config.pooling: the release's mean, or the last valid position) and
L2-normalised. Candidate tower: a two-layer SiLU MLP over a candidate's post and author hash
embeddings, L2-normalised. Scores are dot products; top-k is exact.
"""

import dataclasses
from typing import Any, NamedTuple, Optional

import haiku as hk
import jax
import jax.numpy as jnp

from grok import TransformerConfig
from phoenix_inputs import HashConfig, RecsysBatch, RecsysEmbeddings
from phoenix_validation import INF, check_array, check_candidate_inputs, check_top_k  # noqa: F401 (INF: release name)
from recsys_model import PhoenixConfigMethods, PhoenixModel

__all__ = [
    # the release's names (shared/phoenix-spec.md section 1)
    "EPS", "INF", "RetrievalOutput", "CandidateTower", "PhoenixRetrievalModelConfig", "PhoenixRetrievalModel",
    # pooling, normalisation, top-k
    "POOLINGS", "check_pooling", "last_valid", "l2_normalize", "retrieve_top_k",
]


EPS = 1e-12  # clamp on squared norms before the square root
# User-tower pooling over the valid [user, history] positions: "mean" is the release's; "last" is
# the output at the last valid position (with causal attention a function of the whole history,
# and free to weigh the latest items most).
POOLINGS = ("mean", "last")


class RetrievalOutput(NamedTuple):
    user_representation: jax.Array  # [B, D] unit norm
    top_k_indices: jax.Array  # [B, K] int32, into the corpus (or into the batch's candidates)
    top_k_scores: jax.Array  # [B, K] best first


def l2_normalize(x: jax.Array):
    """-> (x / sqrt(max(sum(x^2), EPS)), that norm [..., 1])."""
    norm = jnp.sqrt(jnp.maximum(jnp.sum(x**2, axis=-1, keepdims=True), EPS))
    return x / norm, norm


class CandidateTower(hk.Module):
    """MLP candidate tower: [.., H, D] -> flatten -> proj_1 [H*D, 2D] -> SiLU -> proj_2 [2D, D] -> L2."""

    def __init__(self, emb_size: int, name: Optional[str] = None):
        super().__init__(name=name)
        self.emb_size = emb_size

    def __call__(self, post_author_embedding: jax.Array) -> jax.Array:
        """[B, C, H, D] -> [B, C, D] or [B, H, D] -> [B, D], unit norm, in the input dtype."""
        x = post_author_embedding
        x = x.reshape(*x.shape[:-2], x.shape[-2] * x.shape[-1])  # [..., H*D]
        init = hk.initializers.VarianceScaling(1.0, mode="fan_out")
        proj_1 = hk.get_parameter("candidate_tower_projection_1", [x.shape[-1], 2 * self.emb_size],
                                  jnp.float32, init=init)
        proj_2 = hk.get_parameter("candidate_tower_projection_2", [2 * self.emb_size, self.emb_size],
                                  jnp.float32, init=init)
        hidden = jax.nn.silu(jnp.dot(x, proj_1))  # [..., 2D]
        out, _ = l2_normalize(jnp.dot(hidden, proj_2))  # [..., D]
        return out.astype(post_author_embedding.dtype)


@dataclasses.dataclass
class PhoenixRetrievalModelConfig(PhoenixConfigMethods):
    """Two-tower retrieval configuration. `.make()` builds the model."""

    model: TransformerConfig  # the user tower's transformer; its emb_size must equal emb_size
    emb_size: int  # D
    history_seq_len: int = 128  # S the runners build dummy inputs with; the model accepts any S
    candidate_seq_len: int = 32  # C likewise
    name: Optional[str] = None
    fprop_dtype: Any = jnp.bfloat16  # activations' dtype; parameters stay float32
    hash_config: Optional[HashConfig] = None  # -> HashConfig() by initialize()
    product_surface_vocab_size: int = 16
    pooling: str = "mean"  # POOLINGS; the release's mean by default (parity), "last" for long histories

    DEFAULT_NAME = "phoenix_retrieval_model"

    def __post_init__(self):
        check_pooling(self.pooling)

    def initialize(self):
        check_pooling(self.pooling)  # again: the field may have been set after construction
        return super().initialize()

    def model_class(self) -> type:
        return PhoenixRetrievalModel


def check_pooling(pooling) -> str:
    """pooling must be one of POOLINGS."""
    if not isinstance(pooling, str) or pooling not in POOLINGS:
        raise ValueError(f"PhoenixRetrievalModelConfig.pooling: expected one of {POOLINGS}, got {pooling!r}")
    return pooling


def last_valid(outputs: jax.Array, mask: jax.Array) -> jax.Array:
    """[B, T, D], [B, T] -> [B, T, D]: at position t, the output at the last valid position <= t
    (zeros before the first valid one). Its last row is "last" pooling."""
    T = mask.shape[1]
    index = jax.lax.cummax(jnp.where(mask, jnp.arange(T)[None, :], 0), axis=1)  # [B, T]
    seen = jax.lax.cummax(mask.astype(jnp.int32), axis=1)[:, :, None]  # [B, T, 1]
    return jnp.take_along_axis(outputs, index[:, :, None], axis=1) * seen.astype(outputs.dtype)  # [B, T, D]


def retrieve_top_k(user_representation, corpus_embeddings, top_k: int, corpus_mask=None):
    """Exact top-k of user [B, D] @ corpus [N, D].T; masked entries score -INF, so they come last."""
    # user @ corpus.T, not einsum: on CPU XLA fuses it into a loop reading the corpus in place (faster than
    # the GEMV call an einsum becomes; docs/index.md, "Lab notes")
    scores = jnp.matmul(user_representation, corpus_embeddings.T)  # [B, N]
    if corpus_mask is not None:
        scores = jnp.where(corpus_mask[None, :], scores, -INF)
    top_k_scores, top_k_indices = jax.lax.top_k(scores, top_k)  # [B, K] each
    return top_k_indices, top_k_scores


class PhoenixRetrievalModel(PhoenixModel):
    """Transformer user tower + MLP candidate tower.

    Shares the ranker's input construction (its action/surface embeddings and proj_mat_1/3).
    """

    def __init__(self, model, config: PhoenixRetrievalModelConfig, fprop_dtype=jnp.bfloat16,
                 name: Optional[str] = None):
        super().__init__(model=model, config=config, fprop_dtype=fprop_dtype,
                         name=name or "phoenix_retrieval_model")

    def build_user_sequence(self, batch: RecsysBatch, recsys_embeddings: RecsysEmbeddings):
        """-> (outputs [B, 1+S, D], mask [B, 1+S]): the user tower's transformer output at every
        user/history position, before pooling; `build_user_representation` pools it (config.pooling).

        With causal attention (the release's) position p depends on positions 0..p only, so e.g.
        the running mean over valid positions gives the representation of every history prefix.
        """
        self._check(batch, recsys_embeddings, need_candidates=False)
        x, mask = self.user_sequence(batch, recsys_embeddings)  # [B, 1+S, D], [B, 1+S]
        return self.model(x, mask, candidate_start_offset=None).embeddings, mask  # [B, 1+S, D], [B, 1+S]

    def build_user_representation(self, batch: RecsysBatch, recsys_embeddings: RecsysEmbeddings):
        """-> (user_representation [B, D] unit norm, user_norm [B, 1] before normalising).

        The transformer outputs pooled over valid positions by config.pooling: their mean (the
        release's) or the last valid one's. With no valid position both give 0 (norm sqrt(EPS)).
        """
        out, mask = self.build_user_sequence(batch, recsys_embeddings)  # [B, 1+S, D], [B, 1+S]
        if check_pooling(self.config.pooling) == "last":
            return l2_normalize(last_valid(out, mask)[:, -1])  # [B, D]
        mask_f = mask.astype(jnp.float32)[:, :, None]  # [B, 1+S, 1]
        mean = jnp.sum(out * mask_f, axis=1) / jnp.maximum(jnp.sum(mask_f, axis=1), 1.0)  # [B, D]
        return l2_normalize(mean)

    def build_candidate_representation(self, batch: RecsysBatch, recsys_embeddings: RecsysEmbeddings):
        """-> (candidate_representation [B, C, D] unit norm, candidate_mask [B, C])."""
        cfg = self.config
        check_candidate_inputs(batch, recsys_embeddings, cfg.hash_config, cfg.emb_size)
        post_author = jnp.concatenate([recsys_embeddings.candidate_post_embeddings,
                                       recsys_embeddings.candidate_author_embeddings], axis=2)  # [B, C, Hi+Ha, D]
        representation = CandidateTower(emb_size=cfg.emb_size)(post_author)  # [B, C, D]
        return representation, batch.candidate_post_hashes[:, :, 0] != 0

    def _retrieve_top_k(self, user_representation, corpus_embeddings, top_k, corpus_mask=None):
        """-> (top_k_indices [B, K], top_k_scores [B, K]) over the corpus, best first."""
        N = corpus_embeddings.shape[0]
        check_array(corpus_embeddings, "corpus_embeddings", (N, user_representation.shape[-1]), "float")
        if N == 0:
            raise ValueError("corpus_embeddings: expected at least one row, got an empty corpus")
        if corpus_mask is not None:
            check_array(corpus_mask, "corpus_mask", (N,), "bool")
        return retrieve_top_k(user_representation, corpus_embeddings, check_top_k(top_k, N, "corpus size"),
                              corpus_mask)

    def __call__(self, batch: RecsysBatch, recsys_embeddings: RecsysEmbeddings, corpus_embeddings=None,
                 top_k: Optional[int] = None, corpus_mask=None) -> RetrievalOutput:
        """Top-k corpus entries per user; without a corpus, the batch's own candidates are ranked.

        With `corpus_embeddings` [N, D]: scores = user @ corpus.T, masked entries -INF, best first,
        `top_k` defaults to N. Without (the configuration guide's `model(batch, embeddings)`):
        scores against the candidate tower's representations of the batch's candidates, padded
        candidates -INF (so never above a valid one), `top_k` defaults to C; indices are
        candidate positions.
        """
        user, _ = self.build_user_representation(batch, recsys_embeddings)  # [B, D]
        if corpus_embeddings is not None:
            top_k = corpus_embeddings.shape[0] if top_k is None else top_k
            indices, scores = self._retrieve_top_k(user, corpus_embeddings, top_k, corpus_mask)
            return RetrievalOutput(user, indices, scores)
        if corpus_mask is not None:
            raise ValueError("corpus_mask: given without corpus_embeddings")
        cand, cand_mask = self.build_candidate_representation(batch, recsys_embeddings)  # [B, C, D], [B, C]
        C = cand.shape[1]
        top_k = check_top_k(C if top_k is None else top_k, C, "candidates per user")
        scores = jnp.einsum("bd,bcd->bc", user, cand.astype(user.dtype))  # [B, C]
        scores = jnp.where(cand_mask, scores, -INF)
        top_k_scores, top_k_indices = jax.lax.top_k(scores, top_k)
        return RetrievalOutput(user, top_k_indices, top_k_scores)
