"""ACS convolutions: the project's ImageNet EfficientNet-Lite0 turned into a 3D network (MedMNIST's
strongest 3D baseline family, Yang et al., "Reinventing 2D Convolutions for 3D Images", IEEE JBHI 2021).

An ACS convolution keeps the 2D kernel ``(C_out, C_in/groups, k, k)`` and splits its *output* channels
in three (the first third gets the remainder, as in the authors' ``acsconv`` package): the first part
is applied in the planes normal to the first spatial axis, the second normal to the second axis, the
third normal to the third axis. Each part is exactly a 3D convolution whose ``k x k x k`` kernel is zero
except for the 2D kernel on its centre plane, so the pretrained weights carry over untouched.

Why not ``acsconv.converters.ACSConverter`` (PyPI ``ACSConv`` 0.1.1) itself -- it was tried on the timm
``tf_efficientnet_lite0`` that the project uses:

* ``Conv2dSame`` (timm's TF "same" padding, the five stride-2 convolutions) subclasses ``nn.Conv2d``, so the
  converter replaces it by a plain ACSConv with ``padding=0`` and the dynamic padding is lost;
* ``BatchNormAct2d`` is not a ``torch.nn`` class, so it is left 2D and asserts on a 5D input;
* the depthwise path of ``acsconv.operators.functional.acs_conv_f`` pads the whole input instead of the
  channel part when an output side is neither the input side nor half of it (e.g. 7 -> 4 in the third
  stride-2 stage at 28^3), and ``conv3d`` then fails on a channel mismatch;
* ``import acsconv.converters`` prints a notice on stdout, and the wheel requires fire, pandas,
  scikit-image and tensorboardX, which nothing here uses.

So this module implements the ACS operator (:func:`acs_conv3d`, checked against ``acsconv``'s operator in
``tests/test_acs.py`` where that package is installed) and converts every layer kind Lite0 contains;
anything it does not know raises instead of silently staying 2D. No network access: the weights are
the ones :mod:`anymc3d.backbones.efficientnet` reads from the installed wheel.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def acs_split(out_channels: int) -> tuple[int, int, int]:
    """Output channels per axis, ``acsconv``'s default: equal thirds, the remainder to the first parts."""
    q, r = divmod(out_channels, 3)
    return q + (r > 0), q + (r > 1), q


def _same_pad(size: int, k: int, s: int) -> tuple[int, int]:
    """TF "same" padding of one axis (timm's ``get_same_padding``): more on the far side when odd."""
    total = max((math.ceil(size / s) - 1) * s + k - size, 0)
    return total // 2, total - total // 2


def acs_conv3d(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, stride: int, padding: int | str,
               groups: int) -> torch.Tensor:
    """ACS convolution of ``x`` (B, C, D1, D2, D3) with the 2D kernel ``weight`` (C_out, C_in/groups, k, k).

    ``padding``: an int (symmetric zero padding on every axis, as ``nn.Conv2d(padding=p)``) or ``"same"``
    (TF "same" as timm's ``Conv2dSame``, on every axis). ``groups`` is 1 or depthwise (C_in == C_out)."""
    c_out, _, k, k2 = weight.shape
    if k != k2:
        raise ValueError(f"ACS convolution needs a square kernel, got {k}x{k2}")
    c_in = x.shape[1]
    depthwise = groups != 1
    if depthwise and not groups == c_in == c_out:
        raise ValueError(f"ACS convolution supports groups=1 or depthwise, got groups={groups} for {c_in}->{c_out}")
    if padding == "same":
        pads = [_same_pad(int(n), k, stride) for n in x.shape[2:]]
        x = F.pad(x, [p for lr in reversed(pads) for p in lr])  # F.pad lists the last axis first
        p = 0
    else:
        p = int(padding)
    sizes = x.shape[2:]
    n_out = [(int(n) + 2 * p - k) // stride + 1 for n in sizes]
    parts, start = [], 0
    for axis, n in enumerate(acs_split(c_out)):
        if n == 0:
            continue
        w = weight[start:start + n].unsqueeze(2 + axis)  # size 1 along this axis: the plane normal to it
        xi = x[:, start:start + n] if depthwise else x
        # the centre tap along `axis`: output o reads input o * stride - p + k // 2 (the k x k x k equivalent)
        if p:
            pad = [0] * 6
            pad[2 * (2 - axis)] = pad[2 * (2 - axis) + 1] = p
            xi = F.pad(xi, pad)
        xi = xi.narrow(2 + axis, k // 2, (n_out[axis] - 1) * stride + 1)
        pad3 = [p, p, p]
        pad3[axis] = 0
        parts.append(F.conv3d(xi, w, None, stride, tuple(pad3), 1, n if depthwise else 1))
        start += n
    out = torch.cat(parts, dim=1)
    if bias is not None:
        out = out + bias.view(1, -1, 1, 1, 1)
    return out


class ACSConv3d(nn.Module):
    """A converted ``nn.Conv2d``: same ``weight`` / ``bias`` tensors (2D shapes), applied as ACS in 3D."""

    def __init__(self, conv: nn.Conv2d) -> None:
        super().__init__()
        same = type(conv).__name__ == "Conv2dSame"  # timm: dynamic TF "same" padding, padding attribute is 0
        if conv.dilation != (1, 1) or len(set(conv.stride)) != 1 or len(set(conv.padding)) != 1 \
                or conv.padding_mode != "zeros":
            raise ValueError(f"ACS conversion supports square stride/padding, no dilation; got {conv}")
        self.in_channels, self.out_channels = conv.in_channels, conv.out_channels
        self.kernel_size = conv.kernel_size[0]
        self.stride = conv.stride[0]
        self.padding: int | str = "same" if same else conv.padding[0]
        self.groups = conv.groups
        self.weight = nn.Parameter(conv.weight.detach().clone())
        self.bias = nn.Parameter(conv.bias.detach().clone()) if conv.bias is not None else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return acs_conv3d(x, self.weight, self.bias, self.stride, self.padding, self.groups)

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
                f"padding={self.padding!r}, groups={self.groups}, acs_split={acs_split(self.out_channels)}")


class BatchNormAct3d(nn.BatchNorm3d):
    """timm's ``BatchNormAct2d`` in 3D: the same parameters and buffers (state-dict names kept), then its
    ``drop`` and ``act`` modules."""

    def __init__(self, bn: nn.BatchNorm2d) -> None:
        super().__init__(bn.num_features, bn.eps, bn.momentum, bn.affine, bn.track_running_stats)
        self.load_state_dict(bn.state_dict())
        self.drop = getattr(bn, "drop", nn.Identity())
        self.act = getattr(bn, "act", nn.Identity())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.drop(super().forward(x)))


# leaf modules with no spatial behaviour: they work on 5D tensors unchanged
_PASS = (nn.Identity, nn.ReLU, nn.ReLU6, nn.SiLU, nn.GELU, nn.Hardswish, nn.Hardsigmoid, nn.Sigmoid, nn.Dropout,
         nn.Linear, nn.Flatten)


def convert_to_acs(module: nn.Module) -> nn.Module:
    """Replace, in place, every ``Conv2d`` (incl. timm ``Conv2dSame``) by :class:`ACSConv3d` and every
    ``BatchNorm2d`` (incl. timm ``BatchNormAct2d``) by :class:`BatchNormAct3d`; raise on any other leaf with
    spatial behaviour (2D pooling, attention, ...). Parameters and buffers keep their names and values."""
    for name, child in module.named_children():
        if isinstance(child, nn.Conv2d):
            setattr(module, name, ACSConv3d(child))
        elif isinstance(child, nn.BatchNorm2d):
            setattr(module, name, BatchNormAct3d(child))
        elif isinstance(child, _PASS):
            continue
        elif list(child.children()):
            convert_to_acs(child)
        elif type(child).__name__ in ("SelectAdaptivePool2d", "AdaptiveAvgPool2d"):
            setattr(module, name, nn.Identity())  # the wrapper pools itself (mean over D1, D2, D3)
        else:
            raise ValueError(f"ACS conversion: no 3D counterpart for {type(child).__name__} ({name})")
    return module


class ACSEfficientNet(nn.Module):
    """EfficientNet-Lite with ImageNet weights, ACS-converted: volume (B, C, D1, D2, D3) in [0, 1] -> logits.

    A 1-channel volume is repeated to RGB and normalised as :meth:`Backbone.normalise` does for slices;
    with another channel count the stem's RGB kernel is averaged and tiled (timm's ``adapt_input_conv``).
    Then the converted trunk (``conv_stem`` ... ``bn2``), global average pooling, dropout and a new linear head."""

    def __init__(self, backbone_name: str = "efficientnet_lite0", in_channels: int = 1, n_out: int = 2,
                 weights: str | None = None, dropout: float = 0.2) -> None:
        super().__init__()
        from ..backbones import create_backbone

        bb = create_backbone(backbone_name, weights=weights)  # packaged wheel weights: offline
        self.source = bb.weights_source
        self.fingerprint_2d = bb.fingerprint
        trunk = bb.model
        trunk.global_pool, trunk.classifier = nn.Identity(), nn.Identity()
        self.trunk = convert_to_acs(trunk)
        self.trunk.train()
        for p in self.trunk.parameters():
            p.requires_grad_(True)  # fine-tuned end to end
        self.register_buffer("mean", bb.mean.view(1, 3, 1, 1, 1).clone(), persistent=False)
        self.register_buffer("std", bb.std.view(1, 3, 1, 1, 1).clone(), persistent=False)
        self.in_channels = in_channels
        if in_channels not in (1, 3):
            stem = self.trunk.conv_stem
            w = stem.weight.detach().mean(dim=1, keepdim=True).repeat(1, in_channels, 1, 1) * (3.0 / in_channels)
            stem.weight = nn.Parameter(w)
            stem.in_channels = in_channels
        self.drop = nn.Dropout(dropout)
        self.head = nn.Linear(bb.embed_dim, n_out)

    def normalise(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[1] != self.in_channels:
            raise ValueError(f"expected {self.in_channels} channels, got {x.shape[1]}")
        if self.in_channels == 1:
            x = x.expand(-1, 3, -1, -1, -1)
        if self.in_channels in (1, 3):
            return (x - self.mean) / self.std
        return (x - self.mean[:, :1]) / self.std[:, :1]  # the same per-channel constants (0.5, 0.5) for Lite

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.trunk.forward_features(self.normalise(x)).mean(dim=(2, 3, 4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.drop(self.features(x)))
