"""U-Net (Ronneberger et al., 2015) for binary segmentation such as Carvana's car masks,
and the image sizes it takes."""

from __future__ import annotations

import torch
from torch import nn

from trainloop.errors import UsageError

__all__ = ["UNet", "check_size"]


class DoubleConv(nn.Sequential):
    """Two 3x3 convolutions, each followed by BatchNorm and ReLU; the size is kept."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__(
            nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1, bias=False),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(inplace=True),
            nn.Conv2d(out_channels, out_channels, kernel_size=3, padding=1, bias=False),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(inplace=True),
        )


class Up(nn.Module):
    """Double the size, join the encoder's skip connection, then a double convolution."""

    def __init__(
        self, in_channels: int, skip_channels: int, out_channels: int, bilinear: bool
    ) -> None:
        super().__init__()
        if bilinear:
            self.upsample: nn.Module = nn.Upsample(
                scale_factor=2, mode="bilinear", align_corners=False
            )
            upsampled_channels = in_channels
        else:
            self.upsample = nn.ConvTranspose2d(
                in_channels, in_channels // 2, kernel_size=2, stride=2
            )
            upsampled_channels = in_channels // 2
        self.conv = DoubleConv(upsampled_channels + skip_channels, out_channels)

    def forward(self, features: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        return self.conv(torch.cat([skip, self.upsample(features)], dim=1))


class UNet(nn.Module):
    """An encoder-decoder with skip connections that outputs per-pixel logits.

    ``depth`` halvings of the image: level ``i`` of the encoder has ``base_width * 2**i``
    channels. The input's height and width must both divide by ``2**depth``; the output
    has ``out_channels`` logits (apply a sigmoid for probabilities) at the input's size.
    ``bilinear=False`` upsamples with learned transposed convolutions instead.

    >>> UNet(depth=3)(torch.zeros(2, 3, 64, 96)).shape
    torch.Size([2, 1, 64, 96])
    """

    def __init__(
        self,
        in_channels: int = 3,
        out_channels: int = 1,
        base_width: int = 16,
        depth: int = 4,
        bilinear: bool = True,
    ) -> None:
        super().__init__()
        if depth < 1:
            raise ValueError(f"UNet depth must be at least 1, got {depth}")
        self.depth = depth
        widths = [base_width * 2**level for level in range(depth + 1)]
        self.stem = DoubleConv(in_channels, widths[0])
        self.pool = nn.MaxPool2d(2)
        self.down = nn.ModuleList(DoubleConv(widths[i], widths[i + 1]) for i in range(depth))
        self.up = nn.ModuleList(
            Up(widths[i + 1], widths[i], widths[i], bilinear) for i in reversed(range(depth))
        )
        self.head = nn.Conv2d(widths[0], out_channels, kernel_size=1)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        height, width = images.shape[-2:]
        step = 2**self.depth
        if height % step or width % step:
            raise ValueError(
                f"UNet of depth {self.depth} needs height and width divisible by {step}, "
                f"got {width}x{height} (width x height)"
            )
        features = self.stem(images)
        skips = []
        for block in self.down:
            skips.append(features)
            features = block(self.pool(features))
        for block, skip in zip(self.up, reversed(skips), strict=True):
            features = block(features, skip)
        return self.head(features)


def check_size(size: tuple[int, int], depth: int, name: str = "image size") -> None:
    """Raise ``UsageError`` unless both sides of ``size`` = ``(width, height)`` divide by 2**depth.

    A U-Net of ``depth`` halvings needs that. The message names the nearest valid sizes
    above and below, e.g. "image size 250x170 is not divisible by 2^4=16: use 256x176 or
    240x160".
    """
    width, height = size
    step = 2**depth
    if width % step == 0 and height % step == 0 and width > 0 and height > 0:
        return
    # Each side rounded up (to one step at least) and down to a multiple of the step.
    up = (max(step, -(-width // step) * step), max(step, -(-height // step) * step))
    down = (width // step * step, height // step * step)
    choices = f"{up[0]}x{up[1]}"
    if min(down) > 0 and down != up:
        choices += f" or {down[0]}x{down[1]}"
    if width <= 0 or height <= 0:
        raise UsageError(
            f"{name} {width}x{height}: each side must be a positive multiple of "
            f"2^{depth}={step}: use {choices} or larger"
        )
    raise UsageError(f"{name} {width}x{height} is not divisible by 2^{depth}={step}: use {choices}")
