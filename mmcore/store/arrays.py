"""``.npy`` files of the cache: written atomically, their header read without the data."""

from __future__ import annotations

import numpy as np

from mmcore.io import atomic_write


def save_array(path, array):
    """``np.save`` atomically (:func:`mmcore.io.atomic_write`; an ``OSError`` reaches the caller)."""
    with atomic_write(path, "wb") as handle:
        np.save(handle, array, allow_pickle=False)


def read_npy_header(handle):
    """``(shape, dtype, data offset)`` from the ``.npy`` header of an open binary file, reading nothing else."""
    version = np.lib.format.read_magic(handle)
    read_header = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}
    if version not in read_header:
        raise ValueError(f"unsupported .npy version {version}")
    shape, _, dtype = read_header[version](handle)
    return shape, dtype, handle.tell()


def payload_bytes(shape, dtype):
    """How many bytes the data of an array of ``shape`` and ``dtype`` takes."""
    return int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
