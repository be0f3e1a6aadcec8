"""Issue 16: torchrun data-parallel training and sharded, progressive, resumable ``predict --out``.

CPU only, gloo. The 2-process runs are one real torchrun job (``python -m torch.distributed.run
--standalone``: a free port, no clash with other jobs on the machine) that trains and then
predicts; a rank's interpreter start costs ~10-15 s of imports on 2 busy cores, so the file
launches it once. The killed run is a forked child (``kill -9``), the reruns run in-process.
"""
from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from anymc3d.cli import main

from conftest import build_binary_dataset, make_volume, write_nifti

SIZE = "32"
N_VOLUMES = 40
#: DDP and one process see the same global batches (DistributedSampler order = the single-process
#: order, --batch-size is the global batch) with --no-augment; what differs is the dropout mask of
#: the head (drawn per rank) and the order of float sums, so probabilities agree to within this
P_TOLERANCE = 0.05
TRAIN_ARGS = ["--size", SIZE, "--epochs", "2", "--batch-size", "4", "--lora-rank", "4", "--lora-last-k", "1",
              "--no-augment", "--lr-head", "1e-2", "--quiet", "--device", "cpu", "--no-select"]


def _env() -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", TQDM_DISABLE="1")
    src = str(Path(__file__).resolve().parents[1] / "src")
    env["PYTHONPATH"] = os.pathsep.join([src, *filter(None, [env.get("PYTHONPATH")])])
    return env


def _torchrun(*args: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "--tee", "3",
            *args]


def _run(cmd: list[str], timeout: float) -> subprocess.CompletedProcess:
    """Run a torchrun job in its own session; on timeout kill the whole session (ranks included)."""
    proc = subprocess.Popen(cmd, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"torchrun job still running after {timeout} s:\n{out[-3000:]}\n{err[-3000:]}")
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def _read_csv(path: Path) -> list[dict]:
    with path.open(newline="") as fh:
        return list(csv.DictReader(fh))


def _json_files(out: Path) -> list[str]:
    return sorted(p.name for p in out.glob("*.json"))


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return build_binary_dataset(tmp_path_factory.mktemp("scale") / "data", n=16, seed=3)


@pytest.fixture(scope="module")
def volumes(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("vols")
    rng = np.random.default_rng(7)
    for i in range(N_VOLUMES):
        write_nifti(folder / f"v{i:03d}.nii.gz", make_volume(rng, [(4, 4, 3)] if i % 2 else []))
    return folder


#: one torchrun job that runs two CLI commands in a row, as a job script would (``train`` then
#: ``predict`` with the plugin it wrote): each rank starts its interpreter once instead of twice
TWO_COMMANDS = """
import sys
from anymc3d.cli import main
argv = sys.argv[1:]
cut = argv.index("--then")
rc = main(argv[:cut])
sys.exit(rc or main(argv[cut + 1:]))
"""


@pytest.fixture(scope="module")
def trained(data, volumes, tmp_path_factory) -> dict:
    """The same training as 2 DDP processes (torchrun, gloo) and as one process; the 2-process job then
    predicts the 40 volumes with its plugin."""
    root = tmp_path_factory.mktemp("train")
    script = root / "two_commands.py"
    script.write_text(TWO_COMMANDS)
    r = _run(_torchrun(str(script), "train", str(data), "--out", str(root / "ddp"), "--cache", str(root / "cache"),
                       *TRAIN_ARGS, "--then", "predict", str(root / "ddp"), str(volumes), "--out", str(root / "pred"),
                       "--device", "cpu"), timeout=400)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert main(["train", str(data), "--out", str(root / "single"), *TRAIN_ARGS]) == 0
    return {"ddp": root / "ddp", "single": root / "single", "cache": root / "cache", "pred": root / "pred",
            "stdout": r.stdout}


# ------------------------------------------------------------------------------------------ training
@pytest.mark.slow
def test_ddp_training_matches_single_process(trained, data):
    from anymc3d.predict import load

    ddp, single = trained["ddp"], trained["single"]
    for name in ("plugin.safetensors", "plugin.json", "metrics.json", "train_log.csv", "checkpoint.pt"):
        assert (ddp / name).is_file(), name
    assert not list(ddp.glob(".tmp-*"))
    # only rank 0 reports: one summary line, from [default0]
    summary = [ln for ln in trained["stdout"].splitlines() if "AUC" in ln and "trainable parameters" in ln]
    assert len(summary) == 1 and summary[0].startswith("[default0]"), trained["stdout"][-2000:]
    m_ddp, m_one = (json.loads((d / "metrics.json").read_text()) for d in (ddp, single))
    assert m_ddp["epochs_run"] == m_one["epochs_run"] == 2 and len(_read_csv(ddp / "train_log.csv")) == 2
    for split in ("val", "test"):  # equal metrics on this separable task
        assert m_ddp[split]["n"] == m_one[split]["n"] == 4
        assert abs(m_ddp[split]["auc"] - m_one[split]["auc"]) <= 1e-9, (split, m_ddp[split], m_one[split])
    for a, b in zip(m_ddp["history"], m_one["history"]):  # the epoch's loss is averaged over the ranks
        assert abs(a["train_loss"] - b["train_loss"]) <= 0.15 * b["train_loss"], (a, b)
    # the DDP plugin loads and predicts the same probabilities as the single-process one
    images = sorted((data.parent / "images").glob("*.nii.gz"))
    p_ddp = [r["probabilities"]["positive"] for r in load(ddp, device="cpu").predict_many(images)]
    p_one = [r["probabilities"]["positive"] for r in load(single, device="cpu").predict_many(images)]
    diff = np.abs(np.array(p_ddp) - np.array(p_one))
    assert diff.max() <= P_TOLERANCE, diff
    # the two ranks filled one shared activation cache: whole entries, no lock left behind
    from anymc3d.runtime.cache import ActivationCache

    cache = ActivationCache(trained["cache"])
    assert len(cache.entries()) == 16  # one per case (axial stream), each computed by one rank
    assert not list(trained["cache"].rglob("*.lock")) and not list(trained["cache"].rglob(".tmp-*"))


# ------------------------------------------------------------------------------------------ predict
@pytest.mark.slow
def test_two_process_predict_writes_each_volume_once(trained):
    out = trained["pred"]
    ids = [f"v{i:03d}" for i in range(N_VOLUMES)]
    assert _json_files(out) == [f"{i}.json" for i in ids]
    # every volume predicted exactly once, by one of the two ranks, and both ranks worked
    done = {}
    for line in trained["stdout"].splitlines():
        if line.startswith("[default") and "]:v0" in line:
            tag, _, rest = line.partition("]:")
            cid = rest.split(":")[0]
            assert cid not in done, f"{cid} predicted twice"
            done[cid] = tag
    assert sorted(done) == ids
    assert sorted(set(done.values())) == ["[default0", "[default1"]
    assert sum(t == "[default0" for t in done.values()) == N_VOLUMES // 2
    rows = _read_csv(out / "predictions.csv")
    assert [row["id"] for row in rows] == ids  # once each, sorted by case id
    res = json.loads((out / "v001.json").read_text())
    assert res["id"] == "v001" and abs(float(rows[1]["p_positive"]) - res["probabilities"]["positive"]) < 1e-5
    assert not list(out.glob(".tmp-*"))


def _slow_predict(argv: list[str]) -> None:
    """The child the test kills: ``anymc3d predict`` with a pause per volume (forked: no fresh imports)."""
    from anymc3d.predict import Predictor

    orig = Predictor.predict_stream

    def slow(self, *a, **k):
        for res in orig(self, *a, **k):
            time.sleep(0.15)
            yield res

    Predictor.predict_stream = slow
    os._exit(main(argv))


def _spy_stream(monkeypatch, seen: list, out: Path | None = None) -> None:
    """Record every case ``Predictor.predict_stream`` yields (with the JSONs on disk at that moment)."""
    from anymc3d.predict import Predictor

    orig = Predictor.predict_stream

    def spy(self, *a, **k):
        for res in orig(self, *a, **k):
            seen.append(res["id"] if out is None else (res["id"], _json_files(out) if out.is_dir() else []))
            yield res

    monkeypatch.setattr(Predictor, "predict_stream", spy)


@pytest.mark.slow
def test_killed_predict_resumes_without_duplicates_or_recomputation(trained, volumes, tmp_path, monkeypatch):
    import multiprocessing

    out = tmp_path / "pred"
    argv = ["predict", str(trained["single"]), str(volumes), "--out", str(out), "--device", "cpu"]
    proc = multiprocessing.get_context("fork").Process(target=_slow_predict, args=(argv,))
    proc.start()
    deadline = time.time() + 240
    while time.time() < deadline and proc.is_alive() and len(_json_files(out) if out.is_dir() else []) < 8:
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)  # kill -9 midway
    proc.join(timeout=30)
    assert proc.exitcode == -signal.SIGKILL
    first = {n: (out / n).stat().st_mtime_ns for n in _json_files(out)}
    assert 8 <= len(first) < N_VOLUMES, len(first)
    assert not (out / "predictions.csv").exists()  # the merge never ran
    for n in first:  # atomic: every JSON there is whole
        assert json.loads((out / n).read_text())["id"] == n[:-5]

    calls = []
    _spy_stream(monkeypatch, calls)
    time.sleep(0.02)  # mtimes of a rewrite would differ
    assert main(["predict", str(trained["single"]), str(volumes), "--out", str(out), "--device", "cpu"]) == 0
    ids = [f"v{i:03d}" for i in range(N_VOLUMES)]
    assert _json_files(out) == [f"{i}.json" for i in ids]
    assert sorted(calls) == sorted(i for i in ids if f"{i}.json" not in first)  # only the missing ones
    assert {n: (out / n).stat().st_mtime_ns for n in first} == first  # finished outputs untouched
    assert [r["id"] for r in _read_csv(out / "predictions.csv")] == ids
    assert not list(out.glob(".tmp-*"))
    # --overwrite redoes every volume
    calls.clear()
    assert main(["predict", str(trained["single"]), str(volumes), "--out", str(out), "--device", "cpu",
                 "--overwrite"]) == 0
    assert sorted(calls) == ids


def test_predict_writes_each_volume_as_it_is_done(trained_plugin, volumes, tmp_path, monkeypatch):
    """In one process too: when volume k is predicted, the JSONs of the k - 1 before it are on disk."""
    out = tmp_path / "pred"
    seen = []
    _spy_stream(monkeypatch, seen, out)
    images = sorted(volumes.glob("*.nii.gz"))[:6]
    assert main(["predict", str(trained_plugin), *map(str, images), "--out", str(out), "--device", "cpu"]) == 0
    for k, (cid, on_disk) in enumerate(seen):
        assert on_disk == [f"{c}.json" for c, _ in seen[:k]], (cid, on_disk)
    assert len(_read_csv(out / "predictions.csv")) == 6


def test_streaming_predict_uses_one_loader_and_equals_one_at_a_time(trained_plugin, volumes, tmp_path, monkeypatch):
    """``predict --out`` runs one loader (its workers preparing ahead) over all the volumes, not one per
    volume, and its probabilities are those of predicting each volume on its own."""
    from anymc3d.predict import load
    from anymc3d.runtime.engine import Runtime

    images = sorted(volumes.glob("*.nii.gz"))[:9]
    alone = load(trained_plugin, device="cpu")
    expected = {p.name[:-7]: alone.predict(str(p))["probabilities"] for p in images}
    loaders = []
    orig = Runtime.loader
    monkeypatch.setattr(Runtime, "loader", lambda self, cases, plans: loaders.append(len(cases)) or orig(self, cases, plans))
    out = tmp_path / "pred"
    assert main(["predict", str(trained_plugin), *map(str, images), "--out", str(out), "--device", "cpu",
                 "--workers", "1", "--engine", "torch"]) == 0  # the same arithmetic as load()'s (torch)
    assert loaders == [9]
    for cid, probs in expected.items():
        got = json.loads((out / f"{cid}.json").read_text())["probabilities"]
        assert max(abs(got[k] - v) for k, v in probs.items()) < 1e-6, cid


def test_predict_refuses_two_inputs_with_one_case_id(trained_plugin, volumes, tmp_path, capsys):
    other = tmp_path / "other"
    other.mkdir()
    (other / "v000.nii.gz").write_bytes((volumes / "v000.nii.gz").read_bytes())
    out = tmp_path / "o"
    assert main(["predict", str(trained_plugin), str(volumes / "v000.nii.gz"), str(other / "v000.nii.gz"),
                 "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "case id 'v000'" in err[0] and not out.exists()


def test_rerun_with_another_plugin_is_not_taken_as_done(trained_plugin, trained, volumes, tmp_path):
    out = tmp_path / "o"
    images = [str(p) for p in sorted(volumes.glob("*.nii.gz"))[:2]]
    assert main(["predict", str(trained_plugin), *images, "--out", str(out), "--device", "cpu"]) == 0
    first = json.loads((out / "v000.json").read_text())
    assert main(["predict", str(trained["single"]), *images, "--out", str(out), "--device", "cpu"]) == 0
    second = json.loads((out / "v000.json").read_text())
    assert first["plugin_sha256"] != second["plugin_sha256"]
    assert second["plugin_sha256"] == json.loads((trained["single"] / "plugin.json").read_text())["tensors_sha256"]


# ------------------------------------------------------------------------------------------ cache
def test_cache_lock_one_process_computes_an_entry(tmp_path, monkeypatch):
    import torch

    from anymc3d.runtime import cache as cache_mod

    a, b = cache_mod.ActivationCache(tmp_path), cache_mod.ActivationCache(tmp_path)
    key = a.make_key({"x": 1})
    assert a.try_lock(key) and not b.try_lock(key)  # O_EXCL: exactly one wins
    a.put(key, torch.ones(3))
    a.unlock(key)
    t, _ = b.wait_for(key, timeout=5)
    assert torch.equal(t, torch.ones(3)) and b.stats["waited"] == 1
    # a lock whose owner died long ago is taken over
    key2 = a.make_key({"x": 2})
    assert a.try_lock(key2)
    old = time.time() - cache_mod.STALE_LOCK_S - 5
    os.utime(a.lock_path(key2), (old, old))
    assert b.try_lock(key2) and b.stats["stale_locks"] == 1
    assert a.entries() == [a.path(key)]  # lock files are not entries


# ------------------------------------------------------------------------------------------ bench
BENCH_SUITE = """name: ddp-bench
tasks:
  - name: tiny
    synthetic: {task: lesion_binary, n_cases: 24, seed: 0, knobs: {size: 24}}
"""


@pytest.mark.slow
def test_bench_under_torchrun_trains_data_parallel_and_rank0_writes(tmp_path, capsys):
    """``torchrun -m anymc3d bench``: rank 0 generates the synthetic task and writes every file; the
    training cell runs on both ranks (DDP), the frozen-feature cell on rank 0 only; a later
    single-process run finds both cells done."""
    suite = tmp_path / "suite.yaml"
    suite.write_text(BENCH_SUITE)
    out = tmp_path / "bench"
    args = ["bench", str(suite), "--methods", "plugin_lastk1,linear_probe", "--out", str(out), "--size", SIZE,
            "--epochs", "2", "--set", "augment=false", "--set", "batch_size=4", "--quiet", "--device", "cpu"]
    r = _run(_torchrun("-m", "anymc3d", *args), timeout=400)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    cells = sorted((out / "cells").glob("*.json"))
    assert [p.name for p in cells] == ["tiny__linear_probe__s0.json", "tiny__plugin_lastk1__s0.json"]
    plugin = json.loads(cells[1].read_text())
    assert plugin["status"] == "ok", plugin.get("error")
    assert plugin["world_size"] == 2
    assert json.loads(cells[0].read_text())["status"] == "ok"
    work = out / "runs" / "tiny" / "plugin_lastk1" / "s0"
    log = _read_csv(work / "train_log.csv")
    assert [row["epoch"] for row in log] == ["1", "2"]  # one writer: no row twice
    assert (work / "plugin.safetensors").is_file() and (out / "results.md").is_file()
    assert plugin["result"]["auc"] == json.loads((work / "metrics.json").read_text())["auc"]  # rank 0's scoring
    assert json.loads((out / "bench.json").read_text())["world_size"] == 2
    assert r.stdout.count("cells: 2 ran") == 1  # rank 0 alone reports
    assert not list(out.rglob(".tmp-*"))
    capsys.readouterr()
    assert main(args) == 0
    assert "cells: 0 ran, 2 already done" in capsys.readouterr().out


# ------------------------------------------------------------------------------------------ several nodes
def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_agents_meet_through_c10d_rendezvous_as_on_two_nodes(trained, volumes, tmp_path):
    """What the Slurm / Kubernetes recipes of docs/scale.md run: one torchrun agent per node, ranks
    assigned by a c10d rendezvous (here two agents on 127.0.0.1); the predict job is sharded over them."""
    out = tmp_path / "pred"
    port = _free_port()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", "1",
           "--rdzv_backend", "c10d", "--rdzv_endpoint", f"127.0.0.1:{port}", "--rdzv_id", f"t{port}",
           "-m", "anymc3d", "predict", str(trained["ddp"]), str(volumes), "--out", str(out), "--device", "cpu"]
    agents = [subprocess.Popen(cmd, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               start_new_session=True) for _ in range(2)]
    logs = []
    try:
        for p in agents:
            logs.append(p.communicate(timeout=300)[0])
    finally:
        for p in agents:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
    assert [p.returncode for p in agents] == [0, 0], "\n".join(x[-2000:] for x in logs)
    assert _json_files(out) == [f"v{i:03d}.json" for i in range(N_VOLUMES)]
    assert sum("; 2 ranks" in x for x in logs) == 1  # rank 0's summary line, on one of the two "nodes"
    rows = _read_csv(out / "predictions.csv")
    assert len(rows) == N_VOLUMES and len({r["id"] for r in rows}) == N_VOLUMES


GATHER_SCRIPT = """
import datetime, json, sys
import torch.distributed as dist
from anymc3d.training import distributed as ddp

dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=20))  # a rank left alone fails, never hangs
r = dist.get_rank()
cases = {"rank 1 without a value": [0.25, None], "both": [0.2, 0.6], "neither": [None, None]}
out = {name: ddp.mean_over_ranks(values[r]) for name, values in cases.items()}
dist.destroy_process_group()
print("RESULT", r, json.dumps(out), flush=True)
"""


def test_mean_over_ranks_leaves_out_ranks_without_a_value(tmp_path):
    """``train_seg_loss`` under DDP: the mean over the ranks that had masks in the epoch; every rank
    joins the gather (a rank without masks passes None), so no rank waits alone in a collective.
    Two real processes (torchrun, gloo), each with its own value."""
    from anymc3d.training import distributed as ddp

    script = tmp_path / "gather.py"
    script.write_text(GATHER_SCRIPT)
    r = _run(_torchrun(str(script)), timeout=120)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    results = {}
    for line in r.stdout.splitlines():
        if "RESULT " in line:
            rank, payload = line.split("RESULT ", 1)[1].split(" ", 1)
            results[int(rank)] = json.loads(payload)
    assert sorted(results) == [0, 1], r.stdout[-3000:]
    for rank in (0, 1):  # every rank gets the same answer
        assert results[rank]["rank 1 without a value"] == 0.25
        assert abs(results[rank]["both"] - 0.4) < 1e-12
        assert results[rank]["neither"] is None
    assert ddp.mean_over_ranks(0.7) == 0.7  # one process: the number itself, no collective
