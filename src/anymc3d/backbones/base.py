"""The frozen 2D backbone contract: slices in, class embedding + patch tokens out."""
from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class BackboneOutput:
    """Per-slice outputs. ``cls``: (N, D) slice embedding; ``patches``: (N, h, w, D) last-block tokens."""

    cls: torch.Tensor
    patches: torch.Tensor


def tensors_fingerprint(named, seed: str = "") -> str:
    """``sha256:`` + 16 hex digits over ``seed`` and (name, tensor) pairs in the order given (names,
    shapes, dtypes, bytes)."""
    h = hashlib.sha256(seed.encode())
    for name, tensor in named:
        t = tensor.detach().to("cpu").contiguous().reshape(-1)
        h.update(name.encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(str(t.dtype).encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return "sha256:" + h.hexdigest()[:16]


def weights_fingerprint(module: nn.Module) -> str:
    """sha256 over the frozen weights (names, shapes, bytes): identifies *which* backbone a plugin was trained on.

    LoRA parameters are excluded so that the fingerprint is the same with or without adapters attached.
    """
    # peft wraps adapted layers; keep the frozen weight's own name
    return tensors_fingerprint((name.replace(".base_layer.", "."), t) for name, t in module.state_dict().items()
                               if "lora_" not in name)


class Backbone(nn.Module):
    """A frozen timm model wrapped to return class embedding and patch tokens per slice.

    Subclasses set ``kind`` ("cnn", "vit", or "hybrid": convolution stages + windowed attention without
    a class token, e.g. TinyViT), implement ``_tokens`` and ``lora_targets``.
    Input to ``forward`` is (N, C, H, W) in [0, 1] with C in {1, 3}; channel replication and the
    backbone's own normalisation happen here, so preprocessing never needs to know the backbone.
    """

    kind: str = "cnn"

    def __init__(self, name: str, model: nn.Module, embed_dim: int, input_size: int,
                 mean: tuple[float, ...], std: tuple[float, ...], weights_source: str) -> None:
        super().__init__()
        self.name = name
        self.model = model
        self.embed_dim = embed_dim
        self.input_size = input_size
        self.weights_source = weights_source
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)
        self.model.eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.fingerprint = weights_fingerprint(self.model)

    def train(self, mode: bool = True) -> "Backbone":
        # The backbone stays in eval mode (frozen BatchNorm statistics, no dropout) even while a plugin trains.
        super().train(mode)
        self.model.eval()
        return self

    def normalise(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        elif x.shape[1] != 3:
            raise ValueError(f"backbone {self.name} takes 1 or 3 channels, got {x.shape[1]}")
        return (x - self.mean) / self.std

    def forward(self, x: torch.Tensor) -> BackboneOutput:
        return self._tokens(self.normalise(x))

    def _tokens(self, x: torch.Tensor) -> BackboneOutput:  # pragma: no cover - abstract
        raise NotImplementedError

    # --- shared trunk: the first blocks (no LoRA when lora_last_k is set) and the adapted tail ---
    def forward_trunk(self, x: torch.Tensor, last_k: int) -> torch.Tensor:
        """Slices in [0, 1] -> activations before the last ``last_k`` blocks. Identical for every
        plugin whose LoRA sits only in those blocks, so it is computed once and shared (or cached)."""
        raise NotImplementedError

    def forward_tail(self, h: torch.Tensor, last_k: int) -> BackboneOutput:
        """Trunk activations -> the same outputs as ``forward`` (LoRA of the active adapter applies)."""
        raise NotImplementedError

    # --- LoRA placement -------------------------------------------------------------------
    def block_names(self) -> list[str]:
        """Ordered names of the sequential blocks (stages) used by ``lora_last_k``."""
        raise NotImplementedError

    def lora_targets(self, last_k: int | None = None) -> list[str]:
        """Fully qualified module names (relative to ``self.model``) that receive LoRA."""
        raise NotImplementedError

    def _restrict_to_last_k(self, names: list[str], last_k: int | None) -> list[str]:
        if last_k is None:
            return names
        blocks = self.block_names()
        if not 1 <= last_k <= len(blocks):
            raise ValueError(f"lora_last_k must be in 1..{len(blocks)} for {self.name}, got {last_k}")
        keep = tuple(b + "." for b in blocks[len(blocks) - last_k:])
        tail = [n for n in names if n.startswith(keep)]
        # Modules after the last block (e.g. a CNN's conv_head) belong to the tail as well.
        last_block_prefixes = tuple(b + "." for b in blocks)
        tail += [n for n in names if not n.startswith(last_block_prefixes) and self._after_blocks(n)]
        return sorted(set(tail), key=names.index)

    def _after_blocks(self, name: str) -> bool:
        return False


def base_modules(model: nn.Module):
    """(name, module) pairs of the original network, seeing through peft's LoRA wrappers.

    After one adapter is injected, ``blocks.0.conv_pw`` is a LoRA wrapper around
    ``blocks.0.conv_pw.base_layer``; adding a second adapter (another view or plugin) must target
    the same names, never the wrapper's own ``lora_A``/``lora_B`` layers."""
    for name, module in model.named_modules():
        if "lora_" in name or "lora_dropout" in name:
            continue
        if name.endswith(".base_layer"):
            yield name[: -len(".base_layer")], module
        elif not hasattr(module, "base_layer"):
            yield name, module
