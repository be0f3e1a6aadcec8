"""CLI: ``anymc3d plugins list|info|add|remove --store DIR``, ``anymc3d cache info|clear --cache DIR``,
and the ``anymc3d predict --plugins DIR IMAGE...`` hand-off (``cmd_predict_all``)."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ..errors import InputError


def register(sub) -> dict:
    p = sub.add_parser("plugins", help="a plugin store: many tasks on one backbone (list | info | add | remove)")
    p.add_argument("--store", type=Path, help="the store folder")
    acts = p.add_subparsers(dest="plugins_action", required=True)
    ls = acts.add_parser("list", help="plugins in the store, with backbone compatibility")
    info = acts.add_parser("info", help="task, labels, views, parameters, backbone + fingerprint, training metrics")
    info.add_argument("name")
    add = acts.add_parser("add", help="copy a trained plugin (folder, .json or .safetensors) into the store")
    add.add_argument("plugin")
    add.add_argument("--name", help="name in the store (default: the plugin's task name)")
    add.add_argument("--replace", action="store_true", help="replace a plugin of the same name")
    rm = acts.add_parser("remove", help="delete a plugin from the store")
    rm.add_argument("name")
    for q in (ls, info, add, rm):
        q.add_argument("--store", type=Path, default=argparse.SUPPRESS, help="the store folder")
    for q in (ls, info):
        q.add_argument("--json", action="store_true", help="machine-readable output")

    c = sub.add_parser("cache", help="the activation cache of `train --cache DIR` (info | clear)")
    c.add_argument("cache_action", choices=["info", "clear"])
    c.add_argument("--cache", type=Path, required=True)
    return {"plugins": cmd_plugins, "cache": cmd_cache}


def cmd_plugins(a: argparse.Namespace) -> int:
    from .store import PluginStore

    if a.store is None:
        raise InputError("plugins: give the store folder with --store DIR")
    store = PluginStore(a.store)
    act = a.plugins_action
    if act == "add":
        e = store.add(a.plugin, name=a.name, replace=a.replace)
        print(f"added {e.name}: task {e.spec.task} ({e.spec.task_type}), backbone {e.spec.backbone} "
              f"({e.spec.backbone_fingerprint}) -> {e.path}")
        return 0
    if act == "remove":
        print(f"removed {a.name} ({store.remove(a.name)})")
        return 0
    if act == "info":
        d = store.info(a.name)
        if a.json:
            print(json.dumps(d, indent=2))
        else:
            _print_info(d)
        return 0
    # list
    target = store.target_backbone()
    rows = []
    for e in store.entries():
        if e.spec is None:
            rows.append({"name": e.name, "error": e.error})
            continue
        s = e.spec
        ok = target is not None and (s.backbone, s.backbone_fingerprint) == tuple(target)
        auc = (s.metrics.get("test") or s.metrics.get("val") or {}).get("auc")
        rows.append({"name": e.name, "task": s.task, "task_type": s.task_type, "labels": s.label_names,
                     "views": s.streams, "lora": ("r=0" if s.lora.r == 0 else
                                                  f"last_k={s.lora.last_k}" if s.lora.last_k else "full"),
                     "backbone": s.backbone, "fingerprint": s.backbone_fingerprint, "compatible": ok, "auc": auc})
    if a.json:
        print(json.dumps({"store": str(a.store), "backbone": list(target) if target else None, "plugins": rows}, indent=2))
        return 0
    print(f"store {a.store}: backbone {target[0]} ({target[1]})" if target else f"store {a.store}: empty")
    for r in rows:
        if "error" in r:
            print(f"  {r['name']:<20} UNREADABLE  {r['error']}")
            continue
        flag = "" if r["compatible"] else "  INCOMPATIBLE (other backbone/weights: skipped by predict)"
        auc = f"  AUC {r['auc']:.3f}" if isinstance(r["auc"], (int, float)) else ""
        print(f"  {r['name']:<20} {r['task_type']:<10} {','.join(r['views']):<28} LoRA {r['lora']:<9} "
              f"{r['backbone']} {r['fingerprint']}{auc}{flag}")
    return 0


def _print_info(d: dict) -> None:
    if "error" in d:
        print(f"{d['name']}: {d['error']}")
        return
    print(f"{d['name']}  ({d['path']})")
    print(f"  task        {d['task']} ({d['task_type']}); labels {', '.join(d['labels'])}; threshold {d['threshold']:.4g}")
    print(f"  views       {', '.join(d['streams'])}")
    print(f"  parameters  {d['parameters']:,}" if isinstance(d["parameters"], int) else f"  parameters  {d['parameters']}")
    lo = d["lora"]
    print(f"  plugin      {d['mode']}; LoRA r={lo['r']} alpha={lo['alpha']}")
    compat = {True: "matches the store's backbone", False: "DOES NOT match the store's backbone", None: ""}
    print(f"  backbone    {d['backbone']} {d['backbone_fingerprint']} (input {d['input_size']}) "
          f"{compat[d['compatible_with_store_backbone']]}")
    for inp, pre in d["preprocess"].items():
        print(f"  preprocess  {inp}: size {pre.get('size')}, intensity {pre.get('intensity')}, "
              f"orientation {pre.get('orientation')}, spacing {pre.get('spacing')}")
    for split, m in (d["metrics"] or {}).items():
        if isinstance(m, dict):
            print(f"  metrics     {split}: " + ", ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}"
                                                       for k, v in m.items()))
    if d["training"]:
        print("  training    " + ", ".join(f"{k} {v}" for k, v in d["training"].items()))
    t = d.get("trust") or {}
    cal, ood, conf = t.get("calibration"), t.get("ood"), t.get("conformal")
    size = (d.get("tensors") or {}).get("trust_bytes")
    print("  calibration " + ("null" if not cal else f"{cal['method']} (" + ", ".join(
        f"{k} {v:.4g}" for k, v in cal.items() if k in ("a", "b", "t")) + f"; {cal.get('n')} validation cases)"))
    print("  OOD         " + ("null" if not ood else
                              f"{ood['method']} on {ood['feature']} ({len(ood['streams'])} stream(s), " + (
                                  f"{ood['points']} points, {ood['neighbours']} neighbour(s), " if "points" in ood
                                  else f"k={ood.get('k')}, ") + f"{ood.get('n_reference')} training cases); flag above {ood['threshold']:.4g} "
                              f"(validation {ood['percentile']:g}th percentile)"
                              + (f"; {size / 1024:.0f} kB" if size else "")))
    print("  conformal   " + ("null" if not conf else f"{conf['score']} scores of {conf['n']} validation cases"))
    if t.get("note"):
        print(f"  note        {t['note']}")


def cmd_cache(a: argparse.Namespace) -> int:
    from ..runtime.cache import ActivationCache

    c = ActivationCache(a.cache)
    if a.cache_action == "clear":
        print(f"removed {c.clear()} entries from {a.cache}")
    else:
        print(f"{a.cache}: {len(c.entries())} entries, {c.size_bytes() / 2**20:.1f} MiB")
    return 0


# ---- predict --plugins DIR ------------------------------------------------------------------------
def _expand(images: list[str], inputs: list[str]):
    """Inputs of ``predict --plugins``: manifests use whichever of the store's image columns they have."""
    from ..inputs import expand_inputs

    return expand_inputs(images, inputs, strict=False)


def cmd_predict_all(a: argparse.Namespace, images: list[str]) -> int:
    """``anymc3d predict --plugins DIR IMAGE... --out OUT``: one JSON per volume with every task, written
    as each volume is done, sharded over the ranks under torchrun, resumable (``anymc3d.batch_predict``)."""
    from ..batch_predict import StoreJob, predict_to_folder, summary_line
    from ..runtime import distributed as dist
    from .multi import MultiPredictor

    if getattr(a, "heatmaps", False):
        raise InputError("predict: --heatmaps works with one PLUGIN, not with --plugins DIR (run `anymc3d explain` per task)")
    mp = MultiPredictor.from_store(a.plugins, weights=getattr(a, "weights", None),
                                   device=dist.rank_device(getattr(a, "device", "auto")))
    mp.coverage = getattr(a, "coverage", mp.coverage)  # every answer's conformal set (anymc3d.plugins.trust)
    if dist.is_main():
        for s in mp.skipped:
            print(f"anymc3d: skipped plugin {s['name']}: {s['reason']}", file=sys.stderr)
        print(f"backbone {mp.backbone.name} ({mp.backbone.fingerprint}) loaded once; tasks: {', '.join(mp.tasks)}")
    inputs = sorted({i for at in mp.attached for i in at.model.spec.inputs})
    items = _expand(images, inputs)

    def failed(r: dict) -> None:
        for f in r["tasks_failed"]:
            print(f"  {f['name']}: not run ({f['reason']})", file=sys.stderr)

    s = predict_to_folder(StoreJob(mp), items, a.out, overwrite=getattr(a, "overwrite", False),
                          input_check=not getattr(a, "no_input_check", False), warn=failed)
    if dist.is_main():
        print(summary_line(s, a.out))
    return 0
