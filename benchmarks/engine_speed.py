"""Frozen-pass engines side by side, in one run: slices/s, ratio to the eager path, error, FLOPs and % of peak.

    OMP_NUM_THREADS=1 python benchmarks/engine_speed.py --threads 1 --out engine_speed.json
    OMP_NUM_THREADS=1 python benchmarks/engine_speed.py --cases litemedsam_tinyvit:32 --equality $ADRENAL --volumes 100

For each backbone:size in ``--cases`` the frozen pass at cut ``embed`` (slices -> class embeddings: what the
frozen probes and pooling-only plugins run; the trunk of a shared-trunk plugin is a prefix of it) is run by:

* ``torch_fp32``: PyTorch eager fp32 (the frozen probes' path today);
* ``torch_bf16``: eager under bf16 autocast (the CPU default of training/prediction today, ``--no-amp`` off);
* ``torch_compile``: ``torch.compile`` (inductor) fp32;
* ``torch_int8``: ``torch.ao.quantization.quantize_dynamic`` of the Linear layers (int8 weights, dynamic activations);
* ``onnxruntime``: the engine as anymc3d runs it (fp32) and ``onnxruntime_int8`` (``quantize_dynamic`` of the
  graph's MatMuls: the Linear / attention layers);
* ``openvino``: the engine as anymc3d runs it (fp32) and ``openvino_bf16`` (the CPU's bf16 inference precision).

Every variant runs the same ``--batch`` slices: one warm-up call, then the best of ``--repeats`` calls, timed
in process CPU time (robust on a shared machine; one thread per engine) and wall time. ``err`` is the largest
|embedding - fp32 eager| relative to the largest |embedding|. FLOPs per slice come from
``torch.utils.flop_counter.FlopCounterMode`` (matmul / convolution FLOPs, 2 per multiply-add); the peak is a
single-thread matmul of ``--peak-n``² matrices in fp32 and bf16, the best of ``torch.mm`` and an OpenVINO
MatMul graph (each is reported); each variant's GFLOP/s is given as a
percentage of the fp32 peak (of the bf16 peak for the bf16 variants).

``--equality NPZ``: also the probabilities check on real volumes: the first ``--volumes`` volumes of the npz
(MedMNIST layout, train split), axial slices at each case's size; a logistic probe fitted on the fp32 eager
embeddings (mean over slices) gives probabilities from each exact engine's embeddings; their largest difference
to the eager ones is reported (tolerance 1e-3).
"""
from __future__ import annotations

import argparse
import copy
import json
import platform
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch

warnings.filterwarnings("ignore")


def timed(fn, x, repeats):
    fn(x)
    best_cpu = best_wall = float("inf")
    for _ in range(repeats):
        c0, w0 = time.process_time(), time.perf_counter()
        fn(x)
        best_cpu, best_wall = min(best_cpu, time.process_time() - c0), min(best_wall, time.perf_counter() - w0)
    return best_cpu, best_wall


def matmul_peak(n: int, dtype, repeats: int = 5) -> float:
    a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
    cpu, _ = timed(lambda _: torch.mm(a, b), None, repeats)
    return 2 * n ** 3 / cpu / 1e9


def openvino_matmul_peak(n: int, threads: int, precision: str) -> float | None:
    """The same matmul as an OpenVINO graph (its own kernels; None when openvino is not installed)."""
    try:
        import openvino as ov
    except ImportError:
        return None

    class MM(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.randn(n, n), requires_grad=False)

        def forward(self, a):
            return a @ self.w

    a = torch.randn(n, n)
    c = ov.Core().compile_model(ov.convert_model(MM(), example_input=a), "CPU",
                                {"INFERENCE_NUM_THREADS": threads, "INFERENCE_PRECISION_HINT": precision})
    arr = a.numpy()
    cpu, _ = timed(lambda _: c(arr), None, 5)
    return 2 * n ** 3 / cpu / 1e9


def flops_per_slice(frozen, size: int) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    with torch.no_grad(), FlopCounterMode(display=False) as fc:
        frozen(torch.rand(2, 1, size, size))
    return fc.get_total_flops() / 2


def variants(bb, frozen, x, threads, cache, skip=()):
    """name -> (callable slices -> float32 embeddings, precision of its peak); build errors -> a string."""
    from anymc3d.runtime import engines as E

    out = {}
    out["torch_fp32"] = (torch.no_grad()(lambda t: frozen(t).float()), "fp32")

    def bf16(t):
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            return frozen(t).float()
    out["torch_bf16"] = (bf16, "bf16")
    try:
        if "torch_compile" in skip:
            raise RuntimeError("skipped (--skip)")
        t0 = time.perf_counter()
        comp = torch.compile(copy.deepcopy(frozen))
        with torch.no_grad():
            comp(x)
        out["torch_compile"] = (torch.no_grad()(lambda t: comp(t).float()), "fp32")
        out["torch_compile"] += (time.perf_counter() - t0,)
    except Exception as exc:
        out["torch_compile"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:120]}"
    try:
        q = torch.ao.quantization.quantize_dynamic(copy.deepcopy(frozen), {torch.nn.Linear}, dtype=torch.qint8)
        out["torch_int8"] = (torch.no_grad()(lambda t: q(t).float()), "fp32")
    except Exception as exc:
        out["torch_int8"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:120]}"
    for name in ("onnxruntime", "openvino"):
        if name not in E.available_engines():
            out[name] = "not installed"
            continue
        r = E.build_runner(name, bb, "embed", x, threads, cache)
        out[name] = (r, "fp32")
        if name == "onnxruntime":
            try:
                import onnxruntime as ort
                from onnxruntime.quantization import QuantType, quantize_dynamic

                qpath = Path(tempfile.mkdtemp()) / "int8.onnx"
                import logging

                logging.disable(logging.WARNING)  # the quantizer logs the whole graph of ops it skips
                quantize_dynamic(r.source, str(qpath), weight_type=QuantType.QInt8, op_types_to_quantize=["MatMul"])
                so = ort.SessionOptions()
                so.intra_op_num_threads, so.inter_op_num_threads = threads, 1
                sess = ort.InferenceSession(str(qpath), so, providers=["CPUExecutionProvider"])
                out["onnxruntime_int8"] = (lambda t, s=sess: torch.from_numpy(s.run(None, {"slices": t.numpy()})[0]),
                                           "fp32")
            except Exception as exc:
                out["onnxruntime_int8"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:120]}"
        else:
            rb = E.ENGINES["openvino"].build(E.FrozenPass(bb, "embed").eval(), x[:8], E.ExportCache(cache), threads,
                                             E.registry.export_material(bb, "embed", tuple(x.shape[1:])),
                                             precision="bf16")
            out["openvino_bf16"] = (rb, "bf16")
    return out


def equality(bb, size, fns, npz, n_volumes):
    from sklearn.linear_model import LogisticRegression

    d = np.load(npz)
    vols, y = d["train_images"][:n_volumes].astype(np.float32) / 255.0, d["train_labels"][:n_volumes].reshape(-1)
    feats = {}
    for name, fn in fns.items():
        rows = []
        for v in vols:
            t = torch.from_numpy(v).unsqueeze(1)  # (28, 1, 28, 28) axial slices
            t = torch.nn.functional.interpolate(t, size=(size, size), mode="bilinear", align_corners=False)
            rows.append(fn(t.clamp(0, 1).contiguous()).mean(0).numpy())
        feats[name] = np.stack(rows)
    ref = feats["torch_fp32"]
    mu, sd = ref.mean(0), ref.std(0) + 1e-6
    clf = LogisticRegression(C=1.0, max_iter=2000).fit((ref - mu) / sd, y)
    p_ref = clf.predict_proba((ref - mu) / sd)[:, 1]
    return {k: float(np.abs(clf.predict_proba((f - mu) / sd)[:, 1] - p_ref).max()) for k, f in feats.items()}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--cases", default="litemedsam_tinyvit:32,litemedsam_tinyvit:64,efficientnet_lite0:64")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--batch", type=int, default=28, help="slices per call (one Adrenal view: 28)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--peak-n", type=int, default=1024)
    ap.add_argument("--skip", default="", help="comma list of variants not to run (e.g. torch_compile)")
    ap.add_argument("--equality", help="MedMNIST-style npz for the probabilities check")
    ap.add_argument("--volumes", type=int, default=100)
    ap.add_argument("--equality-variants", default="torch_fp32,onnxruntime,openvino,openvino_bf16")
    ap.add_argument("--out")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    from anymc3d.backbones import create_backbone
    from anymc3d.runtime import engines as E

    t_all = time.perf_counter()
    mm = {}
    for prec, dt in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        mm[f"torch_{prec}"] = max(matmul_peak(n, dt) for n in (512, a.peak_n))
        ovp = openvino_matmul_peak(a.peak_n, a.threads, {"fp32": "f32", "bf16": "bf16"}[prec])
        if ovp is not None:
            mm[f"openvino_{prec}"] = ovp
    # the peak of each precision: the best matmul any of the libraries reaches on this CPU
    peak = {p: max(v for k, v in mm.items() if k.endswith(p)) for p in ("fp32", "bf16")}
    res = {"machine": f"{platform.processor() or platform.machine()}, {a.threads} thread(s)", "torch": torch.__version__,
           "matmul_gflops": mm, "peak_gflops": peak, "cases": []}
    print(f"matmul, {a.threads} thread(s), GFLOP/s: " + ", ".join(f"{k} {v:.1f}" for k, v in mm.items()))
    cache = tempfile.mkdtemp(prefix="engine-speed-")
    skip = set(filter(None, a.skip.split(",")))
    for case in a.cases.split(","):
        name, size = case.split(":")
        size = int(size)
        bb = create_backbone(name, input_size=size)
        frozen = E.FrozenPass(bb, "embed").eval()
        x = torch.rand(a.batch, 1, size, size, generator=torch.Generator().manual_seed(1))
        gflop = flops_per_slice(frozen, size) / 1e9
        with torch.no_grad():
            ref = frozen(x).float()
        scale = float(ref.abs().max())
        rows = {}
        fns = variants(bb, frozen, x, a.threads, cache, skip)
        for k, v in fns.items():
            if k in skip:
                continue
            if isinstance(v, str):
                rows[k] = {"error": v}
                continue
            fn, prec = v[0], v[1]
            cpu, wall = timed(fn, x, a.repeats)
            err = float((fn(x).float() - ref).abs().max()) / max(1.0, scale)
            sps = a.batch / cpu
            rows[k] = {"slices_per_s": sps, "wall_slices_per_s": a.batch / wall, "err": err,
                       "gflops": gflop * sps, "pct_peak": 100 * gflop * sps / peak[prec], "peak": prec}
            if len(v) > 2:
                rows[k]["compile_s"] = v[2]
        base = rows["torch_fp32"]["slices_per_s"]
        for r in rows.values():
            if "slices_per_s" in r:
                r["x_fp32_eager"] = r["slices_per_s"] / base
                r["x_bf16_eager"] = (r["slices_per_s"] / rows["torch_bf16"]["slices_per_s"]
                                     if "slices_per_s" in rows.get("torch_bf16", {}) else float("nan"))
        entry = {"backbone": name, "size": size, "gflop_per_slice": gflop, "variants": rows}
        if a.equality:
            exact = {k: (v[0] if not isinstance(v, str) else None) for k, v in fns.items()
                     if k in ("torch_fp32", "torch_bf16", "onnxruntime", "openvino", "openvino_bf16",
                              "onnxruntime_int8", "torch_int8") and not isinstance(v, str) and k not in skip}
            entry["prob_max_diff"] = equality(bb, size, exact, a.equality, a.volumes)
        res["cases"].append(entry)
        print(f"\n{name} at {size}²: {gflop:.3f} GFLOP per slice")
        print(f"{'variant':18s} {'slices/s':>9s} {'x fp32':>7s} {'x bf16':>7s} {'err':>8s} {'GFLOP/s':>8s} {'% peak':>7s}")
        for k, r in rows.items():
            if "error" in r:
                print(f"{k:18s} {r['error']}")
                continue
            print(f"{k:18s} {r['slices_per_s']:9.1f} {r['x_fp32_eager']:7.2f} {r['x_bf16_eager']:7.2f} {r['err']:8.1e} "
                  f"{r['gflops']:8.2f} {r['pct_peak']:6.1f}% ({r['peak']})")
        if "prob_max_diff" in entry:
            print("probabilities, max |p - p_fp32_eager| over", a.volumes, "volumes:",
                  ", ".join(f"{k} {v:.1e}" for k, v in entry["prob_max_diff"].items()))
    res["seconds"] = round(time.perf_counter() - t_all, 1)
    print(f"\n({res['seconds']} s)")
    if a.out:
        Path(a.out).write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
