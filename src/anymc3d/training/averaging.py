"""Averages of the plugin's trainable weights: an exponential moving average (EMA, ``anymc3d train --ema
DECAY``) and stochastic weight averaging (SWA, ``anymc3d train --swa FRACTION``).

* EMA: after every optimiser step each shadow weight moves toward its live weight: ``shadow += (1 - decay)
  * (live - shadow)`` (``torch._foreach_lerp_``).
* SWA (Izmailov et al., 2018): the equal-weight mean of the weights at the end of every epoch from
  epoch ceil(FRACTION x epochs) on (1-based; ``training.trainer.weight_average``), kept as a running
  mean: ``shadow += (live - shadow) / n``.

Validation, the best state and the saved plugin use the shadow weights; training continues from the live
ones. Before SWA's first epoch has ended there is no average, and the live weights are validated.

Why not ``torch.optim.swa_utils.AveragedModel`` or timm's ``ModelEmaV3``: both deep-copy the whole
module, here the frozen backbone with its LoRA adapters and the runtime's trunk cache bound to it, to
average a few hundred thousand plugin weights; this averages only those, in place.
"""
from __future__ import annotations

from contextlib import contextmanager

import torch


class WeightAverage:
    """Shadow copies of ``params`` (name -> trainable tensor), swapped into the model by :meth:`applied`."""

    def __init__(self, params: dict[str, torch.Tensor]) -> None:
        self.names = list(params)
        self.live = [params[k] for k in self.names]
        self.shadow = [p.detach().clone() for p in self.live]

    def ready(self) -> bool:
        """Whether there is an average to apply."""
        return True

    @contextmanager
    def applied(self):
        """The shadow weights in the model inside the block, the live ones back after it (the live ones
        throughout while there is no average yet)."""
        if not self.ready():
            yield
            return
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
            raise KeyError("the weight average's state does not match the trainable weights")
        with torch.no_grad():
            for k, s in zip(self.names, self.shadow):
                s.copy_(state[k].to(s.device))


class WeightEMA(WeightAverage):
    """The EMA of ``params`` with per-step ``decay`` in (0, 1)."""

    def __init__(self, params: dict[str, torch.Tensor], decay: float) -> None:
        if not 0.0 < decay < 1.0:
            raise ValueError(f"EMA decay must be in (0, 1), got {decay}")
        super().__init__(params)
        self.decay = float(decay)

    @torch.no_grad()
    def update(self) -> None:
        """One step: every shadow weight ``(1 - decay)`` of the way to its live weight."""
        torch._foreach_lerp_(self.shadow, [p.detach() for p in self.live], 1.0 - self.decay)


#: the key of the number of averaged epochs in SWA's state dict
SWA_COUNT = "__swa_count__"


class WeightSWA(WeightAverage):
    """The running equal-weight mean of ``params`` at the end of every epoch from ``start`` (1-based) on."""

    def __init__(self, params: dict[str, torch.Tensor], start: int) -> None:
        if int(start) < 1:
            raise ValueError(f"SWA's first epoch must be 1 or later, got {start}")
        super().__init__(params)
        self.start, self.count = int(start), 0

    def ready(self) -> bool:
        return self.count > 0

    @torch.no_grad()
    def end_epoch(self, epoch: int) -> None:
        """Epoch ``epoch`` (1-based) has ended: its weights join the mean from epoch ``start`` on."""
        if epoch < self.start:
            return
        self.count += 1
        torch._foreach_lerp_(self.shadow, [p.detach() for p in self.live], 1.0 / self.count)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {**super().state_dict(), SWA_COUNT: torch.tensor(self.count)}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        super().load_state_dict({k: v for k, v in state.items() if k != SWA_COUNT})
        self.count = int(state[SWA_COUNT])
