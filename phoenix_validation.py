"""Input checks shared by the models and runners: clear errors before anything is traced.

Shape checks (`check_inputs`) read only static shapes and dtypes, so the models call them at trace
time at no run-time cost; they also reject empty batches (B = 0, C = 0). Value checks
(`check_values`: hashes outside their tables, out-of-range product surfaces, actions other than
0/1, NaN/inf; `check_range`, `check_binary`, `check_finite` for labels, masks and weights) need
concrete arrays; the runners and trainers call them on the host before dispatching the compiled
function (`RecsysInferenceRunner.rank`, for inputs shaped like ones that already ran, right after
dispatching it, before returning), and they pass traced values unchecked, so jitted code never
syncs for them. Set PHOENIX_VALIDATE_VALUES=0 to skip the value checks in trusted hot loops (shape
checks always run: they are free).
"""

import math
import numbers
import os
from typing import Callable, Optional

import jax
import numpy as np

__all__ = [
    # shape checks (trace time)
    "check_array", "check_at_least_one", "check_batch", "check_inputs", "check_candidate_inputs",
    # value checks (concrete arrays)
    "values_enabled", "check_values", "check_hash_range", "check_actions", "check_range", "check_finite",
    "check_binary",
    # arguments
    "check_number", "check_int", "check_top_k",
    "INF", "MAX_EXACT_POSITION",
]


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
    # An int is always finite (and math.isfinite cannot take one beyond float range, e.g. 10**400).
    if not (isinstance(value, numbers.Integral) or math.isfinite(value)) or not ok(value):
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


# Float32 holds every integer up to 2**24 exactly: rotary positions (float32 in grok.py) beyond it
# would round, and neighbouring candidates would share a position.
MAX_EXACT_POSITION = 2**24

# The HashConfig field that sizes the table of each hash field of a RecsysBatch.
HASH_TABLES = {"user_hashes": "user_table_size", "history_post_hashes": "post_table_size",
               "candidate_post_hashes": "post_table_size", "history_author_hashes": "author_table_size",
               "candidate_author_hashes": "author_table_size"}


def _first_bad(x: np.ndarray, bad: np.ndarray) -> str:
    """"<value> at index [i, j] (n bad of m entries)" for the first entry where `bad` is true."""
    where = tuple(int(i) for i in np.argwhere(bad)[0])
    value = x[where]
    shown = repr(value.item()) if x.dtype.kind in "iu" else str(value)  # str: float32 1e30 as 1e+30
    return f"{shown} at index {list(where)} ({int(np.count_nonzero(bad))} bad of {x.size} entries)"


def _check_ids(x: np.ndarray, name: str, what: str, size: Optional[int], note: str = "") -> None:
    """Integer ids in [0, size) (size None: >= 0); min/max only, the first bad entry on failure."""
    if not x.size:
        return
    if x.min() >= 0 and (size is None or x.max() < size):
        return
    bad = (x < 0) if size is None else (x < 0) | (x >= size)
    bound = "be >= 0" if size is None else f"lie in [0, {size})"
    raise ValueError(f"{name}: {what} must {bound}{note}, got {_first_bad(x, bad)}")


def _check_hashes(x: np.ndarray, name: str, hash_config) -> None:
    field = HASH_TABLES[name]
    if hash_config is None:
        _check_ids(x, f"batch.{name}", "hashes", None, " (0 = padding)")
    else:
        _check_ids(x, f"batch.{name}", "hashes", getattr(hash_config, field),
                   f" (HashConfig.{field}: rows of the {field.split('_')[0]} table; 0 = padding)")


def check_actions(x: np.ndarray, name: str) -> None:
    """History actions are 0/1 multi-hot (bool, or 0 and 1 of any number dtype): see check_values."""
    if x.size and x.dtype != np.bool_:
        bad = (x != 0) & (x != 1)  # NaN too
        if bad.any():
            raise ValueError(f"{name}: expected 0/1 multi-hot values (bool, or 0 and 1 of a number dtype), "
                             f"got {_first_bad(x, bad)}")


def check_values(batch, embeddings, product_surface_vocab_size: int, hash_config=None) -> None:
    """Host-side value checks: hashes in [0, table size) (>= 0 without `hash_config`), surfaces
    in [0, vocab), actions 0/1, finite embeddings. An error names the field, the bound, the first
    bad value and its index.

    Hashes are checked against the tables on every path, also where the caller passes the
    embeddings (the model then looks nothing up): a hash names a row of a table of HashConfig's
    size, and one beyond it means the batch was hashed for other tables. Actions are multi-hot
    (spec section 2: `history_actions [B,S,A] float multi-hot`): the model embeds them as
    `2*a - 1` (+1 set, -1 not set) and takes any non-zero one as set, so only 0 and 1 mean
    something; 0.5, -1 or 1e30 would be embedded as a silently wrong (or overflowing) signal.
    """
    if not values_enabled():
        return
    for name in batch._fields:
        x = getattr(batch, name)
        if not _concrete(x):
            continue
        x = np.asarray(x)
        if name in HASH_TABLES:
            _check_hashes(x, name, hash_config)
        elif name.endswith("product_surface"):
            _check_ids(x, f"batch.{name}", "ids", product_surface_vocab_size, " (product_surface_vocab_size)")
        elif name == "history_actions":
            check_actions(x, "batch.history_actions")
    if embeddings is None:
        return
    for name, x in zip(("user_embeddings", "history_post_embeddings", "candidate_post_embeddings",
                        "history_author_embeddings", "candidate_author_embeddings"),
                       jax.tree_util.tree_leaves(embeddings)):
        if not _concrete(x):
            continue
        x = np.asarray(x)
        as_f32 = x
        if x.dtype.itemsize > 4:
            with np.errstate(over="ignore"):  # float64 beyond float32's range becomes inf: reported below
                as_f32 = x.astype(np.float32)
        if not bool(np.all(np.isfinite(as_f32))):
            raise ValueError(f"recsys_embeddings.{name}: contains NaN or inf (as float32, the model's input "
                             f"dtype): {_first_bad(x, ~np.isfinite(as_f32))}")


def check_hash_range(batch, hash_config) -> None:
    """Hashes must index their table: 0 <= hash < table size (a gather would silently clamp)."""
    if not values_enabled():
        return
    for name in HASH_TABLES:
        x = getattr(batch, name)
        if _concrete(x):
            _check_hashes(np.asarray(x), name, hash_config)


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
