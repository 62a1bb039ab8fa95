"""The docs' generated figures: each function draws one picture from real inputs.

``tests/test_docs_figures.py`` runs every function on the same inputs as the committed
picture (a run the docs execute, a model configuration, fixed numbers) and compares the
result with the PNG under ``docs/``; ``TRAINLOOP_UPDATE_FIGURES=1`` makes the tests
write the pictures instead, after a change that is meant to change them.

Pillow only (no plotting library to install): small, deterministic drawings.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont

BACKGROUND = (255, 255, 255)
INK = (30, 30, 30)
GRID = (225, 225, 225)
TRAIN = (33, 113, 181)  # blue
VALID = (230, 85, 13)  # orange
METRIC = (49, 163, 84)  # green
HIGHLIGHT = (255, 214, 102)
LEVEL_COLOURS = [(198, 219, 239), (158, 202, 225), (107, 174, 214), (66, 146, 198), (33, 113, 181)]


def font(size: int) -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1 has only the fixed bitmap font
        return ImageFont.load_default()


# --- loss curves ------------------------------------------------------------------------


def loss_curves(history: Sequence[dict[str, Any]], metric: str, title: str) -> Image.Image:
    """Two panels from a run's ``metrics.jsonl`` rows: the losses, and ``metric``, by epoch.

    Epochs are counted from 1, as the progress table prints them.
    """
    image = Image.new("RGB", (760, 300), BACKGROUND)
    canvas = ImageDraw.Draw(image)
    canvas.text((380, 14), title, fill=INK, font=font(16), anchor="mm")
    epochs = [row["epoch"] + 1 for row in history]
    losses = {
        name: [row[name] for row in history]
        for name in ("train_loss", "valid_loss")
        if name in history[0]
    }
    _plot(
        canvas,
        (60, 40, 360, 250),
        epochs,
        losses,
        "loss",
        {"train_loss": TRAIN, "valid_loss": VALID},
    )
    values = {metric: [row[metric] for row in history]}
    _plot(canvas, (440, 40, 740, 250), epochs, values, metric, {metric: METRIC}, None, None, False)
    return image


def _plot(
    canvas: ImageDraw.ImageDraw,
    box: tuple[int, int, int, int],
    epochs: list[int],
    series: dict[str, list[float]],
    label: str,
    colours: dict[str, tuple[int, int, int]],
    low: float | None = None,
    high: float | None = None,
    legend_at_top: bool = True,
) -> None:
    left, top, right, bottom = box
    values = [value for line in series.values() for value in line]
    low = min(values) if low is None else low
    high = max(values) if high is None else high
    if high - low < 1e-12:
        high = low + 1
    margin = 0.05 * (high - low)
    low, high = low - margin, high + margin
    first, last = epochs[0], max(epochs[-1], epochs[0] + 1)

    def x(epoch: float) -> float:
        return left + (epoch - first) / (last - first) * (right - left)

    def y(value: float) -> float:
        return bottom - (value - low) / (high - low) * (bottom - top)

    small = font(11)
    for step in range(5):  # horizontal grid lines with their values
        value = low + margin + step * (high - low - 2 * margin) / 4
        canvas.line(((left, y(value)), (right, y(value))), fill=GRID)
        canvas.text((left - 6, y(value)), f"{value:.3g}", fill=INK, font=small, anchor="rm")
    tick = max(1, round((last - first) / 10))
    for epoch in range(first, last + 1, tick):
        canvas.line(((x(epoch), bottom), (x(epoch), bottom + 4)), fill=INK)
        canvas.text((x(epoch), bottom + 6), str(epoch), fill=INK, font=small, anchor="mt")
    canvas.rectangle(box, outline=INK)
    canvas.text(((left + right) / 2, bottom + 22), "epoch", fill=INK, font=small, anchor="mt")
    canvas.text((left, top - 4), label, fill=INK, font=small, anchor="ld")
    for row, (name, line) in enumerate(series.items()):
        points = [(x(epoch), y(value)) for epoch, value in zip(epochs, line)]
        canvas.line(points, fill=colours[name], width=2)
        for point in points:
            canvas.ellipse(
                (point[0] - 3, point[1] - 3, point[0] + 3, point[1] + 3), fill=colours[name]
            )
        legend_y = top + 12 + 16 * row if legend_at_top else bottom - 12 - 16 * row
        canvas.line(((right - 120, legend_y), (right - 100, legend_y)), fill=colours[name], width=2)
        canvas.text((right - 94, legend_y), name, fill=INK, font=small, anchor="lm")


# --- the Carvana samples, labelled --------------------------------------------------------


def labelled_columns(picture: Image.Image, labels: Sequence[str], gap: int = 2) -> Image.Image:
    """``picture`` (equal columns separated by ``gap`` white pixels) under a row of labels."""
    columns = len(labels)
    width = (picture.width - (columns - 1) * gap) / columns
    header = 26
    image = Image.new("RGB", (picture.width, picture.height + header), BACKGROUND)
    image.paste(picture.convert("RGB"), (0, header))
    canvas = ImageDraw.Draw(image)
    for column, label in enumerate(labels):
        centre = column * (width + gap) + width / 2
        canvas.text((centre, header / 2), label, fill=INK, font=font(14), anchor="mm")
    return image


# --- the U-Net ------------------------------------------------------------------------------


def unet_diagram(model: torch.nn.Module, size: tuple[int, int]) -> Image.Image:
    """A U-Net as boxes: the shapes are those of ``model``'s double convolutions on a
    ``size`` (width, height) input, recorded with forward hooks.

    Each box is a double convolution with its output channels and size; down arrows
    halve the size (max pooling), up arrows double it (bilinear upsampling or a
    transposed convolution, as the model does), and the horizontal arrows are the skip
    connections, concatenated into the decoder.
    """
    from trainloop.tasks.carvana.unet import DoubleConv

    shapes: list[tuple[int, int, int]] = []
    hooks = [
        module.register_forward_hook(lambda _, __, out: shapes.append(tuple(out.shape[1:])))
        for module in model.modules()
        if isinstance(module, DoubleConv)
    ]
    try:
        with torch.no_grad():
            model.eval()(torch.zeros(1, 3, size[1], size[0]))
    finally:
        for hook in hooks:
            hook.remove()
    depth = len(shapes) // 2
    upsampling = "bilinear up" if isinstance(model.up[0].upsample, torch.nn.Upsample) else "up-conv"
    box_width, box_height, step_x, step_y = 120, 44, 150, 70
    image = Image.new(
        "RGB", (2 * depth * step_x + box_width + 140, depth * step_y + box_height + 70), BACKGROUND
    )
    canvas = ImageDraw.Draw(image)
    label_font, small = font(13), font(11)

    def box(
        level: int, column: int, shape: tuple[int, int, int]
    ) -> tuple[float, float, float, float]:
        left, top = 30 + column * step_x, 40 + level * step_y
        colour = LEVEL_COLOURS[min(level, len(LEVEL_COLOURS) - 1)]
        canvas.rounded_rectangle(
            (left, top, left + box_width, top + box_height), 6, fill=colour, outline=INK
        )
        channels, height, width = shape
        text = f"{channels} ch\n{width}x{height}"
        canvas.text(
            (left + box_width / 2, top + box_height / 2), text, fill=INK, font=label_font,
            anchor="mm", align="center",
        )  # fmt: skip
        return left, top, left + box_width, top + box_height

    def arrow(start, end, colour=INK, text: str = "", above: bool = False) -> None:
        canvas.line((start, end), fill=colour, width=2)
        dx, dy = end[0] - start[0], end[1] - start[1]
        length = max((dx * dx + dy * dy) ** 0.5, 1e-9)
        ux, uy = dx / length, dy / length
        tip = [
            end,
            (end[0] - 9 * ux + 5 * uy, end[1] - 9 * uy - 5 * ux),
            (end[0] - 9 * ux - 5 * uy, end[1] - 9 * uy + 5 * ux),
        ]
        canvas.polygon(tip, fill=colour)
        if text:
            middle = ((start[0] + end[0]) / 2, (start[1] + end[1]) / 2)
            if above:
                canvas.text((middle[0], middle[1] - 4), text, fill=colour, font=small, anchor="md")
            else:
                canvas.text((middle[0] + 8, middle[1]), text, fill=colour, font=small, anchor="lm")

    channels_in = 3
    canvas.text(
        (30, 20),
        f"input: {channels_in} ch, {size[0]}x{size[1]}",
        fill=INK,
        font=label_font,
        anchor="lm",
    )
    encoder = [box(level, level, shapes[level]) for level in range(depth + 1)]
    decoder = {depth: encoder[depth]}
    for index, level in enumerate(range(depth - 1, -1, -1)):
        decoder[level] = box(level, 2 * depth - level, shapes[depth + 1 + index])

    def centre_y(rect):
        return (rect[1] + rect[3]) / 2

    for level in range(depth):
        above, below = encoder[level], encoder[level + 1]
        first = level == 0
        arrow(
            ((above[0] + above[2]) / 2, above[3]),
            (below[0] + 10, centre_y(below)),
            text="max pool" if first else "",
        )
        up_from, up_to = decoder[level + 1], decoder[level]
        arrow(
            (up_from[2] - 10, centre_y(up_from)),
            ((up_to[0] + up_to[2]) / 2, up_to[3]),
            VALID,
            upsampling if first else "",
        )
        arrow(
            (above[2], centre_y(above)),
            (decoder[level][0], centre_y(decoder[level])),
            TRAIN,
            "skip: concatenate" if first else "",
            above=True,
        )
    out = decoder[0]
    canvas.text(
        (out[2] + 10, centre_y(out)), "1x1 conv:\n1 ch of logits", fill=INK, font=small, anchor="lm"
    )
    return image


# --- convolution and pooling ------------------------------------------------------------------

CONV_INPUT = [
    [0, 0, 0, 0, 0, 0],
    [0, 0, 9, 9, 9, 0],
    [0, 0, 9, 9, 9, 0],
    [0, 0, 9, 9, 9, 0],
    [0, 0, 0, 0, 0, 0],
    [0, 0, 0, 0, 0, 0],
]
CONV_KERNEL = [[-1, 0, 1], [-1, 0, 1], [-1, 0, 1]]  # responds to dark-to-bright left edges


def convolution_and_pooling() -> tuple[Image.Image, torch.Tensor, torch.Tensor]:
    """A 6x6 input, a 3x3 kernel, the 4x4 feature map it gives and its 2x2 max pooling.

    Returns the picture, the feature map and the pooled map (computed with
    ``torch.nn.functional``, so the numbers are PyTorch's). The highlighted cells show
    one kernel window and the output it gives, and one pooling window and its maximum,
    whose receptive field is the 4x4 corner of the input.
    """
    inputs = torch.tensor(CONV_INPUT, dtype=torch.float32)[None, None]
    kernel = torch.tensor(CONV_KERNEL, dtype=torch.float32)[None, None]
    feature_map = F.conv2d(inputs, kernel)[0, 0]
    pooled = F.max_pool2d(feature_map[None, None], 2)[0, 0]
    cell = 34
    image = Image.new("RGB", (cell * 19 + 40, cell * 6 + 70), BACKGROUND)
    canvas = ImageDraw.Draw(image)
    number_font, title_font = font(14), font(14)

    def grid(
        left: int, values: torch.Tensor | list, title: str, highlight: set[tuple[int, int]]
    ) -> None:
        rows = [list(map(float, row)) for row in values]
        canvas.text((left, 18), title, fill=INK, font=title_font, anchor="lm")
        for r, row in enumerate(rows):
            for c, value in enumerate(row):
                box = (left + c * cell, 40 + r * cell, left + (c + 1) * cell, 40 + (r + 1) * cell)
                canvas.rectangle(
                    box, fill=HIGHLIGHT if (r, c) in highlight else BACKGROUND, outline=INK
                )
                canvas.text(
                    ((box[0] + box[2]) / 2, (box[1] + box[3]) / 2),
                    f"{value:g}",
                    fill=INK,
                    font=number_font,
                    anchor="mm",
                )

    receptive = {(r, c) for r in range(4) for c in range(4)}
    grid(20, CONV_INPUT, "input 6x6", receptive)
    grid(20 + cell * 7, CONV_KERNEL, "3x3 kernel", set())
    grid(20 + cell * 11, feature_map, "conv: 4x4", {(r, c) for r in range(2) for c in range(2)})
    grid(20 + cell * 16, pooled, "max pool: 2x2", {(0, 0)})
    canvas.text(
        (20, 40 + 6 * cell + 16),
        "highlighted: one 2x2 pooling window, its maximum, and the 4x4 input it sees (its receptive field)",
        fill=INK,
        font=font(12),
        anchor="lm",
    )
    return image, feature_map, pooled
