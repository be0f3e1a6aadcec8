"""The process group of a ``torchrun`` launch: who am I, how many are we, and the few collectives
the verbs need (barrier, gather of Python objects, broadcast from rank 0).

``torchrun`` (and ``srun torchrun``, a Kubernetes PyTorchJob, ...) sets ``RANK``, ``WORLD_SIZE``,
``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT`` for every process. :func:`init_from_env` joins
the group they describe: NCCL when the run computes on CUDA, gloo otherwise. Without those
variables (a plain ``anymc3d train``), or with ``WORLD_SIZE=1``, nothing is initialised and every
helper answers for one process: rank 0 of 1, barriers are no-ops, a gather returns ``[obj]``.

Inference code (``predict --out``) and training (``anymc3d.training.distributed``: DDP, the
sampler, validation gathered across ranks) both use this module; it imports nothing of the project
but the device resolver.
"""
from __future__ import annotations

import os
from datetime import timedelta

#: seconds a rank waits in a collective for the others (a barrier while a slower rank finishes its
#: shard); ``ANYMC3D_DIST_TIMEOUT_S`` overrides it
DEFAULT_TIMEOUT_S = 2 * 3600


def env_world_size() -> int:
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        return 1


def launched() -> bool:
    """True under a launcher that describes a group of more than one process."""
    return env_world_size() > 1 and "RANK" in os.environ


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def is_initialized() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized()


def rank_device(device: str = "auto") -> str:
    """The device of this rank: under a launch, ``auto``/``cuda`` become ``cuda:LOCAL_RANK`` (one GPU per
    process, as torchrun's ``--nproc_per_node`` = GPUs per node intends); anything else is kept."""
    import torch

    text = (device or "auto").strip().lower()
    if launched() and text in ("auto", "cuda") and torch.cuda.is_available():
        n = torch.cuda.device_count()
        return f"cuda:{local_rank() % n}"
    return device


def init_from_env(device: str = "auto") -> bool:
    """Join the launcher's process group (idempotent). Returns True when running distributed.

    ``device`` is the verb's ``--device``: NCCL when it resolves to CUDA, gloo otherwise."""
    if not launched():
        return False
    import torch
    import torch.distributed as dist

    if dist.is_initialized():
        return True
    from .device import resolve_device

    dev = resolve_device(rank_device(device))
    backend = "nccl" if dev.type == "cuda" else "gloo"
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    timeout = timedelta(seconds=float(os.environ.get("ANYMC3D_DIST_TIMEOUT_S", DEFAULT_TIMEOUT_S)))
    kw = {"device_id": dev} if dev.type == "cuda" else {}
    dist.init_process_group(backend=backend, timeout=timeout, **kw)
    # one group for the life of the process: a job script that runs several verbs in one process
    # (train, then predict) reuses it instead of re-initialising on the launcher's store
    import atexit

    atexit.register(destroy)
    return True


def destroy() -> None:
    """Leave the process group (registered to run at exit); no-op when not initialised."""
    import torch.distributed as dist

    if is_initialized():
        dist.destroy_process_group()


def rank() -> int:
    import torch.distributed as dist

    return dist.get_rank() if is_initialized() else 0


def world_size() -> int:
    import torch.distributed as dist

    return dist.get_world_size() if is_initialized() else 1


def is_main() -> bool:
    """Rank 0 (or the only process): the one that writes checkpoints, logs, plugins and merged tables."""
    return rank() == 0


def barrier() -> None:
    import torch.distributed as dist

    if is_initialized():
        if dist.get_backend() == "nccl":
            import torch

            dist.barrier(device_ids=[torch.cuda.current_device()])
        else:
            dist.barrier()


def all_gather_object(obj) -> list:
    """Every rank's ``obj``, in rank order (``[obj]`` for one process). Objects travel pickled between
    the ranks of this job only; nothing is read from files."""
    import torch.distributed as dist

    if not is_initialized():
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj):
    """Rank 0's ``obj`` on every rank."""
    import torch.distributed as dist

    if not is_initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def shard(items: list, r: int | None = None, w: int | None = None) -> list:
    """This rank's share of ``items``: every ``world``-th one from position ``rank`` (round robin, so
    shards differ by at most one item and neighbouring inputs spread over the ranks)."""
    r = rank() if r is None else r
    w = world_size() if w is None else w
    return items[r::w]
