"""The ``anymc3d`` command: train | evaluate | predict | demo | backbones.

Input problems (``InputError``) become one line on stderr and exit code 2, no traceback.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from . import __version__
from .cli_args import (add_backbone_args, add_data_args, add_device_args_everywhere, add_slice_args,  # noqa: F401
                       add_weights_arg, data_kwargs)
from .errors import InputError


def _spacing(text: str | None):
    if not text:
        return None
    vals = [float(v) for v in text.split(",")]
    return tuple(vals * 3 if len(vals) == 1 else vals)


def _coverage(text: str) -> float:
    from .evaluation.conformal import check_coverage

    try:
        return check_coverage(float(text))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--coverage: a level in (0, 1), e.g. 0.9; got {text!r}") from None


def _operating_point(text: str) -> str:
    from .evaluation.threshold import parse_policy

    try:
        return str(parse_policy(text))
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc).replace("--threshold", "--operating-point")) from None


def _add_train_parser(sub) -> None:
    """The ``train`` verb: data, backbone, plan and training flags."""
    t = sub.add_parser("train", help="train a plugin on a manifest CSV or a MedMNIST .npz (planned to fit --budget)",
                       description="Train a plugin. Without options the settings come from a training plan that "
                       "fits the data and this machine within --budget (docs/plan.md); any flag below overrides "
                       "its plan field.")
    t.add_argument("data")
    add_backbone_args(t, race=True)
    add_slice_args(t, None)
    t.add_argument("--out", required=True, type=Path)
    t.add_argument("--task-name")
    from .planning.cli import add_plan_args, add_plan_override_args, weight_decay_arg
    add_plan_args(t)
    t.add_argument("--intensity", choices=["ct", "mri", "minmax", "fixed", "none"])
    t.add_argument("--windows", help="CT windows: preset name (chest, abdomen, ...) or lo:hi,lo:hi")
    t.add_argument("--spacing", help="resample to this spacing in mm, e.g. 1.5 or 0.8,0.8,2")
    add_plan_override_args(t)
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--lora-rank", type=int, default=None, help="LoRA rank (default 8); 0 = no LoRA (frozen features + query + head)")
    t.add_argument("--lora-alpha", type=float, default=None, help="LoRA scale alpha (default 16)")
    t.add_argument("--cache", type=Path, metavar="DIR",
                   help="disk cache of frozen activations (shared trunk or --lora-rank 0), reused by later epochs, runs and tasks")
    t.add_argument("--loss", choices=["focal", "bce", "ce"], default="focal")
    t.add_argument("--class-weighting", choices=["none", "balanced"], default="none")
    t.add_argument("--lr-lora", type=float, default=None,
                   help="learning rate of the LoRA weights (default: the trainer's, 5e-4)")
    t.add_argument("--lr-head", type=float, default=None,
                   help="learning rate of the task queries and the head (default: the trainer's, 1e-3)")
    t.add_argument("--weight-decay", type=weight_decay_arg, default=None, metavar="WD",
                   help="AdamW weight decay of the LoRA weights and of the head alike "
                        "(default: the trainer's, 1e-5 for LoRA and 1e-4 for the head)")
    t.add_argument("--no-amp", action="store_true", help="disable bf16 autocast")
    t.add_argument("--seg-weight", type=float, default=0.5,
                   help="λ of the auxiliary mask loss (Dice + BCE) when the manifest has a mask column; 0 disables")
    t.add_argument("--embed-norm", choices=["auto", "none", "center_scale"], default="auto",
                   help="slice-embedding normalisation before the task query, fitted on the training set "
                        "(auto: the backbone's default; center_scale for litemedsam_tinyvit, none otherwise)")
    t.add_argument("--train-fraction", type=float, default=1.0)
    t.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.pt (with OUT/plan.json)")
    t.add_argument("--overwrite", action="store_true", help="replace the plugin already in OUT (default: refuse)")
    t.add_argument("--quiet", action="store_true")
    add_data_args(t)


def _add_evaluate_parser(sub) -> None:
    """The ``evaluate`` verb: metrics of a plugin on a labelled split."""
    e = sub.add_parser("evaluate", help="metrics of a plugin on a labelled split")
    e.add_argument("plugin")
    e.add_argument("data")
    e.add_argument("--split", default="test", help="train, val, test or all")
    e.add_argument("--out", required=True, type=Path)
    add_weights_arg(e)
    e.add_argument("--bootstrap", type=int, default=1000)
    e.add_argument("--coverage", type=_coverage, action="append", default=[], metavar="C",
                   help="also report conformal coverage and set size at this level (0.8, 0.9, 0.95 always)")
    e.add_argument("--operating-point", type=_operating_point, action="append", default=[], metavar="sens=X|spec=X",
                   help="also report sensitivity/specificity at this threshold, chosen on the plugin's validation "
                        "scores (repeatable; the stored operating point is always reported)")
    add_data_args(e)


def _add_predict_parser(sub) -> None:
    """The ``predict`` verb: volumes, a plugin store, coverage and output options."""
    pr = sub.add_parser("predict", help="predict volumes (files, DICOM folders, or a manifest CSV)")
    pr.add_argument("plugin")
    pr.add_argument("images", nargs="*")
    pr.add_argument("--plugins", type=Path, metavar="DIR",
                    help="a plugin store: run every compatible plugin on each volume (PLUGIN is then the first image)")
    pr.add_argument("--out", required=True, type=Path)
    pr.add_argument("--coverage", type=_coverage, default=0.9, metavar="C",
                    help="coverage level of every answer's conformal prediction set (default 0.9)")
    add_weights_arg(pr)
    pr.add_argument("--heatmaps", action="store_true",
                    help="also write heatmaps (<id>_heatmap.nii.gz in the input's space + PNG), as `anymc3d explain`")
    pr.add_argument("--overwrite", action="store_true",
                    help="predict every volume again (default: a rerun skips volumes whose output is complete)")
    pr.add_argument("--no-amp", action="store_true",
                    help="full fp32 (no bf16 autocast, no TF32): CPU and GPU answers then agree to 1e-4")
    pr.add_argument("--no-input-check", action="store_true",
                    help="skip checking every input's header before the first output (a bad input then stops "
                         "the run after the volumes before it were written; a rerun resumes)")


def _add_demo_parser(sub) -> None:
    """The ``demo`` verb: the whole job on a built-in synthetic dataset."""
    d = sub.add_parser("demo", help="the whole job on a built-in synthetic dataset (no download)")
    d.add_argument("--out", type=Path, default=Path("anymc3d-demo"))
    d.add_argument("--cases", type=int, default=160)
    d.add_argument("--epochs", type=int, default=8)
    d.add_argument("--seed", type=int, default=0)


def _add_probe_parser(sub) -> None:
    """The ``probe`` verb: the frozen-backbone linear-probe baseline."""
    lp = sub.add_parser("probe", help="baseline: frozen backbone + mean pooling + logistic regression")
    lp.add_argument("data")
    add_backbone_args(lp)
    add_slice_args(lp, ["axial"])
    lp.add_argument("--out", required=True, type=Path)
    lp.add_argument("--seed", type=int, default=0)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="anymc3d", description="3D medical volume classification with one frozen 2D "
                                "foundation model and a small plugin per task.")
    p.add_argument("--version", action="version", version=f"anymc3d {__version__}")
    sub = p.add_subparsers(dest="verb", required=True)

    _add_train_parser(sub)
    _add_evaluate_parser(sub)
    _add_predict_parser(sub)
    _add_demo_parser(sub)
    _add_probe_parser(sub)
    sub.add_parser("backbones", help="list registered backbones")
    for mod in _extensions():
        _HANDLERS.update(mod.register(sub))
    from .io.options import add_reader_args  # --max-voxels, --allow-gaps, --series (docs/data.md)
    add_reader_args(*(sub.choices[v] for v in ("train", "evaluate", "predict", "probe", "explain") if v in sub.choices))
    add_device_args_everywhere(p)  # --device / --workers on every verb
    return p


# Verbs that live next to their feature (nnU-Net-style: one module per concern). Each module has
# ``register(subparsers) -> {verb: handler}``; handlers take the parsed args and return an exit code.
_EXTENSION_MODULES = ("anymc3d.planning.cli", "anymc3d.explain.cli", "anymc3d.store.cli", "anymc3d.bench.cli",
                      "anymc3d.serve.cli")
_HANDLERS: dict = {}


def _extensions():
    import importlib

    mods = []
    for name in _EXTENSION_MODULES:
        try:
            mods.append(importlib.import_module(name))
        except ModuleNotFoundError as exc:
            if exc.name is None or not name.startswith(exc.name):
                raise
    return mods


def cmd_train(a: argparse.Namespace) -> int:
    """Single-process, or data-parallel under torchrun (``anymc3d.training.distributed``, docs/scale.md)."""
    from .runtime import distributed as dist

    dist.init_from_env(a.device)
    rc = _train(a, dist)
    dist.barrier()  # no rank returns before rank 0 has written the plugin
    return rc


def optimizer_overrides(a: argparse.Namespace) -> dict:
    """The optimiser settings the user gave (``--lr-lora``, ``--lr-head``, ``--weight-decay`` for both groups) as
    ``TrainConfig`` fields; what is not given keeps the trainer's default (one source: ``TrainConfig``)."""
    given = {"lr_lora": a.lr_lora, "lr_head": a.lr_head, "wd_lora": a.weight_decay, "wd_head": a.weight_decay}
    return {k: v for k, v in given.items() if v is not None}


def _train(a: argparse.Namespace, dist) -> int:
    from .io import check_output_folder
    from .plugins import LoraSpec
    from .plugins.lora import DEFAULT_ALPHA, DEFAULT_RANK

    check_output_folder(a.out, resume=a.resume, overwrite=a.overwrite)  # no silent overwrite, no resume from nothing
    dist.barrier()  # every rank has checked --out before rank 0 writes anything into it
    main_rank = dist.is_main()
    from .data import load_data
    from .planning.cli import settings_for_training
    from .training.run import PreprocessOptions, train_plugin
    from .training.trainer import TrainConfig

    windows = a.windows
    if windows and ":" in windows:
        windows = [tuple(float(x) for x in w.split(":")) for w in windows.split(",")]
    task = load_data(a.data, **data_kwargs(a))
    from .data import check_training_labels
    from .training.run import assign_splits
    check_training_labels(task, assign_splits(task, a.seed))  # before the plan writes OUT/plan.json
    intensity = a.intensity or ("ct" if windows else None)
    if a.neighbours:  # a spec the flags cannot make is refused before the plan spends minutes timing
        try:
            PreprocessOptions(intensity=intensity, windows=windows, neighbours=True).spec_for(task, 64)
        except ValueError as e:
            raise InputError(f"{a.data}: --neighbours: {e}") from None
    st = settings_for_training(a, task, log=main_rank)  # the plan (or --no-plan's defaults) with the flags applied

    def train_one(st: dict, out: Path, resume: bool) -> dict:
        pre = PreprocessOptions(views=st["views"], size=st["size"], intensity=intensity,
                                windows=windows, spacing=_spacing(a.spacing), max_slices=st["max_slices"],
                                neighbours=bool(st.get("neighbours")))
        cfg = TrainConfig.from_plan(st, seed=a.seed, loss=a.loss, **optimizer_overrides(a),
                                    class_weighting=a.class_weighting, amp=not a.no_amp,
                                    progress=not a.quiet and main_rank, seg_weight=a.seg_weight,
                                    device=dist.rank_device(a.device), threshold=a.threshold, embed_norm=a.embed_norm)
        cfg.cache_dir = st.get("cache_dir")
        return train_plugin(task, st["backbone"], out, weights=a.weights, preprocess=pre,
                            lora=LoraSpec(r=DEFAULT_RANK if a.lora_rank is None else a.lora_rank,
                                          alpha=DEFAULT_ALPHA if a.lora_alpha is None else a.lora_alpha,
                                          last_k=st["lora_last_k"]), config=cfg,
                            task_name=a.task_name, train_fraction=a.train_fraction, resume=resume, plan=st.get("plan"),
                            log=print if main_rank else (lambda *_a, **_k: None))

    if getattr(a, "cache", None):
        st["cache_dir"] = str(a.cache)
    members = (st.get("plan") or {}).get("select") or []
    if len(members) > 1:  # the plan's selection: each candidate trained, the best on validation kept
        from .planning.cli import member_settings
        from .training.selection import train_selection

        m = train_selection(members, a.out, lambda mem, folder, resume: train_one(
            member_settings(st, mem, folder, getattr(a, "cache", None)), folder, resume),
                            resume=a.resume, log=print if main_rank else (lambda *_a, **_k: None))
    else:
        m = train_one(st, a.out, a.resume)
    if not main_rank:  # torchrun: rank 0 reports and writes
        return 0
    line = f"{m.get('split', 'val')} AUC {m['auc']:.4f}  ACC {m['acc']:.4f}  (n={m['n']})" if m.get("auc") is not None else "no AUC"
    thr = f"; threshold {m['threshold']:.3f} ({a.threshold if isinstance(a.threshold, str) else 'fixed'})" \
        if m.get("task_type") == "binary" else ""
    print(f"{line}{thr}; trainable parameters {m['trainable_params']:,}; training {m['train_wall_s']:.0f} s, "
          f"whole run {m['total_wall_s']:.0f} s" + (f" (plan estimate {st['plan']['estimate_s']:.0f} s)" if st.get("plan") else ""))
    if m.get("selection"):
        sel = m["selection"]
        print(f"kept {sel['winner']} (the best validation AUC of {len(sel['candidates'])} candidates); selection "
              f"{sel['wall_s']:.0f} s in all (plan estimate {st['plan']['select_estimate_s']:.0f} s); every candidate: "
              f"{a.out / 'selection.json'}")
    if m.get("seg_decoder_params"):
        print(f"auxiliary mask loss on {m['n_train_with_mask']} training cases; decoder {m['seg_decoder_params']:,} "
              "parameters (training only, not in the plugin)")
    print(f"plugin: {a.out / 'plugin.safetensors'} + {a.out / 'plugin.json'}; metrics: {a.out / 'metrics.json'}")
    return 0


def cmd_evaluate(a: argparse.Namespace) -> int:
    from .evaluation.run import evaluate_plugin
    from .predict import load

    m = evaluate_plugin(load(a.plugin, weights=a.weights, device=a.device, workers=a.workers), a.data, a.split, a.out,
                        a.bootstrap, data_kwargs(a), coverages=tuple(a.coverage), operating_points=tuple(a.operating_point))
    ci = m["ci"].get("auc") if m.get("ci") else None
    print(f"{a.split}: AUC {m['auc']}" + (f" [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else "") + f"  ACC {m['acc']:.4f}  n={m['n']}")
    from .evaluation.run import trust_lines
    for line in trust_lines(m):
        print(line)
    print(f"wrote {a.out / 'metrics.json'}, {a.out / 'report.md'}, {a.out / 'roc.png'}"
          + (f", {a.out / 'calibration.png'}" if (a.out / "calibration.png").is_file() else ""))
    return 0


def cmd_predict(a: argparse.Namespace) -> int:
    """One JSON per volume, written as each is done; sharded over the ranks under torchrun; a rerun
    skips finished volumes (``anymc3d.batch_predict``, docs/scale.md)."""
    from .runtime import distributed as dist

    dist.init_from_env(a.device)
    if getattr(a, "plugins", None) is not None:
        from .store.cli import cmd_predict_all
        return cmd_predict_all(a, [a.plugin, *a.images])
    if not a.images:
        raise InputError("predict: give PLUGIN and at least one IMAGE (or --plugins DIR IMAGE...)")
    from .batch_predict import PluginJob, predict_to_folder, summary_line
    from .inputs import expand_inputs
    from .predict import load

    predictor = load(a.plugin, weights=a.weights, device=dist.rank_device(a.device), workers=a.workers,
                     coverage=a.coverage, amp=False if a.no_amp else None)
    items = expand_inputs(a.images, predictor.spec.inputs)
    job = PluginJob(predictor, heatmaps=getattr(a, "heatmaps", False))
    s = predict_to_folder(job, items, a.out, overwrite=a.overwrite, input_check=not a.no_input_check)
    if dist.is_main():
        print(summary_line(s, a.out))
    return 0


def cmd_demo(a: argparse.Namespace) -> int:
    from .demo import run_demo

    run_demo(a.out, n_cases=a.cases, epochs=a.epochs, seed=a.seed, device=a.device)
    return 0


def cmd_probe(a: argparse.Namespace) -> int:
    from .baselines.linear_probe import run_linear_probe

    r = run_linear_probe(a.data, a.backbone, a.out, tuple(a.views), a.size, a.weights, a.seed, device=a.device,
                         workers=a.workers)
    print(f"linear probe ({','.join(a.views)}, C={r['C']}): test AUC {r.get('auc')}  ACC {r.get('acc')}  "
          f"features {r['feature_s']:.0f} s; wrote {a.out / 'metrics.json'}")
    return 0


def cmd_backbones(a: argparse.Namespace) -> int:
    """One line per backbone: name, default slice size, whether its weights are on this machine, their source."""
    from .backbones import default_input_size, list_backbones, weights_status

    rows = []
    for name in list_backbones():
        ok, where = weights_status(name)
        rows.append((name, str(default_input_size(name)), {True: "yes", False: "no", None: "?"}[ok], where))
    w = max(len(r[0]) for r in rows)
    print(f"{'backbone':{w}s}  size  weights here  source")
    for name, size, ok, where in rows:
        print(f"{name:{w}s}  {size:>4s}  {ok:12s}  {where}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    handler = {"train": cmd_train, "evaluate": cmd_evaluate, "predict": cmd_predict, "demo": cmd_demo,
               "probe": cmd_probe, "backbones": cmd_backbones, **_HANDLERS}[args.verb]
    from .io.options import with_reader_args
    handler = with_reader_args(handler, args)  # the reader flags hold for this run only
    from .runtime.engines import with_engine_args
    handler = with_engine_args(handler, args)  # --engine: the frozen passes' engine for this run only
    try:
        return handler(args)
    except InputError as exc:
        print(f"anymc3d: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("anymc3d: interrupted (use --resume to continue training)", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
