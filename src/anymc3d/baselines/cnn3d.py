"""3D CNN baselines trained from scratch (MONAI ResNet-18 / DenseNet-121) in the plugin's harness, and
``acs_lite0``: the ImageNet EfficientNet-Lite0 converted to 3D with ACS convolutions, fine-tuned (:mod:`.acs`).

The model takes the same batches as the plugin -- the canonical volume cut into axial slices at
the volume's own in-plane size (so no resampling), after the same MONAI 3D augmentation -- and
stacks the slices back into a volume (B, C, H, W, S). Several inputs (e.g. T1 and T2) become
channels. Everything else (focal loss, AdamW + cosine, early stopping on validation AUROC,
metrics) is the plugin trainer's, so the comparison differs only in the model.
"""
from __future__ import annotations

import torch
from torch import nn

from ..plugins.model import ModelOutput
from ..plugins.spec import PluginSpec

ARCHS = ("resnet18", "densenet121", "acs_lite0")


def build_net(arch: str, in_channels: int, n_out: int) -> nn.Module:
    from monai.networks import nets

    if arch == "resnet18":
        return nets.resnet18(spatial_dims=3, n_input_channels=in_channels, num_classes=n_out)
    if arch == "densenet121":
        return nets.DenseNet121(spatial_dims=3, in_channels=in_channels, out_channels=n_out)
    if arch == "acs_lite0":  # ImageNet EfficientNet-Lite0 (packaged weights) with ACS convolutions, fine-tuned
        from .acs import ACSEfficientNet

        return ACSEfficientNet("efficientnet_lite0", in_channels=in_channels, n_out=n_out)
    raise ValueError(f"unknown 3D CNN {arch!r}; choose one of {', '.join(ARCHS)}")


class Volume3DClassifier(nn.Module):
    """Duck-types :class:`anymc3d.plugins.model.AnyMC3D` for :func:`anymc3d.training.trainer.fit`."""

    #: smallest side each architecture's downsampling path accepts (DenseNet-121 pools 5 times)
    MIN_SIDE = {"resnet18": 16, "densenet121": 32}

    def __init__(self, spec: PluginSpec, arch: str, in_channels: int) -> None:
        super().__init__()
        self.spec = spec
        self.streams = spec.streams
        self.autocast = False
        self.last_k = None  # no shared 2D trunk to cache
        self.arch = arch
        self.net = build_net(arch, in_channels, spec.n_outputs)

    # the trainer's parameter interface: no LoRA group, every weight in the "head" group
    def lora_parameters(self) -> dict[str, nn.Parameter]:
        return {}

    def head_parameters(self) -> dict[str, nn.Parameter]:
        return dict(self.net.named_parameters())

    def n_trainable(self) -> int:
        return int(sum(p.numel() for p in self.net.parameters()))

    def set_trainable(self, flag: bool = True) -> None:
        for p in self.net.parameters():
            p.requires_grad_(flag)

    def trainable_state(self) -> dict[str, torch.Tensor]:
        # BatchNorm running statistics belong to the best state too
        return {k: v.detach().to("cpu", copy=True) for k, v in self.net.state_dict().items()}

    def load_trainable_state(self, state: dict[str, torch.Tensor]) -> None:
        self.net.load_state_dict(state)

    def forward(self, slices, slice_mask=None, present=None, keep_patches: bool = False, **kw) -> ModelOutput:
        vols = []
        for s in self.streams:
            x = slices[s]  # (B, S, C, H, W)
            vols.append(x.permute(0, 2, 3, 4, 1))  # (B, C, H, W, S)
        x = torch.cat(vols, dim=1)
        lo = self.MIN_SIDE.get(self.arch, 1)
        if min(x.shape[2:]) < lo:  # e.g. 28^3 into DenseNet-121: upsample trilinearly to at least 32 per side
            size = [max(lo, int(d)) for d in x.shape[2:]]
            x = torch.nn.functional.interpolate(x, size=size, mode="trilinear", align_corners=False)
        logits = self.net(x.float())
        b = x.shape[0]
        sw = {s: torch.zeros(b, slices[s].shape[1], device=x.device) for s in self.streams}
        return ModelOutput(logits, sw, torch.ones(b, len(self.streams), device=x.device))

    def probabilities(self, logits: torch.Tensor) -> torch.Tensor:
        if self.spec.task_type == "multiclass":
            return torch.softmax(logits, dim=-1)
        return torch.sigmoid(logits)
