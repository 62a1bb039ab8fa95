import math

import numpy as np
import pytest
from PIL import Image

from trainloop.tasks.neuron.surface import (
    END_COLOUR,
    START_COLOUR,
    VALLEY_COLOUR,
    draw_error_surface,
    error_surface,
    neuron_error,
)

X, TARGET = -0.23, 0.74
LOGIT_TARGET = math.log(TARGET / (1 - TARGET))


def descend(
    w: float, b: float, steps: int, learning_rate: float = 5.0
) -> list[tuple[float, float]]:
    """Plain gradient descent on E = 1/2 (sigmoid(w x + b) - t)^2."""
    path = [(w, b)]
    for _ in range(steps):
        output = 1 / (1 + math.exp(-(w * X + b)))
        delta = (output - TARGET) * output * (1 - output)
        w, b = w - learning_rate * delta * X, b - learning_rate * delta
        path.append((w, b))
    return path


def test_surface_values_match_hand_computed_errors():
    # w=0, b=0: O = 0.5, E = 1/2 (0.5 - 0.74)^2 = 0.0288
    # w=1, b=0: O = sigmoid(-0.23) = 0.442752..., E = 1/2 (0.297247...)^2 = 0.044178...
    # w=0, b=1: O = sigmoid(1) = 0.731058..., E = 1/2 (0.008941...)^2 = 0.0000399745...
    # w=1, b=1: O = sigmoid(0.77) = 0.683520..., E = 1/2 (0.056479...)^2 = 0.0015949...
    surface = error_surface(X, TARGET, (0.0, 1.0), (0.0, 1.0), 2)

    expected = [[0.0288, 0.04417814353], [0.00003997450806, 0.001594944722]]
    np.testing.assert_allclose(surface, expected, rtol=1e-9)


def test_surface_rows_follow_b_and_columns_follow_w():
    surface = error_surface(X, TARGET, (-1.0, 1.0), (-2.0, 2.0), (3, 5))

    assert surface.shape == (5, 3)
    assert surface[4, 0] == pytest.approx(float(neuron_error(-1.0, 2.0, X, TARGET)))
    assert surface[0, 2] == pytest.approx(float(neuron_error(1.0, -2.0, X, TARGET)))


def test_the_logit_valley_has_zero_error_and_its_surroundings_do_not():
    weights = np.linspace(-20, 20, 41)
    on_valley = neuron_error(weights, LOGIT_TARGET - X * weights, X, TARGET)
    off_valley = neuron_error(weights, LOGIT_TARGET - X * weights + 0.5, X, TARGET)

    assert np.abs(on_valley).max() < 1e-20
    assert off_valley.min() > 1e-4
    # on a grid through the valley of x = 1, t = 0.5 (b = -w), the antidiagonal is zero
    grid = error_surface(1.0, 0.5, (-2.0, 2.0), (-2.0, 2.0), 5)
    assert np.fliplr(grid).diagonal().tolist() == [0.0] * 5
    assert grid[0, 0] > 0.1


def test_extreme_weights_do_not_overflow():
    with np.errstate(all="raise"):
        surface = error_surface(X, TARGET, (-1e4, 1e4), (-1e4, 1e4), 3)
    assert np.isfinite(surface).all()


def test_drawing_writes_a_png_of_the_requested_size_with_markers_on_the_path(tmp_path):
    path = descend(2.0, -2.0, steps=300)
    png = tmp_path / "surface.png"

    plot = draw_error_surface(png, X, TARGET, path, size=(500, 400))

    image = Image.open(png)
    assert image.format == "PNG"
    assert image.size == (500, 400)
    pixels = image.convert("RGB")
    assert pixels.getpixel(plot.pixel(*path[0])) == START_COLOUR
    assert pixels.getpixel(plot.pixel(*path[-1])) == END_COLOUR
    # the window holds the whole path, away from the plot's edges
    left, top, right, bottom = plot.plot_box
    for w, b in path:
        column, row = plot.pixel(w, b)
        assert left + 10 < column < right - 10
        assert top + 10 < row < bottom - 10


def test_the_valley_is_drawn_where_w_x_plus_b_is_logit_target(tmp_path):
    path = descend(2.0, -2.0, steps=300)
    plot = draw_error_surface(tmp_path / "surface.png", X, TARGET, path)

    image = np.asarray(Image.open(plot.path).convert("RGB"))
    left, top, right, bottom = plot.plot_box
    inside = image[top:bottom, left:right]
    rows, columns = np.nonzero((inside == VALLEY_COLOUR).all(axis=-1))
    assert len(rows) > 100  # dashes across the whole width of the plot
    (w_low, w_high), (b_low, b_high) = plot.w_range, plot.b_range
    weights = w_low + columns / (right - left - 1) * (w_high - w_low)
    biases = b_high - rows / (bottom - top - 1) * (b_high - b_low)
    pixel_height = (b_high - b_low) / (bottom - top - 1)
    assert np.abs(weights * X + biases - LOGIT_TARGET).max() < 2 * pixel_height


def test_the_highest_error_is_drawn_in_the_top_colour(tmp_path):
    plot = draw_error_surface(tmp_path / "surface.png", X, TARGET, descend(2.0, -2.0, steps=50))

    left, top, right, bottom = plot.plot_box
    surface = error_surface(X, TARGET, plot.w_range, plot.b_range, (right - left, bottom - top))
    row, column = np.unravel_index(surface.argmax(), surface.shape)
    highest = (left + column, bottom - 1 - row)  # surface rows go up in b, image rows down
    assert Image.open(plot.path).convert("RGB").getpixel(highest) == (253, 231, 37)


def test_a_path_of_one_point_and_a_small_image_still_draw(tmp_path):
    plot = draw_error_surface(tmp_path / "one.png", X, TARGET, [(0.0, 0.0)], size=(320, 240))

    image = Image.open(plot.path).convert("RGB")
    assert image.size == (320, 240)
    assert image.getpixel(plot.pixel(0.0, 0.0)) == END_COLOUR


def test_bad_drawing_input_is_a_value_error(tmp_path):
    with pytest.raises(ValueError, match="at least one finite"):
        draw_error_surface(tmp_path / "x.png", X, TARGET, [])
    with pytest.raises(ValueError, match="at least one finite"):
        draw_error_surface(tmp_path / "x.png", X, TARGET, [(0.0, math.nan)])
    with pytest.raises(ValueError, match="too small"):
        draw_error_surface(tmp_path / "x.png", X, TARGET, [(0.0, 0.0)], size=(100, 100))
