"""Data-parallel runners and trainers, row-sharded tables and multi-process runs on forced CPU devices
equal the single-device results.

The device count must be fixed before JAX is imported, so the checks run in subprocesses, all started
together by the module fixture `started`: one process with 8 forced CPU devices runs every 8-device
check (`eight_device_main`: one section per test, each section's verdict reported on its own; the
single-device runs the sections compare with are trained once), a pair of processes x 4 devices runs
run_train.py with step checkpoints, resumes it from a mid-run one, then makes a sharded save
(`two_process_main`), and a 1-device process the reference run_train.py run. A process costs a JAX import and its own compiles: sharing them is most of this
file's time.
"""

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import traceback

import numpy as np
import pytest

import phoenix_checkpoint
import phoenix_resume
import phoenix_run_dir

HERE = os.path.dirname(os.path.abspath(__file__))
B, STEPS = 8, 20  # the 8-device trainer runs: one example per device, 20 steps compared

# A tiny synthetic ranker run: its losses are compared across device layouts.
TINY_SYNTHETIC = ["--data", "synthetic", "--only", "ranker", "--num-users", "120", "--num-posts", "300",
                  "--num-authors", "10", "--history-len", "4", "--min-history-len", "2", "--num-candidates", "4",
                  "--emb-size", "16", "--key-size", "8", "--num-layers", "1", "--batch-size", "16",
                  "--steps-ranker", "10", "--log-every", "2", "--eval-repeats", "1", "--overwrite"]
SHARDED_FLAGS = ["--data-parallel", "--shard-tables"]
SECTIONS = ["run_train", "runners", "data_parallel_training", "sharded_sparse", "sharded_dense", "sharded_resume"]
# The 2-process run keeps step checkpoints every 2 of its 10 steps (the newest 3), and is resumed from step 6.
EVERY, RESUMED_FROM = 2, 6


# --------------------------------------------------------------------------- the 8-device process


def check_runners():
    """Ranking and retrieval runners, data-parallel over 8 devices, equal one device."""
    import jax

    from conftest import A, D, S, tiny_ranker_config, tiny_retrieval_config
    from runners import (ModelRunner, RecsysInferenceRunner, RecsysRetrievalInferenceRunner, RetrievalModelRunner,
                         create_example_batch, create_example_corpus)
    assert jax.device_count() == 8, jax.devices()
    batch, emb = create_example_batch(8, D, S, 9, A, seed=1)
    single = RecsysInferenceRunner(ModelRunner(tiny_ranker_config()))
    single.initialize()
    multi = RecsysInferenceRunner(ModelRunner(tiny_ranker_config()), data_parallel=True)
    multi.initialize()
    a, b = single.rank(batch, emb), multi.rank(batch, emb)
    assert len(b.scores.sharding.device_set) == 8, b.scores.sharding
    np.testing.assert_allclose(b.scores, a.scores, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(b.ranked_indices, a.ranked_indices)
    np.testing.assert_allclose(multi.rank_large(batch, emb, chunk_size=4).scores, a.scores, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="multiple of the 8 devices"):  # B=3 on 8 devices
        multi.rank(*create_example_batch(3, D, S, 9, A))
    r1 = RecsysRetrievalInferenceRunner(RetrievalModelRunner(tiny_retrieval_config()))
    r8 = RecsysRetrievalInferenceRunner(RetrievalModelRunner(tiny_retrieval_config()), data_parallel=True)
    corpus, ids = create_example_corpus(100, D)
    for r in (r1, r8):
        r.initialize()
        r.set_corpus(corpus, ids)
    o1, o8 = r1.retrieve(batch, emb, top_k=10), r8.retrieve(batch, emb, top_k=10)
    np.testing.assert_array_equal(o8.top_k_indices, o1.top_k_indices)
    np.testing.assert_allclose(o8.top_k_scores, o1.top_k_scores, rtol=1e-5, atol=1e-6)


def labels(i):
    from test_phoenix_training import A, C
    return (np.random.default_rng(100 + i).random((B, C, A)) < 0.3).astype(np.float32)


def model_configs():
    """(ranker, retrieval model) configs: test_phoenix_training's tiny sizes, float32."""
    import jax.numpy as jnp

    from recsys_model import PhoenixModelConfig
    from recsys_retrieval_model import PhoenixRetrievalModelConfig
    from test_phoenix_training import HASHES, TRANSFORMER, A, C, D, S
    return (PhoenixModelConfig(model=TRANSFORMER, emb_size=D, num_actions=A, history_seq_len=S, candidate_seq_len=C,
                               hash_config=HASHES, fprop_dtype=jnp.float32),
            PhoenixRetrievalModelConfig(model=TRANSFORMER, emb_size=D, history_seq_len=S, candidate_seq_len=C,
                                        hash_config=HASHES, fprop_dtype=jnp.float32))


def models(optimizer):
    """[(name, make(**trainer kwargs), args_of(step))]: both models, trained with `optimizer` on 5
    seeded batches in turn."""
    import phoenix_training as training
    from test_phoenix_training import random_batch
    rank_cfg, ret_cfg = model_configs()
    return [("ranking", lambda **kw: training.make_ranking_trainer(rank_cfg, optimizer_config=optimizer, **kw),
             lambda i: (random_batch(i % 5, B), labels(i % 5))),
            ("retrieval", lambda **kw: training.make_retrieval_trainer(ret_cfg, optimizer_config=optimizer, **kw),
             lambda i: (random_batch(i % 5, B),))]


def run(trainer, args_of, steps=STEPS, state=None):
    """(state, [steps] losses) of `steps` steps from `state` (default: init with seed 0)."""
    import jax

    from test_phoenix_training import random_batch
    state = trainer.init(jax.random.PRNGKey(0), random_batch(0, B)) if state is None else state
    losses = []
    for i in range(steps):
        state, metrics = trainer.step(state, *args_of(i))
        losses.append(float(metrics["loss"]))
    return state, np.array(losses)


SINGLE_RUNS = {}


def single_device(name, make, args_of, variant):
    """(trainer, state, losses) of the single-device run of model `name` with the optimiser `variant`:
    trained once, shared by the data-parallel and the sharded-table checks."""
    if (name, variant) not in SINGLE_RUNS:
        trainer = make()
        SINGLE_RUNS[name, variant] = (trainer, *run(trainer, args_of))
    return SINGLE_RUNS[name, variant]


def check_data_parallel_training():
    """Both trainers, batch split over 8 devices and state replicated, equal one device."""
    import jax

    from test_phoenix_training import OPTIMIZER, random_batch
    for name, make, args_of in models(OPTIMIZER):
        _, one, one_losses = single_device(name, make, args_of, "sparse")
        multi = make(data_parallel=True)
        eight, eight_losses = run(multi, args_of)
        leaf = jax.tree.leaves(eight.params)[0]
        assert len(leaf.sharding.device_set) == 8 and leaf.sharding.is_fully_replicated, leaf.sharding
        assert multi.trace_counts["step"] == 1, multi.trace_counts
        assert one_losses[-1] < one_losses[0], one_losses  # it trains
        np.testing.assert_allclose(eight_losses, one_losses, rtol=1e-5, atol=1e-7, err_msg=name)
        for a, b in zip(jax.tree.leaves(one.params), jax.tree.leaves(eight.params)):
            np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-4, atol=1e-6, err_msg=name)
        print(name, "max rel loss diff", float(np.max(np.abs(eight_losses - one_losses) / np.abs(one_losses))))
    with pytest.raises(ValueError, match="multiple of the 8 devices"):  # B=4 on 8 devices
        multi.step(eight, random_batch(0, 4))


def check_sharded_tables(variant):
    """Row-sharded tables on 8 devices equal one device ("sparse": both models, lazy row updates, also
    a 4 x 2 mesh and the checkpoints; "dense": the ranker with dense table updates)."""
    import jax
    from jax.sharding import Mesh

    import phoenix_sharding
    import phoenix_training as training
    from test_phoenix_training import HASHES, OPTIMIZER, D, random_batch
    if variant == "dense":
        OPTIMIZER = training.OptimizerConfig(learning_rate=1e-2, warmup_steps=5, sparse_table_updates=False)
    mesh_2d = Mesh(np.array(jax.devices()).reshape(4, 2), ("data", "table"))

    def host(trainer, params):  # the replicated layout: padding rows dropped
        return jax.device_get(phoenix_sharding.unpad_tables(params, trainer.hash_config))

    for name, make, args_of in models(OPTIMIZER):
        if variant == "dense" and name != "ranking":
            continue
        single, one, one_losses = single_device(name, make, args_of, variant)
        meshes = [("1-D mesh", True, 8)] + ([("2-D mesh 4x2", mesh_2d, 2)] if name == "ranking" else [])
        meshes = meshes[:1] if variant == "dense" else meshes
        trained = {}
        for label, mesh, shards in meshes:
            sharded = make(data_parallel=mesh, shard_tables=True)
            eight, eight_losses = run(sharded, args_of)
            trained[shards] = (sharded, eight)
            assert sharded.trace_counts["step"] == 1, sharded.trace_counts
            tables = eight.params["hash_embeddings"]
            for table_name, table in tables.items():
                rows = getattr(HASHES, training.TABLE_SIZE_FIELDS[table_name])
                padded = phoenix_sharding.padded_rows(rows, shards)
                assert table.shape == (padded, D), (table_name, table.shape)
                shapes = {s.data.shape for s in table.addressable_shards}
                assert shapes == {(padded // shards, D)}, (label, table_name, shapes)
                moments = [leaf for path, leaf in jax.tree_util.tree_leaves_with_path(eight.opt_state)
                           if phoenix_sharding.is_table_path(path) and str(path[-1].key) == table_name]
                assert len(moments) == 2, moments  # Adam's mu and nu
                for m in moments:
                    assert {s.data.shape for s in m.addressable_shards} == {(padded // shards, D)}, m.sharding
                np.testing.assert_array_equal(np.asarray(table)[rows:], 0)  # padding rows: zero, never updated
            dense = eight.params[[k for k in eight.params if k != "hash_embeddings"][0]]
            assert all(v.sharding.is_fully_replicated for v in dense.values())
            assert one_losses[-1] < one_losses[0], one_losses  # it trains
            # atol: the retrieval loss is compared as the replicated data-parallel test does (below 1e-5
            # relative but for late steps, 1.4e-5, bit-identical to replicated tables on 8 devices)
            np.testing.assert_allclose(eight_losses, one_losses, rtol=1e-5, atol=1e-7, err_msg=name + label)
            for a, b in zip(jax.tree.leaves(one.params), jax.tree.leaves(host(sharded, eight.params)), strict=True):
                np.testing.assert_allclose(b, np.asarray(a), rtol=1e-4, atol=1e-6, err_msg=name + label)
            p1 = single.predict(one.params, random_batch(7, B))
            p8 = sharded.predict(eight.params, random_batch(7, B))
            for a, b in zip(jax.tree.leaves(p1), jax.tree.leaves(p8), strict=True):
                np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-4, atol=1e-5, err_msg=name + label)
            print(name, label, "max rel loss diff",
                  float(np.max(np.abs(eight_losses - one_losses) / np.abs(one_losses))))
        if name != "ranking" or variant == "dense":
            continue
        # a checkpoint of sharded tables holds the replicated layout: the single-device trainer reads it,
        # and a sharded trainer resumes from it on the same path as an unbroken run
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "ckpt")
            sharded.save(path, eight)
            back = single.restore(path, random_batch(0, B))
            for a, b in zip(jax.tree.leaves(back.params), jax.tree.leaves(host(sharded, eight.params)), strict=True):
                np.testing.assert_array_equal(np.asarray(a), b)
            again = sharded.restore(path, random_batch(0, B))
            assert {s.data.shape for s in again.params["hash_embeddings"]["post_table"].addressable_shards} == \
                {(phoenix_sharding.padded_rows(HASHES.post_table_size, 2) // 2, D)}
            _, more = run(sharded, lambda i: args_of(i + 3), steps=2, state=again)
            _, ref = run(sharded, lambda i: args_of(i + 3), steps=2, state=sharded.restore(path, random_batch(0, B)))
            np.testing.assert_array_equal(more, ref)
            # a sharded checkpoint (phoenix_sharded_checkpoint): 8 shards written, each with 1/8 of the rows;
            # it loads bit for bit on 8 devices, on the 4 x 2 mesh (resharded 8 -> 2) and on one device
            t8, s8 = trained[8]
            t2 = trained[2][0]
            expected = host(t8, {"params": s8.params, "opt_state": s8.opt_state})
            shard_path = os.path.join(tmp, "sharded")
            t8.save(shard_path, s8, sharded=True)
            names = sorted(os.listdir(shard_path))
            assert names == ["dense", "index.json"] + [f"shard-{i:05d}-of-00008" for i in range(8)], names
            index = json.load(open(os.path.join(shard_path, "index.json")))
            post = [leaf for leaf in index["leaves"] if leaf["tree"] == "params" and "post_table" in leaf["path"]]
            assert post[0]["ranges"] == [[8 * i, min(8 * i + 8, 60)] for i in range(8)], post
            last = phoenix_checkpoint.load_checkpoint(os.path.join(shard_path, "shard-00007-of-00008")).params
            assert last[f"leaf_{index['leaves'].index(post[0])}"].shape == (4, D)  # rows 56..59 of 60
            for trainer in (t8, t2, single):
                back = trainer.restore(shard_path, random_batch(0, B))
                if trainer is not single:
                    table = back.params["hash_embeddings"]["post_table"]
                    assert len({s.device for s in table.addressable_shards}) == 8
                    n = trainer.table_shards
                    assert {s.data.shape[0] for s in table.addressable_shards} == {
                        phoenix_sharding.padded_rows(HASHES.post_table_size, n) // n}
                got = host(trainer, {"params": back.params, "opt_state": back.opt_state})
                for a, b in zip(jax.tree.leaves(expected), jax.tree.leaves(got), strict=True):
                    np.testing.assert_array_equal(np.asarray(b), np.asarray(a))
            # parts of two saves are never mixed
            other = os.path.join(tmp, "other")
            t8.save(other, t8.restore(shard_path, random_batch(0, B)), sharded=True)
            shutil.rmtree(os.path.join(shard_path, "shard-00003-of-00008"))
            part = "shard-00003-of-00008"
            shutil.copytree(os.path.join(other, part), os.path.join(shard_path, part))
            with pytest.raises(phoenix_checkpoint.CheckpointError, match="written by another save"):
                t8.restore(shard_path, random_batch(0, B))
    for bad, why in ((dict(shard_tables=True), "needs a mesh"),
                     (dict(shard_tables=1, data_parallel=True), "expected a bool")):
        with pytest.raises((TypeError, ValueError), match=why):
            training.RankingTrainer(model_configs()[0], **bad)


def _shard_parts(shards: int) -> list[str]:
    """The entries of a sharded checkpoint directory of `shards` shards, sorted."""
    return ["dense", "index.json"] + [f"shard-{i:05d}-of-{shards:05d}" for i in range(shards)]


def _exited_pid() -> int:
    """The pid of a process that has exited (a killed save's, for a leftover directory's name)."""
    proc = subprocess.Popen([sys.executable, "-c", ""])
    proc.wait()
    return proc.pid


def check_sharded_resume():
    """fit's step checkpoints with sharded tables on 8 devices: sharded on disk, pruned to the newest K;
    a run resumed from a mid-run one ends bit for bit as the uninterrupted run; a killed save's leftover
    is no checkpoint and the next save of its name deletes it (a live save's is kept); a resume on
    another mesh, or on one device, is refused with the difference listed."""
    import io

    import jax
    from jax.sharding import Mesh

    import phoenix_training as training
    from test_phoenix_training import OPTIMIZER, random_batch
    _, make, args_of = models(OPTIMIZER)[0]  # the ranker, lazy row updates
    steps = 6

    def batches(first):
        return (args_of(i) for i in range(first, steps))

    def fit(trainer, directory, **kw):
        state = trainer.init(jax.random.PRNGKey(0), random_batch(0, B))
        out = io.StringIO()
        state, history = training.fit(trainer, state, batches, steps, log_every=1, stream=out, checkpoint_dir=directory,
                                      checkpoint_every=2, keep_checkpoints=2, **kw)
        return state, [h["loss"] for h in history], out.getvalue()

    trainer = make(data_parallel=True, shard_tables=True)
    with tempfile.TemporaryDirectory() as tmp:
        whole, resumed = os.path.join(tmp, "whole"), os.path.join(tmp, "resumed")
        full, full_losses, _ = fit(trainer, whole)
        found = training.list_step_checkpoints(whole)
        assert [step for step, _ in found] == [4, 6], found  # step 2 pruned
        for _, path in found:
            assert sorted(os.listdir(path)) == _shard_parts(8), os.listdir(path)
        os.makedirs(resumed)
        shutil.copytree(found[0][1], os.path.join(resumed, "step-00000004"))
        # a save of step 6 killed before its index (its process gone), and a save in progress (this pid)
        dead = os.path.join(resumed, f".step-00000006.tmp-sharded-{_exited_pid()}-0123456789abcdef")
        live = os.path.join(resumed, f".step-00000008.tmp-sharded-{os.getpid()}-0123456789abcdef")
        for leftover in (dead, live):
            shutil.copytree(found[1][1], leftover)
            os.remove(os.path.join(leftover, "index.json"))
        assert [step for step, _ in training.list_step_checkpoints(resumed)] == [4]
        again, losses, out = fit(trainer, resumed, resume=True)
        assert f"resuming from {os.path.join(resumed, 'step-00000004')} (step 4 of 6)" in out, out
        assert losses == full_losses, (losses, full_losses)  # the history: steps 1-4 read back, 5-6 trained
        for a, b in zip(jax.tree.leaves(full), jax.tree.leaves(again), strict=True):
            np.testing.assert_array_equal(np.asarray(b), np.asarray(a))
        assert not os.path.exists(dead) and os.path.isdir(live), os.listdir(resumed)
        assert [step for step, _ in training.list_step_checkpoints(resumed)] == [4, 6]
        mesh_2d = Mesh(np.array(jax.devices()).reshape(4, 2), ("data", "table"))
        for other, listed in ((make(data_parallel=mesh_2d, shard_tables=True),
                               "devices.mesh.data: checkpoint 8, now 4\n  devices.mesh.table: absent in the "
                               "checkpoint, now 2"),
                              (make(), "devices.mesh: checkpoint {'data': 8}, now None")):
            with pytest.raises(training.ResumeError, match=re.escape(listed)):
                fit(other, resumed, resume=True)


def run_train_eight(run_dir):
    """run_train.py --data-parallel --shard-tables on the 8 devices; its output between BEGIN/END lines."""
    import run_train
    print("BEGIN run_train", flush=True)
    run_train.main([*TINY_SYNTHETIC, "--checkpoint-dir", run_dir, *SHARDED_FLAGS])
    sys.stderr.flush()
    print("END run_train", flush=True)


def eight_device_main(run_dir):
    """Every 8-device section in turn (run_train first: its printed losses are compared with a fresh
    1-device process's); prints RESULTS {section: "OK" or the traceback of its failure}."""
    import jax
    assert jax.device_count() == 8, jax.devices()
    checks = {"run_train": lambda: run_train_eight(run_dir), "runners": check_runners,
              "data_parallel_training": check_data_parallel_training,
              "sharded_sparse": lambda: check_sharded_tables("sparse"),
              "sharded_dense": lambda: check_sharded_tables("dense"), "sharded_resume": check_sharded_resume}
    assert list(checks) == SECTIONS
    results = {}
    for name, check in checks.items():
        try:
            check()
            results[name] = "OK"
        except Exception:
            results[name] = traceback.format_exc()
    print("RESULTS " + json.dumps(results), flush=True)


# --------------------------------------------------------------------------- the 2-process pair


def two_process_main(address, process_id, run_dir, ckpt):
    """One of 2 processes x 4 devices: run_train.py's sharded run (jax.distributed through its flags)
    with step checkpoints every EVERY steps; then, as after a kill at step RESUMED_FROM (process 0 sets
    the uninterrupted run's final checkpoint aside and deletes the later step checkpoints), the same
    command with --resume, its output between BEGIN/END resume lines; then 3 steps of the tiny ranker
    with sharded tables saved as a sharded checkpoint (each process writes the shards of its devices)
    and read back bit for bit; prints LOSSES [3 losses]."""
    import run_train
    import train_synthetic
    argv = [*TINY_SYNTHETIC, "--checkpoint-dir", run_dir, *SHARDED_FLAGS, "--checkpoint-every", str(EVERY),
            "--coordinator-address", address, "--num-processes", "2", "--process-id", str(process_id)]
    run_train.main(argv)
    import jax
    from jax.experimental import multihost_utils
    if jax.process_index() == 0:
        os.rename(os.path.join(run_dir, "ranker"), os.path.join(os.path.dirname(run_dir), "two-uninterrupted"))
        steps = os.path.join(run_dir, "steps", "ranker")
        for step, path in phoenix_resume.list_step_checkpoints(steps):
            if step > RESUMED_FROM:
                shutil.rmtree(path)
    multihost_utils.sync_global_devices("test_multidevice: later step checkpoints deleted")
    print("BEGIN resume", flush=True)
    argv = [a for a in argv if a != "--overwrite"] + ["--resume"]
    train_synthetic.run(run_train.parse_args(argv).run, argv)  # run_train.main, jax.distributed initialised
    sys.stderr.flush()
    print("END resume", flush=True)

    from test_phoenix_training import random_batch, three_ranker_steps
    assert (jax.device_count(), jax.local_device_count()) == (8, 4), jax.devices()
    trainer, state, losses = three_ranker_steps(data_parallel=True, shard_tables=True)
    trainer.save(ckpt, state, sharded=True)
    back = trainer.restore(ckpt, random_batch(0, 8))  # each process reads its devices' rows
    for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(back), strict=True):
        for x, y in zip(a.addressable_shards, b.addressable_shards, strict=True):
            np.testing.assert_array_equal(np.asarray(y.data), np.asarray(x.data))
    print("LOSSES", json.dumps(losses), flush=True)


# --------------------------------------------------------------------------- the parent's side


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(log, devices: int, argv):
    """`python -u ARGV` with `devices` forced CPU devices, stdout and stderr (in order) to `log`."""
    env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}", JAX_PLATFORMS="cpu")
    with open(log, "w") as out:
        return subprocess.Popen([sys.executable, "-u", *argv], cwd=HERE, env=env, stdout=out,
                                stderr=subprocess.STDOUT, text=True)


def _call(function, *args) -> list:
    return ["-c", f"import test_multidevice as t; t.{function}(*{list(map(str, args))!r})"]


@pytest.fixture(scope="module")
def started(tmp_path_factory):
    """tmp and {name: (process, log)}: the 8-device process, the 1-device run_train.py and the 2-process
    pair, started together."""
    tmp = tmp_path_factory.mktemp("multidevice")
    address = f"127.0.0.1:{_free_port()}"
    argv = {"eight": (8, _call("eight_device_main", tmp / "eight")),
            "one": (1, ["run_train.py", *TINY_SYNTHETIC, "--checkpoint-dir", str(tmp / "one")]),
            **{f"p{i}": (4, _call("two_process_main", address, i, tmp / "two", tmp / "ckpt")) for i in range(2)}}
    procs = {name: (_start(tmp / f"{name}.log", devices, args), tmp / f"{name}.log")
             for name, (devices, args) in argv.items()}
    yield tmp, procs
    for proc, _ in procs.values():
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def _output(started, name) -> str:
    """The process's output once it has exited 0 (the 8-device one does the work of four processes)."""
    proc, log = started[1][name]
    proc.wait(timeout=2400 if name == "eight" else 600)
    out = log.read_text()
    assert proc.returncode == 0, f"{name} exited {proc.returncode}:\n{out}"
    return out


@pytest.fixture(scope="module")
def eight_devices(started) -> tuple[dict, str]:
    """({section: "OK" or its traceback}, output) of the 8-device process."""
    out = _output(started, "eight")
    found = re.search(r"^RESULTS (.*)$", out, re.M)
    assert found, out
    results = json.loads(found.group(1))
    assert list(results) == SECTIONS, out
    return results, out


def _section(eight_devices, name):
    results, out = eight_devices
    assert results[name] == "OK", f"8-device section {name} failed:\n{results[name]}\n--- output:\n{out[-5000:]}"


def test_data_parallel_runners_equal_single_device(eight_devices):
    """Ranking (rank, rank_large) and retrieval runners, data-parallel over 8 forced CPU devices, give the
    single-device scores (1e-5 relative) and orders; a batch that does not split 8 ways is refused."""
    _section(eight_devices, "runners")


def test_data_parallel_training_equals_single_device(eight_devices):
    """20 steps of each trainer on 8 forced CPU devices (batch split, state replicated) give the
    single-device losses within 1e-5 relative (only the order of float32 sums differs; measured max
    2.3e-6) and parameters within 1e-4. float32 activations: with the release's bfloat16 each device's
    partial gradient is rounded to bfloat16 before the all-reduce, so 1 and 8 devices differ at
    bfloat16 rounding (1e-4 relative in the first gradient, ~5e-3 in the loss after 20 steps)."""
    _section(eight_devices, "data_parallel_training")


@pytest.mark.parametrize("variant", ["sparse", "dense"])
def test_sharded_tables_equal_single_device(eight_devices, variant):
    """Trainers with row-sharded tables (a 1-D mesh of 8 forced CPU devices: tables split 8 ways; for
    the sparse ranker also a 4 x 2 ("data", "table") mesh) give the single-device losses within 1e-5
    relative over 20 steps and parameters within 1e-4 (float32); every device holds 1/n of each table
    and of its Adam moments (tables of 50 and 60 rows padded to 56 and 64); predictions agree; a sharded
    checkpoint loads on one device, and resumes sharded. "sparse": both models with lazy row updates;
    "dense": the ranker with dense table updates (the synthetic experiment's optimiser)."""
    _section(eight_devices, f"sharded_{variant}")


def _printed_losses(out: str) -> list[str]:
    return re.findall(r"^step \d+/\d+  loss (\S+)", out, re.M)


def test_two_processes_equal_one_process_and_one_device(started, eight_devices):
    """run_train.py --data synthetic three ways, as the issue's check does: 1 device; 8 forced CPU devices
    with --data-parallel --shard-tables; 2 processes x 4 devices on 127.0.0.1 (gloo collectives). The
    printed losses agree at print precision and the recorded ones (the final checkpoint's history,
    written by process 0) within 1e-5 relative (float32)."""
    tmp = started[0]
    _section(eight_devices, "run_train")
    eight = eight_devices[1]
    outputs = {"one": _output(started, "one"),
               "eight": eight[eight.index("BEGIN run_train\n"):eight.index("END run_train\n")],
               **{f"p{i}": _output(started, f"p{i}").split("BEGIN resume\n")[0] for i in range(2)}}
    printed = {name: _printed_losses(out) for name, out in outputs.items()}
    assert len(printed["one"]) == 5, outputs["one"]
    for name in ("eight", "p0", "p1"):
        assert printed[name] == printed["one"], (name, outputs[name])
    recorded = {}
    for name in ("one", "eight", "two-uninterrupted"):  # the 2-process run's before it was resumed
        extra = phoenix_checkpoint.read_meta(tmp / name if name.startswith("two") else tmp / name / "ranker")["extra"]
        history = phoenix_resume.decode_json(extra["result"])["history"]
        recorded[name] = np.array([h["loss"] for h in history if "loss" in h])
        if name == "two-uninterrupted":
            assert extra["devices"]["count"] == 8 and extra["devices"]["mesh"] == {"data": 8}, extra["devices"]
            assert extra["devices"]["processes"] == 2, extra["devices"]
    assert len(recorded["one"]) == 5
    two = recorded["two-uninterrupted"]
    np.testing.assert_allclose(recorded["eight"], recorded["one"], rtol=1e-5)
    np.testing.assert_allclose(two, recorded["one"], rtol=1e-5)
    np.testing.assert_allclose(two, recorded["eight"], rtol=1e-6)


def _step_lines(out: str) -> dict:
    return dict(re.findall(r"^step (\d+)/\d+  loss (\S+)", out, re.M))


def test_two_processes_resume_from_a_step_checkpoint(started):
    """The 2 x 4 run_train.py run (sharded tables) writes sharded step checkpoints every 2 steps, each
    process its 4 shards, pruned to the newest 3; resumed by both processes from step 6 (the later ones
    deleted, as after a kill), it prints the uninterrupted run's losses for steps 8 and 10 and records
    its whole history and figures bit for bit; the run directory holds nothing but its entries."""
    tmp = started[0]
    steps = tmp / "two" / "steps" / "ranker"
    for i in range(2):
        first, rest = _output(started, f"p{i}").split("BEGIN resume\n")
        resumed = rest.split("END resume\n")[0]
        assert f"resuming from {steps / 'step-00000006'} (step 6 of 10)" in resumed, resumed
        assert sorted(_step_lines(first), key=int) == ["2", "4", "6", "8", "10"], first
        assert sorted(_step_lines(resumed), key=int) == ["8", "10"], resumed
        assert _step_lines(resumed) == {k: _step_lines(first)[k] for k in ("8", "10")}, (first, resumed)
    before = phoenix_checkpoint.read_meta(tmp / "two-uninterrupted")["extra"]
    after = phoenix_checkpoint.read_meta(tmp / "two" / "ranker")["extra"]
    history = [phoenix_resume.decode_json(extra["result"])["history"] for extra in (before, after)]
    assert [h["step"] for h in history[1]] == [h["step"] for h in history[0]]
    assert [h.get("loss") for h in history[1]] == [h.get("loss") for h in history[0]]  # bit for bit
    assert (after["auc_favorite"], after["mean_auc"]) == (before["auc_favorite"], before["mean_auc"])
    assert [step for step, _ in phoenix_resume.list_step_checkpoints(steps)] == [6, 8, 10]
    assert sorted(os.listdir(steps)) == [".lock", "step-00000006", "step-00000008", "step-00000010"]
    for step in (6, 8, 10):
        path = steps / f"step-{step:08d}"
        assert sorted(os.listdir(path)) == _shard_parts(8), os.listdir(path)
        index = json.load(open(path / "index.json"))
        assert (index["step"], index["shards"]) == (step, 8), index
        writers = {name: phoenix_checkpoint.read_meta(path / name)["extra"]["process"]
                   for name in _shard_parts(8)[2:]}
        assert writers == {f"shard-{i:05d}-of-00008": i // 4 for i in range(8)}, writers
    assert phoenix_run_dir.entry_problem(tmp / "two" / "steps", "steps") is None


def test_resume_of_the_two_process_run_on_one_device_is_refused(started, tmp_path):
    """--resume of a copy of the 2 x 4 run in this 1-device process stops before training, listing the
    devices that differ (a resume on another device count is refused, as for one process)."""
    import run_train
    for i in range(2):
        _output(started, f"p{i}")
    shutil.copytree(started[0] / "two", tmp_path / "two")
    argv = [a for a in TINY_SYNTHETIC if a != "--overwrite"] + [
        "--checkpoint-dir", str(tmp_path / "two"), *SHARDED_FLAGS, "--checkpoint-every", str(EVERY), "--resume"]
    with pytest.raises(phoenix_resume.ResumeError) as info:
        run_train.main(argv)
    for line in ("devices.count: checkpoint 8, now 1", "devices.mesh.data: checkpoint 8, now 1",
                 "devices.processes: checkpoint 2, now absent"):
        assert line in str(info.value), str(info.value)
    assert str(tmp_path / "two" / "steps" / "ranker" / "step-00000010") in str(info.value)


def test_sharded_step_checkpoints_leftovers_and_pruning(started, tmp_path):
    """On copies of the 2-process run's sharded step checkpoints: a killed save's temporary directory
    (no index.json) is no checkpoint; a prune deletes it once its pid is gone (not while it lives),
    the set-aside copy of a killed save, and the older sharded checkpoints; something a save does not
    write is refused as ours, so neither pruned nor taken for a run directory's entry."""
    import phoenix_sharded_checkpoint as sharded
    for i in range(2):
        _output(started, f"p{i}")
    steps = tmp_path / "ranker"
    shutil.copytree(started[0] / "two" / "steps" / "ranker", steps)
    step_10 = steps / "step-00000010"
    dead = steps / f".step-00000012.tmp-sharded-{_exited_pid()}-00000000000000ab"
    live = steps / f".step-00000014.tmp-sharded-{os.getppid()}-00000000000000ab"
    aside = steps / ".step-00000010.old-sharded-00000000000000ab"
    for leftover in (dead, live, aside):
        shutil.copytree(step_10, leftover)
    for leftover in (dead, live):
        os.remove(leftover / "index.json")
    assert sharded.why_not_ours(step_10) is None and sharded.why_not_ours(dead, complete=False) is None
    assert sharded.why_not_ours(dead) == "has no index.json"
    assert [step for step, _ in phoenix_resume.list_step_checkpoints(steps)] == [6, 8, 10]
    assert phoenix_run_dir.entry_problem(tmp_path, "steps") is None  # leftovers included
    (steps / "step-00000006" / "notes.txt").write_text("mine")
    assert sharded.why_not_ours(steps / "step-00000006") == "holds notes.txt, which a sharded save does not write"
    assert "notes.txt" in phoenix_run_dir.entry_problem(tmp_path, "steps")
    deleted = phoenix_resume.prune_step_checkpoints(steps, 1)
    assert deleted == [str(steps / "step-00000008")], deleted  # step 6 holds a file of someone else's
    assert sorted(os.listdir(steps)) == [".lock", live.name, "step-00000006", "step-00000010"]


def test_two_processes_write_their_own_shards(started):
    """2 processes x 4 forced CPU devices train 3 steps with sharded tables and save a sharded checkpoint:
    each process writes the 4 shards its devices hold (and only process 0 the dense part); both read it
    back bit for bit; one device loads it and matches 3 single-device steps (1e-5, float32)."""
    tmp = started[0]
    outputs = [_output(started, f"p{i}") for i in range(2)]
    path = tmp / "ckpt"
    writers = {name: phoenix_checkpoint.read_meta(path / name)["extra"]["process"]
               for name in sorted(os.listdir(path)) if name.startswith("shard-")}
    assert writers == {f"shard-{i:05d}-of-00008": i // 4 for i in range(8)}, writers
    losses = [json.loads(re.search(r"^LOSSES (.*)$", out, re.M).group(1)) for out in outputs]
    assert losses[0] == losses[1]

    import jax

    from test_phoenix_training import random_batch, three_ranker_steps
    trainer, state, single = three_ranker_steps()
    np.testing.assert_allclose(losses[0], single, rtol=1e-5)
    loaded = trainer.restore(str(path), random_batch(0, 8))
    for a, b in zip(jax.tree.leaves(state.params), jax.tree.leaves(loaded.params), strict=True):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-4, atol=1e-6)
