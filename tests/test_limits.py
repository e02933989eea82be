"""Sizes a file claims are checked before reading; gzip is inflated with a bound (issue 20).

No test allocates more than a few MiB: peaks are measured with tracemalloc (numpy's buffers and
Python's bytes are both traced), and every error must come before the voxels are read.
"""

from __future__ import annotations

import gzip
import struct
import tracemalloc
import zlib
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
from PIL import Image

from samed_adapter.io import (
    DEFAULT_MAX_VOXELS,
    ImageReadError,
    ImageTooLargeError,
    TruncatedImageError,
    check_voxels,
    read_image,
)
from samed_adapter.testing.dicom import write_ct_slice

MiB = 1 << 20


def _nifti_header(shape: tuple[int, ...], dtype=np.float32) -> bytes:
    """352 bytes: a NIfTI-1 header claiming ``shape`` (and the 4-byte extension flag)."""
    header = nib.Nifti1Header()
    header.set_data_shape(shape)
    header.set_data_dtype(dtype)
    header["vox_offset"] = 352
    return header.binaryblock + b"\x00" * 4


def _peak(read) -> tuple[BaseException | None, int]:
    """(the exception ``read()`` raised, or None; the peak of traced memory in bytes)."""
    tracemalloc.start()
    try:
        read()
        error = None
    except BaseException as exc:  # noqa: BLE001 - what it raised is the result
        error = exc
    finally:
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
    return error, peak


def test_default_limit_fits_real_ct() -> None:
    assert DEFAULT_MAX_VOXELS == 2**30
    check_voxels((3000, 512, 512))  # thin-slice whole-body CT
    check_voxels((1000, 1024, 1024))  # 1024-matrix photon-counting CT


def test_a_416_byte_nifti_claiming_16_gib_is_refused_before_reading(tmp_path: Path) -> None:
    path = tmp_path / "hostile.nii"
    path.write_bytes(_nifti_header((2048, 2048, 1024)) + b"\x00" * 64)  # 4 Gi float32 voxels = 16 GiB
    assert path.stat().st_size == 416
    error, peak = _peak(lambda: read_image(path))
    assert isinstance(error, ImageTooLargeError), error
    message = str(error)
    assert "2048 x 2048 x 1024 = 4,294,967,296 voxels" in message and "1,073,741,824" in message
    assert "--max-voxels" in message and "\n" not in message and str(path) in message
    assert peak < 2 * MiB


@pytest.mark.parametrize("suffix", [".nii", ".nii.gz"])
def test_a_header_claiming_100_gb_under_a_raised_limit_is_truncated_not_memory_error(tmp_path: Path, suffix) -> None:
    path = tmp_path / f"claims{suffix}"
    payload = _nifti_header((5000, 5000, 1000)) + b"\x00" * 4096  # 25e9 float32 voxels = 100 GB
    path.write_bytes(gzip.compress(payload) if suffix == ".nii.gz" else payload)
    error, peak = _peak(lambda: read_image(path, max_voxels=10**11))
    assert isinstance(error, TruncatedImageError), error
    assert "claims 100,000,000,352 bytes, the file holds 4,448" in str(error)
    assert peak < 4 * MiB


def test_a_gzip_bomb_stops_at_the_size_its_header_claims(tmp_path: Path) -> None:
    # A 4 x 4 x 4 uint8 header followed by 200 MiB of zeros: 200 KiB compressed.
    stream = zlib.compressobj(9, zlib.DEFLATED, 31)  # 31: a gzip container
    path = tmp_path / "bomb.nii.gz"
    with open(path, "wb") as fh:
        fh.write(stream.compress(_nifti_header((4, 4, 4), np.uint8)))
        block = b"\x00" * MiB
        for _ in range(200):
            fh.write(stream.compress(block))
        fh.write(stream.flush())
    assert path.stat().st_size < MiB
    error, peak = _peak(lambda: read_image(path))
    assert isinstance(error, ImageReadError) and "more data than its header claims" in str(error), error
    assert peak < 8 * MiB  # what was read: the header, 64 voxels and one chunk, never 200 MiB


def test_a_gzip_bomb_claiming_a_huge_volume_is_refused_before_inflating(tmp_path: Path) -> None:
    path = tmp_path / "bomb.nii.gz"
    path.write_bytes(gzip.compress(_nifti_header((3000, 3000, 3000), np.uint8) + b"\x00" * (16 * MiB)))
    error, peak = _peak(lambda: read_image(path))
    assert isinstance(error, ImageTooLargeError) and "27,000,000,000 voxels" in str(error), error
    assert peak < 2 * MiB


def test_a_cut_off_gzip_stream_is_truncated(tmp_path: Path) -> None:
    data = np.arange(32 * 32 * 8, dtype=np.int16).reshape(32, 32, 8)
    whole = tmp_path / "whole.nii.gz"
    nib.save(nib.Nifti1Image(data, np.eye(4)), whole)
    raw = whole.read_bytes()
    cut = tmp_path / "cut.nii.gz"
    cut.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(TruncatedImageError, match="cut off|truncated") as err:
        read_image(cut)
    assert str(cut) in str(err.value) and "\n" not in str(err.value)
    np.testing.assert_array_equal(read_image(whole).voxels, data)  # the whole file still reads


def test_max_voxels_is_exact(tmp_path: Path) -> None:
    path = tmp_path / "small.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((10, 10, 10), np.float32), np.eye(4)), path)
    assert read_image(path, max_voxels=1000).array.shape == (10, 10, 10)
    with pytest.raises(ImageTooLargeError, match="10 x 10 x 10 = 1,000 voxels .* limit of 999 voxels"):
        read_image(path, max_voxels=999)
    with pytest.raises(ValueError, match="max_voxels must be a positive int"):
        read_image(path, max_voxels=0)


def test_npy_header_claiming_too_much_is_refused_before_reading(tmp_path: Path) -> None:
    path = tmp_path / "huge.npy"
    with open(path, "wb") as fh:
        np.lib.format.write_array_header_1_0(fh, {"descr": "<f4", "fortran_order": False,
                                                 "shape": (100000, 100000, 100)})
    error, peak = _peak(lambda: read_image(path))
    assert isinstance(error, ImageTooLargeError) and "1,000,000,000,000 voxels" in str(error), error
    assert peak < 2 * MiB
    with pytest.raises(TruncatedImageError, match="truncated"):
        read_image(path, max_voxels=10**13)


def test_png_size_is_checked_from_its_header(tmp_path: Path) -> None:
    path = tmp_path / "wide.png"
    Image.fromarray(np.zeros((4, 5), np.uint8)).save(path)
    with pytest.raises(ImageTooLargeError, match="4 x 5 = 20 voxels"):
        read_image(path, max_voxels=19)
    # A hand-made IHDR claiming 60000 x 60000 pixels, no image data.
    ihdr = struct.pack(">IIBBBBB", 60000, 60000, 8, 0, 0, 0, 0)
    chunk = struct.pack(">I", len(ihdr)) + b"IHDR" + ihdr + struct.pack(">I", zlib.crc32(b"IHDR" + ihdr))
    hostile = tmp_path / "hostile.png"
    hostile.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk)
    error, peak = _peak(lambda: read_image(hostile))
    assert isinstance(error, ImageTooLargeError) and "60000 x 60000" in str(error), error
    assert peak < 2 * MiB


def test_dicom_rows_columns_slices_are_checked_before_pixels(tmp_path: Path) -> None:
    folder = tmp_path / "series"
    folder.mkdir()
    for k in range(3):
        path = folder / f"{k}.dcm"
        write_ct_slice(path, np.zeros((4, 4)), [0.0, 0.0, 2.0 * k], iop=[1, 0, 0, 0, 1, 0], spacing=[1, 1],
                       series="1.2.840.99.5")
        ds = pydicom.dcmread(path)
        ds.Rows = ds.Columns = 60000  # claims 3 x 60000 x 60000; holds 16 pixels
        ds.save_as(path)
    with pytest.raises(ImageTooLargeError, match="3 x 60000 x 60000 = 10,800,000,000 voxels"):
        read_image(folder)


def test_check_voxels_bounds_the_models_inputs() -> None:
    # An 8 x 8 x 30000 volume is small; its 30000 slices at 512 x 512 are not (7.9 GB as float32).
    check_voxels((30000, 8, 8))
    with pytest.raises(ImageTooLargeError, match="model input of 30000 x 512 x 512 = 7,864,320,000 voxels"):
        check_voxels((30000, 512, 512), what="model input")
    with pytest.raises(ImageReadError, match="negative"):
        check_voxels((3, -1, 4))
