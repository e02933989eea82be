"""PNG and NPY: 2-D pictures and arrays, no geometry (the header's size checked before reading)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .errors import SUPPORTED, ImageReadError, TruncatedImageError
from .limits import DEFAULT_MAX_VOXELS, check_voxels, file_size
from .volume import Volume

__all__ = ["read_npy", "read_png", "write_png"]


def read_png(path: Path, max_voxels: int = DEFAULT_MAX_VOXELS) -> Volume:
    from PIL import Image

    with open(path, "rb") as fh:
        head = fh.read(24)
    if head[:8] == b"\x89PNG\r\n\x1a\n" and head[12:16] == b"IHDR":
        # The IHDR chunk gives the size before PIL looks at it (its own bomb check raises first).
        width, height = int.from_bytes(head[16:20], "big"), int.from_bytes(head[20:24], "big")
        check_voxels((height, width), max_voxels, path)
    with Image.open(path) as im:
        check_voxels((im.height, im.width), max_voxels, path)
        if im.mode == "P":
            raise ImageReadError(f"{path}: palette PNG; save the scan as 8- or 16-bit grayscale")
        mode, pixels = im.mode, np.asarray(im)
    if pixels.ndim == 3:
        # Grayscale scans are often saved as RGB(A); accept them only when the
        # colour channels agree so nothing is silently averaged away.
        channels = pixels[..., :3] if pixels.shape[-1] >= 3 else pixels[..., :1]
        if not (channels == channels[..., :1]).all():
            raise ImageReadError(f"{path}: PNG mode {mode} holds colour; save it as grayscale")
        pixels = channels[..., 0]
    return Volume(array=pixels.astype(np.float32), source=path)


def read_npy(path: Path, max_voxels: int = DEFAULT_MAX_VOXELS) -> Volume:
    from numpy.lib import format as npy_format

    with open(path, "rb") as fh:
        try:
            version = npy_format.read_magic(fh)
            read_header = npy_format.read_array_header_1_0 if version == (1, 0) else npy_format.read_array_header_2_0
            shape, _, dtype = read_header(fh)
        except ValueError as exc:  # not .npy, or a header numpy will not parse (pickled dtypes included)
            raise ImageReadError(f"{path}: not a readable .npy file ({exc}); {SUPPORTED}") from exc
        start = fh.tell()
    if len(shape) not in (2, 3):
        raise ImageReadError(f"{path}: .npy shape {shape}; expected (H, W) or (D, H, W)")
    if not (np.issubdtype(dtype, np.number) or dtype == bool) or np.issubdtype(dtype, np.complexfloating):
        raise ImageReadError(f"{path}: .npy dtype {dtype} is not a real-valued image")
    count = check_voxels(shape, max_voxels, path)
    if file_size(path) < start + count * dtype.itemsize:
        raise TruncatedImageError(f"{path}: truncated: its header claims {start + count * dtype.itemsize:,} bytes, "
                                  f"the file holds {file_size(path):,}; copy it again from the source")
    array = np.load(path, allow_pickle=False)
    return Volume(array=np.ascontiguousarray(array, dtype=np.float32), source=path)


def write_png(labels: np.ndarray, tmp: Path) -> None:
    from PIL import Image

    if labels.ndim == 3:
        if labels.shape[0] != 1:
            raise ValueError(f"a PNG holds one slice, labels are {labels.shape}; write .nii.gz")
        labels = labels[0]
    with open(tmp, "xb") as fh:
        Image.fromarray(np.ascontiguousarray(labels)).save(fh, format="PNG")
