import numpy as np
import pytest

from trainloop.tasks.carvana.rle import rle_decode, rle_encode

# Flattened row-major: 1 1 0 0 | 0 1 1 1 | 1 0 0 1. The second run wraps onto the next row.
HAND_MADE_MASK = np.array(
    [
        [1, 1, 0, 0],
        [0, 1, 1, 1],
        [1, 0, 0, 1],
    ],
    dtype=np.uint8,
)
HAND_MADE_RLE = "1 2 6 4 12 1"

# The first runs of 00087a6bd4dc_01.jpg in the real train_masks.csv (1918x1280 images).
KAGGLE_FIRST_RUNS = "879386 40 881253 141 883140 205"


def test_encode_hand_made_mask_gives_the_expected_string():
    assert rle_encode(HAND_MADE_MASK) == HAND_MADE_RLE


def test_decode_hand_made_string_gives_the_expected_mask():
    decoded = rle_decode(HAND_MADE_RLE, HAND_MADE_MASK.shape)
    assert decoded.dtype == np.bool_
    np.testing.assert_array_equal(decoded, HAND_MADE_MASK.astype(bool))


@pytest.mark.parametrize("shape", [(1, 1), (3, 7), (7, 3), (64, 96), (1280, 1918)])
@pytest.mark.parametrize("density", [0.1, 0.5, 0.9])
def test_round_trip_restores_random_masks_of_any_shape(shape, density):
    mask = np.random.default_rng(0).random(shape) < density
    np.testing.assert_array_equal(rle_decode(rle_encode(mask), shape), mask)


def test_first_and_last_pixel_set_are_encoded():
    mask = np.zeros((4, 5), dtype=bool)
    mask[0, 0] = mask[-1, -1] = True
    assert rle_encode(mask) == "1 1 20 1"
    np.testing.assert_array_equal(rle_decode("1 1 20 1", (4, 5)), mask)


def test_empty_mask_is_the_empty_string():
    assert rle_encode(np.zeros((3, 5), dtype=np.uint8)) == ""
    assert not rle_decode("", (3, 5)).any()
    assert rle_decode("", (3, 5)).shape == (3, 5)


def test_full_mask_is_one_run_over_every_pixel():
    assert rle_encode(np.ones((3, 5), dtype=np.uint8)) == "1 15"
    assert rle_decode("1 15", (3, 5)).all()


def test_any_nonzero_value_is_foreground():
    assert rle_encode(np.array([[0, 255, 7, 0]], dtype=np.uint8)) == "2 2"


def test_encode_rejects_a_mask_that_is_not_two_dimensional():
    with pytest.raises(ValueError, match="2-D"):
        rle_encode(np.zeros((1, 3, 4)))


@pytest.mark.parametrize(
    ("rle", "message"),
    [
        ("1 2 3", "odd number"),
        ("1 x", "'x'"),
        ("1.5 2", "'1.5'"),
        ("0 3", "start below 1"),
        ("-2 3", "start below 1"),
        ("2 0", "length below 1"),
        ("8 2 3 2", "out of order"),
        ("1 5 3 2", "overlap"),
        ("11 3", "past the 3x4 mask's 12 pixels"),
    ],
)
def test_decode_rejects_malformed_strings(rle, message):
    with pytest.raises(ValueError, match=message):
        rle_decode(rle, (3, 4))


def test_kaggle_train_masks_csv_is_row_major_on_1918_wide_images():
    mask = rle_decode(KAGGLE_FIRST_RUNS, (1280, 1918))
    rows, columns = np.nonzero(mask)
    # Read row-major, the three runs are three consecutive rows of a widening car roof.
    assert sorted(set(rows.tolist())) == [458, 459, 460]
    spans = {
        row: (columns[rows == row].min(), columns[rows == row].max()) for row in (458, 459, 460)
    }
    assert spans == {458: (941, 980), 459: (890, 1030), 460: (859, 1063)}
    # Read column-major instead, the same runs would be scattered pieces of three columns.
    transposed = rle_decode(KAGGLE_FIRST_RUNS, (1918, 1280)).T
    column_rows = [np.flatnonzero(transposed[:, column]) for column in (687, 688, 689)]
    assert column_rows[0].max() < column_rows[1].min()
    assert rle_encode(mask) == KAGGLE_FIRST_RUNS
