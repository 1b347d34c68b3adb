"""A plain NumPy (float64) re-statement of the release's arithmetic (inputs, transformer, ranker, retrieval).

Used by the tests as the reference the JAX models must match when given the same parameter tree
(a dict laid out as the release's). Written for clarity, not speed: explicit loops over heads.

Shape glossary: B batch, S history, C candidates, T = 1+S+C, D width, A actions, N corpus.
"""

import numpy as np

__all__ = [
    "SOFT_CAP", "RMS_EPS", "MASKED", "EPS", "INF",
    "ffn_size", "rms_norm", "rotate_half", "rope", "gelu_tanh", "recsys_mask", "attention", "transformer",
    "ranker_logits", "user_representation", "candidate_representation", "top_k",
]

SOFT_CAP = 30.0
RMS_EPS = 1e-5
MASKED = -1e30
EPS = 1e-12
INF = 1e12


def ffn_size(emb_size, widening_factor):
    size = int(widening_factor * emb_size) * 2 // 3
    return ((size + 7) // 8) * 8


def rms_norm(x, scale):
    return x / np.sqrt(np.mean(x**2, axis=-1, keepdims=True) + RMS_EPS) * scale


def rotate_half(x):
    half = x.shape[-1] // 2
    return np.concatenate([-x[..., half:], x[..., :half]], axis=-1)


def rope(x, positions):
    """x [B, T, heads, d]; positions [T]."""
    d = x.shape[-1]
    inv_freq = 1.0 / 10000.0 ** (np.arange(0, d, 2) / d)  # [d/2]
    phase = positions[:, None] * inv_freq[None, :]  # [T, d/2]
    phase = np.concatenate([phase, phase], axis=-1)[None, :, None, :]  # [1, T, 1, d]
    return x * np.cos(phase) + rotate_half(x) * np.sin(phase)


def gelu_tanh(x):
    return 0.5 * x * (1.0 + np.tanh(np.sqrt(2.0 / np.pi) * (x + 0.044715 * x**3)))


def recsys_mask(T, offset, bidirectional=False):
    """[T, T] 1 = may attend, built entry by entry from the release's rule."""
    m = np.zeros((T, T))
    for i in range(T):
        for j in range(T):
            if i < offset:
                m[i, j] = j < offset and (bidirectional or j <= i)
            else:
                m[i, j] = j < offset or j == i
    return m


def attention(x, p, mask, num_q_heads, num_kv_heads, key_size, multiplier):
    """x [B, T, D]; mask [B, T, T]; p: the layer's multi_head_attention params."""
    B, T, _ = x.shape
    q = (x @ p["query"]).reshape(B, T, num_q_heads, key_size)
    k = (x @ p["key"]).reshape(B, T, num_kv_heads, key_size)
    v = (x @ p["value"]).reshape(B, T, num_kv_heads, key_size)
    pos = np.arange(T, dtype=np.float64)
    q, k = rope(q, pos), rope(k, pos)
    group = num_q_heads // num_kv_heads
    out = np.zeros((B, T, num_q_heads, key_size))
    for i in range(num_q_heads):
        j = i // group  # consecutive query heads share a kv head
        logits = np.einsum("btd,bsd->bts", q[:, :, i], k[:, :, j]) * multiplier
        logits = SOFT_CAP * np.tanh(logits / SOFT_CAP)
        logits = np.where(mask != 0, logits, MASKED)
        logits -= logits.max(-1, keepdims=True)
        w = np.exp(logits)
        w /= w.sum(-1, keepdims=True)
        out[:, :, i] = np.einsum("bts,bsd->btd", w, v[:, :, j])
    return out.reshape(B, T, -1) @ p["linear"]


def transformer(x, mask, layers, cfg):
    """x [B, T, D]; mask [B, T, T]; layers: list of per-layer param dicts."""
    for lp in layers:
        a = attention(rms_norm(x, lp["rms_norm"]), lp["mha"], mask, cfg.num_q_heads, cfg.num_kv_heads,
                      cfg.key_size, cfg.attn_output_multiplier)
        h = x + rms_norm(a, lp["rms_norm_1"])
        y = rms_norm(h, lp["rms_norm_2"])
        f = (gelu_tanh(y @ lp["linear"]) * (y @ lp["linear_v"])) @ lp["linear_1"]
        x = h + rms_norm(f, lp["rms_norm_3"])
    return x


def _layers(params, num_layers):
    out = []
    for i in range(num_layers):
        pre = f"transformer/decoder_layer_{i}"
        mha = f"{pre}/multi_head_attention"
        out.append({
            "mha": {n: np.float64(params[f"{mha}/{n}"]["w"]) for n in ("query", "key", "value", "linear")},
            **{n: np.float64(params[f"{pre}/{n}"]["w"]) for n in ("linear", "linear_v", "linear_1")},
            **{n: np.float64(params[f"{pre}/{n}"]["scale"]) for n in ("rms_norm", "rms_norm_1", "rms_norm_2",
                                                                     "rms_norm_3")},
        })
    return out


def _inputs(params, scope, batch, emb, vocab):
    """User [B, 1, D], history [B, S, D] and their masks, as the release builds them."""
    g = lambda name: np.float64(params[scope][name])  # noqa: E731
    B, S = batch.history_product_surface.shape
    D = g("proj_mat_1").shape[1]
    user = np.float64(emb.user_embeddings).reshape(B, 1, -1) @ g("proj_mat_1")
    actions = np.float64(batch.history_actions)
    act = ((2 * actions - 1) @ g("action_projection")) * np.any(actions != 0, -1, keepdims=True)
    surf = np.eye(vocab)[batch.history_product_surface] @ g("product_surface_embedding_table")
    post, author = (np.float64(x) for x in (emb.history_post_embeddings, emb.history_author_embeddings))
    # Widths spelled out: with S = 0 a -1 has no size to infer.
    hist = np.concatenate([post.reshape(B, S, post.shape[2] * D), author.reshape(B, S, author.shape[2] * D),
                           act, surf], -1)
    hist = hist @ g("proj_mat_3")
    user_mask = batch.user_hashes[:, :1] != 0
    hist_mask = batch.history_post_hashes[:, :, 0] != 0
    assert hist.shape[-1] == D
    return user, hist, user_mask, hist_mask


def ranker_logits(params, batch, emb, cfg):
    """Reference logits [B, C, A] of the ranking model with PhoenixModelConfig `cfg`."""
    scope = "phoenix_model"
    g = lambda name: np.float64(params[scope][name])  # noqa: E731
    user, hist, user_mask, hist_mask = _inputs(params, scope, batch, emb, cfg.product_surface_vocab_size)
    B, C = batch.candidate_product_surface.shape
    surf = np.eye(cfg.product_surface_vocab_size)[batch.candidate_product_surface] @ g(
        "product_surface_embedding_table")
    cand = np.concatenate([np.float64(emb.candidate_post_embeddings).reshape(B, C, -1),
                           np.float64(emb.candidate_author_embeddings).reshape(B, C, -1), surf], -1)
    cand = cand @ g("proj_mat_2")
    x = np.concatenate([user, hist, cand], 1)
    pad = np.concatenate([user_mask, hist_mask, batch.candidate_post_hashes[:, :, 0] != 0], 1)  # [B, T]
    T, offset = x.shape[1], 1 + hist.shape[1]
    mask = pad[:, None, :] * recsys_mask(T, offset, cfg.model.bidirectional_history)[None]
    out = transformer(x, mask, _layers(params, cfg.model.num_layers), cfg.model)
    out = rms_norm(out, np.float64(params[f"{scope}/rms_norm"]["scale"]))
    return out[:, offset:] @ g("unembeddings")


def user_representation(params, batch, emb, cfg):
    """Reference (user representation [B, D], norm [B, 1]) of the retrieval model."""
    scope = "phoenix_retrieval_model"
    user, hist, user_mask, hist_mask = _inputs(params, scope, batch, emb, cfg.product_surface_vocab_size)
    x = np.concatenate([user, hist], 1)
    pad = np.concatenate([user_mask, hist_mask], 1)  # [B, 1+S]
    T = x.shape[1]
    structure = np.ones((T, T)) if cfg.model.bidirectional_history else np.tril(np.ones((T, T)))
    out = transformer(x, pad[:, None, :] * structure[None], _layers(params, cfg.model.num_layers), cfg.model)
    m = pad[:, :, None].astype(np.float64)
    mean = (out * m).sum(1) / np.maximum(m.sum(1), 1.0)
    norm = np.sqrt(np.maximum((mean**2).sum(-1, keepdims=True), EPS))
    return mean / norm, norm


def candidate_representation(params, emb):
    """Reference candidate tower output [B, C, D]."""
    tower = "phoenix_retrieval_model/~build_candidate_representation/candidate_tower"
    B, C = emb.candidate_post_embeddings.shape[:2]
    x = np.concatenate([np.float64(emb.candidate_post_embeddings), np.float64(emb.candidate_author_embeddings)],
                       axis=2).reshape(B, C, -1)
    h = x @ np.float64(params[tower]["candidate_tower_projection_1"])
    h = h / (1 + np.exp(-h))  # SiLU
    out = h @ np.float64(params[tower]["candidate_tower_projection_2"])
    return out / np.sqrt(np.maximum((out**2).sum(-1, keepdims=True), EPS))


def top_k(scores, k):
    """Brute-force top-k rows of scores [B, N]: ties broken by lower index first."""
    idx = np.argsort(-scores, axis=-1, kind="stable")[:, :k]
    return idx, np.take_along_axis(scores, idx, -1)
