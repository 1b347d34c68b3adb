"""Configs as JSON: the config types Phoenix saves, how they are written, and the checks on reading them back.

A checkpoint (phoenix_checkpoint) stores a config as opaque JSON data and knows no model; this module
writes that data (`config_to_dict`) and reads it back into dataclasses (`config_from_dict`). The JSON form:

  a dataclass   {"__type__": class name, field: value, ...}; fields with init=False are derived
                state and are left out
  a dtype       {"__dtype__": "bfloat16"}; read back as the `jnp` object of that name where one exists,
                so `fprop_dtype=jnp.bfloat16` round-trips to the same object
  a tuple       {"__tuple__": [items]}
  anything else a list, a dict with str keys, None, bool, int, float or str, as itself

Reading looks class names up in CONFIG_TYPES and the caller's `extra_types`. A field missing from the
data takes its default, so checkpoints written before a field was added still load; an unknown class
or field, a value of the wrong type for an int / float / bool / str / config field, a malformed tag or
a value the class's own checks refuse raises ValueError naming the location (`config.model.emb_size`).

Decoding a checkpoint's config: `load_checkpoint_config(path)`, or
`phoenix_checkpoint.load_checkpoint(path, decode_config=config_from_dict)` for the whole checkpoint.
"""

import dataclasses
import json
import os
import typing
from types import UnionType

import jax.numpy as jnp
import numpy as np

import phoenix_checkpoint as checkpoint
from grok import TransformerConfig
from phoenix_inputs import HashConfig
from phoenix_optim import OptimizerConfig
from recsys_model import PhoenixModelConfig
from recsys_retrieval_model import PhoenixRetrievalModelConfig

# The config types read back by name without being passed in: those of the models, their hash
# tables and the optimiser (everything a Trainer saves).
CONFIG_TYPES = (TransformerConfig, HashConfig, PhoenixModelConfig, PhoenixRetrievalModelConfig, OptimizerConfig)
# JSON tags for values that JSON has no type for.
TYPE_TAG = "__type__"
DTYPE_TAG = "__dtype__"
TUPLE_TAG = "__tuple__"


def _short(value, limit: int = 80) -> str:
    """repr of a value for an error message, cut to `limit` characters."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


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


def _dtype_from_name(name: str):
    """`jnp.<name>` where it exists, so `fprop_dtype=jnp.bfloat16` round-trips to the same object."""
    value = getattr(jnp, name, None)
    if value is not None and _is_dtype_like(value):
        return value
    return np.dtype(name)


def config_to_dict(config, _where: str = "config"):
    """A config (nested dataclasses, dtypes, tuples, lists, dicts with str keys, scalars) as JSON data,
    in the form the module docstring gives. Anything else raises TypeError naming its location."""
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


def _field_type_problem(hint, value) -> str | None:
    """Why `value` does not fit a simple field type (int, float, bool, str, a config dataclass, or
    Optional of one); None when it fits or when the hint is none of these (e.g. Any for dtypes)."""
    if typing.get_origin(hint) in (typing.Union, UnionType):
        args = typing.get_args(hint)
        if value is None and type(None) in args:
            return None
        rest = [a for a in args if a is not type(None)]
        if len(rest) != 1:
            return None
        hint = rest[0]
    if hint is bool:
        fits = isinstance(value, bool)
    elif hint is int:
        fits = isinstance(value, int) and not isinstance(value, bool)
    elif hint is float:
        fits = isinstance(value, (int, float)) and not isinstance(value, bool)
    elif hint is str:
        fits = isinstance(value, str)
    elif dataclasses.is_dataclass(hint):
        fits = isinstance(value, hint)
    else:
        return None
    return None if fits else f"expected {hint.__name__}, got {_short(value)}"


def _check_config_types(types, name: str) -> None:
    """Raises TypeError unless `types` is a tuple or list of dataclass types."""
    if not isinstance(types, (tuple, list)) or not all(
            isinstance(cls, type) and dataclasses.is_dataclass(cls) for cls in types):
        raise TypeError(f"{name}: expected a tuple of dataclass types, got {_short(types)}")


def _decode_dataclass(value: dict, where: str, known: dict, decode):
    name = value[TYPE_TAG]
    if not isinstance(name, str):
        raise ValueError(f"{where}.{TYPE_TAG}: expected a class name, got {_short(name)}")
    if name not in known:
        raise ValueError(f"{where}: unknown config type {name!r}; pass it in extra_types")
    cls = known[name]
    init_fields = {f.name for f in dataclasses.fields(cls) if f.init}
    kwargs = {k: decode(v, f"{where}.{k}") for k, v in value.items() if k != TYPE_TAG}
    unknown = sorted(set(kwargs) - init_fields)
    if unknown:
        raise ValueError(f"{where}: config type {name} has no field(s) {unknown}")
    try:
        hints = typing.get_type_hints(cls)
    except Exception:  # unresolvable annotations: leave the checks to the class itself
        hints = {}
    for k, v in kwargs.items():
        problem = _field_type_problem(hints.get(k), v)
        if problem:
            raise ValueError(f"{where}.{k} ({name}): {problem}")
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as e:  # a required field missing, __post_init__ checks
        raise ValueError(f"{where}: cannot build {name}: {e}") from None


def config_from_dict(data, extra_types=()):
    """Inverse of `config_to_dict`: dataclasses rebuilt from CONFIG_TYPES and `extra_types` (a tuple
    of dataclass types, which win over a known type of the same name). Errors: see the module docstring."""
    _check_config_types(extra_types, "extra_types")
    known = {cls.__name__: cls for cls in (*CONFIG_TYPES, *extra_types)}

    def decode(value, where):
        if isinstance(value, list):
            return [decode(v, f"{where}[{i}]") for i, v in enumerate(value)]
        if not isinstance(value, dict):
            return value
        if DTYPE_TAG in value:
            name = value[DTYPE_TAG]
            if len(value) != 1 or not isinstance(name, str):
                raise ValueError(f"{where}: expected {{{DTYPE_TAG!r}: dtype name}}, got {_short(value)}")
            try:
                return _dtype_from_name(name)
            except TypeError:
                raise ValueError(f"{where}: unknown dtype {name!r}") from None
        if TUPLE_TAG in value:
            items = value[TUPLE_TAG]
            if len(value) != 1 or not isinstance(items, list):
                raise ValueError(f"{where}: expected {{{TUPLE_TAG!r}: [items]}}, got {_short(value)}")
            return tuple(decode(v, f"{where}[{i}]") for i, v in enumerate(items))
        if TYPE_TAG in value:
            return _decode_dataclass(value, where, known, decode)
        return {k: decode(v, f"{where}.{k}") for k, v in value.items()}

    return decode(data, "config")


def config_to_json(config, indent: int | None = 2) -> str:
    """A config (PhoenixModelConfig, PhoenixRetrievalModelConfig, HashConfig, TransformerConfig,
    OptimizerConfig, or any nesting of dataclasses/dicts of them) as a JSON string."""
    return json.dumps(config_to_dict(config), indent=indent, sort_keys=True)


def config_from_json(text: str, extra_types=()):
    """Inverse of `config_to_json`."""
    return config_from_dict(json.loads(text), extra_types=extra_types)


def load_checkpoint_config(path, config_types=()):
    """The config saved in the checkpoint directory `path`, as dataclasses (e.g. a Trainer's
    {"model": PhoenixModelConfig, "hash_config": HashConfig, "optimizer": OptimizerConfig}); reads
    meta.json only. `config_types`: dataclasses besides CONFIG_TYPES that the config may contain.
    A missing or undecodable config raises CheckpointError naming the file and the location."""
    _check_config_types(config_types, "config_types")
    meta = checkpoint.read_meta(path)
    meta_path = os.path.join(checkpoint.checked_path(path), checkpoint.META_FILE)
    if meta.get("config") is None:
        raise checkpoint.CheckpointError(f"{meta_path}: no config saved in this checkpoint")
    try:
        return config_from_dict(meta["config"], extra_types=config_types)
    except ValueError as e:
        raise checkpoint.CheckpointError(f"{meta_path}: {e}") from None


__all__ = ["CONFIG_TYPES", "DTYPE_TAG", "TUPLE_TAG", "TYPE_TAG", "config_from_dict", "config_from_json",
           "config_to_dict", "config_to_json", "load_checkpoint_config"]
