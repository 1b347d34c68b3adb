"""Load test of phoenix-serve on 127.0.0.1: p50 / p99 latency and throughput for 1, 8 and 32
concurrent clients, against the in-process library on the same requests batched the same way.

    uv run python scripts/bench_serve.py                      # trains a small run (~1 min), then both models
    uv run python scripts/bench_serve.py --run DIR            # a run of run_train.py --data LOG instead
                                                              # (trained there first if DIR does not exist)
    uv run python scripts/bench_serve.py --skip-nano --requests 400 --out /tmp/bench_serve.json

Two servers, each a subprocess started as a user starts it (run_serve.py; the nano one through this
script's --serve-nano, which builds the model and calls phoenix_server.serve):
  small   the run (given, or trained here on a log of 300 users x 400 items with a tiny recipe):
          /rank (a user + 16 candidates) and /recommend (k = 10)
  nano    a ranker of the nano geometry (emb 512, 4 layers, 4 heads, history 1022, 64 candidates;
          random parameters: timing only) over 64 users with 1,100 interactions each: /rank with 64
          candidates. Bounded by --nano-requests (each call ranks 1,087 tokens through 4 layers).
Each client is a thread with one keep-alive HTTP connection sending its share of the requests one
after another. The in-process baseline runs the very requests in batches of min(clients,
--max-batch), through the function the server runs (phoenix_server.rank_logits / recommend_rows,
same padding buckets), with no HTTP, JSON or threads; its latency is its batch's time. Every served
answer is checked: /recommend equal to the baseline's (items, order, scores), /rank within atol 1e-5
(float32 logits computed in a differently padded batch). overhead = p50 served - p50 in-process at
1 client. Prints a markdown table (and the load average before and after); --out writes the rows
as JSON. Runs on the default JAX backend (a GPU when one is present): the same rows for the device suite.
"""

import argparse
import csv
import http.client
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import phoenix_pipeline as pipeline  # noqa: E402
import phoenix_server  # noqa: E402
import phoenix_split  # noqa: E402
import phoenix_two_stage as two_stage  # noqa: E402
from phoenix_serving import ServedRun  # noqa: E402

SMALL_RECIPE = ["--emb-size", "32", "--num-layers", "2", "--history-len", "8", "--ranker-history-len", "8",
                "--retrieval-epochs", "1", "--ranker-epochs", "0.5", "--evals-per-stage", "1", "--hard-negatives", "6",
                "--random-negatives", "1", "--retrieval-weight", "0.5", "--popularity-weight", "0.1"]
NANO = dict(emb_size=512, num_layers=4, num_heads=4, ranker_history_len=1022, candidates=64, users=64, items=4096,
            interactions=1100)
SMALL_CANDIDATES = 16


# ---------------------------------------------------------------------------------------------
# Models
# ---------------------------------------------------------------------------------------------


def write_log(path: Path, users: int = 300, items: int = 400, seed: int = 0) -> None:
    """A log of string ids: each user walks 12-30 items of one of 10 item groups."""
    rng = np.random.default_rng(seed)
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["user_id", "item_id", "timestamp", "rating", "author_id"])
        for u in range(users):
            group = rng.integers(10)
            walk = rng.choice(np.arange(group, items, 10), size=int(rng.integers(12, 31)), replace=False)
            for t, item in enumerate(walk):
                writer.writerow([f"u{u}", f"i{item}", 1000 + t, int(rng.integers(1, 6)), f"a{item % 13}"])


def small_run(tmp: Path, run: Path) -> Path:
    """Trains the small run into `run` on a log written into `tmp`."""
    write_log(tmp / "log.csv")
    start = time.perf_counter()
    subprocess.run([sys.executable, str(ROOT / "run_train.py"), "--data", str(tmp / "log.csv"), "--checkpoint-dir",
                    str(run), *SMALL_RECIPE], check=True, cwd=tmp, stdout=subprocess.DEVNULL)
    print(f"trained the small run in {time.perf_counter() - start:.0f} s", file=sys.stderr)
    return run


def nano_served(history_len: int, seed: int = 0) -> ServedRun:
    """A ranker of the nano geometry with random parameters (seeded: the server and the baseline
    build the same one) over users with long integer-id histories; no retrieval stage."""
    import jax

    import phoenix_training as training
    recipe = two_stage.Recipe(emb_size=NANO["emb_size"], num_layers=NANO["num_layers"], num_heads=NANO["num_heads"],
                              ranker_history_len=history_len, hard_negatives=NANO["candidates"] - 1,
                              random_negatives=0, retrieve_k=NANO["candidates"], user_table_size=4096,
                              post_table_size=8192, author_table_size=1024, retrieval_weight=0.0,
                              popularity_weight=0.0)
    U, N, L = NANO["users"], NANO["items"], NANO["interactions"]
    rng = np.random.default_rng(seed)
    columns = rng.integers(0, N, U * L)  # [R]
    item_ids = np.arange(N, dtype=np.int64)
    split = phoenix_split.Split(user_ids=np.arange(U, dtype=np.int64), offsets=np.arange(U + 1, dtype=np.int64) * L,
                                items=item_ids[columns], ratings=np.zeros(U * L, np.float32),
                                timestamps=np.zeros(U * L, np.int64), item_columns=columns,
                                train_len=np.full(U, L), has_eval=np.zeros(U, bool), item_ids=item_ids,
                                item_authors=item_ids % 251, actions=rng.random((U * L, 19)) < 0.1)
    ranker = training.make_ranking_trainer(two_stage.ranker_config(recipe), two_stage.hash_config(recipe))
    rows = np.arange(1)
    examples = phoenix_split.histories(split, rows, split.offsets[rows + 1], history_len)
    batch = phoenix_split.phoenix_batch(split, examples, ranker.hash_config, item_ids[:NANO["candidates"]][None])
    params = ranker.forward.init(jax.random.PRNGKey(seed), batch)
    return ServedRun(recipe=recipe, retrieval=None, retrieval_params=None, ranker=ranker, ranker_params=params,
                     retrieval_weight=0.0, popularity_weight=0.0, popularity=np.zeros(N, np.int64), split=split,
                     names={}, info={"source": "nano geometry, random parameters"})


# ---------------------------------------------------------------------------------------------
# Load
# ---------------------------------------------------------------------------------------------


def start_server(cmd: list) -> tuple[subprocess.Popen, str, list]:
    process = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT)
    lines = []
    for line in process.stdout:
        lines.append(line)
        print("  server: " + line.rstrip(), file=sys.stderr)
        if line.startswith("serving "):
            threading.Thread(target=lambda: lines.extend(process.stdout), daemon=True).start()
            return process, line.split(" on ")[1].split()[0], lines
    raise SystemExit("the server stopped before serving:\n" + "".join(lines))


def stop_server(process: subprocess.Popen) -> None:
    process.terminate()
    code = process.wait(timeout=120)
    if code != 0:
        raise SystemExit(f"the server exited with status {code} on SIGTERM")


def serve_load(base: str, path: str, bodies: list, clients: int) -> tuple[list, list, float]:
    """(answers, latencies s, wall s) of `bodies` sent by `clients` threads, one keep-alive connection each."""
    host, port = base.split("//")[1].split(":")
    answers, latencies = [None] * len(bodies), [0.0] * len(bodies)

    def client(t: int):
        connection = http.client.HTTPConnection(host, int(port), timeout=600)
        for i in range(t, len(bodies), clients):
            data = json.dumps(bodies[i]).encode()
            start = time.perf_counter()
            connection.request("POST", path, data, {"Content-Type": "application/json"})
            response = connection.getresponse()
            payload = response.read()
            latencies[i] = time.perf_counter() - start
            if response.status != 200:
                raise RuntimeError(f"{path} {bodies[i]}: {response.status} {payload[:200]!r}")
            answers[i] = json.loads(payload)
        connection.close()

    start = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        list(pool.map(client, range(clients)))
    return answers, latencies, time.perf_counter() - start


def in_process_load(run_batch, payloads: list, batch: int) -> tuple[list, list, float]:
    """(answers, latencies s, wall s) of `payloads` run `batch` at a time through run_batch."""
    answers, latencies = [], []
    start = time.perf_counter()
    for i in range(0, len(payloads), batch):
        t = time.perf_counter()
        answers.extend(run_batch(payloads[i:i + batch]))
        latencies.extend([time.perf_counter() - t] * len(payloads[i:i + batch]))
    return answers, latencies, time.perf_counter() - start


def row(model: str, endpoint: str, mode: str, clients: int, latencies: list, wall: float) -> dict:
    ms = np.asarray(latencies) * 1e3
    return {"model": model, "endpoint": endpoint, "mode": mode, "clients": clients, "requests": len(latencies),
            "p50_ms": float(np.percentile(ms, 50)), "p99_ms": float(np.percentile(ms, 99)),
            "throughput_rps": len(latencies) / wall}


def bench_endpoint(model, endpoint, base, served, bodies, payloads, run_batch, check, clients_list, max_batch,
                   count) -> list:
    rows = []
    for clients in clients_list:
        n = max(count, clients)
        got, lat, wall = serve_load(base, "/" + endpoint, bodies[:n], clients)
        want, base_lat, base_wall = in_process_load(run_batch, payloads[:n], min(clients, max_batch))
        for g, w in zip(got, want):
            check(g, w)
        rows += [row(model, endpoint, "served", clients, lat, wall),
                 row(model, endpoint, "in-process", clients, base_lat, base_wall)]
        print(f"  {model} /{endpoint} x{clients}: served p50 {rows[-2]['p50_ms']:.2f} ms "
              f"{rows[-2]['throughput_rps']:.1f}/s; in-process p50 {rows[-1]['p50_ms']:.2f} ms "
              f"{rows[-1]['throughput_rps']:.1f}/s; {n} answers checked", file=sys.stderr)
    return rows


def check_rank(got: dict, want: np.ndarray) -> None:
    np.testing.assert_allclose(got["probabilities"], want, rtol=0, atol=1e-5)


def check_recommend(got: dict, want: list) -> None:
    assert got["items"] == [item for item, _ in want] and got["scores"] == [s for _, s in want], (got, want)


def rank_batch(served: ServedRun, max_rows: int):
    def run(payloads):
        rows, columns = zip(*payloads)
        return [phoenix_server._sigmoid(x) for x in phoenix_server.rank_logits(served, rows, list(columns),
                                                                              max_rows=max_rows)]
    return run


def rank_requests(served: ServedRun, count: int, candidates: int, seed: int) -> tuple[list, list]:
    """(JSON bodies, in-process payloads) of `count` /rank requests: random users, random candidates."""
    rng = np.random.default_rng(seed)
    U, N = len(served.split.user_ids), len(served.split.item_ids)
    users = rng.integers(0, U, count)
    columns = [rng.integers(0, N, candidates) for _ in range(count)]
    bodies = [{"user": served.user_tokens([u])[0], "candidates": served.item_tokens(c)} for u, c in zip(users, columns)]
    return bodies, [(int(u), c.astype(np.int64)) for u, c in zip(users, columns)]


def summary(rows: list) -> list:
    """Overhead at 1 client and throughput ratio per (model, endpoint, clients)."""
    out = []
    by = {(r["model"], r["endpoint"], r["mode"], r["clients"]): r for r in rows}
    for (model, endpoint, mode, clients), r in by.items():
        if mode != "served":
            continue
        base = by[(model, endpoint, "in-process", clients)]
        out.append({"model": model, "endpoint": endpoint, "clients": clients,
                    "overhead_p50_ms": r["p50_ms"] - base["p50_ms"] if clients == 1 else None,
                    "throughput_ratio": r["throughput_rps"] / base["throughput_rps"]})
    return out


def markdown(rows: list) -> str:
    ratio = {(s["model"], s["endpoint"], s["clients"]): s for s in summary(rows)}
    lines = ["| model | endpoint | clients | requests | served p50 ms | served p99 ms | served req/s | "
             "in-process p50 ms | in-process p99 ms | in-process req/s | overhead p50 ms | served / in-process |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    by = {(r["model"], r["endpoint"], r["mode"], r["clients"]): r for r in rows}
    for (model, endpoint, mode, clients), r in by.items():
        if mode != "served":
            continue
        b, s = by[(model, endpoint, "in-process", clients)], ratio[(model, endpoint, clients)]
        overhead = "" if s["overhead_p50_ms"] is None else f"{s['overhead_p50_ms']:.2f}"
        lines.append(f"| {model} | /{endpoint} | {clients} | {r['requests']} | {r['p50_ms']:.2f} | {r['p99_ms']:.2f} | "
                     f"{r['throughput_rps']:.1f} | {b['p50_ms']:.2f} | {b['p99_ms']:.2f} | {b['throughput_rps']:.1f} | "
                     f"{overhead} | {s['throughput_ratio']:.2f} |")
    return "\n".join(lines)


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", help="run directory to serve as the small model; trained there first (on this "
                        "script's log and recipe) if it does not exist (default: a temporary one)")
    parser.add_argument("--requests", type=int, default=200, help="requests per client count, small model")
    parser.add_argument("--nano-requests", type=int, default=16,
                        help="requests per client count, nano model (at least the client count)")
    parser.add_argument("--nano-history", type=int, default=NANO["ranker_history_len"], help="nano history length")
    parser.add_argument("--clients", default="1,8,32", help="concurrent clients (default: %(default)s)")
    parser.add_argument("--max-batch", type=int, default=32, help="the server's --max-batch")
    parser.add_argument("--max-wait-ms", type=float, default=2.0, help="the server's --max-wait-ms")
    parser.add_argument("--small-endpoints", default="rank,recommend",
                        help="the small model's endpoints to load (default: %(default)s)")
    parser.add_argument("--skip-small", action="store_true")
    parser.add_argument("--skip-nano", action="store_true")
    parser.add_argument("--out", help="write the rows as JSON here")
    parser.add_argument("--serve-nano", action="store_true", help=argparse.SUPPRESS)  # the nano server process
    parser.add_argument("--nano-max-rank-rows", type=int, default=4,
                        help="the nano server's --max-rank-rows: its largest padding bucket (default: %(default)s)")
    return parser.parse_args(argv)


def main(argv=None) -> list:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if args.serve_nano:
        config = phoenix_server.ServerConfig(max_batch=args.max_batch, max_wait_ms=args.max_wait_ms,
                                             max_rank_rows=args.nano_max_rank_rows, recommend=False)
        sys.exit(phoenix_server.serve(nano_served(args.nano_history), "127.0.0.1", 0, config,
                                      log=lambda m: print(m, flush=True)))
    clients_list = [int(c) for c in args.clients.split(",")]
    load_before = os.getloadavg()
    rows = []
    server_flags = ["--max-batch", str(args.max_batch), "--max-wait-ms", str(args.max_wait_ms)]
    with tempfile.TemporaryDirectory() as tmp:
        if not args.skip_small:
            run_path = Path(args.run) if args.run else Path(tmp) / "run"
            if not run_path.exists():
                small_run(Path(tmp), run_path)
            served = pipeline.load_run(run_path)
            process, base, _ = start_server([sys.executable, str(ROOT / "run_serve.py"), "--run", str(run_path),
                                             "--port", "0", *server_flags])
            try:
                count = max(args.requests, max(clients_list))
                bodies, payloads = rank_requests(served, count, SMALL_CANDIDATES, seed=1)
                max_rows = phoenix_server.ServerConfig().max_rank_rows
                phoenix_server.warm_up(served, phoenix_server.ServerConfig(max_rank_rows=max_rows))
                if "rank" in args.small_endpoints.split(","):
                    rows += bench_endpoint("small", "rank", base, served, bodies, payloads,
                                           rank_batch(served, max_rows), check_rank, clients_list, args.max_batch,
                                           args.requests)
                if "recommend" in args.small_endpoints.split(","):
                    users = np.random.default_rng(2).integers(0, len(served.split.user_ids), count)
                    bodies = [{"user": served.user_tokens([u])[0], "k": 10} for u in users]
                    payloads = [(int(u), 10) for u in users]

                    def recommend_batch(batch):
                        rows_, ks = zip(*batch)
                        return phoenix_server.recommend_rows(served, rows_, ks)
                    rows += bench_endpoint("small", "recommend", base, served, bodies, payloads, recommend_batch,
                                           check_recommend, clients_list, args.max_batch, args.requests)
            finally:
                stop_server(process)
        if not args.skip_nano:
            served = nano_served(args.nano_history)
            process, base, _ = start_server([sys.executable, str(Path(__file__).resolve()), "--serve-nano",
                                             "--nano-history", str(args.nano_history), "--nano-max-rank-rows",
                                             str(args.nano_max_rank_rows), *server_flags])
            try:
                count = max(args.nano_requests, max(clients_list))
                bodies, payloads = rank_requests(served, count, NANO["candidates"], seed=3)
                phoenix_server.warm_up(served, phoenix_server.ServerConfig(max_rank_rows=args.nano_max_rank_rows,
                                                                           recommend=False))
                rows += bench_endpoint("nano", "rank", base, served, bodies, payloads,
                                       rank_batch(served, args.nano_max_rank_rows), check_rank, clients_list,
                                       args.max_batch, args.nano_requests)
            finally:
                stop_server(process)
    load_after = os.getloadavg()
    import jax
    print(markdown(rows))
    print(f"\nload average {load_before[0]:.2f} before, {load_after[0]:.2f} after; JAX backend "
          f"{jax.default_backend()}; max batch {args.max_batch}, max wait {args.max_wait_ms} ms")
    if args.out:
        Path(args.out).write_text(json.dumps({"rows": rows, "summary": summary(rows), "load_before": load_before,
                                              "load_after": load_after, "backend": jax.default_backend()},
                                             indent=1))
    return rows


if __name__ == "__main__":
    main()
