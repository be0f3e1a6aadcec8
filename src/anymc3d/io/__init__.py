"""Reading inputs (NIfTI, DICOM series, NRRD/MHA, NumPy) and writing outputs atomically."""
from __future__ import annotations

from anymc3d.io import options
from anymc3d.io.options import (DEFAULT_MAX_VOXELS, ReaderOptions, add_reader_args, apply_reader_args,
                                reset_reader_options, set_reader_options)
from anymc3d.io.allocation import MAX_ASPECT, check_allocation, check_aspect
from anymc3d.io.outputs import check_output_folder
from anymc3d.io.readers import (DIRECTORY, check_declared_size, itk_to_ras_affine, read_volume, register_reader,
                                registered_suffixes)
from anymc3d.io.writers import atomic_write, write_json, write_nifti

__all__ = [
    "DEFAULT_MAX_VOXELS",
    "DIRECTORY",
    "MAX_ASPECT",
    "ReaderOptions",
    "add_reader_args",
    "apply_reader_args",
    "atomic_write",
    "check_allocation",
    "check_aspect",
    "check_declared_size",
    "check_output_folder",
    "itk_to_ras_affine",
    "options",
    "read_volume",
    "register_reader",
    "registered_suffixes",
    "reset_reader_options",
    "set_reader_options",
    "write_json",
    "write_nifti",
]
