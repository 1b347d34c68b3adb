"""phoenix_server.py and run_serve.py: the server answers what the in-process library answers, refuses
bad input with a 4xx naming the field, batches concurrent requests, and stops cleanly.

The server runs in a subprocess (`run_serve.py --run DIR --port P`, as a user starts it) on the tiny
run of test_phoenix_serving (`trained`, once for this module and test_phoenix_export: `tiny_run`).
/recommend answers are compared for equality with phoenix_pipeline.recommend (items, order and
scores: JSON carries a float64 exactly; a user's answer does not depend on its batch,
phoenix_serving.top_items); /rank probabilities with phoenix_server.rank at atol 1e-6 (float32
logits of a different padded batch shape).
"""

import asyncio
import fcntl
import importlib.util
import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

import phoenix_pipeline as pipeline
import phoenix_server
import test_phoenix_serving

REPO = Path(__file__).resolve().parent


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> Path:
    """The directory holding test_phoenix_serving's tiny run (`trained`: run/, top.csv), trained once
    per test session for this module and test_phoenix_export, which imports this fixture: a module
    finds it through a file in the session's temporary directory, which xdist's workers share (they
    take turns under a lock, the first trains)."""
    base = tmp_path_factory.getbasetemp()
    root = base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base  # this session's, every worker's
    with open(root / "phoenix_server_tiny_run.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        where = root / "phoenix_server_tiny_run.txt"
        if not where.exists():
            tmp, _ = test_phoenix_serving.trained.__wrapped__(tmp_path_factory)
            where.write_text(str(tmp))
        return Path(where.read_text())


def call(base: str, path: str, body=None, raw: bytes = None, method=None) -> tuple[int, dict]:
    """(status, JSON answer) of one request; body: a JSON value, raw: bytes sent as they are."""
    data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
    request = urllib.request.Request(base + path, data=data, method=method)
    try:
        with urllib.request.urlopen(request, timeout=60) as answer:
            return answer.status, json.loads(answer.read())
    except urllib.error.HTTPError as e:
        text = e.read()
        try:
            return e.code, json.loads(text)
        except json.JSONDecodeError:
            return e.code, {"text": text.decode()}


@pytest.fixture(scope="module")
def server(tiny_run):
    """(process, base URL, served run in this process) of `run_serve.py --run DIR` on a free port."""
    tmp = tiny_run
    process = subprocess.Popen([sys.executable, str(REPO / "run_serve.py"), "--run", str(tmp / "run"), "--port", "0",
                                "--max-rank-rows", "16"], stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True, cwd=tmp,
                               env={**os.environ, "PYTHONPATH": str(REPO)})
    lines = []
    deadline = time.monotonic() + 300
    for line in process.stdout:  # compile, then "serving ... on http://..."
        lines.append(line)
        if line.startswith("serving ") or time.monotonic() > deadline:
            break
    assert process.poll() is None, "".join(lines) + process.stdout.read()
    threading.Thread(target=lambda: lines.extend(process.stdout), daemon=True).start()
    base = lines[-1].split(" on ")[1].split()[0]  # http://127.0.0.1:PORT, the port the OS chose
    yield process, base, pipeline.load_run(tmp / "run"), lines
    if process.poll() is None:
        process.kill()
        process.wait()


def test_recommend_equals_the_library_for_every_user(server):
    """Every user of the run, 8 clients at once (so batches hold several users), several k."""
    _, base, run, _ = server
    users = run.user_tokens(np.arange(len(run.split.user_ids)))
    asks = [(user, k) for user in users for k in (1, 10)]
    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda ask: call(base, "/recommend", {"user": ask[0], "k": ask[1]}), asks))
    for (user, k), (status, answer) in zip(asks, answers):
        assert status == 200, answer
        want = pipeline.recommend(run, user, k)
        assert answer["user"] == user
        assert answer["items"] == [item for item, _ in want]
        assert answer["scores"] == [score for _, score in want]  # bit for bit


def test_rank_equals_the_library(server):
    _, base, run, _ = server
    rng = np.random.default_rng(0)
    users = run.user_tokens(np.arange(len(run.split.user_ids)))
    asks = [(users[i], run.item_tokens(rng.integers(0, len(run.split.item_ids), n)))
            for i, n in zip(range(len(users)), [1, 3, 4, 5, 9, 12] * 5)]
    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda ask: call(base, "/rank", {"user": ask[0], "candidates": ask[1]}), asks))
    for (user, items), (status, answer) in zip(asks, answers):
        assert status == 200, answer
        assert answer["candidates"] == items and len(answer["actions"]) == 19
        np.testing.assert_allclose(answer["probabilities"], phoenix_server.rank(run, user, items), rtol=0, atol=1e-6)


def test_health_and_version(server):
    _, base, run, _ = server
    assert call(base, "/health") == (200, {"status": "ok"})
    status, version = call(base, "/version")
    assert status == 200 and version["items"] == len(run.split.item_ids) and version["recipe"]["retrieve_k"] == 12


HOSTILE = [  # (path, body (JSON value) or raw bytes, status, what the error must say)
    ("/recommend", {"user": "nobody", "k": 3}, 400, "user: expected a user of the run's log"),
    ("/recommend", {"user": "u00", "k": 13}, 400, "k: expected an int in [1, 12]"),
    ("/recommend", {"user": "u00", "k": 0}, 400, "k: expected an int in [1, 12]"),
    ("/recommend", {"user": "u00", "k": "5"}, 400, "got '5'"),
    ("/recommend", {"user": "u00", "k": True}, 400, "got True"),
    ("/recommend", {"k": 3}, 400, "user: missing"),
    ("/recommend", {"user": "u00", "extra": 1}, 400, "extra: unexpected field"),
    ("/recommend", [1, 2], 400, "body: expected a JSON object, got list"),
    ("/recommend", b'{"user": "u00", "k": 3', 400, "body: expected JSON"),
    ("/recommend", b"\xff\xfe\x00", 400, "body: expected JSON"),
    ("/recommend", b"", 400, "body: expected JSON"),
    ("/recommend", b"[" * 100_000 + b"]" * 100_000, 400, "body: expected JSON nested at most"),
    ("/recommend", b'{"user": "' + b"x" * (2 << 20) + b'"}', 413, "body: expected at most"),
    ("/rank", {"user": "u00", "candidates": []}, 400, "candidates: expected 1 to 1024 item ids, got 0"),
    ("/rank", {"user": "u00", "candidates": ["i00", "nope"]}, 400, "candidates[1]: expected an item of the run's"),
    ("/rank", {"user": "u00", "candidates": "i00"}, 400, "candidates: expected a list of item ids, got str"),
    ("/rank", {"user": "u00", "candidates": ["i00"] * 1025}, 400, "expected 1 to 1024 item ids, got 1025"),
    ("/rank", {"user": "ghost", "candidates": ["i00"]}, 400, "user: expected a user of the run's log"),
    ("/rank", {"user": "u00"}, 400, "candidates: missing"),
]


@pytest.mark.parametrize("path,body,status,message", HOSTILE, ids=[h[3][:40] for h in HOSTILE])
def test_hostile_requests_get_a_4xx_naming_the_field(server, path, body, status, message):
    _, base, _, _ = server
    got_status, answer = call(base, path, raw=body) if isinstance(body, bytes) else call(base, path, body)
    assert got_status == status, answer
    assert message in answer["error"]


def test_wrong_method_and_path(server):
    _, base, _, _ = server
    assert call(base, "/recommend")[0] == 405  # GET
    assert call(base, "/nowhere", {"user": "u00"})[0] == 404


def test_rank_compiles_once_per_bucket(server):
    """After warm_up, batches of any size and candidate counts reuse the compiled buckets: no new
    compilation of the ranker (its jitted predict's cache does not grow)."""
    _, _, run, _ = server
    phoenix_server.warm_up(run, phoenix_server.ServerConfig(max_rank_rows=16))
    compiled = run.ranker._jit_predict._cache_size()
    assert compiled == 4  # recommend's EVAL_BATCH block and buckets 1, 4, 16
    rng = np.random.default_rng(1)
    for users, candidates in [(1, 1), (3, 5), (7, 16), (20, 9), (2, 30)]:
        columns = [rng.integers(0, len(run.split.item_ids), candidates) for _ in range(users)]
        phoenix_server.rank_logits(run, rng.integers(0, len(run.split.user_ids), users), columns, max_rows=16)
    assert run.ranker._jit_predict._cache_size() == compiled


def test_micro_batching_collects_concurrent_requests():
    """Requests submitted while the worker is busy run as one batch, answers back in order."""
    gate = threading.Event()

    def run_batch(payloads):
        gate.wait(10)
        return [p * 2 for p in payloads]

    batcher = phoenix_server.MicroBatcher(run_batch, max_batch=8, max_wait_s=0.002, name="test")

    async def main():
        first = batcher.submit(0)
        await asyncio.sleep(0.05)  # the worker holds request 0 and waits at the gate
        rest = [batcher.submit(i) for i in range(1, 11)]
        gate.set()
        return await asyncio.gather(first, *rest)

    try:
        assert asyncio.run(main()) == [2 * i for i in range(11)]
    finally:
        batcher.stop()
    assert batcher.batch_sizes == [1, 8, 2]  # max_batch caps a batch


def test_a_failing_batch_fails_each_of_its_requests_and_the_next_batch_runs():
    """A fault of the computation reaches every request of its batch (the server answers them 500);
    a request whose client went away (cancelled) is skipped; the batcher keeps serving."""
    def run_batch(payloads):
        if "bad" in payloads:
            raise RuntimeError("model fault")
        return [p.upper() for p in payloads]

    batcher = phoenix_server.MicroBatcher(run_batch, max_batch=8, max_wait_s=0.0, name="test")

    async def main():
        first = [batcher.submit(p) for p in ("a", "bad", "c")]
        first[2].cancel()
        outcomes = await asyncio.gather(*first[:2], return_exceptions=True)
        return outcomes, await asyncio.gather(batcher.submit("d"), batcher.submit("e"))

    try:
        (a, bad), after = asyncio.run(main())
    finally:
        batcher.stop()
    assert isinstance(a, RuntimeError) and isinstance(bad, RuntimeError) and str(a) == "model fault"
    assert after == ["D", "E"] and batcher.batch_sizes == [3, 2]


def test_answers_encode_floats_as_json_dumps_does():
    """_json writes float64 NumPy arrays (the served probabilities and scores) as json.dumps writes
    their Python floats: every value reads back bit for bit."""
    rng = np.random.default_rng(0)
    values = np.concatenate([rng.standard_normal(40) * 10.0 ** rng.integers(-30, 30, 40),
                             [0.0, -0.0, 1.0, 1 - 2 ** -53, 5e-324, 1e-300, 1.7976931348623157e308, 1 / 3]])
    array = values.reshape(-1, 4)  # [C, A]
    got = json.loads(phoenix_server._json({"probabilities": array, "user": "u1"}))
    assert got["user"] == "u1"
    assert got["probabilities"] == json.loads(json.dumps(array.tolist()))  # float == float: bit for bit
    assert np.array_equal(np.array(got["probabilities"]).view(np.int64), array.view(np.int64))


def test_float32_scores_are_answered_as_recommend_gives_them(server):
    """With the three re-ranking weights 0 the two-stage scores stay float32 (as on MovieLens, where
    validation chose 0): the answer's floats are recommend's (float32 values read as float64), not
    their shortest float32 spelling."""
    import dataclasses

    _, _, run, _ = server
    plain = dataclasses.replace(run, retrieval_weight=0.0, popularity_weight=0.0, transition_weight=0.0)
    rows = np.arange(3)
    _, scores = phoenix_server.serving.top_items(plain, plain.split, rows, plain.split.offsets[rows + 1])
    assert scores.dtype == np.float32  # else this test could not fail
    for user, (items, scores) in zip(plain.user_tokens(rows), phoenix_server.recommend_rows(plain, rows, [10] * 3)):
        got = json.loads(phoenix_server._json({"items": items, "scores": scores}))
        want = pipeline.recommend(plain, user, 10)
        assert got["items"] == [item for item, _ in want] and got["scores"] == [score for _, score in want]


def test_bench_serve_runs_at_tiny_sizes(server, tmp_path, capsys):
    """scripts/bench_serve.py (the load test, also the device suite's rows), in this process, on the
    module's server of the tiny run (--url) and on the nano model cut to history 8, width 32, one layer
    (its own server subprocess): it checks every served answer against the in-process one itself."""
    _, base, run, _ = server
    spec = importlib.util.spec_from_file_location("bench_serve", REPO / "scripts" / "bench_serve.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "bench.json"
    bench.main(["--run", run.path, "--url", base, "--max-rank-rows", "16", "--label", "tiny", "--requests", "6",
                "--nano-requests", "2", "--nano-history", "8", "--nano-emb-size", "32", "--nano-layers", "1",
                "--nano-max-rank-rows", "1", "--clients", "1,2", "--out", str(out)], served=run)
    rows = json.loads(out.read_text())["rows"]
    assert {(r["model"], r["endpoint"], r["mode"], r["clients"]) for r in rows} == {
        (model, endpoint, mode, clients) for model, endpoint in (("tiny", "rank"), ("tiny", "recommend"),
                                                                 ("nano", "rank"))
        for mode in ("served", "in-process") for clients in (1, 2)}
    assert all(r["requests"] == 6 if r["model"] == "tiny" else r["requests"] == 2 for r in rows)
    served = [r for r in rows if r["mode"] == "served"]  # the server's CPU is read where the script started it
    assert all((r["server_cpu_ms"] is None) == (r["model"] == "tiny") for r in served)
    assert all(r["client_cpu_ms"] >= 0 for r in served)
    assert "| tiny | /rank | 1 | 6 |" in capsys.readouterr().out


def test_sigterm_stops_the_server_cleanly(server):
    """Last in this module: SIGTERM ends the server with status 0 after it stopped its batchers."""
    process, base, _, lines = server
    assert call(base, "/health")[0] == 200
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=60) == 0
    time.sleep(0.2)
    assert any(line.startswith("stopped") for line in lines), lines
