"""Issue 19: a bounded load test on 127.0.0.1 - real uvicorn (in a thread), N concurrent HTTP clients, a
fixed number of requests. Every request gets exactly one response, no 500s, nothing lost (the server
completed exactly the requests it answered 200); with a queue smaller than the clients, the excess gets
503 + Retry-After and nothing else."""
from __future__ import annotations

import threading
import time

import numpy as np
import pytest

pytest.importorskip("fastapi", reason="the serve extra is not installed (pip install -e '.[serve]')")
httpx = pytest.importorskip("httpx", reason="httpx is not installed")

from test_serve import build_store, running_server, serve_config, write_scan  # noqa: E402

from anymc3d.serve import create_app  # noqa: E402
from anymc3d.serve.service import load_engines  # noqa: E402


def hammer(base: str, body: bytes, clients: int, per_client: int, params: dict) -> list[dict]:
    """``clients`` threads, each sending ``per_client`` predictions; one record per request."""
    records: list[dict] = []
    lock = threading.Lock()
    start = threading.Barrier(clients)

    def client(k: int) -> None:
        with httpx.Client(base_url=base, timeout=120) as c:
            start.wait()
            for i in range(per_client):
                t0 = time.perf_counter()
                rec = {"client": k, "i": i}
                try:
                    r = c.post("/v1/predict", params=params, files={"file": (f"c{k}_{i}.nii.gz", body)})
                    rec.update(status=r.status_code, id=r.json().get("id"), retry=r.headers.get("retry-after"))
                except Exception as exc:  # a lost request: no response at all
                    rec.update(status=None, error=repr(exc))
                rec["s"] = time.perf_counter() - t0
                with lock:
                    records.append(rec)

    threads = [threading.Thread(target=client, args=(k,)) for k in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return records


@pytest.fixture(scope="module")
def loaded(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("load")
    store = build_store(tmp)
    # two engines: the first test runs --workers 2 (two threads, each with its own loaded store)
    return store, load_engines(serve_config(store, workers=2)), write_scan(tmp / "scan.nii.gz").read_bytes()


def test_load_every_request_answered_once(loaded):
    store, engines, body = loaded
    clients, per_client = 4, 4
    app = create_app(serve_config(store, queue=clients, workers=2), engines=engines)
    assert engines[0].predictor is not engines[1].predictor
    with running_server(app) as base:
        t0 = time.perf_counter()
        recs = hammer(base, body, clients, per_client, {})
        wall = time.perf_counter() - t0
        # both workers hold the same plugins: a volume's probabilities do not depend on the thread that answered
        with httpx.Client(base_url=base, timeout=120) as c:
            probs = [c.post("/v1/predict", files={"file": ("x.nii.gz", body)}).json()["tasks"]["lesion"]["probabilities"]
                     for _ in range(4)]
    assert all(p == pytest.approx(probs[0], abs=1e-6) for p in probs)
    assert len(recs) == clients * per_client
    assert all(r["status"] == 200 for r in recs), [r for r in recs if r["status"] != 200]
    assert sorted((r["client"], r["i"]) for r in recs) == [(k, i) for k in range(clients) for i in range(per_client)]
    assert all(r["id"] == f"c{r['client']}_{r['i']}" for r in recs)  # each answer is for its own upload
    assert app.state.workers.completed == clients * per_client + 4 and app.state.admission.in_flight == 0
    lat = np.array([r["s"] for r in recs])
    print(f"\nload: {clients} clients x {per_client} requests, 5 tasks, 2 workers: p50 {np.percentile(lat, 50) * 1000:.0f} ms, "
          f"p95 {np.percentile(lat, 95) * 1000:.0f} ms, {len(recs) / wall:.2f} volumes/s")


def test_load_over_capacity_gets_503_not_losses(loaded):
    store, engines, body = loaded
    clients, per_client, queue = 6, 3, 2
    app = create_app(serve_config(store, queue=queue), engines=engines[:1])
    with running_server(app) as base:
        recs = hammer(base, body, clients, per_client, {"tasks": "lesion,trunk"})
    statuses = [r["status"] for r in recs]
    assert len(recs) == clients * per_client and None not in statuses and 500 not in statuses
    assert set(statuses) <= {200, 503} and statuses.count(503) > 0 and statuses.count(200) >= queue
    assert all(int(r["retry"]) >= 1 for r in recs if r["status"] == 503)
    assert app.state.workers.completed == statuses.count(200)  # nothing lost or run twice
    assert app.state.admission.refused == statuses.count(503) and app.state.admission.in_flight == 0
