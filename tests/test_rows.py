"""flows.rows: a training set as a selection of rows of arrays, without copies."""

from __future__ import annotations

import numpy as np
import pytest

from flows.rows import Rows, fingerprint


def test_rows_read_as_the_concatenation_would() -> None:
    a = np.arange(5 * 2, dtype=np.float32).reshape(5, 1, 2)
    b = 100 + np.arange(3 * 2, dtype=np.float32).reshape(3, 1, 2)
    cat = np.concatenate([a, b])
    r = Rows.cat(a, b)
    assert len(r) == 8 and r.shape == (8, 1, 2) and r.ndim == 3 and r.dtype == np.float32
    idx = np.array([7, 0, 5, 4, 4])
    np.testing.assert_array_equal(r[idx], cat[idx])
    np.testing.assert_array_equal(r[2:6], cat[2:6])
    np.testing.assert_array_equal(r[cat[:, 0, 0] > 3], cat[cat[:, 0, 0] > 3])
    np.testing.assert_array_equal(np.asarray(r), cat)
    # a selection of a selection, joined to another set: still the rows a copy would hold
    sub = r.take(np.array([6, 1, 3]))
    np.testing.assert_array_equal(np.asarray(sub), cat[[6, 1, 3]])
    both = Rows.cat(sub, a[:2])
    np.testing.assert_array_equal(np.asarray(both), np.concatenate([cat[[6, 1, 3]], a[:2]]))
    assert both.parts[0] is a and both.parts[1] is b  # nothing was copied
    np.testing.assert_array_equal(np.concatenate(list(r.chunks(3))), cat)
    with pytest.raises(TypeError, match="slice or an index array"):
        r[3]  # type: ignore[index]
    with pytest.raises(ValueError, match="different image shapes"):
        Rows.cat(a, np.zeros((2, 1, 3), np.float32))


def test_fingerprint_is_the_same_for_rows_and_their_copy() -> None:
    rng = np.random.default_rng(0)
    a, b = rng.random((300, 1, 4, 4), dtype=np.float32), rng.random((200, 1, 4, 4), dtype=np.float32)
    f_rows, f_copy = fingerprint(Rows.cat(a, b)), fingerprint(np.concatenate([a, b]))
    assert f_rows == f_copy and f_rows["n"] == 500 and f_rows["shape"] == [1, 4, 4]
    both = np.concatenate([a, b])
    assert f_rows["mean"] == pytest.approx(float(both.mean()), rel=1e-6)
    assert f_rows["std"] == pytest.approx(float(both.std()), rel=1e-5)
    b[3, 0, 1, 1] += 1e-3  # any pixel changes it
    assert fingerprint(Rows.cat(a, b))["sha256"] != f_rows["sha256"]
