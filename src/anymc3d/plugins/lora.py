"""LoRA adapters on the frozen backbone via peft, one named adapter per (plugin, stream).

Several named adapters live side by side in one backbone (views of one plugin, or many plugins
on one shared backbone); ``activate`` switches which one the next forward pass uses.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

from peft import LoraConfig, inject_adapter_in_model
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn


#: the paper's LoRA rank and scale (docs/method.md): the one place these defaults are written
DEFAULT_RANK = 8
DEFAULT_ALPHA = 16.0


@dataclass
class LoraSpec:
    """r=0 disables LoRA (a pooling-only plugin on fully frozen features)."""

    r: int = DEFAULT_RANK
    alpha: float = DEFAULT_ALPHA
    dropout: float = 0.0
    last_k: int | None = None  # LoRA only on the last k blocks/stages ("shared trunk")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "LoraSpec":
        return cls(**d)


def add_adapter(model: nn.Module, name: str, targets: list[str], spec: LoraSpec) -> None:
    """Inject one LoRA adapter (B initialised to zero, so the adapted model starts equal to the frozen one)."""
    import warnings

    cfg = LoraConfig(r=spec.r, lora_alpha=spec.alpha, lora_dropout=spec.dropout,
                     target_modules=targets, init_lora_weights=True)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*peft_config.*")
        inject_adapter_in_model(cfg, model, adapter_name=name)


def adapter_parameters(model: nn.Module, name: str) -> dict[str, nn.Parameter]:
    """Parameters of one adapter, keyed by module path (adapter name removed, so files are name-independent)."""
    out = {}
    token = f".{name}."
    for key, p in model.named_parameters():
        if "lora_" in key and token in key + ".":
            out[key.replace(token, ".") if not key.endswith(f".{name}") else key[: -len(name) - 1]] = p
    return out


def activate(model: nn.Module, name: str | None) -> None:
    """Route the next forward pass through adapter ``name`` (None: plain frozen backbone).

    peft's ``set_adapter`` also flips ``requires_grad``; we keep gradients as they were, because
    several adapters (views) are trained together in one optimisation step.
    """
    for module in model.modules():
        if isinstance(module, BaseTunerLayer):
            saved = {k: p.requires_grad for k, p in module.named_parameters()}
            if name is None:
                module._disable_adapters = True
            else:
                module._disable_adapters = False
                if name in module.lora_A:
                    module.set_adapter(name)
                else:
                    module._disable_adapters = True
            for k, p in module.named_parameters():
                p.requires_grad_(saved[k])
