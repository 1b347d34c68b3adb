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

`normal_table` initialises a table shard by shard: each device draws its own rows, a block of rows at
a time, bit for bit the rows of `jax.random.normal(key, [M, D])` (the replicated init), so a sharded
run starts from the same parameters on any device count and no device holds more than its rows and
one block's scratch.

Shape glossary
  M  rows of a hash table   Mp  M padded to a multiple of n   Ml = Mp / n, rows held by one shard
  Mb rows a batch looks up (1 + its lookups)   D  embedding size   n  shards (table-axis size)
  R  rows drawn at once by normal_table
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.extend.random import threefry2x32_p
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from phoenix_inputs import PAD_HASH, TABLE_MODULE, RecsysBatch, RecsysEmbeddings, embed
from phoenix_optim import TABLE_FIELDS, TABLE_SIZE_FIELDS, OptimizerConfig, sparse_table_update

__all__ = ["DATA_AXIS", "TABLE_AXIS", "check_mesh", "table_axis", "table_shards", "padded_rows", "is_table_path",
           "table_rows", "state_shardings", "pad_tables", "unpad_tables", "gather_rows", "sparse_update",
           "place_global", "sharded_embed", "normal_rows", "normal_table", "INIT_BLOCK_ELEMENTS"]

DATA_AXIS = "data"  # the batch is split over this mesh axis
TABLE_AXIS = "table"  # on a 2-D mesh, the table rows are split over this one
# normal_table draws R = INIT_BLOCK_ELEMENTS // D rows at a time (4 MiB of float32): its scratch (counters,
# random bits) is a few blocks per device, not a few tables.
INIT_BLOCK_ELEMENTS = 2 ** 20
_HALF = 16  # bits: a row index is split in two 16-bit halves to form 64-bit counters from uint32 products


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


def sharded_embed(mesh: Mesh, tables: dict, batch: RecsysBatch) -> RecsysEmbeddings:
    """phoenix_inputs.embed with row-split tables {table: [Mp, D]} (serving): every lookup of the batch
    gathered by `gather_rows` (one value plus zeros: the same floats as a gather from a whole table),
    replicated over the mesh."""
    rows, positions = {}, {}
    for table, fields in TABLE_FIELDS.items():
        hashes = [getattr(batch, f) for f in fields]
        # position 0 looks up row 0 (padding); then every lookup in turn: [L] with L = 1 + lookups
        rows[table] = jnp.concatenate([jnp.zeros(1, jnp.int32)] + [h.reshape(-1).astype(jnp.int32) for h in hashes])
        offset = 1
        for field, h in zip(fields, hashes, strict=True):
            position = offset + jnp.arange(h.size, dtype=jnp.int32).reshape(h.shape)
            positions[field] = jnp.where(h != PAD_HASH, position, PAD_HASH)  # padding stays padding
            offset += h.size
    found = gather_rows(mesh, {TABLE_MODULE: tables}, rows)[TABLE_MODULE]  # {table: [L, D]}
    return embed(found, batch._replace(**positions))


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


def _counters(rows: jax.Array, dim: int):
    """(high, low) uint32 [R, D] halves of the 64-bit flat indices rows * dim + column: the counters
    jax.random draws element [row, column] of an [M, D] array from (threefry, partitionable bits)."""
    rows = rows.astype(jnp.uint32)[:, None]  # [R, 1]
    column = jnp.arange(dim, dtype=jnp.uint32)[None, :]  # [1, D]
    low_part = (rows & (2 ** _HALF - 1)) * dim + column  # [R, D], < 2^16 * dim + dim
    high_part = (rows >> _HALF) * dim  # [R, 1], < 2^16 * dim
    low = (high_part << _HALF) + low_part  # [R, D], modulo 2^32
    carry = (low < low_part).astype(jnp.uint32)  # the addition wrapped
    return (high_part >> _HALF) + carry, low


def _key_words(key):
    """A threefry key's two uint32 words (a raw uint32 [2] key or a typed key)."""
    if jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key):
        if str(jax.random.key_impl(key)) != "threefry2x32":
            raise ValueError(f"key: normal_table reproduces threefry2x32 draws, got a {jax.random.key_impl(key)} key")
        key = jax.random.key_data(key)
    if key.shape != (2,) or key.dtype != jnp.uint32:
        raise ValueError(f"key: expected a threefry2x32 key (uint32 [2]), got {key.dtype} {list(key.shape)}")
    return key[0], key[1]


def normal_rows(key, rows: jax.Array, dim: int, stddev: float, mean: float = 0.0) -> jax.Array:
    """Rows `rows` [R] of `mean + stddev * jax.random.normal(key, [M, dim])` -> [R, D] float32, bit for
    bit, without drawing the other rows (threefry2x32 with partitionable bits: element [r, c] comes
    from counter r * dim + c; its uniform in [-1, 1) as jax.random.uniform makes it, then sqrt(2) *
    erfinv, as jax.random.normal does)."""
    if not jax.config.jax_threefry_partitionable:
        raise ValueError("normal_rows: needs jax_threefry_partitionable=True (JAX's default), the draws "
                         "whose element [r, c] depends on r and c alone; got False")
    if not 0 < dim < 2 ** (32 - _HALF - 1):
        raise ValueError(f"dim: expected 1 <= dim < {2 ** (32 - _HALF - 1)}, got {dim}")
    k1, k2 = _key_words(key)
    high, low = _counters(rows, dim)  # [R, D] each
    bits1, bits2 = threefry2x32_p.bind(k1, k2, high, low)  # [R, D] uint32 each
    bits = bits1 ^ bits2  # [R, D]: 32 random bits per element
    mantissa = jnp.finfo(jnp.float32).nmant
    one = np.array(1.0, np.float32)
    floats = jax.lax.bitcast_convert_type((bits >> (32 - mantissa)) | one.view(np.uint32), jnp.float32) - one  # [0, 1)
    low_end = np.nextafter(np.float32(-1.0), np.float32(0.0))  # jax.random.normal's open interval (-1, 1)
    uniform = jnp.maximum(low_end, floats * (one - low_end) + low_end)  # [R, D]
    normal = np.float32(np.sqrt(2)) * jax.lax.erf_inv(uniform)  # [R, D]
    return np.float32(mean) + np.float32(stddev) * normal


def normal_table(mesh: Mesh, key, rows: int, dim: int, stddev: float, mean: float = 0.0,
                 block_elements: int | None = None) -> jax.Array:
    """`mean + stddev * jax.random.normal(key, [rows, dim])`, padded with zero rows to
    padded_rows(rows, n) and row-split over the table axis: [Mp, D]. Each shard draws only its own rows,
    R at a time into its [Ml, D] block (normal_rows), so the same key gives the same table, bit for
    bit, on any device count, and nothing table-sized is made beside the table. Call inside jit.
    `block_elements`: R * D, default INIT_BLOCK_ELEMENTS."""
    block_elements = INIT_BLOCK_ELEMENTS if block_elements is None else block_elements
    axis = table_axis(mesh)
    shards = int(mesh.shape[axis])
    local_rows = padded_rows(rows, shards) // shards  # Ml
    block = max(1, min(local_rows, block_elements // dim))  # R
    blocks = -(-local_rows // block)

    def local(key):
        first = jax.lax.axis_index(axis) * local_rows

        def draw(b, table):  # table [Ml, D]
            start = jnp.minimum(b * block, local_rows - block)  # the last block overlaps the one before
            global_rows = first + start + jnp.arange(block)  # [R]
            drawn = normal_rows(key, global_rows, dim, stddev, mean)  # [R, D]
            drawn = jnp.where((global_rows < rows)[:, None], drawn, 0.0)  # padding rows are zero
            return jax.lax.dynamic_update_slice(table, drawn, (start, 0))

        table = jax.lax.pcast(jnp.zeros((local_rows, dim), jnp.float32), axis, to="varying")  # [Ml, D]
        return jax.lax.fori_loop(0, blocks, draw, table)

    return jax.shard_map(local, mesh=mesh, in_specs=PartitionSpec(), out_specs=PartitionSpec(axis))(key)
