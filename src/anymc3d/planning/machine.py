"""Machine measurement: the device, threads and memory, and the measured cost of the candidate
training configurations on this machine (never a guess).

:func:`measure_timings` builds a throw-away backbone at the planned slice size, takes a few real
cases of the data, and times on the planned device, through :class:`anymc3d.runtime.Runtime`:

* reading + canonicalising a volume (``prep_s_per_volume``) and its 3D augmentation (``aug_s_per_volume``);
* the frozen trunk of a last-stage LoRA plugin (``trunk_fwd_s`` per slice, no autograd), run by the
  inference engine the trunk-cache fill will use (``--engine``; ``engine`` names it), and the bytes
  of its activations (``trunk_bytes_per_slice``: the trunk cache's memory);
* a training step of that adapted tail on cached activations (``tail_step_s``: forward + backward +
  optimiser, per slice) and its inference (``tail_fwd_s``);
* a training step through the whole backbone with LoRA everywhere (``full_step_s``) and its
  inference (``full_fwd_s``).

The result is a plain dict (``timings.json``); :func:`anymc3d.planning.planner.make_plan` takes it as
an argument, so planning is deterministic for a given table (tests inject one).
"""
from __future__ import annotations

import os
import time

import torch

from ..backbones import create_backbone
from ..data import TaskData
from ..plugins import LoraSpec, PluginSpec
from ..plugins.model import AnyMC3D
from ..preprocess import PreprocessOptions
from ..runtime.batching import collate, prepare_case, slice_streams
from ..runtime.device import resolve_device
from ..runtime.cache import frozen_engine
from ..runtime.engine import Runtime
from ..runtime.engines import engine_name
from ..training.losses import classification_loss


def machine_info(device: str = "auto") -> dict:
    """The device, its name, CPU threads and memory (GB) the plan is made for."""
    dev = resolve_device(device)
    info = {"device": str(dev), "device_type": dev.type, "threads": torch.get_num_threads(),
            "cpu_count": os.cpu_count() or 1}
    try:
        info["memory_gb"] = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
        info["available_gb"] = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES") / 2**30, 1)
    except (ValueError, OSError, AttributeError):
        info["memory_gb"] = info["available_gb"] = None
    if dev.type == "cuda":
        props = torch.cuda.get_device_properties(dev)
        info["device_name"] = props.name
        info["device_memory_gb"] = round(props.total_memory / 2**30, 1)
    return info


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def _timed(fn, dev: torch.device, repeats: int) -> float:
    """Seconds of one call of ``fn``: the best of ``repeats`` calls after one warm-up call."""
    fn()
    best = float("inf")
    for _ in range(repeats):
        _sync(dev)
        t0 = time.perf_counter()
        fn()
        _sync(dev)
        best = min(best, time.perf_counter() - t0)
    return best


def choose_threads(fn, dev: torch.device) -> dict:
    """On a CPU with several threads: time ``fn`` with all threads and with one, and keep the faster
    (OpenMP threads slow down badly when other processes hold the cores). Sets torch's thread count."""
    n = torch.get_num_threads()
    if dev.type != "cpu" or n == 1:
        return {"threads_chosen": n, "threads_timed": {}}
    timed = {}
    for k in (n, 1):
        torch.set_num_threads(k)
        timed[str(k)] = _timed(fn, dev, 1)
    best = min(timed, key=timed.get)
    torch.set_num_threads(int(best))
    return {"threads_chosen": int(best), "threads_timed": timed}


def _model(backbone, task: TaskData, spec_pre, last_k: int | None) -> AnyMC3D:
    spec = PluginSpec.for_task(task, {task.inputs[0]: spec_pre}, backbone, task="timing", inputs=task.inputs[:1],
                               lora=LoraSpec(last_k=last_k))
    return AnyMC3D(backbone, spec, adapter_prefix=f"t{last_k or 0}_")


def measure_timings(task: TaskData, backbone_name: str, size: int, device: str = "auto", weights: str | None = None,
                    batch_size: int = 8, max_slices_timed: int = 16, n_cases: int = 4, repeats: int = 1) -> dict:
    """Measured per-volume and per-slice costs (see the module docstring) on ``device``."""
    t_all = time.perf_counter()
    cases = [c for c in task.cases if c.label is not None][: max(1, n_cases)]
    bb = create_backbone(backbone_name, weights=weights, input_size=size)
    spec_pre = PreprocessOptions(views=["axial"], size=size).spec_for(task, bb.input_size)
    specs = {task.inputs[0]: spec_pre}
    t0 = time.perf_counter()
    prepared = [prepare_case(c, specs) for c in cases]
    prep_s = (time.perf_counter() - t0) / len(prepared)

    full = _model(bb, task, spec_pre, None)
    tail = _model(bb, task, spec_pre, 1)
    rt_full = Runtime(full, specs, device=device)
    rt_tail = Runtime(tail, specs, device=device)
    dev = rt_full.device
    aug = rt_full.batcher
    t0 = time.perf_counter()
    for i, p in enumerate(prepared):
        aug._augment(p, 1000 + i)
    aug_s = (time.perf_counter() - t0) / len(prepared)

    # one training batch of real slices: batch_size stacks of up to max_slices_timed slices
    stream = full.streams[0]
    stacks = [slice_streams(p, specs, full.streams)[stream][:max_slices_timed] for p in prepared]
    stacks = (stacks * (batch_size // len(stacks) + 1))[:batch_size]
    slices, masks, present = collate([{stream: s} for s in stacks], [stream])
    n = int(sum(int(m.sum()) for m in masks.values()))
    y = torch.stack([prepared[i % len(prepared)].label for i in range(batch_size)])
    tt = task.task_type

    def step(model, rt, x, from_trunk):
        opt = torch.optim.AdamW([p for p in {**model.lora_parameters(), **model.head_parameters()}.values()], lr=1e-6)

        def run():
            model.train()
            out = model(rt.to_device(x), rt.to_device(masks), rt.to_device(present), from_trunk=from_trunk)
            loss = classification_loss(out.logits.float(), y.to(dev), tt, "focal", 2.0, 0.25, None)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        return run

    def infer(model, rt, x, from_trunk):
        @torch.no_grad()
        def run():
            model.eval()
            model(rt.to_device(x), rt.to_device(masks), rt.to_device(present), from_trunk=from_trunk)
        return run

    full.set_trainable(True)
    tail.set_trainable(True)
    flat = slices[stream].flatten(0, 1)[masks[stream].reshape(-1)].to(dev)
    threads = choose_threads(lambda: tail.trunk(flat), dev)
    full_step = _timed(step(full, rt_full, slices, False), dev, repeats) / n
    full_fwd = _timed(infer(full, rt_full, slices, False), dev, repeats) / n
    # the frozen trunk as the trunk-cache fill will run it: through the engine of --engine (auto: measured)
    runner = frozen_engine(tail, stream, flat) if dev.type == "cpu" else None
    trunk_fwd = _timed((lambda: runner(flat)) if runner is not None else (lambda: tail.trunk(flat)), dev, repeats) / n
    h = tail.trunk(flat)
    b, s = masks[stream].shape
    acts = {stream: h.new_zeros(b * s, *h.shape[1:])}
    acts[stream][masks[stream].reshape(-1).to(dev)] = h
    acts[stream] = acts[stream].view(b, s, *h.shape[1:]).float().cpu()
    tail_step = _timed(step(tail, rt_tail, acts, True), dev, repeats) / n
    tail_fwd = _timed(infer(tail, rt_tail, acts, True), dev, repeats) / n
    del full, tail, rt_full, rt_tail, bb
    return {**machine_info(device), **threads, "backbone": backbone_name, "size": int(size), "batch_size": batch_size,
            "slices_timed": n, "engine": engine_name(runner), "prep_s_per_volume": prep_s, "aug_s_per_volume": aug_s,
            "trunk_fwd_s": trunk_fwd, "trunk_bytes_per_slice": int(h[0].numel() * 4),
            "tail_step_s": tail_step, "tail_fwd_s": tail_fwd, "full_step_s": full_step, "full_fwd_s": full_fwd,
            "measure_s": round(time.perf_counter() - t_all, 2)}
