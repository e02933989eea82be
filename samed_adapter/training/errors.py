"""Errors that stop training, each worded for the interface in use (Python keywords or CLI flags).

A message names options through a `Spelling`: ``str(err)`` spells them as `train` / `TrainConfig`
keywords (``resume=True``, ``base_lr``), ``err.for_cli()`` as the flags of ``samed-adapter train``
(``--resume``, ``--base-lr``), so neither reader is told about the other's interface.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Optional, Sequence

__all__ = ["NonFiniteLossError", "RunFolderError", "TrainingError", "TrainingInterrupted", "TrainingStateError",
           "Spelling", "cli_spelling", "python_spelling"]

# (option name as in TrainConfig / train(), the value to show or None) -> how the user writes it;
# True is a switch that is turned on (resume=True / --resume).
Spelling = Callable[..., str]


def python_spelling(name: str, value: object = None) -> str:
    """``resume, True`` -> ``resume=True``; ``base_lr`` -> ``base_lr``; ``precision, "fp32"`` -> ``precision='fp32'``."""
    return name if value is None else f"{name}={value!r}"


def cli_spelling(name: str, value: object = None) -> str:
    """``resume, True`` -> ``--resume``; ``base_lr`` -> ``--base-lr``; ``precision, "fp32"`` -> ``--precision fp32``."""
    flag = "--" + name.replace("_", "-")
    return flag if value is None or value is True else f"{flag} {value}"


def _paths(paths: Sequence[Path]) -> str:
    return ", ".join(str(p) for p in paths)


class TrainingError(ValueError):
    """A training run refused or stopped; the message (one line) says what to do, in Python or CLI terms.

    A ValueError, so callers that catch bad input (the command line among them) catch it too.
    """

    def __init__(self, compose: Callable[[Spelling], str]) -> None:
        self._compose = compose
        super().__init__(compose(python_spelling))

    def for_cli(self) -> str:
        """The message with options spelled as command-line flags."""
        return self._compose(cli_spelling)


class RunFolderError(TrainingError):
    """The output folder already holds a run and neither resuming nor overwriting was asked for.

    Attributes:
        folder: the output folder.
        files: the run files found there (what overwriting would delete), sorted.
    """

    def __init__(self, folder: Path, files: Sequence[Path]) -> None:
        self.folder, self.files = folder, list(files)
        shown = ", ".join(p.name for p in self.files[:4]) + (f" and {len(self.files) - 4} more"
                                                               if len(self.files) > 4 else "")
        super().__init__(lambda opt: (
            f"{folder} already holds a training run ({shown}); nothing was changed: pass {opt('resume', True)} to "
            f"continue it, {opt('overwrite', True)} to delete its files and start over, or choose another output "
            "folder"))


class TrainingStateError(TrainingError):
    """train_state.pt cannot be resumed from (damaged, foreign, or saved for another adapter)."""

    def __init__(self, path: Path, problem: str) -> None:
        self.path, self.problem = path, problem
        super().__init__(lambda opt: (
            f"cannot resume from {path}: {problem}; nothing was changed: start over with {opt('overwrite', True)} "
            "(deletes the run's files), or put a good copy of the file there"))


class NonFiniteLossError(TrainingError, RuntimeError):
    """The loss became NaN or infinite; the run stopped.

    Attributes:
        value: the loss.
        step: the 1-based step whose loss it was (its update was not applied).
        kept: (steps done, files) of the checkpoint left in the output folder, or None when the
            run stopped before its first checkpoint (nothing to resume from).
    """

    def __init__(self, value: float, step: int, epoch: int, kept: Optional[tuple[int, Sequence[Path]]],
                 base_lr: float, precision: str) -> None:
        self.value, self.step, self.epoch, self.kept = value, step, epoch, kept

        def compose(opt: Spelling) -> str:
            if kept is None:
                saved = "no checkpoint was written before it, so there is nothing to resume from"
            else:
                saved = f"the checkpoint after step {kept[0]} is kept ({_paths(kept[1])})"
            lower = f"a lower {opt('base_lr')} (now {base_lr:g}) or a longer {opt('warmup_iters')}"
            if precision != "fp32":
                lower += f", {opt('precision', 'fp32')}"
            return (f"the loss became {value} at step {step} (epoch {epoch}); the run stopped and {saved}; try "
                    f"{lower}, and check the images and labels for NaN or extreme values")

        super().__init__(compose)


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C stopped the run; what could be saved was (atomically).

    A KeyboardInterrupt, so code that stops on Ctrl-C still stops.

    Attributes:
        step: steps done when it stopped (the checkpoint's position when `saved` is not empty).
        total: the steps the run was to make.
        saved: the checkpoint files at `step` (written on the interrupt, or already there); empty
            when a fresh run stopped before its first step (nothing to resume from).
    """

    def __init__(self, step: int, total: int, saved: Sequence[Path]) -> None:
        self.step, self.total, self.saved = step, total, list(saved)
        super().__init__(self.describe(python_spelling))

    def describe(self, opt: Spelling) -> str:
        """One line: where it stopped, what was saved, how to continue (in `opt`'s spelling)."""
        if not self.saved:
            return f"interrupted before the first step of {self.total}; nothing was saved"
        return (f"interrupted after step {self.step} of {self.total}; saved {_paths(self.saved)}; "
                f"{opt('resume', True)} continues the run")
