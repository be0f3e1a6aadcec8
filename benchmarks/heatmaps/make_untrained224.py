"""Untrained plugins at 224 px (for timing only): EfficientNet-Lite0 (real weights) and DINOv2 ViT-S/14-reg (random)."""
import torch
from anymc3d.backbones import create_backbone
from anymc3d.plugins.model import AnyMC3D
from anymc3d.plugins import LoraSpec
from anymc3d.plugins.file import save_plugin
from anymc3d.plugins.spec import PluginSpec
from anymc3d.preprocess import PreprocessSpec
for name, weights in [("efficientnet_lite0", None), ("dinov2_vits14_reg", "random")]:
    bb = create_backbone(name, weights=weights, input_size=224)
    pre = PreprocessSpec(views=["axial"], size=224, intensity="ct", windows="abdomen")
    spec = PluginSpec(task="timing", task_type="binary", label_names=["absent", "present"], inputs=["image"],
                      preprocess={"image": pre.to_dict()}, backbone=bb.name, backbone_fingerprint=bb.fingerprint,
                      input_size=224, lora=LoraSpec(r=8))
    torch.manual_seed(0)
    save_plugin(AnyMC3D(bb, spec), f"runs/explain4/untrained224_{name}")
