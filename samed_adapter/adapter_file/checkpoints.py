"""Reading checkpoint files (`torch.save`d or `.safetensors`) without running code from them."""

from __future__ import annotations

import io
import os
import pickle
import pickletools
import zipfile
from typing import Union

import torch

# What a checkpoint file must be; every "not a checkpoint" message ends with it.
EXPECTED = (
    "expected a checkpoint of named tensors, such as SAM's sam_vit_b_01ec64.pth: a torch.save'd "
    "state dict, or a .safetensors file of tensors"
)

# Opcodes that look up or call Python objects: a pickle with one of them could run code.
_CODE_OPCODES = frozenset({"GLOBAL", "STACK_GLOBAL", "INST", "OBJ", "REDUCE", "NEWOBJ", "NEWOBJ_EX", "BUILD"})
_PICKLE_SCAN_LIMIT = 64 << 20  # a checkpoint's pickles are small; its tensor bytes follow them


class UnsafeCheckpointError(ValueError):
    """A checkpoint file holds pickled objects other than tensors and plain containers."""


def load_state_dict_file(path: Union[str, os.PathLike]) -> dict[str, torch.Tensor]:
    """Load a flat `{name: tensor}` dict saved with `torch.save` or as `.safetensors`, on the CPU.

    The pickle is read with `weights_only=True`, so a file that would construct arbitrary
    objects (and so could run code) is refused, not executed. Any other file that is not such a
    checkpoint (text, random bytes, an unrelated zip) raises a ValueError naming the file.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no checkpoint file at {path}")
    if path.lower().endswith(".safetensors"):
        state = _load_safetensors(path)
    else:
        state = _load_torch(path)
    for key in ("state_dict", "model"):  # Lightning-style wrappers; SAM 2 checkpoints keep theirs under "model"
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
            break
    if not isinstance(state, dict) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()
    ):
        raise ValueError(f"{path} does not hold a flat dict of named tensors; {EXPECTED}")
    return state


def _load_safetensors(path: str) -> dict[str, torch.Tensor]:
    # Read with safetensors itself: torch.load reads .safetensors only in recent versions (older
    # ones take the file for a pickle), and its errors there are safetensors' own.
    from safetensors.torch import load_file

    try:
        return load_file(path, device="cpu")
    except Exception as err:  # SafetensorError for a malformed file, and torch's own for odd dtypes
        raise ValueError(f"{path} is not a readable .safetensors file ({_detail(err)}); {EXPECTED}") from None


def _load_torch(path: str) -> object:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        if _would_run_code(path, err):
            raise UnsafeCheckpointError(
                f"{path} was refused: it holds pickled objects other than tensors, which could run code "
                f"when loaded ({_detail(err)}). Only load checkpoints you trust; re-save trusted ones as a "
                "plain dict of tensors."
            ) from None
        raise ValueError(f"{path} is not a torch checkpoint ({_detail(err)}); {EXPECTED}") from None
    except Exception as err:  # torch raises KeyError, IndexError, EOFError, RuntimeError... for non-checkpoints
        raise ValueError(f"{path} is not a torch checkpoint ({_detail(err)}); {EXPECTED}") from None


def _would_run_code(path: str, err: pickle.UnpicklingError) -> bool:
    """Whether torch refused the file for the objects its pickle builds, not for being no pickle."""
    if "Unsupported operand" not in str(err):
        return True  # an unsupported global, a reduce, a foreign persistent id: a real object pickle
    # The weights-only unpickler stops at the first opcode it does not know, which for text,
    # random bytes and pickles of protocol 0 or 4+ alike is "Unsupported operand": scan the
    # pickle statically (pickletools runs nothing) for opcodes that would build objects.
    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as archive:
                names = [n for n in archive.namelist() if n.endswith("data.pkl")]
                data = archive.read(names[0])[:_PICKLE_SCAN_LIMIT] if names else b""
        else:
            with open(path, "rb") as fh:
                data = fh.read(_PICKLE_SCAN_LIMIT)
    except (OSError, zipfile.BadZipFile, RuntimeError):
        return False
    return _pickle_builds_objects(data)


def _pickle_builds_objects(data: bytes) -> bool:
    """Whether the complete pickles at the start of `data` (torch's legacy format chains several) use code opcodes."""
    stream = io.BytesIO(data)
    while stream.tell() < len(data):
        opcodes = set()
        try:
            for opcode, _, _ in pickletools.genops(stream):
                opcodes.add(opcode.name)
        except Exception:  # not (or no longer) a pickle: only complete pickles count, so random bytes do not
            return False
        if opcodes & _CODE_OPCODES:
            return True
    return False


def _detail(err: BaseException) -> str:
    """One line about `err`: its type and the most telling line of its message."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    # torch's weights-only message opens with generic advice; the reason follows this marker, and
    # its first sentence is enough.
    marker = "WeightsUnpickler error:"
    at = next((i for i, ln in enumerate(lines) if marker in ln), None)
    if at is not None:
        reason = [ln for ln in [lines[at].split(marker, 1)[1].strip(), *lines[at + 1 :]] if ln]
        lines = [reason[0].split(". ")[0]] if reason else []
    line = lines[0] if lines else ""
    return f"{type(err).__name__}: {line}" if line else type(err).__name__
