"""Last-layer class-to-patch attention of a timm ViT (DINOv2, DINOv2-reg, DINOv3/Eva with RoPE).

timm's attention modules use fused ``scaled_dot_product_attention``, which never materialises the
attention matrix. While capturing, the last block's attention is switched to timm's own unfused
path (``fused_attn = False``): it computes exactly the same q, k (qkv projection with any active
LoRA adapter, q_norm/k_norm, RoPE on the patch tokens for Eva/DINOv3), then
``softmax(q k^T * scale)`` and passes the matrix through ``attn_drop`` (identity at inference),
where a forward hook reads it. Re-deriving the matrix from timm's own code (instead of
re-implementing RoPE and the norms here) keeps it right when timm changes internals.

From each (B, heads, N, N) matrix we keep the class token's row (query 0), drop the columns of all
prefix tokens (class + register tokens: DINOv2-reg and DINOv3 have 4 registers) and average over
heads: (B, h*w) per slice, the paper's heatmap source.

Windowed-attention backbones (``kind == "hybrid"``, LiteMedSAM's TinyViT) have no class token and
no global attention matrix: they are refused here with a pointer to Grad-CAM (docs/heatmaps.md).
"""
from __future__ import annotations

import contextlib
from typing import Iterator

import torch

from ..errors import InputError


def _last_attention(backbone):
    model = backbone.model
    blocks = getattr(model, "blocks", None)
    attn = getattr(blocks[-1], "attn", None) if blocks is not None and len(blocks) else None
    if attn is None or not hasattr(attn, "attn_drop") or not hasattr(attn, "fused_attn"):
        raise InputError(f"backbone {backbone.name}: no timm ViT attention in its last block; "
                         "use the gradient method (--method gradcam) for this backbone")
    return attn


@contextlib.contextmanager
def capture_cls_attention(backbone) -> Iterator[list[torch.Tensor]]:
    """While active, every forward of ``backbone`` appends (B, h*w) class-to-patch attention
    (mean over heads, prefix/register tokens excluded) to the yielded list."""
    if getattr(backbone, "kind", None) == "hybrid":
        raise InputError(f"backbone {backbone.name} has windowed attention and no class token, so no class-to-patch "
                         "attention; use the gradient method (--method gradcam)")
    if getattr(backbone, "kind", None) != "vit":
        raise InputError(f"backbone {backbone.name} has no attention (kind {getattr(backbone, 'kind', '?')}); "
                         "use the gradient method (--method gradcam)")
    attn = _last_attention(backbone)
    npt = int(backbone.num_prefix_tokens)
    store: list[torch.Tensor] = []

    def hook(_module, _inputs, out):
        if out.ndim != 4 or out.shape[-1] != out.shape[-2]:
            raise RuntimeError(f"unexpected attention tensor {tuple(out.shape)} in {backbone.name}")
        store.append(out[:, :, 0, npt:].float().mean(dim=1).detach())

    old = attn.fused_attn
    handle = attn.attn_drop.register_forward_hook(hook)
    attn.fused_attn = False
    try:
        yield store
    finally:
        attn.fused_attn = old
        handle.remove()
