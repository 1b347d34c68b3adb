"""Why XLA_FLAGS=--xla_force_host_platform_device_count=8 changes a single-device run's bits (docs/resume.md).

    uv run python scripts/xla_cpu_threads.py

Runs, in one fresh process per setting, one ranker train step at the synthetic defaults
(`run_train.py --data synthetic`: B=128, S=32, C=16, D=32, two layers) and three float32 reductions
on fixed data, and prints per setting: the devices, the size of XLA's CPU intra-op thread pool
(phoenix_resume.xla_cpu_threads and the XLAEigen threads counted in /proc), and a short sha256 of
the loss, of the parameters after the step and of each reduction's result. Equal hashes: equal bits.
About three minutes on 2 cores (one compile per setting).
"""

import json
import os
import subprocess
import sys

# XLA's YNNPACK fusions (dots, reductions) off: what XLA's own kernels and Eigen then do.
NO_YNN = ("--xla_cpu_experimental_ynn_fusion_type=-LIBRARY_FUSION_TYPE_REDUCE,-LIBRARY_FUSION_TYPE_DOT,"
          "-LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT,-LIBRARY_FUSION_TYPE_ELTWISE")
SETTINGS = [  # (label, environment)
    ("1 device", {}),
    ("1 device, PJRT_NPROC=1", {"PJRT_NPROC": "1"}),
    ("1 device, PJRT_NPROC=8", {"PJRT_NPROC": "8"}),
    ("8 devices", {"XLA_FLAGS": "--xla_force_host_platform_device_count=8"}),
    ("8 devices, PJRT_NPROC=1", {"XLA_FLAGS": "--xla_force_host_platform_device_count=8", "PJRT_NPROC": "1"}),
    ("1 device, no Eigen threads", {"XLA_FLAGS": "--xla_cpu_multi_thread_eigen=false"}),
    ("1 device, no YNNPACK fusions, PJRT_NPROC=1", {"XLA_FLAGS": NO_YNN, "PJRT_NPROC": "1"}),
    ("1 device, no YNNPACK fusions, PJRT_NPROC=8", {"XLA_FLAGS": NO_YNN, "PJRT_NPROC": "8"}),
]

CHILD = """
import hashlib, json, os, sys
import jax, jax.numpy as jnp, numpy as np
import phoenix_training as training
import phoenix_synthetic as synthetic
import train_synthetic as ts
from phoenix_synthetic import SyntheticWorld, optimizer_config, world_config

def sha(tree):
    return hashlib.sha256(b"".join(np.asarray(x).tobytes() for x in jax.tree.leaves(tree))).hexdigest()[:8]

args = ts.SyntheticRun(steps_ranker=1)
world = SyntheticWorld(world_config())
train_ids, _ = world.split_users()
cfg = ts.ranker_config(args, world.cfg)
trainer = training.make_ranking_trainer(cfg, cfg.hash_config, optimizer_config(args.learning_rate, 1),
                                        table_init_stddev=args.table_init_stddev)
state = trainer.init(jax.random.PRNGKey(0), synthetic.example_ranking_batch(world, cfg.hash_config))
batch, labels = next(synthetic.ranking_stream(world, train_ids, args.batch_size, 0, cfg.hash_config,
                                             args.user_id_dropout))
state, metrics = trainer.step(state, batch, labels)
rng = np.random.default_rng(0)
rows, a, b = 128 * 49, None, None  # B * (1 + S + C) rows, as in the step's weight gradients
a = rng.standard_normal((rows, 32), dtype=np.float32)
b = rng.standard_normal((rows, 64), dtype=np.float32)
threads = sum(open(f"/proc/self/task/{t}/comm").read().strip().endswith("XLAEigen")
              for t in os.listdir("/proc/self/task")) if sys.platform == "linux" else None
print(json.dumps({
    "devices": jax.device_count(), "pool": training.xla_cpu_threads(), "counted": threads,
    "loss": sha(metrics["loss"]), "params": sha(state.params),
    "X^T dY [N,32]x[N,64]": sha(jax.jit(lambda a, b: jnp.einsum("nk,nm->km", a, b))(a, b)),
    "X dY^T [32,N]x[N,64]": sha(jax.jit(jnp.matmul)(np.ascontiguousarray(a.T), b)),
    "column sums over N": sha(jax.jit(lambda a: a.sum(0))(a)),
}))
"""


def main() -> None:
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    base = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "PJRT_NPROC", "NPROC")}
    rows = []
    for label, env in SETTINGS:
        done = subprocess.run([sys.executable, "-c", CHILD], cwd=here, capture_output=True, text=True,
                              env={**base, **env, "JAX_PLATFORMS": "cpu"})
        if done.returncode:
            raise SystemExit(f"{label}: failed\n{done.stderr[-3000:]}")
        rows.append((label, json.loads(done.stdout.strip().splitlines()[-1])))
    keys = list(rows[0][1])
    print("| setting | " + " | ".join(keys) + " |")
    print("|---|" + "---|" * len(keys))
    for label, row in rows:
        print(f"| {label} | " + " | ".join(str(row[k]) for k in keys) + " |")


if __name__ == "__main__":
    main()
