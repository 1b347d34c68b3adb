"""Load test of phoenix-serve on 127.0.0.1: p50 / p99 latency and throughput for 1, 8 and 32
concurrent clients, against the in-process library on the same requests batched the same way.

    uv run python scripts/bench_serve.py                      # trains a MovieLens fixture run, then both models
    uv run python scripts/bench_serve.py --run DIR            # a run of run_train.py instead (trained there
                                                              # first, as the fixture, if DIR does not exist)
    uv run python scripts/bench_serve.py --run DIR --url http://127.0.0.1:8000   # a server already serving DIR
    uv run python scripts/bench_serve.py --skip-nano --requests 400 --out /tmp/bench_serve.json

Two servers, each a subprocess started as a user starts it (run_serve.py; the nano one through this
script's --serve-nano, which builds the model and calls phoenix_server.serve):
  movielens  the run (given, or trained here: `run_train.py --data movielens-100k` with the MovieLens
          recipe's geometry, four two-tower members and the ranker, but 0.05 of its epochs: a
          timing fixture): /rank (a user + 16 candidates) and /recommend (k = 10)
  nano    a ranker of the nano geometry (emb 512, 4 layers, 4 heads, history 1022, 64 candidates;
          random parameters: timing only) over 64 users with 1,100 interactions each: /rank with 64
          candidates. Bounded by --nano-requests (each call ranks 1,087 tokens through 4 layers).
Each client is a thread with one keep-alive HTTP connection sending its share of the requests one
after another. The in-process baseline runs the very requests in batches of min(clients,
--max-batch), through the function the server runs (phoenix_server.rank_logits / recommend_rows,
same padding buckets), with no HTTP, JSON or threads; its latency is its batch's time. Every served
answer is checked: /recommend equal to the baseline's (items, order, scores), /rank within atol 1e-5
(float32 logits computed in a differently padded batch). overhead = p50 served - p50 in-process at
1 client. CPU columns: the CPU time (user + system, all threads) per request of the server process,
of the clients (this process while it sends) and of the in-process baseline; the served throughput
on this machine's cores cannot pass cores / (server + client CPU per request). Prints a markdown
table (and the load average before and after); --out writes the rows as JSON. Runs on the default
JAX backend (a GPU when one is present): the same rows for the device suite.
"""

import argparse
import http.client
import json
import os
import resource
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

# The MovieLens recipe's geometry (phoenix_two_stage.MOVIELENS_RECIPE: D 64, 2 layers, S 5, C 8,
# four two-tower members, retrieve_k 100) at 0.05 of its epochs: a timing fixture, not its figures.
FIXTURE_FLAGS = ["--retrieval-epochs", "0.05", "--ranker-epochs", "0.05", "--evals-per-stage", "1"]
NANO = dict(emb_size=512, num_layers=4, num_heads=4, ranker_history_len=1022, candidates=64, users=64, items=4096,
            interactions=1100)
RUN_CANDIDATES = 16  # candidates of a /rank request to the run


# ---------------------------------------------------------------------------------------------
# Models
# ---------------------------------------------------------------------------------------------


def movielens_fixture(run: Path) -> Path:
    """Trains the MovieLens timing fixture (FIXTURE_FLAGS) into `run`."""
    start = time.perf_counter()
    subprocess.run([sys.executable, str(ROOT / "run_train.py"), "--data", "movielens-100k", "--checkpoint-dir",
                    str(run), *FIXTURE_FLAGS], check=True, cwd=ROOT, stdout=subprocess.DEVNULL)
    print(f"trained the MovieLens fixture in {time.perf_counter() - start:.0f} s", file=sys.stderr)
    return run


def nano_served(history_len: int, seed: int = 0, emb_size: int = NANO["emb_size"],
                num_layers: int = NANO["num_layers"]) -> ServedRun:
    """A ranker of the nano geometry (history, width and depth as given) with random parameters
    (seeded: the server and the baseline build the same one) over users with long integer-id
    histories; no retrieval stage."""
    import jax

    import phoenix_training as training
    recipe = two_stage.Recipe(emb_size=emb_size, num_layers=num_layers, num_heads=NANO["num_heads"],
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


def process_cpu(pid) -> float:
    """CPU seconds (user + system, all threads) process `pid` has used; 0.0 when unknown (None)."""
    if pid is None:
        return 0.0
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime


def own_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def serve_load(base: str, path: str, bodies: list, clients: int, server_pid=None) -> dict:
    """{answers, latencies s, wall s, server / client CPU s} of `bodies` sent by `clients` threads, one
    keep-alive connection each."""
    host, port = base.split("//")[1].split(":")
    answers, latencies = [None] * len(bodies), [0.0] * len(bodies)
    data = [json.dumps(body).encode() for body in bodies]

    def client(t: int):
        connection = http.client.HTTPConnection(host, int(port), timeout=600)
        for i in range(t, len(bodies), clients):
            start = time.perf_counter()
            connection.request("POST", path, data[i], {"Content-Type": "application/json"})
            response = connection.getresponse()
            payload = response.read()
            latencies[i] = time.perf_counter() - start
            if response.status != 200:
                raise RuntimeError(f"{path} {bodies[i]}: {response.status} {payload[:200]!r}")
            answers[i] = payload
        connection.close()

    server_cpu, client_cpu = process_cpu(server_pid), own_cpu()
    start = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        list(pool.map(client, range(clients)))
    wall = time.perf_counter() - start
    server_cpu, client_cpu = process_cpu(server_pid) - server_cpu, own_cpu() - client_cpu
    return {"answers": [json.loads(a) for a in answers], "latencies": latencies, "wall": wall,
            "server_cpu": server_cpu if server_pid is not None else None, "client_cpu": client_cpu}


def in_process_load(run_batch, payloads: list, batch: int) -> dict:
    """{answers, latencies s, wall s, CPU s} of `payloads` run `batch` at a time through run_batch."""
    answers, latencies = [], []
    cpu, start = own_cpu(), time.perf_counter()
    for i in range(0, len(payloads), batch):
        t = time.perf_counter()
        answers.extend(run_batch(payloads[i:i + batch]))
        latencies.extend([time.perf_counter() - t] * len(payloads[i:i + batch]))
    return {"answers": answers, "latencies": latencies, "wall": time.perf_counter() - start,
            "cpu": own_cpu() - cpu}


def row(model: str, endpoint: str, mode: str, clients: int, latencies: list, wall: float, cpu: dict) -> dict:
    ms = np.asarray(latencies) * 1e3
    return {"model": model, "endpoint": endpoint, "mode": mode, "clients": clients, "requests": len(latencies),
            "p50_ms": float(np.percentile(ms, 50)), "p99_ms": float(np.percentile(ms, 99)),
            "throughput_rps": len(latencies) / wall,
            **{f"{name}_cpu_ms": None if v is None else v * 1e3 / len(latencies) for name, v in cpu.items()}}


def bench_endpoint(model, endpoint, base, bodies, payloads, run_batch, check, clients_list, max_batch, count,
                   server_pid=None) -> list:
    rows = []
    for clients in clients_list:
        n = max(count, clients)
        got = serve_load(base, "/" + endpoint, bodies[:n], clients, server_pid)
        want = in_process_load(run_batch, payloads[:n], min(clients, max_batch))
        for g, w in zip(got["answers"], want["answers"]):
            check(g, w)
        rows += [row(model, endpoint, "served", clients, got["latencies"], got["wall"],
                     {"server": got["server_cpu"], "client": got["client_cpu"]}),
                 row(model, endpoint, "in-process", clients, want["latencies"], want["wall"],
                     {"in_process": want["cpu"]})]
        print(f"  {model} /{endpoint} x{clients}: served p50 {rows[-2]['p50_ms']:.2f} ms "
              f"{rows[-2]['throughput_rps']:.1f}/s; in-process p50 {rows[-1]['p50_ms']:.2f} ms "
              f"{rows[-1]['throughput_rps']:.1f}/s; {n} answers checked", file=sys.stderr)
    return rows


def check_rank(got: dict, want: np.ndarray) -> None:
    np.testing.assert_allclose(got["probabilities"], want, rtol=0, atol=1e-5)


def check_recommend(got: dict, want: tuple) -> None:
    items, scores = want
    assert got["items"] == items and got["scores"] == scores.tolist(), (got, want)


def rank_batch(served: ServedRun, max_rows: int):
    def run(payloads):
        rows, columns = zip(*payloads)
        return [phoenix_server._sigmoid(x) for x in phoenix_server.rank_logits(served, rows, list(columns),
                                                                              max_rows=max_rows)]
    return run


def recommend_batch(served: ServedRun):
    def run(payloads):
        rows, ks = zip(*payloads)
        return phoenix_server.recommend_rows(served, rows, ks)
    return run


def rank_requests(served: ServedRun, count: int, candidates: int, seed: int) -> tuple[list, list]:
    """(JSON bodies, in-process payloads) of `count` /rank requests: random users, random candidates."""
    rng = np.random.default_rng(seed)
    U, N = len(served.split.user_ids), len(served.split.item_ids)
    users = rng.integers(0, U, count)
    columns = [rng.integers(0, N, candidates) for _ in range(count)]
    bodies = [{"user": served.user_tokens([u])[0], "candidates": served.item_tokens(c)} for u, c in zip(users, columns)]
    return bodies, [(int(u), c.astype(np.int64)) for u, c in zip(users, columns)]


def recommend_requests(served: ServedRun, count: int, k: int, seed: int) -> tuple[list, list]:
    """(JSON bodies, in-process payloads) of `count` /recommend requests: random users, k items each."""
    users = np.random.default_rng(seed).integers(0, len(served.split.user_ids), count)
    return [{"user": served.user_tokens([u])[0], "k": k} for u in users], [(int(u), k) for u in users]


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
             "in-process p50 ms | in-process p99 ms | in-process req/s | overhead p50 ms | served / in-process | "
             "CPU ms/req: server | clients | in-process |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    by = {(r["model"], r["endpoint"], r["mode"], r["clients"]): r for r in rows}
    for (model, endpoint, mode, clients), r in by.items():
        if mode != "served":
            continue
        b, s = by[(model, endpoint, "in-process", clients)], ratio[(model, endpoint, clients)]
        overhead = "" if s["overhead_p50_ms"] is None else f"{s['overhead_p50_ms']:.2f}"
        server = "" if r["server_cpu_ms"] is None else f"{r['server_cpu_ms']:.2f}"
        lines.append(f"| {model} | /{endpoint} | {clients} | {r['requests']} | {r['p50_ms']:.2f} | {r['p99_ms']:.2f} | "
                     f"{r['throughput_rps']:.1f} | {b['p50_ms']:.2f} | {b['p99_ms']:.2f} | {b['throughput_rps']:.1f} | "
                     f"{overhead} | {s['throughput_ratio']:.2f} | {server} | {r['client_cpu_ms']:.2f} | "
                     f"{b['in_process_cpu_ms']:.2f} |")
    return "\n".join(lines)


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", help="run directory to serve (run_train.py); the MovieLens fixture is trained "
                        "there first if it does not exist (default: a temporary one)")
    parser.add_argument("--url", help="a server already serving --run (its --max-batch and --max-rank-rows given "
                        "here too); the script then starts and stops none for the run")
    parser.add_argument("--label", help="the run's rows' model name (default: movielens for the fixture, else "
                        "the run directory's name)")
    parser.add_argument("--requests", type=int, default=200, help="requests per client count, the run")
    parser.add_argument("--nano-requests", type=int, default=16,
                        help="requests per client count, nano model (at least the client count)")
    parser.add_argument("--nano-history", type=int, default=NANO["ranker_history_len"], help="nano history length")
    parser.add_argument("--nano-emb-size", type=int, default=NANO["emb_size"], help="nano width (tests: smaller)")
    parser.add_argument("--nano-layers", type=int, default=NANO["num_layers"], help="nano depth (tests: fewer)")
    parser.add_argument("--clients", default="1,8,32", help="concurrent clients (default: %(default)s)")
    parser.add_argument("--max-batch", type=int, default=32, help="the servers' --max-batch")
    parser.add_argument("--max-wait-ms", type=float, default=2.0, help="the servers' --max-wait-ms")
    parser.add_argument("--max-rank-rows", type=int, default=phoenix_server.ServerConfig.max_rank_rows,
                        help="the run's server's --max-rank-rows (default: %(default)s)")
    parser.add_argument("--run-endpoints", "--small-endpoints", default="rank,recommend",
                        help="the run's endpoints to load (default: %(default)s)")
    parser.add_argument("--skip-run", "--skip-small", action="store_true", help="bench the nano model alone")
    parser.add_argument("--skip-nano", action="store_true")
    parser.add_argument("--out", help="write the rows as JSON here")
    parser.add_argument("--serve-nano", action="store_true", help=argparse.SUPPRESS)  # the nano server process
    parser.add_argument("--nano-max-rank-rows", type=int, default=4,
                        help="the nano server's --max-rank-rows: its largest padding bucket (default: %(default)s)")
    return parser.parse_args(argv)


def bench_run(args, run_path: Path, clients_list: list, server_flags: list, served=None) -> list:
    """The run's rows: its server (started here unless --url) under load, against the library
    (`served`: the run already loaded, else loaded here)."""
    served = pipeline.load_run(run_path) if served is None else served
    label = args.label or ("movielens" if not args.run else run_path.name)
    process, base = (None, args.url) if args.url else start_server(
        [sys.executable, str(ROOT / "run_serve.py"), "--run", str(run_path), "--port", "0", *server_flags,
         "--max-rank-rows", str(args.max_rank_rows)])[:2]
    rows = []
    try:
        count = max(args.requests, max(clients_list))
        phoenix_server.warm_up(served, phoenix_server.ServerConfig(max_rank_rows=args.max_rank_rows))
        pid = None if process is None else process.pid
        endpoints = args.run_endpoints.split(",")
        if "rank" in endpoints:
            bodies, payloads = rank_requests(served, count, RUN_CANDIDATES, seed=1)
            rows += bench_endpoint(label, "rank", base, bodies, payloads, rank_batch(served, args.max_rank_rows),
                                   check_rank, clients_list, args.max_batch, args.requests, pid)
        if "recommend" in endpoints:
            bodies, payloads = recommend_requests(served, count, 10, seed=2)
            rows += bench_endpoint(label, "recommend", base, bodies, payloads, recommend_batch(served),
                                   check_recommend, clients_list, args.max_batch, args.requests, pid)
    finally:
        if process is not None:
            stop_server(process)
    return rows


def nano_geometry(args) -> tuple:
    return args.nano_history, 0, args.nano_emb_size, args.nano_layers


def bench_nano(args, clients_list: list, server_flags: list) -> list:
    served = nano_served(*nano_geometry(args))
    process, base, _ = start_server([sys.executable, str(Path(__file__).resolve()), "--serve-nano",
                                     "--nano-history", str(args.nano_history), "--nano-emb-size",
                                     str(args.nano_emb_size), "--nano-layers", str(args.nano_layers),
                                     "--nano-max-rank-rows", str(args.nano_max_rank_rows), *server_flags])
    try:
        count = max(args.nano_requests, max(clients_list))
        bodies, payloads = rank_requests(served, count, NANO["candidates"], seed=3)
        phoenix_server.warm_up(served, phoenix_server.ServerConfig(max_rank_rows=args.nano_max_rank_rows,
                                                                   recommend=False))
        return bench_endpoint("nano", "rank", base, bodies, payloads, rank_batch(served, args.nano_max_rank_rows),
                              check_rank, clients_list, args.max_batch, args.nano_requests, process.pid)
    finally:
        stop_server(process)


def main(argv=None, served=None) -> list:
    """The rows of the command line `argv`; `served`: --run already loaded (phoenix_pipeline.load_run),
    its compilations reused for the in-process baseline."""
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if args.serve_nano:
        config = phoenix_server.ServerConfig(max_batch=args.max_batch, max_wait_ms=args.max_wait_ms,
                                             max_rank_rows=args.nano_max_rank_rows, recommend=False)
        sys.exit(phoenix_server.serve(nano_served(*nano_geometry(args)), "127.0.0.1", 0, config,
                                      log=lambda m: print(m, flush=True)))
    clients_list = [int(c) for c in args.clients.split(",")]
    load_before = os.getloadavg()
    rows = []
    server_flags = ["--max-batch", str(args.max_batch), "--max-wait-ms", str(args.max_wait_ms)]
    with tempfile.TemporaryDirectory() as tmp:
        if not args.skip_run:
            run_path = Path(args.run) if args.run else Path(tmp) / "run"
            if not run_path.exists():
                movielens_fixture(run_path)
            rows += bench_run(args, run_path, clients_list, server_flags, served)
        if not args.skip_nano:
            rows += bench_nano(args, clients_list, server_flags)
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
