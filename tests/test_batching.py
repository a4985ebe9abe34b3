"""Fixed-shape padded batches (robust_flat.batching) and the shared input check (attacks.common.check_data)."""
import numpy as np
import pytest

from robust_flat.attacks.common import check_data
from robust_flat.batching import pad_rows, padded_batches


def _data(n):
    rng = np.random.default_rng(0)
    return rng.uniform(size=(n, 2, 2, 1)).astype(np.float32), rng.integers(0, 10, n).astype(np.int64)


def test_pad_rows_appends_copies_of_the_first_row_and_leaves_a_full_array_alone():
    a = np.arange(6).reshape(3, 2)
    np.testing.assert_array_equal(pad_rows(a, 5), [[0, 1], [2, 3], [4, 5], [0, 1], [0, 1]])
    assert pad_rows(a, 3) is a


@pytest.mark.parametrize("n, batch_size, shrink, size", [(10, 4, True, 4), (10, 4, False, 4), (3, 8, True, 3),
                                                         (3, 8, False, 8), (8, 4, True, 4)])
def test_padded_batches_have_one_shape_and_their_real_rows_are_the_data_in_order(n, batch_size, shrink, size):
    x, y = _data(n)
    batches = list(padded_batches(x, y, batch_size, shrink=shrink))
    assert len(batches) == -(-n // size)
    assert {b.x.shape for b in batches} == {(size,) + x.shape[1:]} and {b.y.shape for b in batches} == {(size,)}
    assert all(b.y.dtype == np.int32 and b.mask.dtype == np.float32 for b in batches)
    for b in batches:  # the mask marks exactly the first n_valid rows; padding repeats the batch's first example
        np.testing.assert_array_equal(np.asarray(b.mask), np.arange(size) < b.n_valid)
        np.testing.assert_array_equal(np.asarray(b.x)[b.n_valid:], np.broadcast_to(np.asarray(b.x)[:1],
                                                                                   (size - b.n_valid,) + x.shape[1:]))
    np.testing.assert_array_equal(np.concatenate([np.asarray(b.x)[:b.n_valid] for b in batches]), x)
    np.testing.assert_array_equal(np.concatenate([np.asarray(b.y)[:b.n_valid] for b in batches]), y)
    assert sum(float(np.sum(b.mask)) for b in batches) == n


def test_check_data_returns_float32_and_int32_and_refuses_bad_sets():
    x, y = _data(4)
    xc, yc = check_data(x.astype(np.float64), y, 0.1, "test")
    assert xc.dtype == np.float32 and yc.dtype == np.int32
    np.testing.assert_array_equal(yc, y)
    with pytest.raises(ValueError, match="test: expected x"):
        check_data(x, y[:3], name="test")
    with pytest.raises(ValueError, match="N > 0"):
        check_data(x[:0], y[:0])
    assert check_data(x[:0], y[:0], allow_empty=True)[0].shape == (0, 2, 2, 1)
    with pytest.raises(ValueError, match="labels must be integers"):
        check_data(x, y.astype(np.float32))
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        check_data(x + 1.0, y)
    with pytest.raises(ValueError, match="eps must be > 0"):
        check_data(x, y, 0.0)
