"""Row-sharded table lookups, two ways, on 8 forced CPU devices: psum of masked local gathers vs ids
routed to their owner with all_to_all.

    uv run python scripts/bench_sharded_lookup.py                       # 1M x 64 table, three id counts
    uv run python scripts/bench_sharded_lookup.py --rows 100000 --ids 4096 --repeats 5

A table [M, D] split by rows over a 1-D mesh of n devices; N ids split over the same devices (each holds
N / n, the batch's share), ids uniform in [1, M). Each way gives every device the embeddings it needs:

  psum          the ids all-gathered; each device gathers the rows it owns (zeros elsewhere); a psum adds
                the shards: [N, D] on every device (what phoenix_sharding.gather_rows does: the trainer
                runs the model on all of the batch's rows, replicated, beside a data-parallel batch)
  psum_scatter  the same with a reduce-scatter: each device gets its own N / n rows [N / n, D]
  all_to_all    each device sends each owner a slot per id it holds ([n, N / n], -1 where the owner is
                another), owners gather, a second all_to_all sends the rows back, a sum over the n
                slots keeps the one found: [N / n, D] per device

All three are checked equal to a NumPy gather. Prints one markdown row per (way, N): milliseconds per
lookup (median of --repeats after one warm-up call; compile excluded). The device count is fixed before
JAX starts (XLA_FLAGS, set here if absent). The machine is shared: figures are indicative.
"""

import argparse
import os
import sys
import time

DEVICES = 8
if "jax" not in sys.modules and "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={DEVICES}")
    os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P  # noqa: E402

AXIS = "data"


def owned_rows(table, ids):
    """Rows of the local shard `table` [Ml, D] at global `ids` [K], zeros where another shard owns them."""
    local = ids - jax.lax.axis_index(AXIS) * table.shape[0]
    owned = (local >= 0) & (local < table.shape[0])
    return jnp.where(owned[:, None], jnp.take(table, jnp.where(owned, local, 0), axis=0), 0)  # [K, D]


def psum_lookup(table, ids):  # table [Ml, D], ids [N] (all of them)
    return jax.lax.psum(owned_rows(table, ids), AXIS)  # [N, D]


def psum_scatter_lookup(table, ids):
    return jax.lax.psum_scatter(owned_rows(table, ids), AXIS, scatter_dimension=0, tiled=True)  # [N / n, D]


def all_to_all_lookup(table, ids):  # table [Ml, D], ids [K] (this device's)
    n = jax.lax.axis_size(AXIS)
    owner = ids // table.shape[0]  # [K]
    send = jnp.where(owner[None, :] == jnp.arange(n)[:, None], ids[None, :], -1)  # [n, K]: row o to owner o
    asked = jax.lax.all_to_all(send, AXIS, split_axis=0, concat_axis=0, tiled=True)  # [n, K] from each source
    found = owned_rows(table, asked.reshape(-1)).reshape(n, -1, table.shape[1])  # [n, K, D]
    back = jax.lax.all_to_all(found, AXIS, split_axis=0, concat_axis=0, tiled=True)  # [n, K, D] per owner
    return back.sum(axis=0)  # [K, D]: one owner found each id, the others sent zeros


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=1_000_000, help="table rows M")
    parser.add_argument("--dim", type=int, default=64, help="embedding size D")
    parser.add_argument("--ids", type=int, nargs="+", default=[4096, 32768, 262144], help="ids looked up, N")
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args(argv)
    n = jax.device_count()
    mesh = Mesh(np.array(jax.devices()), (AXIS,))
    rows = -(-args.rows // n) * n
    table = jax.device_put(np.random.default_rng(0).standard_normal((rows, args.dim), np.float32),
                           NamedSharding(mesh, P(AXIS)))
    host = np.asarray(table)
    ways = {
        "psum": (psum_lookup, P(), P()),
        "psum_scatter": (psum_scatter_lookup, P(), P(AXIS)),
        "all_to_all": (all_to_all_lookup, P(AXIS), P(AXIS)),
    }
    print(f"table {args.rows:,} x {args.dim} float32 split over {n} devices ({jax.devices()[0].platform}); "
          f"median of {args.repeats}")
    print("| way | ids N | ms per lookup |\n|---|---:|---:|")
    for count in args.ids:
        ids_host = np.random.default_rng(1).integers(1, args.rows, count).astype(np.int32)
        ids = jax.device_put(ids_host, NamedSharding(mesh, P(AXIS)))
        for name, (fn, ids_spec, out_spec) in ways.items():
            lookup = jax.jit(jax.shard_map(fn, mesh=mesh, in_specs=(P(AXIS), ids_spec), out_specs=out_spec))
            np.testing.assert_array_equal(np.asarray(lookup(table, ids)), host[ids_host], err_msg=name)
            times = []
            for _ in range(args.repeats):
                start = time.perf_counter()
                jax.block_until_ready(lookup(table, ids))
                times.append(time.perf_counter() - start)
            print(f"| {name} | {count:,} | {1e3 * float(np.median(times)):.2f} |", flush=True)


if __name__ == "__main__":
    main()
