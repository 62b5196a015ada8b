"""Ensemble math against hand computations."""

import numpy as np
import pytest

from kaggle_i2p.core.ensemble import combine_towers, combine_views, l2_normalize, mean_cosine


def test_l2_normalize():
    x = np.array([[3.0, 4.0], [0.0, 0.0]])
    np.testing.assert_allclose(l2_normalize(x), [[0.6, 0.8], [0.0, 0.0]])
    assert l2_normalize(x).dtype == np.float32


def test_views_are_normalised_before_averaging():
    # A long view must not dominate: (10, 0) and (0, 1) average to the diagonal, not towards (1, 0).
    out = combine_views([np.array([[10.0, 0.0]]), np.array([[0.0, 1.0]])])
    np.testing.assert_allclose(out, [[np.sqrt(0.5), np.sqrt(0.5)]], rtol=1e-6)


def test_towers_weighted_after_normalising():
    a = np.array([[5.0, 0.0, 0.0]])
    b = np.array([[0.0, 0.1, 0.0]])
    out = combine_towers({"a": a, "b": b}, {"a": 3.0, "b": 1.0})
    expected = np.array([0.75, 0.25, 0.0]) / np.linalg.norm([0.75, 0.25])  # hand computation
    np.testing.assert_allclose(out[0], expected, rtol=1e-6)
    # weights are relative: scaling all of them changes nothing
    np.testing.assert_allclose(combine_towers({"a": a, "b": b}, {"a": 30.0, "b": 10.0}), out, rtol=1e-6)


def test_combine_towers_errors():
    with pytest.raises(KeyError):
        combine_towers({"a": np.ones((1, 2))}, {})
    with pytest.raises(ValueError):
        combine_towers({"a": np.ones((1, 2))}, {"a": 0.0})


def test_mean_cosine():
    pred = np.array([[1.0, 0.0], [0.0, 2.0]])
    target = np.array([[1.0, 0.0], [1.0, 0.0]])
    mean, rows = mean_cosine(pred, target)
    assert mean == pytest.approx(0.5) and rows.tolist() == pytest.approx([1.0, 0.0])
