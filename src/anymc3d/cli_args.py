"""The CLI's argument groups, defined once and shared by every verb (``anymc3d.cli`` and the verbs
that live next to their feature: explain, plugins / cache, bench)."""
from __future__ import annotations

import argparse

from .runtime.device import DEVICE_CHOICES

ENGINE_CHOICES = ("auto", "torch", "onnxruntime", "openvino")  # anymc3d.runtime.engines.ENGINE_CHOICES

DEFAULT_BACKBONE = "efficientnet_lite0"


def views_type(text: str) -> list[str]:
    views = [v.strip() for v in text.split(",") if v.strip()]
    bad = [v for v in views if v not in ("axial", "coronal", "sagittal")]
    if bad or not views:
        raise argparse.ArgumentTypeError(f"views must be a comma list of axial, coronal, sagittal (got {text!r})")
    return views


def add_weights_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--weights", help="local weights file for the backbone ('random' for a randomly initialised one)")


def add_backbone_args(p: argparse.ArgumentParser, default: str | None = DEFAULT_BACKBONE, race: bool = False) -> None:
    """``--backbone`` and ``--weights``; ``race=True`` (train, plan): no ``--backbone`` means the plan's
    backbone race picks one when more than one has its weights here (docs/plan.md)."""
    g = p.add_argument_group("backbone")
    if race:
        g.add_argument("--backbone", default=None,
                       help="2D backbone (`anymc3d backbones`); default: the plan's backbone race on validation when "
                            f"more than one has its weights here (docs/plan.md), else {DEFAULT_BACKBONE}")
    else:
        g.add_argument("--backbone", default=default,
                       help=f"2D backbone (`anymc3d backbones`; default {default or DEFAULT_BACKBONE})")
    g.add_argument("--weights", help="local weights file for the backbone ('random' for a randomly initialised one)")


def add_slice_args(p: argparse.ArgumentParser, views_default: list[str] | None = None, views: bool = True) -> None:
    g = p.add_argument_group("slices")
    if views:
        g.add_argument("--views", type=views_type, default=views_default,
                       help="comma list of axial, coronal, sagittal" + (f" (default {','.join(views_default)})"
                                                                         if views_default else ""))
    g.add_argument("--size", type=int, help="slice side given to the backbone (default: the backbone's, 224)")


def add_device_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("runtime")
    g.add_argument("--device", default="auto", metavar="DEVICE",
                   help=f"{DEVICE_CHOICES}; auto = CUDA when available, else MPS, else CPU (default auto)")
    g.add_argument("--workers", type=int, default=0, metavar="N",
                   help="DataLoader worker processes that read, preprocess and augment (default 0: in-process)")
    g.add_argument("--engine", choices=ENGINE_CHOICES, default="auto",
                   help="inference engine of the frozen passes (trunk-cache fill, frozen probes and features) on "
                        "the CPU; auto = the fastest installed one, measured (onnxruntime / openvino come with "
                        "anymc3d[cpu]; docs/runtime.md) (default auto)")


def _has_option(p: argparse.ArgumentParser, flag: str) -> bool:
    return any(flag in a.option_strings for a in p._actions)


def add_device_args_everywhere(p: argparse.ArgumentParser) -> None:
    """Give every verb (and every sub-verb such as ``plugins list``) the runtime group."""
    for action in p._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                has_verbs = any(isinstance(a, argparse._SubParsersAction) for a in sub._actions)
                if not has_verbs and not _has_option(sub, "--device"):
                    add_device_args(sub)
                add_device_args_everywhere(sub)


def _csv_list(text: str | None) -> list[str] | None:
    return [t.strip() for t in text.split(",") if t.strip()] if text else None


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
