"""The preprocessing spec: one JSON-serialisable object saved inside every trained plugin.

Prediction re-applies exactly the spec the plugin was trained with, so training and inference
cannot drift apart (the most common complaint about neighbouring tools). Window presets given by
name are resolved to numbers when the spec is built, so a stored spec never depends on the
preset table of a later version.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any, Optional, Sequence, Union

from nibabel.orientations import axcodes2ornt

INTENSITY_MODES = ("ct", "mri", "minmax", "fixed", "none")
VIEWS = ("axial", "coronal", "sagittal")
#: Spatial axis (0=x, 1=y, 2=z of the canonical (X,Y,Z) grid) that each view slices along.
VIEW_AXIS = {"sagittal": 0, "coronal": 1, "axial": 2}

Window = tuple[float, float]

#: The three HU windows of the AnyMC3D paper's chest CT setup (one channel each).
DEFAULT_CT_WINDOWS: list[Window] = [(-1000.0, 1000.0), (-150.0, 250.0), (-1000.0, 400.0)]

#: Named HU windows (lower, upper) = (level - width/2, level + width/2).
WINDOW_PRESETS: dict[str, list[Window]] = {
    "chest": DEFAULT_CT_WINDOWS,                                   # paper: wide, soft tissue, lung-ish
    "head": [(0.0, 80.0), (-20.0, 180.0), (-800.0, 2000.0)],       # brain, subdural, bone (RSNA ICH)
    "lung": [(-1350.0, 150.0)],                                    # L -600 W 1500
    "mediastinum": [(-125.0, 225.0)],                              # L 50 W 350
    "abdomen": [(-160.0, 240.0)],                                  # soft tissue, L 40 W 400
    "liver": [(-25.0, 125.0)],                                     # L 50 W 150
    "brain": [(0.0, 80.0)],                                        # L 40 W 80
    "bone": [(-450.0, 1050.0)],                                    # L 300 W 1500
}

SCHEMA_VERSION = 1


def _resolve_windows(windows: Union[str, Sequence[Any], None]) -> Optional[list[Window]]:
    """Turn a preset name, or a list mixing (lo, hi) pairs and preset names, into explicit pairs."""
    if windows is None:
        return None
    items = [windows] if isinstance(windows, str) else list(windows)
    out: list[Window] = []
    for item in items:
        if isinstance(item, str):
            if item not in WINDOW_PRESETS:
                raise ValueError(f"unknown CT window preset {item!r}; known: {', '.join(WINDOW_PRESETS)}")
            out.extend(WINDOW_PRESETS[item])
        else:
            lo, hi = (float(v) for v in item)
            if not hi > lo:
                raise ValueError(f"CT window {item!r}: upper must exceed lower")
            out.append((lo, hi))
    if not out:
        raise ValueError("windows must not be empty")
    return out


#: spec fields used only when cutting slices
SLICE_ONLY_FIELDS = ("views", "size", "max_slices", "neighbours")


@dataclass
class PreprocessSpec:
    """How a volume becomes slice stacks. Saved with each plugin; re-applied verbatim at prediction.

    orientation: target axis codes (canonical "RAS"), or None to keep the file's voxel order.
    spacing: target voxel size in mm per axis (None keeps it; a None entry keeps that axis).
    intensity: "ct" (one [0,1] channel per HU window), "mri" (percentile clip + z-score over
        non-zero voxels, then (z + 3) / 6 so +-3 SD spans [0, 1]; zero voxels stay 0),
        "minmax" (per channel to [0,1]), "fixed" (divide by ``scale``), "none".
    windows: HU windows for "ct": pairs and/or preset names (see WINDOW_PRESETS); default "chest".
    views: any of "axial" (along z), "coronal" (along y), "sagittal" (along x) of the RAS grid.
    size: side of the square slices given to the backbone.
    max_slices: if a view has more slices, that axis is linearly resampled to max_slices.
    neighbours: 2.5D input: each slice's three channels are the slice before it, the slice and the
        slice after it (the first and last repeat themselves), instead of one grey slice repeated
        three times; for one-channel volumes (not CT windows, which already fill the channels).
    """

    orientation: Optional[str] = "RAS"
    spacing: Optional[tuple[Optional[float], Optional[float], Optional[float]]] = None
    intensity: str = "minmax"
    windows: Optional[Union[str, list[Window]]] = None
    scale: float = 255.0
    clip_percentiles: tuple[float, float] = (0.5, 99.5)
    views: list[str] = field(default_factory=lambda: ["axial"])
    size: int = 224
    max_slices: Optional[int] = None
    neighbours: bool = False

    def __post_init__(self) -> None:
        if self.orientation is not None:
            self.orientation = str(self.orientation).upper()
            try:
                axcodes2ornt(tuple(self.orientation))
            except Exception as exc:
                raise ValueError(f"orientation must be 3 axis codes like 'RAS' or None, got {self.orientation!r}") from exc
            if len(self.orientation) != 3:
                raise ValueError(f"orientation must be 3 axis codes like 'RAS', got {self.orientation!r}")
        if self.spacing is not None:
            sp = tuple(None if s is None else float(s) for s in self.spacing)
            if len(sp) != 3 or any(s is not None and not s > 0 for s in sp):
                raise ValueError(f"spacing must be 3 positive numbers (or None entries), got {self.spacing!r}")
            self.spacing = sp  # type: ignore[assignment]
        if self.intensity not in INTENSITY_MODES:
            raise ValueError(f"intensity must be one of {INTENSITY_MODES}, got {self.intensity!r}")
        if self.intensity == "ct":
            self.windows = _resolve_windows(self.windows if self.windows is not None else "chest")
        elif self.windows is not None:
            raise ValueError("windows are only used with intensity='ct'")
        self.scale = float(self.scale)
        if not self.scale > 0:
            raise ValueError(f"scale must be positive, got {self.scale}")
        lo, hi = (float(v) for v in self.clip_percentiles)
        if not 0.0 <= lo < hi <= 100.0:
            raise ValueError(f"clip_percentiles must satisfy 0 <= lo < hi <= 100, got {self.clip_percentiles!r}")
        self.clip_percentiles = (lo, hi)
        views = [self.views] if isinstance(self.views, str) else list(self.views)
        bad = [v for v in views if v not in VIEWS]
        if not views or bad or len(set(views)) != len(views):
            raise ValueError(f"views must be distinct names from {VIEWS}, got {self.views!r}")
        self.views = views
        if int(self.size) != self.size or self.size < 1:
            raise ValueError(f"size must be a positive integer, got {self.size!r}")
        self.size = int(self.size)
        if self.max_slices is not None:
            if int(self.max_slices) != self.max_slices or self.max_slices < 1:
                raise ValueError(f"max_slices must be a positive integer or None, got {self.max_slices!r}")
            self.max_slices = int(self.max_slices)
        self.neighbours = bool(self.neighbours)
        if self.neighbours and self.out_channels(1) != 1:
            raise ValueError("neighbours (2.5D slices) needs one channel per volume; CT windows already give "
                             f"{self.out_channels(1)}")

    def slice_channels(self, in_channels: int = 1) -> int:
        """Channels of each slice the backbone receives: 3 neighbouring slices for a one-channel
        volume with ``neighbours``, else the channels after intensity processing."""
        c = self.out_channels(in_channels)
        return 3 if self.neighbours and c == 1 else c

    def out_channels(self, in_channels: int = 1) -> int:
        """Channels after intensity processing ("ct" gives one per window per input channel)."""
        return in_channels * len(self.windows) if self.intensity == "ct" else in_channels  # type: ignore[arg-type]

    def canonical_key(self) -> str:
        """The fields that shape the canonical 3D volume (not the slicing ones): equal keys give equal volumes."""
        import json

        return json.dumps({k: v for k, v in self.to_dict().items() if k not in SLICE_ONLY_FIELDS}, sort_keys=True)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON types only (tuples become lists); ``from_dict`` restores an equal spec."""
        d = asdict(self)
        d["spacing"] = None if self.spacing is None else list(self.spacing)
        d["windows"] = None if self.windows is None else [list(w) for w in self.windows]
        d["clip_percentiles"] = list(self.clip_percentiles)
        d["views"] = list(self.views)
        if not self.neighbours:  # written only when on: earlier plugins and cache keys stay as they were
            d.pop("neighbours")
        d["schema"] = SCHEMA_VERSION
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "PreprocessSpec":
        """Inverse of ``to_dict``; unknown keys are an error (a newer/other tool wrote the spec)."""
        d = dict(d)
        schema = d.pop("schema", SCHEMA_VERSION)
        if schema != SCHEMA_VERSION:
            raise ValueError(f"preprocess spec schema {schema} is not supported (expected {SCHEMA_VERSION})")
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"unknown preprocess spec keys: {', '.join(unknown)}")
        if d.get("windows") is not None and not isinstance(d["windows"], str):
            d["windows"] = [tuple(w) if not isinstance(w, str) else w for w in d["windows"]]
        return cls(**d)


@dataclass
class PreprocessOptions:
    """User-facing preprocessing choices (``--views --size --intensity --windows --spacing
    --max-slices``); unspecified fields come from the data source and the backbone."""

    views: list[str] = field(default_factory=lambda: ["axial"])
    size: Optional[int] = None
    intensity: Optional[str] = None
    windows: Union[str, list, None] = None
    spacing: Optional[tuple] = None
    max_slices: Optional[int] = None
    neighbours: bool = False

    def spec_for(self, task, backbone_size: int) -> PreprocessSpec:
        """``task``: anything with ``intensity`` and ``orientation`` (a :class:`anymc3d.data.TaskData`)."""
        kw = dict(views=list(self.views), size=self.size or backbone_size, intensity=self.intensity or task.intensity,
                  orientation=task.orientation, spacing=self.spacing, max_slices=self.max_slices,
                  neighbours=self.neighbours)
        if self.windows is not None:
            kw["windows"] = self.windows
        return PreprocessSpec(**kw)
