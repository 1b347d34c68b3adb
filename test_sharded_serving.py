"""Sharded tables beyond training: tables initialised shard by shard, and served from a sharded checkpoint.

Multi-device checks run in a subprocess with 8 forced CPU devices (the device count is fixed before JAX is
imported), as test_multidevice.py does.
"""

import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import phoenix_sharding


@pytest.mark.parametrize("dim", [1, 3, 64, 1000])
def test_counters_are_the_64_bit_flat_index(dim):
    """_counters' (high, low) uint32 halves equal row * dim + column in uint64 (NumPy), across the 2^32
    boundary of the low half and at the largest row index."""
    rows = np.array([0, 1, 2 ** 16 - 1, 2 ** 16, 2 ** 26, 2 ** 32 // dim - 1, 2 ** 32 // dim, 2 ** 32 // dim + 1,
                     2 ** 31 - 1, 2 ** 32 - 1], np.uint64)
    rows = rows[rows < 2 ** 32]  # row indices are uint32
    high, low = phoenix_sharding._counters(jnp.asarray(rows.astype(np.uint32)), dim)
    expected = rows[:, None] * np.uint64(dim) + np.arange(dim, dtype=np.uint64)[None, :]  # [R, D]
    got = np.asarray(high).astype(np.uint64) * np.uint64(2 ** 32) + np.asarray(low).astype(np.uint64)
    np.testing.assert_array_equal(got, expected)


@pytest.mark.parametrize("rows,dim,stddev", [(7, 3, 1.0), (60, 16, 0.02), (1001, 64, 0.05)])
def test_normal_rows_equal_random_normal(rows, dim, stddev):
    """normal_rows gives any rows of the haiku RandomNormal table draw (mean + stddev * jax.random.normal,
    both jitted) bit for bit: every row in order, and a shuffled subset."""
    key = jax.random.PRNGKey(11)
    expected = np.asarray(jax.jit(lambda k: jnp.float32(0.0) + jnp.float32(stddev)
                                  * jax.random.normal(k, (rows, dim)))(key))  # [M, D]
    draw = jax.jit(lambda k, r: phoenix_sharding.normal_rows(k, r, dim, stddev))
    np.testing.assert_array_equal(np.asarray(draw(key, jnp.arange(rows))), expected)
    subset = np.random.default_rng(0).permutation(rows)[: max(1, rows // 3)]
    np.testing.assert_array_equal(np.asarray(draw(key, jnp.asarray(subset))), expected[subset])
    with pytest.raises(ValueError, match="threefry2x32 key"):
        phoenix_sharding.normal_rows(jnp.zeros(4, jnp.uint32), jnp.arange(2), dim, stddev)


SCRIPT = textwrap.dedent("""
    import sys
    import jax, jax.numpy as jnp, numpy as np
    from jax.sharding import Mesh
    assert jax.device_count() == 8, jax.devices()
    import phoenix_sharding
    import phoenix_training as training
    from recsys_model import HashConfig, PhoenixModelConfig
    from recsys_retrieval_model import PhoenixRetrievalModelConfig
    from test_phoenix_training import HASHES, TRANSFORMER, A, C, D, S, random_batch
    B = 8
    rank_cfg = PhoenixModelConfig(model=TRANSFORMER, emb_size=D, num_actions=A, history_seq_len=S,
                                  candidate_seq_len=C, hash_config=HASHES, fprop_dtype=jnp.float32)
    ret_cfg = PhoenixRetrievalModelConfig(model=TRANSFORMER, emb_size=D, history_seq_len=S, candidate_seq_len=C,
                                          hash_config=HASHES, fprop_dtype=jnp.float32)
    devices = np.array(jax.devices())
    meshes = {"8": True, "4x2": Mesh(devices.reshape(4, 2), ("data", "table")),
              "2": Mesh(devices[:2], ("data",))}

    def host(trainer, tree):
        return jax.tree.map(np.asarray, trainer.host_params(tree))

    def init_equals_replicated():
        # the same seed gives the same tables, bit for bit, on 1, 2 and 8 shards (and a 4 x 2 mesh)
        for name, make, cfg, stddev, labels in (("ranking", training.make_ranking_trainer, rank_cfg, None, meshes),
                                                ("retrieval", training.make_retrieval_trainer, ret_cfg, 0.05, ["8"])):
            one = make(cfg, table_init_stddev=stddev)
            ref = one.init(jax.random.PRNGKey(5), random_batch(0, B))
            for label in labels:
                mesh = meshes[label]
                trainer = make(cfg, table_init_stddev=stddev, data_parallel=mesh, shard_tables=True)
                state = trainer.init(jax.random.PRNGKey(5), random_batch(0, B))
                n = trainer.table_shards
                for table in state.params["hash_embeddings"].values():
                    assert {s.data.shape[0] for s in table.addressable_shards} == {table.shape[0] // n}
                    assert table.shape[0] == phoenix_sharding.padded_rows(table.shape[0], n)
                got = host(trainer, {"p": state.params, "o": state.opt_state})
                want = host(one, {"p": ref.params, "o": ref.opt_state})
                for a, b in zip(jax.tree.leaves(want), jax.tree.leaves(got), strict=True):
                    np.testing.assert_array_equal(b, a, err_msg=f"{name} {label} {stddev}")
                sizes = {"user_table": HASHES.user_table_size, "post_table": HASHES.post_table_size,
                         "author_table": HASHES.author_table_size}
                for k, table in state.params["hash_embeddings"].items():  # padding rows are zero
                    np.testing.assert_array_equal(np.asarray(table)[sizes[k]:], 0)
        print("INIT EQUAL OK")

    def init_memory():
        # each device's scratch while drawing its rows is a few blocks, not a few tables: the compiled
        # init's temporary bytes per device stay below a quarter of one device's share of the table
        # (drawing whole shards at once needs three times that share: counters and random bits)
        phoenix_sharding.INIT_BLOCK_ELEMENTS = 1024
        rows = 64_000
        hashes = HashConfig(user_table_size=50, post_table_size=rows, author_table_size=40)
        cfg = PhoenixModelConfig(model=TRANSFORMER, emb_size=D, num_actions=A, history_seq_len=S,
                                 candidate_seq_len=C, hash_config=hashes, fprop_dtype=jnp.float32)
        opt = training.OptimizerConfig(table_optimizer="rowwise_adagrad")
        trainer = training.make_ranking_trainer(cfg, hashes, opt, data_parallel=True, shard_tables=True)
        batch = random_batch(0, B)
        stats = trainer._jit_init.lower(jax.random.PRNGKey(0), batch).compile().memory_analysis()
        share = rows * D * 4 // 8
        assert stats.temp_size_in_bytes < share / 4, (stats.temp_size_in_bytes, share)
        print("INIT MEMORY OK", stats.temp_size_in_bytes, share)

    {"init_equal": init_equals_replicated, "init_memory": init_memory}[sys.argv[1]]()
""")


def _run(section: str) -> str:
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
    here = os.path.dirname(os.path.abspath(__file__))
    proc = subprocess.run([sys.executable, "-c", SCRIPT, section], cwd=here, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0 and " OK" in proc.stdout, proc.stdout + proc.stderr
    return proc.stdout


def test_sharded_init_equals_replicated_init():
    """Trainers with sharded tables start from the single-device trainer's parameters and optimiser
    state bit for bit (the ranker on 8 shards, a 4 x 2 mesh and 2 shards; the retrieval model, with a
    given table stddev, on 8); each device holds 1/n of each padded table, its padding rows zero."""
    _run("init_equal")


def test_sharded_init_draws_shard_by_shard():
    """The compiled sharded init's temporary bytes per device stay below a quarter of one device's
    share of a 64,000 x 16 table (the whole-shard draw it replaces needed about three shares)."""
    _run("init_memory")
