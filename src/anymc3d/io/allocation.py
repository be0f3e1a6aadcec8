"""The allocation guard: one check, before memory is taken, of every large array a volume turns into.

A header that passes the reader's size check can still ask for far more memory later: resampling
a 64³ volume of 40 mm voxels to 1 mm makes 2560³ voxels, and a 4×4×500000 volume (36 KB as
.nii.gz) cut into 224-pixel axial slices is a (500000, 1, 224, 224) tensor. So every step that
allocates in proportion to the *planned* shape (the reader, the resampled grid, the slice stacks,
the heatmaps) calls :func:`check_allocation` first, against the same limit as the reader:
:attr:`~anymc3d.io.options.ReaderOptions.max_voxels` (``--max-voxels``; per request in the service).

:func:`check_aspect` refuses an absurd shape with its reason: after resampling, the longest spatial
axis may be at most :data:`MAX_ASPECT` times the shortest (docs/data.md).
"""
from __future__ import annotations

import math

from anymc3d.errors import InputError
from anymc3d.io import options as _options

#: Longest / shortest spatial axis (voxels, on the grid the model sees) above which a volume is refused.
#: 256 lets every 512-matrix scan with 2 or more slices through (512x512x20 is 25.6; a 0.7x0.7x5 mm
#: 512x512x20 CT resampled to 1 mm is 358x358x100, 3.6); 4x4x500000 is 125000.
MAX_ASPECT = 256

#: The flag that raises the limit (named in every refusal).
FLAG = "--max-voxels"


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB"):
        if n < 1024 or unit == "EiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} EiB"  # pragma: no cover


def _shape_text(dims) -> str:
    return "x".join(map(str, dims))


def check_allocation(source, shape, what: str, itemsize: int = 4, done: str = "nothing was allocated",
                     limit: int | None = None) -> int:
    """Refuse, before allocating, an array of ``shape`` holding more values than the limit.

    ``source`` is the file the message names, ``what`` says which array (``"its NIfTI header
    declares"``, ``"resampling to 1x1x1 mm makes"``...). The bytes are ``itemsize`` per value (float32).
    Returns the number of values. The limit is ``limit`` or the reader option ``max_voxels``.
    """
    try:
        dims = [int(s) for s in shape]
    except (TypeError, ValueError, OverflowError):
        raise InputError(f"{source}: {what} an invalid shape {shape!r}")
    if any(d < 0 for d in dims):
        raise InputError(f"{source}: {what} a negative size ({_shape_text(dims)})")
    n = math.prod(dims)
    limit = _options.current().max_voxels if limit is None else int(limit)
    if n > limit:
        raise InputError(f"{source}: {what} {_shape_text(dims)} = {n:,} values ({human_bytes(float(itemsize) * n)} "
                         f"as float32), more than the limit of {limit:,} ({human_bytes(float(itemsize) * limit)}); "
                         f"{done}. If the volume is real, raise the limit with {FLAG}")
    return n


def check_aspect(source, spatial_shape, what: str = "the volume the model sees is") -> None:
    """Refuse a spatial shape whose longest axis is more than :data:`MAX_ASPECT` times its shortest."""
    dims = [int(s) for s in spatial_shape]
    lo, hi = min(dims), max(dims)
    if lo <= 0 or hi > MAX_ASPECT * lo:
        ratio = f"{hi / lo:,.0f}" if lo > 0 else "infinitely"
        raise InputError(f"{source}: {what} {_shape_text(dims)} voxels: one axis is {ratio} times longer than "
                         f"another (more than {MAX_ASPECT}x); no CT or MR scan has that shape, so the header's size "
                         f"or spacing is wrong (a line of voxels, or a wrong voxel size); nothing was allocated")
