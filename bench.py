"""Phoenix benchmarks. Retrieval: exact top-k (bare matmul, CorpusIndex on 1 and 8 devices) and
FAISS IVF with its recall. Ranking: the masked full-sequence path vs the isolated path vs scoring
against a cached prefix, and the release's op-by-op (un-jitted) dispatch, for C in {32, 500, 2000},
B in {1, 8}, S = 128 on the release's demo model (D = 128, 2 layers, bfloat16 activations).

Command:
  uv run bench.py                   # N = 1M and 10M, B = 1 and 16, top-1000: 7-11 min on 2 busy CPU cores
  uv run bench.py --quick           # N = 100k, fewer runs: under a minute
  uv run bench.py --only retrieval --sizes 1000000 --batches 1,16 --top-k 1000
  uv run bench.py --profile         # C=500 ranking split into parts beside their FLOP floors: ~20 s
  uv run bench.py --device-suite --out suite --plot   # ranking + retrieval on the default JAX backend,
                                    # one process, one table (+ suite.md/.json/.png): ~80 s on 2 CPU cores
  uv run bench.py --device-suite --suite-serve ""     # ... plus the load test of scripts/bench_serve.py

The device suite also trains a ranker whose post table has N rows (each --suite-sizes N) with the
tables sharded over every device and replicated on each (docs/sharding.md): bytes of table and
table state per device, init seconds, a train step's median.

Ranking rows: "masked" is the release's model under jax.jit (the reference of vs_masked);
"isolated" is runner.rank with its default compute_dtype="auto" (float32 on CPU), and
"isolated_fprop" runner.rank in the model's own dtype. --out OUT also writes the table to OUT.md
and the rows to OUT.json; --plot adds OUT.png (latency vs C and vs N; needs matplotlib).

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
import random
import resource
import statistics
import subprocess
import sys
import tempfile
import time

from typing import Optional

import numpy as np

from phoenix_metrics import topk_recall  # NumPy only: importing it leaves XLA_FLAGS settable

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


def run_worker(args) -> list[dict]:
    """One method at one N, in this process; returns its rows (one per batch size)."""
    import jax

    import phoenix_index as index
    from phoenix_demos import time_calls

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
            recall = 1.0 if exact is None else topk_recall(indices, exact[f"b{batch}"])
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


RANK_METHODS = ("masked", "isolated", "isolated_fprop", "prefix_reuse", "release_eager")
RANK_CANDIDATES = (32, 500, 2000)
EAGER_MAX_C = 500  # op-by-op dispatch at C=2000 takes minutes per call; skipped there


def run_rank_worker(args) -> list[dict]:
    """One ranking method at one C, every B, in this process (its peak RSS is this method's)."""
    import jax

    from phoenix_demos import demo_ranker_config as demo_config, time_calls
    from runners import ACTIONS, ModelRunner, RecsysInferenceRunner, create_example_batch

    method, C, S = args.rank_worker, args.c, args.history_len
    cfg = demo_config(history_len=S, num_candidates=C)  # the release's demo model: D=128, 2 layers
    cfg.fprop_dtype = jax.numpy.dtype(args.rank_dtype)
    ranker = RecsysInferenceRunner(ModelRunner(cfg, rng_seed=args.seed),
                                   compute_dtype=None if method == "isolated_fprop" else "auto")
    ranker.initialize()
    release = jax.jit(ranker.runner.forward.apply)  # the release's masked model, compiled
    rows = []
    for B in args.rank_batches:
        batch, emb = create_example_batch(B, cfg.emb_size, S, C, len(ACTIONS), seed=args.seed)
        if method == "masked":
            fn = lambda: release(ranker.params, None, batch, emb).logits  # noqa: E731
        elif method in ("isolated", "isolated_fprop"):
            fn = lambda: ranker.rank(batch, emb).scores  # noqa: E731
        elif method == "prefix_reuse":  # user+history encoded once; a new candidate set scored against it
            prefix = ranker.encode_prefix(batch, emb)
            fn = lambda: ranker.score_candidates(prefix, batch, emb)  # noqa: E731
        else:  # the release's runner: the transformed model applied without jit, op by op
            fn = lambda: ranker.runner.forward.apply(ranker.params, None, batch, emb).logits  # noqa: E731
        runs = max(2, args.runs // 2) if method == "release_eager" else args.runs
        first, median, low = time_calls(fn, runs)
        dtype = args.rank_dtype if method in ("masked", "release_eager") else ranker.serving_dtype.name
        rows.append(dict(section="ranking", method=method, c=C, b=B, s=S, dtype=dtype,
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


# ---------------------------------------------------------------------------------------------
# Serving profile and the device suite: everything in one process, calls interleaved.


def interleaved_ms(fns: dict, rounds: int, seed: int = 0) -> dict:
    """{name: (median ms, min ms)}. Each round calls every fn once, each waited on, in an order
    shuffled per round: load from other processes then falls on all of them alike, and no fn
    always runs right after the same one (a call after a large one finds the caches cold:
    measured 17.5 vs 12.6 ms for C=2000 ranking from NumPy inputs in a fixed order after the
    release's 120 ms pass), so ratios stay comparable."""
    import jax

    for fn in fns.values():
        jax.block_until_ready(fn())  # compile outside the timings
    times = {name: [] for name in fns}
    order = list(fns)
    rng = random.Random(seed)
    for _ in range(rounds):
        rng.shuffle(order)
        for name in order:
            start = time.perf_counter()
            jax.block_until_ready(fns[name]())
            times[name].append(time.perf_counter() - start)
    return {name: (1e3 * statistics.median(t), 1e3 * min(t)) for name, t in times.items()}


PEAK_N = 1024  # the peak is measured on a PEAK_N^3 float32 matmul


def peak_macs_per_ms(rounds: int) -> float:
    """Multiply-adds per ms of a large float32 matmul under jit: this machine's practical peak."""
    import jax
    import jax.numpy as jnp

    x = jnp.ones((PEAK_N, PEAK_N), jnp.float32)
    matmul = jax.jit(lambda a: a @ a)
    _, best = interleaved_ms({"matmul": lambda: matmul(x)}, rounds)["matmul"]
    return PEAK_N**3 / best


# The profile's parts, in table order; `op_part` assigns each compiled operation to one of them.
PROFILE_PARTS = ("prefix inputs", "candidate projections", "attention projections", "attention", "ffn",
                 "norms, residuals", "output head")
PART_NOTES = {"attention projections": "fused Q/K/V, output projection; prefix and candidate rows",
              "attention": "rotary, logits vs the prefix, softmax, weighted values",
              "ffn": "prefix and candidate rows", "output head": "final norm, unembedding, sigmoid, ranking"}
# XLA CPU records one trace event per executed operation (thunk) only with this flag, which must be
# set before JAX starts: the profile runs in a worker process that sets it.
TRACE_FLAG = "--xla_cpu_enable_xprof_traceme=true"


def ranking_macs(cfg, B: int, S: int, C: int) -> dict:
    """Multiply-adds of each profile part as the one-pass isolated ranking computes them (the floor).

    One pass over T = 1+S+C rows: every layer projects Q/K/V of all T rows; layer 0's attention,
    output projection and FFN run on all rows (prefix rows against the P = 1+S prefix keys, causal
    but computed as a full [T, P] product), the last layer's on the C candidate rows only.
    """
    from grok import ffn_size

    t, hc = cfg.model, cfg.hash_config
    D, A, V = cfg.emb_size, cfg.num_actions, cfg.product_surface_vocab_size
    F = ffn_size(D, t.widening_factor)
    q, kv = t.num_q_heads * t.key_size, t.num_kv_heads * t.key_size
    P, T = 1 + S, 1 + S + C
    rows = [T] * (t.num_layers - 1) + [C]  # query rows per layer
    projections = sum(T * D * (q + 2 * kv) + R * q * D for R in rows)  # fused Q/K/V of all rows, output of R
    attention = sum(R * (2 * P * q + q) for R in rows)  # logits and weighted values vs P keys; +q: self logits
    # History: post and author blocks of proj_mat_3 per row; the action and surface blocks meet the
    # [A, D] action projection and the [V, D] table once, then A + V multiply-adds per row and output.
    return {"prefix inputs": B * (hc.num_user_hashes * D * D + S * ((hc.num_item_hashes + hc.num_author_hashes)
                                                                   * D * D + (A + V) * D)) + (A + V) * D * D,
            "candidate projections": B * C * ((hc.num_item_hashes + hc.num_author_hashes) * D * D + V * D) + V * D * D,
            "attention projections": B * projections,
            "attention": B * attention,
            "ffn": B * sum(R * 3 * D * F for R in rows),
            "norms, residuals": 0,
            "output head": B * C * D * A}


def op_part(op_name: str) -> str:
    """The profile part of a compiled operation, from the op_name JAX gives it (its trace path)."""
    if "_fast_candidate_inputs" in op_name or "].candidate_" in op_name:  # the latter: an input itself
        return "candidate projections"
    if "user_sequence" in op_name or "].user_" in op_name or "].history_" in op_name:
        return "prefix inputs"
    if op_name.endswith(("multi_head_attention/dot_general", "multi_head_attention/linear/dot_general")):
        return "attention projections"  # the fused Q/K/V matmul and the output projection
    if "multi_head_attention" in op_name:
        return "attention"  # rotary, logits against the prefix, softmax, weighted values
    if "decoder_layer" in op_name:
        return "norms, residuals" if "rms_norm" in op_name or op_name.endswith("/add") else "ffn"
    return "output head"  # final norm, unembedding, sigmoid, ranking; the rows' concatenation


def hlo_op_names(hlo_text: str) -> dict:
    """{instruction name: op_name} of an optimised HLO module's text. An instruction without metadata
    of its own (a fusion XLA made from several ops, or a dot it lost the name of) takes the first
    op_name inside its fused computation, else its first operand's."""
    import re

    first_in, current, own, calls, operands = {}, None, {}, {}, {}
    for line in hlo_text.splitlines():
        head = re.match(r"^(?:ENTRY )?%?([\w.\-]+) .*\{$", line)
        if head:
            current = head.group(1)
            continue
        inst = re.match(r"\s*(?:ROOT )?%([\w.\-]+) = [^(]*\(([^)]*)\)", line)
        if not inst:
            continue
        name = inst.group(1)
        op = re.search(r'op_name="([^"]+)"', line)
        own[name] = op.group(1) if op else None
        operands[name] = re.findall(r"%([\w.\-]+)", inst.group(2))
        called = re.search(r"calls=%([\w.\-]+)", line)
        if called:
            calls[name] = called.group(1)
        if op and current and current not in first_in:
            first_in[current] = op.group(1)

    def resolve(name, depth=0):
        found = own.get(name) or first_in.get(calls.get(name))
        if found or depth > 8:
            return found or ""
        return next((r for r in (resolve(o, depth + 1) for o in operands.get(name, [])) if r), "")

    return {name: resolve(name) for name in own}


def traced_part_ms(fn, hlo_text: str, calls: int) -> tuple[dict, float]:
    """({part: ms per call}, ms per call with any operation in flight) from a jax.profiler trace of
    `calls` calls of fn, by `op_part` of each executed operation's op_name.

    An operation is in flight from its trace event's start to the later of the event's end and
    its "end: <name>" mark: XLA CPU runs some operations (its matmuls) asynchronously, and their
    event ends when the work is handed to the thread pool, the mark when the executor takes the
    completion. Each stretch of time is shared equally among the operations in flight then, so
    the parts add up to the time during which any operation ran (gaps between them excluded).
    """
    import collections
    import glob
    import gzip

    import jax

    names = hlo_op_names(hlo_text)
    with tempfile.TemporaryDirectory() as trace_dir:
        with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
            for _ in range(calls):
                jax.block_until_ready(fn())
        found = glob.glob(os.path.join(trace_dir, "**", "perfetto_trace.json.gz"), recursive=True)
        events = json.load(gzip.open(found[0])) if found else {}
    events = events.get("traceEvents", []) if isinstance(events, dict) else events
    totals = in_flight_ms(events, names, calls)
    return {part: totals.get(part, 0.0) for part in PROFILE_PARTS}, sum(totals.values())


def in_flight_ms(events: list, names: dict, calls: int) -> dict:
    """{part: ms per call} from trace events: see `traced_part_ms`. events: Chrome-trace dicts
    (ph "X", name, ts and dur in us); names: {operation name: op_name} (`hlo_op_names`)."""
    import collections

    events = sorted((e for e in events if e.get("ph") == "X"), key=lambda e: e["ts"])
    spans, open_ops = [], collections.defaultdict(list)  # [start, end, part]; open spans by op name
    for event in events:
        name = event.get("name", "")
        if name in names:
            span = [event["ts"], event["ts"] + event["dur"], op_part(names[name])]
            spans.append(span)
            open_ops[name].append(span)
        elif name.startswith("end: ") and open_ops.get(name[5:]):
            span = open_ops[name[5:]].pop(0)
            span[1] = max(span[1], event["ts"])
    totals = collections.Counter()
    bounds = sorted({t for start, end, _ in spans for t in (start, end)})
    order = sorted(range(len(spans)), key=lambda i: spans[i][0])
    active, nxt = set(), 0
    for lo, hi in zip(bounds, bounds[1:]):
        while nxt < len(order) and spans[order[nxt]][0] <= lo:
            active.add(order[nxt])
            nxt += 1
        active = {i for i in active if spans[i][1] > lo}
        for i in active:
            totals[spans[i][2]] += (hi - lo) / len(active) / 1e3 / calls  # us -> ms per call
    return dict(totals)


def profile_ranking(C: int, S: int, B: int, rank_dtype: str, rounds: int, seed: int = 0) -> list[dict]:
    """C-candidate ranking: the compiled rank function's operations, traced, their time in flight
    summed by part (`traced_part_ms`), each beside its FLOP floor; the whole call, the host overhead
    and the release beside them.

    Parts (`op_part`): the user/history input projections (prefix inputs), the candidate input
    projection, attention (Q/K/V and output projections, rotary, attention to the prefix; prefix
    and candidate rows together, as one pass computes them), the feed-forward blocks, the layers'
    norms and residual adds, and the output head (final norm, unembedding, sigmoid, ranking).
    "rank, device inputs" times the whole compiled function; "host overhead" is runner.rank on
    NumPy inputs (checks, transfer, dispatch) minus that. The traced parts need TRACE_FLAG (set
    by the profile's worker process); without it they are absent.
    """
    import jax
    import jax.numpy as jnp

    from phoenix_demos import demo_ranker_config as demo_config
    from runners import ACTIONS, ModelRunner, RecsysInferenceRunner, create_example_batch

    cfg = demo_config(history_len=S, num_candidates=C, fprop_dtype=jnp.dtype(rank_dtype))
    ranker = RecsysInferenceRunner(ModelRunner(cfg, rng_seed=seed))
    ranker.initialize()
    dtype, params = ranker.serving_dtype, ranker.params
    batch, emb = create_example_batch(B, cfg.emb_size, S, C, len(ACTIONS), seed=seed)
    dev_batch, dev_emb = jax.device_put((batch, emb))
    release = jax.jit(ranker.runner.forward.apply)

    frozen = ranker._frozen_rank()  # what runner.rank calls: the parameters compiled in, where they fit

    def rank():
        if frozen is not None:
            return frozen(dev_batch, dev_emb)
        return ranker._rank(params, dev_batch, dev_emb, path="isolated")

    fns = {"rank, device inputs": rank,
           "runner.rank": lambda: ranker.rank(batch, emb),
           "release masked, jit": lambda: release(params, None, dev_batch, dev_emb).logits}
    timed = interleaved_ms(fns, rounds)
    parts, traced_total = {}, 0.0
    if TRACE_FLAG in os.environ.get("XLA_FLAGS", ""):  # per-operation events exist only with the flag
        lowered = (frozen.lower(dev_batch, dev_emb) if frozen is not None
                   else ranker._rank.lower(params, dev_batch, dev_emb, path="isolated"))
        hlo = lowered.compile().as_text()
        parts, traced_total = traced_part_ms(rank, hlo, max(rounds, 5))
    peak = peak_macs_per_ms(max(3, rounds // 3))
    macs = ranking_macs(cfg, B, S, C)
    on_host, on_device = timed.pop("runner.rank"), timed["rank, device inputs"]
    timed["host overhead"] = (on_host[0] - on_device[0], on_host[1] - on_device[1])
    base = dict(section="profile", c=C, b=B, s=S, peak_gflops=round(2 * peak / 1e6, 1))
    rows = []
    for part, ms in parts.items():
        row = dict(base, part=part, dtype=dtype.name, traced_ms=round(ms, 3),
                   share=round(ms / traced_total, 3) if traced_total else None,
                   note=PART_NOTES.get(part, ""))
        if macs[part]:
            row.update(mmacs=round(macs[part] / 1e6, 3), floor_ms=round(macs[part] / peak, 4),
                       x_floor=round(ms / (macs[part] / peak), 1))
        rows.append(row)
    if parts:
        rows.append(dict(base, part="traced total", dtype=dtype.name, traced_ms=round(traced_total, 3), share=1.0,
                         mmacs=round(sum(macs.values()) / 1e6, 3), floor_ms=round(sum(macs.values()) / peak, 4),
                         x_floor=round(traced_total / (sum(macs.values()) / peak), 1),
                         note="time with an operation in flight, shared among those in flight (no gaps)"))
    notes = {"rank, device inputs": "the compiled rank function, wall time per call",
             "host overhead": "runner.rank (NumPy inputs) minus the compiled rank",
             "release masked, jit": "the release's model, the reference"}
    for name, (median, low) in timed.items():
        row = dict(base, part=name, dtype=rank_dtype if name == "release masked, jit" else dtype.name,
                   median_ms=round(median, 3), min_ms=round(low, 3), note=notes[name])
        if name == "rank, device inputs":
            row.update(mmacs=round(sum(macs.values()) / 1e6, 3), floor_ms=round(sum(macs.values()) / peak, 4),
                       x_floor=round(low / (sum(macs.values()) / peak), 1))
        rows.append(row)
    return rows


def spawn_profile(args) -> list[dict]:
    """profile_ranking in a worker process with TRACE_FLAG set (it must precede JAX's start)."""
    env = dict(os.environ)
    env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " " + TRACE_FLAG).strip()
    cmd = [sys.executable, os.path.abspath(__file__), "--profile-worker", "--profile-c", str(args.profile_c),
           "--history-len", str(args.history_len), "--rank-batches", str(args.rank_batches[0]),
           "--rank-dtype", args.rank_dtype, "--runs", str(args.runs), "--seed", str(args.seed)]
    return _worker_rows(cmd, env)


SUITE_RANK = ((500, 1), (2000, 1), (500, 8))  # (C, B)
# A ranking case of the suite runs at least --runs rounds and as many more as fit in this many
# seconds (at most 10x --runs): a C=500 round takes ~25 ms on 2 CPU cores, and 20 of them gave
# medians 15-35% above the minima in this shared machine's noisy phases.
SUITE_RANK_SECONDS = 3.0
SUITE_SIZES_CPU, SUITE_SIZES_ACCELERATOR = (1_000_000,), (1_000_000, 10_000_000)
APPROX_RECALL_TARGET = 0.95  # lax.approx_max_k's recall target (exact on CPU, which has no approximate kernel)


def suite_rounds(fns: dict, runs: int) -> int:
    """Rounds for `interleaved_ms(fns, ...)`: runs, or more where a round is short (SUITE_RANK_SECONDS)."""
    import jax

    for fn in fns.values():
        jax.block_until_ready(fn())  # compiled before the round is timed
    start = time.perf_counter()
    for fn in fns.values():
        jax.block_until_ready(fn())
    return int(min(10 * runs, max(runs, SUITE_RANK_SECONDS / (time.perf_counter() - start))))


SHARDED_DIM = 64  # the sharded-table rows: post table N x 64 float32, as scripts/bench_sharded_tables.py
SHARDED_SMALL_TABLE = 1009  # rows of the user and author tables there
SHARDED_BATCH = 64  # users per train step there (a multiple of every device count up to 64)


def sharded_table_case(rows: int, dim: int, mode: str, steps: int, seed: int = 0) -> dict:
    """A ranking trainer whose post table has `rows` x `dim` float32 (user and author tables
    SHARDED_SMALL_TABLE rows), a one-layer model, row-wise Adagrad with lazy row updates, SHARDED_BATCH
    users per step, over every device: `mode` "sharded" (shard_tables=True: each device holds 1/n of
    every table) or "replicated" (data_parallel alone). -> bytes of tables and table state on device 0,
    init seconds, first step (compile + run) seconds, median and min of `steps` more steps in ms, the
    process's peak RSS, device 0's peak bytes in use where the backend reports it (GPU/TPU)."""
    import jax
    import jax.numpy as jnp

    import phoenix_training as training
    from grok import TransformerConfig
    from phoenix_inputs import HashConfig, create_example_batch
    from recsys_model import PhoenixModelConfig

    hashes = HashConfig(user_table_size=SHARDED_SMALL_TABLE, post_table_size=rows,
                        author_table_size=SHARDED_SMALL_TABLE)
    config = PhoenixModelConfig(model=TransformerConfig(emb_size=dim, key_size=16, num_q_heads=2, num_kv_heads=1,
                                                        num_layers=1, widening_factor=1.0),
                                emb_size=dim, num_actions=19, history_seq_len=8, candidate_seq_len=4,
                                hash_config=hashes, fprop_dtype=jnp.float32)
    optimizer = training.OptimizerConfig(table_optimizer="rowwise_adagrad", warmup_steps=1)
    trainer = training.make_ranking_trainer(config, hashes, optimizer, data_parallel=True,
                                            shard_tables=mode == "sharded")
    rng = np.random.default_rng(seed)

    def batch(i):
        b, _ = create_example_batch(SHARDED_BATCH, dim, 8, 4, 19, seed=seed + i)
        small = SHARDED_SMALL_TABLE - 1
        b = b._replace(user_hashes=np.minimum(b.user_hashes, small),
                       history_author_hashes=np.minimum(b.history_author_hashes, small),
                       candidate_author_hashes=np.minimum(b.candidate_author_hashes, small),
                       history_post_hashes=rng.integers(1, rows, b.history_post_hashes.shape).astype(np.int32),
                       candidate_post_hashes=rng.integers(1, rows, b.candidate_post_hashes.shape).astype(np.int32))
        return b, (rng.random((SHARDED_BATCH, 4, 19)) < 0.3).astype(np.float32)

    start = time.perf_counter()
    state = trainer.init(jax.random.PRNGKey(seed), batch(0)[0])
    jax.block_until_ready(state)
    init_s = time.perf_counter() - start
    device = jax.devices()[0]
    on_device = sum(s.data.nbytes for leaf in jax.tree.leaves((state.params["hash_embeddings"],
                                                               state.opt_state["tables"]))
                    for s in leaf.addressable_shards if s.device == device)
    batches = [batch(i) for i in range(steps + 1)]
    start = time.perf_counter()
    state, _ = trainer.step(state, *batches[0])
    jax.block_until_ready(state)
    first_s = time.perf_counter() - start
    times = []
    for b in batches[1:]:
        start = time.perf_counter()
        state, _ = trainer.step(state, *b)
        jax.block_until_ready(state)
        times.append(time.perf_counter() - start)
    memory = device.memory_stats() or {}
    return {"device_bytes": on_device, "init_s": init_s, "first_step_s": first_s,
            "step_ms": 1e3 * float(np.median(times)), "min_ms": 1e3 * float(np.min(times)),
            "traces": trainer.trace_counts["step"], "devices": jax.device_count(),
            "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20,
            "device_peak_gb": memory["peak_bytes_in_use"] / 2 ** 30 if "peak_bytes_in_use" in memory else None}


def device_suite(args) -> list[dict]:
    """Ranking and retrieval rows on the default JAX backend, in this process (< 5 min on a GPU).

    Ranking: the release's masked model under jax.jit vs runner.rank (compute_dtype "auto") and
    runner.rank in the model's own dtype. Retrieval: the bare jitted matmul + lax.top_k vs the
    exact CorpusIndex vs matmul + lax.approx_max_k, with recall against the exact result. Sharded
    tables: a ranker's train step with an N-row post table sharded vs replicated (sharded_table_case).
    """
    import jax
    import jax.numpy as jnp

    import phoenix_index as index
    from phoenix_demos import demo_ranker_config as demo_config
    from runners import ACTIONS, ModelRunner, RecsysInferenceRunner, create_example_batch

    backend = jax.default_backend()
    device = f"{backend}: {jax.devices()[0].device_kind} x{jax.device_count()}"
    rows = []
    for C, B in args.suite_rank:
        cfg = demo_config(history_len=args.history_len, num_candidates=C, fprop_dtype=jnp.dtype(args.rank_dtype))
        rankers = {}
        for name, compute in (("runner", "auto"), ("runner_fprop", None)):
            rankers[name] = RecsysInferenceRunner(ModelRunner(cfg, rng_seed=args.seed), compute_dtype=compute)
            rankers[name].initialize()
        params = rankers["runner"].params
        release = jax.jit(rankers["runner"].runner.forward.apply)
        batch, emb = create_example_batch(B, cfg.emb_size, args.history_len, C, len(ACTIONS), seed=args.seed)
        dev_batch, dev_emb = jax.device_put((batch, emb))
        # The runner from host (NumPy) inputs, which it checks and transfers, and from device-resident
        # ones, as the release's jitted model is given (and as a runner embedding its own tables gets).
        fns = {"release_masked_jit": lambda: release(params, None, dev_batch, dev_emb).logits,
               **{name: (lambda r=r: r.rank(batch, emb).scores) for name, r in rankers.items()},
               "runner_device_inputs": lambda: rankers["runner"].rank(dev_batch, dev_emb).scores}
        rounds = suite_rounds(fns, args.runs)
        timed = interleaved_ms(fns, rounds)
        for name, (median, low) in timed.items():
            serving = name in ("runner", "runner_device_inputs")  # compute_dtype "auto"
            dtype = rankers["runner"].serving_dtype.name if serving else args.rank_dtype
            rows.append(dict(section="suite_ranking", method=name, c=C, b=B, s=args.history_len, dtype=dtype,
                             median_ms=round(median, 3), min_ms=round(low, 3),
                             vs_release=round(median / timed["release_masked_jit"][0], 3), runs=rounds, device=device))
    k = args.top_k
    bare = jax.jit(lambda u, c: jax.lax.top_k(u @ c.T, k))
    approx = jax.jit(lambda u, c: jax.lax.approx_max_k(u @ c.T, k, recall_target=APPROX_RECALL_TARGET))
    for n in args.suite_sizes:
        corpus = jax.random.normal(jax.random.PRNGKey(args.seed), (n, DIM), jnp.float32)  # [N, D], built on device
        corpus = corpus / jnp.linalg.norm(corpus, axis=1, keepdims=True)
        exact_index = index.CorpusIndex(corpus)
        for B in args.batches:
            user = jax.random.normal(jax.random.PRNGKey(args.seed + B), (B, DIM), jnp.float32)
            user = user / jnp.linalg.norm(user, axis=1, keepdims=True)
            fns = {"bare_matmul_top_k": lambda: bare(user, corpus)[1],
                   "corpus_index": lambda: exact_index.search(user, k)[0],
                   "approx_max_k": lambda: approx(user, corpus)[1]}
            timed = interleaved_ms(fns, args.runs)
            exact = np.asarray(bare(user, corpus)[1])
            found = {"bare_matmul_top_k": exact, "corpus_index": np.asarray(exact_index.search(user, k)[0]),
                     "approx_max_k": np.asarray(approx(user, corpus)[1])}
            for name, (median, low) in timed.items():
                rows.append(dict(section="suite_retrieval", method=name, n=n, b=B, k=k, median_ms=round(median, 3),
                                 min_ms=round(low, 3), runs=args.runs,
                                 vs_bare=round(median / timed["bare_matmul_top_k"][0], 3),
                                 recall=round(topk_recall(found[name], exact), 4), device=device))
        del exact_index, corpus
    for n in args.suite_sizes:
        for mode in ("sharded", "replicated"):
            case = sharded_table_case(n, SHARDED_DIM, mode, args.runs, args.seed)
            rows.append(dict(section="suite_sharded", method=mode, n=n, d=SHARDED_DIM, devices=case["devices"],
                             table_mib_per_device=round(case["device_bytes"] / 2 ** 20, 2),
                             init_s=round(case["init_s"], 2), first_step_s=round(case["first_step_s"], 2),
                             median_ms=round(case["step_ms"], 3), min_ms=round(case["min_ms"], 3), runs=args.runs,
                             device_peak_gb=None if case["device_peak_gb"] is None else round(case["device_peak_gb"], 3),
                             device=device))
    return rows


PROFILE_COLUMNS = ("part", "c", "b", "s", "dtype", "traced_ms", "share", "median_ms", "min_ms", "mmacs", "floor_ms",
                   "x_floor", "note")
SUITE_RANK_COLUMNS = ("method", "c", "b", "s", "dtype", "median_ms", "min_ms", "vs_release", "runs", "device")
SUITE_RETRIEVAL_COLUMNS = ("method", "n", "b", "k", "median_ms", "min_ms", "vs_bare", "recall", "runs", "device")
SUITE_SHARDED_COLUMNS = ("method", "n", "d", "devices", "table_mib_per_device", "init_s", "first_step_s", "median_ms",
                         "min_ms", "runs", "device_peak_gb", "device")


def write_outputs(rows: list[dict], markdown: str, out: Optional[str], plot: bool) -> list[str]:
    """Writes OUT.md and OUT.json (and OUT.png with plot); returns the paths written."""
    if out is None:
        return []
    paths = [out + ".md", out + ".json"]
    with open(paths[0], "w") as f:
        f.write(markdown + "\n")
    with open(paths[1], "w") as f:
        json.dump(rows, f, indent=1)
    if plot:
        paths.append(plot_rows(rows, out + ".png"))
    return paths


def plot_rows(rows: list[dict], path: str) -> str:
    """PNG: ranking latency vs C (one line per method and B), retrieval latency vs N (per method and B)."""
    try:
        import matplotlib
    except ImportError:
        raise SystemExit("--plot needs matplotlib, an optional extra: uv sync --extra plot") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_rank, ax_ret) = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, x_key, sections, title in ((ax_rank, "c", ("ranking", "suite_ranking"), "ranking latency vs candidates C"),
                                       (ax_ret, "n", ("retrieval", "suite_retrieval"), "top-k latency vs corpus size N")):
        lines = {}
        for row in rows:
            if row.get("section") in sections and "median_ms" in row:
                lines.setdefault((row["method"], row["b"]), []).append((row[x_key], row["median_ms"]))
        for (method, b), points in sorted(lines.items()):
            points.sort()
            ax.plot(*zip(*points), marker="o", label=f"{method}, B={b}")
        ax.set(xscale="log", yscale="log", xlabel=x_key.upper(), ylabel="median ms", title=title)
        if lines:
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


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
                        help="ranking model's fprop_dtype (the release's default is bfloat16)")
    parser.add_argument("--profile", action="store_true",
                        help="profile ranking of --profile-c candidates (one process): parts vs FLOP floor")
    parser.add_argument("--profile-c", type=int, default=500, help="--profile: candidates C (B = first --rank-batches)")
    parser.add_argument("--device-suite", action="store_true",
                        help="ranking + retrieval rows on the default JAX backend, one process, one table")
    parser.add_argument("--suite-rank", type=lambda s: [tuple(int(v) for v in x.split("x")) for x in s.split(",")],
                        default=list(SUITE_RANK), help="--device-suite ranking cases CxB (default 500x1,2000x1,500x8)")
    parser.add_argument("--suite-sizes", type=lambda s: [int(float(x)) for x in s.split(",")], default=None,
                        help="--device-suite corpus sizes, and rows of the sharded-table rows' post table "
                             "(default 1e6 on CPU; 1e6,1e7 on an accelerator)")
    parser.add_argument("--suite-serve", default=None, metavar="FLAGS",
                        help="--device-suite: also run scripts/bench_serve.py FLAGS ('' for its defaults) and "
                             "append its table (served vs in-process latency and throughput)")
    parser.add_argument("--out", default=None, help="also write the table to OUT.md and the rows to OUT.json")
    parser.add_argument("--plot", action="store_true", help="with --out: OUT.png, latency vs C and vs N (matplotlib)")
    # Internal: run one (method, N) in this process and print its rows.
    parser.add_argument("--rank-worker", choices=RANK_METHODS, help=argparse.SUPPRESS)
    parser.add_argument("--profile-worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--c", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--worker", choices=METHODS, help=argparse.SUPPRESS)
    parser.add_argument("--n", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--exact-file", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.sizes = args.sizes or ([QUICK_SIZE] if args.quick else list(DEFAULT_SIZES))
    args.runs = args.runs or (5 if args.quick else 20 if args.device_suite or args.profile else 7)
    if args.plot and args.out is None:
        parser.error("--plot needs --out (the PNG is written to OUT.png)")
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
    if args.profile_worker:
        print("ROWS " + json.dumps(profile_ranking(args.profile_c, args.history_len, args.rank_batches[0],
                                                   args.rank_dtype, args.runs, args.seed)), flush=True)
        return
    load = "load average %.2f %.2f %.2f" % os.getloadavg()
    if args.profile:
        rows = spawn_profile(args)
        markdown = (f"## Ranking profile (C={args.profile_c}, S={args.history_len}, B={args.rank_batches[0]}; traced_ms: "
                    f"the compiled rank's operations per call, time in flight shared among them, by part "
                    f"(jax.profiler); floor = multiply-adds / measured f32 matmul peak {rows[0]['peak_gflops']} "
                    f"GFLOP/s; x_floor of traced_ms, or of min_ms for the whole call; {load})\n\n"
                    + markdown_table(rows, PROFILE_COLUMNS))
    elif args.device_suite:
        import jax

        if args.suite_sizes is None:
            args.suite_sizes = list(SUITE_SIZES_CPU if jax.default_backend() == "cpu" else SUITE_SIZES_ACCELERATOR)
        rows = device_suite(args)
        rank_rows = [r for r in rows if r["section"] == "suite_ranking"]
        markdown = (f"## Device suite ({rows[0]['device']}; medians of interleaved calls: ranking, runs per row; "
                    f"retrieval, {args.runs}; {load})\n\n"
                    + markdown_table(rank_rows, SUITE_RANK_COLUMNS) + "\n\n"
                    + markdown_table([r for r in rows if r["section"] == "suite_retrieval"], SUITE_RETRIEVAL_COLUMNS)
                    + f"\n\n## Sharded tables (a ranker's train step, post table N x {SHARDED_DIM}, row-wise Adagrad, "
                    f"{SHARDED_BATCH} users; docs/sharding.md)\n\n"
                    + markdown_table([r for r in rows if r["section"] == "suite_sharded"], SUITE_SHARDED_COLUMNS))
        if args.suite_serve is not None:  # the load test's rows (scripts/bench_serve.py) on this backend too
            served = subprocess.run([sys.executable, os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                                                  "scripts", "bench_serve.py"),
                                     *args.suite_serve.split()], check=True, capture_output=True, text=True)
            markdown += "\n\n## Served (scripts/bench_serve.py)\n\n" + served.stdout.strip()
    else:
        retrieval = bench_retrieval(args) if args.only in ("all", "retrieval") else []
        ranking = bench_ranking(args) if args.only in ("all", "ranking") else []
        rows, parts = retrieval + ranking, []
        if ranking:
            parts.append(f"## Ranking (S={args.history_len}, D=128, 2 layers; vs_masked = median / median of the "
                         f"release's masked model under jax.jit; {load})\n\n" + markdown_table(ranking, RANK_COLUMNS))
        if retrieval:
            parts.append(f"## Retrieval top-{args.top_k}\n\n" + markdown_table(retrieval))
        markdown = "\n\n".join(parts)
    print(markdown + "\n")
    print(json.dumps(rows))
    for path in write_outputs(rows, markdown, args.out, args.plot):
        print(f"wrote {path}", file=sys.stderr)


if __name__ == "__main__":
    main()
