"""The ``anymc3d`` command: train | evaluate | predict | demo | backbones.

Input problems (``InputError``) become one line on stderr and exit code 2, no traceback.
"""
from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path

from . import __version__
from .cli_args import add_backbone_args, add_device_args_everywhere, add_slice_args, add_weights_arg
from .errors import InputError


def _csv_list(text: str | None) -> list[str] | None:
    return [t.strip() for t in text.split(",") if t.strip()] if text else None


def _spacing(text: str | None):
    if not text:
        return None
    vals = [float(v) for v in text.split(",")]
    return tuple(vals * 3 if len(vals) == 1 else vals)


def add_data_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("manifest columns (default: image, label, mask; or task.json beside the manifest)")
    g.add_argument("--image-columns", type=_csv_list, help="comma list of image columns, e.g. t1,t2,flair")
    g.add_argument("--label-columns", type=_csv_list, help="one column (binary/multiclass) or several (multilabel)")
    g.add_argument("--mask-column", help="column holding mask paths")
    g.add_argument("--task-type", choices=["binary", "multiclass", "multilabel"])


def data_kwargs(a: argparse.Namespace) -> dict:
    if str(a.data).endswith(".npz"):
        return {}
    return {"image_columns": a.image_columns, "label_columns": a.label_columns, "mask_column": a.mask_column,
            "task_type": a.task_type}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="anymc3d", description="3D medical volume classification with one frozen 2D "
                                "foundation model and a small plugin per task.")
    p.add_argument("--version", action="version", version=f"anymc3d {__version__}")
    sub = p.add_subparsers(dest="verb", required=True)

    t = sub.add_parser("train", help="train a plugin on a manifest CSV or a MedMNIST .npz")
    t.add_argument("data")
    add_backbone_args(t)
    add_slice_args(t, ["axial"])
    t.add_argument("--out", required=True, type=Path)
    t.add_argument("--task-name")
    t.add_argument("--intensity", choices=["ct", "mri", "minmax", "fixed", "none"])
    t.add_argument("--windows", help="CT windows: preset name (chest, abdomen, ...) or lo:hi,lo:hi")
    t.add_argument("--spacing", help="resample to this spacing in mm, e.g. 1.5 or 0.8,0.8,2")
    t.add_argument("--max-slices", type=int)
    t.add_argument("--epochs", type=int, default=30)
    t.add_argument("--batch-size", type=int, default=8)
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--lora-rank", type=int, default=8, help="0 = no LoRA (frozen features + query + head)")
    t.add_argument("--lora-alpha", type=float, default=16.0)
    t.add_argument("--lora-last-k", type=int, help="LoRA only on the last K blocks/stages (shared trunk)")
    t.add_argument("--cache", type=Path, metavar="DIR",
                   help="disk cache of frozen activations (shared trunk or --lora-rank 0), reused by later epochs, runs and tasks")
    t.add_argument("--loss", choices=["focal", "bce", "ce"], default="focal")
    t.add_argument("--class-weighting", choices=["none", "balanced"], default="none")
    t.add_argument("--lr-lora", type=float, default=1e-4)
    t.add_argument("--lr-head", type=float, default=1e-3)
    t.add_argument("--patience", type=int, default=10)
    t.add_argument("--no-augment", action="store_true")
    t.add_argument("--no-amp", action="store_true", help="disable bf16 autocast")
    t.add_argument("--seg-weight", type=float, default=0.5,
                   help="λ of the auxiliary mask loss (Dice + BCE) when the manifest has a mask column; 0 disables")
    t.add_argument("--train-fraction", type=float, default=1.0)
    t.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.pt")
    t.add_argument("--overwrite", action="store_true", help="replace the plugin already in OUT (default: refuse)")
    t.add_argument("--quiet", action="store_true")
    add_data_args(t)

    e = sub.add_parser("evaluate", help="metrics of a plugin on a labelled split")
    e.add_argument("plugin")
    e.add_argument("data")
    e.add_argument("--split", default="test", help="train, val, test or all")
    e.add_argument("--out", required=True, type=Path)
    add_weights_arg(e)
    e.add_argument("--bootstrap", type=int, default=1000)
    add_data_args(e)

    pr = sub.add_parser("predict", help="predict volumes (files, DICOM folders, or a manifest CSV)")
    pr.add_argument("plugin")
    pr.add_argument("images", nargs="*")
    pr.add_argument("--plugins", type=Path, metavar="DIR",
                    help="a plugin store: run every compatible plugin on each volume (PLUGIN is then the first image)")
    pr.add_argument("--out", required=True, type=Path)
    add_weights_arg(pr)
    pr.add_argument("--heatmaps", action="store_true",
                    help="also write heatmaps (<id>_heatmap.nii.gz in the input's space + PNG), as `anymc3d explain`")

    d = sub.add_parser("demo", help="the whole job on a built-in synthetic dataset (no download)")
    d.add_argument("--out", type=Path, default=Path("anymc3d-demo"))
    d.add_argument("--cases", type=int, default=160)
    d.add_argument("--epochs", type=int, default=8)
    d.add_argument("--seed", type=int, default=0)

    lp = sub.add_parser("probe", help="baseline: frozen backbone + mean pooling + logistic regression")
    lp.add_argument("data")
    add_backbone_args(lp)
    add_slice_args(lp, ["axial"])
    lp.add_argument("--out", required=True, type=Path)
    lp.add_argument("--seed", type=int, default=0)

    sub.add_parser("backbones", help="list registered backbones")
    for mod in _extensions():
        _HANDLERS.update(mod.register(sub))
    from .io.options import add_reader_args  # --max-voxels, --allow-gaps, --series (docs/data.md)
    add_reader_args(*(sub.choices[v] for v in ("train", "evaluate", "predict", "probe", "explain") if v in sub.choices))
    add_device_args_everywhere(p)  # --device / --workers on every verb
    return p


# Verbs that live next to their feature (nnU-Net-style: one module per concern). Each module has
# ``register(subparsers) -> {verb: handler}``; handlers take the parsed args and return an exit code.
_EXTENSION_MODULES = ("anymc3d.explain.cli", "anymc3d.store.cli", "anymc3d.bench.cli", "anymc3d.serve.cli")
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
    from .io import check_output_folder
    from .plugins import LoraSpec

    check_output_folder(a.out, resume=a.resume, overwrite=a.overwrite)  # no silent overwrite, no resume from nothing
    from .training.run import PreprocessOptions, train_plugin
    from .training.trainer import TrainConfig

    windows = a.windows
    if windows and ":" in windows:
        windows = [tuple(float(x) for x in w.split(":")) for w in windows.split(",")]
    pre = PreprocessOptions(views=a.views, size=a.size, intensity=a.intensity or ("ct" if windows else None),
                            windows=windows, spacing=_spacing(a.spacing), max_slices=a.max_slices)
    cfg = TrainConfig(epochs=a.epochs, batch_size=a.batch_size, seed=a.seed, loss=a.loss, lr_lora=a.lr_lora,
                      lr_head=a.lr_head, class_weighting=a.class_weighting, patience=a.patience,
                      augment=not a.no_augment, amp=not a.no_amp, progress=not a.quiet, seg_weight=a.seg_weight,
                      device=a.device, workers=a.workers)
    cfg.cache_dir = str(a.cache) if getattr(a, "cache", None) else None
    m = train_plugin(a.data, a.backbone, a.out, weights=a.weights, preprocess=pre,
                     lora=LoraSpec(r=a.lora_rank, alpha=a.lora_alpha, last_k=a.lora_last_k), config=cfg,
                     task_name=a.task_name, train_fraction=a.train_fraction, resume=a.resume, data_kwargs=data_kwargs(a))
    line = f"{m.get('split', 'val')} AUC {m['auc']:.4f}  ACC {m['acc']:.4f}  (n={m['n']})" if m.get("auc") is not None else "no AUC"
    print(f"{line}; trainable parameters {m['trainable_params']:,}; training {m['train_wall_s']:.0f} s")
    if m.get("seg_decoder_params"):
        print(f"auxiliary mask loss on {m['n_train_with_mask']} training cases; decoder {m['seg_decoder_params']:,} "
              "parameters (training only, not in the plugin)")
    print(f"plugin: {a.out / 'plugin.safetensors'} + {a.out / 'plugin.json'}; metrics: {a.out / 'metrics.json'}")
    return 0


def cmd_evaluate(a: argparse.Namespace) -> int:
    from .evaluation.run import evaluate_plugin
    from .predict import load

    m = evaluate_plugin(load(a.plugin, weights=a.weights, device=a.device, workers=a.workers), a.data, a.split, a.out, a.bootstrap, data_kwargs(a))
    ci = m["ci"].get("auc") if m.get("ci") else None
    print(f"{a.split}: AUC {m['auc']}" + (f" [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else "") + f"  ACC {m['acc']:.4f}  n={m['n']}")
    print(f"wrote {a.out / 'metrics.json'}, {a.out / 'report.md'}, {a.out / 'roc.png'}")
    return 0


def cmd_predict(a: argparse.Namespace) -> int:
    if getattr(a, "plugins", None) is not None:
        from .store.cli import cmd_predict_all
        return cmd_predict_all(a, [a.plugin, *a.images])
    if not a.images:
        raise InputError("predict: give PLUGIN and at least one IMAGE (or --plugins DIR IMAGE...)")
    from .inputs import expand_inputs
    from .predict import case_id_from, load, write_json

    predictor = load(a.plugin, weights=a.weights, device=a.device, workers=a.workers)
    items = expand_inputs(a.images, predictor.spec.inputs)
    # Predict everything first: a bad input fails before any output is written (no half-filled --out).
    rows = [predictor.predict(item, case_id=cid or case_id_from(item)) for cid, item in items]
    a.out.mkdir(parents=True, exist_ok=True)
    for res in rows:
        write_json(res, a.out / f"{res['id']}.json")
        print(f"{res['id']}: {', '.join(res['predicted']) or '-'}  " +
              " ".join(f"{k}={v:.3f}" for k, v in res["probabilities"].items()))
    if len(rows) > 1:
        from .io import atomic_write
        names = list(rows[0]["probabilities"])
        with atomic_write(a.out / "predictions.csv") as tmp:
            with open(tmp, "w", newline="") as fh:
                w = csv.writer(fh)
                w.writerow(["id", *[f"p_{n}" for n in names], "predicted"])
                for r in rows:
                    w.writerow([r["id"], *[f"{r['probabilities'][n]:.6f}" for n in names], ";".join(r["predicted"])])
    print(f"wrote {len(rows)} JSON file(s) to {a.out}")
    if getattr(a, "heatmaps", False):
        from .explain.cli import write_heatmaps

        write_heatmaps(predictor, items, a.out)
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
