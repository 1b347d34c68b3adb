"""The Grok-1-derived transformer shared by Phoenix's ranker and retrieval user tower.

Shape glossary
  B  batch                      T  sequence length (1 + S [+ C])
  D  model width (emb_size)     F  feed-forward width, ffn_size(D, widening_factor)
  h  kv heads                   g  query heads per kv head (num_q_heads // num_kv_heads; H is kept for hashes)
  d  key_size (head width)      t / T  query / key positions in einsums
  P  prefix positions, 1 + S (the keys a candidate attends to)   R  rows one attention call computes

Arithmetic follows the release exactly: sandwich RMSNorms, gated-GELU feed-forward, rotary
embeddings on queries and keys, attention logits soft-capped at 30 with tanh, float32 islands for
norms, softmax and rotary phases. Only the default initialisation differs: the
release initialised every weight and norm scale to zero, which made the transformer an identity
that no gradient could enter.
"""

import dataclasses
from typing import NamedTuple, Optional

import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
    # the release's names (shared/phoenix-spec.md section 1)
    "TrainingState", "ffn_size", "make_recsys_attn_mask", "MHAOutput", "DecoderOutput", "TransformerOutput",
    "TransformerConfig", "hk_rms_norm", "Linear", "RMSNorm", "rotate_half", "RotaryEmbedding", "MultiHeadAttention",
    "MHABlock", "DenseBlock", "DecoderLayer", "layer_norm", "Transformer",
    # the arithmetic's constants
    "ROPE_BASE", "ATTN_SOFT_CAP", "MASKED_LOGIT", "RMS_NORM_EPS", "FFN_MULTIPLE",
    # the fused fast path: deferred norms, row attention over a cached prefix
    "KVMemory", "DeferredNorm", "fused_linear", "DEFER_NORMS", "defers_norms", "pre_norm", "soft_cap", "attention",
    "RowLayout", "rope_phases", "apply_rope", "row_attention", "PER_HEAD_MAX_KV_HEADS", "KEY_PAD_MULTIPLE",
]

ROPE_BASE = 10_000  # rotary base exponent
ATTN_SOFT_CAP = 30.0  # logits -> SOFT_CAP * tanh(logits / SOFT_CAP)
MASKED_LOGIT = -1e30  # value given to masked attention logits before the float32 softmax
RMS_NORM_EPS = 1e-5
FFN_MULTIPLE = 8  # ffn_size rounds up to a multiple of this


class TrainingState(NamedTuple):
    """Parameters of a model (the release's runner state)."""

    params: hk.Params


def ffn_size(emb_size: int, widening_factor: float) -> int:
    """Hidden width of the gated feed-forward: 2/3 of widening*D, rounded up to a multiple of 8."""
    size = int(widening_factor * emb_size) * 2 // 3
    return size + (-size) % FFN_MULTIPLE


def make_recsys_attn_mask(
    seq_len: int,
    candidate_start_offset: int,
    dtype=jnp.float32,
    bidirectional_prefix: bool = False,
) -> jax.Array:
    """Candidate-isolation mask [1, 1, T, T] (1 = may attend).

    Rows before `candidate_start_offset` (user + history) are causal, or fully bidirectional among
    themselves with `bidirectional_prefix`; each candidate row sees the whole prefix and itself only.
    """
    causal = jnp.tril(jnp.ones((seq_len, seq_len), dtype=jnp.bool_))  # [T, T]
    pos = jnp.arange(seq_len)
    is_cand_q = pos[:, None] >= candidate_start_offset  # [T, 1]
    is_cand_k = pos[None, :] >= candidate_start_offset  # [1, T]
    mask = causal & ~(is_cand_q & is_cand_k & (pos[:, None] != pos[None, :]))
    if bidirectional_prefix:
        mask = mask | (~is_cand_q & ~is_cand_k)
    return mask.astype(dtype)[None, None, :, :]  # [1, 1, T, T]


def _causal_mask(seq_len: int, dtype, bidirectional: bool = False) -> jax.Array:
    if bidirectional:
        return jnp.ones((1, 1, seq_len, seq_len), dtype=dtype)
    return jnp.tril(jnp.ones((seq_len, seq_len), dtype=dtype))[None, None, :, :]  # [1, 1, T, T]


class MHAOutput(NamedTuple):
    embeddings: jax.Array  # [B, T, D]
    memory: Optional["KVMemory"] = None


class DecoderOutput(NamedTuple):
    embeddings: jax.Array  # [B, T, D]
    memory: Optional["KVMemory"] = None


class KVMemory(NamedTuple):
    """Rotated keys and values of one attention layer: the prefix cache of isolated ranking."""

    keys: jax.Array  # [B, P, h, d]
    values: jax.Array  # [B, P, h, d]
    mask: jax.Array  # [B, P] bool, key may be attended (False = padding)


class TransformerOutput(NamedTuple):
    embeddings: jax.Array  # [B, T, D]
    # Per-layer rotated keys/values (list of KVMemory); unused outputs cost nothing under jit.
    memory: Optional[list] = None


@dataclasses.dataclass
class TransformerConfig:
    """Transformer hyper-parameters. `.make()` builds the `Transformer`."""

    emb_size: int  # D, model width
    key_size: int  # d, width of each attention head (even: rotary pairs halves)
    num_q_heads: int
    num_kv_heads: int  # grouped-query attention: num_q_heads % num_kv_heads == 0
    num_layers: int
    widening_factor: float = 4.0  # feed-forward width = ffn_size(D, widening_factor)
    attn_output_multiplier: float = 1.0  # scale on attention logits (the release uses 1/sqrt(d))
    name: Optional[str] = None
    # Off (the release): user+history rows attend causally. On: user+history attend to each other
    # in both directions. Candidates stay isolated either way.
    bidirectional_history: bool = False

    def __post_init__(self):
        for field in ("emb_size", "key_size", "num_q_heads", "num_kv_heads", "num_layers"):
            value = getattr(self, field)
            if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"TransformerConfig.{field} must be a positive int, got {value!r}")
        if self.num_q_heads % self.num_kv_heads:
            raise ValueError(
                f"TransformerConfig: num_q_heads ({self.num_q_heads}) must be a multiple of "
                f"num_kv_heads ({self.num_kv_heads}) for grouped-query attention")
        if self.key_size % 2:
            raise ValueError(f"TransformerConfig.key_size must be even (rotary embeddings rotate "
                             f"pairs of halves), got {self.key_size}")
        if not self.widening_factor > 0:
            raise ValueError(f"TransformerConfig.widening_factor must be > 0, got {self.widening_factor}")

    def make(self) -> "Transformer":
        return Transformer(
            num_q_heads=self.num_q_heads,
            num_kv_heads=self.num_kv_heads,
            key_size=self.key_size,
            widening_factor=self.widening_factor,
            attn_output_multiplier=self.attn_output_multiplier,
            num_layers=self.num_layers,
            bidirectional_history=self.bidirectional_history,
            name=self.name,
        )


def _default_w_init() -> hk.initializers.Initializer:
    # Fan-in scaling keeps activations at unit scale through every projection (the release used 0).
    return hk.initializers.VarianceScaling(1.0, "fan_in", "truncated_normal")


class Linear(hk.Linear):
    """Dense layer with float32 weights cast to the input dtype before the matmul."""

    def __init__(self, output_size: int, with_bias: bool = True, name: Optional[str] = None):
        super().__init__(output_size=output_size, with_bias=with_bias, name=name)

    def weight(self, input_size: int) -> jax.Array:
        """The float32 weight `w` [in, out], created on first use (lets callers fuse matmuls)."""
        return hk.get_parameter("w", [input_size, self.output_size], jnp.float32, init=_default_w_init())

    def __call__(self, inputs: jax.Array) -> jax.Array:
        fprop_dtype = inputs.dtype
        w = self.weight(inputs.shape[-1])
        out = jnp.dot(inputs, w.astype(fprop_dtype))
        if self.with_bias:
            b = hk.get_parameter("b", [self.output_size], jnp.float32, init=jnp.zeros)
            out = out + b.astype(fprop_dtype)
        return out


class DeferredNorm(NamedTuple):
    """RMSNorm(x) not yet applied: x * inv_rms * scale, for a matmul to apply after the fact.

    x [..., D] float32, inv_rms [..., 1] = rsqrt(mean(x^2) + eps), scale [D]. A matmul of the
    normalised rows equals (x @ (scale[:, None] * w)) * inv_rms: the scale folds into the weight
    (a constant where the parameters are compiled in) and the row factor joins whatever
    elementwise work follows the matmul, so the normalised rows are never written out.
    """

    x: jax.Array
    inv_rms: jax.Array
    scale: jax.Array

    @property
    def shape(self):
        return self.x.shape

    @property
    def dtype(self):
        return self.x.dtype


def fused_linear(inputs, layers: list) -> list:
    """Bias-free `Linear`s applied to one input as a single matmul against [w_1 | w_2 | ...].

    Each output column is the same dot product as the separate layer's; one wide matmul instead
    of several narrow ones saves a kernel launch and a pass over `inputs` per extra layer.
    `inputs` may be a DeferredNorm (float32): the norm's scale then multiplies the weight's rows
    and its row factor the output.
    """
    ws = [layer.weight(inputs.shape[-1]) for layer in layers]  # created in list order
    w = jnp.concatenate(ws, axis=1)  # [D, sum of outs]
    if isinstance(inputs, DeferredNorm):
        out = jnp.dot(inputs.x, inputs.scale[:, None] * w) * inputs.inv_rms
    else:
        out = jnp.dot(inputs, w.astype(inputs.dtype))  # [..., sum of outs]
    return jnp.split(out, np.cumsum([w.shape[1] for w in ws])[:-1].tolist(), axis=-1)


class RMSNorm(hk.RMSNorm):
    """x * rsqrt(mean(x^2) + 1e-5) * scale, computed in float32 and cast back."""

    def __init__(self, axis=-1, eps: float = RMS_NORM_EPS, create_scale: bool = True, name=None):
        super().__init__(axis=axis, eps=eps, create_scale=create_scale, name=name)

    def __call__(self, inputs: jax.Array) -> jax.Array:
        fprop_dtype = inputs.dtype
        x = inputs.astype(jnp.float32)
        if self.create_scale:
            scale = hk.get_parameter("scale", (inputs.shape[-1],), jnp.float32, init=jnp.ones)
        else:
            scale = 1.0
        mean_sq = jnp.mean(jnp.square(x), axis=-1, keepdims=True)
        return (x * jax.lax.rsqrt(mean_sq + self.eps) * scale).astype(fprop_dtype)

    def deferred(self, inputs: jax.Array) -> DeferredNorm:
        """The same norm, parameter and arithmetic, left for a float32 matmul to apply (DeferredNorm)."""
        if inputs.dtype != jnp.float32 or not self.create_scale:
            raise ValueError(f"inputs: a deferred RMSNorm takes float32 rows with a learned scale, got {inputs.dtype}")
        scale = hk.get_parameter("scale", (inputs.shape[-1],), jnp.float32, init=jnp.ones)
        mean_sq = jnp.mean(jnp.square(inputs), axis=-1, keepdims=True)
        return DeferredNorm(inputs, jax.lax.rsqrt(mean_sq + self.eps), scale)


def hk_rms_norm(x: jax.Array, fixed_scale: bool = False) -> jax.Array:
    """Applies a fresh RMSNorm (named rms_norm, rms_norm_1, ... in the calling scope)."""
    return RMSNorm(create_scale=not fixed_scale)(x)


def layer_norm(x: jax.Array) -> jax.Array:
    return hk_rms_norm(x)


# The fused fast path hands float32 pre-attention and pre-FFN norms to their matmuls as DeferredNorm.
DEFER_NORMS = True


def defers_norms(x: jax.Array) -> bool:
    """Whether the fused fast path hands norms of rows like x to their matmuls (float32 only)."""
    return DEFER_NORMS and x.dtype == jnp.float32


def pre_norm(x: jax.Array, fused: bool):
    """The norm in front of a fused projection: a DeferredNorm on the fused float32 path, else
    the normalised rows (the release's arithmetic, every dtype)."""
    if fused and defers_norms(x):
        return RMSNorm().deferred(x)
    return layer_norm(x)


def rotate_half(x: jax.Array) -> jax.Array:
    """[x1, x2] -> [-x2, x1] over the halves of the last axis."""
    x1, x2 = jnp.split(x, 2, axis=-1)
    return jnp.concatenate((-x2, x1), axis=-1)


class RotaryEmbedding(hk.Module):
    """Rotary position embedding with base 10000; phases in float32."""

    def __init__(self, dim: int, name: Optional[str] = None, base_exponent: int = ROPE_BASE):
        super().__init__(name=name)
        if dim % 2:
            raise ValueError(f"RotaryEmbedding: dim (key_size) must be even, got {dim}")
        self.dim = dim
        self.base_exponent = base_exponent

    def __call__(self, x: jax.Array, seq_dim: int = 1, offset=0, positions=None) -> jax.Array:
        """x [B, T, heads, d]; positions [B or 1, T] (default offset + 0..T-1)."""
        fprop_dtype = x.dtype
        exponents = jnp.arange(0, self.dim, 2, dtype=jnp.float32)  # [d/2]
        inv_freq = 1.0 / (self.base_exponent ** (exponents / self.dim))  # [d/2]
        if positions is None:
            positions = (jnp.arange(x.shape[seq_dim], dtype=jnp.float32) + offset)[None, :]  # [1, T]
        phase = jnp.einsum("bt,j->btj", positions.astype(jnp.float32), inv_freq)  # [B, T, d/2]
        phase = jnp.tile(phase, reps=(1, 1, 2))[:, :, None, :]  # [B, T, 1, d]
        x = x * jnp.cos(phase) + rotate_half(x) * jnp.sin(phase)
        return x.astype(fprop_dtype)




def soft_cap(logits: jax.Array) -> jax.Array:
    """30 * tanh(logits / 30), applied to float32 attention logits."""
    return ATTN_SOFT_CAP * jnp.tanh(logits / ATTN_SOFT_CAP)


def attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array, multiplier: float) -> jax.Array:
    """Masked softmax attention with the release's arithmetic.

    q [B, t, h, g, d]; k, v [B, T, h, d]; mask broadcastable to [B, 1, t, T] (nonzero = attend).
    Logits in the input dtype, then float32 for scale, soft-cap, mask and softmax; weights cast back.
    Returns [B, t, h*g*d].
    """
    B, t = q.shape[:2]
    logits = jnp.einsum("bthgd,bThd->bhgtT", q, k).astype(jnp.float32)  # [B, h, g, t, T]
    logits = soft_cap(logits * multiplier)
    logits = jnp.where(mask[:, :, None, :, :] != 0, logits, MASKED_LOGIT)
    weights = jax.nn.softmax(logits).astype(q.dtype)
    out = jnp.einsum("bhgtT,bThd->bthgd", weights, v)  # [B, t, h, g, d]
    return out.reshape(B, t, -1)


class RowLayout(NamedTuple):
    """How the rows of a fast-path Transformer call attend (internal; passed to layers as `mask`).

    Rows [0, num_prefix) are prefix rows (user + history): causal among themselves, or all-to-all
    with `bidirectional`. The remaining rows are candidates: each attends to every valid prefix
    key and to its own key only. With a cached prefix (`prefix=` memory) num_prefix is 0 and the
    prefix keys come from the cache. Only rows [query_start, T) produce outputs (the last layer
    of a ranking call needs candidate rows only; the prefix rows there only give keys/values).
    """

    num_prefix: int  # static
    key_mask: jax.Array  # [B, P] bool, prefix keys that may be attended (False = padding)
    row_mask: jax.Array  # [B, T] bool, row validity: a candidate's own key may be attended
    cos: jax.Array  # [1 or B, T, d/2] float32 rotary phases of the rows (computed once per call)
    sin: jax.Array
    bidirectional: bool = False
    query_start: int = 0  # static


def rope_phases(positions: jax.Array, dim: int, base_exponent: int = ROPE_BASE):
    """cos, sin [B or 1, T, dim/2] of RotaryEmbedding's phases (the untiled half: both halves are equal)."""
    exponents = jnp.arange(0, dim, 2, dtype=jnp.float32)  # [d/2]
    inv_freq = 1.0 / (base_exponent ** (exponents / dim))  # [d/2]
    phase = jnp.einsum("bt,j->btj", positions.astype(jnp.float32), inv_freq)  # [B, T, d/2] as RotaryEmbedding
    return jnp.cos(phase), jnp.sin(phase)


_jit_rope_phases = jax.jit(rope_phases, static_argnums=(1, 2))


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """RotaryEmbedding on x [B, T, heads, d] from precomputed phases: the same products and sums.

    x*cos + rotate_half(x)*sin with the tiled phase is [x1*c - x2*s, x2*c + x1*s] on the halves.
    """
    x1, x2 = jnp.split(x, 2, axis=-1)
    c, s = cos[:, :, None, :], sin[:, :, None, :]  # [B or 1, T, 1, d/2]
    return jnp.concatenate([x1 * c - x2 * s, x2 * c + x1 * s], axis=-1).astype(x.dtype)


# Up to this many kv heads, attention runs head by head as plain matmuls [R*g, d] x [d, P] and
# [R*g, P] x [P, d] (batched over B only): batched dots over a head axis in the middle of the
# layout make XLA CPU transpose queries and outputs around slow batched kernels, and
# block-diagonal [h*d, h*P] keys waste h-fold multiply-adds (measured: docs/speed.md, "Figures
# behind the code's choices").
PER_HEAD_MAX_KV_HEADS = 8
# Prefix keys/values are padded with masked zero rows up to a multiple of this many (129 -> 136 for
# S=128): the matmul kernels run the [R, d] x [d, P] and [R, P] x [P, d+1] products faster on an
# aligned P; a masked key's weight is exactly 0, so outputs are unchanged (the cache keeps P rows).
# Measured: docs/speed.md, "Figures behind the code's choices".
KEY_PAD_MULTIPLE = 8


def _self_logits(q: jax.Array, q_k: jax.Array) -> jax.Array:
    """Each row's logits with its own key: q [B, R, h, g, d] . q_k [B, R, h, d] -> [B, R, h, g].

    In float32 as a products-then-matmul with a 0/1 block matrix [h*g*d, h*g]: XLA CPU runs the
    equivalent multiply-reduce as a slow reduction (measured: docs/speed.md).
    Other dtypes keep the einsum, whose dot accumulates the products before rounding.
    """
    B, R, h, g, d = q.shape
    if q.dtype != jnp.float32:
        return jnp.einsum("brhgd,brhd->brhg", q, q_k)
    blocks = jnp.repeat(jnp.eye(h * g, dtype=q.dtype), d, axis=0)  # [h*g*d, h*g]: column i sums head i's d
    products = (q * q_k[:, :, :, None, :]).reshape(B * R, h * g * d)
    return jnp.dot(products, blocks, precision=jax.lax.Precision.HIGHEST).reshape(B, R, h, g)


def row_attention(q: jax.Array, k: jax.Array, v: jax.Array, layout: RowLayout, prefix: Optional[KVMemory],
                  multiplier: float):
    """The fast path's attention: prefix rows causal (or bidirectional), candidates isolated.

    q [B, T, h, g, d], k, v [B, T, h, d] unrotated projections of the T rows. Keys/values: the
    rotated prefix rows' own (prefix None), or the cached `prefix` [B, P, h, d]. Each candidate
    row's softmax spans the P prefix logits plus its own logit (q.k with its own key, which needs
    no rotation: both sit at the same position, so the rotation cancels); the masked model's
    other logits are -1e30 there and vanish. The softmax is written out so the self logit joins
    it without a [.., P+1] concatenation: exp without a max shift (see exp_logits), the weights'
    sum from the value matmul itself (a ones column), normalised after that matmul on the
    [R, d] outputs. The prefix keys are padded with masked rows to an aligned count
    (KEY_PAD_MULTIPLE). Heads run one by one as plain matmuls (PER_HEAD_MAX_KV_HEADS). O(T*P).
    Returns (outputs [B, T - query_start, h*g*d], KVMemory of the prefix rows or None).
    """
    B, T, h, g, d = q.shape
    P0, Q0 = layout.num_prefix, layout.query_start
    R = T - Q0
    q, q_k, q_v = q[:, Q0:], k[:, Q0:], v[:, Q0:]  # query rows [B, R, ...]
    self_logits = _self_logits(q, q_k)  # [B, R, h, g], rotation cancels
    q = apply_rope(q.reshape(B, R, h * g, d), layout.cos[:, Q0:], layout.sin[:, Q0:]).reshape(B, R, h, g, d)
    if prefix is None:
        keys = apply_rope(k[:, :P0], layout.cos[:, :P0], layout.sin[:, :P0])  # [B, P, h, d]
        values = v[:, :P0]
        memory = KVMemory(keys, values, layout.key_mask)
    else:
        keys, values, memory = prefix.keys, prefix.values, None
    P = keys.shape[1]
    rows = Q0 + jnp.arange(R)  # [R]
    cols = jnp.arange(P)  # [P]
    is_prefix_row = rows < P0  # [R]
    structure = (cols[None, :] <= rows[:, None]) | ~is_prefix_row[:, None]  # [R, P]
    if layout.bidirectional:
        structure = jnp.ones_like(structure)
    allowed = (layout.key_mask[:, None, :] & structure[None])[:, :, None, :]  # [B, R, 1, P]
    # Prefix rows already have their own key among the P; candidates add theirs here.
    self_ok = (layout.row_mask[:, Q0:] & ~is_prefix_row[None, :])[:, :, None]  # [B, R, 1]
    pad = -P % KEY_PAD_MULTIPLE  # masked zero keys up to an aligned P (KEY_PAD_MULTIPLE); memory keeps P
    if pad:
        keys = jnp.pad(keys, ((0, 0), (0, pad), (0, 0), (0, 0)))  # [B, P + pad, h, d]
        values = jnp.pad(values, ((0, 0), (0, pad), (0, 0), (0, 0)))
        allowed = jnp.pad(allowed, ((0, 0), (0, 0), (0, 0), (0, pad)))  # padding never attended
        P += pad

    def exp_logits(logits, self_logits):
        """exp of the soft-capped, masked logits [B, R, g, P] and self logits [B, R, g] (float32).

        No max is subtracted: soft-capped logits lie in [-30, 30], so exp stays below 1.1e13 and
        a sum of any realistic number of them is far from float32 overflow; masked logits give
        exactly 0, as in the masked model's max-shifted softmax.
        """
        logits = jnp.where(allowed, soft_cap(logits.astype(jnp.float32) * multiplier), MASKED_LOGIT)
        self_logits = jnp.where(self_ok, soft_cap(self_logits.astype(jnp.float32) * multiplier), MASKED_LOGIT)
        return jnp.exp(logits), jnp.exp(self_logits)

    def normalise(weighted, total):
        # A row with every key masked (a padded position) has total 0: output 0, not NaN.
        return weighted / jnp.where(total > 0, total, 1.0)[..., None]

    if h > PER_HEAD_MAX_KV_HEADS:  # many heads: one batched dot per matmul beats h small ones
        logits = jnp.einsum("brhgd,bPhd->brhgP", q, keys).reshape(B, R, h * g, P)
        e, e_self = exp_logits(logits, self_logits.reshape(B, R, h * g))
        e, e_self = e.reshape(B, R, h, g, P), e_self.reshape(B, R, h, g)
        total = jnp.sum(e, axis=-1) + e_self  # [B, R, h, g]
        weighted = jnp.einsum("brhgP,bPhd->brhgd", e.astype(v.dtype), values, preferred_element_type=jnp.float32)
        out = normalise(weighted + e_self[..., None] * q_v[:, :, :, None, :], total)
        return out.astype(v.dtype).reshape(B, R, -1), memory
    outs = []
    for j in range(h):  # kv head j and its g query heads
        logits = jnp.einsum("bmd,bPd->bmP", q[:, :, j].reshape(B, R * g, d), keys[:, :, j])  # [B, R*g, P]
        e, e_self = exp_logits(logits.reshape(B, R, g, P), self_logits[:, :, j])  # [B, R, g, P], [B, R, g]
        # A column of ones beside the values makes the same matmul return each row's sum of
        # weights (no separate reduction pass over the [R, P] weights).
        values_1 = jnp.concatenate([values[:, :, j], jnp.ones((B, P, 1), v.dtype)], axis=-1)  # [B, P, d+1]
        weighted = jnp.einsum("bmP,bPd->bmd", e.reshape(B, R * g, P).astype(v.dtype), values_1,
                              preferred_element_type=jnp.float32).reshape(B, R, g, d + 1)
        total = weighted[..., d] + e_self  # [B, R, g]
        outs.append(normalise(weighted[..., :d] + e_self[..., None] * q_v[:, :, j, None, :], total))
    return jnp.stack(outs, axis=2).astype(v.dtype).reshape(B, R, -1), memory  # query head j*g + i is kv head j's i-th


@dataclasses.dataclass
class MultiHeadAttention(hk.Module):
    """Grouped-query self-attention with rotary embeddings and a tanh soft-cap."""

    num_q_heads: int
    num_kv_heads: int
    key_size: int
    model_size: int
    attn_output_multiplier: float = 1.0
    name: Optional[str] = None

    def __call__(self, query: jax.Array, key: jax.Array, value: jax.Array, mask: jax.Array,
                 positions: Optional[jax.Array] = None, prefix: Optional[KVMemory] = None,
                 fused: bool = False) -> MHAOutput:
        """Self-attention over query [B, T, D] (key and value are the same array, as in the release).

        mask [B, 1, T, T] (1 = may attend). With `prefix` (isolated mode) the rows are candidates:
        each attends to the prefix keys/values and itself; `mask` is then [B, T] candidate validity,
        and the output has no memory (no row ever attends to a candidate's key). `mask` may also be
        a RowLayout (the Transformer's fast path, see `row_attention`): then the output holds rows
        [query_start, T) only and the memory is the prefix rows' keys/values.
        positions [1 or B, T]: rotary positions (default 0..T-1).
        fused: Q, K and V in one matmul (same parameters; equal up to float summation order).
        """
        del key, value
        B, T, _ = query.shape
        h, g, d = self.num_kv_heads, self.num_q_heads // self.num_kv_heads, self.key_size
        projections = [Linear(h * g * d, with_bias=False, name="query"), Linear(h * d, with_bias=False, name="key"),
                       Linear(h * d, with_bias=False, name="value")]
        if fused:
            q, k, v = fused_linear(query, projections)
        else:
            q, k, v = (layer(query) for layer in projections)
        q = q.reshape(B, T, h, g, d)  # query head j*g + i uses kv head j
        k = k.reshape(B, T, h, d)
        v = v.reshape(B, T, h, d)
        if prefix is not None and not isinstance(mask, RowLayout):  # candidates [B, T] against a cache
            pos = jnp.arange(T, dtype=jnp.float32)[None, :] if positions is None else positions
            mask = RowLayout(0, prefix.mask, mask, *rope_phases(pos, d))
        if isinstance(mask, RowLayout):
            out, memory = row_attention(q, k, v, mask, prefix, self.attn_output_multiplier)
        else:
            rotate = RotaryEmbedding(dim=d, base_exponent=ROPE_BASE)
            k = rotate(k, seq_dim=1, offset=0, positions=positions)
            q = rotate(q.reshape(B, T, h * g, d), seq_dim=1, offset=0, positions=positions).reshape(B, T, h, g, d)
            out = attention(q, k, v, mask, self.attn_output_multiplier)
            memory = KVMemory(k, v, jnp.ones((B, T), jnp.bool_))
        out = Linear(self.model_size, with_bias=False, name="linear")(out)  # [B, T, D]
        return MHAOutput(out, memory)


@dataclasses.dataclass
class MHABlock(hk.Module):
    """Attention sub-block; transparent, so its parameters sit directly under the decoder layer."""

    num_q_heads: int
    num_kv_heads: int
    key_size: int
    attn_output_multiplier: float = 1.0
    name: Optional[str] = None

    @hk.transparent
    def __call__(self, inputs: jax.Array, mask: jax.Array, positions=None, prefix=None,
                 fused: bool = False) -> MHAOutput:
        return MultiHeadAttention(
            num_q_heads=self.num_q_heads,
            num_kv_heads=self.num_kv_heads,
            key_size=self.key_size,
            model_size=inputs.shape[-1],
            attn_output_multiplier=self.attn_output_multiplier,
        )(inputs, inputs, inputs, mask, positions, prefix, fused=fused)


@dataclasses.dataclass
class DenseBlock(hk.Module):
    """Gated GELU feed-forward: linear_1(gelu(linear(x)) * linear_v(x))."""

    widening_factor: float = 4.0
    name: Optional[str] = None

    @hk.transparent
    def __call__(self, inputs: jax.Array, fused: bool = False) -> jax.Array:
        """fused: both input projections in one matmul (same parameters and creation order)."""
        D = inputs.shape[-1]
        F = ffn_size(D, self.widening_factor)
        gate, up = Linear(F, with_bias=False, name="linear_v"), Linear(F, with_bias=False)  # the latter "linear"
        if fused:
            h_v, h_w1 = fused_linear(inputs, [gate, up])  # [B, T, F] each
        else:
            h_v, h_w1 = gate(inputs), up(inputs)  # [B, T, F] gate branch, GELU branch
        return Linear(D, with_bias=False)(jax.nn.gelu(h_w1) * h_v)  # [B, T, D], named "linear_1"


@dataclasses.dataclass
class DecoderLayer(hk.Module):
    """Sandwich-norm layer: h = x + norm(MHA(norm(x))); h = h + norm(FFN(norm(h))).

    Its four RMSNorms are created in that order: rms_norm, rms_norm_1, rms_norm_2, rms_norm_3.
    """

    num_q_heads: int
    num_kv_heads: int
    key_size: int
    widening_factor: float = 4.0
    attn_output_multiplier: float = 1.0
    name: Optional[str] = None

    def __call__(self, inputs: jax.Array, mask: jax.Array, padding_mask=None, positions=None,
                 prefix: Optional[KVMemory] = None, fused: bool = False) -> DecoderOutput:
        del padding_mask  # already folded into `mask` by the Transformer
        mha = MHABlock(self.num_q_heads, self.num_kv_heads, self.key_size, self.attn_output_multiplier)
        attn = mha(pre_norm(inputs, fused), mask, positions, prefix, fused=fused)
        rows = attn.embeddings.shape[1]  # fewer than T when a RowLayout asks for the last rows only
        h = inputs[:, inputs.shape[1] - rows:] + layer_norm(attn.embeddings)
        h = h + layer_norm(DenseBlock(self.widening_factor)(pre_norm(h, fused), fused=fused))
        return DecoderOutput(h, attn.memory)


@dataclasses.dataclass
class Transformer(hk.Module):
    """Stack of decoder layers named decoder_layer_{i}."""

    num_q_heads: int
    num_kv_heads: int
    key_size: int
    widening_factor: float
    attn_output_multiplier: float
    num_layers: int
    bidirectional_history: bool = False
    name: Optional[str] = None

    def __call__(self, embeddings: jax.Array, mask: jax.Array, candidate_start_offset: Optional[int] = None,
                 *, positions: Optional[jax.Array] = None, prefix: Optional[list] = None,
                 fused: bool = False) -> TransformerOutput:
        """embeddings [B, T, D] in fprop dtype; mask [B, T] bool (False = padding).

        Full path (prefix None): attention mask = key padding x (candidate-isolation mask when
        `candidate_start_offset` is given, else causal; user+history bidirectional if configured).
        The output's `memory` holds each layer's rotated keys/values: with candidate_start_offset
        None it is exactly the prefix cache of isolated ranking.

        Isolated path (prefix = that memory): `embeddings` are candidates [B, C, D], `mask` their
        validity [B, C], `positions` [1 or B, C] their rotary positions in the full sequence
        (1 + S + c). Each candidate attends to the prefix and itself, equal to the masked path.
        The output then has no memory (candidates' keys are never attended to).

        fused: the serving fast path (same parameters, equal up to float rounding): each layer's
        Q/K/V and its two feed-forward input projections as one matmul each, and attention as
        `row_attention` (O(T * prefix), prefix rows causal, candidates isolated; see `_fast`).
        With candidate_start_offset it returns the candidate rows' embeddings only, [B, C, D],
        and each layer's prefix keys/values as memory.
        """
        fprop_dtype = embeddings.dtype
        T = embeddings.shape[1]
        if prefix is not None or fused:
            return self._fast(embeddings, mask, candidate_start_offset, positions, prefix, fused)
        key_mask = mask[:, None, None, :].astype(fprop_dtype)  # [B, 1, 1, T]
        if candidate_start_offset is not None:
            structure = make_recsys_attn_mask(T, candidate_start_offset, fprop_dtype,
                                              self.bidirectional_history)
        else:
            structure = _causal_mask(T, fprop_dtype, self.bidirectional_history)
        layer_mask = key_mask * structure  # [B, 1, T, T]
        h = embeddings
        memory = []
        for i in range(self.num_layers):
            out = self._layer(i)(h, layer_mask, mask, positions, None)
            h = out.embeddings
            memory.append(out.memory._replace(mask=mask))
        return TransformerOutput(h, memory)

    @hk.transparent  # layers named transformer/decoder_layer_{i}, not ~_layer/...
    def _layer(self, i: int) -> "DecoderLayer":
        return DecoderLayer(
            num_q_heads=self.num_q_heads,
            num_kv_heads=self.num_kv_heads,
            key_size=self.key_size,
            widening_factor=self.widening_factor,
            attn_output_multiplier=self.attn_output_multiplier,
            name=f"decoder_layer_{i}",
        )

    @hk.transparent
    def _fast(self, embeddings, mask, candidate_start_offset, positions, prefix, fused) -> TransformerOutput:
        """The serving fast path (fused=True, or a cached prefix): attention as `row_attention`.

        Rotary phases are computed once per call ([1 or B, T, d/2]) and shared by every layer.
        Without a cache, rows [0, offset) are the prefix and the rest candidates (offset None:
        all rows are prefix rows, causal); the last layer then computes candidate rows only, so
        the output embeddings are the candidates' [B, T - offset, D]. The memory holds each
        layer's prefix keys/values (the PrefixCache). With a cache, all rows are candidates.
        """
        T = embeddings.shape[1]
        if prefix is not None:
            num_prefix, key_mask = 0, prefix[0].mask
        else:
            num_prefix = T if candidate_start_offset is None else candidate_start_offset
            key_mask = mask[:, :num_prefix]  # [B, P]
        if positions is None:
            # Static positions 0..T-1: the phases become compile-time constants (evaluated by the
            # backend's own cos/sin, so equal to the runtime values). Computed at runtime, XLA fuses
            # cos/sin into every consumer and evaluates them again per head, layer and block.
            with jax.ensure_compile_time_eval():  # jitted: op by op, cos of large phases rounds differently
                cos, sin = _jit_rope_phases(jnp.arange(T, dtype=jnp.float32)[None, :], self.key_size)  # [1, T, d/2]
        else:
            cos, sin = rope_phases(positions, self.key_size)
        h = embeddings
        memory = []
        for i in range(self.num_layers):
            last_rows = prefix is None and candidate_start_offset is not None and i == self.num_layers - 1
            layout = RowLayout(num_prefix, key_mask, mask, cos, sin,
                               self.bidirectional_history, num_prefix if last_rows else 0)
            out = self._layer(i)(h, layout, mask, positions, None if prefix is None else prefix[i], fused=fused)
            h = out.embeddings
            memory.append(out.memory)
        return TransformerOutput(h, None if prefix is not None else memory)
