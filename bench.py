"""Phoenix benchmarks. Retrieval: exact top-k (bare matmul, CorpusIndex on 1 and 8 devices) and
FAISS IVF with its recall. Ranking: the masked full-sequence path vs the isolated path vs scoring
against a cached prefix, and the release's op-by-op (un-jitted) dispatch, for C in {32, 500, 2000},
B in {1, 8}, S = 128 on the release's demo model (D = 128, 2 layers, bfloat16 activations).

Command:
  uv run bench.py                   # N = 1M and 10M, B = 1 and 16, top-1000: 7-11 min on 2 busy CPU cores
  uv run bench.py --quick           # N = 100k, fewer runs: under a minute
  uv run bench.py --only retrieval --sizes 1000000 --batches 1,16 --top-k 1000

Prints a markdown table (one row per method x N x B: compile/build time, steady-state median,
peak memory, recall@K against the exact index) and then ONE line of JSON with all rows.

Every (method, N) runs in its own Python process: peak RSS (ru_maxrss) is then that method's
alone, and the 8-device run can set XLA_FLAGS before jax is imported. The corpus is realistic
rather than uniform noise: a mixture of Gaussians around NUM_CLUSTERS random centres,
L2-normalised; users are drawn from the same mixture. It is written straight into a 64-byte
aligned buffer (`index.aligned_empty`) so the exact index aliases it instead of copying 5 GB.
Peak memory at N = 10M: ~5.2 GB for the exact index (the 5.1 GB corpus, aliased), ~5.7 GB for the
bare path ([16, N] scores), ~11.5 GB for FAISS (the corpus plus FAISS's own copy; its k-means
build took 2.5-6 min there). Steady-state times are medians over --runs calls, each waited on
with `block_until_ready`; "compile" is the first call minus that median (trace + compile; 0
when noise exceeds it).
"""

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np

DIM = 128
# ~N/1024 points per cluster; noise at 0.6x a centre's scale puts a point at cos ~0.86 from its
# centre. IVF recall@1000 depends strongly on this: with 2048 clusters (fewer points per cluster
# than K) recall@1000 at N=1M, nlist=1000 fell to 0.70 at nprobe=8 and 0.94 at nprobe=128.
NUM_CLUSTERS = 1024
CLUSTER_SPREAD = 0.6
USER_SPREAD = 0.6
GEN_ROWS = 2**17  # corpus rows generated per step: bounds the temporaries to 64 MiB each
DEFAULT_SIZES = (1_000_000, 10_000_000)
QUICK_SIZE = 100_000
METHODS = ("exact", "bare", "exact_8dev", "faiss")
EIGHT_DEVICES = "--xla_force_host_platform_device_count=8"


def make_clustered_corpus(num_rows: int, dim: int, seed: int = 0):
    """Unit vectors [N, D] from a Gaussian mixture, in an aligned buffer, plus the centres [C, D]."""
    from phoenix_index import aligned_empty

    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((NUM_CLUSTERS, dim), dtype=np.float32)  # [C, D]
    corpus = aligned_empty((num_rows, dim))  # [N, D]
    for start in range(0, num_rows, GEN_ROWS):
        rows = corpus[start:start + GEN_ROWS]  # [R, D] view
        rng.standard_normal(out=rows, dtype=np.float32)
        rows *= CLUSTER_SPREAD
        rows += centres[rng.integers(0, NUM_CLUSTERS, len(rows))]
        rows /= np.linalg.norm(rows, axis=1, keepdims=True)
    return corpus, centres


def make_users(centres, batch: int, seed: int = 1):
    rng = np.random.default_rng(seed)
    users = centres[rng.integers(0, len(centres), batch)]
    users = users + USER_SPREAD * rng.standard_normal(users.shape, dtype=np.float32)  # [B, D]
    return (users / np.linalg.norm(users, axis=1, keepdims=True)).astype(np.float32)


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux reports KiB


def time_calls(fn, runs: int):
    """(first call seconds, steady-state median ms, min ms); every call is waited on."""
    import jax

    start = time.perf_counter()
    jax.block_until_ready(fn())
    first = time.perf_counter() - start
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - start)
    return first, 1e3 * statistics.median(times), 1e3 * min(times)


def run_worker(args) -> list[dict]:
    """One method at one N, in this process; returns its rows (one per batch size)."""
    import jax

    import phoenix_index as index

    method, n, k = args.worker, args.n, args.top_k
    start = time.perf_counter()
    corpus, centres = make_clustered_corpus(n, DIM, args.seed)
    gen_s = time.perf_counter() - start
    exact = np.load(args.exact_file) if method != "exact" else None  # {B: [B, K] indices}
    rows, saved = [], {}
    start = time.perf_counter()
    if method == "bare":
        corpus_dev = jax.device_put(corpus, may_alias=True)  # same zero-copy start as the index

        @jax.jit
        def bare(user, corpus):
            scores, indices = jax.lax.top_k(user @ corpus.T, k)  # [B, K] each
            return indices, scores

        search = lambda user: bare(user, corpus_dev)
    elif method == "exact":
        exact_index = index.CorpusIndex(corpus)
        search = lambda user: exact_index.search(user, k)
    elif method == "exact_8dev":
        assert jax.device_count() == 8, jax.devices()
        exact_index = index.ShardedCorpusIndex(corpus)
        search = lambda user: exact_index.search(user, k)
    elif method == "faiss":
        ann = index.FaissIndex(corpus, nlist=args.nlist)
        del corpus  # FAISS holds its own copy
        search = lambda user: ann.search(user, k)
    build_s = time.perf_counter() - start
    settings = [dict(nprobe=p, nlist=ann.nlist) for p in args.nprobe] if method == "faiss" else [{}]
    if method.startswith("exact"):
        settings = [dict(index=exact_index)]
    for setting in settings:
        if method == "faiss":
            ann.nprobe = setting["nprobe"]
        for batch in args.batches:
            user = make_users(centres, batch, args.seed + 1)
            first, median_ms, min_ms = time_calls(lambda: search(user), args.runs)
            indices = np.asarray(search(user)[0])
            saved[f"b{batch}"] = indices
            recall = 1.0 if exact is None else index.recall_at_k(indices, exact[f"b{batch}"])
            rows.append(dict(section="retrieval", method=method, n=n, b=batch, k=k, build_s=round(build_s, 2),
                             compile_s=None if method == "faiss" else round(max(0.0, first - median_ms / 1e3), 3),
                             median_ms=round(median_ms, 2), min_ms=round(min_ms, 2), runs=args.runs,
                             recall=round(recall, 4), devices=jax.device_count(), gen_s=round(gen_s, 1),
                             note=_note(method, batch, k, setting)))
    if method == "exact":
        np.savez(args.exact_file, **saved)
    for row in rows:
        row["peak_rss_gb"] = round(peak_rss_gb(), 2)
    return rows


def _note(method, batch, k, setting) -> str:
    if method == "faiss":
        return f"nlist={setting['nlist']} nprobe={setting['nprobe']}"
    if "index" in setting:
        idx = setting["index"]
        chunk, block = idx.plan(batch, k)
        rows = idx.num_rows if method == "exact" else idx.shard_rows
        plan = "direct top_k" if chunk >= rows and block == 1 else f"R={min(chunk, rows)} W={block}"
        return plan + (f" ({rows} rows per shard)" if method == "exact_8dev" else "")
    return ""


def spawn_worker(method: str, n: int, args, exact_file: str) -> list[dict]:
    env = dict(os.environ)
    if method == "exact_8dev":
        env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " " + EIGHT_DEVICES).strip()
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", method, "--n", str(n), "--top-k", str(args.top_k),
           "--batches", ",".join(map(str, args.batches)), "--runs", str(args.runs), "--seed", str(args.seed),
           "--exact-file", exact_file, "--nprobe", ",".join(map(str, args.nprobe))]
    if args.nlist:
        cmd += ["--nlist", str(args.nlist)]
    start = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    print(f"  {method:11s} N={n:>10,d}  {time.perf_counter() - start:6.1f} s", file=sys.stderr, flush=True)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("ROWS ")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        note = f"failed (exit {proc.returncode}): {' | '.join(tail)}"
        return [dict(section="retrieval", method=method, n=n, b=b, k=args.top_k, note=note) for b in args.batches]
    return json.loads(lines[-1][len("ROWS "):])


def bench_retrieval(args) -> list[dict]:
    """Top-K retrieval rows: for each N, the exact index first (its indices score the others)."""
    rows = []
    for n in args.sizes:
        with tempfile.TemporaryDirectory() as tmp:
            exact_file = os.path.join(tmp, "exact.npz")
            for method in METHODS:
                if method == "faiss" and not _have_faiss():
                    rows += [dict(section="retrieval", method=method, n=n, b=b, k=args.top_k,
                                  note="skipped: faiss not installed (uv sync --extra faiss)") for b in args.batches]
                    continue
                rows += spawn_worker(method, n, args, exact_file)
    by_key = {(r["n"], r["b"], r["method"]): r for r in rows}
    for row in rows:  # speed relative to the bare matmul + top_k at the same (N, B)
        bare = by_key.get((row["n"], row["b"], "bare"), {})
        if "median_ms" in row and "median_ms" in bare:
            row["vs_bare"] = round(row["median_ms"] / bare["median_ms"], 2)
    return rows


RANK_METHODS = ("masked", "isolated", "prefix_reuse", "release_eager")
RANK_CANDIDATES = (32, 500, 2000)
EAGER_MAX_C = 500  # op-by-op dispatch at C=2000 takes minutes per call; skipped there


def run_rank_worker(args) -> list[dict]:
    """One ranking method at one C, every B, in this process (its peak RSS is this method's)."""
    import jax

    from run_ranker import demo_config
    from runners import ACTIONS, ModelRunner, RecsysInferenceRunner, create_example_batch

    method, C, S = args.rank_worker, args.c, args.history_len
    cfg = demo_config(history_len=S, num_candidates=C)  # the release's demo model: D=128, 2 layers
    cfg.fprop_dtype = jax.numpy.dtype(args.rank_dtype)
    ranker = RecsysInferenceRunner(ModelRunner(cfg, rng_seed=args.seed), path="masked" if method == "masked"
                                   else "isolated")
    ranker.initialize()
    rows = []
    for B in args.rank_batches:
        batch, emb = create_example_batch(B, cfg.emb_size, S, C, len(ACTIONS), seed=args.seed)
        if method in ("masked", "isolated"):
            fn = lambda: ranker.rank(batch, emb).scores  # noqa: E731
        elif method == "prefix_reuse":  # user+history encoded once; a new candidate set scored against it
            prefix = ranker.encode_prefix(batch, emb)
            fn = lambda: ranker.score_candidates(prefix, batch, emb)  # noqa: E731
        else:  # the release's runner: the transformed model applied without jit, op by op
            fn = lambda: ranker.runner.forward.apply(ranker.params, None, batch, emb).logits  # noqa: E731
        runs = max(2, args.runs // 2) if method == "release_eager" else args.runs
        first, median, low = time_calls(fn, runs)
        rows.append(dict(section="ranking", method=method, c=C, b=B, s=S, dtype=args.rank_dtype,
                         compile_s=round(max(first - median / 1e3, 0.0), 2), median_ms=round(median, 2),
                         min_ms=round(low, 2), peak_rss_gb=round(peak_rss_gb(), 2)))
    return rows


def bench_ranking(args) -> list[dict]:
    """Ranking rows: masked full-sequence path vs isolated path vs prefix reuse (vs eager release)."""
    rows = []
    for C in args.rank_candidates:
        for method in RANK_METHODS:
            if method == "release_eager" and C > EAGER_MAX_C:
                rows += [dict(section="ranking", method=method, c=C, b=b, s=args.history_len,
                              note=f"skipped: eager dispatch at C > {EAGER_MAX_C} is minutes per call")
                         for b in args.rank_batches]
                continue
            cmd = [sys.executable, os.path.abspath(__file__), "--rank-worker", method, "--c", str(C),
                   "--history-len", str(args.history_len), "--rank-batches",
                   ",".join(map(str, args.rank_batches)), "--runs", str(args.runs), "--seed", str(args.seed),
                   "--rank-dtype", args.rank_dtype]
            rows += _worker_rows(cmd, dict(os.environ))
    by_key = {(r["c"], r["b"], r["method"]): r for r in rows}
    for row in rows:
        masked = by_key.get((row["c"], row["b"], "masked"), {})
        if "median_ms" in row and "median_ms" in masked:
            row["vs_masked"] = round(row["median_ms"] / masked["median_ms"], 2)
    return rows


def _worker_rows(cmd, env) -> list[dict]:
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    for line in proc.stdout.splitlines():
        if line.startswith("ROWS "):
            return json.loads(line[5:])
    raise RuntimeError(f"benchmark worker failed: {' '.join(cmd)}\n{proc.stdout[-2000:]}{proc.stderr[-4000:]}")


def _have_faiss() -> bool:
    import importlib.util

    return importlib.util.find_spec("faiss") is not None


COLUMNS = ("method", "n", "b", "k", "devices", "build_s", "compile_s", "median_ms", "min_ms", "vs_bare", "recall",
           "peak_rss_gb", "note")
RANK_COLUMNS = ("method", "c", "b", "s", "dtype", "compile_s", "median_ms", "min_ms", "vs_masked", "peak_rss_gb",
                "note")


def markdown_table(rows: list[dict], columns=COLUMNS) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        lines.append("| " + " | ".join(str(row.get(c, "")) for c in columns) + " |")
    return "\n".join(lines)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", choices=("all", "retrieval", "ranking"), default="all")
    parser.add_argument("--sizes", type=lambda s: [int(float(x)) for x in s.split(",")], default=None,
                        help="corpus sizes N, comma separated (default 1e6,1e7; --quick: 1e5)")
    parser.add_argument("--batches", type=lambda s: [int(x) for x in s.split(",")], default=[1, 16])
    parser.add_argument("--top-k", type=int, default=1000)
    parser.add_argument("--runs", type=int, default=None, help="timed calls per row (default 7; --quick 5)")
    parser.add_argument("--nprobe", type=lambda s: [int(x) for x in s.split(",")], default=[8, 32],
                        help="FAISS lists probed, one row set per value")
    parser.add_argument("--nlist", type=int, default=None, help="FAISS lists (default: index's sqrt(N) rule)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help=f"N = {QUICK_SIZE:,} only, finishes in < 1 minute")
    parser.add_argument("--rank-candidates", type=lambda s: [int(x) for x in s.split(",")], default=None,
                        help="ranking: candidates per user C (default 32,500,2000; --quick: 32,500)")
    parser.add_argument("--rank-batches", type=lambda s: [int(x) for x in s.split(",")], default=[1, 8])
    parser.add_argument("--history-len", type=int, default=128, help="ranking: history length S")
    parser.add_argument("--rank-dtype", default="bfloat16", choices=("bfloat16", "float32"),
                        help="ranking activations (the release's default is bfloat16)")
    # Internal: run one (method, N) in this process and print its rows.
    parser.add_argument("--rank-worker", choices=RANK_METHODS, help=argparse.SUPPRESS)
    parser.add_argument("--c", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--worker", choices=METHODS, help=argparse.SUPPRESS)
    parser.add_argument("--n", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--exact-file", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.sizes = args.sizes or ([QUICK_SIZE] if args.quick else list(DEFAULT_SIZES))
    args.runs = args.runs or (5 if args.quick else 7)
    args.rank_candidates = args.rank_candidates or ([32, 500] if args.quick else list(RANK_CANDIDATES))
    return args


def main(argv=None):
    args = parse_args(argv)
    if args.worker:
        print("ROWS " + json.dumps(run_worker(args)), flush=True)
        return
    if args.rank_worker:
        print("ROWS " + json.dumps(run_rank_worker(args)), flush=True)
        return
    retrieval = bench_retrieval(args) if args.only in ("all", "retrieval") else []
    ranking = bench_ranking(args) if args.only in ("all", "ranking") else []
    if ranking:
        print(f"## Ranking (S={args.history_len}, D=128, 2 layers; vs_masked = median / masked median)\n")
        print(markdown_table(ranking, RANK_COLUMNS) + "\n")
    if retrieval:
        print(f"## Retrieval top-{args.top_k}\n")
        print(markdown_table(retrieval) + "\n")
    print(json.dumps(retrieval + ranking))


if __name__ == "__main__":
    main()
