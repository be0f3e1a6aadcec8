"""Per-slice gradient class activation maps with pytorch-grad-cam, unnormalised.

The plugin's head is linear and its slice-pooling weights sum to one, so a volume's logit is
exactly ``sum_s a_s * z_s`` with ``z_s = head(h_s)`` the slice's own logit. We therefore explain
``z_s[label]`` per slice (:class:`SliceLogits` maps slices -> per-slice logits through the
backbone, with the stream's LoRA adapter active, and the head) and the caller weights slice ``s``'s
map by ``a_s``.

pytorch-grad-cam min-max normalises every map to [0, 1], which would erase how much evidence each
slice carries; :class:`RawGradCAM` keeps its activation/gradient hooks and Grad-CAM weighting but
returns raw ``ReLU(sum_k alpha_k A_k)`` maps (and, for ``lc-`` layers, LayerCAM's element-wise
``ReLU(sum_k ReLU(dz/dA_k) * A_k)``, Jiang et al. 2021).

Layer choice (``layers``, CNNs): tokens ``last`` (the last stage, ``bn2``: conv_head + BN + ReLU6,
whose Grad-CAM with a global-average-pooled linear head is the classic CAM: its mean is the slice
logit minus the bias), ``sN`` (the last block stage at stride N, from timm's ``feature_info``), an
``lc-`` prefix for LayerCAM; ``+`` joins layers (geometric mean of their upsampled maps).
``COARSE|FINE``: each slice's map is FINE's in-plane distribution (normalised to unit sum) times
COARSE's total, so the class-specific last stage decides how much evidence a slice carries and
the finer stages where it lies. EfficientNet's last stage has stride 32 (2x2 cells for a 64-pixel
slice), far too coarse to point at a small lesion, hence the default
``last|lc-s4+lc-s8`` (selected on the validation split, docs/heatmaps.md).

Hybrid backbones (``kind == "hybrid"``: LiteMedSAM's TinyViT) have windowed attention and no class
token, so their map is Grad-CAM on the last stage's output tokens (``stages[-1]``, a 1/4-resolution
grid: 16 × 16 cells for a 64-pixel slice), the only layer offered.
"""
from __future__ import annotations

import contextlib

import numpy as np
import torch
import torch.nn.functional as F
from pytorch_grad_cam import GradCAM
from torch import nn

from ..errors import InputError
from ..plugins.lora import activate

DEFAULT_CNN_LAYERS = "last|lc-s4+lc-s8"


class RawGradCAM(GradCAM):
    """GradCAM without per-image min-max scaling or resizing: one (N, 1, h, w) >= 0 array per layer.

    ``kinds[i]`` is "gradcam" (channel weights = spatially averaged gradients) or "layercam".
    """

    kinds: list[str] | None = None

    def compute_cam_per_layer(self, input_tensor, targets, eigen_smooth):
        acts = [a.cpu().data.numpy() for a in self.activations_and_grads.activations]
        grads = [g.cpu().data.numpy() for g in self.activations_and_grads.gradients]
        kinds = self.kinds or ["gradcam"] * len(self.target_layers)
        out = []
        for i, layer in enumerate(self.target_layers):
            if kinds[i] == "layercam":
                cam = (np.maximum(grads[i], 0) * acts[i]).sum(axis=1)
            else:
                cam = self.get_cam_image(input_tensor, layer, targets, acts[i], grads[i], eigen_smooth)
            out.append(np.maximum(cam, 0)[:, None])
        return out

    def aggregate_multi_layers(self, cam_per_target_layer):
        return cam_per_target_layer  # combined by the caller


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


class LogitTarget:
    """pytorch-grad-cam target: ``sign * logit[index]`` of one slice (sign -1: a binary task's negative label)."""

    def __init__(self, index: int, sign: float = 1.0) -> None:
        self.index, self.sign = int(index), float(sign)

    def __call__(self, output: torch.Tensor) -> torch.Tensor:
        return self.sign * output[..., self.index]


def _vit_reshape(npt: int):
    def reshape(t: torch.Tensor) -> torch.Tensor:  # (N, prefix + h*w, D) -> (N, D, h, w), prefix dropped
        n = t.shape[1] - npt
        side = int(round(n ** 0.5))
        return t[:, npt:].reshape(t.shape[0], side, n // side, t.shape[-1]).permute(0, 3, 1, 2)
    return reshape


def _cnn_layer(backbone, tok: str, layers: str) -> nn.Module:
    m = backbone.model
    mod = None
    if tok == "last":
        mod = getattr(m, "bn2", None) or getattr(m, "conv_head", None)
    elif tok.startswith("s") and tok[1:].isdigit():
        for info in getattr(m, "feature_info", []):
            if info.get("reduction") == int(tok[1:]) and str(info.get("module", "")).startswith("blocks."):
                mod = m.get_submodule(info["module"])
    else:
        raise InputError(f"--cam-layers {layers!r}: unknown layer {tok!r} (use last, s4, s8, s16, an lc- prefix, "
                         "+ to join, | between coarse and fine)")
    if mod is None:
        raise InputError(f"backbone {backbone.name}: no layer {tok!r} for --cam-layers {layers!r}")
    return mod


def parse_layers(backbone, layers: str = "auto"):
    """-> (modules, kinds, groups, reshape): groups = [coarse indices] or [coarse, fine] into modules.

    ViT: the last block's ``norm1`` (prefix and register tokens dropped), plain Grad-CAM.
    Hybrid (TinyViT, windowed attention, no class token): the last stage's output tokens
    (N, D, h, w), plain Grad-CAM; with the average-pooled linear head this is the classic CAM.
    """
    if backbone.kind == "vit":
        return [backbone.model.blocks[-1].norm1], ["gradcam"], [[0]], _vit_reshape(int(backbone.num_prefix_tokens))
    if backbone.kind == "hybrid":
        if layers not in ("auto", "last"):
            raise InputError(f"--cam-layers {layers!r}: backbone {backbone.name} supports only 'last' "
                             "(Grad-CAM on its last stage's tokens)")
        return [backbone.model.stages[-1]], ["gradcam"], [[0]], None
    spec = DEFAULT_CNN_LAYERS if layers == "auto" else layers
    parts = spec.split("|")
    if len(parts) > 2 or not all(p.strip() for p in parts):
        raise InputError(f"--cam-layers {layers!r}: at most one '|' (COARSE|FINE)")
    mods, kinds, groups = [], [], []
    for part in parts:
        idx = []
        for tok in part.split("+"):
            tok = tok.strip()
            kinds.append("layercam" if tok.startswith("lc-") else "gradcam")
            mods.append(_cnn_layer(backbone, tok[3:] if tok.startswith("lc-") else tok, layers))
            idx.append(len(mods) - 1)
        groups.append(idx)
    # pytorch-grad-cam stores activations/gradients in execution order, not list order: sort by it
    position = {id(mod): i for i, mod in enumerate(backbone.model.modules())}
    order = sorted(range(len(mods)), key=lambda i: (position[id(mods[i])], i))
    new_index = {old: new for new, old in enumerate(order)}
    return ([mods[i] for i in order], [kinds[i] for i in order],
            [[new_index[i] for i in g] for g in groups], None)


def _geo_mean(cams: list[np.ndarray], size: int) -> torch.Tensor:
    """Per-layer (N, 1, h_i, w_i) maps -> (N, size, size), bilinear; several layers: geometric mean."""
    ups = [F.interpolate(torch.from_numpy(np.ascontiguousarray(c)).float(), size=(size, size), mode="bilinear",
                         align_corners=False)[:, 0].clamp_min(0) for c in cams]
    out = ups[0]
    for u in ups[1:]:
        out = out * u
    return out if len(ups) == 1 else out ** (1.0 / len(ups))


def combine(per_layer: list[np.ndarray], groups: list[list[int]], size: int) -> torch.Tensor:
    coarse = _geo_mean([per_layer[i] for i in groups[0]], size)
    if len(groups) == 1:
        return coarse
    fine = _geo_mean([per_layer[i] for i in groups[1]], size)
    total = coarse.sum(dim=(1, 2), keepdim=True)
    return fine / fine.sum(dim=(1, 2), keepdim=True).clamp_min(1e-12) * total


@contextlib.contextmanager
def _gradients_from(model, first_layer: nn.Module):
    """Backpropagate only from the logits down to ``first_layer``: every parameter is frozen for the
    duration (no weight gradients) and ``first_layer``'s output becomes the root of the graph, so the
    backward pass skips the stem (and, for a ViT, all blocks but the last)."""
    saved = [(p, p.requires_grad) for p in model.parameters()]
    for p, _ in saved:
        p.requires_grad_(False)

    def start(_module, _inputs, out):
        if isinstance(out, torch.Tensor) and not out.requires_grad:
            out.requires_grad_(True)
        return out

    handle = first_layer.register_forward_hook(start)
    try:
        yield
    finally:
        handle.remove()
        for p, flag in saved:
            p.requires_grad_(flag)


def slice_cams(model, stream: str, slices: torch.Tensor, targets: list[tuple[int, float]], layers: str = "auto",
               chunk: int = 32) -> dict[tuple[int, float], torch.Tensor]:
    """Raw class activation maps of each slice's own logit -> {(output index, sign): (S, size, size)}.

    ``slices``: (S, C, size, size) of one stream; the stream's LoRA adapter is activated first,
    so the maps explain the adapted model. One forward + backward per chunk and target.
    """
    activate(model.backbone.model, model.adapters.get(stream))
    wrapper = SliceLogits(model, centre=model.spec.task_type == "multiclass")
    mods, kinds, groups, reshape = parse_layers(model.backbone, layers)
    size = slices.shape[-1]
    targets = list(dict.fromkeys((int(i), float(sg)) for i, sg in targets))
    out: dict[tuple[int, float], list[torch.Tensor]] = {t: [] for t in targets}
    with _gradients_from(model, mods[0]):  # registered before pytorch-grad-cam's hooks, so it runs first
        cam = RawGradCAM(wrapper, mods, reshape_transform=reshape)
        cam.kinds = kinds
        try:
            for i in range(0, slices.shape[0], chunk):
                x = slices[i:i + chunk].float()
                for t in targets:
                    out[t].append(combine(cam(x, [LogitTarget(*t)] * x.shape[0]), groups, size))
        finally:
            cam.activations_and_grads.release()
    return {t: torch.cat(v) for t, v in out.items()}
