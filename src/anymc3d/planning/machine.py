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

The training steps are :meth:`anymc3d.training.trainer.Trainer.step` itself, on the runtime
training makes (its precision, its activation cache, its loss and optimiser), so the timed step
is the step that trains.

The result is a plain dict (``timings.json``); :func:`anymc3d.planning.planner.make_plan` takes it as
an argument, so planning is deterministic for a given table (tests inject one).
"""
from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path

import torch

from ..backbones import create_backbone
from ..data import TaskData
from ..plugins import LoraSpec, PluginSpec
from ..plugins.model import AnyMC3D
from ..preprocess import PreprocessOptions
from ..runtime.batching import Batch, collate, prepare_case, slice_streams
from ..runtime.cache import frozen_engine
from ..runtime.device import resolve_device
from ..runtime.engines import engine_name
from ..training.trainer import Trainer, TrainConfig


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


def timed(fn, dev: torch.device, repeats: int) -> float:
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
    secs = {}
    for k in (n, 1):
        torch.set_num_threads(k)
        secs[str(k)] = timed(fn, dev, 1)
    best = min(secs, key=secs.get)
    torch.set_num_threads(int(best))
    return {"threads_chosen": int(best), "threads_timed": secs}


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
    with tempfile.TemporaryDirectory() as tmp:  # the Trainers' logs and checkpoints: none is written here
        # the training steps are the Trainer's own (its loss, optimiser and schedule), on training's runtime
        cfg = TrainConfig(device=device, batch_size=batch_size, progress=False, augment=False)
        # local: under torchrun rank 0 alone times (the other ranks wait for its plan), so no DDP here
        t_full = Trainer(full, specs, prepared, [], cfg, Path(tmp) / "full", local=True)
        t_tail = Trainer(tail, specs, prepared, [], cfg, Path(tmp) / "tail", local=True)
        rt_full, rt_tail = t_full.rt, t_tail.rt
        dev = rt_full.device
        t0 = time.perf_counter()
        for i, p in enumerate(prepared):
            rt_full.batcher.augment(p, 1000 + i)
        aug_s = (time.perf_counter() - t0) / len(prepared)

        # one training batch of real slices: batch_size stacks of up to max_slices_timed slices
        stream = full.streams[0]
        whole = [slice_streams(p, specs, full.streams)[stream] for p in prepared]  # each case's whole stack
        stacks = [w[:max_slices_timed] for w in whole]
        stacks = (stacks * (batch_size // len(stacks) + 1))[:batch_size]
        slices, masks, present = collate([{stream: s} for s in stacks], [stream])
        n = int(sum(int(m.sum()) for m in masks.values()))
        y = torch.stack([prepared[i % len(prepared)].label for i in range(batch_size)])
        batch = Batch(slices, masks, present, y)
        # the tail's batch is served from the activation cache (filled by the warm-up call), as in training
        cached = batch.replace(from_trunk=rt_tail.cache_trunk)

        def infer(trainer, b):
            @torch.no_grad()
            def run():
                trainer.model.eval()
                trainer.rt.forward(b)
            return run

        flat = slices[stream].flatten(0, 1)[masks[stream].reshape(-1)].to(dev)
        threads = choose_threads(lambda: tail.trunk(flat), dev)
        # training cases with masks train with the auxiliary mask loss (its decoder and targets): the steps
        # are timed on a batch of whole stacks with their masks, built by each Trainer's own batcher
        step_batch, tail_step_batch, n_step = batch, cached, n
        with_mask_loss = t_tail.decoder is not None
        if with_mask_loss:
            seg_cases = prepared[:max(1, min(len(prepared), (max_slices_timed * batch_size) // max(1, len(whole[0]))))]
            step_batch = rt_full.batcher.batch(seg_cases, with_masks=True)
            tail_step_batch = rt_tail.batcher.batch(seg_cases, with_masks=True)
            n_step = int(sum(int(m.sum()) for m in step_batch.masks.values()))
        full_step = timed(lambda: t_full.step(step_batch, None), dev, repeats) / n_step
        full_fwd = timed(infer(t_full, batch), dev, repeats) / n
        # the frozen trunk as the trunk-cache fill will run it: through the engine of --engine (auto: measured)
        runner = frozen_engine(tail, stream, flat) if dev.type == "cpu" else None
        trunk_fwd = timed((lambda: runner(flat)) if runner is not None else (lambda: tail.trunk(flat)), dev,
                           repeats) / n
        h = tail.trunk(flat)
        tail_step = timed(lambda: t_tail.step(tail_step_batch, None), dev, repeats) / n_step
        tail_fwd = timed(infer(t_tail, cached), dev, repeats) / n
    del t_full, t_tail
    del full, tail, rt_full, rt_tail, bb
    return {**machine_info(device), **threads, "backbone": backbone_name, "size": int(size), "batch_size": batch_size,
            "slices_timed": n, "mask_loss_timed": with_mask_loss, "engine": engine_name(runner),
            "prep_s_per_volume": prep_s, "aug_s_per_volume": aug_s,
            "trunk_fwd_s": trunk_fwd, "trunk_bytes_per_slice": int(h[0].numel() * 4),
            "tail_step_s": tail_step, "tail_fwd_s": tail_fwd, "full_step_s": full_step, "full_fwd_s": full_fwd,
            "measure_s": round(time.perf_counter() - t_all, 2)}
