"""Row-sharded hash tables: each table's rows split over a mesh axis, looked up and updated in `shard_map`.

A Trainer with `shard_tables=True` (phoenix_training.py) keeps every hash table, and the table part of
its optimiser state (Adam moments, row-wise Adagrad accumulators), split by rows over the mesh axis
`table_axis(mesh)`: "table" on a 2-D mesh ("data", "table") (the batch split over "data", the tables
over "table"), or else "data" itself on a 1-D mesh (each of the n devices holds 1/n of the batch and
1/n of every table). The rest of the parameters stay replicated.

One sparse train step (phoenix_optim.compact_table_lookups is the unsharded version):
  1. the batch's distinct rows `rows` [Mb] per table (replicated: a handful of ids per example);
  2. `gather_rows`: each shard looks up the rows it owns, zeros elsewhere, and a psum over the table
     axis assembles table[rows] [Mb, D] (exact: every row is one value plus zeros);
  3. the model runs on those rows (its gradients all-reduced over "data" as in data parallelism);
  4. `sparse_update`: each shard applies phoenix_optim.sparse_table_update to the rows it owns.
The routed alternative (ids sent to their owner with all_to_all, rows sent back) was measured slower
on 8 forced CPU devices (docs/sharding.md, scripts/bench_sharded_lookup.py), so it is not kept here.

Rows per table must divide by the shard count: `padded_rows` rounds a table up with zero rows that no
hash reaches (hash values lie in [1, size)), so sharded and replicated runs compute the same numbers.
Checkpoints hold the tables unpadded (`unpad_tables`): the same format as a replicated run's.

Shape glossary
  M  rows of a hash table   Mp  M padded to a multiple of n   Ml = Mp / n, rows held by one shard
  Mb rows a batch looks up (1 + its lookups)   D  embedding size   n  shards (table-axis size)
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from phoenix_inputs import TABLE_MODULE
from phoenix_optim import TABLE_SIZE_FIELDS, OptimizerConfig, sparse_table_update

__all__ = ["DATA_AXIS", "TABLE_AXIS", "check_mesh", "table_axis", "table_shards", "padded_rows", "is_table_path",
           "table_rows", "state_shardings", "pad_tables", "unpad_tables", "gather_rows", "sparse_update",
           "place_global"]

DATA_AXIS = "data"  # the batch is split over this mesh axis
TABLE_AXIS = "table"  # on a 2-D mesh, the table rows are split over this one


def check_mesh(mesh: Mesh) -> None:
    """A trainer's mesh with sharded tables: ("data",) or ("data", "table")."""
    if tuple(mesh.axis_names) not in ((DATA_AXIS,), (DATA_AXIS, TABLE_AXIS)):
        raise ValueError(f"data_parallel: with shard_tables expected a Mesh with axes ('data',) or "
                         f"('data', 'table'), got {tuple(mesh.axis_names)}")


def table_axis(mesh: Mesh) -> str:
    """The mesh axis the table rows are split over: "table" if the mesh has one, else "data"."""
    return TABLE_AXIS if TABLE_AXIS in mesh.axis_names else DATA_AXIS


def table_shards(mesh: Mesh) -> int:
    return int(mesh.shape[table_axis(mesh)])


def padded_rows(rows: int, shards: int) -> int:
    """`rows` rounded up to a multiple of `shards`."""
    return -(-rows // shards) * shards


def _keys(path) -> list[str]:
    return [str(p.key) for p in path if isinstance(p, jax.tree_util.DictKey)]


def is_table_path(path) -> bool:
    """True for a leaf under a hash-table module (the tables, and their optimiser state, which mirrors
    the tables' {module: {table: array}} nesting)."""
    return any(k == TABLE_MODULE or k.endswith("/" + TABLE_MODULE) for k in _keys(path))


def state_shardings(tree, mesh: Mesh):
    """NamedShardings for a pytree of trainer state: rows of table leaves split over the table axis,
    everything else replicated."""
    split, replicated = NamedSharding(mesh, PartitionSpec(table_axis(mesh))), NamedSharding(mesh, PartitionSpec())
    return jax.tree_util.tree_map_with_path(lambda path, _: split if is_table_path(path) else replicated, tree)


def table_rows(path, hash_config) -> int:
    """Rows of the table (or table state) at pytree `path`, as `hash_config` sizes it."""
    name = _keys(path)[-1]
    if name not in TABLE_SIZE_FIELDS:
        raise ValueError(f"table state {'/'.join(_keys(path))}: expected a leaf named after a table "
                         f"{sorted(TABLE_SIZE_FIELDS)}")
    return int(getattr(hash_config, TABLE_SIZE_FIELDS[name]))


def pad_tables(tree, hash_config, shards: int):
    """Table leaves [M, ...] of a state pytree padded with zero rows to [padded_rows(M, shards), ...]
    (leaves padded already pass unchanged)."""
    def pad(path, x):
        if not is_table_path(path):
            return x
        rows = table_rows(path, hash_config)
        if x.shape[0] not in (rows, padded_rows(rows, shards)):
            raise ValueError(f"{'/'.join(_keys(path))}: expected {rows} rows (hash_config), or "
                             f"{padded_rows(rows, shards)} padded for {shards} shards, got shape {list(x.shape)}")
        extra = padded_rows(rows, shards) - x.shape[0]
        return jnp.pad(x, [(0, extra)] + [(0, 0)] * (x.ndim - 1)) if extra else x
    return jax.tree_util.tree_map_with_path(pad, tree)


def unpad_tables(tree, hash_config):
    """Table leaves cut back to the hash config's rows (the inverse of pad_tables)."""
    return jax.tree_util.tree_map_with_path(
        lambda path, x: x[:table_rows(path, hash_config)] if is_table_path(path) else x, tree)


def _owned(rows: jax.Array, local_rows: int, axis: str):
    """(local index [Mb], owned [Mb]): where each row sits in this shard, and whether it is here."""
    local = rows - jax.lax.axis_index(axis) * local_rows  # [Mb]
    owned = (local >= 0) & (local < local_rows)  # [Mb]
    return jnp.where(owned, local, 0), owned


def gather_rows(mesh: Mesh, tables: dict, rows: dict) -> dict:
    """{module: {table: [Mp, D] row-split}}, {table: rows [Mb]} -> {module: {table: table[rows] [Mb, D]}},
    replicated: each shard gathers the rows it owns (zeros for the others), a psum adds the shards."""
    axis = table_axis(mesh)

    shards = int(mesh.shape[axis])
    tables = jax.tree.map(lambda t: t if t.shape[0] % shards == 0 else  # unpadded tables (host copies)
                          jnp.pad(t, [(0, padded_rows(t.shape[0], shards) - t.shape[0]), (0, 0)]), tables)

    def local(tables, rows):
        out = {}
        for module, named in tables.items():
            out[module] = {}
            for name, table in named.items():  # table [Ml, D]
                index, owned = _owned(rows[name], table.shape[0], axis)
                found = jnp.where(owned[:, None], jnp.take(table, index, axis=0), 0)  # [Mb, D]
                out[module][name] = jax.lax.psum(found, axis)
        return out

    return jax.shard_map(local, mesh=mesh, in_specs=(PartitionSpec(axis), PartitionSpec()),
                         out_specs=PartitionSpec())(tables, rows)


def sparse_update(mesh: Mesh, config: OptimizerConfig, tables, state, rows: dict, row_grads, step):
    """phoenix_optim.sparse_table_update on row-split tables and table state: each shard updates the
    rows it owns (the row gradients are replicated). Returns (tables, state), split as they came."""
    axis = table_axis(mesh)

    def local(tables, state, rows, row_grads, step):
        return sparse_table_update(config, tables, state, rows, row_grads, step,
                                   shard_index=jax.lax.axis_index(axis))

    split, replicated = PartitionSpec(axis), PartitionSpec()
    return jax.shard_map(local, mesh=mesh, in_specs=(split, split, replicated, replicated, replicated),
                         out_specs=(split, split))(tables, state, rows, row_grads, step)


def place_global(tree, sharding):
    """Host arrays (the same global values on every process) as global arrays with `sharding`: each
    process transfers only the shards its own devices hold. `sharding`: one for all leaves or a pytree
    of them. Leaves that are None pass through."""
    if jax.process_count() == 1:
        return jax.device_put(tree, sharding)
    shardings = (sharding if not isinstance(sharding, jax.sharding.Sharding)
                 else jax.tree.map(lambda _: sharding, tree))

    def put(x, s):
        if isinstance(x, jax.Array) and x.is_fully_addressable is False:
            return x
        host = np.asarray(x)
        return jax.make_array_from_callback(host.shape, s, functools.partial(_slice, host))

    return jax.tree.map(put, tree, shardings)


def _slice(host: np.ndarray, index):
    return host[index]
