"""Data formats: channel axis, canonical (A, C, B) view, masks."""

from __future__ import annotations

import numpy as np
import pytest

from refsyncbn.layouts import DATA_FORMATS, get_layout

# format: (ndim, channel axis), written out from the format names.
TABLE = {
    "NC": (2, 1),
    "NCL": (3, 1),
    "NLC": (3, 2),
    "NCHW": (4, 1),
    "NHWC": (4, 3),
    "NCDHW": (5, 1),
    "NDHWC": (5, 4),
}
SHAPES = {
    "NC": (3, 4),
    "NCL": (3, 4, 5),
    "NLC": (3, 5, 4),
    "NCHW": (3, 4, 2, 5),
    "NHWC": (3, 2, 5, 4),
    "NCDHW": (3, 4, 2, 1, 3),
    "NDHWC": (3, 2, 1, 3, 4),
}


def test_the_seven_formats():
    assert set(DATA_FORMATS) == set(TABLE)


@pytest.mark.parametrize("fmt", list(TABLE))
class TestLayout:
    def test_rank_and_channel_axis(self, fmt):
        layout = get_layout(fmt)
        assert (layout.ndim, layout.channel_axis) == TABLE[fmt]
        assert layout.channels(SHAPES[fmt]) == 4
        assert layout.channels_last == (fmt.endswith("C") and fmt != "NC")

    def test_canonical_view_maps_every_element_to_its_channel(self, fmt):
        layout = get_layout(fmt)
        x = np.arange(np.prod(SHAPES[fmt]), dtype=np.float64).reshape(SHAPES[fmt])
        v = layout.view(x, xp=np)
        assert np.shares_memory(v, x)  # a view, not a copy
        a, c, b = v.shape
        spatial = int(np.prod(SHAPES[fmt])) // (3 * 4)
        assert (a, c, b) == ((3 * spatial, 4, 1) if layout.channels_last else (3, 4, spatial))
        # Channel k of the view holds exactly the elements at index k of the channel axis.
        for k in range(4):
            expected = np.sort(np.take(x, k, axis=layout.channel_axis).reshape(-1))
            np.testing.assert_array_equal(np.sort(v[:, k, :].reshape(-1)), expected)

    def test_mask_lines_up_with_the_view(self, fmt):
        layout = get_layout(fmt)
        shape = SHAPES[fmt]
        assert layout.mask_shape(shape) == tuple(
            s for i, s in enumerate(shape) if i != layout.channel_axis
        )
        rng = np.random.default_rng(0)
        mask = rng.random(layout.mask_shape(shape)) < 0.5
        x = np.broadcast_to(np.expand_dims(mask, layout.channel_axis), shape).astype(float)
        m3 = layout.view_mask(mask, shape, xp=np)
        v = layout.view(np.ascontiguousarray(x), xp=np)
        assert m3.shape == (v.shape[0], 1, v.shape[2])
        np.testing.assert_array_equal(np.broadcast_to(m3, v.shape), v.astype(bool))

    def test_channel_vector_broadcasts_on_the_channel_axis(self, fmt):
        layout = get_layout(fmt)
        vec = np.arange(4.0).reshape(layout.channel_vector_shape())
        full = np.broadcast_to(vec, SHAPES[fmt])
        np.testing.assert_array_equal(np.take(full, 2, axis=layout.channel_axis), 2.0)


@pytest.mark.parametrize("bad", ["nchw", "NCWH", "", None, 4])
def test_unknown_format_is_a_value_error_listing_the_formats(bad):
    with pytest.raises(ValueError, match=r"data_format is .*; expected one of NC, NCL, NLC"):
        get_layout(bad)
