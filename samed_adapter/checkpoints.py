"""Reading `torch.save`d checkpoint files without running code from them."""

from __future__ import annotations

import os
import pickle
from typing import Union

import torch


class UnsafeCheckpointError(ValueError):
    """A checkpoint file holds pickled objects other than tensors and plain containers."""


def load_state_dict_file(path: Union[str, os.PathLike]) -> dict[str, torch.Tensor]:
    """Load a flat `{name: tensor}` dict saved with `torch.save`, on the CPU.

    The pickle is read with `weights_only=True`, so a file that would construct arbitrary
    objects (and so could run code) is refused, not executed.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no checkpoint file at {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise UnsafeCheckpointError(
            f"{path} was refused: it holds pickled objects other than tensors, which could run code "
            f"when loaded ({str(err).splitlines()[0]}). Only load checkpoints you trust; re-save "
            "trusted ones as a plain dict of tensors."
        ) from None
    except (RuntimeError, EOFError, OSError, ValueError) as err:
        raise ValueError(f"{path} is not a readable torch checkpoint: {str(err).splitlines()[0]}") from None
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()
    ):
        raise ValueError(f"{path} does not hold a flat dict of named tensors")
    return state
