"""Read 3D medical images into a :class:`~anymc3d.volume.Volume` through one suffix registry.

Modelled on nnU-Net v2's ``imageio`` registry: a dict maps a (lower-case) file suffix to a
reader function ``reader(path) -> Volume``; a folder is read as a DICOM series. Readers return
the raw array and the nibabel-style voxel->RAS affine; :func:`read_volume` does the checks that
every format shares (dimensionality, channels, NaN/Inf, empty, degenerate affine, constant
content) and casts to float32, so a plug-in reader only has to get the geometry right.

Before any voxel is allocated, the built-in readers check the shape and voxel type that the
header declares against :attr:`~anymc3d.io.options.ReaderOptions.max_voxels` (default 2 GiB as
float32; ``--max-voxels``). DICOM series are checked for missing slices and uneven spacing
(refused unless ``--allow-gaps``) and for several series in one folder (a warning naming the one
read; ``--series UID`` chooses).

Every user-facing failure is an :class:`~anymc3d.errors.InputError` whose one-line message starts
with the offending path; every warning is one ``anymc3d: warning: <file>: <cause>`` line on
stderr and one string in ``volume.meta["warnings"]``.


The package: :mod:`.registry` (suffix registry and :func:`read_volume`), :mod:`.checks` (the shared
checks), :mod:`.quiet` (muting the libraries), :mod:`.nifti`, :mod:`.itk`, :mod:`.dicom`, :mod:`.npy`.
"""
from __future__ import annotations

from anymc3d.io.readers.checks import (NEAR_EMPTY_FRACTION, check_declared_size, check_layout, content_problem,
                                       geometry_problem, spacing_problem)
from anymc3d.io.readers.dicom import read_dicom_series, read_dicom_series_header
from anymc3d.io.readers.itk import _make_sitk_reader, itk_to_ras_affine, make_sitk_header_reader
from anymc3d.io.readers.nifti import read_nifti, read_nifti_header
from anymc3d.io.readers.npy import read_npy, read_npy_file_header, read_npy_header
from anymc3d.io.readers.quiet import _keep_locale  # noqa: F401  (tests restore the locale with it)
from anymc3d.io.readers.registry import DIRECTORY, Reader, read_volume, register_reader, registered_suffixes

register_reader(".nii", read_nifti, header=read_nifti_header)
register_reader(".nii.gz", read_nifti, header=read_nifti_header)
for _suffix, _fmt in ((".nrrd", "nrrd"), (".nhdr", "nrrd"), (".mha", "mha"), (".mhd", "mha"), (".dcm", "dicom")):
    # .dcm: a single (multi-frame) DICOM file
    register_reader(_suffix, _make_sitk_reader(_fmt), header=make_sitk_header_reader(_fmt))
register_reader(DIRECTORY, read_dicom_series, header=read_dicom_series_header)
register_reader(".npy", read_npy, header=read_npy_file_header)

__all__ = [
    "DIRECTORY",
    "NEAR_EMPTY_FRACTION",
    "Reader",
    "check_declared_size",
    "check_layout",
    "content_problem",
    "geometry_problem",
    "itk_to_ras_affine",
    "read_dicom_series",
    "read_dicom_series_header",
    "read_nifti",
    "read_nifti_header",
    "read_npy",
    "read_npy_file_header",
    "read_npy_header",
    "read_volume",
    "register_reader",
    "registered_suffixes",
    "spacing_problem",
]
