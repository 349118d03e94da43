import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from florence_helpers import (
    RegionError,
    box_to_loc_tokens,
    dequantize,
    loc_tokens_to_box,
    quantize,
)

sizes = st.tuples(st.integers(1, 8000), st.integers(1, 8000))


@settings(max_examples=300, deadline=None)
@given(size=sizes, fractions=st.lists(st.floats(-0.1, 1.1), min_size=4, max_size=4))
def test_quantize_matches_the_processor(processor, size, fractions):
    width, height = size
    box = [fractions[0] * width, fractions[1] * height, fractions[2] * width, fractions[3] * height]
    native = processor.post_processor.quantize(torch.tensor([box]), size)
    assert quantize([box], size).tolist() == native.tolist()


@settings(max_examples=300, deadline=None)
@given(size=sizes, value=st.integers(0, 8000))
def test_integer_pixels_quantize_like_the_processor(processor, size, value):
    point = [[value, value]]
    native = processor.post_processor.quantize(torch.tensor(point), size)
    assert quantize(point, size).tolist() == native.tolist()


@settings(max_examples=300, deadline=None)
@given(size=sizes, bins=st.lists(st.integers(0, 999), min_size=4, max_size=4))
def test_dequantize_matches_the_processor(processor, size, bins):
    native = processor.post_processor.dequantize(torch.tensor([bins]), size)
    assert dequantize([bins], size).tolist() == native.tolist()


def test_edges_clamp_to_the_first_and_last_bin():
    assert quantize([0, 0, 640, 480], (640, 480)).tolist() == [0, 0, 999, 999]
    assert quantize([-5, -1, 10_000, 481], (640, 480)).tolist() == [0, 0, 999, 999]
    # bin centres: (0 + 0.5) * 0.64 = 0.32 -> 0; (999 + 0.5) * 0.64 = 639.68 -> 639
    assert dequantize([0, 0, 999, 999], (640, 480)).tolist() == [0, 0, 639, 479]


def test_box_round_trip_stays_within_one_bin():
    size = (1600, 1066)
    box = (123.4, 56.7, 890.1, 1000.0)
    back = loc_tokens_to_box(box_to_loc_tokens(box, size), size)
    for original, recovered, axis in zip(box, back, size * 2, strict=False):
        assert abs(original - recovered) <= axis / 1000


def test_box_to_tokens_text():
    assert box_to_loc_tokens((10, 20, 300, 400), (640, 480)) == (
        "<loc_15><loc_41><loc_468><loc_833>"
    )


@pytest.mark.parametrize(
    ("box", "message"),
    [
        ((10, 20, 700, 400), r"lies outside the 640x480 image"),
        ((-1, 20, 300, 400), r"lies outside the 640x480 image"),
        ((300, 20, 10, 400), r"is empty"),
        ((10, 20, 10, 400), r"is empty"),
        ((1, 2, 3), r"must be four numbers"),
        (("a", 2, 3, 4), r"must be four numbers"),
        ((0, 0, float("nan"), 5), r"not a finite number"),
    ],
)
def test_bad_regions_are_explained(box, message):
    with pytest.raises(RegionError, match=message):
        box_to_loc_tokens(box, (640, 480))


def test_tokens_must_be_four_valid_location_tokens():
    with pytest.raises(RegionError, match="exactly four tokens"):
        loc_tokens_to_box("<loc_1><loc_2><loc_3>", (100, 100))
    with pytest.raises(RegionError, match="exactly four tokens"):
        loc_tokens_to_box("<loc_1><loc_2><loc_3><loc_1000>", (100, 100))


def test_shapes_other_than_pairs_or_boxes_are_rejected():
    with pytest.raises(RegionError, match="shape"):
        quantize(np.zeros(3), (10, 10))
