"""An exponential moving average (EMA) of the plugin's trainable weights (``anymc3d train --ema DECAY``).

After every optimiser step each shadow weight moves toward its live weight: ``shadow += (1 - decay) *
(live - shadow)`` (``torch._foreach_lerp_``). Validation, the best state and the saved plugin use the
shadow weights; training continues from the live ones.

Why not ``torch.optim.swa_utils.AveragedModel`` or timm's ``ModelEmaV3``: both deep-copy the whole
module, here the frozen backbone with its LoRA adapters and the runtime's trunk cache bound to it, to
average a few hundred thousand plugin weights; this averages only those, in place.
"""
from __future__ import annotations

from contextlib import contextmanager

import torch


class WeightEMA:
    """The EMA of ``params`` (name -> trainable tensor) with per-step ``decay`` in (0, 1)."""

    def __init__(self, params: dict[str, torch.Tensor], decay: float) -> None:
        if not 0.0 < decay < 1.0:
            raise ValueError(f"EMA decay must be in (0, 1), got {decay}")
        self.decay = float(decay)
        self.names = list(params)
        self.live = [params[k] for k in self.names]
        self.shadow = [p.detach().clone() for p in self.live]

    @torch.no_grad()
    def update(self) -> None:
        """One step: every shadow weight ``(1 - decay)`` of the way to its live weight."""
        torch._foreach_lerp_(self.shadow, [p.detach() for p in self.live], 1.0 - self.decay)

    @contextmanager
    def applied(self):
        """The shadow weights in the model inside the block, the live ones back after it."""
        with torch.no_grad():
            saved = [p.detach().clone() for p in self.live]
            for p, s in zip(self.live, self.shadow):
                p.copy_(s)
        try:
            yield
        finally:
            with torch.no_grad():
                for p, s in zip(self.live, saved):
                    p.copy_(s)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {k: s.detach().cpu() for k, s in zip(self.names, self.shadow)}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        if sorted(state) != sorted(self.names):
            raise KeyError("EMA state does not match the trainable weights")
        with torch.no_grad():
            for k, s in zip(self.names, self.shadow):
                s.copy_(state[k].to(s.device))
