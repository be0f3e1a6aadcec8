"""Per-slice gradient class activation maps with pytorch-grad-cam, unnormalised.

The plugin's head is linear and its slice-pooling weights sum to one, so a volume's logit is
exactly ``sum_s a_s * z_s`` with ``z_s = head(h_s)`` the slice's own logit. We therefore explain
``z_s[label]`` per slice (a small wrapper module maps slices -> per-slice logits through the
backbone, with the stream's LoRA adapter active, and the head) and weight slice ``s``'s map by
``a_s`` afterwards.

pytorch-grad-cam min-max normalises every map to [0, 1], which would erase how much evidence each
slice carries; :class:`RawGradCAM` keeps its activation/gradient machinery and the Grad-CAM
channel weights (spatially averaged gradients) but returns the raw ``ReLU(sum_k alpha_k A_k)``.
For EfficientNet at the last stage (``bn2``, after conv_head + BN + ReLU6) with global average
pooling this is the classic CAM: the map's mean is the slice logit minus the bias (before ReLU).

Coarse last stages: EfficientNet's last feature map has stride 32 (2x2 cells for a 64-pixel
slice). ``layers="last+stride16"`` (the CNN default) multiplies the last-stage map (upsampled)
with the stride-16 stage's Grad-CAM map, the usual way to sharpen a class map with a finer,
less class-specific one (the geometric mean keeps the scale). ``layers="last"`` uses the last
stage only.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from pytorch_grad_cam import GradCAM
from torch import nn

from ..errors import InputError
from ..plugins.lora import activate


DEFAULT_CNN_LAYERS = "last+s16"


class RawGradCAM(GradCAM):
    """GradCAM without pytorch-grad-cam's per-image min-max scaling and resizing: (N, h, w) >= 0."""

    def compute_cam_per_layer(self, input_tensor, targets, eigen_smooth):
        acts = [a.cpu().data.numpy() for a in self.activations_and_grads.activations]
        grads = [g.cpu().data.numpy() for g in self.activations_and_grads.gradients]
        out = []
        for i, layer in enumerate(self.target_layers):
            cam = self.get_cam_image(input_tensor, layer, targets, acts[i], grads[i], eigen_smooth)
            out.append(np.maximum(cam, 0)[:, None])
        return out

    def aggregate_multi_layers(self, cam_per_target_layer):
        return cam_per_target_layer  # one array per layer, each (N, 1, h, w); combined by the caller


class SliceLogits(nn.Module):
    """(N, C, H, W) slices -> (N, n_outputs) per-slice logits ``head(h_s)`` (fp32, no autocast).

    ``centre=True`` (multi-class) subtracts the mean over classes: softmax ignores it, so a class's
    centred logit is its evidence relative to the other classes.
    """

    def __init__(self, model, centre: bool = False) -> None:
        super().__init__()
        self.backbone = model.backbone
        self.head = model.head
        self.centre = centre

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.head(self.backbone(x).cls.float())
        return z - z.mean(dim=-1, keepdim=True) if self.centre else z


def target_layers(backbone, layers: str = "auto") -> tuple[list[nn.Module], object]:
    """Modules whose activations Grad-CAM weights, and a reshape for ViT token outputs.

    ViT: the last block's ``norm1`` (tokens -> (N, D, h, w), prefix/register tokens dropped).
    CNN: ``layers`` is ``+``-joined tokens: ``last`` (the last stage, ``bn2``) and ``s16`` / ``s8``
    (the last block stage at that stride, from timm's ``feature_info``); several layers are combined
    by a geometric mean. ``auto`` = ``last+s16``.
    """
    m = backbone.model
    if backbone.kind == "vit":
        npt = int(backbone.num_prefix_tokens)

        def reshape(t: torch.Tensor) -> torch.Tensor:
            n = t.shape[1] - npt
            side = int(round(n ** 0.5))
            return t[:, npt:].reshape(t.shape[0], side, n // side, t.shape[-1]).permute(0, 3, 1, 2)

        return [m.blocks[-1].norm1], reshape
    spec = DEFAULT_CNN_LAYERS if layers == "auto" else layers
    mods = []
    for tok in spec.split("+"):
        tok = tok.strip()
        if tok == "last":
            mod = getattr(m, "bn2", None) or getattr(m, "conv_head", None)
        elif tok.startswith("s") and tok[1:].isdigit():
            mod = None
            for info in getattr(m, "feature_info", []):
                if info.get("reduction") == int(tok[1:]) and str(info.get("module", "")).startswith("blocks."):
                    mod = m.get_submodule(info["module"])
        else:
            raise InputError(f"Grad-CAM layers: unknown token {tok!r} in {layers!r} (use last, s16, s8 joined by +)")
        if mod is None:
            raise InputError(f"backbone {backbone.name}: no layer for {tok!r} (Grad-CAM layers {layers!r})")
        mods.append(mod)
    return mods, None


def _combine(cams: list[np.ndarray], size: int) -> torch.Tensor:
    """Per-layer (N, 1, h_i, w_i) maps -> (N, size, size): one layer as is; two layers: geometric mean."""
    ups = [F.interpolate(torch.from_numpy(np.ascontiguousarray(c)).float(), size=(size, size), mode="bilinear",
                         align_corners=False)[:, 0] for c in cams]
    if len(ups) == 1:
        return ups[0]
    out = ups[0]
    for u in ups[1:]:
        out = out * u
    return out.clamp_min(0) ** (1.0 / len(ups))


class LogitTarget:
    """pytorch-grad-cam target: ``sign * logit[index]`` of one slice (sign -1: a binary task's negative label)."""

    def __init__(self, index: int, sign: float = 1.0) -> None:
        self.index, self.sign = int(index), float(sign)

    def __call__(self, output: torch.Tensor) -> torch.Tensor:
        return self.sign * output[..., self.index]


def slice_cams(model, stream: str, slices: torch.Tensor, targets: list[tuple[int, float]], layers: str = "auto",
               chunk: int = 32) -> dict[tuple[int, float], torch.Tensor]:
    """Raw Grad-CAM of each slice's own logit -> {(output index, sign): (S, size, size)}.

    ``slices``: (S, C, size, size) of one stream; the stream's LoRA adapter is activated first,
    so the maps explain the adapted model.
    """
    activate(model.backbone.model, model.adapters.get(stream))
    wrapper = SliceLogits(model, centre=model.spec.task_type == "multiclass")
    layer_mods, reshape = target_layers(model.backbone, layers)
    size = slices.shape[-1]
    targets = list(dict.fromkeys((int(i), float(sg)) for i, sg in targets))
    out: dict[tuple[int, float], list[torch.Tensor]] = {t: [] for t in targets}
    cam = RawGradCAM(wrapper, layer_mods, reshape_transform=reshape)
    cam.compute_input_gradient = True  # the backbone is frozen: gradients must flow from the input
    try:
        for i in range(0, slices.shape[0], chunk):
            x = slices[i:i + chunk].float()
            for t in targets:
                per_layer = cam(x, [LogitTarget(*t)] * x.shape[0])
                out[t].append(_combine(per_layer, size))
    finally:
        cam.activations_and_grads.release()
        wrapper.zero_grad(set_to_none=True)
    return {t: torch.cat(v) for t, v in out.items()}
