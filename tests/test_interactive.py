"""Click sessions: automatic labels as `segment` gives them, then one class refined from clicks on
the grid the user holds, only on the clicked slice, undoable; and click adapters on the patch,
swap and unpatch paths (SAM and SAM 2)."""

from __future__ import annotations

import dataclasses

import nibabel as nib
import numpy as np
import pytest
import torch

import samed_adapter as sa
from samed_adapter.interactive import SessionChangedError, SliceClick
from samed_adapter.io.volume import Volume
from samed_adapter.testing import assert_unchanged, random_adapter, same_tensors, snapshot
from samed_adapter.testing.tiny import CONFIGS, images, stock_sam

CLICKS = CONFIGS["clicks"]


@pytest.fixture(scope="module")
def adapter() -> sa.Adapter:
    return random_adapter(stock_sam(), CLICKS, seed=1)


@pytest.fixture
def model(adapter):
    return sa.patch(stock_sam(), adapter)


def _volume(shape=(5, 40, 48), seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).random(shape).astype(np.float32)


def test_a_session_starts_from_the_labels_segment_gives(model):
    image = _volume()
    session = model.interactive(image, batch_size=2)
    np.testing.assert_array_equal(session.labels, model.segment(image))
    np.testing.assert_array_equal(session.automatic, model.segment(image))
    assert session.clicks() == []


def test_a_click_changes_only_its_slice_gives_the_clicked_voxel_its_class_and_undo_restores(model):
    image = _volume()
    session = model.interactive(image)
    auto = session.labels
    target = 2 if auto[3, 20, 20] != 2 else 3
    after = session.click(target, (3, 20, 20), positive=True)
    assert after[3, 20, 20] == target
    changed = np.argwhere(after != auto)
    assert len(changed) and set(changed[:, 0]) == {3}
    # Other classes keep their voxels except where the refined class takes or gives them back.
    moved = after != auto
    assert np.all((after[moved] == target) | (auto[moved] == target))
    second = session.click(target, (3, 5, 5), positive=False)
    assert second[3, 5, 5] != target and second[3, 20, 20] == target  # both clicks stay in force
    assert [(c.row, c.col, c.positive) for c in session.clicks(target)] == [(20, 20, True), (5, 5, False)]
    np.testing.assert_array_equal(session.undo(), after)
    np.testing.assert_array_equal(session.undo(), auto)
    with pytest.raises(IndexError, match="nothing to undo"):
        session.undo()


def test_a_click_changes_only_what_is_connected_to_it(model):
    """A refinement keeps only the changes 8-connected to a click of its class on the slice."""
    from scipy import ndimage

    image = _volume(seed=3)
    session = model.interactive(image)
    auto = session.labels
    for target, point in ((1, (2, 10, 30)), (2, (2, 30, 8)), (3, (2, 20, 20))):
        before = session.labels
        after = session.click(target, point, positive=auto[point] != target)
        changed = after[2] != before[2]
        regions, count = ndimage.label(changed, structure=np.ones((3, 3), bool))
        assert count <= 1 and (count == 0 or regions[point[1:]] == 1), (target, count)


def test_a_refinement_is_the_automatic_logits_plus_what_the_clicks_change(model, monkeypatch):
    """Where the decoder's output with the clicks equals its output without them, nothing changes
    but the clicked voxel: the refined class keeps its automatic voxels, not the decoder's redraw."""
    from samed_adapter.interactive import session as session_module

    image = _volume(seed=4)
    session = model.interactive(image)
    auto = session.labels
    monkeypatch.setattr(session_module, "decode_clicks",
                        lambda model, embeddings, extra, coords, labels, classes, masks: torch.full(
                            (len(classes), 4 * model.config.grid_size, 4 * model.config.grid_size), 3.0))
    target = 2 if auto[1, 20, 20] != 2 else 3
    after = session.click(target, (1, 20, 20), positive=True)
    expected = auto.copy()
    expected[1, 20, 20] = target
    np.testing.assert_array_equal(after, expected)


def test_reset_gives_a_class_back_its_automatic_voxels_and_is_undoable(model):
    session = model.interactive(_volume())
    auto = session.labels
    session.click("class_1", (1, 10, 10))
    session.click("class_2", (2, 30, 30))
    clicked = session.labels
    reset = session.reset("class_1")
    np.testing.assert_array_equal(reset[1], auto[1])
    np.testing.assert_array_equal(reset[2], clicked[2])  # class_2's refinement stays
    assert session.clicks("class_1") == [] and len(session.clicks("class_2")) == 1
    np.testing.assert_array_equal(session.undo(), clicked)
    np.testing.assert_array_equal(session.reset(), auto)


def test_segment_and_sessions_leave_every_modules_train_flag_as_it_was(adapter):
    sam = stock_sam()
    model = sa.patch(sam, adapter)
    sam.image_encoder.train()  # a user's mixed flags
    flags = [m.training for m in sam.modules()]
    assert sam.training is False and any(flags)
    model.segment(_volume())
    model.interactive(_volume()).click(1, (0, 0, 0))
    assert [m.training for m in sam.modules()] == flags


def test_one_batch_of_clicks_equals_the_same_clicks_one_by_one(model):
    image = _volume()
    clicks = [SliceClick(1, 0, 4, 4, True), SliceClick(2, 2, 30, 9, True), SliceClick(3, 4, 12, 40, False)]
    batched = model.interactive(image)
    batched.refine(clicks)
    single = model.interactive(image)
    for click in clicks:
        single.refine([click])
    np.testing.assert_array_equal(batched.slice_labels, single.slice_labels)


@pytest.mark.parametrize("perm, flips", [((0, 1, 2), (False, False, False)), ((2, 0, 1), (True, False, True))])
def test_clicks_on_a_file_use_its_voxel_grid_whatever_the_adapters_orientation(tmp_path, perm, flips, store_scan):
    oriented = dataclasses.replace(CLICKS, orientation=("L", "P", "S"), slice_axis=1, intensity_window=None)
    model = sa.patch(stock_sam(), random_adapter(stock_sam(), oriented, seed=2))
    data = _volume((20, 12, 16), seed=3)
    path = store_scan(tmp_path / "scan.nii.gz", nib.Nifti1Image(data, np.diag([2.0, 1.5, 3.0, 1.0])), perm, flips)
    stored = nib.load(path)
    session = model.interactive(path)
    segmented = model.segment(path)
    expected = np.asarray(segmented.dataobj)
    np.testing.assert_array_equal(session.labels, expected)
    image = session.label_image()
    np.testing.assert_array_equal(np.asarray(image.dataobj), expected)
    np.testing.assert_array_equal(image.affine, segmented.affine)
    assert session.labels.shape == stored.shape
    point = (3, 7, 5)
    d, row, col = session.locate(point)
    onehot = np.zeros(stored.shape, bool)
    onehot[point] = True
    assert session.to_slices(onehot)[d, row, col]  # the same voxel, through the geometry's own cut
    target = 1 if expected[point] != 1 else 2
    after = session.click(target, point)
    assert after[point] == target
    changed = session.to_slices(after != expected)
    assert set(np.argwhere(changed)[:, 0]) == {d}  # one model slice, wherever it lies in the file
    np.testing.assert_array_equal(np.asarray(session.label_image().dataobj), after)
    kept_image, kept_labels = session.label_image(), session.labels
    session.undo()  # what was handed out before stays as it was
    np.testing.assert_array_equal(np.asarray(kept_image.dataobj), after)
    np.testing.assert_array_equal(kept_labels, after)
    np.testing.assert_array_equal(session.labels, expected)


def test_clicks_on_a_volume_use_its_array_layout(model):
    volume = Volume(_volume((6, 24, 20), seed=4), affine=np.diag([1.0, 1.0, 2.0, 1.0]))
    with pytest.warns(UserWarning, match="records no orientation"):
        session = model.interactive(volume)
    with pytest.warns(UserWarning, match="records no orientation"):
        np.testing.assert_array_equal(session.labels, model.segment(volume))
    target = 3 if session.labels[4, 10, 7] != 3 else 1
    assert session.click(target, (4, 10, 7))[4, 10, 7] == target


def test_clicks_outside_the_image_or_of_unknown_classes_are_refused_and_change_nothing(model):
    session = model.interactive(_volume())
    before = session.labels
    with pytest.raises(IndexError, match="outside"):
        session.click(1, (5, 0, 0))
    with pytest.raises(KeyError, match="no class 'liver'"):
        session.click("liver", (0, 0, 0))
    with pytest.raises(KeyError, match="not one of 1..3"):
        session.click(0, (0, 0, 0))
    np.testing.assert_array_equal(session.labels, before)
    assert session.clicks() == []


def test_an_adapter_trained_without_clicks_says_so_and_how_to_make_one():
    model = sa.patch(stock_sam(), random_adapter(stock_sam(), CONFIGS["k3"], seed=1))
    with pytest.raises(sa.ClicksNotTrainedError, match=r"trained without clicks.*train --clicks"):
        model.interactive(_volume())
    np.testing.assert_array_equal(model.segment(_volume()), model.segment(_volume()))  # still segments


def test_a_hot_swap_ends_a_session_and_the_swaps_stay_exact(adapter, tmp_path):
    plain = random_adapter(stock_sam(), CONFIGS["k3"], seed=5)
    sam = stock_sam()
    model = sa.patch(sam, adapter)
    session = model.interactive(_volume())
    sa.patch(sam, plain)
    with pytest.raises(SessionChangedError, match="start a new session"):
        session.click(1, (0, 0, 0))
    x = images(batch=2, seed=3)
    with torch.no_grad():
        np.testing.assert_array_equal(model(x)["masks"].numpy(), sa.patch(stock_sam(), plain)(x)["masks"].numpy())
        model = sa.patch(sam, adapter.save(tmp_path / "clicks.safetensors"))
        np.testing.assert_array_equal(model(x)["masks"].numpy(), sa.patch(stock_sam(), adapter)(x)["masks"].numpy())
    assert same_tensors(model.adapter(), adapter)
    assert model.interactive(_volume()).click(1, (0, 0, 0))[0, 0, 0] == 1
    session.resume()  # the model holds the session's adapter again (a replica's swap back)
    assert session.click(1, (0, 0, 0))[0, 0, 0] == 1
    sa.patch(sam, plain)
    with pytest.raises(SessionChangedError, match="not the one this session was made with"):
        session.resume()
    model = sa.patch(sam, adapter)

    sa.unpatch(sam)
    assert_unchanged(sam, snapshot(stock_sam()))


def test_a_file_with_and_without_the_class_embedding_must_agree_with_its_config(adapter):
    tensors = dict(adapter.tensors)
    del tensors["mask_decoder.class_embed.weight"]
    with pytest.raises(sa.AdapterFormatError, match="clicks=True but the file has no mask_decoder.class_embed"):
        sa.Adapter(adapter.config, tensors, adapter.base_fingerprint)
    tensors = dict(adapter.tensors)
    tensors["mask_decoder.class_embed.weight"] = torch.zeros(3, 32)
    with pytest.raises(sa.AdapterFormatError, match="class_embed has shape"):
        sa.Adapter(adapter.config, tensors, adapter.base_fingerprint)


def test_sam2_click_adapters_patch_click_and_unpatch_exactly():
    pytest.importorskip("sam2", reason="SAM 2 is optional: SAM2_BUILD_CUDA=0 pip install --no-build-isolation sam2==1.1.0")
    config = dataclasses.replace(CLICKS, image_size=128)
    sam2 = sa.build_sam("sam2.1_hiera_t", seed=0)
    before = snapshot(sam2)
    adapter = random_adapter(sam2, config, seed=6)
    model = sa.patch(sam2, adapter)
    image = _volume((3, 32, 32), seed=7)
    session = model.interactive(image)
    np.testing.assert_array_equal(session.labels, model.segment(image))
    clicks = [SliceClick(1, 0, 3, 3, True), SliceClick(2, 2, 20, 20, True)]
    batched = model.interactive(image)
    batched.refine(clicks)
    for click in clicks:
        session.refine([click])
    np.testing.assert_array_equal(batched.slice_labels, session.slice_labels)
    assert batched.slice_labels[0, 3, 3] == 1 and batched.slice_labels[2, 20, 20] == 2
    sa.unpatch(sam2)
    assert_unchanged(sam2, before)


def test_propagation_reaches_at_most_n_neighbours_each_way_and_undoes_in_one_step(model, monkeypatch):
    from samed_adapter.interactive import prompts
    from samed_adapter.interactive import session as session_module

    # A decoder that returns its mask prompt (clicks painted in): a refinement then carries the
    # refined mask to each neighbour, as a trained one would carry an organ's outline.
    monkeypatch.setattr(session_module, "decode_clicks", lambda model, embeddings, extra, coords, labels, classes,
                        masks: prompts.paint_clicks(masks, coords, labels, model.config.image_size)[:, 0])
    image = _volume((9, 40, 48), seed=8)
    plain = model.interactive(image)
    plain.click(2, (4, 20, 20))
    np.testing.assert_array_equal(np.unique(np.argwhere(plain.labels != plain.automatic)[:, 0]), [4])
    session = model.interactive(image, propagate=2)
    auto = session.labels
    after = session.click(2, (4, 20, 20))
    np.testing.assert_array_equal(after[4], plain.labels[4])  # the clicked slice as without propagation
    changed = set(np.argwhere(after != auto)[:, 0])
    assert changed == {2, 3, 4, 5, 6}
    moved = after != auto
    assert np.all((after[moved] == 2) | (auto[moved] == 2))
    np.testing.assert_array_equal(session.undo(), auto)
    with pytest.raises(ValueError, match="propagate must be"):
        model.interactive(image, propagate=-1)
