"""Pickle-free checkpoints: parameters, optimiser state, step and config in a directory.

Layout of a checkpoint directory `path/`:

  arrays.npz  every array, written with `np.savez(..., allow_pickle=False)` and read with
              `np.load(..., allow_pickle=False)`. Parameters are keyed by their pytree path, e.g.
              `phoenix_model/proj_mat_1` or
              `transformer/decoder_layer_0/multi_head_attention/query/w` (spec section 8);
              optimiser-state arrays by `opt_state/<path>`, e.g. `opt_state/1/0/mu/phoenix_model/proj_mat_1`.
  meta.json   format version, step, config (dataclasses as tagged JSON, dtypes by name), caller's
              `extra` JSON, the byte size of arrays.npz, and for every array its path components,
              shape, logical dtype and the dtype it is stored as.

Arrays whose dtype numpy cannot store without pickle (bfloat16 and the other ml_dtypes types)
are stored as an unsigned-integer view of the same width; meta.json records the real dtype.

A save is atomic: everything is written and fsynced in a temporary sibling directory, which is
then renamed over the target. An existing checkpoint is first renamed aside and removed only once
the new one is in place, so a crash at any point leaves a loadable checkpoint (the new one, the
old one in place, or the old one aside, which `load_checkpoint` finds).
"""

import dataclasses
import json
import os
import shutil
import tempfile
import warnings
import zipfile
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

import grok
import recsys_model
import recsys_retrieval_model

FORMAT_VERSION = 1
ARRAYS_FILE = "arrays.npz"
META_FILE = "meta.json"
# Prefix of optimiser-state keys in arrays.npz; parameter keys carry no prefix so that the file
# reads like the release's parameter listing (spec section 8).
OPT_STATE_PREFIX = "opt_state/"
# Problems listed in one mismatch error before the rest are summarised as a count.
MAX_LISTED_PROBLEMS = 20
# JSON tags for values that JSON has no type for.
TYPE_TAG = "__type__"
DTYPE_TAG = "__dtype__"
TUPLE_TAG = "__tuple__"


class CheckpointError(ValueError):
    """A checkpoint file is missing, truncated, corrupted or of an unknown format."""


class Checkpoint(NamedTuple):
    """What `load_checkpoint` returns. Arrays are host numpy arrays."""

    params: Any  # nested dict (Haiku params) or the params template's structure
    opt_state: Any  # the template's structure, a flat {path: array} dict without one, or None
    step: int
    config: Any  # the saved config, dataclasses rebuilt; None if none was saved
    extra: Any  # the caller's JSON `extra`, or None
    meta: dict  # meta.json as read


# --------------------------------------------------------------------------- configs as JSON


def _known_config_types() -> dict[str, type]:
    from phoenix_training import OptimizerConfig  # lazy: training imports this module

    return {
        cls.__name__: cls
        for cls in (
            grok.TransformerConfig,
            recsys_model.HashConfig,
            recsys_model.PhoenixModelConfig,
            recsys_retrieval_model.PhoenixRetrievalModelConfig,
            OptimizerConfig,
        )
    }


def _is_dtype_like(value) -> bool:
    """True for np.dtype instances and scalar types such as jnp.bfloat16 or np.float32."""
    if isinstance(value, np.dtype):
        return True
    if isinstance(value, type) and not dataclasses.is_dataclass(value):
        try:
            np.dtype(value)
        except TypeError:
            return False
        return value not in (int, float, bool, complex, str, bytes, object)
    return False


def config_to_dict(config, _where: str = "config"):
    """Encodes a config (nested dataclasses, dtypes, tuples, dicts, scalars) as JSON-ready data.

    Dataclasses become `{"__type__": class name, field: value, ...}` (fields with init=False are
    derived state and are left out); dtypes such as `jnp.bfloat16` become `{"__dtype__": "bfloat16"}`.
    """
    if dataclasses.is_dataclass(config) and not isinstance(config, type):
        out = {TYPE_TAG: type(config).__name__}
        for field in dataclasses.fields(config):
            if field.init:
                out[field.name] = config_to_dict(getattr(config, field.name), f"{_where}.{field.name}")
        return out
    if config is None or isinstance(config, (bool, int, float, str)):
        return config
    if _is_dtype_like(config):
        return {DTYPE_TAG: np.dtype(config).name}
    if isinstance(config, tuple):
        return {TUPLE_TAG: [config_to_dict(v, f"{_where}[{i}]") for i, v in enumerate(config)]}
    if isinstance(config, list):
        return [config_to_dict(v, f"{_where}[{i}]") for i, v in enumerate(config)]
    if isinstance(config, dict):
        if not all(isinstance(k, str) for k in config):
            raise TypeError(f"{_where}: dict keys must be strings to be stored as JSON")
        return {k: config_to_dict(v, f"{_where}.{k}") for k, v in config.items()}
    if isinstance(config, (np.integer, np.floating, np.bool_)):
        return config.item()
    raise TypeError(f"{_where}: a {type(config).__name__} cannot be stored in a JSON config")


def _dtype_from_name(name: str):
    """`jnp.<name>` where it exists, so `fprop_dtype=jnp.bfloat16` round-trips to the same object."""
    value = getattr(jnp, name, None)
    if value is not None and _is_dtype_like(value):
        return value
    return np.dtype(name)


def config_from_dict(data, extra_types=()):
    """Inverse of `config_to_dict`. Dataclass types are looked up by name among the model configs
    (TransformerConfig, HashConfig, PhoenixModelConfig, PhoenixRetrievalModelConfig) and
    `extra_types`; fields missing from `data` take their defaults, unknown fields raise."""
    types = _known_config_types()
    types.update({cls.__name__: cls for cls in extra_types})

    def decode(value):
        if isinstance(value, list):
            return [decode(v) for v in value]
        if not isinstance(value, dict):
            return value
        if DTYPE_TAG in value:
            return _dtype_from_name(value[DTYPE_TAG])
        if TUPLE_TAG in value:
            return tuple(decode(v) for v in value[TUPLE_TAG])
        if TYPE_TAG in value:
            name = value[TYPE_TAG]
            if name not in types:
                raise ValueError(f"unknown config type {name!r}; pass it in extra_types")
            cls = types[name]
            init_fields = {f.name for f in dataclasses.fields(cls) if f.init}
            kwargs = {k: decode(v) for k, v in value.items() if k != TYPE_TAG}
            unknown = sorted(set(kwargs) - init_fields)
            if unknown:
                raise ValueError(f"config type {name} has no field(s) {unknown}")
            return cls(**kwargs)
        return {k: decode(v) for k, v in value.items()}

    return decode(data)


def config_to_json(config, indent: int | None = 2) -> str:
    """A config (PhoenixModelConfig, PhoenixRetrievalModelConfig, HashConfig, TransformerConfig,
    or any nesting of dataclasses/dicts of them) as a JSON string."""
    return json.dumps(config_to_dict(config), indent=indent, sort_keys=True)


def config_from_json(text: str, extra_types=()):
    """Inverse of `config_to_json`."""
    return config_from_dict(json.loads(text), extra_types=extra_types)


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


def _describe_tree(tree, prefix: str, arrays: dict, where: str) -> dict:
    """Adds the tree's leaves to `arrays` (as storable numpy) and returns their meta entries."""
    entries = {}
    flat, _ = _flatten(tree)
    for path, components, leaf in flat:
        key = prefix + path
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


def save_checkpoint(path, params, opt_state=None, step=0, config=None, extra=None) -> str:
    """Writes params (and optionally optimiser state, step, config and JSON `extra`) to the
    directory `path`, atomically replacing any checkpoint there. Returns the path."""
    path = os.path.abspath(os.fspath(path))
    parent, name = os.path.dirname(path), os.path.basename(path)
    os.makedirs(parent, exist_ok=True)

    arrays: dict[str, np.ndarray] = {}
    meta = {
        "format_version": FORMAT_VERSION,
        "step": int(step),
        "config": None if config is None else config_to_dict(config),
        "extra": extra,
        "params": _describe_tree(params, "", arrays, "parameter"),
        "opt_state": None if opt_state is None else _describe_tree(opt_state, OPT_STATE_PREFIX, arrays,
                                                                   "optimiser state"),
    }
    json.dumps(meta)  # fail on a non-JSON `extra` before anything is written

    tmp = tempfile.mkdtemp(prefix=f".{name}.tmp-", dir=parent)
    aside = None
    try:
        arrays_path = os.path.join(tmp, ARRAYS_FILE)
        _write_arrays(arrays_path, arrays)
        meta["arrays_file_bytes"] = os.path.getsize(arrays_path)
        _write_meta(os.path.join(tmp, META_FILE), meta)
        _fsync_path(tmp)
        if os.path.exists(path):
            aside = tempfile.mkdtemp(prefix=f".{name}.old-", dir=parent)
            os.rmdir(aside)  # mkdtemp only reserved a unique name; rename needs it absent
            os.rename(path, aside)
        try:
            os.rename(tmp, path)
        except BaseException:
            if aside is not None:
                os.rename(aside, path)
                aside = None
            raise
        _fsync_path(parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if aside is not None:
        shutil.rmtree(aside, ignore_errors=True)
    # Copies set aside by earlier saves that crashed are superseded by the one just written.
    while (stale := _find_aside_copy(path)) is not None:
        shutil.rmtree(stale)
    return path


# --------------------------------------------------------------------------- load


def _find_aside_copy(path: str) -> str | None:
    """The newest `.name.old-*` sibling left by a save that crashed between its two renames."""
    parent, name = os.path.dirname(path), os.path.basename(path)
    if not os.path.isdir(parent):
        return None
    candidates = [
        os.path.join(parent, entry)
        for entry in os.listdir(parent)
        if entry.startswith(f".{name}.old-") and os.path.isfile(os.path.join(parent, entry, META_FILE))
    ]
    return max(candidates, key=os.path.getmtime) if candidates else None


def _read_meta(meta_path: str) -> dict:
    try:
        with open(meta_path) as f:
            meta = json.load(f)
    except FileNotFoundError:
        raise CheckpointError(f"{meta_path}: missing; not a checkpoint directory") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{meta_path}: corrupted or truncated JSON ({e})") from None
    if not isinstance(meta, dict) or meta.get("format_version") != FORMAT_VERSION:
        version = meta.get("format_version") if isinstance(meta, dict) else None
        raise CheckpointError(f"{meta_path}: unsupported checkpoint format version {version!r}, "
                              f"this code reads version {FORMAT_VERSION}")
    return meta


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


def load_checkpoint(path, params_template=None, opt_state_template=None, ignore_unexpected=False,
                    config_types=()) -> Checkpoint:
    """Reads a checkpoint written by `save_checkpoint`.

    With `params_template` / `opt_state_template` (any pytree whose leaves have .shape and .dtype,
    e.g. real params or `jax.eval_shape` output), every path, shape and dtype must match, else
    ValueError naming the file, the path and expected vs actual; the result then has the template's
    structure (the way optax NamedTuple states come back). Without a template, params come back
    as nested dicts and optimiser state as a flat {path: array} dict. With `ignore_unexpected`,
    parameters absent from the template are skipped instead of raising (e.g. loading a trainer
    checkpoint, which also holds the hash tables, into a model-only template). `config_types`:
    dataclasses besides the model configs that the saved config may contain (config_from_dict).
    Truncated or corrupted files raise CheckpointError (a ValueError) naming the file.
    """
    path = os.path.abspath(os.fspath(path))
    if not os.path.isdir(path):
        aside = _find_aside_copy(path)
        if aside is None:
            raise FileNotFoundError(f"{path}: no checkpoint directory")
        warnings.warn(f"{path} is missing; loading {aside}, left by a save that was interrupted", stacklevel=2)
        path = aside
    meta = _read_meta(os.path.join(path, META_FILE))
    arrays_path = os.path.join(path, ARRAYS_FILE)
    if not os.path.isfile(arrays_path):
        raise CheckpointError(f"{arrays_path}: missing")
    size = os.path.getsize(arrays_path)
    if size != meta.get("arrays_file_bytes"):
        raise CheckpointError(f"{arrays_path}: {size} bytes but {META_FILE} records "
                              f"{meta.get('arrays_file_bytes')}; the file is truncated or corrupted")

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

    try:
        npz = np.load(arrays_path, allow_pickle=False)
    except (zipfile.BadZipFile, ValueError, OSError, EOFError) as e:
        raise CheckpointError(f"{arrays_path}: not a readable npz archive (corrupted?): {e}") from None
    with npz:
        param_values = {p: _read_array(npz, arrays_path, p, e) for p, e in param_entries.items()}
        opt_values = None
        if opt_entries is not None:
            opt_values = {p: _read_array(npz, arrays_path, OPT_STATE_PREFIX + p, e)
                          for p, e in opt_entries.items()}

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
    if config is not None:
        try:
            config = config_from_dict(config, extra_types=config_types)
        except (ValueError, TypeError) as e:
            warnings.warn(f"{path}: config left as JSON data: {e}", stacklevel=2)
    return Checkpoint(params=params, opt_state=opt_state, step=int(meta["step"]), config=config,
                      extra=meta.get("extra"), meta=meta)


def read_meta(path) -> dict:
    """The meta.json of a checkpoint directory (or of the copy an interrupted save left aside)."""
    path = os.path.abspath(os.fspath(path))
    if not os.path.isdir(path):
        aside = _find_aside_copy(path)
        if aside is None:
            raise FileNotFoundError(f"{path}: no checkpoint directory")
        path = aside
    return _read_meta(os.path.join(path, META_FILE))


def load_config(path, config_types=()):
    """The config saved in a checkpoint, as dataclasses (e.g. {"model": PhoenixModelConfig, ...})."""
    meta = read_meta(path)
    if meta.get("config") is None:
        raise CheckpointError(f"{os.path.join(os.fspath(path), META_FILE)}: no config saved in this checkpoint")
    return config_from_dict(meta["config"], extra_types=config_types)
