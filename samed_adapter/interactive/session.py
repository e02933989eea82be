"""A click session over one volume: automatic labels first, then any class refined from clicks.

The encoder runs once per slice when the session starts; its embeddings and automatic logits
are kept, so a click runs only the prompt encoder and the decoder on the clicked slice
(`benchmarks/bench_clicks.py`).

A refinement of class c on a slice is the slice's automatic logits plus what the clicks change:
the decoder's channel c from the clicks and the automatic mask (SAM's mask prompt), minus the
same from the automatic mask alone. The decoder reproduces a mask only as finely as its
4g x 4g output and 16-pixel tokens allow, so its refined mask differs from the automatic one
everywhere by a little; the difference of two of its outputs cancels that and keeps what the
clicks did. Of the changes, only those 8-connected to a click of c on the slice are kept: a
click refines where it is. Measured on the quick start (benchmarks/RESULTS.md, "Clicks"): the
refined mask taken whole lowered the Dice every round; this raises it every round.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING, Optional, Sequence, Union

import numpy as np
import torch
from scipy import ndimage

from ..inference import stages as inference
from .prompts import SliceClick, click_coords, decode_clicks, mask_prompt, require_clicks

if TYPE_CHECKING:  # pragma: no cover - typing only
    import nibabel as nib

    from ..io.volume import Volume
    from ..model import SAMed

__all__ = ["ClickSession", "SessionChangedError"]


class SessionChangedError(RuntimeError):
    """The model's adapter changed after the session computed its embeddings."""


@dataclass
class _Step:
    """What one refinement changed, for undo: the slices' labels and click lists before it."""

    slices: dict[int, np.ndarray]
    clicks: dict[tuple[int, int], tuple[SliceClick, ...]]


class ClickSession:
    """Automatic labels of one image, refined class by class from clicks.

    Coordinates and labels use the grid of the input as the user holds it, as `SAMed.segment`
    returns it: a file or nibabel image's voxel grid (i, j, k), a Volume's ``array`` layout, a
    bare (D, H, W) array's own layout ((row, col) for a 2-D slice).

    ``propagate`` = n carries each refinement to up to n neighbouring slices each way: the
    refined mask becomes the next slice's mask prompt (no clicks), until the class disappears,
    stops changing, or reaches a slice with clicks of its own for that class (0: only the
    clicked slice changes).

    Attributes:
        slice_labels: (D, H, W) the current labels in the model's slice layout (read-only view).
        automatic: (D, H, W) the automatic labels in the same layout.
    """

    def __init__(self, model: "SAMed", image: Union[np.ndarray, torch.Tensor, "Volume",
                                                     "nib.spatialimages.SpatialImage", str, os.PathLike],
                 *, batch_size: int = 8, window: Optional[tuple[float, float]] = None,
                 percentiles: Optional[tuple[float, float]] = None, preprocessed: bool = False,
                 propagate: int = 0) -> None:
        require_clicks(model.config, repr(model.active_adapter) if model.active_adapter else "this adapter")
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        if isinstance(propagate, bool) or not isinstance(propagate, int) or propagate < 0:
            raise ValueError(f"propagate must be a number of slices >= 0, got {propagate!r}")
        self.model = model
        self.propagate = propagate
        self._config = model.config  # patch() makes a new one: a hot swap shows as a new object
        self._prepared, self._layout = _prepare(model, image, window, percentiles, preprocessed)
        for message in self._prepared.messages:  # what segment says about the same input
            warnings.warn(message, UserWarning, stacklevel=3)
        self._embeddings: list[tuple[torch.Tensor, list[torch.Tensor]]] = []
        self._logits: list[tuple[torch.Tensor, torch.Tensor]] = []  # per slice: low-res logits, iou
        self._reference: dict[tuple[int, int], torch.Tensor] = {}  # (slice, class) -> decoder without clicks
        self.automatic = self._encode_all(batch_size)
        self._labels = self.automatic.copy()
        self._clicks: dict[tuple[int, int], tuple[SliceClick, ...]] = {}
        self._history: list[_Step] = []

    # ------------------------------------------------------------------ views

    @property
    def num_classes(self) -> int:
        return self._config.num_classes

    @property
    def slice_labels(self) -> np.ndarray:
        view = self._labels.view()
        view.flags.writeable = False
        return view

    @property
    def labels(self) -> np.ndarray:
        """The current labels on the input's grid (a copy)."""
        return self.from_slices(self._labels)

    def label_image(self) -> "nib.Nifti1Image":
        """The current labels as the NIfTI image `segment` returns for the same file (its grid and
        header; save it with ``nib.save``). Only for a file or nibabel image input."""
        from ..io.nifti import label_nifti

        prepared = self._prepared
        if self._layout != "voxels" or prepared.volume is None or prepared.geometry is None:
            raise TypeError("label_image() needs a session over a file or nibabel image; this one holds an "
                            "array or Volume: use session.labels (and io.write_labels for a Volume)")
        labels = np.array(prepared.volume.from_voxels(prepared.geometry.from_slices(self._labels)))  # not a view
        return label_nifti(labels, prepared.volume)

    def from_slices(self, slices: np.ndarray) -> np.ndarray:
        """(D, H, W) in slice layout -> the input's grid (see the class docstring)."""
        prepared = self._prepared
        if prepared.geometry is None or prepared.volume is None:
            return slices[0].copy() if self._layout == "slice2d" else slices.copy()
        stored = prepared.geometry.from_slices(slices)
        # A copy always: the geometry's views share the session's labels, which the next click changes.
        return np.array(stored if self._layout == "voxels" else prepared.volume.from_voxels(stored), order="C")

    def to_slices(self, data: np.ndarray) -> np.ndarray:
        """An array on the input's grid (ground truth, say) -> (D, H, W) slice layout."""
        prepared = self._prepared
        data = np.asarray(data)
        if prepared.geometry is None or prepared.volume is None:
            return data[None] if self._layout == "slice2d" else data
        stored = data if self._layout == "voxels" else prepared.volume.to_voxels(data)
        return np.ascontiguousarray(prepared.geometry.to_slices(stored))

    def locate(self, point: Sequence[int]) -> tuple[int, int, int]:
        """A voxel index on the input's grid -> (d, row, col) in slice layout.

        Raises:
            IndexError: the point is not a voxel of the input.
        """
        point = tuple(int(v) for v in point)
        prepared = self._prepared
        shape = self._labels.shape
        if prepared.geometry is None or prepared.volume is None:
            d, row, col = (0, *point) if self._layout == "slice2d" else point if len(point) == 3 else (-1, -1, -1)
            if len(point) != (2 if self._layout == "slice2d" else 3) or not all(
                    0 <= v < n for v, n in zip((d, row, col), shape)):
                raise IndexError(f"point {point} is outside the image of shape {self.labels.shape}")
            return d, row, col
        if self._layout == "voxels":
            return prepared.geometry.point_to_slices(point)
        if len(point) != prepared.volume.array.ndim:
            raise IndexError(f"point {point} needs {prepared.volume.array.ndim} indices into the image "
                             f"of shape {prepared.volume.array.shape}")
        return prepared.geometry.point_to_slices(tuple(reversed(point)) if len(point) == 3 else (point[1], point[0], 0))

    def embedding(self, d: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Slice d's kept image embedding (1, D, g, g) and extra features (SAM 2), on the model's device."""
        return self._embeddings[d]

    @property
    def nbytes(self) -> int:
        """Bytes the session holds: kept embeddings and logits, and the two label volumes."""
        tensors = [t for e, extra in self._embeddings for t in (e, *extra)]
        tensors += [t for pair in self._logits for t in pair] + list(self._reference.values())
        kept = sum(t.nelement() * t.element_size() for t in tensors)
        return kept + self._labels.nbytes + self.automatic.nbytes

    # ------------------------------------------------------------------ clicks

    def class_id(self, label: Union[int, str]) -> int:
        """A class name (the adapter's class_names) or id 1..K -> the id."""
        names = self._config.class_names or []
        if isinstance(label, str):
            if label not in names:
                raise KeyError(f"no class {label!r}: this adapter's classes are {names}")
            return names.index(label) + 1
        if (isinstance(label, bool) or not isinstance(label, (int, np.integer))
                or not 1 <= int(label) <= self.num_classes):
            raise KeyError(f"class {label!r} is not one of 1..{self.num_classes} ({names})")
        return int(label)

    def click(self, label: Union[int, str], point: Sequence[int], positive: bool = True) -> np.ndarray:
        """Refine class `label` on the slice holding voxel `point` from every click on that slice and
        class so far plus this one; returns the new labels on the input's grid."""
        d, row, col = self.locate(point)
        self.refine([SliceClick(self.class_id(label), d, row, col, bool(positive))])
        return self.labels

    @torch.inference_mode()
    def refine(self, clicks: Sequence[SliceClick], batch_size: int = 16) -> None:
        """Add `clicks` (slice layout) and refine each (slice, class) they touch, in one decoder
        batch per `batch_size` pairs; applied in order, one undo step for all of them."""
        self._check_model()
        for click in clicks:
            self._check_click(click)
        step = _Step({}, {})
        for click in clicks:
            key = (click.slice, click.label)
            step.clicks.setdefault(key, self._clicks.get(key, ()))
            self._clicks[key] = self._clicks.get(key, ()) + (click,)
        pairs = list(dict.fromkeys((c.slice, c.label) for c in clicks))
        for start in range(0, len(pairs), batch_size):
            chunk = pairs[start : start + batch_size]
            masks = self._decode(chunk)
            for (d, label), mask in zip(chunk, masks):
                step.slices.setdefault(d, self._labels[d].copy())
                self._apply(d, label, mask)
        if self.propagate:
            for d, label in pairs:
                self._propagate(d, label, step)
        self._history.append(step)

    def _propagate(self, d: int, label: int, step: _Step) -> None:
        """Carry slice d's refined mask of `label` to its neighbours, one slice at a time each way,
        as their mask prompt (no clicks), for at most `propagate` slices, stopping where the class
        disappears, stops changing, or a slice has clicks of its own for it."""
        for direction in (-1, 1):
            previous, n = self._labels[d] == label, d + direction
            for _ in range(self.propagate):
                if not (0 <= n < self._labels.shape[0]) or not previous.any() or (n, label) in self._clicks:
                    break
                mask = self._decode([(n, label)], prompts=[previous])[0]
                if np.array_equal(mask, self._labels[n] == label):
                    break
                step.slices.setdefault(n, self._labels[n].copy())
                self._apply(n, label, mask)
                previous, n = mask, n + direction

    def undo(self) -> np.ndarray:
        """Take back the last click (or `refine` call, or `reset`); returns the labels."""
        if not self._history:
            raise IndexError("nothing to undo: no click since the session started")
        step = self._history.pop()
        for d, before in step.slices.items():
            self._labels[d] = before
        for key, clicks in step.clicks.items():
            if clicks:
                self._clicks[key] = clicks
            else:
                self._clicks.pop(key, None)
        return self.labels

    def reset(self, label: Union[int, str, None] = None) -> np.ndarray:
        """Forget the clicks of one class (every class when None) and give its voxels back as the
        automatic labels had them; undoable. Returns the labels."""
        labels = list(range(1, self.num_classes + 1)) if label is None else [self.class_id(label)]
        step = _Step({}, {})
        for (d, c), clicks in list(self._clicks.items()):
            if c in labels:
                step.clicks[(d, c)] = clicks
                del self._clicks[(d, c)]
        for d in range(self._labels.shape[0]):
            now, auto = self._labels[d], self.automatic[d]
            new = now.copy()
            for c in labels:
                new[now == c] = np.where(auto[now == c] == c, c, auto[now == c])
                new[(auto == c) & (now == 0)] = c
            if label is None:
                new = auto.copy()
            if not np.array_equal(new, now):
                step.slices[d] = now.copy()
                self._labels[d] = new
        self._history.append(step)
        return self.labels

    def clicks(self, label: Union[int, str, None] = None) -> list[SliceClick]:
        """The clicks in force (of one class, or all), oldest first per slice."""
        wanted = None if label is None else self.class_id(label)
        return [c for (d, lab), row in sorted(self._clicks.items()) if wanted in (None, lab) for c in row]

    # ------------------------------------------------------------------ the model

    def resume(self) -> None:
        """Go on after the model was swapped away and back to the adapter this session was made
        with (a service's replica does, between requests). The caller vouches that it is the very
        same version; a config that differs in any value is refused.

        Raises:
            SessionChangedError: the model's adapter config is not this session's.
        """
        if self.model.config != self._config:
            raise SessionChangedError("the model's adapter is not the one this session was made with; start a "
                                      "new session with model.interactive(image)")
        self._config = self.model.config

    def _check_model(self) -> None:
        if self.model.config is not self._config:
            raise SessionChangedError(
                "the model's adapter changed (a patch or hot swap) after this session computed its embeddings; "
                "start a new session with model.interactive(image)")

    def _check_click(self, click: SliceClick) -> None:
        depth, height, width = self._labels.shape
        if not (0 <= click.slice < depth and 0 <= click.row < height and 0 <= click.col < width):
            raise IndexError(f"click {click} is outside the slices of shape {self._labels.shape}")
        self.class_id(click.label)

    def _encode_all(self, batch_size: int) -> np.ndarray:
        """Run the encoder over every slice once, keep the embeddings, return the automatic labels."""
        model, prepared = self.model, self._prepared
        param = next(model.sam.image_encoder.parameters())
        labels = []
        with inference.eval_mode(model):
            with torch.inference_mode():
                for start in range(0, prepared.num_slices, batch_size):
                    x = prepared.inputs[start : start + batch_size].to(param.device, param.dtype).expand(-1, 3, -1, -1)
                    embeddings, extra = model.encode(x)
                    low_res, iou = model.decode(embeddings, extra)
                    labels.append(self._labels_of(low_res, iou))
                    for b in range(embeddings.shape[0]):
                        self._embeddings.append((embeddings[b : b + 1], [e[b : b + 1] for e in extra]))
                        self._logits.append((low_res[b : b + 1], iou[b : b + 1]))
        return np.concatenate(labels)

    def _labels_of(self, low_res: torch.Tensor, iou: torch.Tensor) -> np.ndarray:
        """(B, K+1, 4g, 4g) low-res logits and iou -> (B, H, W) labels, as `segment` makes them."""
        logits = self.model.outputs(low_res, iou)["masks"]
        inference.check_finite_logits(self.model, logits)
        return inference.resize_slices(inference.to_labels(logits)[0], None, self._prepared.size)[0]

    def _decode(self, pairs: list[tuple[int, int]], prompts: Optional[list[np.ndarray]] = None) -> list[np.ndarray]:
        """(slice, class) pairs -> each class's refined (H, W) bool mask on its slice (see the module
        docstring): from its clicks and automatic mask, keeping the changes connected to its clicks;
        or, for propagation, from no clicks and the given masks as mask prompts, whole."""
        model = self.model
        size = self._prepared.size
        clicks = [() for _ in pairs] if prompts is not None else [self._clicks[p] for p in pairs]
        coords, labels = click_coords(clicks, size, self._config.image_size)
        if prompts is None:
            prompts = [self.automatic[d] == c for d, c in pairs]
        classes = torch.tensor([c for _, c in pairs])
        with inference.eval_mode(model):
            refined = self._decode_class(pairs, coords, labels, np.stack(prompts))
            reference = self._references(pairs)
        low_res = torch.cat([self._logits[d][0] for d, _ in pairs]).clone()
        rows = torch.arange(len(pairs), device=low_res.device)
        low_res[rows, classes.to(low_res.device)] += (refined - reference).to(low_res.dtype)
        new = self._labels_of(low_res, torch.cat([self._logits[d][1] for d, _ in pairs]))
        masks = []
        for (d, c), labels_d, own in zip(pairs, new, clicks):
            mask, current = labels_d == c, self._labels[d] == c
            if own:  # a click refines where it is: its 8-connected changes only
                regions, _ = ndimage.label(mask != current, structure=np.ones((3, 3), bool))
                hit = [regions[k.row, k.col] for k in own if regions[k.row, k.col]]
                mask = np.where(np.isin(regions, hit), mask, current)
            masks.append(mask)
        return masks

    def _decode_class(self, pairs: list[tuple[int, int]], coords: torch.Tensor, labels: torch.Tensor,
                      prompts: np.ndarray) -> torch.Tensor:
        """The decoder's (B, 4g, 4g) logits of each pair's class from its clicks and (B, H, W) mask prompts."""
        embeddings = torch.cat([self._embeddings[d][0] for d, _ in pairs])
        extra = [torch.cat(parts) for parts in zip(*(self._embeddings[d][1] for d, _ in pairs))]
        classes = torch.tensor([c for _, c in pairs])
        return decode_clicks(self.model, embeddings, extra, coords, labels, classes,
                             mask_prompt(torch.from_numpy(prompts), self._config.grid_size))

    def _references(self, pairs: list[tuple[int, int]]) -> torch.Tensor:
        """(B, 4g, 4g): each pair's class decoded from its automatic mask without clicks, computed
        once per (slice, class) and kept."""
        missing = list(dict.fromkeys(p for p in pairs if p not in self._reference))
        if missing:
            coords, labels = click_coords([() for _ in missing], self._prepared.size, self._config.image_size)
            prompts = np.stack([self.automatic[d] == c for d, c in missing])
            for pair, logits in zip(missing, self._decode_class(missing, coords, labels, prompts)):
                self._reference[pair] = logits
        return torch.stack([self._reference[p] for p in pairs])

    def _apply(self, d: int, label: int, mask: np.ndarray) -> None:
        """Class `label` takes `mask` on slice d; voxels it leaves go back to the automatic label
        (background where that was `label`). The clicked pixels themselves obey their clicks,
        the other classes' clicks on the slice too (a refinement neither takes another class's
        positive click nor gives a pixel back to a class clicked negative there), except where
        `label` has its own click at the same pixel: the class being refined wins there."""
        now, auto = self._labels[d], self.automatic[d]
        own = self._clicks.get((d, label), ())
        for click in own:
            mask[click.row, click.col] = click.positive
        taken = {(c.row, c.col) for c in own}
        others = [c for other in range(1, self.num_classes + 1) if other != label
                  for c in self._clicks.get((d, other), ()) if (c.row, c.col) not in taken]
        for click in others:
            if click.positive:
                mask[click.row, click.col] = False
        leaving = (now == label) & ~mask
        now[leaving] = np.where(auto[leaving] == label, 0, auto[leaving])
        now[mask] = label
        for click in others:
            if not click.positive and now[click.row, click.col] == click.label:
                now[click.row, click.col] = 0


def _prepare(model: "SAMed", image, window, percentiles, preprocessed: bool) -> tuple[inference.Prepared, str]:
    """The input as the model's slices, and its layout: "voxels" (a file or nibabel image: (i, j, k)),
    "array" (a Volume's array), "slices" (a bare (D, H, W)) or "slice2d" (a bare (H, W))."""
    import nibabel as nib

    from ..io.nifti import volume_from_nifti
    from ..io.volume import Volume
    from ..io.volumes import read_image

    scaling = dict(window=window, percentiles=percentiles, preprocessed=preprocessed)
    if isinstance(image, (str, os.PathLike, nib.spatialimages.SpatialImage)):
        volume = read_image(image) if isinstance(image, (str, os.PathLike)) else volume_from_nifti(image)
        return inference.prepare_volume(model.config, volume, **scaling), "voxels"
    if isinstance(image, Volume):
        return inference.prepare_volume(model.config, image, **scaling), "array"
    array = inference.check_image(image)
    layout = "slice2d" if array.ndim == 2 else "slices"
    array = array[None] if array.ndim == 2 else array
    scaled, messages = inference.scale_slices(model.config, array, **scaling)
    prepared = inference.Prepared(inference.to_model_size(scaled, model.config.image_size), scaled.shape[1:],
                                  messages=messages)
    return prepared, layout
