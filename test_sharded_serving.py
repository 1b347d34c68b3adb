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
    meshes = {"8": True, "4x2": Mesh(devices.reshape(4, 2), ("data", "table"))}

    def host(trainer, tree):
        return jax.tree.map(np.asarray, trainer.host_params(tree))

    def init_equals_replicated():
        # the same seed gives the same tables, bit for bit, on 1 device, 8 shards and a 4 x 2 mesh (2 shards)
        for name, make, cfg, stddev, labels in (("ranking", training.make_ranking_trainer, rank_cfg, None, meshes),
                                                ("retrieval", training.make_retrieval_trainer, ret_cfg, 0.05, ["4x2"])):
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

    def served_equal():
        # a sharded checkpoint (8 shards) served with the tables split over the 8 devices equals the same
        # checkpoint served whole on one device; each device holds 1/8 of every table
        import dataclasses, os, tempfile
        from conftest import tiny_ranker_config, tiny_retrieval_config
        from runners import RecsysInferenceRunner, RecsysRetrievalInferenceRunner, create_example_batch
        import conftest
        tables = HashConfig(user_table_size=101, post_table_size=211, author_table_size=53)
        batch, _ = create_example_batch(8, conftest.D, conftest.S, conftest.C, conftest.A, num_user_embeddings=101,
                                        num_post_embeddings=211, num_author_embeddings=53, seed=3)
        tmp = tempfile.mkdtemp()
        for kind, make, cfg, runner_type in (
                ("ranker", training.make_ranking_trainer, tiny_ranker_config(), RecsysInferenceRunner),
                ("retrieval", training.make_retrieval_trainer, tiny_retrieval_config(), RecsysRetrievalInferenceRunner)):
            cfg = dataclasses.replace(cfg, hash_config=tables).initialize()
            trainer = make(cfg, data_parallel=True, shard_tables=True)
            state = trainer.init(jax.random.PRNGKey(0), batch)
            path = os.path.join(tmp, kind)
            trainer.save(path, state, sharded=True)
            whole = runner_type.from_checkpoint(path)
            served = {"sharded, data-parallel": runner_type.from_checkpoint(path, shard_tables=True, data_parallel=True)}
            if kind == "ranker":  # the tables split over every device, the model on one
                served["sharded"] = runner_type.from_checkpoint(path, shard_tables=True)
            for name, table in whole.runner.hash_tables["hash_embeddings"].items():
                assert isinstance(table, np.ndarray) and table.shape[0] == getattr(tables, name[:-6] + "_table_size")
            want = whole.embed(batch)
            for label, runner in served.items():
                for name, table in runner.runner.hash_tables["hash_embeddings"].items():
                    rows = getattr(tables, name[:-6] + "_table_size")
                    padded = phoenix_sharding.padded_rows(rows, 8)
                    assert table.shape[0] == padded and len(table.addressable_shards) == 8, (label, name)
                    assert {s.data.shape for s in table.addressable_shards} == {(padded // 8, conftest.D)}
                    np.testing.assert_array_equal(np.asarray(table)[:rows], whole.runner.hash_tables[
                        "hash_embeddings"][name])
                for a, b in zip(jax.tree.leaves(want), jax.tree.leaves(runner.embed(batch)), strict=True):
                    np.testing.assert_array_equal(np.asarray(b), np.asarray(a), err_msg=label)  # exact gathers
                if kind == "ranker":
                    a, b = whole.rank(batch), runner.rank(batch)
                    np.testing.assert_allclose(np.asarray(b.scores), np.asarray(a.scores), rtol=1e-5, atol=1e-6,
                                               err_msg=label)
                    np.testing.assert_array_equal(np.asarray(b.ranked_indices), np.asarray(a.ranked_indices))
                else:
                    corpus = np.asarray(whole.encode_candidates(batch)).reshape(-1, conftest.D)  # [B * C, D]
                    whole.set_corpus(corpus, normalize=True)
                    runner.set_corpus(corpus, normalize=True)
                    a, b = whole.retrieve(batch, top_k=5), runner.retrieve(batch, top_k=5)
                    np.testing.assert_allclose(np.asarray(b.top_k_scores), np.asarray(a.top_k_scores), rtol=1e-5,
                                               atol=1e-6, err_msg=label)
                    np.testing.assert_array_equal(np.asarray(b.top_k_indices), np.asarray(a.top_k_indices))
        print("SERVED EQUAL OK")

    def suite_rows():
        # bench.py's device-suite case: with sharded tables device 0 holds 1/8 of each (padded) table and
        # of its row-wise Adagrad state; replicated, all of them
        import bench
        dim, rows, small = 8, 300, bench.SHARDED_SMALL_TABLE
        sharded = bench.sharded_table_case(rows, dim, "sharded", 2)
        replicated = bench.sharded_table_case(rows, dim, "replicated", 2)
        per_row = (dim + 1) * 4  # float32 row and its accumulator
        assert sharded["device_bytes"] == (phoenix_sharding.padded_rows(rows, 8)
                                           + 2 * phoenix_sharding.padded_rows(small, 8)) // 8 * per_row, sharded
        assert replicated["device_bytes"] == (rows + 2 * small) * per_row, replicated
        assert sharded["traces"] == replicated["traces"] == 1 and sharded["devices"] == 8
        assert sharded["step_ms"] > 0 and sharded["device_peak_gb"] is None  # CPU reports no device memory
        print("SUITE OK")

    {"init_equal": init_equals_replicated, "init_memory": init_memory, "served": served_equal,
     "suite": suite_rows}[sys.argv[1]]()
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
    state bit for bit (the ranker on 8 shards and on a 4 x 2 mesh's 2 shards; the retrieval model, with
    a given table stddev, on the 4 x 2 mesh); each device holds 1/n of each padded table, its padding
    rows zero."""
    _run("init_equal")


def test_sharded_init_draws_shard_by_shard():
    """The compiled sharded init's temporary bytes per device stay below a quarter of one device's
    share of a 64,000 x 16 table (the whole-shard draw it replaces needed about three shares)."""
    _run("init_memory")


def test_sharded_checkpoint_served_sharded_equals_served_whole():
    """Both runners load an 8-shard checkpoint with shard_tables=True (with data_parallel; the ranker also
    without):
    every table split 8 ways over the devices (addressable shards of padded/8 rows, the checkpoint's
    rows), the batch's embeddings bit-identical to the same checkpoint loaded whole on the host and
    served on one device, and the rankings / top-k equal (scores within rtol 1e-5, atol 1e-6 float32:
    the data-parallel model runs partitioned)."""
    _run("served")


def test_device_suite_sharded_case_holds_one_eighth_per_device():
    """bench.sharded_table_case (the device suite's sharded-table rows) on 8 forced CPU devices: device 0
    holds 1/8 of each padded table and its row-wise Adagrad state sharded, all of them replicated; one
    trace of the train step each."""
    _run("suite")
