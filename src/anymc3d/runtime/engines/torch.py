"""The torch engine: PyTorch eager, exactly the path the plugins train with (always installed)."""
from __future__ import annotations

import torch

from .base import Engine, FrozenPass, Runner


class TorchEngine(Engine):
    name = "torch"

    def available(self) -> bool:
        return True

    def version(self) -> str:
        return torch.__version__

    def build(self, frozen: FrozenPass, example: torch.Tensor, cache, threads: int, amp: bool = False) -> Runner:
        @torch.no_grad()
        def run(x: torch.Tensor) -> torch.Tensor:
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
                return frozen(x).float()

        return Runner(self.name, run, "eager, bf16 autocast" if amp else "eager, fp32")
