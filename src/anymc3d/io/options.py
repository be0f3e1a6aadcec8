"""Reader settings: size limit, DICOM gap and series policy, accepted channel counts, assumed spacing.

These are process-wide (one CLI run = one set of flags): the CLI sets them from ``--max-voxels``,
``--allow-gaps``, ``--series`` and ``--assume-spacing`` with :func:`apply_reader_args`; Python callers
may use :func:`set_reader_options` (or pass ``max_voxels=`` / ``allow_gaps=`` / ``series=`` /
``assume_spacing=`` to :func:`~anymc3d.io.read_volume`, which wins over the process setting).
``max_voxels`` is also the limit of every later allocation (:mod:`anymc3d.io.allocation`).
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass, fields, replace
from typing import Optional

#: Default limit on the values in one volume (all channels): 2 GiB once converted to float32.
DEFAULT_MAX_VOXELS = 2 * 2**30 // 4


@dataclass
class ReaderOptions:
    #: refuse a volume whose header declares more values (X*Y*Z*C) than this, before allocating
    max_voxels: int = DEFAULT_MAX_VOXELS
    #: read a DICOM series whose slice positions show a gap or uneven spacing (with a warning)
    allow_gaps: bool = False
    #: SeriesInstanceUID to read from a folder that holds several DICOM series (None: the largest)
    series: Optional[str] = None
    #: channel counts accepted for 4D inputs (None: any). The CLI sets (1, 3): the backbones take 1 or 3
    channels: Optional[tuple[int, ...]] = None
    #: (x, y, z) mm: read a file whose geometry is missing or degenerate (zero, negative or non-finite spacing,
    #: singular or non-finite affine; also a .npy) with this spacing and identity directions, with a warning
    assume_spacing: Optional[tuple[float, float, float]] = None

    def __post_init__(self) -> None:
        if self.assume_spacing is not None:
            self.assume_spacing = spacing_triple(self.assume_spacing)


def spacing_triple(value) -> tuple[float, float, float]:
    """1 or 3 positive finite numbers (a sequence or ``"0.8,0.8,2"``) -> (x, y, z) mm; ValueError otherwise."""
    import math

    try:
        items = str(value).split(",") if isinstance(value, str) else (
            [value] if isinstance(value, (int, float)) else list(value))
        vals = [float(v) for v in items]
    except (TypeError, ValueError):
        raise ValueError(f"expected 1 or 3 spacings in mm (e.g. 1 or 0.8,0.8,2), got {value!r}")
    if len(vals) == 1:
        vals *= 3
    if len(vals) != 3 or not all(math.isfinite(v) and v > 0 for v in vals):
        raise ValueError(f"expected 1 or 3 positive spacings in mm (e.g. 1 or 0.8,0.8,2), got {value!r}")
    return tuple(vals)  # type: ignore[return-value]


OPTIONS = ReaderOptions()


def set_reader_options(**kwargs) -> ReaderOptions:
    """Change the process-wide reader settings; returns the previous ones (to restore them)."""
    global OPTIONS
    known = {f.name for f in fields(ReaderOptions)}
    bad = set(kwargs) - known
    if bad:
        raise TypeError(f"unknown reader option(s) {sorted(bad)}; known: {sorted(known)}")
    previous = OPTIONS
    OPTIONS = replace(OPTIONS, **kwargs)
    return previous


def reset_reader_options() -> None:
    global OPTIONS
    OPTIONS = ReaderOptions()


def current() -> ReaderOptions:
    return OPTIONS


# ---------------------------------------------------------------------------------------- CLI
def _count(text: str) -> int:
    """``--max-voxels``: an integer, ``1e9``, or ``512^3`` / ``512**3``."""
    t = text.strip().replace("**", "^")
    try:
        if "^" in t:
            base, exp = t.split("^", 1)
            n = int(base) ** int(exp)
        else:
            n = int(float(t)) if any(c in t for c in ".eE") else int(t)
    except (ValueError, OverflowError):
        raise argparse.ArgumentTypeError(f"expected a number of voxels (e.g. 600000000, 1e9 or 800^3), got {text!r}")
    if n <= 0:
        raise argparse.ArgumentTypeError(f"--max-voxels must be positive, got {text!r}")
    return n


def _spacing_arg(text: str) -> tuple[float, float, float]:
    try:
        return spacing_triple(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc))


def add_reader_args(*parsers: argparse.ArgumentParser) -> None:
    """Add ``--max-voxels``, ``--allow-gaps``, ``--series`` and ``--assume-spacing`` to each parser (a verb that
    reads volumes)."""
    for p in parsers:
        g = p.add_argument_group("input checks")
        for flags, kw in (
            (("--max-voxels",), dict(type=_count, metavar="N", default=None,
                                     help=f"refuse a volume with more than N values, read from its header before "
                                          f"anything is allocated; also the limit of the resampled volume, the "
                                          f"slice stacks and the heatmaps (default {DEFAULT_MAX_VOXELS:,}: 2 GiB as "
                                          f"float32)")),
            (("--allow-gaps",), dict(action="store_true", default=None,
                                     help="read a DICOM series with a missing slice or uneven slice spacing "
                                          "(with a warning) instead of refusing it")),
            (("--series",), dict(metavar="UID", default=None,
                                 help="the SeriesInstanceUID to read when a DICOM folder holds several series "
                                      "(default: the one with most files, with a warning)")),
            (("--assume-spacing",), dict(type=_spacing_arg, metavar="X,Y,Z", default=None,
                                         help="read a file whose geometry is missing or degenerate (zero, negative "
                                              "or non-finite voxel size, singular affine; also .npy) with this "
                                              "spacing in mm and identity directions; every prediction from it "
                                              "carries a warning (default: refuse such files)")),
        ):
            try:
                g.add_argument(*flags, **kw)
            except argparse.ArgumentError:  # the verb defines it already
                pass


def apply_reader_args(args: argparse.Namespace) -> ReaderOptions:
    """Set the reader options of this run from parsed CLI flags (missing flags: defaults).

    Called once per ``anymc3d.cli.main`` so that settings never leak from one in-process call to the next.
    The CLI feeds every volume to a backbone that takes 1 or 3 channels, so other counts are refused
    at reading time, naming the file.
    """
    reset_reader_options()
    max_voxels = getattr(args, "max_voxels", None)
    set_reader_options(
        max_voxels=int(max_voxels) if max_voxels else DEFAULT_MAX_VOXELS,
        allow_gaps=bool(getattr(args, "allow_gaps", False)),
        series=getattr(args, "series", None) or None,
        channels=(1, 3),
        assume_spacing=getattr(args, "assume_spacing", None) or None,
    )
    return current()


def with_reader_args(handler, args: argparse.Namespace):
    """``handler`` wrapped so that it runs with the reader options of ``args`` and the previous options are
    restored afterwards (an in-process ``main([...])`` never leaves CLI settings behind for Python callers)."""
    def run(a: argparse.Namespace = args):
        global OPTIONS
        previous = OPTIONS
        apply_reader_args(a)
        try:
            return handler(a)
        finally:
            OPTIONS = previous

    return run

