"""The Grok-1-derived transformer shared by Phoenix's ranker and retrieval user tower.

Shape glossary
  B  batch                      T  sequence length (1 + S [+ C])
  D  model width (emb_size)     F  feed-forward width, ffn_size(D, widening_factor)
  h  kv heads                   g  query heads per kv head (num_q_heads // num_kv_heads; H is kept for hashes)
  d  key_size (head width)      t / T  query / key positions in einsums

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


def fused_linear(inputs: jax.Array, layers: list) -> list:
    """Bias-free `Linear`s applied to one input as a single matmul against [w_1 | w_2 | ...].

    Each output column is the same dot product as the separate layer's; one wide matmul instead
    of several narrow ones saves a kernel launch and a pass over `inputs` per extra layer.
    """
    ws = [layer.weight(inputs.shape[-1]) for layer in layers]  # created in list order
    out = jnp.dot(inputs, jnp.concatenate(ws, axis=1).astype(inputs.dtype))  # [..., sum of outs]
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


def hk_rms_norm(x: jax.Array, fixed_scale: bool = False) -> jax.Array:
    """Applies a fresh RMSNorm (named rms_norm, rms_norm_1, ... in the calling scope)."""
    return RMSNorm(create_scale=not fixed_scale)(x)


def layer_norm(x: jax.Array) -> jax.Array:
    return hk_rms_norm(x)


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


def isolated_attention(q: jax.Array, self_logits: jax.Array, v_self: jax.Array, self_mask: jax.Array,
                       prefix: KVMemory, multiplier: float) -> jax.Array:
    """Each candidate attends to the cached prefix and to its own key only.

    q [B, C, h, g, d] rotated; self_logits [B, C, h, g] in q's dtype, each candidate's query.key
    with its own key; v_self [B, C, h, d]; self_mask [B, C] (False = padded candidate); prefix
    keys/values [B, P, h, d]. The softmax spans the P prefix logits plus the one self logit: the
    same terms as the masked path, whose other logits are -1e30 and vanish. O(C*P), not O(C^2).
    Logits stay candidate-major ([B, C, ...], the projections' layout): no transposes around the
    two batched matmuls.
    """
    B, C = q.shape[:2]
    logits_p = jnp.einsum("bchgd,bPhd->bchgP", q, prefix.keys).astype(jnp.float32)  # [B, C, h, g, P]
    logits_s = self_logits.astype(jnp.float32)[..., None]  # [B, C, h, g, 1]
    logits_p = soft_cap(logits_p * multiplier)
    logits_s = soft_cap(logits_s * multiplier)
    logits_p = jnp.where(prefix.mask[:, None, None, None, :], logits_p, MASKED_LOGIT)
    logits_s = jnp.where(self_mask[:, :, None, None, None], logits_s, MASKED_LOGIT)
    weights = jax.nn.softmax(jnp.concatenate([logits_p, logits_s], axis=-1)).astype(q.dtype)
    w_p, w_s = weights[..., :-1], weights[..., -1:]  # [B, C, h, g, P], [B, C, h, g, 1]
    out = jnp.einsum("bchgP,bPhd->bchgd", w_p, prefix.values)
    out = out + w_s * v_self[:, :, :, None, :]  # [B, C, h, g, d]
    return out.reshape(B, C, -1)


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
        and the output has no memory (no row ever attends to a candidate's key).
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
        q = q.reshape(B, T, h * g, d)
        k = k.reshape(B, T, h, d)
        v = v.reshape(B, T, h, d)
        rotate = RotaryEmbedding(dim=d, base_exponent=ROPE_BASE)
        if prefix is None:
            k = rotate(k, seq_dim=1, offset=0, positions=positions)
            q = rotate(q, seq_dim=1, offset=0, positions=positions).reshape(B, T, h, g, d)  # query head = h*g + g
            out = attention(q, k, v, mask, self.attn_output_multiplier)
            memory = KVMemory(k, v, jnp.ones((B, T), jnp.bool_))
        else:
            # A candidate's own key sits at its own position: rotating query and key by the same
            # angle leaves their dot product unchanged, so that logit needs neither rotated.
            self_logits = jnp.einsum("bchgd,bchd->bchg", q.reshape(B, T, h, g, d), k)  # [B, C, h, g]
            q = rotate(q, seq_dim=1, offset=0, positions=positions).reshape(B, T, h, g, d)
            out = isolated_attention(q, self_logits, v, mask, prefix, self.attn_output_multiplier)
            memory = None
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
        attn = mha(layer_norm(inputs), mask, positions, prefix, fused=fused)
        h = inputs + layer_norm(attn.embeddings)
        h = h + layer_norm(DenseBlock(self.widening_factor)(layer_norm(h), fused=fused))
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

        fused: each layer's Q/K/V and its two feed-forward input projections as one matmul each
        (the serving fast path; same parameters, equal up to float summation order).
        """
        fprop_dtype = embeddings.dtype
        T = embeddings.shape[1]
        if prefix is None:
            key_mask = mask[:, None, None, :].astype(fprop_dtype)  # [B, 1, 1, T]
            if candidate_start_offset is not None:
                structure = make_recsys_attn_mask(T, candidate_start_offset, fprop_dtype,
                                                  self.bidirectional_history)
            else:
                structure = _causal_mask(T, fprop_dtype, self.bidirectional_history)
            layer_mask = key_mask * structure  # [B, 1, T, T]
        else:
            layer_mask = mask  # [B, C]
        h = embeddings
        memory = []
        for i in range(self.num_layers):
            layer = DecoderLayer(
                num_q_heads=self.num_q_heads,
                num_kv_heads=self.num_kv_heads,
                key_size=self.key_size,
                widening_factor=self.widening_factor,
                attn_output_multiplier=self.attn_output_multiplier,
                name=f"decoder_layer_{i}",
            )
            out = layer(h, layer_mask, mask, positions, None if prefix is None else prefix[i], fused=fused)
            h = out.embeddings
            if prefix is None:
                memory.append(out.memory._replace(mask=mask))
        return TransformerOutput(h, memory if prefix is None else None)
