"""The method registry: name -> callable(task, out_dir, seed, options) -> normalised metrics.

Every method runs on the same :class:`~anymc3d.data.TaskData` (same splits, same canonical
preprocessing, same metric code) and returns a dict with at least ``auc``, ``acc``,
``acc_at_0.5`` (binary), ``ci`` (bootstrap 95 % CIs of the test AUC / ACC), ``trainable_params``,
``train_s``, ``infer_s_per_volume``.

Kinds (what a cell costs on a CPU):

* ``cached`` -- frozen backbone features computed once per task and view set, shared by all
  cached methods and seeds (``DIR/cache``); the head fits in seconds.
* ``plugin`` -- the backbone runs (with LoRA) on every augmented training volume every epoch.
* ``cnn3d`` -- a 3D CNN trained from scratch.

Add your own with :func:`register_method`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from ..errors import InputError

#: General options a method may read (CLI --size/--epochs/..., ``--set k=v``, suite ``options:``).
DEFAULT_OPTIONS: dict[str, Any] = {
    "backbone": "efficientnet_lite0",
    "weights": None,
    "size": None,            # slice side given to the 2D backbone (None: the backbone's, 224)
    "epochs": 30,            # plugin / 3D CNN epochs
    "batch_size": 8,
    "patience": 10,
    "lr_lora": 1e-4,         # the bench protocol's (its stored cells); `anymc3d train`'s is TrainConfig.lr_lora
    "lr_head": 1e-3,
    "loss": "focal",
    "amp": True,
    "augment": True,
    "max_slices": None,
    "head_epochs": 100,      # frozen-feature heads (cached methods)
    "cnn_lr": 1e-3,
    "cnn_batch_size": 16,
    "trunk_cache": None,     # plugin methods: disk cache of frozen trunk activations (None: DIR/cache/trunk)
    "device": "auto",        # auto | cpu | cuda | cuda:N | mps (the device used is in every cell fingerprint)
    "workers": 0,            # DataLoader worker processes
    "budget": "30m",         # method `plan`: the time budget of `anymc3d train` (the plan fits it)
    "timings": None,         # method `plan`: a timings.json to plan from (default: time this machine now)
    "embed_norm": "auto",    # plugin methods: slice-embedding normalisation (auto: the backbone's; none | center_scale)
}

# which general options change a method's result (the cell fingerprint uses only these)
_USES = {
    "cached": ("backbone", "weights", "size", "max_slices", "head_epochs", "loss"),
    "plugin": ("backbone", "weights", "size", "max_slices", "epochs", "batch_size", "patience", "lr_lora", "lr_head",
               "loss", "amp", "augment"),
    "cnn3d": ("epochs", "cnn_batch_size", "patience", "cnn_lr", "loss", "augment"),
    "plan": ("backbone", "weights", "budget", "max_slices", "timings"),
}


@dataclass
class Method:
    name: str
    fn: Callable[..., dict]
    kind: str
    description: str
    fixed: dict = field(default_factory=dict)

    def relevant_options(self, options: dict) -> dict:
        keys = _USES.get(self.kind, tuple(options))
        out = {**{k: options.get(k) for k in keys}, **self.fixed}
        if self.kind in ("plugin", "plan"):
            # the resolved normalisation, named only where there is one: cells from before it keep their fingerprint
            norm = _embed_norm(options)
            if norm != "none":
                out["embed_norm"] = norm
        return out

    def run(self, task, out: Path, seed: int, options: dict) -> dict:
        """Call ``fn``: fixed values that name a general option (e.g. ``size``) override it, the rest are kwargs."""
        overrides = {k: v for k, v in self.fixed.items() if k in DEFAULT_OPTIONS}
        kwargs = {k: v for k, v in self.fixed.items() if k not in DEFAULT_OPTIONS}
        return self.fn(task, out, seed, {**options, **overrides}, **kwargs)


METHODS: dict[str, Method] = {}


def register_method(name: str, fn: Callable[..., dict], kind: str, description: str, **fixed) -> Method:
    """``fn(task, out_dir, seed, options, **fixed) -> metrics``; ``kind`` in cached | plugin | cnn3d | other.

    A fixed value whose name is a general option (``size=112``) replaces that option for this method only, so
    one bench run can hold rows at several slice sizes."""
    m = Method(name, fn, kind, description, fixed)
    METHODS[name] = m
    return m


def get_method(name: str) -> Method:
    if name not in METHODS:
        raise InputError(f"unknown method {name!r}; known: {', '.join(METHODS)}")
    return METHODS[name]


# ---------------------------------------------------------------------------------- helpers
# Training methods pass resume=True: fit() continues from OUT/checkpoint.pt when one exists, and the
# runner (runner.prepare_workdir) has already deleted any checkpoint that other options wrote.
def _device(o: dict) -> str:
    """The option's device; under torchrun on CUDA, this rank's own GPU (``cuda:LOCAL_RANK``)."""
    from ..runtime.distributed import rank_device

    return rank_device(str(o.get("device", "auto")))


def _embed_norm(o: dict) -> str:
    """The method's slice-embedding normalisation, with ``auto`` resolved for its backbone."""
    from ..backbones import default_embed_norm
    from ..plugins.embed_norm import EMBED_NORMS

    norm = str(o.get("embed_norm") or "auto")
    if norm == "auto":
        return default_embed_norm(str(o.get("backbone") or DEFAULT_OPTIONS["backbone"]))
    if norm not in EMBED_NORMS:
        raise InputError(f"bench: embed_norm must be auto, {' or '.join(EMBED_NORMS)}, got {norm!r}")
    return norm


def _train_config(o: dict, seed: int, cnn: bool = False):
    from ..training.trainer import TrainConfig

    if cnn:
        extra = {"seg_weight": 0.0} if "seg_weight" in TrainConfig.__dataclass_fields__ else {}  # no patch tokens
        return TrainConfig(epochs=int(o["epochs"]), batch_size=int(o["cnn_batch_size"]), seed=seed, loss=o["loss"],
                           lr_head=float(o["cnn_lr"]), wd_head=1e-4, patience=int(o["patience"]),
                           augment=bool(o["augment"]), amp=False, progress=bool(o.get("progress", False)),
                           device=_device(o), workers=int(o.get("workers", 0)), **extra)
    # the trunk cache only holds what the frozen part computes anyway (same bf16 tensors as the in-memory
    # cache), so it does not change a result and is not part of the cell fingerprint
    cache = o.get("trunk_cache") or (str(Path(o["cache_dir"]) / "trunk") if o.get("cache_dir") else None)
    return TrainConfig(epochs=int(o["epochs"]), batch_size=int(o["batch_size"]), seed=seed, loss=o["loss"],
                       lr_lora=float(o["lr_lora"]), lr_head=float(o["lr_head"]), patience=int(o["patience"]),
                       augment=bool(o["augment"]), amp=bool(o["amp"]), progress=bool(o.get("progress", False)),
                       cache_dir=cache, device=_device(o), workers=int(o.get("workers", 0)), embed_norm=_embed_norm(o))


def normalise(m: dict, **extra) -> dict:
    """Train-plugin-style metrics -> the bench cell schema. Under torchrun only rank 0 has metrics (the
    other ranks' training returns ``{"rank_summary": ...}``); their cell is not written."""
    if "rank_summary" in m:
        return {"rank_summary": True}
    test = m.get("test") or {}
    ci = test.get("ci") or {}
    out = {
        "auc": m.get("auc"), "acc": m.get("acc"), "acc_at_0.5": m.get("acc_at_0.5", test.get("acc_at_0.5", m.get("acc"))),
        "ci": {"auc": ci.get("auc"), "acc": ci.get("acc")},
        "trainable_params": int(m["trainable_params"]),
        "train_s": float(m.get("train_s", m.get("train_wall_s", float("nan")))),
        "infer_s_per_volume": float(m.get("infer_s_per_volume", test.get("infer_s_per_volume", float("nan")))),
        "val_auc": (m.get("val") or {}).get("auc"), "n_test": test.get("n"), "threshold": m.get("threshold"),
        "n_train": m.get("n_train"), "epochs_run": m.get("epochs_run"),
    }
    out.update(extra)
    return out


def _log(o: dict):
    return o.get("log") or (lambda *a, **k: None)


# ---------------------------------------------------------------------------------- cached (frozen features)
_BACKBONES: dict = {}


def _backbone(o: dict):
    from ..backbones import create_backbone

    key = (o["backbone"], o["weights"], o["size"])
    if key not in _BACKBONES:
        _BACKBONES.clear()
        _BACKBONES[key] = create_backbone(o["backbone"], weights=o["weights"], input_size=o["size"])
    return _BACKBONES[key]


def _cache(task, o: dict, views, seed: int):
    from ..baselines.frozen import FeatureCache

    # official splits (MedMNIST, manifests with a split column) do not depend on the seed: share the cache
    has_splits = all(c.split in ("train", "val", "test") for c in task.cases if c.label is not None)
    return FeatureCache(task, _backbone(o), list(views), o["size"], o["cache_dir"], seed=0 if has_splits else seed,
                        progress=bool(o.get("progress", False)), log=_log(o), device=str(o.get("device", "auto")))


def m_linear_probe(task, out: Path, seed: int, o: dict, views=("axial",), train_fraction: float = 1.0) -> dict:
    from ..baselines.frozen import linear_probe_from_cache

    res = linear_probe_from_cache(_cache(task, o, views, seed), train_fraction=train_fraction, seed=seed)
    return normalise(res, detail=res["method_detail"])


def m_frozen_pool(task, out: Path, seed: int, o: dict, pooling="attention", views=("axial",),
                  train_fraction: float = 1.0) -> dict:
    from ..baselines.frozen import train_pool_head

    res = train_pool_head(_cache(task, o, views, seed), pooling=pooling, seed=seed, epochs=int(o["head_epochs"]),
                          loss=o["loss"], train_fraction=train_fraction)
    return normalise(res, detail=res["method_detail"])


# ---------------------------------------------------------------------------------- plugin and its ablations
def m_plugin(task, out: Path, seed: int, o: dict, views=("axial",), r: int | None = None, alpha: float | None = None,
             last_k: int | None = None, train_fraction: float = 1.0, pooling: str = "attention") -> dict:
    from ..plugins import LoraSpec
    from ..training.run import PreprocessOptions, train_plugin

    pre = PreprocessOptions(views=list(views), size=o["size"], max_slices=o["max_slices"])
    lora = LoraSpec(**{k: v for k, v in (("r", r), ("alpha", alpha)) if v is not None}, last_k=last_k)
    cfg = _train_config(o, seed)
    if pooling == "attention":
        m = train_plugin(task, o["backbone"], out, weights=o["weights"], preprocess=pre, lora=lora, config=cfg,
                         train_fraction=train_fraction, resume=True, log=_log(o))
    else:
        from ..baselines.variant import train_aggregator_plugin

        m = train_aggregator_plugin(task, o["backbone"], out, pooling=pooling, weights=o["weights"], preprocess=pre,
                                    lora=lora, config=cfg, train_fraction=train_fraction, resume=True,
                                    log=_log(o))
    return normalise(m, detail=f"LoRA r={r} last_k={last_k} + {pooling} pooling, views {','.join(views)}")


def m_plan(task, out: Path, seed: int, o: dict) -> dict:
    """What ``anymc3d train DATA`` does with no options: plan (fingerprint + timings on this machine,
    within ``budget``), then train with the plan's settings. The plan depends on the machine's
    measured speed, so this cell's fingerprint holds the budget, not the chosen settings."""
    import json

    from ..planning import Plan, plan_for
    from ..planning.cli import plan_on_rank0, read_timings
    from ..planning.planner import SETTINGS, member_plan
    from ..plugins import LoraSpec
    from ..training.run import PreprocessOptions, train_plugin
    from ..training.trainer import TrainConfig

    out = Path(out)
    saved = out / "plan.json"

    def make() -> Plan:
        if saved.is_file():  # a resumed cell keeps its plan
            return Plan.from_dict(json.loads(saved.read_text()))
        plan, _, _ = plan_for(task, o["backbone"], o.get("budget") or "30m", device=str(o.get("device", "auto")),
                              weights=o["weights"], out=out, timings=read_timings(o.get("timings")), log=_log(o),
                              overrides={"max_slices": o["max_slices"]} if o.get("max_slices") else None)
        return plan

    plan = plan_on_rank0(make)  # torchrun: rank 0 plans (it times this machine) and sends the plan on

    def train_one(member: dict, folder: Path, resume: bool) -> dict:
        st = plan_d = member_plan(plan.to_dict(), member)
        pre = PreprocessOptions(views=list(st["views"]), size=st["size"], max_slices=st["max_slices"],
                                neighbours=st["neighbours"])
        cfg = TrainConfig.from_plan(st, seed=seed, progress=bool(o.get("progress", False)), device=_device(o),
                                    workers=int(o.get("workers", 0)), cache_dir=o.get("trunk_cache"),
                                    embed_norm=_embed_norm(o))
        return train_plugin(task, o["backbone"], folder, weights=o["weights"], preprocess=pre,
                            lora=LoraSpec(last_k=st["lora_last_k"]), config=cfg, resume=resume, plan=plan_d, log=_log(o))

    from ..training.selection import train_selection

    members = plan.select or [{"name": plan.name, "prior": plan.prior, "estimate_s": plan.estimate_s,
                               "settings": {k: getattr(plan, k) for k in SETTINGS}}]  # a plan.json of before selection
    m = train_selection(members, out, train_one, resume=True, log=_log(o))
    won = (m.get("selection") or {}).get("winner", members[0]["name"])
    return normalise(m, detail=f"the default training plan: {won}"
                               + (f" (the best on validation of {', '.join(e['name'] for e in members)})"
                                  if len(members) > 1 else f" (candidate {plan.candidate})")
                               + f"; {','.join(plan.views)}, size {plan.size}")


def m_slice_transformer(task, out: Path, seed: int, o: dict, views=("axial",)) -> dict:
    from ..baselines.variant import train_aggregator_plugin
    from ..plugins import LoraSpec
    from ..training.run import PreprocessOptions

    pre = PreprocessOptions(views=list(views), size=o["size"], max_slices=o["max_slices"])
    m = train_aggregator_plugin(task, o["backbone"], out, pooling="transformer", weights=o["weights"], preprocess=pre,
                                lora=LoraSpec(r=0), config=_train_config(o, seed), finetune_backbone=True,
                                resume=True, log=_log(o))
    return normalise(m, detail="fine-tuned 2D backbone (BatchNorm statistics frozen) + 1-layer slice transformer")


def m_cnn3d(task, out: Path, seed: int, o: dict, arch: str = "resnet18", train_fraction: float = 1.0) -> dict:
    from ..baselines.variant import train_cnn3d

    m = train_cnn3d(task, arch, out, _train_config(o, seed, cnn=True), train_fraction=train_fraction, resume=True,
                    log=_log(o))
    detail = ("ImageNet EfficientNet-Lite0, ACS convolutions, fine-tuned" if arch == "acs_lite0"
              else f"MONAI {arch} 3D from scratch")
    return normalise(m, detail=detail)


THREE = ("axial", "coronal", "sagittal")

register_method("plan", m_plan, "plan", "the default `anymc3d train DATA`: a training plan that fits --set budget=30m")
register_method("default_plan", m_plan, "plan", "the default `anymc3d train DATA --out DIR`, nothing else (alias of plan)")
register_method("plugin", m_plugin, "plugin", "AnyMC3D plugin: LoRA r=8 (all stages) + task query, axial")
register_method("plugin_3view", m_plugin, "plugin", "plugin, three views (per-view LoRA + query, fusion query)",
                views=THREE)
register_method("plugin_r4", m_plugin, "plugin", "plugin, LoRA r=4", r=4, alpha=8.0)
register_method("plugin_r16", m_plugin, "plugin", "plugin, LoRA r=16", r=16, alpha=32.0)
register_method("plugin_lastk1", m_plugin, "plugin", "plugin, LoRA r=8 on the last stage + conv_head only", last_k=1)
register_method("plugin_lastk2", m_plugin, "plugin", "plugin, LoRA r=8 on the last 2 stages (shared trunk k=2)", last_k=2)
register_method("plugin_lastk4", m_plugin, "plugin", "plugin, LoRA r=8 on the last 4 stages (shared trunk k=4)", last_k=4)
register_method("plugin_lastk1_3view", m_plugin, "plugin", "plugin_lastk1, three views", last_k=1, views=THREE)
# the same shared-trunk plugin on 112-pixel slices (the outside probe reference used 112², docs/method.md): 4x4 final maps
register_method("plugin_lastk1_s112", m_plugin, "plugin", "plugin_lastk1 on 112-pixel slices", last_k=1, size=112)
register_method("plugin_lastk1_3view_s112", m_plugin, "plugin", "plugin_lastk1_3view on 112-pixel slices", last_k=1,
                views=THREE, size=112)
# the same ablations on the shared-trunk plugin: with --set augment=false and a warm trunk cache they
# train in minutes on a CPU, where the full-depth ones take hours
register_method("plugin_lastk1_frac20", m_plugin, "plugin", "plugin_lastk1 on 20 % of the training set", last_k=1,
                train_fraction=0.2)
register_method("plugin_lastk1_3view_frac20", m_plugin, "plugin", "plugin_lastk1_3view on 20 % of the training set",
                last_k=1, views=THREE, train_fraction=0.2)
register_method("plugin_lastk1_frac50", m_plugin, "plugin", "plugin_lastk1 on 50 % of the training set", last_k=1,
                train_fraction=0.5)
register_method("plugin_lastk1_3view_frac50", m_plugin, "plugin", "plugin_lastk1_3view on 50 % of the training set",
                last_k=1, views=THREE, train_fraction=0.5)
register_method("plugin_lastk1_transformer", m_plugin, "plugin",
                "plugin_lastk1 with a 1-layer slice transformer pooling", last_k=1, pooling="transformer")
register_method("plugin_lastk1_r4", m_plugin, "plugin", "plugin_lastk1 with LoRA r=4", last_k=1, r=4, alpha=8.0)
register_method("plugin_lastk1_r16", m_plugin, "plugin", "plugin_lastk1 with LoRA r=16", last_k=1, r=16, alpha=32.0)
register_method("plugin_lastk1_mean", m_plugin, "plugin", "plugin_lastk1 with mean slice pooling", last_k=1,
                pooling="mean")
register_method("plugin_lastk1_max", m_plugin, "plugin", "plugin_lastk1 with max slice pooling", last_k=1,
                pooling="max")
register_method("plugin_frac20", m_plugin, "plugin", "plugin on 20 % of the training set", train_fraction=0.2)
register_method("plugin_frac50", m_plugin, "plugin", "plugin on 50 % of the training set", train_fraction=0.5)
register_method("plugin_mean", m_plugin, "plugin", "plugin with mean slice pooling instead of the task query",
                pooling="mean")
register_method("plugin_max", m_plugin, "plugin", "plugin with max slice pooling", pooling="max")
register_method("plugin_transformer", m_plugin, "plugin", "plugin with a 1-layer slice transformer pooling",
                pooling="transformer")
register_method("query_only", m_plugin, "plugin", "frozen backbone + task query + head (LoRA r=0), augmented", r=0)
register_method("query_only_3view", m_plugin, "plugin", "query_only, three views", r=0, views=THREE)
register_method("linear_probe", m_linear_probe, "cached", "frozen backbone + mean pooling + logistic regression, axial")
register_method("linear_probe_3view", m_linear_probe, "cached", "linear probe, three views concatenated", views=THREE)
register_method("linear_probe_3view_s112", m_linear_probe, "cached", "linear_probe_3view on 112-pixel slices",
                views=THREE, size=112)
register_method("linear_probe_frac20", m_linear_probe, "cached", "linear probe on 20 % of the training set",
                train_fraction=0.2)
register_method("frozen_mean", m_frozen_pool, "cached", "frozen features + mean pooling + linear head (focal loss)",
                pooling="mean")
register_method("frozen_max", m_frozen_pool, "cached", "frozen features + max pooling + linear head", pooling="max")
register_method("frozen_attention", m_frozen_pool, "cached",
                "frozen features + task-query pooling + linear head (no LoRA, no augmentation)", pooling="attention")
register_method("frozen_transformer", m_frozen_pool, "cached", "frozen features + 1-layer slice transformer + head",
                pooling="transformer")
register_method("frozen_attention_3view", m_frozen_pool, "cached", "frozen_attention, three views + fusion query",
                pooling="attention", views=THREE)
register_method("frozen_attention_frac20", m_frozen_pool, "cached", "frozen_attention on 20 % of the training set",
                pooling="attention", train_fraction=0.2)
register_method("slice_transformer", m_slice_transformer, "plugin",
                "fine-tuned 2D backbone + slice transformer (MST-like)")
register_method("resnet18_3d", m_cnn3d, "cnn3d", "MONAI 3D ResNet-18 from scratch", arch="resnet18")
register_method("densenet121_3d", m_cnn3d, "cnn3d", "MONAI 3D DenseNet-121 from scratch", arch="densenet121")
register_method("acs_lite0", m_cnn3d, "cnn3d", "ImageNet EfficientNet-Lite0 as a 3D net (ACS convolutions), fine-tuned",
                arch="acs_lite0")
# the paper's data-efficiency comparison: its 20 % plugin against a 3D DenseNet on 60 % of the data
register_method("densenet121_3d_frac60", m_cnn3d, "cnn3d", "densenet121_3d on 60 % of the training set",
                arch="densenet121", train_fraction=0.6)
