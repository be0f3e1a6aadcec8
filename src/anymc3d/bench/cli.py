"""``anymc3d bench SUITE --methods M1,M2 --seeds N --out DIR`` (registered through anymc3d.cli)."""
from __future__ import annotations

import argparse
from pathlib import Path

from ..cli_args import add_backbone_args, add_device_args, add_slice_args
from ..errors import InputError


def _csv(text: str | None) -> list[str] | None:
    return [t.strip() for t in text.split(",") if t.strip()] if text else None


def _value(text: str):
    import yaml

    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def _seeds(text: str) -> int | list[int]:
    """``3`` -> 3 (seeds 0, 1, 2); ``1,2`` -> [1, 2]."""
    try:
        if "," in text:
            seeds = [int(t) for t in text.split(",") if t.strip()]
            if not seeds or min(seeds) < 0:
                raise ValueError
            return sorted(set(seeds))
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected N or a comma list of seeds >= 0, got {text!r}") from None


def register(sub) -> dict:
    b = sub.add_parser("bench", help="run a benchmark suite x methods x seeds -> results.md + results.csv",
                       description="Runs every (task, method, seed) cell that has not finished yet, one JSON per "
                                   "cell in DIR/cells, and rebuilds DIR/results.md and DIR/results.csv.")
    b.add_argument("suite", help="'synthetic', 'medmnist3d:PATH.npz[,PATH2.npz]' or a suite .yaml file")
    b.add_argument("--methods", help="comma list (default: the suite's, else linear_probe,query_only); "
                                     "see --list-methods")
    b.add_argument("--seeds", type=_seeds, help="N: seeds 0..N-1; or a comma list of seeds, e.g. '1,2' to run "
                                                "those cells in a second process (default: the suite's, else 1)")
    b.add_argument("--out", type=Path, help="output folder (required unless --list-methods)")
    b.add_argument("--tasks", help="comma list: run only these tasks of the suite")
    b.add_argument("--epochs", type=int, help="epochs for plugin / 3D CNN methods")
    add_backbone_args(b, default=None)  # None: each method's own (efficientnet_lite0)
    add_slice_args(b, views=False)
    add_device_args(b)
    b.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="any other method option, e.g. --set patience=5 --set head_epochs=50")
    b.add_argument("--retry-failed", action=argparse.BooleanOptionalAction, default=True,
                   help="re-run cells that failed before (default yes)")
    b.add_argument("--tables-only", action="store_true", help="only rebuild results.md / results.csv from DIR/cells")
    b.add_argument("--list-methods", action="store_true", help="print the registered methods and exit")
    b.add_argument("--quiet", action="store_true", help="no progress display")
    return {"bench": cmd_bench}


def cmd_bench(a: argparse.Namespace) -> int:
    from .methods import DEFAULT_OPTIONS, METHODS
    from .runner import command_line, run_bench, write_tables
    from .suite import load_suite

    if a.list_methods:
        for name, m in METHODS.items():
            print(f"{name:26s} [{m.kind}] {m.description}")
        return 0
    if a.out is None:
        raise InputError("bench: --out DIR is required")
    suite = load_suite(a.suite)
    if a.tables_only:
        write_tables(a.out, suite)
        print(f"wrote {a.out / 'results.md'} and {a.out / 'results.csv'}")
        return 0
    methods = _csv(a.methods) or suite.methods or ["linear_probe", "query_only"]
    bad = [m for m in methods if m not in METHODS]
    if bad:
        raise InputError(f"bench: unknown method(s) {bad}; known: {', '.join(METHODS)}")
    options = {}
    for k in ("size", "epochs", "backbone", "weights", "device", "workers"):
        if getattr(a, k, None) is not None:
            options[k] = getattr(a, k)
    for kv in a.set:
        if "=" not in kv:
            raise InputError(f"bench: --set expects KEY=VALUE, got {kv!r}")
        k, v = kv.split("=", 1)
        if k not in DEFAULT_OPTIONS:
            raise InputError(f"bench: unknown option {k!r} in --set; known: {', '.join(DEFAULT_OPTIONS)}")
        options[k] = _value(v)
    tasks = _csv(a.tasks)
    from ..runtime import distributed as dist

    dist.init_from_env(a.device or "auto")  # torchrun: training cells run data-parallel (docs/scale.md)
    summary = run_bench(suite, methods, a.seeds or suite.seeds or 1, a.out, tasks=tasks, options=options,
                        progress=not a.quiet, command=command_line(), retry_failed=a.retry_failed)
    dist.barrier()
    if not dist.is_main():
        return 0
    print(f"cells: {summary['ran']} ran, {summary['skipped']} already done, {summary['failed']} failed "
          f"(of {summary['cells']}); wrote {summary['md']} and {summary['csv']}")
    return 0 if summary["failed"] == 0 else 1
