"""The files a training run writes in its output folder: found, refused, or cleared on request.

A folder holds a run when any of these is there; a fresh run is refused in it, so a finished or
killed run is never overwritten or mixed with a new one. Clearing deletes only these names and
leaves everything else in the folder alone.
"""

from __future__ import annotations

import re
from pathlib import Path

from .errors import RunFolderError, TrainingError, TrainingStateError

__all__ = ["LOG", "STATE", "FINAL", "LAST", "BEST", "epoch_adapter", "run_files", "check_run_folder", "clear_run"]

LOG = "log.jsonl"
STATE = "train_state.pt"
FINAL = "adapter.safetensors"
LAST = "adapter_last.safetensors"
BEST = "best.safetensors"
_TENSORBOARD = "tensorboard"

# The log, the state, the adapters (final, last, per epoch, best), and what files.atomic_path
# leaves of writing the state or an adapter when killed (.<stem>.<hex>.tmp<suffix>).
_ADAPTERS = r"(?:adapter|adapter_last|adapter_epoch\d+|best)"
_NAMES = re.compile(
    rf"log\.jsonl|train_state\.pt|{_ADAPTERS}\.safetensors"
    rf"|\.train_state\.[0-9a-f]+\.tmp\.pt|\.{_ADAPTERS}\.[0-9a-f]+\.tmp\.safetensors"
)


def epoch_adapter(epoch: int) -> str:
    """The name of the adapter kept after `epoch` (1-based) with `save_every`."""
    return f"adapter_epoch{epoch:03d}.safetensors"


def run_files(folder: Path) -> list[Path]:
    """The files of a run in `folder`, sorted; TensorBoard event files included."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    found = [p for p in folder.iterdir() if p.is_file() and _NAMES.fullmatch(p.name)]
    board = folder / _TENSORBOARD
    if board.is_dir():
        found += [p for p in board.iterdir() if p.is_file() and p.name.startswith("events.out.tfevents.")]
    return sorted(found)


def check_run_folder(folder: Path, *, resume: bool, overwrite: bool) -> list[Path]:
    """The run files `overwrite` would delete; an error when a run would mix with them.

    Raises:
        RunFolderError: `folder` holds a run and neither `resume` nor `overwrite` is set.
        TrainingStateError: `resume` where a finished run's adapter lies but its train_state.pt is gone.
        TrainingError: both `resume` and `overwrite`.

    Reads only: nothing is deleted here, so a run refused later (bad data, bad flags) loses nothing.
    """
    if resume and overwrite:
        raise TrainingError(lambda opt: f"{opt('resume', True)} and {opt('overwrite', True)} exclude each other: "
                                        "the first continues the run in the folder, the second deletes it; give one")
    files = run_files(folder)
    if files and not (resume or overwrite):
        raise RunFolderError(Path(folder), files)
    if resume and (Path(folder) / FINAL).exists() and not (Path(folder) / STATE).exists():
        # A run killed before its first checkpoint resumes from step 0; a finished one always has
        # its state (written before the final adapter), so without it a restart would overwrite
        # the finished adapter in silence.
        raise TrainingStateError(Path(folder) / STATE, f"it does not exist, though the folder holds the final "
                                                       f"adapter of a run ({FINAL})")
    return files if overwrite else []


def clear_run(folder: Path) -> list[Path]:
    """Delete the run files in `folder` (nothing else); returns what was deleted."""
    files = run_files(folder)
    for path in files:
        path.unlink(missing_ok=True)
    board = Path(folder) / _TENSORBOARD
    if board.is_dir() and not any(board.iterdir()):
        board.rmdir()
    return files
