"""Reader settings: size limit, DICOM gap and series policy, accepted channel counts.

These are process-wide (one CLI run = one set of flags): the CLI sets them from ``--max-voxels``,
``--allow-gaps`` and ``--series`` with :func:`apply_reader_args`; Python callers may use
:func:`set_reader_options` (or pass ``max_voxels=`` / ``allow_gaps=`` / ``series=`` to
:func:`~anymc3d.io.read_volume`, which wins over the process setting).
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


def add_reader_args(*parsers: argparse.ArgumentParser) -> None:
    """Add ``--max-voxels``, ``--allow-gaps`` and ``--series`` to each parser (a verb that reads volumes)."""
    for p in parsers:
        g = p.add_argument_group("input checks")
        for flags, kw in (
            (("--max-voxels",), dict(type=_count, metavar="N", default=None,
                                     help=f"refuse a volume with more than N values, read from its header before "
                                          f"anything is allocated (default {DEFAULT_MAX_VOXELS:,}: 2 GiB as float32)")),
            (("--allow-gaps",), dict(action="store_true", default=None,
                                     help="read a DICOM series with a missing slice or uneven slice spacing "
                                          "(with a warning) instead of refusing it")),
            (("--series",), dict(metavar="UID", default=None,
                                 help="the SeriesInstanceUID to read when a DICOM folder holds several series "
                                      "(default: the one with most files, with a warning)")),
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

