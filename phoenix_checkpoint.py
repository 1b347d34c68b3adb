"""Pickle-free checkpoints: a directory format for parameters, optimiser state, step and JSON data.

A format knows no model: the config is opaque JSON to it (phoenix_configs encodes and decodes model
and optimiser configs), and a run's step checkpoints are phoenix_resume's.

Layout of a checkpoint directory `path/`:

  arrays.npz  every array, written with `np.savez(..., allow_pickle=False)` and read with
              `np.load(..., allow_pickle=False)`. Parameters are keyed by their pytree path, e.g.
              `phoenix_model/proj_mat_1` or
              `transformer/decoder_layer_0/multi_head_attention/query/w` ;
              optimiser-state arrays by `opt_state/<path>`, e.g. `opt_state/1/0/mu/phoenix_model/proj_mat_1`;
              the caller's other arrays (`aux`, e.g. a data pipeline's counters) by `aux/<path>`.
  meta.json   format marker and version, a random save id, step, the caller's config and `extra` (JSON
              data, stored as given: phoenix_configs writes and reads configs), the byte size and
              sha256 of arrays.npz, and for every array its path components, shape, logical dtype
              and the dtype it is stored as. Its schema is checked on every read (CheckpointError
              naming the file, the key, expected and actual).

Arrays whose dtype numpy cannot store without pickle (bfloat16 and the other ml_dtypes types)
are stored as an unsigned-integer view of the same width; meta.json records the real dtype.

What a save may overwrite. `save_checkpoint(path)` replaces `path` only if it is absent, an empty
directory, or a Phoenix checkpoint: a directory holding nothing but arrays.npz and meta.json,
with meta.json valid and ours (the "format" marker; version 1 has none, its schema alone counts).
Anything else (a file, a run directory, the working directory, a directory that merely has a
meta.json) is refused with CheckpointError before anything is written or moved; so are "", "."
and "/". Symlinks are followed: a save through a link replaces the checkpoint the link points to
and leaves the link itself in place.

How a save works. Everything is written and fsynced in a temporary sibling `.NAME.tmp-PID-*`,
then the old checkpoint is renamed aside to `.NAME.old-*`, the new one renamed in, and the old
one deleted. A write error (OSError naming the path) removes the temporary directory and leaves
the previous checkpoint as it was. A killed save leaves the old checkpoint in place (plus a
temporary directory), or, killed between its two renames, only the aside copy, which loads find
(with a warning). The next successful save of that path deletes such leftovers once the new
checkpoint is in place: only `.NAME.tmp-*` / `.NAME.old-*` siblings that hold nothing but our two
files, and not the temporary directory of a save whose process is still alive.

What a concurrent load sees. A load opens the checkpoint directory once and reads meta.json and
arrays.npz through that handle, so it never mixes two saves; arrays.npz must match the sha256
recorded in meta.json (a file copied from another save, or corrupted, raises CheckpointError). A
directory that a save replaces or deletes during the read is reopened, up to LOAD_ATTEMPTS
times. One writer per path: concurrent saves to the same path are not supported.
"""

import dataclasses
import hashlib
import json
import operator
import os
import re
import shutil
import stat
import time
import uuid
import warnings
import zipfile
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

# Version 2 added the format marker, a save id and the sha256 of arrays.npz; version 1 still loads.
FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)
# meta.json's "format": tells a checkpoint directory from a user's that happens to hold a meta.json.
FORMAT_MARKER = "phoenix-checkpoint"
ARRAYS_FILE = "arrays.npz"
META_FILE = "meta.json"
SAVE_FILES = frozenset({ARRAYS_FILE, META_FILE})  # all that a save writes in its directory
# Times a load reopens a checkpoint that concurrent saves keep replacing before it gives up.
LOAD_ATTEMPTS = 5
# How long a load that finds only a set-aside copy waits for a save between its two renames.
RENAME_GAP_WAIT_S = 0.05
# Prefix of optimiser-state keys in arrays.npz; parameter keys carry no prefix so that the file
# reads like the release's parameter listing.
OPT_STATE_PREFIX = "opt_state/"
AUX_PREFIX = "aux/"
# Steps lie in [0, MAX_STEP): a step counts optimiser steps taken, and readers keep it in an int64.
MAX_STEP = 2**63
# Problems listed in one mismatch error before the rest are summarised as a count.
MAX_LISTED_PROBLEMS = 20


class CheckpointError(ValueError):
    """A checkpoint file is missing, truncated, corrupted, mismatched or of an unknown format, or
    a save was refused because its path holds something that is not a checkpoint."""


class Checkpoint(NamedTuple):
    """What `load_checkpoint` returns. Arrays are host numpy arrays."""

    params: Any  # nested dict (Haiku params) or the params template's structure
    opt_state: Any  # the template's structure, a flat {path: array} dict without one, or None
    step: int
    config: Any  # the saved config as JSON data (as decode_config returns it, if given); None if none was saved
    extra: Any  # the caller's JSON `extra`, or None
    meta: dict  # meta.json as read
    aux: Any = None  # the caller's `aux` arrays as nested dicts, or None if none were saved


# --------------------------------------------------------------------------- pytrees <-> flat arrays


def _key_component(key) -> str | int:
    if isinstance(key, jax.tree_util.DictKey):
        return key.key if isinstance(key.key, str) else str(key.key)
    if isinstance(key, jax.tree_util.SequenceKey):
        return key.idx
    if isinstance(key, jax.tree_util.GetAttrKey):
        return key.name
    if isinstance(key, jax.tree_util.FlattenedIndexKey):
        return key.key
    raise TypeError(f"unsupported pytree key {key!r}")


def _flatten(tree) -> tuple[list[tuple[str, list, Any]], Any]:
    """[(path string, path components, leaf)] in flattening order, and the treedef."""
    leaves_with_paths, treedef = jax.tree_util.tree_flatten_with_path(tree)
    out = []
    for path, leaf in leaves_with_paths:
        components = [_key_component(k) for k in path]
        out.append(("/".join(str(c) for c in components), components, leaf))
    return out, treedef


# Unsigned integer of each width, to carry the bits of dtypes numpy cannot save natively.
_UINT_OF_WIDTH = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}


def _to_storable(array: np.ndarray, where: str) -> np.ndarray:
    """The array itself for numpy's own numeric dtypes; otherwise (bfloat16, float8 ... from
    ml_dtypes, which np.save could only pickle) an unsigned-integer view of the same bits."""
    if array.dtype.hasobject:
        raise ValueError(f"{where} is an object array; checkpoints store no pickle")
    if array.dtype.kind in "biufc":
        return array
    try:  # a load rebuilds the dtype from its name: strings, bytes and records would not come back
        named = _dtype_of_name(array.dtype.name) == array.dtype
    except (TypeError, AttributeError):
        named = False
    # bfloat16 and the other ml_dtypes types are kind "V" too; plain bytes ("void32") and records are not numbers.
    if not named or array.dtype.kind in "US" or array.dtype.fields is not None or array.dtype.name.startswith("void"):
        raise ValueError(f"{where} has dtype {array.dtype.str} ({array.dtype.name}), which cannot be stored: "
                         f"expected numeric or bool arrays")
    if array.dtype.itemsize not in _UINT_OF_WIDTH:
        raise ValueError(f"{where} has dtype {array.dtype.name}, which cannot be stored")
    return array.view(_UINT_OF_WIDTH[array.dtype.itemsize])


def _dtype_of_name(name: str) -> np.dtype:
    try:
        return np.dtype(name)
    except TypeError:
        return np.dtype(getattr(jnp, name))


def _shape_dtype(leaf) -> tuple[tuple[int, ...], np.dtype]:
    return tuple(int(d) for d in np.shape(leaf)), np.dtype(leaf.dtype)


# --------------------------------------------------------------------------- meta.json schema


def _short(value, limit: int = 80) -> str:
    """repr of a value for an error message, cut to `limit` characters."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _type_name(value) -> str:
    return "null" if value is None else type(value).__name__


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _storable_dtype_name(dtype: np.dtype) -> str | None:
    """The dtype name `_to_storable` stores `dtype` as; None if it cannot be stored."""
    if dtype.hasobject:
        return None
    if dtype.kind in "biufc":
        return dtype.name
    width = _UINT_OF_WIDTH.get(dtype.itemsize)
    return None if width is None else np.dtype(width).name


def _check_entry(meta_path: str, key: str, path, entry) -> None:
    """One array's entry in meta.json: {"keys": [...], "shape": [...], "dtype": ..., "stored_as": ...}."""
    where = f"{key}[{path!r}]"

    def bad(field, expected, got):
        raise CheckpointError(f"{meta_path}: {where}{field}: expected {expected}, got {got}")

    if not isinstance(entry, dict):
        bad("", "an object with keys, shape, dtype, stored_as", _type_name(entry))
    for field in ("keys", "shape", "dtype", "stored_as"):
        if field not in entry:
            bad("", f"a {field!r} field", f"only {sorted(entry)}")
    keys, shape = entry["keys"], entry["shape"]
    if not isinstance(keys, list) or not keys or not all(isinstance(k, str) or _is_int(k) for k in keys):
        bad(".keys", "a non-empty list of strings and integers", _short(keys))
    if "/".join(str(k) for k in keys) != path:
        bad(".keys", f"components joining to {path!r}", _short(keys))
    if not isinstance(shape, list) or not all(_is_int(d) and d >= 0 for d in shape):
        bad(".shape", "a list of non-negative integers", _short(shape))
    if not isinstance(entry["dtype"], str):
        bad(".dtype", "a dtype name", _short(entry["dtype"]))
    try:
        dtype = _dtype_of_name(entry["dtype"])
    except (TypeError, AttributeError):
        bad(".dtype", "a numpy or ml_dtypes dtype name", _short(entry["dtype"]))
    stored_as = _storable_dtype_name(dtype)
    if stored_as is None:
        bad(".dtype", "a dtype a checkpoint can store", _short(entry["dtype"]))
    if entry["stored_as"] != stored_as:
        bad(".stored_as", f"{stored_as!r} (how {dtype.name} is stored)", _short(entry["stored_as"]))


def _check_meta(meta, meta_path: str) -> dict:
    """meta.json's schema, for every format version this code reads; returns `meta`."""
    if not isinstance(meta, dict):
        raise CheckpointError(f"{meta_path}: expected a JSON object, got a JSON {_type_name(meta)}")
    version = meta.get("format_version")
    if not _is_int(version) or version not in READABLE_VERSIONS:
        raise CheckpointError(f"{meta_path}: unsupported checkpoint format version {_short(version)}, "
                              f"this code reads versions {', '.join(map(str, READABLE_VERSIONS))}")

    def bad(key, expected):
        got = f"{_type_name(meta[key])} {_short(meta[key])}" if key in meta else "no such key"
        raise CheckpointError(f"{meta_path}: {key!r}: expected {expected}, got {got}")

    required = {"step": "an integer in [0, 2**63)", "arrays_file_bytes": "a byte count",
                "params": "an object of arrays"}
    if version >= 2:
        required.update(format=repr(FORMAT_MARKER), save_id="a save id string", arrays_sha256="a sha256 hex digest")
    for key, expected in required.items():
        if key not in meta:
            bad(key, expected)
    if not _is_int(meta["step"]) or not 0 <= meta["step"] < MAX_STEP:
        bad("step", "an integer in [0, 2**63)")
    if not _is_int(meta["arrays_file_bytes"]) or meta["arrays_file_bytes"] < 0:
        bad("arrays_file_bytes", "a non-negative integer")
    if version >= 2:
        if meta["format"] != FORMAT_MARKER:
            bad("format", repr(FORMAT_MARKER))
        if not isinstance(meta["save_id"], str):
            bad("save_id", "a string")
        if not isinstance(meta["arrays_sha256"], str) or not re.fullmatch(r"[0-9a-f]{64}", meta["arrays_sha256"]):
            bad("arrays_sha256", "64 lowercase hex digits")
    for key in ("params", "opt_state", "aux"):
        entries = meta.get(key)
        if key != "params" and entries is None:
            continue
        if not isinstance(entries, dict):
            bad(key, "an object of arrays" + (" or null" if key != "params" else ""))
        for path, entry in entries.items():
            _check_entry(meta_path, key, path, entry)
    # Parameters and aux arrays become nested dicts: no array may sit where another one's module would.
    for key in ("params", "aux"):
        nested = {tuple(str(k) for k in entry["keys"]) for entry in (meta.get(key) or {}).values()}
        for keys in nested:
            for i in range(1, len(keys)):
                if keys[:i] in nested:
                    raise CheckpointError(f"{meta_path}: {key!r}: array {'/'.join(keys)!r} lies inside "
                                          f"array {'/'.join(keys[:i])!r}")
    return meta


# --------------------------------------------------------------------------- paths a save may use


def checked_path(path, for_save: bool = False) -> str:
    """`path` as an absolute str. Refuses "" (not the working directory), and for a save also
    paths that name no entry of their own (".", "..", "/"): a save replaces the entry it names."""
    try:
        raw = os.fspath(path)
    except TypeError:
        raw = path
    if not isinstance(raw, str):
        raise TypeError(f"path: expected a str or os.PathLike of str, got {type(raw).__name__} {raw!r}")
    name = os.path.basename(os.path.normpath(raw)) if raw else ""
    if not raw or (for_save and name in ("", ".", "..")):
        raise ValueError(f"path: expected a checkpoint directory's name (e.g. 'checkpoints/run1'), got {raw!r}")
    return os.path.abspath(raw)


def _orphan_match(entry: str, name: str, kind: str):
    """A match of `.name.<kind>-<suffix>` (kind "tmp" or "old"), the names a save gives its
    temporary and set-aside directories; group 1 is the saving process's pid where recorded."""
    return re.fullmatch(rf"\.{re.escape(name)}\.{kind}-(?:(\d+)-)?[A-Za-z0-9_]+", entry)


def why_not_ours(path: str, complete: bool = True) -> str | None:
    """None if `path` is absent, an empty directory, or a directory that looks written by a save:
    only arrays.npz and meta.json, both regular files, meta.json valid and ours. Otherwise why not.
    `complete=False` accepts a save's unfinished temporary directory (meta.json missing or partial)."""
    try:
        st = os.lstat(path)
    except (FileNotFoundError, NotADirectoryError):  # absent; a parent that is a file fails later
        return None
    if stat.S_ISLNK(st.st_mode):
        return "is a symlink"
    if not stat.S_ISDIR(st.st_mode):
        return "is a file, not a directory"
    entries = os.listdir(path)
    foreign = sorted(set(entries) - SAVE_FILES)
    if foreign:
        listed = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
        return f"holds {listed}, which a save does not write"
    for entry in entries:
        if not stat.S_ISREG(os.lstat(os.path.join(path, entry)).st_mode):
            return f"its {entry} is not a regular file"
    if not complete or not entries:
        return None
    meta_path = os.path.join(path, META_FILE)
    if META_FILE not in entries:
        return f"has no {META_FILE}"
    try:
        with open(meta_path, "rb") as f:
            _parse_meta(f.read(), meta_path)
    except CheckpointError as e:
        return f"its {META_FILE} is not a Phoenix checkpoint's ({e})"
    return None


def _save_target(path: str) -> str:
    """The directory a save to `path` writes: symlinks (the path or its parents) are followed, so
    a save through a link replaces the checkpoint the link points to and leaves the link alone.
    Refuses, before anything is written, a target that is not absent, empty or a checkpoint."""
    target = os.path.realpath(path)
    if os.path.islink(target):
        raise CheckpointError(f"{path}: is a symlink that does not resolve (a loop?); refusing to save through it")
    problem = why_not_ours(target)
    if problem:
        shown = path if target == path else f"{path} (-> {target})"
        raise CheckpointError(f"{shown}: {problem}; refusing to overwrite what is not a Phoenix checkpoint. "
                              f"Save to a new or empty directory, or remove it yourself")
    return target


def pid_alive(pid: int) -> bool:
    """Whether process `pid` of this host is running (this process counts: another thread may be saving)."""
    if pid == os.getpid():
        return True  # another thread of this process may be saving
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's live process
    return True


def remove_leftovers(parent: str, name: str) -> None:
    """Deletes the `.name.tmp-*` / `.name.old-*` directories that killed saves of the checkpoint
    `parent/name` left, once a new save is in place: only those that look like ours, and not the
    temporary directories of a save still running (its pid is alive)."""
    try:
        entries = os.listdir(parent)
    except OSError:
        return
    for entry in entries:
        full = os.path.join(parent, entry)
        tmp, old = _orphan_match(entry, name, "tmp"), _orphan_match(entry, name, "old")
        if tmp and tmp.group(1) is not None and pid_alive(int(tmp.group(1))):
            continue
        try:
            ours = (tmp or old) and why_not_ours(full, complete=bool(old)) is None
        except OSError:  # unreadable: not ours to judge, and the save itself succeeded
            continue
        if ours:
            shutil.rmtree(full, ignore_errors=True)


def _os_error(e: OSError, message: str) -> OSError:
    """An OSError of e's kind (OSError(errno, ...) picks PermissionError, ...) with `message`."""
    return OSError(message) if e.errno is None else OSError(e.errno, message)


# --------------------------------------------------------------------------- save


def _fsync_path(path: str) -> None:
    """fsync a file or directory (directory fsync makes renames and new entries durable)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_arrays(file_path: str, arrays: dict[str, np.ndarray]) -> None:
    with open(file_path, "wb") as f:
        np.savez(f, allow_pickle=False, **arrays)
        f.flush()
        os.fsync(f.fileno())


def _write_meta(file_path: str, meta: dict) -> None:
    with open(file_path, "w") as f:
        json.dump(meta, f, indent=1, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())


def _sha256_of_file(file_path: str) -> str:
    with open(file_path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _describe_tree(tree, prefix: str, arrays: dict, where: str) -> dict:
    """Adds the tree's leaves to `arrays` (as storable numpy) and returns their meta entries."""
    entries = {}
    flat, _ = _flatten(tree)
    for path, components, leaf in flat:
        key = prefix + path
        if not components:  # meta.json names every array by its path components
            raise ValueError(f"{where} tree: a bare array at its root has no name to store it under; pass a "
                             f"dict such as {{'w': array}}")
        if key in arrays:
            raise ValueError(f"{where} path {key!r} collides with another array key")
        array = np.asarray(jax.device_get(leaf))
        stored = _to_storable(array, f"{where} '{path}'")
        arrays[key] = stored
        entries[path] = {
            "keys": components,
            "shape": list(array.shape),
            "dtype": array.dtype.name,
            "stored_as": stored.dtype.name,
        }
    return entries


def _move_aside(target: str, parent: str, name: str) -> str | None:
    """Renames the directory at `target` to a fresh `.name.old-*` sibling; None if there is none.
    Checks again after the rename (the check before could be stale) and undoes it if not ours."""
    if not os.path.lexists(target):
        return None
    aside = os.path.join(parent, f".{name}.old-{uuid.uuid4().hex[:16]}")
    os.rename(target, aside)
    problem = why_not_ours(aside)
    if problem:
        os.rename(aside, target)
        raise CheckpointError(f"{target}: changed while being saved over and now {problem}; left it as it is")
    return aside


def check_step(step, name: str = "step") -> int:
    """`step` as an int in [0, MAX_STEP): a Python or NumPy integer (bool is refused)."""
    if isinstance(step, (bool, np.bool_)):
        raise TypeError(f"{name}: expected an int in [0, 2**63), got bool {step!r}")
    try:
        value = operator.index(step)
    except TypeError:
        raise TypeError(f"{name}: expected an int in [0, 2**63), got {type(step).__name__} {_short(step)}") from None
    if not 0 <= value < MAX_STEP:
        raise ValueError(f"{name}: expected an int in [0, 2**63), got {value}")
    return value


JSON_VALUES = "JSON data (dicts with str keys, lists, tuples read back as lists, str, int, float, bool, None)"


def check_json(value, name: str) -> None:
    """Raises TypeError naming the key path (e.g. `extra['arr']`) of the first value in `value`
    that JSON cannot hold as it is (`JSON_VALUES`): arrays and NumPy scalars (convert them with
    .tolist() / .item(), or save arrays as `aux`), sets, objects, non-str dict keys (JSON would
    turn 1 into "1"); ValueError for a container that holds itself."""
    active = set()  # ids of the containers on the current key path: a repeat is a cycle

    def walk(x, where):
        if x is None or isinstance(x, (bool, int, float, str)):
            return
        if isinstance(x, (dict, list, tuple)):
            if id(x) in active:
                raise ValueError(f"{where}: expected {JSON_VALUES}, got a container that holds itself "
                                 f"(a circular reference)")
            active.add(id(x))
            if isinstance(x, dict):
                for k, v in x.items():
                    if not isinstance(k, str):
                        raise TypeError(f"{where}: expected {JSON_VALUES}, got the {type(k).__name__} dict key "
                                        f"{_short(k, 40)}")
                    walk(v, f"{where}[{k!r}]")
            else:
                for i, v in enumerate(x):
                    walk(v, f"{where}[{i}]")
            active.discard(id(x))
            return
        hint = ""
        if dataclasses.is_dataclass(x):
            hint = " (encode configs with phoenix_configs.config_to_dict)"
        elif isinstance(x, (np.ndarray, jax.Array)):
            hint = " (convert it with .tolist(), or pass arrays as `aux`)"
        elif isinstance(x, np.generic):
            hint = " (convert it with .item())"
        raise TypeError(f"{where}: expected {JSON_VALUES}, got {type(x).__name__} {_short(x, 40)}{hint}")

    try:
        walk(value, name)
    except RecursionError:
        raise ValueError(f"{name}: nested too deeply to store as JSON") from None


def save_checkpoint(path, params, opt_state=None, step=0, config=None, extra=None, aux=None) -> str:
    """Writes params (and optionally optimiser state, step, JSON `config` and `extra`, and `aux`, a
    pytree of other arrays) to the directory `path`, atomically replacing the Phoenix checkpoint
    there, if any. Returns the absolute path. `config` is stored as given: encode dataclass configs
    with phoenix_configs.config_to_dict (a Trainer's save does).

    Refuses (CheckpointError, nothing written or moved) a `path` holding anything else: a file, a
    non-empty directory that is not a checkpoint (see the module docstring). A failed write
    raises OSError naming the path and leaves the previous checkpoint as it was. `step` must be
    an int in [0, 2**63) and `config` and `extra` JSON data (`check_json`), else ValueError /
    TypeError naming them, before anything is written.
    """
    given = checked_path(path, for_save=True)
    step = check_step(step)
    check_json(config, "config")
    check_json(extra, "extra")
    target = _save_target(given)
    parent, name = os.path.dirname(target), os.path.basename(target)

    arrays: dict[str, np.ndarray] = {}
    meta = {
        "format": FORMAT_MARKER,
        "format_version": FORMAT_VERSION,
        "save_id": uuid.uuid4().hex,
        "step": step,
        "config": config,
        "extra": extra,
        "params": _describe_tree(params, "", arrays, "parameter"),
        "opt_state": None if opt_state is None else _describe_tree(opt_state, OPT_STATE_PREFIX, arrays,
                                                                   "optimiser state"),
    }
    if aux is not None:  # absent rather than null: readers older than `aux` see the same meta.json
        meta["aux"] = _describe_tree(aux, AUX_PREFIX, arrays, "aux")

    # The pid in the name tells the next save whether this one is still running.
    tmp = os.path.join(parent, f".{name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:16]}")
    try:
        os.makedirs(parent, exist_ok=True)
        os.mkdir(tmp)
    except OSError as e:
        raise _os_error(e, f"cannot save checkpoint {given}: cannot create a directory in {parent}: {e}") from e
    aside = None
    try:
        arrays_path = os.path.join(tmp, ARRAYS_FILE)
        _write_arrays(arrays_path, arrays)
        meta["arrays_file_bytes"] = os.path.getsize(arrays_path)
        meta["arrays_sha256"] = _sha256_of_file(arrays_path)
        _write_meta(os.path.join(tmp, META_FILE), meta)
        _fsync_path(tmp)
        aside = _move_aside(target, parent, name)
        try:
            os.rename(tmp, target)
        except BaseException:
            if aside is not None:
                os.rename(aside, target)
                aside = None
            raise
        _fsync_path(parent)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, OSError):
            raise _os_error(e, f"saving checkpoint {given} failed, the previous one (if any) is kept: {e}") from e
        raise
    if aside is not None:
        if why_not_ours(aside) is None:
            shutil.rmtree(aside, ignore_errors=True)
        else:  # someone wrote into it since it was checked: theirs now
            warnings.warn(f"{aside}: the previous checkpoint of {given} was changed during the save; left in place",
                          stacklevel=2)
    # Directories of earlier saves that were killed are superseded by the one just written.
    remove_leftovers(parent, name)
    return given


# --------------------------------------------------------------------------- load


def _find_aside_copy(path: str) -> str | None:
    """The newest complete `.name.old-*` sibling of the directory `path` resolves to, left by a
    save killed between its two renames."""
    real = os.path.realpath(path)
    parent, name = os.path.dirname(real), os.path.basename(real)
    try:
        entries = os.listdir(parent)
    except OSError:
        return None
    candidates = []
    for entry in entries:
        full = os.path.join(parent, entry)
        if _orphan_match(entry, name, "old") and os.path.isfile(os.path.join(full, META_FILE)):
            try:
                candidates.append((os.path.getmtime(full), full))
            except FileNotFoundError:  # removed by a save meanwhile
                pass
    return max(candidates)[1] if candidates else None


def _open_dir(path: str) -> tuple[int, str]:
    """(fd, directory) of the checkpoint at `path`, or of the copy a killed save left aside.

    The files of one checkpoint are read through this one fd, so a save that renames a new
    directory in meanwhile cannot mix its files with this one's."""
    for _ in range(LOAD_ATTEMPTS):
        try:
            return os.open(path, os.O_RDONLY | os.O_DIRECTORY), path
        except FileNotFoundError:
            pass
        except NotADirectoryError:
            kind = "a file" if os.path.isfile(path) else "a FIFO, socket or device"
            raise CheckpointError(f"{path}: is {kind}, not a checkpoint directory") from None
        aside = _find_aside_copy(path)
        if aside is None:
            if os.path.exists(path):
                continue  # a save moved its new directory in meanwhile
            raise FileNotFoundError(f"{path}: no checkpoint directory")
        # A save between its two renames (microseconds) also leaves only the aside copy.
        time.sleep(RENAME_GAP_WAIT_S)
        if os.path.exists(path):
            continue
        try:
            fd = os.open(aside, os.O_RDONLY | os.O_DIRECTORY)
        except FileNotFoundError:
            continue
        warnings.warn(f"{path} is missing; loading {aside}, left by a save that was interrupted", stacklevel=4)
        return fd, aside
    raise CheckpointError(f"{path}: replaced {LOAD_ATTEMPTS} times while being opened; is a save running in a loop?")


def _still_at(fd: int, dir_path: str) -> bool:
    """Whether the directory open as `fd` is still the one at `dir_path` (no save replaced it)."""
    try:
        return os.path.samestat(os.fstat(fd), os.stat(dir_path))
    except FileNotFoundError:
        return False


def _read_consistently(path: str, read):
    """read(fd, directory) on one whole checkpoint at `path`. A CheckpointError or missing file
    from a directory that a concurrent save has since replaced is retried on the new one."""
    last = None
    for _ in range(LOAD_ATTEMPTS):
        fd, dir_path = _open_dir(path)
        try:
            return read(fd, dir_path)
        except (CheckpointError, FileNotFoundError) as e:
            if _still_at(fd, dir_path):
                raise  # nothing changed under the read: the error is the checkpoint's
            last = e
        finally:
            os.close(fd)
    raise CheckpointError(f"{path}: replaced by concurrent saves {LOAD_ATTEMPTS} times while being read; "
                          f"last error: {last}")


def _open_at(fd: int, name: str, dir_path: str):
    """The regular file `name` of the directory open as `fd` (whose path is `dir_path`), opened
    for binary reading. Anything else there (a directory, a FIFO, a device) raises CheckpointError
    with its full path; O_NONBLOCK keeps the open of a FIFO from waiting for a writer."""
    full = os.path.join(dir_path, name)
    try:
        file_fd = os.open(name, os.O_RDONLY | os.O_NONBLOCK, dir_fd=fd)
    except FileNotFoundError:
        raise  # the callers say what is missing
    except OSError as e:  # e.g. permission denied: name the file, not just "meta.json"
        raise _os_error(e, f"{full}: cannot open: {e.strerror or e}") from None
    try:
        mode = os.fstat(file_fd).st_mode
        if not stat.S_ISREG(mode):
            kind = "a directory" if stat.S_ISDIR(mode) else "not a regular file"
            raise CheckpointError(f"{full}: is {kind}; a checkpoint's {name} is a file")
        os.set_blocking(file_fd, True)
        return os.fdopen(file_fd, "rb")
    except BaseException:
        os.close(file_fd)
        raise


def _parse_meta(data: bytes, meta_path: str) -> dict:
    try:
        meta = json.loads(data.decode("utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
        raise CheckpointError(f"{meta_path}: corrupted or truncated JSON ({e})") from None
    return _check_meta(meta, meta_path)


def _read_meta(meta_path: str, fd: int | None = None) -> dict:
    """meta.json, schema-checked; read through the directory fd `fd` where given."""
    try:
        with (open(meta_path, "rb") if fd is None else _open_at(fd, META_FILE, os.path.dirname(meta_path))) as f:
            data = f.read()
    except FileNotFoundError:
        raise CheckpointError(f"{meta_path}: missing; not a checkpoint directory") from None
    return _parse_meta(data, meta_path)


def _check_template(template, name: str) -> None:
    """Every leaf of a template has a shape and a dtype (an array or jax.ShapeDtypeStruct)."""
    for path, _, leaf in _flatten(template)[0]:
        if not hasattr(leaf, "shape") or not hasattr(leaf, "dtype"):
            raise TypeError(f"{name}: leaf {path!r} is a {type(leaf).__name__}; expected arrays or "
                            f"jax.ShapeDtypeStruct (anything with .shape and .dtype)")


def _check_against_template(arrays_path: str, what: str, entries: dict, template) -> None:
    """Raises ValueError listing every missing/unexpected path and shape/dtype mismatch."""
    flat, _ = _flatten(template)
    expected = {path: _shape_dtype(leaf) for path, _, leaf in flat}
    problems = []
    for path, (shape, dtype) in expected.items():
        if path not in entries:
            problems.append(f"{what} '{path}' is missing from the checkpoint "
                            f"(expected shape {shape} {dtype.name})")
            continue
        got_shape, got_dtype = tuple(entries[path]["shape"]), entries[path]["dtype"]
        if got_shape != shape or got_dtype != dtype.name:
            problems.append(f"{what} '{path}': expected shape {shape} {dtype.name}, "
                            f"checkpoint has {got_shape} {got_dtype}")
    for path in entries:
        if path not in expected:
            entry = entries[path]
            problems.append(f"{what} '{path}' in the checkpoint is not in the template "
                            f"(shape {tuple(entry['shape'])} {entry['dtype']})")
    if problems:
        listed = problems[:MAX_LISTED_PROBLEMS]
        if len(problems) > MAX_LISTED_PROBLEMS:
            listed.append(f"... and {len(problems) - MAX_LISTED_PROBLEMS} more")
        raise ValueError(f"{arrays_path}: {len(problems)} {what} mismatch(es) against the template:\n  "
                         + "\n  ".join(listed))


def _read_array(npz, arrays_path: str, key: str, entry: dict) -> np.ndarray:
    try:
        stored = npz[key]
    except KeyError:
        raise CheckpointError(f"{arrays_path}: array '{key}' listed in {META_FILE} is missing") from None
    except (zipfile.BadZipFile, ValueError, OSError, EOFError) as e:
        raise CheckpointError(f"{arrays_path}: cannot read array '{key}' (corrupted file?): {e}") from None
    dtype = _dtype_of_name(entry["dtype"])
    if stored.dtype.name != entry["stored_as"] or list(stored.shape) != entry["shape"]:
        raise CheckpointError(f"{arrays_path}: array '{key}' is {stored.shape} {stored.dtype.name}, "
                              f"{META_FILE} says {tuple(entry['shape'])} {entry['stored_as']}")
    return stored.view(dtype) if stored.dtype != dtype else stored


def _unflatten_dicts(entries: dict, values: dict):
    """Nested dicts from path components (Haiku params: {module: {name: array}})."""
    root: dict = {}
    for path, entry in entries.items():
        node = root
        *parents, last = [str(k) for k in entry["keys"]]
        for k in parents:
            node = node.setdefault(k, {})
        node[last] = values[path]
    return root


def _read_checkpoint(fd: int, path: str, params_template, opt_state_template, ignore_unexpected):
    """(meta, param values, optimiser-state values) of the checkpoint directory open as `fd`."""
    meta = _read_meta(os.path.join(path, META_FILE), fd)
    arrays_path = os.path.join(path, ARRAYS_FILE)
    try:
        f = _open_at(fd, ARRAYS_FILE, path)
    except FileNotFoundError:
        raise CheckpointError(f"{arrays_path}: missing") from None
    with f:
        size = os.fstat(f.fileno()).st_size
        if size != meta["arrays_file_bytes"]:
            raise CheckpointError(f"{arrays_path}: {size} bytes but {META_FILE} records "
                                  f"{meta['arrays_file_bytes']}; the file is truncated or corrupted")
        param_entries = meta["params"]
        if params_template is not None and ignore_unexpected:
            wanted = {p for p, _, _ in _flatten(params_template)[0]}
            param_entries = {p: e for p, e in param_entries.items() if p in wanted}
        if params_template is not None:
            _check_against_template(arrays_path, "parameter", param_entries, params_template)
        opt_entries = meta.get("opt_state")
        if opt_state_template is not None:
            if opt_entries is None:
                raise ValueError(f"{arrays_path}: the checkpoint holds no optimiser state")
            _check_against_template(arrays_path, "optimiser state", opt_entries, opt_state_template)

        # Version 1 recorded no hash: its size check above is all that ties the two files.
        digest = hashlib.file_digest(f, "sha256").hexdigest() if "arrays_sha256" in meta else None
        f.seek(0)
        try:
            npz = np.load(f, allow_pickle=False)
        except (zipfile.BadZipFile, ValueError, OSError, EOFError) as e:
            raise CheckpointError(f"{arrays_path}: not a readable npz archive (corrupted?): {e}") from None
        # The arrays are read before the hash is compared so that a damaged member is named.
        with npz:
            param_values = {p: _read_array(npz, arrays_path, p, e) for p, e in param_entries.items()}
            opt_values = None
            if opt_entries is not None:
                opt_values = {p: _read_array(npz, arrays_path, OPT_STATE_PREFIX + p, e)
                              for p, e in opt_entries.items()}
            aux_entries = meta.get("aux")
            aux = None if aux_entries is None else _unflatten_dicts(
                aux_entries, {p: _read_array(npz, arrays_path, AUX_PREFIX + p, e) for p, e in aux_entries.items()})
    if digest is not None and digest != meta["arrays_sha256"]:
        raise CheckpointError(f"{arrays_path}: sha256 {digest[:16]}... differs from the "
                              f"{meta['arrays_sha256'][:16]}... that {META_FILE} records for save "
                              f"{meta['save_id']}; the file was copied from another save or corrupted")
    return meta, param_entries, param_values, opt_values, aux


def load_checkpoint(path, params_template=None, opt_state_template=None, ignore_unexpected=False,
                    decode_config=None) -> Checkpoint:
    """Reads a checkpoint written by `save_checkpoint`.

    With `params_template` / `opt_state_template` (any pytree whose leaves have .shape and .dtype,
    e.g. real params or `jax.eval_shape` output), every path, shape and dtype must match, else
    ValueError naming the file, the path and expected vs actual; the result then has the template's
    structure (the way optax NamedTuple states come back). Without a template, params come back
    as nested dicts and optimiser state as a flat {path: array} dict; `aux` arrays always come
    back as nested dicts. With `ignore_unexpected`,
    parameters absent from the template are skipped instead of raising (e.g. loading a trainer
    checkpoint, which also holds the hash tables, into a model-only template).

    The config comes back as the JSON data it was saved as; `decode_config`, a function of that
    data (e.g. phoenix_configs.config_from_dict, which rebuilds model and optimiser configs), is
    applied to it when given, and a ValueError it raises becomes a CheckpointError naming meta.json.
    Truncated, corrupted or mismatched files and malformed meta.json raise CheckpointError (a
    ValueError) naming the file; a load concurrent with saves returns one whole save.
    """
    path = checked_path(path)
    if decode_config is not None and not callable(decode_config):
        raise TypeError(f"decode_config: expected a function of the config's JSON data (e.g. "
                        f"phoenix_configs.config_from_dict) or None, got {type(decode_config).__name__}")
    for name, template in (("params_template", params_template), ("opt_state_template", opt_state_template)):
        if template is not None:
            _check_template(template, name)
    meta, param_entries, param_values, opt_values, aux = _read_consistently(
        path, lambda fd, d: _read_checkpoint(fd, d, params_template, opt_state_template, ignore_unexpected))

    if params_template is not None:
        flat, treedef = _flatten(params_template)
        params = jax.tree_util.tree_unflatten(treedef, [param_values[p] for p, _, _ in flat])
    else:
        params = _unflatten_dicts(param_entries, param_values)
    opt_state = opt_values
    if opt_state_template is not None:
        flat, treedef = _flatten(opt_state_template)
        opt_state = jax.tree_util.tree_unflatten(treedef, [opt_values[p] for p, _, _ in flat])

    config = meta.get("config")
    if config is not None and decode_config is not None:
        try:
            config = decode_config(config)
        except ValueError as e:  # e.g. a config type the decoder does not know
            raise CheckpointError(f"{os.path.join(path, META_FILE)}: {e}") from None
    return Checkpoint(params=params, opt_state=opt_state, step=meta["step"], config=config,
                      extra=meta.get("extra"), meta=meta, aux=aux)


def read_meta(path) -> dict:
    """The schema-checked meta.json of a checkpoint directory (or of the copy an interrupted save
    left aside)."""
    return _read_consistently(checked_path(path), lambda fd, d: _read_meta(os.path.join(d, META_FILE), fd))


__all__ = ["ARRAYS_FILE", "FORMAT_VERSION", "META_FILE", "MAX_STEP", "READABLE_VERSIONS", "Checkpoint",
           "CheckpointError", "check_json", "check_step", "checked_path", "load_checkpoint", "pid_alive", "read_meta",
           "remove_leftovers", "save_checkpoint", "why_not_ours"]


# --------------------------------------------------------------------------- names that moved out

# Names this module held before it became a format that knows no model, and where they live now.
_MOVED = {
    **dict.fromkeys(("config_to_dict", "config_from_dict", "config_to_json", "config_from_json", "TYPE_TAG",
                     "DTYPE_TAG", "TUPLE_TAG"), "phoenix_configs"),
    "load_config": "phoenix_configs (as load_checkpoint_config)",
    **dict.fromkeys(("step_checkpoint_path", "list_step_checkpoints", "prune_step_checkpoints", "STEP_PATTERN"),
                    "phoenix_resume"),
    **dict.fromkeys(("describe_checkpoint", "CheckpointInfo", "MODEL_KINDS"), "runners"),
}


def __getattr__(name: str):
    """Points a caller of a name that moved out of this module to its new home."""
    if name in _MOVED:
        raise AttributeError(f"phoenix_checkpoint.{name} moved to {_MOVED[name]}: a checkpoint stores configs as "
                             f"opaque JSON and knows no model")
    raise AttributeError(f"module 'phoenix_checkpoint' has no attribute {name!r}")
