"""An AnyMC3D subclass whose per-stream slice pooling is one of the ablations' aggregators
(:func:`anymc3d.plugins.pooling.make_pool`: mean / max / attention / transformer).

The pools share :class:`~anymc3d.plugins.pooling.TaskQueryPool`'s contract, so the rest of the
model (view fusion, head, trainer, runtime) is unchanged.
"""
from __future__ import annotations

from torch import nn

from ..plugins.model import AnyMC3D
from ..plugins.pooling import POOLINGS, TaskQueryPool, make_pool

__all__ = ["POOLINGS", "AggregatorAnyMC3D", "make_pool"]

class AggregatorAnyMC3D(AnyMC3D):
    """AnyMC3D with another slice aggregation; optionally the whole 2D backbone fine-tuned.

    ``pooling`` in :data:`POOLINGS`. ``finetune_backbone=True`` makes every backbone weight trainable
    (the "fine-tuned 2D backbone + slice transformer" baseline; use LoRA r=0 with it). The trainer
    sees backbone weights in the LoRA optimiser group (lr_lora) and pools + head in the head group.
    Plugin files written from this model need this class to be read back (bench use only).
    """

    def __init__(self, backbone, spec, pooling: str = "attention", pool_kw: dict | None = None,
                 finetune_backbone: bool = False, **kw) -> None:
        super().__init__(backbone, spec, **kw)
        d = backbone.embed_dim
        self.pooling = pooling
        self.finetune_backbone = finetune_backbone
        self.slice_pool = nn.ModuleDict({s.replace(":", "__"): make_pool(pooling, d, **(pool_kw or {}))
                                         for s in self.streams})
        out_dim = next(iter(self.slice_pool.values())).out_dim
        self.view_pool = TaskQueryPool(out_dim)
        self.head = nn.Sequential(nn.Dropout(spec.head_dropout), nn.Linear(out_dim, spec.n_outputs))
        self._out_dim = out_dim

    def lora_parameters(self) -> dict[str, nn.Parameter]:
        out = super().lora_parameters()
        if self.finetune_backbone:
            for k, p in self.backbone.model.named_parameters():
                if "lora_" not in k:
                    out[f"backbone.{k}"] = p
        return out

    def head_parameters(self) -> dict[str, nn.Parameter]:
        out = {}
        for s in self.streams:
            for k, p in self.slice_pool[s.replace(":", "__")].named_parameters():
                out[f"pool.{s}.{k}"] = p
        out["query.fusion"] = self.view_pool.query
        for k, p in self.head.named_parameters():
            out[f"head.{k}"] = p
        return out

    def forward(self, slices, slice_mask=None, present=None, keep_patches: bool = False, **kw):
        # the parent pads missing streams with zeros of the backbone's width: fine for pools that keep it
        if self._out_dim != self.backbone.embed_dim and present is not None and not bool(present.all()):
            raise ValueError("AggregatorAnyMC3D: missing inputs are only supported with width-preserving pools")
        if self.finetune_backbone:
            self.backbone.model.eval()  # BatchNorm statistics stay frozen; weights still get gradients
        return super().forward(slices, slice_mask, present, keep_patches, **kw)
