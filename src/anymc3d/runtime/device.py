"""Where the runtime computes: ``--device auto|cpu|cuda|cuda:N|mps`` and the precision policy.

``auto`` is CUDA when available, else Apple MPS, else the CPU. Policy per device type
(measured on the CPU for full-depth LoRA on EfficientNet-Lite0 at 64², one training step of
8 x 28 slices, one thread: fp32 10.0 ms per slice, bf16 autocast 11.0, channels_last + bf16 7.9,
``torch.compile`` 11.2):

* CUDA: bf16 autocast; channels_last for CNN backbones.
* CPU: bf16 autocast (``--no-amp`` turns it off) with channels_last for CNN backbones, the fastest
  of the four measured.
* MPS: fp32 (autocast on MPS is not used); channels_last for CNN backbones.

Plugins and cache entries are device-independent: everything that is saved is moved to the CPU.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from ..errors import InputError

if TYPE_CHECKING:
    import torch

DEVICE_CHOICES = "auto|cpu|cuda|cuda:N|mps"


def _mps_available() -> bool:
    import torch

    mps = getattr(torch.backends, "mps", None)
    return bool(mps is not None and mps.is_available())


def resolve_device(name: str | torch.device | None = "auto") -> torch.device:
    """``auto`` / ``cpu`` / ``cuda`` / ``cuda:N`` / ``mps`` -> a torch.device that exists here."""
    import torch  # here, so that `anymc3d --help` does not load torch

    if isinstance(name, torch.device):
        return name
    text = (name or "auto").strip().lower()
    if text == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if _mps_available():
            return torch.device("mps")
        return torch.device("cpu")
    if text == "cpu":
        return torch.device("cpu")
    if text == "mps":
        if not _mps_available():
            raise InputError("--device mps: Apple MPS is not available on this machine (use --device auto or cpu)")
        return torch.device("mps")
    if text == "cuda" or text.startswith("cuda:"):
        idx = text.partition(":")[2]
        if idx and not idx.isdigit():
            raise InputError(f"--device {name}: expected {DEVICE_CHOICES}")
        if not torch.cuda.is_available():
            raise InputError(f"--device {name}: no CUDA GPU is visible to PyTorch here "
                             f"(torch {torch.__version__}; use --device auto or cpu)")
        if idx and int(idx) >= torch.cuda.device_count():
            raise InputError(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s) here")
        return torch.device(text)
    raise InputError(f"--device {name}: expected {DEVICE_CHOICES}")


def amp_for(device: torch.device, requested: bool = True) -> bool:
    """bf16 autocast on CUDA and CPU (unless turned off), never on MPS."""
    return bool(requested) and device.type in ("cuda", "cpu")


def place(model, device: torch.device, amp: bool = True):
    """Move a plugin model (and its backbone) to ``device`` and set its precision / memory-format policy."""
    import torch

    model.to(device)
    model.autocast = amp_for(device, amp)
    if device.type == "cuda" and not amp:
        # fp32 means fp32: cuDNN's convolutions otherwise run in TF32 (10-bit mantissa) on Ampere and later,
        # and the CPU-vs-GPU difference is then bf16-sized (docs/runtime.md, "Devices")
        torch.backends.cudnn.allow_tf32 = False
        torch.backends.cuda.matmul.allow_tf32 = False
    if getattr(getattr(model, "backbone", None), "kind", None) == "cnn":
        model.backbone.to(memory_format=torch.channels_last)
        model.channels_last = True
    return model
