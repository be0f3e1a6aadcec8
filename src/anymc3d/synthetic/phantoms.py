"""Procedural abdomen-like phantoms with ellipsoidal lesions (CT in HU, or MRI-like T1/T2).

Geometry convention
-------------------
Arrays are in voxel order (X, Y, Z) and the affine is RAS+ (nibabel): +X = patient's Left,
+Y = Anterior, +Z = Superior.  So the liver sits at negative x (patient's right), the left
kidney at positive x, the spine posterior (negative y).

Anatomy is defined in *normalised* grid coordinates ``u`` in [-1, 1] along each axis (the body
fills the field of view whatever the size or spacing).  Lesion sizes are physical: a radius in
millimetres (or in voxels of the first axis), turned into per-axis voxel semi-axes with the
spacing, so a round lesion stays round in world space on an anisotropic grid.

Everything is drawn from the ``numpy.random.Generator`` passed in, so a case is a pure function of
its generator state.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
from scipy.ndimage import gaussian_filter

# ---------------------------------------------------------------------------------------------
# Tissue intensities per channel: CT in Hounsfield units; "t1"/"t2" in arbitrary MRI units.
# ---------------------------------------------------------------------------------------------
TISSUES: dict[str, dict[str, float]] = {
    #            CT (HU)     T1-like     T2-like
    "air":    {"ct": -1000.0, "t1": 0.0,   "t2": 0.0},
    "fat":    {"ct": -100.0,  "t1": 900.0, "t2": 650.0},
    "soft":   {"ct": 40.0,    "t1": 350.0, "t2": 250.0},
    "liver":  {"ct": 60.0,    "t1": 450.0, "t2": 130.0},
    "spleen": {"ct": 50.0,    "t1": 320.0, "t2": 330.0},
    "kidney": {"ct": 150.0,   "t1": 300.0, "t2": 420.0},   # CT: after contrast
    "bone":   {"ct": 700.0,   "t1": 520.0, "t2": 300.0},
    "disc":   {"ct": 80.0,    "t1": 250.0, "t2": 500.0},
    "aorta":  {"ct": 180.0,   "t1": 150.0, "t2": 60.0},    # CT: arterial contrast; MRI: flow void
}

#: Integer codes of the anatomy label map (``Anatomy.labels``); painting order = list order.
ANATOMY_LABELS: dict[str, int] = {
    "background": 0,
    "fat": 1,
    "soft_tissue": 2,
    "liver": 3,
    "spleen": 4,
    "right_kidney": 5,
    "left_kidney": 6,
    "spine": 7,
    "aorta": 8,
}

#: Organs that can hold a lesion.
LESION_ORGANS = ("liver", "left_kidney", "right_kidney", "spleen")

#: Default CT lesion contrast (HU difference) per organ when a task's ``contrast`` is None:
#: hypodense liver/spleen lesions (metastasis-like) and near-water renal cysts in enhanced kidney.
DEFAULT_CT_CONTRAST = {"liver": -60.0, "spleen": -50.0, "left_kidney": -110.0, "right_kidney": -110.0}

# name -> (tissue, centre (x, y, z), semi-axes (x, y, z)) in normalised coordinates.
# z semi-axes > 1 make a structure run through the whole field of view (body, spine, aorta).
_STRUCTURES: list[tuple[str, str, tuple[float, float, float], tuple[float, float, float]]] = [
    ("fat", "fat", (0.0, 0.0, 0.0), (0.88, 0.74, 1.60)),            # outer body contour
    ("soft_tissue", "soft", (0.0, 0.0, 0.0), (0.75, 0.61, 1.60)),   # inside the fat layer
    ("liver", "liver", (-0.30, 0.14, 0.25), (0.36, 0.33, 0.50)),
    ("spleen", "spleen", (0.45, 0.04, 0.38), (0.17, 0.20, 0.24)),
    ("right_kidney", "kidney", (-0.38, -0.27, -0.32), (0.20, 0.18, 0.34)),
    ("left_kidney", "kidney", (0.38, -0.27, -0.34), (0.20, 0.18, 0.34)),
    ("spine", "bone", (0.0, -0.40, 0.0), (0.12, 0.10, 10.0)),
    ("aorta", "aorta", (0.08, -0.18, 0.0), (0.06, 0.06, 10.0)),
]


def voxel_affine(shape: Sequence[int], spacing: Sequence[float]) -> np.ndarray:
    """4x4 RAS affine: spacing on the diagonal, origin so that the grid centre is at world 0.

    The origin is therefore non-zero (``-(n - 1) / 2 * spacing`` per axis), which makes
    tests catch code that drops the translation.
    """
    aff = np.eye(4)
    for a in range(3):
        aff[a, a] = float(spacing[a])
        aff[a, 3] = -(shape[a] - 1) / 2.0 * float(spacing[a])
    return aff


@dataclass
class Grid:
    shape: tuple[int, int, int]
    spacing: tuple[float, float, float]

    def __post_init__(self) -> None:
        # normalised coordinates of voxel centres, broadcastable along each axis
        self.u = [((np.arange(n, dtype=np.float32) + 0.5) / n * 2.0 - 1.0) for n in self.shape]
        self.ux = self.u[0][:, None, None]
        self.uy = self.u[1][None, :, None]
        self.uz = self.u[2][None, None, :]
        self.half = np.asarray(self.shape, dtype=np.float64) / 2.0  # voxels per normalised unit

    @property
    def affine(self) -> np.ndarray:
        return voxel_affine(self.shape, self.spacing)

    def to_voxel(self, u: np.ndarray) -> np.ndarray:
        """Normalised coordinate -> continuous voxel index."""
        return (np.asarray(u, dtype=np.float64) + 1.0) * self.half - 0.5


def _soft_ellipsoid(grid: Grid, centre, semi, edge_vox: float) -> np.ndarray:
    """Soft indicator in [0, 1] (0.5 on the surface) of an axis-aligned ellipsoid in normalised units."""
    cx, cy, cz = centre
    ax, ay, az = semi
    rho = np.sqrt(((grid.ux - cx) / ax) ** 2 + ((grid.uy - cy) / ay) ** 2 + ((grid.uz - cz) / az) ** 2)
    # distance to surface ~ (rho - 1) * semi-axis (voxels); use the in-plane geometric mean scale
    scale = float(np.sqrt(ax * grid.half[0] * ay * grid.half[1]))
    return (0.5 - 0.5 * np.tanh((rho - 1.0) * (scale / max(edge_vox, 1e-3)))).astype(np.float32)


@dataclass
class Structure:
    name: str
    tissue: str
    centre: np.ndarray  # normalised
    semi: np.ndarray    # normalised


@dataclass
class Anatomy:
    """One case's sampled anatomy (geometry + per-tissue intensity jitter) and its rendering."""

    grid: Grid
    structures: list[Structure]
    tissue_jitter: dict[str, float]
    disc_period: float
    disc_phase: float
    weights: dict[str, np.ndarray] = field(default_factory=dict)  # soft indicator per structure
    labels: np.ndarray | None = None  # uint8 label map, codes in ANATOMY_LABELS

    def structure(self, name: str) -> Structure:
        for s in self.structures:
            if s.name == name:
                return s
        raise KeyError(name)


def sample_anatomy(rng: np.random.Generator, grid: Grid, jitter: float = 1.0) -> Anatomy:
    """Draw a per-case anatomy: global scale, organ centre/size jitter, intensity jitter."""
    g_scale = 1.0 + jitter * rng.uniform(-0.05, 0.04)
    g_shift = jitter * np.array([rng.normal(0, 0.02), rng.normal(0, 0.02), 0.0])
    fat_frac = 1.0 - jitter * rng.uniform(0.0, 0.06)  # thickness of subcutaneous fat varies
    structures: list[Structure] = []
    for name, tissue, c, s in _STRUCTURES:
        c = np.asarray(c, dtype=np.float64) * g_scale + g_shift
        s = np.asarray(s, dtype=np.float64) * g_scale
        if name == "soft_tissue":
            s = s * np.array([fat_frac, fat_frac, 1.0])
        elif name != "fat":
            c = c + jitter * rng.normal(0.0, 0.025, size=3) * np.array([1, 1, 1.5])
            s = s * (1.0 + jitter * rng.uniform(-0.10, 0.10, size=3))
        structures.append(Structure(name, tissue, c, s))
    tissue_jitter = {t: float(jitter * rng.normal(0.0, 1.0)) for t in TISSUES}
    return Anatomy(
        grid=grid,
        structures=structures,
        tissue_jitter=tissue_jitter,
        disc_period=0.30 * (1.0 + jitter * rng.uniform(-0.1, 0.1)),
        disc_phase=float(rng.uniform(0.0, 1.0)),
    )


def render_anatomy_weights(anat: Anatomy, edge_vox: float = 0.8) -> Anatomy:
    """Fill ``anat.weights`` (soft masks) and ``anat.labels`` (hard label map)."""
    grid = anat.grid
    labels = np.zeros(grid.shape, dtype=np.uint8)
    for s in anat.structures:
        w = _soft_ellipsoid(grid, s.centre, s.semi, edge_vox)
        anat.weights[s.name] = w
        labels[w >= 0.5] = ANATOMY_LABELS[s.name]
    anat.labels = labels
    return anat


def _tissue_value(anat: Anatomy, tissue: str, channel: str) -> float:
    base = TISSUES[tissue][channel]
    # intensity jitter: ~4 HU for CT, ~3 % for MRI
    j = anat.tissue_jitter[tissue]
    if channel == "ct":
        return base + (0.0 if tissue == "air" else 4.0 * j)
    return base * (1.0 + 0.03 * j)


def paint(anat: Anatomy, channel: str) -> np.ndarray:
    """Noise-free piecewise-smooth image of the anatomy for one channel ("ct", "t1", "t2")."""
    grid = anat.grid
    img = np.full(grid.shape, _tissue_value(anat, "air", channel), dtype=np.float32)
    for s in anat.structures:
        w = anat.weights[s.name]
        if s.name == "spine":
            # vertebral bodies separated by discs along z
            bone = _tissue_value(anat, "bone", channel)
            disc = _tissue_value(anat, "disc", channel)
            ph = np.mod(grid.u[2] / anat.disc_period + anat.disc_phase, 1.0)
            dmask = 0.5 - 0.5 * np.tanh((np.abs(ph - 0.5) - 0.1) * 25.0)  # ~20 % of the period
            val = (bone + (disc - bone) * dmask).astype(np.float32)[None, None, :]
        else:
            val = np.float32(_tissue_value(anat, s.tissue, channel))
        img += w * (val - img)
    return img


def smooth_field(rng: np.random.Generator, shape, sigma: float) -> np.ndarray:
    """Zero-mean, unit-std low-frequency random field."""
    f = gaussian_filter(rng.standard_normal(shape, dtype=np.float32), sigma=sigma, mode="wrap")
    sd = float(f.std())
    return f / (sd if sd > 0 else 1.0)


@dataclass
class Lesion:
    """An ellipsoidal lesion; ``contrast`` maps channel -> intensity difference to add."""

    organ: str
    kind: str
    centre_vox: np.ndarray            # continuous voxel index (x, y, z)
    semi_vox: np.ndarray              # semi-axes in voxels (x, y, z)
    contrast: dict[str, float]
    edge_vox: float = 0.6

    def to_dict(self) -> dict:
        return {
            "organ": self.organ,
            "type": self.kind,
            "centre_vox": [round(float(v), 3) for v in self.centre_vox],
            "semi_axes_vox": [round(float(v), 3) for v in self.semi_vox],
            "contrast": {k: float(v) for k, v in self.contrast.items()},
        }


def lesion_semi_vox(grid: Grid, radius_mm: float, stretch=(1.0, 1.0, 1.0)) -> np.ndarray:
    """Physical radius (mm) and per-axis stretch -> semi-axes in voxels."""
    return np.asarray([radius_mm * stretch[a] / grid.spacing[a] for a in range(3)], dtype=np.float64)


def place_lesion(
    rng: np.random.Generator,
    anat: Anatomy,
    organ: str,
    semi_vox: np.ndarray,
    others: Sequence[Lesion] = (),
    tries: int = 200,
) -> np.ndarray:
    """Sample a lesion centre (voxel coords) inside ``organ``, away from its edge and other lesions."""
    grid = anat.grid
    st = anat.structure(organ)
    code = ANATOMY_LABELS[organ]
    semi_n = semi_vox / grid.half  # lesion semi-axes in normalised units
    room = np.maximum(st.semi - semi_n - 1.0 / grid.half, 0.15 * st.semi)
    best, best_score = None, -np.inf
    for _ in range(tries):
        d = rng.standard_normal(3)
        d /= np.linalg.norm(d) + 1e-12
        p = st.centre + room * d * rng.uniform() ** (1.0 / 3.0)
        cv = grid.to_voxel(p)
        idx = tuple(int(np.clip(round(cv[a]), 0, grid.shape[a] - 1)) for a in range(3))
        inside = anat.labels[idx] == code
        gap = min(
            (np.linalg.norm(cv - o.centre_vox) - float(np.max(semi_vox)) - float(np.max(o.semi_vox)) - 1.0
             for o in others),
            default=np.inf,
        )
        if inside and gap >= 0:
            return cv
        score = (1.0 if inside else 0.0) + min(gap, 0.0) * 0.01
        if score > best_score:
            best, best_score = cv, score
    return best  # best effort (crowded organ)


def render_lesion(img: np.ndarray, mask: np.ndarray, anat: Anatomy, les: Lesion, channel: str) -> None:
    """Add one lesion to ``img`` (in place) and set its voxels in ``mask`` (in place).

    The lesion is restricted to its organ (soft-weighted by the organ's indicator); the mask is the
    set of voxels inside the ellipsoid surface that belong to the organ.
    """
    shape = img.shape
    pad = les.semi_vox + 3.0 * les.edge_vox + 1.0
    lo = [max(int(np.floor(les.centre_vox[a] - pad[a])), 0) for a in range(3)]
    hi = [min(int(np.ceil(les.centre_vox[a] + pad[a])) + 1, shape[a]) for a in range(3)]
    if any(h <= l for l, h in zip(lo, hi)):
        return
    box = tuple(slice(l, h) for l, h in zip(lo, hi))
    ax = [(np.arange(lo[a], hi[a], dtype=np.float32) - les.centre_vox[a]) / les.semi_vox[a] for a in range(3)]
    rho = np.sqrt(ax[0][:, None, None] ** 2 + ax[1][None, :, None] ** 2 + ax[2][None, None, :] ** 2)
    scale = float(np.min(les.semi_vox))
    w = 0.5 - 0.5 * np.tanh((rho - 1.0) * (scale / max(les.edge_vox, 1e-3)))
    organ_w = anat.weights[les.organ][box]
    c = float(les.contrast.get(channel, 0.0))
    if c != 0.0:
        img[box] += (c * w * organ_w).astype(np.float32)
    inside = (rho <= 1.0) & (anat.labels[box] == ANATOMY_LABELS[les.organ])
    mask[box] |= inside.astype(np.uint8)


def finish_ct(img: np.ndarray, anat: Anatomy, rng: np.random.Generator, noise: float, texture: float,
              texture_field: np.ndarray | None) -> np.ndarray:
    """Add low-frequency tissue texture (inside the body) and white Gaussian noise (everywhere)."""
    if texture > 0 and texture_field is not None:
        img += (texture * texture_field * anat.weights["fat"]).astype(np.float32)
    if noise > 0:
        img += rng.standard_normal(img.shape, dtype=np.float32) * np.float32(noise)
    return img


def finish_mri(img: np.ndarray, anat: Anatomy, rng: np.random.Generator, noise: float, texture: float,
               texture_field: np.ndarray | None, bias: float) -> np.ndarray:
    """Multiplicative texture and smooth bias field, then Rician magnitude noise (non-negative)."""
    grid = anat.grid
    if texture > 0 and texture_field is not None:
        img *= (1.0 + texture * texture_field).astype(np.float32)
    if bias > 0:
        d = rng.standard_normal(3)
        d /= np.linalg.norm(d) + 1e-12
        field_ = 1.0 + bias * (d[0] * grid.ux + d[1] * grid.uy + d[2] * grid.uz)
        img *= field_.astype(np.float32)
    if noise > 0:
        n1 = rng.standard_normal(img.shape, dtype=np.float32) * np.float32(noise)
        n2 = rng.standard_normal(img.shape, dtype=np.float32) * np.float32(noise)
        img = np.sqrt((img + n1) ** 2 + n2 ** 2)
    return np.maximum(img, 0.0).astype(np.float32)
