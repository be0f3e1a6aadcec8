"""Reading inputs (NIfTI, DICOM series, NRRD/MHA, NumPy) and writing outputs atomically."""
from __future__ import annotations

from anymc3d.io.readers import DIRECTORY, itk_to_ras_affine, read_volume, register_reader, registered_suffixes
from anymc3d.io.writers import atomic_write, write_nifti

__all__ = [
    "DIRECTORY",
    "atomic_write",
    "itk_to_ras_affine",
    "read_volume",
    "register_reader",
    "registered_suffixes",
    "write_nifti",
]
