"""Input checks shared by the models and runners: clear errors before anything is traced.

Shape checks (`check_inputs`) read only static shapes and dtypes, so the models call them at trace
time at no run-time cost; they also reject empty batches (B = 0, C = 0). Value checks
(`check_values`: negative hashes, out-of-range product surfaces, NaN/inf; `check_range`,
`check_binary`, `check_finite` for labels, masks and weights) need concrete arrays; the runners and
trainers call them on the host before dispatching the compiled function (`RecsysInferenceRunner.rank`,
for inputs shaped like ones that already ran, right after dispatching it, before returning), and they
pass traced values unchecked, so jitted code never syncs for them. Set PHOENIX_VALIDATE_VALUES=0 to skip the
value checks in trusted hot loops (shape checks always run: they are free).
"""

import math
import numbers
import os
from typing import Callable, Optional

import jax
import numpy as np


INF = 1e12  # masked corpus entries and padded candidates score -INF (the release's constant)


def _fail(kind, name: str, expected: str, got) -> None:
    raise kind(f"{name}: expected {expected}, got {got}")


def _is_int(x) -> bool:
    return np.issubdtype(np.dtype(x.dtype), np.integer)


def _is_float(x) -> bool:
    return np.issubdtype(np.dtype(x.dtype), np.floating) or np.dtype(x.dtype) == jax.numpy.bfloat16


def check_array(x, name: str, shape: tuple, kind: str) -> None:
    """Checks rank, shape (None = any size) and dtype kind ('int', 'float', 'bool', 'number')."""
    if not hasattr(x, "shape") or not hasattr(x, "dtype"):
        _fail(TypeError, name, f"an array of shape {_fmt(shape)}", type(x).__name__)
    if len(x.shape) != len(shape):
        _fail(ValueError, name, f"rank {len(shape)} with shape {_fmt(shape)}", f"shape {tuple(x.shape)}")
    for want, got in zip(shape, x.shape):
        if want is not None and want != got:
            _fail(ValueError, name, f"shape {_fmt(shape)}", f"shape {tuple(x.shape)}")
    ok = {"int": _is_int, "float": _is_float, "bool": lambda a: np.dtype(a.dtype) == np.bool_,
          "number": lambda a: _is_int(a) or _is_float(a) or np.dtype(a.dtype) == np.bool_}[kind]
    if not ok(x):
        _fail(TypeError, name, f"{kind} dtype", f"dtype {x.dtype}")


def _fmt(shape) -> str:
    return "[" + ", ".join("*" if s is None else str(s) for s in shape) + "]"


def check_at_least_one(x, name: str, axis: int, what: str) -> None:
    """Axis `axis` of x is not empty. An empty batch or candidate list would reach an integer
    modulo by zero inside attention; `what` reads e.g. "candidate (C >= 1)"."""
    if x.shape[axis] < 1:
        _fail(ValueError, name, f"at least 1 {what}", f"shape {_fmt(x.shape)}")


def check_number(value, name: str, expected: str, ok: Callable[[float], bool], integer: bool = False) -> None:
    """A Python/NumPy scalar (an int if `integer`; bools are neither), finite, with ok(value) true.
    `expected` describes the allowed values for the error message, e.g. "a number in [0, 1)"."""
    kind = numbers.Integral if integer else numbers.Real
    if isinstance(value, bool) or not isinstance(value, kind):
        _fail(TypeError, name, expected, f"{type(value).__name__} {value!r}")
    if not math.isfinite(value) or not ok(value):
        _fail(ValueError, name, expected, repr(value.item() if isinstance(value, np.generic) else value))


def check_int(value, name: str, low: Optional[int] = 1) -> int:
    """`value` as an int: a Python or NumPy int (bool and floats are refused) >= low (None: any)."""
    if low is None:
        check_number(value, name, "an int", lambda v: True, integer=True)
    else:
        check_number(value, name, f"an int >= {low}", lambda v: v >= low, integer=True)
    return int(value)


def check_batch(batch, hash_config, num_actions: Optional[int] = None, history_len: Optional[int] = None,
                num_candidates: Optional[int] = None, need_candidates: bool = True) -> tuple:
    """Shapes and dtypes of a RecsysBatch's fields against each other and the hash config -> (B, S, C)."""
    if not hasattr(batch, "user_hashes") or not hasattr(batch, "candidate_post_hashes"):
        raise TypeError(f"batch: expected a RecsysBatch, got {type(batch).__name__}")
    hu, hi, ha = hash_config.num_user_hashes, hash_config.num_item_hashes, hash_config.num_author_hashes
    check_array(batch.user_hashes, "batch.user_hashes", (None, hu), "int")
    check_at_least_one(batch.user_hashes, "batch.user_hashes", 0, "user (B >= 1)")
    B = batch.user_hashes.shape[0]
    check_array(batch.history_post_hashes, "batch.history_post_hashes", (B, history_len, hi), "int")
    S = batch.history_post_hashes.shape[1]
    check_array(batch.history_author_hashes, "batch.history_author_hashes", (B, S, ha), "int")
    check_array(batch.history_actions, "batch.history_actions", (B, S, num_actions), "number")
    check_array(batch.history_product_surface, "batch.history_product_surface", (B, S), "int")
    C = None
    if need_candidates:
        check_array(batch.candidate_post_hashes, "batch.candidate_post_hashes", (B, num_candidates, hi), "int")
        check_at_least_one(batch.candidate_post_hashes, "batch.candidate_post_hashes", 1, "candidate (C >= 1)")
        C = batch.candidate_post_hashes.shape[1]
        check_array(batch.candidate_author_hashes, "batch.candidate_author_hashes", (B, C, ha), "int")
        check_array(batch.candidate_product_surface, "batch.candidate_product_surface", (B, C), "int")
    return B, S, C


def check_inputs(batch, embeddings, hash_config, emb_size: int, num_actions: Optional[int] = None,
                 history_len: Optional[int] = None, num_candidates: Optional[int] = None,
                 need_candidates: bool = True) -> None:
    """Checks a RecsysBatch and RecsysEmbeddings against each other and the config.

    B, S and C are taken from `user_hashes`, `history_post_hashes` and `candidate_post_hashes`;
    `history_len`/`num_candidates`, when given, must match them. The model accepts any S and C:
    a config's history_seq_len / candidate_seq_len only size the runners' dummy init inputs.
    """
    B, S, _ = check_batch(batch, hash_config, num_actions, history_len, num_candidates, need_candidates=False)
    if not hasattr(embeddings, "user_embeddings"):
        raise TypeError(f"recsys_embeddings: expected RecsysEmbeddings, got {type(embeddings).__name__}")
    hu, hi, ha = hash_config.num_user_hashes, hash_config.num_item_hashes, hash_config.num_author_hashes
    D = emb_size
    check_array(embeddings.user_embeddings, "recsys_embeddings.user_embeddings", (B, hu, D), "float")
    check_array(embeddings.history_post_embeddings, "recsys_embeddings.history_post_embeddings",
                (B, S, hi, D), "float")
    check_array(embeddings.history_author_embeddings, "recsys_embeddings.history_author_embeddings",
                (B, S, ha, D), "float")
    if need_candidates:
        check_candidate_inputs(batch, embeddings, hash_config, emb_size, B, num_candidates)


def check_candidate_inputs(batch, embeddings, hash_config, emb_size: int, batch_size: Optional[int] = None,
                           num_candidates: Optional[int] = None) -> None:
    """Checks the candidate fields of a RecsysBatch / RecsysEmbeddings."""
    hi, ha, D = hash_config.num_item_hashes, hash_config.num_author_hashes, emb_size
    check_array(batch.candidate_post_hashes, "batch.candidate_post_hashes", (batch_size, num_candidates, hi), "int")
    check_at_least_one(batch.candidate_post_hashes, "batch.candidate_post_hashes", 0, "user (B >= 1)")
    check_at_least_one(batch.candidate_post_hashes, "batch.candidate_post_hashes", 1, "candidate (C >= 1)")
    B = batch.candidate_post_hashes.shape[0]
    C = batch.candidate_post_hashes.shape[1]
    check_array(batch.candidate_author_hashes, "batch.candidate_author_hashes", (B, C, ha), "int")
    check_array(batch.candidate_product_surface, "batch.candidate_product_surface", (B, C), "int")
    check_array(embeddings.candidate_post_embeddings, "recsys_embeddings.candidate_post_embeddings",
                (B, C, hi, D), "float")
    check_array(embeddings.candidate_author_embeddings, "recsys_embeddings.candidate_author_embeddings",
                (B, C, ha, D), "float")


def values_enabled() -> bool:
    return os.environ.get("PHOENIX_VALIDATE_VALUES", "1") != "0"


def _concrete(x) -> bool:
    return not isinstance(x, jax.core.Tracer)


def check_values(batch, embeddings, product_surface_vocab_size: int) -> None:
    """Host-side value checks: hashes >= 0, surfaces in [0, vocab), finite embeddings."""
    if not values_enabled():
        return
    for name in batch._fields:
        x = getattr(batch, name)
        if not _concrete(x):
            continue
        x = np.asarray(x)
        if name.endswith("hashes") and x.size and x.min() < 0:
            raise ValueError(f"batch.{name}: hashes must be >= 0 (0 = padding), got minimum {x.min()}")
        if name.endswith("product_surface") and x.size and (x.min() < 0 or x.max() >= product_surface_vocab_size):
            raise ValueError(f"batch.{name}: ids must lie in [0, {product_surface_vocab_size}) "
                             f"(product_surface_vocab_size), got range [{x.min()}, {x.max()}]")
        if name == "history_actions" and x.size and not np.all(np.isfinite(x)):
            raise ValueError(f"batch.{name}: contains NaN or inf")
    if embeddings is None:
        return
    for name, x in zip(("user_embeddings", "history_post_embeddings", "candidate_post_embeddings",
                        "history_author_embeddings", "candidate_author_embeddings"),
                       jax.tree_util.tree_leaves(embeddings)):
        if _concrete(x) and not bool(np.all(np.isfinite(np.asarray(x, np.float32)))):
            raise ValueError(f"recsys_embeddings.{name}: contains NaN or inf")


def check_hash_range(batch, hash_config) -> None:
    """Hashes must index their table: 0 <= hash < table size (a gather would silently clamp)."""
    if not values_enabled():
        return
    sizes = {"user_hashes": hash_config.user_table_size, "history_post_hashes": hash_config.post_table_size,
             "candidate_post_hashes": hash_config.post_table_size,
             "history_author_hashes": hash_config.author_table_size,
             "candidate_author_hashes": hash_config.author_table_size}
    for name, size in sizes.items():
        x = getattr(batch, name)
        if not _concrete(x) or not np.size(x):
            continue
        x = np.asarray(x)
        if x.min() < 0 or x.max() >= size:
            raise ValueError(f"batch.{name}: hashes must lie in [0, {size}) (the table size in HashConfig), "
                             f"got range [{x.min()}, {x.max()}]")


def _check_each(x, name: str, expected: str, bad_fn) -> None:
    """Host-side: raises naming the first entry where bad_fn(values) is true. Skipped for traced
    values and with PHOENIX_VALIDATE_VALUES=0, like check_values."""
    if x is None or not values_enabled() or not _concrete(x) or not np.size(x):
        return
    x = np.asarray(x)
    if x.dtype == np.bool_:
        return  # booleans are 0/1 and finite
    values = x.astype(np.float64)
    bad = bad_fn(values)
    if bad.any():
        where = tuple(int(i) for i in np.argwhere(bad)[0])
        _fail(ValueError, name, expected,
              f"{values[where]} at index {list(where)} ({int(bad.sum())} bad of {values.size} entries)")


def check_range(x, name: str, low: float, high: Optional[float] = None, note: str = "") -> None:
    """Host-side: every entry of x finite with low <= x (<= high, if given); e.g. labels in [0, 1]."""
    expected = f"finite values >= {low:g}" if high is None else f"finite values in [{low:g}, {high:g}]"
    high = np.inf if high is None else high
    _check_each(x, name, expected + note, lambda v: ~np.isfinite(v) | (v < low) | (v > high))


def check_finite(x, name: str, note: str = "") -> None:
    """Host-side: no NaN or inf in x."""
    _check_each(x, name, f"finite values{note}", lambda v: ~np.isfinite(v))


def check_binary(x, name: str) -> None:
    """Host-side: a mask holds only 0/1 (or False/True); NaN, 0.5 or -1 would be silently read as a weight."""
    _check_each(x, name, "a mask of 0/1 or bool values", lambda v: (v != 0) & (v != 1))


def check_top_k(top_k, available: int, what: str) -> int:
    """top_k must be an int in [1, available]; `what` names what is being ranked."""
    if isinstance(top_k, bool) or not isinstance(top_k, int) and not hasattr(top_k, "__index__"):
        raise TypeError(f"top_k: expected an int, got {type(top_k).__name__}")
    top_k = int(top_k)
    if not 1 <= top_k <= available:
        raise ValueError(f"top_k: expected 1 <= top_k <= {available} ({what}), got {top_k}")
    return top_k
