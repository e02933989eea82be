"""The simulated-click protocol on hand-made masks where the answer is known: the largest error
region, its deepest point, the sign, the tie-breaks, the image border, and one round over a
volume."""

from __future__ import annotations

import numpy as np
import pytest

from samed_adapter.interactive import SliceClick, next_click, round_clicks


def _empty(shape=(20, 20)) -> np.ndarray:
    return np.zeros(shape, dtype=bool)


def test_a_missing_square_is_clicked_positive_at_its_centre():
    truth = _empty()
    truth[6:11, 3:8] = True  # 5 x 5, centre (8, 5)
    assert next_click(_empty(), truth) == (8, 5, True)


def test_an_extra_square_is_clicked_negative_at_its_centre():
    predicted = _empty()
    predicted[10:15, 12:17] = True
    assert next_click(predicted, _empty()) == (12, 14, False)


def test_agreement_gives_no_click():
    mask = _empty()
    mask[2:9, 4:6] = True
    assert next_click(mask, mask.copy()) is None
    assert next_click(_empty(), _empty()) is None


def test_the_larger_region_is_corrected_an_extra_ring_before_a_smaller_missing_blob():
    truth, predicted = _empty((30, 30)), _empty((30, 30))
    truth[4:15, 4:15] = True
    predicted[1:18, 1:18] = True  # the square is right; a ring 3 pixels wide around it is extra
    truth[22:25, 22:25] = True  # and a 3x3 blob (9 pixels) is missing
    row, col, positive = next_click(predicted, truth)
    assert positive is False
    assert predicted[row, col] and not truth[row, col]
    # The ring's deepest points lie on its middle line, 2 from both its edges; the first in C
    # order is on the top band's middle row, where the left band meets it.
    assert (row, col) == (2, 2)


def test_a_larger_missing_region_wins_over_a_smaller_extra_one():
    truth, predicted = _empty(), _empty()
    truth[1:5, 1:5] = True  # 16 missing
    predicted[12:15, 12:15] = True  # 9 extra
    assert next_click(predicted, truth) == (2, 2, True)  # (2,2),(2,3),(3,2),(3,3) tie: first in C order


def test_equal_regions_go_missing_before_extra_then_first_in_c_order():
    truth, predicted = _empty(), _empty()
    predicted[2:5, 2:5] = True  # 9 extra, earlier in C order
    truth[14:17, 14:17] = True  # 9 missing, later
    assert next_click(predicted, truth) == (15, 15, True)
    truth, predicted = _empty(), _empty()
    truth[14:17, 2:5] = True  # two missing regions of 9: the one whose first pixel is first in C order
    truth[2:5, 14:17] = True
    assert next_click(predicted, truth) == (3, 15, True)


def test_diagonal_neighbours_are_one_region():
    truth = _empty()
    truth[0:3, 0:3] = True  # 9, then 4 joined through a diagonal corner: one region of 13
    truth[3:5, 3:5] = True
    truth[10:13, 10:14] = True  # 12 apart: smaller than 13 only if the diagonal joins
    row, col, positive = next_click(_empty(), truth)
    assert positive and row < 5 and col < 5


def test_the_image_border_counts_as_boundary():
    truth = _empty((10, 12))
    truth[:, :6] = True  # a band touching three borders
    # With the border as boundary the deepest points are 3 from every side (rows 2..7, cols 2
    # and 3); were it not, column 0 would be 6 from the band's only edge and (0, 0) would win.
    assert next_click(_empty((10, 12)), truth) == (2, 2, True)


def test_masks_of_another_shape_are_refused():
    with pytest.raises(ValueError, match="must be"):
        next_click(_empty((4, 5)), _empty((5, 4)))


def test_one_round_clicks_each_class_on_each_slice_where_it_differs():
    truth = np.zeros((3, 12, 12), dtype=np.int64)
    labels = truth.copy()
    truth[0, 2:7, 2:7] = 1  # slice 0: class 1 missing (5x5, centre (4, 4))
    labels[2, 5:8, 5:8] = 2  # slice 2: class 2 extra (3x3, centre (6, 6))
    truth[1, 1:4, 1:4] = 2  # slice 1: class 2 and class 1 swapped on a 3x3 square
    labels[1, 1:4, 1:4] = 1
    clicks = round_clicks(labels, truth, num_classes=3)
    assert clicks == [
        SliceClick(1, 0, 4, 4, True),
        SliceClick(1, 1, 2, 2, False),
        SliceClick(2, 1, 2, 2, True),
        SliceClick(2, 2, 6, 6, False),
    ]
    assert round_clicks(truth, truth, num_classes=3) == []
    with pytest.raises(ValueError, match="to_slices"):
        round_clicks(labels[0], truth[0], num_classes=3)
