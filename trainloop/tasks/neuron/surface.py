"""The single sigmoid neuron: its error surface, as numbers and as a picture.

One neuron ``O = sigmoid(w * x + b)`` with one input ``x`` must output ``target``; the
error is ``E = 1/2 (O - target)^2``. With two unknowns and one equation the minimum is not
a point but a valley: every ``(w, b)`` on the line ``w * x + b = logit(target)`` has
``E = 0``. Gradient descent walks down the surface to one of them; ``draw_error_surface``
shows where it went. Numpy and Pillow only.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

# The colours of the drawing, public so that tests and docs can find things in it.
PATH_COLOUR = (255, 255, 255)
START_COLOUR = (0, 210, 255)
END_COLOUR = (255, 40, 40)
VALLEY_COLOUR = (255, 165, 0)
MARKER_OUTLINE = (0, 0, 0)
BACKGROUND = (255, 255, 255)
TEXT_COLOUR = (20, 20, 20)

# Eleven evenly spaced stops of matplotlib's viridis, interpolated linearly.
_VIRIDIS_STOPS = np.array(
    [
        (68, 1, 84),
        (72, 36, 117),
        (65, 68, 135),
        (53, 95, 141),
        (42, 120, 142),
        (33, 145, 140),
        (34, 168, 132),
        (68, 191, 112),
        (122, 209, 81),
        (189, 223, 38),
        (253, 231, 37),
    ],
    dtype=np.float64,
)

_MARGIN_LEFT, _MARGIN_RIGHT, _MARGIN_TOP, _MARGIN_BOTTOM = 62, 78, 52, 42
_MARKER_RADIUS = 5


def sigmoid(z: np.ndarray | float) -> np.ndarray:
    """The logistic function, without overflow warnings for large ``|z|``."""
    return 0.5 * (1.0 + np.tanh(0.5 * np.asarray(z, dtype=np.float64)))


def neuron_error(
    w: np.ndarray | float, b: np.ndarray | float, x: float, target: float
) -> np.ndarray:
    """``E = 1/2 (sigmoid(w * x + b) - target)^2``, elementwise over ``w`` and ``b``."""
    output = sigmoid(np.asarray(w, dtype=np.float64) * x + np.asarray(b, dtype=np.float64))
    return 0.5 * (output - target) ** 2


def error_surface(
    x: float,
    target: float,
    w_range: tuple[float, float],
    b_range: tuple[float, float],
    resolution: int | tuple[int, int],
) -> np.ndarray:
    """The error ``E(w, b)`` on a regular grid, as a ``(n_b, n_w)`` array.

    ``surface[i, j]`` is the error at ``w = np.linspace(*w_range, n_w)[j]`` and
    ``b = np.linspace(*b_range, n_b)[i]``: rows follow ``b``, columns follow ``w``, as
    ``np.meshgrid`` lays them out (row 0 is the first ``b``, so flip it to draw ``b``
    upwards).

    Args:
        x: the neuron's input.
        target: the output it should give.
        w_range: the first and last weight of the grid.
        b_range: the first and last bias of the grid.
        resolution: grid points per axis, or ``(n_w, n_b)``.

    Example:
        >>> surface = error_surface(1.0, 0.5, (-1.0, 1.0), (-1.0, 1.0), 3)
        >>> surface.shape, float(surface[1, 1])  # w = 0, b = 0: sigmoid(0) = 0.5
        ((3, 3), 0.0)
    """
    n_w, n_b = (resolution, resolution) if isinstance(resolution, int) else resolution
    if n_w < 1 or n_b < 1:
        raise ValueError(f"error_surface: resolution must be at least 1, got {resolution!r}.")
    weights, biases = np.meshgrid(np.linspace(*w_range, n_w), np.linspace(*b_range, n_b))
    return neuron_error(weights, biases, x, target)


@dataclass(frozen=True)
class SurfacePlot:
    """Where ``draw_error_surface`` put things: the file, the window and the plot box."""

    path: Path
    w_range: tuple[float, float]
    b_range: tuple[float, float]
    plot_box: tuple[int, int, int, int]
    """``(left, top, right, bottom)`` in pixels; right and bottom are exclusive."""

    def pixel(self, w: float, b: float) -> tuple[int, int]:
        """The image pixel ``(column, row)`` that shows the point ``(w, b)``."""
        column, row = self._local(w, b)
        left, top, _, _ = self.plot_box
        return left + round(column), top + round(row)

    def _local(self, w: float, b: float) -> tuple[float, float]:
        """``(w, b)`` in pixel coordinates relative to the plot box's top left corner."""
        left, top, right, bottom = self.plot_box
        (w_low, w_high), (b_low, b_high) = self.w_range, self.b_range
        column = (w - w_low) / (w_high - w_low) * (right - left - 1)
        row = (b_high - b) / (b_high - b_low) * (bottom - top - 1)
        return column, row


def draw_error_surface(
    path: Path,
    x: float,
    target: float,
    descent_path: Sequence[tuple[float, float]],
    size: tuple[int, int] = (640, 480),
) -> SurfacePlot:
    """Write a PNG heat map of ``E(w, b)`` with the descent path on it.

    The window holds the whole path with a margin. The picture shows the surface in a
    viridis-like colour ramp (dark is low error) with a colour bar, the path as a white
    polyline from a cyan start marker to a red end marker, the zero-error valley
    ``w * x + b = logit(target)`` as a thin dashed orange line (when ``0 < target < 1``;
    otherwise the sigmoid never reaches the target and there is no valley), ticks on
    both axes and a title.

    Args:
        path: the PNG file to write; missing folders are created.
        x: the neuron's input.
        target: the output it should give.
        descent_path: the ``(w, b)`` points that gradient descent visited, in order.
        size: ``(width, height)`` of the image in pixels.

    Returns:
        A ``SurfacePlot`` that maps ``(w, b)`` to pixels of the image.

    Example:
        >>> steps = [(0.0, 0.0), (0.1, 0.4), (0.15, 0.8), (0.2, 1.0)]
        >>> plot = draw_error_surface(Path("surface.png"), -0.23, 0.74, steps)  # doctest: +SKIP
    """
    points = np.asarray(descent_path, dtype=np.float64).reshape(-1, 2)
    if len(points) == 0 or not np.isfinite(points).all():
        raise ValueError("draw_error_surface: descent_path needs at least one finite (w, b) point.")
    width, height = size
    if width < _MARGIN_LEFT + _MARGIN_RIGHT + 100 or height < _MARGIN_TOP + _MARGIN_BOTTOM + 86:
        raise ValueError(f"draw_error_surface: size {size} is too small; use at least (240, 180).")

    plot = SurfacePlot(
        path=Path(path),
        w_range=_window(points[:, 0]),
        b_range=_window(points[:, 1]),
        plot_box=(_MARGIN_LEFT, _MARGIN_TOP, width - _MARGIN_RIGHT, height - _MARGIN_BOTTOM),
    )
    left, top, right, bottom = plot.plot_box
    surface = error_surface(x, target, plot.w_range, plot.b_range, (right - left, bottom - top))
    low, high = float(surface.min()), float(surface.max())
    shades = (surface - low) / (high - low) if high > low else np.zeros_like(surface)
    heat_map = Image.fromarray(_colour_ramp(np.flipud(shades)))

    draw = ImageDraw.Draw(heat_map)  # plot-local coordinates: Pillow clips at the edges
    if 0.0 < target < 1.0:
        valley_bias = math.log(target / (1.0 - target))
        ends = [plot._local(w, valley_bias - x * w) for w in plot.w_range]
        _dashed_line(draw, ends[0], ends[1], VALLEY_COLOUR)
    pixels = [plot._local(w, b) for w, b in points]
    if len(pixels) > 1:
        draw.line(_thin_out(pixels), fill=PATH_COLOUR, width=2, joint="curve")
    for (column, row), colour in ((pixels[0], START_COLOUR), (pixels[-1], END_COLOUR)):
        column, row = round(column), round(row)
        box = (column - _MARKER_RADIUS, row - _MARKER_RADIUS)
        box += (column + _MARKER_RADIUS, row + _MARKER_RADIUS)
        draw.ellipse(box, fill=colour, outline=MARKER_OUTLINE)

    image = Image.new("RGB", (width, height), BACKGROUND)
    image.paste(heat_map, (left, top))
    canvas = ImageDraw.Draw(image)
    font = _font(12)
    canvas.rectangle((left - 1, top - 1, right, bottom), outline=TEXT_COLOUR)
    _axes(canvas, plot, font)
    _colour_bar(image, canvas, plot, low, high, font)
    _title(canvas, width, x, target, len(points), font)
    plot.path.parent.mkdir(parents=True, exist_ok=True)
    image.save(plot.path, format="PNG")
    return plot


def _window(values: np.ndarray) -> tuple[float, float]:
    """A range that holds all ``values`` with a margin: 15% of its span on each side."""
    low, high = float(values.min()), float(values.max())
    span = max(high - low, 1.0)  # a path that hardly moved still gets a readable window
    centre = (low + high) / 2
    half = span / 2 + 0.15 * span
    return centre - half, centre + half


def _thin_out(pixels: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """Drop points within 1.5 pixels of the previous kept one; keep the last point.

    Descent takes thousands of sub-pixel steps near the valley, and Pillow draws a wide
    polyline of such tiny segments with gaps.
    """
    kept = [pixels[0]]
    for point in pixels[1:-1]:
        if math.dist(point, kept[-1]) >= 1.5:
            kept.append(point)
    return [*kept, pixels[-1]]


def _colour_ramp(shades: np.ndarray) -> np.ndarray:
    """Map values in ``[0, 1]`` to ``uint8`` RGB along the viridis stops."""
    positions = np.clip(shades, 0.0, 1.0) * (len(_VIRIDIS_STOPS) - 1)
    lower = np.minimum(positions.astype(np.int64), len(_VIRIDIS_STOPS) - 2)
    fraction = (positions - lower)[..., None]
    colours = (1 - fraction) * _VIRIDIS_STOPS[lower] + fraction * _VIRIDIS_STOPS[lower + 1]
    return colours.round().astype(np.uint8)


def _dashed_line(
    draw: ImageDraw.ImageDraw,
    start: tuple[float, float],
    end: tuple[float, float],
    colour: tuple[int, int, int],
    dash: float = 6.0,
    gap: float = 4.0,
) -> None:
    """A dashed line, clipped to the image that ``draw`` paints on."""
    clipped = _clip_segment(start, end, draw.im.size)
    if clipped is None:
        return
    start, end = clipped
    length = math.dist(start, end)
    distance = 0.0
    while distance < length:
        dash_end = min(distance + dash, length)
        head = _along(start, end, distance / length)
        tail = _along(start, end, dash_end / length)
        draw.line((head, tail), fill=colour, width=1)
        distance = dash_end + gap


def _along(start: tuple[float, float], end: tuple[float, float], t: float) -> tuple[float, float]:
    return start[0] + (end[0] - start[0]) * t, start[1] + (end[1] - start[1]) * t


def _clip_segment(
    start: tuple[float, float], end: tuple[float, float], size: tuple[int, int]
) -> tuple[tuple[float, float], tuple[float, float]] | None:
    """The part of a segment inside ``[0, width - 1] x [0, height - 1]`` (Liang-Barsky).

    A steep valley line can run far outside the plot; dashing only the visible part
    keeps the number of dashes bounded by the plot's size.
    """
    t_low, t_high = 0.0, 1.0
    delta = (end[0] - start[0], end[1] - start[1])
    for axis in (0, 1):
        for bound, sign in ((0.0, -1.0), (size[axis] - 1.0, 1.0)):
            # the constraint is sign * (start + t * delta - bound) <= 0
            slope, offset = sign * delta[axis], sign * (start[axis] - bound)
            if slope == 0:
                if offset > 0:
                    return None
            elif slope > 0:
                t_high = min(t_high, -offset / slope)
            else:
                t_low = max(t_low, -offset / slope)
    if t_low >= t_high:
        return None
    return _along(start, end, t_low), _along(start, end, t_high)


def _nice_ticks(low: float, high: float, most: int = 7) -> list[float]:
    """Round tick values (1, 2, 2.5 or 5 times a power of ten) within ``[low, high]``."""
    rough = (high - low) / most
    power = 10 ** math.floor(math.log10(rough))
    step = next(power * factor for factor in (1, 2, 2.5, 5, 10) if power * factor >= rough)
    first = math.ceil(low / step)
    return [tick * step for tick in range(first, math.floor(high / step) + 1)]


def _tick_label(value: float, ticks: list[float]) -> str:
    step = ticks[1] - ticks[0] if len(ticks) > 1 else 1.0
    decimals = max(0, -math.floor(math.log10(step)))
    if round(step, decimals) != round(step, decimals + 3):  # 2.5, 0.25, ...
        decimals += 1
    text = f"{value:.{decimals}f}"
    return "0" if float(text) == 0 else text


def _axes(canvas: ImageDraw.ImageDraw, plot: SurfacePlot, font: ImageFont.ImageFont) -> None:
    left, top, right, bottom = plot.plot_box
    w_ticks = _nice_ticks(*plot.w_range)
    for w in w_ticks:
        column, _ = plot.pixel(w, plot.b_range[0])
        canvas.line(((column, bottom), (column, bottom + 4)), fill=TEXT_COLOUR)
        canvas.text(
            (column, bottom + 6), _tick_label(w, w_ticks), fill=TEXT_COLOUR, font=font, anchor="mt"
        )
    b_ticks = _nice_ticks(*plot.b_range)
    for b in b_ticks:
        _, row = plot.pixel(plot.w_range[0], b)
        canvas.line(((left - 5, row), (left - 1, row)), fill=TEXT_COLOUR)
        canvas.text(
            (left - 7, row), _tick_label(b, b_ticks), fill=TEXT_COLOUR, font=font, anchor="rm"
        )
    canvas.text(
        ((left + right) / 2, bottom + 24), "w (weight)", fill=TEXT_COLOUR, font=font, anchor="mt"
    )
    canvas.text((8, top - 16), "b (bias)", fill=TEXT_COLOUR, font=font, anchor="lt")


def _colour_bar(
    image: Image.Image,
    canvas: ImageDraw.ImageDraw,
    plot: SurfacePlot,
    low: float,
    high: float,
    font: ImageFont.ImageFont,
) -> None:
    _, top, right, bottom = plot.plot_box
    bar_left, bar_width = right + 14, 12
    ramp = np.linspace(1.0, 0.0, bottom - top)[:, None].repeat(bar_width, axis=1)
    image.paste(Image.fromarray(_colour_ramp(ramp)), (bar_left, top))
    canvas.rectangle((bar_left - 1, top - 1, bar_left + bar_width, bottom), outline=TEXT_COLOUR)
    canvas.text((bar_left, top - 16), "E", fill=TEXT_COLOUR, font=font, anchor="lt")
    # Both ends with the same decimals, three significant digits for the top one.
    decimals = min(6, max(0, 2 - math.floor(math.log10(high)))) if high > 0 else 3
    for value, row in ((high, top), (low, bottom - 1)):
        canvas.text(
            (bar_left + bar_width + 4, row),
            f"{value:.{decimals}f}",
            fill=TEXT_COLOUR,
            font=font,
            anchor="lm",
        )


def _title(
    canvas: ImageDraw.ImageDraw,
    width: int,
    x: float,
    target: float,
    steps: int,
    font: ImageFont.ImageFont,
) -> None:
    """The title and a legend, each in its long form when it fits the width, else short."""
    titles = (
        f"Error surface E(w, b) = 1/2 (sigmoid(w*x + b) - t)^2,  x = {x:g},  t = {target:g}",
        f"E(w, b),  x = {x:g},  t = {target:g}",
    )
    title = next(
        (text for text in titles if canvas.textlength(text, font=font) <= width - 8), titles[-1]
    )
    canvas.text((width / 2, 6), title, fill=TEXT_COLOUR, font=font, anchor="mt")

    has_valley = 0.0 < target < 1.0
    for path_label, valley_label in (
        (f"descent path ({steps} points)", "E = 0 valley"),
        ("path", "E = 0"),
    ):
        labels = ["start", "end", path_label] + ([valley_label] if has_valley else [])
        # each entry is a 22-pixel sample of the element, its label, and a 12-pixel gap
        legend_width = sum(34 + canvas.textlength(label, font=font) for label in labels)
        if legend_width <= width - 8:
            break
    column, row = max(4.0, (width - legend_width) / 2), 28
    for label in labels:
        if label in ("start", "end"):
            colour = START_COLOUR if label == "start" else END_COLOUR
            box = (column + 5, row - 5, column + 15, row + 5)
            canvas.ellipse(box, fill=colour, outline=MARKER_OUTLINE)
        elif label == path_label:
            canvas.line(((column, row), (column + 18, row)), fill=(120, 120, 120), width=4)
            canvas.line(((column, row), (column + 18, row)), fill=PATH_COLOUR, width=2)
        else:
            canvas.line(((column, row), (column + 6, row)), fill=VALLEY_COLOUR)
            canvas.line(((column + 10, row), (column + 16, row)), fill=VALLEY_COLOUR)
        canvas.text((column + 22, row), label, fill=TEXT_COLOUR, font=font, anchor="lm")
        column += 34 + canvas.textlength(label, font=font)


def _font(size: int) -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1 has only the fixed bitmap font
        return ImageFont.load_default()
