"""The folder datastore (issue 32): MONAI Label's on-disk format, its checks, and its strategies.

Real files: slabs of nilearn's MNI152 T1 template with its grey/white matter labels (the quick
start's data, `samed_adapter.cli.demo.mni_volumes`). MONAI Label's own `LocalDatastore` and
strategies read and write the same folders (see `monailabel_local` for what it needs).
"""

from __future__ import annotations

import importlib
import json
import os
import random
import sys
import threading
import time
import types
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from samed_adapter.adapter_file.config import AdapterConfig
from samed_adapter.datastore import (DatastoreBusyError, DatastoreChangedError, DatastoreFormatError,
                                     EmptyDatastoreError, FolderDatastore, ImageExistsError, ImageNotFoundError,
                                     LabelClassError, LabelGridError, LabelNotFoundError, UnsafeIdError,
                                     UnsupportedFileError, changed_since, check_unchanged, first, least_sure,
                                     random_image, record, uncertainty)
from samed_adapter.datastore.folder import folder_lock
from samed_adapter.io.errors import ImageReadError

SLABS = {"case_a": (30, 36), "case_b": (36, 42), "case_c": (42, 48), "case_d": (48, 54)}


@pytest.fixture(scope="module")
def mni():
    """(T1 (X, Y, Z) uint8, labels (X, Y, Z) uint8 in 0..2, affine) of MNI152 at 2 mm."""
    from samed_adapter.cli.demo import mni_volumes

    return mni_volumes()


def slab(array: np.ndarray, affine: np.ndarray, z: tuple[int, int]) -> nib.Nifti1Image:
    """Axial slices z[0]:z[1] at their world positions."""
    moved = affine.copy()
    moved[:3, 3] = affine[:3, :3] @ np.array([0, 0, z[0]]) + affine[:3, 3]
    return nib.Nifti1Image(np.ascontiguousarray(array[:, :, z[0]:z[1]]), moved)


@pytest.fixture(scope="module")
def sources(mni, tmp_path_factory) -> Path:
    """<id>.nii.gz images and <id>_label.nii.gz labels of four slabs, outside any datastore."""
    image, labels, affine = mni
    root = tmp_path_factory.mktemp("sources")
    for case, z in SLABS.items():
        nib.save(slab(image, affine, z), root / f"{case}.nii.gz")
        nib.save(slab(labels, affine, z), root / f"{case}_label.nii.gz")
    return root


def folder_state(root: Path) -> dict[str, bytes]:
    """Every file under root (hidden ones too) and its bytes."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def filled(root: Path, sources: Path, finals=("case_a", "case_b")) -> FolderDatastore:
    """A datastore of all four slabs, `finals` with a final label, case_a with the model's too."""
    ds = FolderDatastore(root)
    for case in SLABS:
        ds.add_image(case, sources / f"{case}.nii.gz", {"client_id": "test"})
    ds.save_label("case_a", sources / "case_a_label.nii.gz", "original", {"model": "samed"})
    for case in finals:
        ds.save_label(case, sources / f"{case}_label.nii.gz", "final", {"user": "radiologist"})
    return ds


# ---- MONAI Label's own datastore, installed without its requirements ----

# Module-level imports of monailabel/datastore/local.py and utils/others/generic.py that its local
# datastore never calls without auto_reload (the file watcher; model zoo downloads; server settings).
_ABSENT_OK = {
    "watchdog": {}, "watchdog.events": {"PatternMatchingEventHandler": None},
    "watchdog.observers": {"Observer": None}, "watchdog.observers.polling": {"PollingObserver": None},
    "monai": {}, "monai.apps": {"download_url": None},
    "monai.bundle": {"download": None, "get_bundle_versions": None},
    "monai.bundle.scripts": {"get_all_bundles_list": None},
}


@pytest.fixture(scope="module")
def monailabel_local():
    """MONAI Label 0.8.5's `LocalDatastore`, `First` and `Random`, as `(LocalDatastore, First, Random)`.

    CI installs monailabel with --no-deps (README), so watchdog, monai and pydantic_settings may be
    absent: those that are get a stand-in module whose names are never called here (auto_reload off),
    and pydantic_settings' BaseSettings becomes pydantic's BaseModel (MONAI Label's settings are
    built with their defaults). filelock and pydantic, which its datastore does use, must be real.
    """
    pytest.importorskip("monailabel")
    pytest.importorskip("filelock")
    pydantic = pytest.importorskip("pydantic")
    before = set(sys.modules)
    placed = []
    wanted = {**_ABSENT_OK, "pydantic_settings": {"BaseSettings": pydantic.BaseModel,
                                                  "SettingsConfigDict": pydantic.ConfigDict}}
    for name, attrs in wanted.items():
        try:
            importlib.import_module(name)
        except ImportError:
            module = types.ModuleType(name)
            module.__dict__.update(attrs)
            sys.modules[name] = module
            placed.append(name)
    try:
        from monailabel.datastore.local import LocalDatastore
        from monailabel.tasks.activelearning.first import First
        from monailabel.tasks.activelearning.random import Random
    finally:
        for name in set(sys.modules) - before:  # the stand-ins, and MONAI Label modules built on them
            if name in placed or name.startswith("monailabel."):
                sys.modules.pop(name, None)
    yield LocalDatastore, First, Random


# ---- adding, listing, saving ----


def test_add_list_and_save_labels(tmp_path, sources):
    ds = filled(tmp_path / "ds", sources)
    assert ds.list_images() == list(SLABS)
    assert ds.get_labeled_images() == ["case_a", "case_b"]
    assert ds.get_unlabeled_images() == ["case_c", "case_d"]
    assert ds.get_unlabeled_images("original") == ["case_b", "case_c", "case_d"]
    assert ds.status() == {"total": 4, "completed": 2, "label_tags": {"original": 1, "final": 2}}
    assert ds.get_labels_by_image_id("case_a") == {"original": "case_a", "final": "case_a"}
    # MONAI Label's layout: images in the root, labels/<tag>/<id>.nii.gz, copies of the inputs
    root = (tmp_path / "ds").resolve()
    assert ds.get_image_uri("case_c") == str(root / "case_c.nii.gz")
    assert ds.get_label_uri("case_a", "original") == str(root / "labels" / "original" / "case_a.nii.gz")
    assert Path(ds.get_label_uri("case_b", "final")).read_bytes() == (sources / "case_b_label.nii.gz").read_bytes()
    assert ds.get_image_uri("nope") == "" and ds.get_label_uri("case_c", "final") == "" and ds.get_image_info("x") == {}
    info = ds.get_label_info("case_a", "final")
    assert info["user"] == "radiologist" and info["name"] == "case_a.nii.gz" and isinstance(info["ts"], int)
    assert info["checksum"] == "SHA256:" + __import__("hashlib").sha256(
        (sources / "case_a_label.nii.gz").read_bytes()).hexdigest()
    assert ds.get_image_info("case_d")["path"] == str(root / "case_d.nii.gz")
    ds.update_label_info("case_a", "final", {"reviewed": True})
    assert ds.get_label_info("case_a", "final") == {**info, "reviewed": True}
    with pytest.raises(LabelNotFoundError, match=r"'case_c' has no 'final' label; its labels: \[\]"):
        ds.update_label_info("case_c", "final", {})
    assert ds.datalist() == [{"image": str(root / f"{c}.nii.gz"), "label": str(root / "labels/final" / f"{c}.nii.gz")}
                             for c in ("case_a", "case_b")]
    assert [i.image_id for i in ds.training_items()] == ["case_a", "case_b"]
    # a second object on the folder (another process) sees the same
    assert FolderDatastore(root).json() == ds.json()


def test_a_final_label_saved_again_replaces_the_previous_one(tmp_path, sources, mni):
    ds = filled(tmp_path / "ds", sources)
    _, labels, affine = mni
    corrected = slab(labels, affine, SLABS["case_a"])
    data = np.asarray(corrected.dataobj).copy()
    data[data == 2] = 1  # a person merged the classes
    nib.save(nib.Nifti1Image(data, corrected.affine), tmp_path / "corrected.nii")
    first_sum = ds.get_label_info("case_a", "final")["checksum"]
    ds.save_label("case_a", tmp_path / "corrected.nii", "final", {"user": "second reader"})
    final = Path(ds.get_label_uri("case_a", "final"))
    assert final.name == "case_a.nii" and final.read_bytes() == (tmp_path / "corrected.nii").read_bytes()
    assert not (final.parent / "case_a.nii.gz").exists()  # the previous version, under the other extension
    info = ds.get_label_info("case_a", "final")
    assert info["user"] == "second reader" and info["checksum"] != first_sum and info["name"] == "case_a.nii"
    assert ds.status()["label_tags"] == {"original": 1, "final": 2}
    assert np.array_equal(np.asarray(nib.load(final).dataobj), data)


def test_images_dropped_in_the_folder_are_listed(tmp_path, sources):
    """MONAI Label's reconcile: files put there by hand appear; entries whose files went, go."""
    root = tmp_path / "ds"
    ds = filled(root, sources, finals=("case_a",))
    (root / "labels" / "final" / "case_b.nii.gz").write_bytes((sources / "case_b_label.nii.gz").read_bytes())
    (root / "extra.nii.gz").write_bytes((sources / "case_c.nii.gz").read_bytes())
    os.unlink(root / "case_d.nii.gz")
    (root / "notes.txt").write_text("not an image")
    reopened = FolderDatastore(root)
    assert reopened.list_images() == ["case_a", "case_b", "case_c", "extra"]
    assert reopened.get_labeled_images() == ["case_a", "case_b"]
    assert reopened.get_image_info("extra")["name"] == "extra.nii.gz"
    assert ds.list_images() == reopened.list_images()  # the first object re-reads the changed JSON


def test_entries_of_other_kinds_are_kept_as_they_are(tmp_path, sources):
    """A MONAI Label app set up for other files (an .nrrd label) or a hand-edited id that is a path:
    not listed, never used to build a path, and written back unchanged when we write the JSON."""
    root = tmp_path / "ds"
    filled(root, sources, finals=())
    stored = json.loads((root / "datastore_v2.json").read_text())
    nrrd = {"ext": ".seg.nrrd", "info": {"ts": 1, "name": "case_b.seg.nrrd"}}
    evil = {"image": {"ext": ".nii.gz", "info": {}}, "labels": {"final": {"ext": ".nii.gz", "info": {}}}}
    stored["objects"]["case_b"]["labels"]["ohif"] = nrrd
    stored["objects"]["../evil"] = evil
    (root / "datastore_v2.json").write_text(json.dumps(stored, indent=2))
    ds = FolderDatastore(root)
    assert ds.list_images() == list(SLABS) and ds.get_labels_by_image_id("case_b") == {}
    assert ds.get_image_uri("../evil") == "" and ds.get_label_uri("case_b", "ohif") == ""
    ds.save_label("case_b", sources / "case_b_label.nii.gz", "final")
    again = json.loads((root / "datastore_v2.json").read_text())
    assert again["objects"]["case_b"]["labels"]["ohif"] == nrrd and again["objects"]["../evil"] == evil
    assert ds.status()["label_tags"] == {"original": 1, "final": 1}


def test_two_dimensional_images_and_labels(tmp_path, mni):
    """A 2-D NIfTI (one slice): its grid is checked on its two axes."""
    image, labels, affine = mni
    nib.save(nib.Nifti1Image(image[:, :, 40], affine), tmp_path / "flat.nii.gz")
    nib.save(nib.Nifti1Image(labels[:, :, 40], affine), tmp_path / "flat_label.nii.gz")
    moved = affine.copy()
    moved[1, 3] += 2.0
    nib.save(nib.Nifti1Image(labels[:, :, 40], moved), tmp_path / "moved.nii.gz")
    ds = FolderDatastore(tmp_path / "ds")
    ds.add_image(None, tmp_path / "flat.nii.gz")
    refused(tmp_path / "ds", LabelGridError, r"up to 2 mm away",
            lambda: ds.save_label("flat", tmp_path / "moved.nii.gz", "final"))
    ds.save_label("flat", tmp_path / "flat_label.nii.gz", "final", config=AdapterConfig(num_classes=2))
    assert ds.get_labeled_images() == ["flat"]


# ---- bad input: refused with one line, nothing on disk changed ----


def refused(root: Path, error: type, match: str, call) -> str:
    """Run call; it must raise `error` matching `match` and leave every file under root as it was."""
    before = folder_state(root)
    with pytest.raises(error, match=match) as caught:
        call()
    assert folder_state(root) == before
    message = str(caught.value)
    assert "\n" not in message
    return message


def test_a_label_off_its_images_grid_is_refused(tmp_path, sources, mni):
    _, labels, affine = mni
    root = tmp_path / "ds"
    ds = filled(root, sources)
    shorter = slab(labels, affine, (30, 35))  # one slice fewer
    nib.save(shorter, tmp_path / "short.nii.gz")
    refused(root, LabelGridError, r"grid \(99, 117, 5\) .* not its image's \(99, 117, 6\); resample",
            lambda: ds.save_label("case_c", tmp_path / "short.nii.gz", "final"))
    right = slab(labels, affine, SLABS["case_c"])
    for name, change in (("shifted", (0, 3, 1.0)), ("flipped", (0, 0, -1.0))):
        moved = right.affine.copy()
        if name == "shifted":
            moved[0, 3] += 1.0  # 1 mm, half a voxel
        else:
            moved[0, 0] *= -1
        nib.save(nib.Nifti1Image(np.asarray(right.dataobj), moved), tmp_path / f"{name}.nii.gz")
        message = refused(root, LabelGridError, r"its affine places the grid up to .* mm away",
                          lambda: ds.save_label("case_c", tmp_path / f"{name}.nii.gz", "final"))
        assert "tolerance 0.002 mm" in message
    # within the tolerance: an affine rounded as float32 headers and viewers round it
    nudged = right.affine.copy()
    nudged[:3, 3] += 1e-4
    nib.save(nib.Nifti1Image(np.asarray(right.dataobj), nudged), tmp_path / "nudged.nii.gz")
    ds.save_label("case_c", tmp_path / "nudged.nii.gz", "final")
    assert ds.get_labeled_images() == ["case_a", "case_b", "case_c"]


def test_a_label_with_classes_the_adapter_lacks_is_refused(tmp_path, sources, mni):
    root = tmp_path / "ds"
    ds = filled(root, sources)
    one_class = AdapterConfig(num_classes=1, class_names=["brain"])
    message = refused(root, LabelClassError, r"class ids 2 beyond the adapter's; the adapter's classes are 0 "
                      r"\(background\) to 1 \(brain\)",
                      lambda: ds.save_label("case_c", sources / "case_c_label.nii.gz", "final", config=one_class))
    assert "case_c_label.nii.gz" in message
    _, labels, affine = mni
    halves = slab(labels, affine, SLABS["case_c"]).get_fdata() / 2  # 0.5 where grey matter was
    nib.save(nib.Nifti1Image(halves, slab(labels, affine, SLABS["case_c"]).affine), tmp_path / "halves.nii.gz")
    refused(root, LabelClassError, r"values that are not class ids \(0.5\)",
            lambda: ds.save_label("case_c", tmp_path / "halves.nii.gz", "final", config=AdapterConfig(num_classes=2)))
    ds.save_label("case_c", sources / "case_c_label.nii.gz", "final", config=AdapterConfig(num_classes=2))
    assert "case_c" in ds.get_labeled_images()


def test_an_empty_datastore_gives_no_training_items(tmp_path, sources):
    root = tmp_path / "ds"
    empty = FolderDatastore(root)
    refused(root, EmptyDatastoreError, r"none of its 0 images has a final label; correct some", empty.training_items)
    ds = filled(root, sources, finals=())  # images and a model's label, no person's yet
    refused(root, EmptyDatastoreError, r"none of its 4 images has a final label", ds.training_items)
    assert ds.datalist() == []


def test_adding_an_existing_id_never_overwrites(tmp_path, sources):
    root = tmp_path / "ds"
    ds = filled(root, sources)
    message = refused(root, ImageExistsError, r"image 'case_a' exists and adding never replaces it",
                      lambda: ds.add_image("case_a", sources / "case_b.nii.gz", {}))
    assert "remove_image('case_a') first" in message
    # the same id under the other extension is the same image to MONAI Label
    nii = tmp_path / "case_b.nii"
    nib.save(nib.load(sources / "case_b.nii.gz"), nii)
    refused(root, ImageExistsError, r"'case_b' exists", lambda: ds.add_image(None, nii, {}))
    # replacing, as the message says
    ds.remove_image("case_a")
    assert ds.add_image("case_a", sources / "case_b.nii.gz") == "case_a"
    assert ds.get_labels_by_image_id("case_a") == {}
    assert Path(ds.get_image_uri("case_a")).read_bytes() == (sources / "case_b.nii.gz").read_bytes()


@pytest.mark.parametrize("bad", ["../x", "/tmp/x", "a/b", "..", ".hidden", "a\x00b", "a\nb", " a", "x" * 260])
def test_unsafe_ids_and_tags_are_refused(tmp_path, sources, bad):
    root = tmp_path / "ds"
    ds = filled(root, sources, finals=())
    refused(root, UnsafeIdError, r"image id .*; use a plain file name",
            lambda: ds.add_image(bad, sources / "case_a.nii.gz"))
    refused(root, UnsafeIdError, r"image id", lambda: ds.save_label(bad, sources / "case_a_label.nii.gz", "final"))
    refused(root, UnsafeIdError, r"label tag", lambda: ds.save_label("case_a", sources / "case_a_label.nii.gz", bad))
    assert ds.get_image_uri(bad) == ""
    assert not any(p.name == "x.nii.gz" for p in tmp_path.rglob("*"))


def test_other_bad_files_are_refused(tmp_path, sources):
    root = tmp_path / "ds"
    ds = filled(root, sources, finals=())
    (tmp_path / "slice.png").write_bytes(b"\x89PNG\r\n\x1a\n")
    refused(root, UnsupportedFileError, r"keeps \.nii\.gz and \.nii files",
            lambda: ds.add_image(None, tmp_path / "slice.png"))
    (tmp_path / "broken.nii.gz").write_bytes((sources / "case_a.nii.gz").read_bytes()[:300])
    message = refused(root, ImageReadError, r"broken\.nii\.gz", lambda: ds.add_image(None, tmp_path / "broken.nii.gz"))
    assert ".staging" not in message  # names the caller's file, not the datastore's copy
    refused(root, ImageReadError, r"broken\.nii\.gz",
            lambda: ds.save_label("case_a", tmp_path / "broken.nii.gz", "final"))
    refused(root, ImageNotFoundError, r"no image 'case_z'",
            lambda: ds.save_label("case_z", sources / "case_a_label.nii.gz", "final"))
    refused(root, ImageNotFoundError, r"no image 'case_z'; list_images\(\) gives", lambda: ds.image_path("case_z"))
    refused(root, LabelNotFoundError, r"'case_a' has no 'final' label; its labels: \['original'\]",
            lambda: ds.label_path("case_a", "final"))
    nib.save(nib.load(sources / "case_a.nii.gz"), tmp_path / "a.nii.nii")
    refused(root, UnsafeIdError, r"read back by MONAI Label as 'a'", lambda: ds.add_image(None, tmp_path / "a.nii.nii"))
    (root / "datastore_v2.json").write_text('{"objects": ')
    with pytest.raises(DatastoreFormatError, match=r"datastore_v2.json: damaged .* move it aside"):
        FolderDatastore(root)


def test_a_full_disk_at_the_json_leaves_every_file_as_it_was(tmp_path, sources, mni, monkeypatch):
    """The JSON cannot be written (ENOSPC): the label or image already moved into place is put back."""
    import errno
    from contextlib import contextmanager

    import samed_adapter.datastore.local as local

    root = tmp_path / "ds"
    ds = filled(root, sources)
    _, labels, affine = mni
    other = slab(labels, affine, SLABS["case_a"])
    nib.save(nib.Nifti1Image(np.zeros(other.shape, np.uint8), other.affine), tmp_path / "case_a_empty.nii")

    @contextmanager
    def full_disk(path):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))
        yield  # never reached

    monkeypatch.setattr(local, "atomic_path", full_disk)
    calls = {"a final label saved again": lambda: ds.save_label("case_a", sources / "case_a_label.nii.gz", "final"),
             "under the other extension": lambda: ds.save_label("case_a", tmp_path / "case_a_empty.nii", "final"),
             "a new label": lambda: ds.save_label("case_c", sources / "case_c_label.nii.gz", "final"),
             "a new image": lambda: ds.add_image("case_e", sources / "case_a.nii.gz"),
             "a removed label": lambda: ds.remove_label("case_a", "original"),
             "a removed image": lambda: ds.remove_image("case_b")}
    for call in calls.values():
        refused(root, OSError, "No space left on device", call)
    monkeypatch.undo()
    assert ds.status() == {"total": 4, "completed": 2, "label_tags": {"original": 1, "final": 2}}


# ---- what a training job saw, and what changed since ----


def test_items_changed_during_training_are_named(tmp_path, sources, mni):
    root = tmp_path / "ds"
    ds = filled(root, sources, finals=("case_a", "case_b", "case_c"))
    seen = record(ds.training_items())
    assert changed_since(ds, seen) == {}
    check_unchanged(ds, seen)
    ds.save_label("case_d", sources / "case_d_label.nii.gz", "final")  # a new item: not one the job saw
    ds.save_label("case_a", sources / "case_a_label.nii.gz", "final")  # the same bytes again
    assert changed_since(ds, seen) == {}
    _, labels, affine = mni
    edited = slab(labels, affine, SLABS["case_b"])
    nib.save(nib.Nifti1Image(np.zeros(edited.shape, np.uint8), edited.affine), tmp_path / "b.nii.gz")
    ds.save_label("case_b", tmp_path / "b.nii.gz", "final")
    ds.remove_label("case_a", "final")
    ds.remove_image("case_c")
    expected = {"case_a": "final label removed", "case_b": "label changed", "case_c": "removed"}
    assert changed_since(ds, seen) == expected
    with pytest.raises(DatastoreChangedError, match=r"case_a \(final label removed\), case_b \(label changed\), "
                       r"case_c \(removed\); the new version was not kept") as caught:
        check_unchanged(ds, seen)
    assert caught.value.changed == expected


# ---- two writers ----


def test_two_writers_at_once_lose_nothing(tmp_path, sources):
    """Two threads, each with its own datastore object (as two processes), save labels of
    different images at once: every label is on disk and in the JSON."""
    root = tmp_path / "ds"
    filled(root, sources, finals=())
    errors: list[BaseException] = []
    barrier = threading.Barrier(2)

    def writer(cases: tuple[str, ...], tag: str) -> None:
        ds = FolderDatastore(root, read_only=True)
        barrier.wait()
        try:
            for case in cases:
                ds.save_label(case, sources / f"{case}_label.nii.gz", tag, {"writer": tag})
            for n in range(40):  # small edits of the JSON: many chances to interleave
                ds.update_image_info("case_a", {f"{tag}_{n}": n})
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(("case_a", "case_b"), "final")),
               threading.Thread(target=writer, args=(("case_c", "case_d"), "reviewed"))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors
    ds = FolderDatastore(root)
    assert ds.status() == {"total": 4, "completed": 2, "label_tags": {"original": 1, "final": 2, "reviewed": 2}}
    info = ds.get_image_info("case_a")
    assert [k for k in [f"{t}_{n}" for t in ("final", "reviewed") for n in range(40)] if info.get(k) is None] == []
    assert sorted(p.name for p in (root / ".staging").iterdir()) == []


def test_writers_share_monai_labels_lock(tmp_path, sources):
    """The lock is MONAI Label's: filelock's FileLock on FOLDER/.lock holds our writers off, and ours holds it off."""
    filelock = pytest.importorskip("filelock")
    root = tmp_path / "ds"
    filled(root, sources, finals=())
    ds = FolderDatastore(root, read_only=True, lock_timeout=0.2)
    with filelock.FileLock(str(root / ".lock")):
        refused(root, DatastoreBusyError, r"another writer .* held \.lock for 0\.2 s; try again when it is done",
                lambda: ds.save_label("case_a", sources / "case_a_label.nii.gz", "final"))
    with folder_lock(root / ".lock", timeout=1.0):
        with pytest.raises(filelock.Timeout):
            filelock.FileLock(str(root / ".lock"), timeout=0.1).acquire()
    ds.save_label("case_a", sources / "case_a_label.nii.gz", "final")
    assert ds.get_labeled_images() == ["case_a"]


# ---- MONAI Label's own datastore on the same folders ----


def test_monai_label_reads_a_folder_we_wrote(tmp_path, sources, monailabel_local):
    LocalDatastore, _, _ = monailabel_local
    root = tmp_path / "ds"
    ours = filled(root, sources)
    written = (root / "datastore_v2.json").read_bytes()
    theirs = LocalDatastore(str(root), auto_reload=False)
    assert (root / "datastore_v2.json").read_bytes() == written  # its reconcile found nothing to fix
    assert theirs.list_images() == ours.list_images()
    assert theirs.get_labeled_images() == ours.get_labeled_images() == ["case_a", "case_b"]
    assert theirs.get_unlabeled_images() == ours.get_unlabeled_images()
    assert theirs.status() == ours.status()
    assert theirs.datalist() == ours.datalist()
    for case in SLABS:
        assert theirs.get_image_uri(case) == ours.get_image_uri(case)
        assert theirs.get_image_info(case) == ours.get_image_info(case)
        assert theirs.get_labels_by_image_id(case) == ours.get_labels_by_image_id(case)
        for tag in ("final", "original"):
            assert theirs.get_label_uri(case, tag) == ours.get_label_uri(case, tag)
            assert theirs.get_label_info(case, tag) == ours.get_label_info(case, tag)
    assert theirs.json() == ours.json()


def test_we_read_a_folder_monai_label_wrote(tmp_path, sources, monailabel_local):
    LocalDatastore, _, _ = monailabel_local
    root = tmp_path / "ds"
    theirs = LocalDatastore(str(root), auto_reload=False)
    for case in SLABS:
        theirs.add_image(case, str(sources / f"{case}.nii.gz"), {"client_id": "slicer"})
    theirs.save_label("case_b", str(sources / "case_b_label.nii.gz"), "final", {"user": "slicer user"})
    theirs.save_label("case_d", str(sources / "case_d_label.nii.gz"), "original", {})
    ours = FolderDatastore(root)
    assert ours.list_images() == theirs.list_images() == list(SLABS)
    assert ours.get_labeled_images() == ["case_b"]
    assert ours.status() == theirs.status() == {"total": 4, "completed": 1,
                                                "label_tags": {"final": 1, "original": 1}}
    assert ours.get_label_info("case_b", "final") == theirs.get_label_info("case_b", "final")
    assert ours.get_label_info("case_b", "final")["user"] == "slicer user"
    assert ours.datalist() == theirs.datalist()
    # and what we add next is there for MONAI Label when it looks again
    ours.save_label("case_c", sources / "case_c_label.nii.gz", "final")
    assert LocalDatastore(str(root), auto_reload=False).get_labeled_images() == ["case_b", "case_c"]


def test_first_and_random_choose_as_monai_labels_strategies(tmp_path, sources, monailabel_local):
    LocalDatastore, First, Random = monailabel_local
    root = tmp_path / "ds"
    ours = filled(root, sources, finals=("case_a",))
    theirs = LocalDatastore(str(root), auto_reload=False)
    assert first(ours) == First()({}, theirs) == {"id": "case_b"}
    # picks recorded as MONAI Label's server records them: case_c given a second ago, case_d long
    # ago (half the weight of case_b, never given)
    now = int(time.time())
    ours.update_image_info("case_c", {"strategy": {"random": {"ts": now - 1, "client_id": "a"}}})
    ours.update_image_info("case_d", {"strategy": {"random": {"ts": now // 2, "client_id": "a"}}})
    theirs = LocalDatastore(str(root), auto_reload=False)
    picks = []
    for seed in range(40):
        random.seed(seed)
        expected = Random()({"strategy": "random"}, theirs)["id"]
        random.seed(seed)
        picks.append(random_image(ours)["id"])
        assert picks[-1] == expected
    assert "case_c" not in picks and {"case_b", "case_d"} <= set(picks)
    assert random_image(ours, rng=random.Random(0), now=now)["weight"] in (now, now - now // 2)
    for case in ("case_b", "case_c", "case_d"):  # all given this very second: MONAI Label's draw fails
        ours.update_image_info(case, {"strategy": {"random": {"ts": now}}})
    with pytest.raises(ValueError, match="weights"):
        Random()({"strategy": "random"}, LocalDatastore(str(root), auto_reload=False))
    assert random_image(ours, rng=random.Random(0), now=now)["id"] in ("case_b", "case_c", "case_d")
    for case in ("case_b", "case_c", "case_d"):
        ours.save_label(case, sources / f"{case}_label.nii.gz", "final")
    assert first(ours) is None and random_image(ours) is None
    assert First()({}, LocalDatastore(str(root), auto_reload=False)) is None


# ---- least_sure ----


def probabilities(fg_confidence: float, shape=(4, 5, 6), classes: int = 3, seed: int = 0) -> np.ndarray:
    """(K+1, *shape): background sure on half the voxels; class 1 or 2 with `fg_confidence` elsewhere."""
    rng = np.random.default_rng(seed)
    p = np.zeros((classes,) + shape)
    fg = rng.random(shape) < 0.5
    winner = rng.integers(1, classes, size=shape)
    rest = (1 - fg_confidence) / (classes - 1)
    p[:] = np.where(fg, rest, 0.0)
    p[0] = np.where(fg, rest, 1.0)
    for k in range(1, classes):
        p[k] = np.where(fg & (winner == k), fg_confidence, p[k])
    return p


def test_uncertainty_of_probabilities():
    sure, unsure = probabilities(1.0), probabilities(0.4)
    assert uncertainty(sure) == 0.0 and uncertainty(sure, "max_prob") == 0.0
    assert uncertainty(np.full((3, 8), 1 / 3)) == pytest.approx(1.0)  # uniform everywhere: nothing labeled
    assert uncertainty(np.full((3, 8), 1 / 3), "max_prob") == pytest.approx(1.0)
    h = -(0.4 * np.log(0.4) + 2 * 0.3 * np.log(0.3)) / np.log(3)
    assert uncertainty(unsure) == pytest.approx(h)  # the sure background does not dilute it
    assert uncertainty(unsure, "max_prob") == pytest.approx(0.6 * 3 / 2)
    assert uncertainty(unsure.astype(np.float32)) == pytest.approx(h, rel=1e-5)
    tie = np.array([[0.5, 1.0], [0.5, 0.0]])  # voxel 0: a tie goes to the background, as argmax gives it
    assert uncertainty(tie) == pytest.approx(0.5)  # nothing labeled: the mean over both voxels
    for bad, match in ((np.ones((1, 4)), "not \\(K\\+1, ...\\)"), (np.full((2, 4), 0.7), "do not sum to 1"),
                       (np.full((2, 4), np.nan), "NaN")):
        with pytest.raises(ValueError, match=match):
            uncertainty(bad)


def test_least_sure_picks_the_most_uncertain_unlabeled_image(tmp_path, sources):
    ds = filled(tmp_path / "ds", sources, finals=("case_a",))
    scores = {"case_a": uncertainty(probabilities(0.34)),  # labeled: never offered again
              "case_b": uncertainty(probabilities(0.9)),
              "case_c": uncertainty(probabilities(0.5)),
              "case_d": uncertainty(probabilities(0.98))}
    assert scores["case_a"] > scores["case_c"] > scores["case_b"] > scores["case_d"]
    assert least_sure(ds, scores) == {"id": "case_c", "score": scores["case_c"]}
    assert least_sure(ds, {"case_b": 0.5, "case_d": 0.5}) == {"id": "case_b", "score": 0.5}  # ties: first id
    assert least_sure(ds, {"case_a": 0.9, "unknown": 1.0}) is None
    with pytest.raises(ValueError, match="finite numbers"):
        least_sure(ds, {"case_b": float("nan")})
