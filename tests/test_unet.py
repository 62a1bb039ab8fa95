import math

import pytest
import torch

from trainloop.tasks.carvana.losses import bce_dice_loss, dice, soft_dice_loss
from trainloop.tasks.carvana.unet import UNet

# Logits far enough from 0 that the sigmoid is 0 or 1 for practical purposes.
ON, OFF = 20.0, -20.0


@pytest.mark.parametrize(
    ("height", "width", "depth", "bilinear"),
    [
        (32, 32, 4, True),
        (48, 80, 4, True),
        (64, 96, 3, False),
        (16, 40, 2, True),
        (24, 8, 3, False),
    ],
)
def test_unet_outputs_logits_at_the_input_size(height, width, depth, bilinear):
    model = UNet(base_width=4, depth=depth, bilinear=bilinear)
    assert model(torch.randn(2, 3, height, width)).shape == (2, 1, height, width)


def test_unet_takes_other_channel_counts():
    model = UNet(in_channels=1, out_channels=3, base_width=4, depth=2)
    assert model(torch.randn(1, 1, 12, 20)).shape == (1, 3, 12, 20)


def test_unet_rejects_a_size_not_divisible_by_two_to_the_depth():
    with pytest.raises(ValueError, match=r"divisible by 16, got 40x24 \(width x height\)"):
        UNet(base_width=4, depth=4)(torch.randn(1, 3, 24, 40))


def test_unet_width_doubles_at_each_level():
    model = UNet(base_width=8, depth=3)
    assert [block[0].out_channels for block in model.down] == [16, 32, 64]


def mask_from_rows(*rows: str) -> torch.Tensor:
    """A (1, 1, H, W) 0/1 tensor from strings of '#' and '.'."""
    return torch.tensor([[[[float(char == "#") for char in row] for row in rows]]])


def logits_of(mask: torch.Tensor) -> torch.Tensor:
    return torch.where(mask > 0.5, ON, OFF)


def test_dice_of_a_perfect_prediction_is_one():
    target = mask_from_rows(".##.", ".##.")
    assert dice(logits_of(target), target).item() == 1.0


def test_dice_counts_overlap_over_both_areas():
    prediction = mask_from_rows("##..", "....")
    target = mask_from_rows(".##.", "....")
    # 2 * 1 shared pixel / (2 predicted + 2 true)
    assert dice(logits_of(prediction), target).item() == pytest.approx(0.5)


def test_dice_of_empty_truth_and_empty_prediction_is_one():
    empty = mask_from_rows("....", "....")
    assert dice(logits_of(empty), empty).item() == 1.0


def test_dice_of_a_prediction_on_empty_truth_is_zero():
    empty = mask_from_rows("....", "....")
    assert dice(logits_of(mask_from_rows("#...", "....")), empty).item() == 0.0


def test_dice_is_the_mean_over_the_images_of_the_batch():
    target = torch.cat([mask_from_rows(".##.", "...."), mask_from_rows("....", "....")])
    prediction = torch.cat([mask_from_rows("##..", "...."), mask_from_rows("....", "....")])
    # Image 1 scores 0.5, image 2 (both empty) scores 1: a pooled Dice would say 0.5.
    assert dice(logits_of(prediction), target).item() == pytest.approx(0.75)


def test_dice_thresholds_the_probabilities():
    target = mask_from_rows("##")
    logits = torch.tensor([[[[0.3, -0.3]]]])  # probabilities 0.574 and 0.426
    assert dice(logits, target).item() == pytest.approx(2 * 1 / (1 + 2))
    assert dice(logits, target, threshold=0.6).item() == 0.0


def test_bce_dice_loss_of_uncertain_logits_has_the_hand_computed_value():
    target = torch.ones(1, 1, 2, 2)
    logits = torch.zeros(1, 1, 2, 2)
    # BCE: ln 2. Soft Dice with p = 0.5: (2 * 2 + 1) / (2 + 4 + 1) = 5/7, loss 2/7.
    assert soft_dice_loss(logits, target).item() == pytest.approx(2 / 7)
    assert bce_dice_loss(logits, target).item() == pytest.approx(math.log(2) + 2 / 7)


def test_bce_dice_loss_is_near_zero_for_confident_right_logits():
    target = mask_from_rows(".##.", ".##.")
    assert bce_dice_loss(logits_of(target), target).item() < 0.01


def test_training_a_unet_on_one_sample_lowers_the_loss_and_raises_dice():
    torch.manual_seed(0)
    image = torch.rand(1, 3, 16, 16) * 0.2
    target = torch.zeros(1, 1, 16, 16)
    target[..., 4:12, 5:13] = 1.0
    image[:, 0] += target[:, 0] * 0.7  # a reddish square to find
    model = UNet(base_width=8, depth=2)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.02)
    before = dice(model(image), target).item()
    losses = []
    for _ in range(30):
        optimizer.zero_grad()
        loss = bce_dice_loss(model(image), target)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]
    # Still in training mode: BatchNorm's running statistics of one sample are not the point.
    assert before < 0.7 and dice(model(image), target).item() > 0.95
