"""Where the runtime computes: ``--device auto|cpu|cuda|cuda:N|mps`` and the precision policy.

``auto`` is CUDA when available, else Apple MPS, else the CPU. Policy per device type
(measured on the CPU for full-depth LoRA on EfficientNet-Lite0 at 64², one training step of
8 x 28 slices, one thread: fp32 10.0 ms per slice, bf16 autocast 11.0, channels_last + bf16 7.9,
``torch.compile`` 11.2):

* CUDA: bf16 autocast; channels_last for CNN backbones.
* CPU with AVX-512 (where those figures were measured): bf16 autocast (``--no-amp`` turns it off)
  with channels_last for CNN backbones, the fastest of the four measured.
* CPU without AVX-512 (AVX2 only, e.g. many AMD EPYC and older Intel machines): fp32. There torch's
  CPU bf16 kernels are emulated: the frozen trunk of EfficientNet-Lite0 at 64², 28 slices, one thread,
  took 30.9 ms per slice under bf16 autocast against 2.5 ms in fp32 (an AMD EPYC, AVX2,
  docs/results.md "CPU precision"), so a training plan there saw 12x the cost of every step.
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


def cpu_bf16_fast() -> bool:
    """Whether this CPU runs torch's bf16 kernels natively enough for autocast to pay: AVX-512 (its
    bf16 and AMX extensions included); False on AVX2-only and other CPUs, where bf16 is emulated."""
    import torch

    cpu = torch.cpu
    for probe in ("_is_avx512_bf16_supported", "_is_amx_tile_supported", "_is_avx512_supported"):
        fn = getattr(cpu, probe, None)
        if fn is not None and fn():
            return True
    return torch.backends.cpu.get_cpu_capability().upper().startswith("AVX512")


def amp_for(device: torch.device, requested: bool = True) -> bool:
    """bf16 autocast on CUDA, and on a CPU where bf16 is fast (:func:`cpu_bf16_fast`), unless turned
    off; never on MPS."""
    if not requested:
        return False
    if device.type == "cuda":
        return True
    return device.type == "cpu" and cpu_bf16_fast()


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
