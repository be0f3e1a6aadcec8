"""DINOv2 / DINOv3 ViTs (timm architectures) loaded from a local checkpoint file.

These weights cannot be fetched behind a firewall, so the user gives a file: the original
facebookresearch checkpoint (``*_pretrain.pth``) or a timm/safetensors export. timm's own
``checkpoint_filter_fn`` converts the original key layout and resamples position embeddings.
"""
from __future__ import annotations

import timm
import torch
from torch import nn

from ..errors import InputError
from .base import Backbone, BackboneOutput, base_modules
from .registry import register_backbone
from .weights import LocalWeights, load_state_dict_file, resolve_weights, seeded_init

# name -> (timm architecture, patch size, what the user must supply)
_VITS = {
    "dinov2_vits14": ("vit_small_patch14_dinov2", 14, "the DINOv2 ViT-S/14 checkpoint (dinov2_vits14_pretrain.pth)"),
    "dinov2_vitb14": ("vit_base_patch14_dinov2", 14, "the DINOv2 ViT-B/14 checkpoint (dinov2_vitb14_pretrain.pth)"),
    "dinov2_vitl14": ("vit_large_patch14_dinov2", 14, "the DINOv2 ViT-L/14 checkpoint (dinov2_vitl14_pretrain.pth)"),
    "dinov2_vits14_reg": ("vit_small_patch14_reg4_dinov2", 14, "the DINOv2 ViT-S/14 reg4 checkpoint (dinov2_vits14_reg4_pretrain.pth)"),
    "dinov3_vits16": ("vit_small_patch16_dinov3", 16, "the DINOv3 ViT-S/16 checkpoint (dinov3_vits16_pretrain_lvd1689m-*.pth)"),
    "dinov3_vitb16": ("vit_base_patch16_dinov3", 16, "the DINOv3 ViT-B/16 checkpoint (dinov3_vitb16_pretrain_lvd1689m-*.pth)"),
    "dinov3_vitl16": ("vit_large_patch16_dinov3", 16, "the DINOv3 ViT-L/16 checkpoint (dinov3_vitl16_pretrain_lvd1689m-*.pth)"),
}
#: name -> where its weights come from by default (anymc3d.backbones.weights)
SOURCES = {name: LocalWeights(name, hint) for name, (_, _, hint) in _VITS.items()}
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class ViTBackbone(Backbone):
    kind = "vit"

    @property
    def num_prefix_tokens(self) -> int:
        """Class token + register tokens; registers are never treated as patches (nor in heatmaps)."""
        return int(self.model.num_prefix_tokens)

    @property
    def patch_size(self) -> int:
        ps = self.model.patch_embed.patch_size
        return int(ps[0] if isinstance(ps, (tuple, list)) else ps)

    def _tokens(self, x: torch.Tensor) -> BackboneOutput:
        tokens = self.model.forward_features(x)  # (N, prefix + h*w, D), final norm applied
        h, w = x.shape[-2] // self.patch_size, x.shape[-1] // self.patch_size
        patches = tokens[:, self.num_prefix_tokens:].reshape(x.shape[0], h, w, -1)
        return BackboneOutput(cls=tokens[:, 0], patches=patches)

    def _is_eva(self) -> bool:
        return hasattr(self.model, "rope")

    def forward_trunk(self, x: torch.Tensor, last_k: int) -> torch.Tensor:
        m = self.model
        h = m.patch_embed(self.normalise(x))
        n = len(m.blocks) - last_k
        if self._is_eva():
            h, rope = m._pos_embed(h)
            h = m.norm_pre(h)
            for blk in m.blocks[:n]:
                h = blk(h, rope=rope)
            return h
        h = m.norm_pre(m.patch_drop(m._pos_embed(h)))
        return m.blocks[:n](h)

    def forward_tail(self, h: torch.Tensor, last_k: int) -> BackboneOutput:
        m = self.model
        side = int(round((h.shape[1] - self.num_prefix_tokens) ** 0.5))  # slices are square
        n = len(m.blocks) - last_k
        if self._is_eva():
            rope = m.rope.get_embed(shape=(side, side)) if m.rope is not None else None
            for blk in m.blocks[n:]:
                h = blk(h, rope=rope)
        else:
            h = m.blocks[n:](h)
        tokens = m.norm(h)
        patches = tokens[:, self.num_prefix_tokens:].reshape(h.shape[0], side, side, -1)
        return BackboneOutput(cls=tokens[:, 0], patches=patches)

    def block_names(self) -> list[str]:
        return [f"blocks.{i}" for i in range(len(self.model.blocks))]

    def lora_targets(self, last_k: int | None = None) -> list[str]:
        # Paper: patch embedding + attention q, k, v (timm fuses them in ``qkv``) + output projection.
        names = ["patch_embed.proj"] if last_k is None else []
        for n, m in base_modules(self.model):
            if isinstance(m, nn.Linear) and n.endswith(("attn.qkv", "attn.proj", "attn.q_proj", "attn.k_proj", "attn.v_proj")):
                names.append(n)
        return names if last_k is None else self._restrict_to_last_k(names, last_k)


def _filter_fn(arch: str):
    if "dinov3" in arch:
        from timm.models.eva import checkpoint_filter_fn
    else:
        from timm.models.vision_transformer import checkpoint_filter_fn
    return checkpoint_filter_fn


def build_vit(name: str, weights: str | None = None, input_size: int = 224) -> ViTBackbone:
    arch = _VITS[name][0]
    resolved = resolve_weights(SOURCES[name], weights)
    model = seeded_init(lambda: timm.create_model(arch, pretrained=False, num_classes=0, img_size=input_size,
                                                  dynamic_img_size=True))
    if not resolved.is_random:
        state = load_state_dict_file(resolved.path, name)
        try:
            state = _filter_fn(arch)(state, model)
            model.load_state_dict(state, strict=True)
        except (RuntimeError, KeyError, ValueError) as exc:
            first = str(exc).strip().splitlines()[0][:240]
            raise InputError(f"{resolved.path}: does not match {name} ({arch}): {first}") from exc
    return ViTBackbone(name, model, embed_dim=model.num_features, input_size=input_size,
                       mean=IMAGENET_MEAN, std=IMAGENET_STD, weights_source=resolved.source)


# ---- registration (timm-style: one builder per name) ---------------------------------------------
def _register(name: str) -> None:
    @register_backbone(name, weights_status=SOURCES[name].status)
    def builder(weights: str | None = None, input_size: int = 224) -> ViTBackbone:
        return build_vit(name, weights, input_size)

    builder.__name__ = builder.__qualname__ = name


for _name in _VITS:
    _register(_name)
