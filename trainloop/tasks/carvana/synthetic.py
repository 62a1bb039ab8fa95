"""A synthetic Carvana data set, written in the exact Kaggle layout.

The real data needs a Kaggle account and 25 GB; this generator writes a small data set of
the same shape in seconds, so that the recipe, the tests and the benchmarks run anywhere:
16 views per car id, JPEG photos in ``train/`` and ``test/``, palette GIF masks (0
background, 1 car) in ``train_masks/``, and ``train_masks.csv``, ``metadata.csv`` and
``sample_submission.csv``.

Each car is a small 3-D model (a lower body, a cabin with windows, four wheels and lights)
turned on a turntable: view ``NN`` looks at it from ``(NN - 1) * 22.5`` degrees, view 01
from the front, as Carvana's photo studio does. Its convex parts are projected and drawn
with Pillow polygons and ellipses on a studio background (wall and floor gradients, a
floor line, a soft shadow) with camera noise. The mask is drawn with the very same
shapes, so it matches the photo pixel for pixel. Everything is deterministic by seed.
"""

from __future__ import annotations

import csv
import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from trainloop.errors import UsageError
from trainloop.tasks.carvana.files import Layout, has_carvana_files
from trainloop.tasks.carvana.rle import rle_encode

__all__ = ["SyntheticCar", "ensure_data", "generate_dataset", "render_view"]

VIEWS = 16
MASK_PALETTE = [0, 0, 0, 255, 255, 255]

# Studio photos favour white, silver, grey and black cars, as the real data does.
CAR_COLOURS = [
    ((236, 236, 232), 5),
    ((170, 172, 176), 4),
    ((105, 108, 112), 3),
    ((25, 25, 28), 4),
    ((160, 20, 25), 2),
    ((25, 50, 130), 2),
    ((20, 30, 60), 1),
    ((30, 80, 45), 1),
    ((190, 175, 140), 1),
    ((230, 190, 20), 1),
]
MODELS = [
    ("Toyota", "Camry", "LE", "2.5L"),
    ("Honda", "Civic", "EX", "1.8L"),
    ("Ford", "Focus", "SE", "2.0L"),
    ("Chevrolet", "Malibu", "LT", "2.4L"),
    ("Nissan", "Altima", "S", "2.5L"),
    ("Hyundai", "Elantra", "GLS", "1.8L"),
    ("Kia", "Optima", "LX", "2.4L"),
    ("BMW", "3 Series", "328i", "Base"),
    ("Audi", "A4", "2.0T", "Premium"),
    ("Subaru", "Outback", "2.5i", "Limited"),
    ("Jeep", "Cherokee", "Latitude", "4WD"),
    ("Volkswagen", "Jetta", "TDI", "SportWagen"),
]


@dataclass(frozen=True)
class SyntheticCar:
    """The look of one synthetic car, the same in all its views (lengths in metres)."""

    car_id: str
    body_colour: tuple[int, int, int]
    length: float
    width: float
    clearance: float
    body_height: float
    roof_height: float
    cabin_back: float
    cabin_front: float
    roof_back: float
    roof_front: float
    wheel_radius: float
    wheel_base: float
    view_angles: tuple[float, ...]
    elevation: float
    fill: float
    shift: tuple[float, float]
    wall_colour: tuple[int, int, int]
    floor_colour: tuple[int, int, int]
    horizon_drop: float

    @classmethod
    def random(cls, car_id: str, rng: np.random.Generator) -> SyntheticCar:
        """Draw a car's shape, colour, pose and studio from ``rng``."""
        colours = [colour for colour, _ in CAR_COLOURS]
        weights = np.array([weight for _, weight in CAR_COLOURS], dtype=float)
        base = np.array(colours[rng.choice(len(colours), p=weights / weights.sum())])
        body_colour = tuple(int(c) for c in np.clip(base + rng.integers(-12, 13, 3), 0, 255))
        length = rng.uniform(4.0, 5.0)
        cabin_back = -length / 2 + rng.uniform(0.5, 0.9)
        cabin_front = length / 2 - rng.uniform(1.3, 1.8)
        wall_grey = rng.uniform(200, 245)
        floor_grey = wall_grey - rng.uniform(10, 45)
        tint = rng.uniform(-6, 6, 3)
        return cls(
            car_id=car_id,
            body_colour=body_colour,
            length=length,
            width=rng.uniform(1.7, 2.0),
            clearance=rng.uniform(0.15, 0.35),
            body_height=rng.uniform(0.85, 1.1),
            roof_height=rng.uniform(1.4, 1.8),
            cabin_back=cabin_back,
            cabin_front=cabin_front,
            roof_back=cabin_back + rng.uniform(0.2, 0.5),
            roof_front=cabin_front - rng.uniform(0.6, 0.9),
            wheel_radius=rng.uniform(0.3, 0.38),
            wheel_base=length * rng.uniform(0.55, 0.62),
            view_angles=tuple(
                math.radians(view * 22.5 + rng.uniform(-2.0, 2.0)) for view in range(VIEWS)
            ),
            elevation=math.radians(rng.uniform(6, 14)),
            fill=rng.uniform(0.75, 0.92),
            shift=(rng.uniform(0.35, 0.65), rng.uniform(0.5, 0.85)),
            wall_colour=tuple(int(c) for c in np.clip(wall_grey + tint, 0, 255)),
            floor_colour=tuple(int(c) for c in np.clip(floor_grey + tint, 0, 255)),
            horizon_drop=rng.uniform(0.1, 0.25),
        )

    def body_points(self) -> np.ndarray:
        """The lower body: a convex side profile extruded across the car's width."""
        back, front = -self.length / 2, self.length / 2
        bottom, top = self.clearance, self.body_height
        profile = [
            (back, bottom + 0.08),
            (back + 0.2, bottom),
            (front - 0.25, bottom),
            (front, bottom + 0.15),
            (front, top - 0.2),
            (front - 0.45, top),
            (back + 0.15, top),
            (back, top - 0.12),
        ]
        return _extrude(profile, self.width / 2)

    def cabin_points(self, inset: float = 0.0) -> np.ndarray:
        """The cabin, narrower at the roof; ``inset`` shrinks it to the windows' outline."""
        half_bottom = self.width / 2 - 0.08
        half_top = self.width / 2 - 0.3
        bottom = self.body_height + inset
        roof = self.roof_height - inset * 0.6
        corners = []
        for x_back, x_front, z, half in (
            (self.cabin_back + inset * 3, self.cabin_front - inset * 3, bottom, half_bottom),
            (self.roof_back + inset, self.roof_front - inset, roof, half_top),
        ):
            for x in (x_back, x_front):
                for y in (-half - inset * 0.1, half + inset * 0.1):
                    corners.append((x, y, z))
        return np.array(corners)

    def wheel_centres(self) -> np.ndarray:
        """The four wheel centres."""
        half_base = self.wheel_base / 2
        half_track = self.width / 2 - 0.05
        return np.array(
            [
                (x, y, self.wheel_radius)
                for x in (-half_base, half_base)
                for y in (-half_track, half_track)
            ]
        )


def _extrude(profile: list[tuple[float, float]], half_width: float) -> np.ndarray:
    return np.array([(x, y, z) for y in (-half_width, half_width) for x, z in profile])


def _rotate(points: np.ndarray, angle: float, elevation: float) -> tuple[np.ndarray, np.ndarray]:
    """Turn the car by ``angle`` and look down at ``elevation``.

    Returns screen coordinates in metres (x to the right, y down) and each point's depth
    (positive is further from the camera).
    """
    x, y, z = points[:, 0], points[:, 1], points[:, 2]
    # Angle 0 shows the front: the car's +x axis points at the camera.
    across = -x * math.sin(angle) - y * math.cos(angle)
    depth = -x * math.cos(angle) + y * math.sin(angle)
    up = z * math.cos(elevation) + depth * math.sin(elevation)
    return np.stack([across, -up], axis=1), depth


def _convex_hull(points: np.ndarray) -> list[tuple[float, float]]:
    """Andrew's monotone chain: the hull of a few dozen 2-D points, counter-clockwise."""
    ordered = sorted(map(tuple, points.tolist()))

    def half(sequence: list[tuple[float, float]]) -> list[tuple[float, float]]:
        chain: list[tuple[float, float]] = []
        for point in sequence:
            while len(chain) >= 2:
                (x1, y1), (x2, y2) = chain[-2], chain[-1]
                if (x2 - x1) * (point[1] - y1) - (y2 - y1) * (point[0] - x1) > 0:
                    break
                chain.pop()
            chain.append(point)
        return chain

    lower, upper = half(ordered), half(ordered[::-1])
    return lower[:-1] + upper[:-1]


def _shade(colour: tuple[int, int, int], factor: float) -> tuple[int, int, int]:
    return tuple(int(min(255, max(0, c * factor))) for c in colour)


def _studio_background(
    car: SyntheticCar, size: tuple[int, int], horizon: float, rng: np.random.Generator
) -> np.ndarray:
    """Wall above the floor line and floor below it, each a vertical gradient."""
    width, height = size
    rows = np.arange(height, dtype=np.float32)[:, None]
    wall = np.array(car.wall_colour, dtype=np.float32)
    floor = np.array(car.floor_colour, dtype=np.float32)
    wall_part = wall + (rows / max(horizon, 1.0)) * -12.0
    floor_part = floor + (rows - horizon) / max(height - horizon, 1.0) * 25.0
    column = np.where(rows < horizon, wall_part, floor_part)
    column[np.abs(rows[:, 0] - horizon) < max(1.0, height / 300)] *= 0.85
    # A faint left-right light falloff, as under studio lamps.
    columns = np.linspace(-1.0, 1.0, width, dtype=np.float32)
    falloff = 1.0 - 0.04 * columns**2 + rng.uniform(-0.01, 0.01)
    return column[:, None, :] * falloff[None, :, None]


def _shadow(footprint: list[tuple[float, float]], size: tuple[int, int]) -> np.ndarray:
    """A soft shadow under the car, blurred at a quarter of the resolution for speed."""
    width, height = size
    factor = 4
    small = Image.new("L", (max(1, width // factor), max(1, height // factor)), 0)
    ImageDraw.Draw(small).polygon([(x / factor, y / factor) for x, y in footprint], fill=255)
    small = small.filter(ImageFilter.GaussianBlur(radius=max(1.0, width / factor / 60)))
    return np.asarray(small.resize(size, Image.Resampling.BILINEAR), dtype=np.float32) / 255.0


def render_view(
    car: SyntheticCar, view: int, size: tuple[int, int], rng: np.random.Generator
) -> tuple[Image.Image, np.ndarray]:
    """Draw view ``view`` (1..16) of ``car`` at ``size`` = ``(width, height)``.

    Returns the RGB photo and its mask, a ``(height, width)`` uint8 array of 0 and 1.
    ``rng`` draws the camera noise.
    """
    width, height = size
    angle = car.view_angles[view - 1]
    parts = {
        "body": car.body_points(),
        "cabin": car.cabin_points(),
        "windows": car.cabin_points(inset=0.07),
    }
    # One scale and position for all views of the car, so that every view fits the frame.
    all_points = np.concatenate([*parts.values(), car.wheel_centres()])
    extents = np.array(
        [_rotate(all_points, view_angle, car.elevation)[0] for view_angle in car.view_angles]
    )
    low = extents.min(axis=(0, 1)) - car.wheel_radius
    high = extents.max(axis=(0, 1)) + car.wheel_radius
    scale = car.fill * min(width / (high[0] - low[0]), height / (high[1] - low[1]))
    slack = np.array(size) - scale * (high - low)
    origin = slack * np.array(car.shift) - scale * low

    def to_pixels(points: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        screen, depth = _rotate(points, angle, car.elevation)
        return screen * scale + origin, depth

    ground_y = origin[1]
    horizon = ground_y - car.horizon_drop * height
    background = _studio_background(car, size, horizon, rng)
    footprint_corners = _extrude(
        [(-car.length * 0.55, 0.0), (car.length * 0.55, 0.0)], car.width * 0.6
    )
    footprint = _convex_hull(to_pixels(footprint_corners)[0])
    background *= (1.0 - 0.55 * _shadow(footprint, size))[:, :, None]
    image = Image.fromarray(np.clip(background, 0, 255).astype(np.uint8))
    mask = Image.new("L", size, 0)
    image_draw, mask_draw = ImageDraw.Draw(image), ImageDraw.Draw(mask)

    def polygon(points: list[tuple[float, float]], colour: tuple[int, int, int]) -> None:
        image_draw.polygon(points, fill=colour)
        mask_draw.polygon(points, fill=1)

    def ellipse(
        centre: np.ndarray, radii: tuple[float, float], colour: tuple[int, int, int]
    ) -> None:
        box = [
            centre[0] - radii[0],
            centre[1] - radii[1],
            centre[0] + radii[0],
            centre[1] + radii[1],
        ]
        image_draw.ellipse(box, fill=colour)
        mask_draw.ellipse(box, fill=1)

    wheel_pixels, wheel_depths = to_pixels(car.wheel_centres())
    facing_side = abs(math.sin(angle))
    wheel_radii = (
        scale * (car.wheel_radius * facing_side + 0.11 * abs(math.cos(angle))),
        scale * car.wheel_radius * math.cos(car.elevation),
    )
    tyre, hub = (28, 28, 30), (165, 168, 172)
    centre_depth = 0.0
    for centre, depth in zip(wheel_pixels, wheel_depths, strict=True):
        if depth > centre_depth:  # the far wheels peek out under the body
            ellipse(centre, wheel_radii, tyre)

    body_pixels, body_depths = to_pixels(parts["body"])
    polygon(_convex_hull(body_pixels), car.body_colour)
    # The side facing the camera, a little darker than the top and the ends.
    half = len(body_pixels) // 2
    near_side = (
        body_pixels[:half]
        if body_depths[:half].mean() < body_depths[half:].mean()
        else body_pixels[half:]
    )
    if facing_side > 0.2:
        polygon([tuple(point) for point in near_side], _shade(car.body_colour, 0.82))
    polygon(_convex_hull(to_pixels(parts["cabin"])[0]), _shade(car.body_colour, 0.95))
    polygon(_convex_hull(to_pixels(parts["windows"])[0]), (35, 42, 52))
    if facing_side > 0.5:
        # The middle pillar splits the side windows.
        middle = (car.cabin_back + car.cabin_front + car.roof_back + car.roof_front) / 4
        near = 1.0 if math.sin(angle) < 0 else -1.0
        bottom_y, top_y = near * (car.width / 2 - 0.08), near * (car.width / 2 - 0.3)
        pillar = to_pixels(
            np.array(
                [
                    (middle - 0.06, bottom_y, car.body_height),
                    (middle + 0.06, bottom_y, car.body_height),
                    (middle + 0.06, top_y, car.roof_height),
                    (middle - 0.06, top_y, car.roof_height),
                ]
            )
        )[0]
        polygon([tuple(point) for point in pillar], _shade(car.body_colour, 0.9))

    lights_y = car.width / 2 - 0.25
    lights_z = car.body_height - 0.25
    for end, colour in ((car.length / 2, (250, 245, 215)), (-car.length / 2, (200, 20, 20))):
        lights, depths = to_pixels(
            np.array([(end, -lights_y, lights_z), (end, lights_y, lights_z)])
        )
        if depths.mean() < 0 and abs(math.cos(angle)) > 0.3:
            for light in lights:
                ellipse(light, (scale * 0.12 * abs(math.cos(angle)) + 1, scale * 0.07 + 1), colour)

    for centre, depth in zip(wheel_pixels, wheel_depths, strict=True):
        if depth <= centre_depth:
            ellipse(centre, wheel_radii, tyre)
            if facing_side > 0.3:
                ellipse(centre, (wheel_radii[0] * 0.55, wheel_radii[1] * 0.55), hub)

    pixels = np.asarray(image, dtype=np.float32)
    pixels = pixels + rng.standard_normal(pixels.shape, dtype=np.float32) * 3.0
    photo = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
    return photo, np.asarray(mask, dtype=np.uint8)


def _save_mask_gif(mask: np.ndarray, path: Path) -> None:
    image = Image.fromarray(mask)
    image.putpalette(MASK_PALETTE)  # an "L" image becomes palette mode "P", as on Kaggle
    image.save(path, format="GIF")


def generate_dataset(
    input_dir: str | os.PathLike,
    n_train_cars: int = 24,
    n_test_cars: int = 4,
    size: tuple[int, int] = (480, 320),
    seed: int = 0,
    jpeg_quality: int = 90,
) -> Layout:
    """Write a synthetic Carvana data set in the Kaggle layout into ``input_dir``.

    ``size`` is ``(width, height)`` of every photo (the real ones are 1918x1280); each
    car gets 16 views. The same arguments always write the same files. Refuses a folder
    that already holds Carvana data. Returns the layout written.
    """
    input_dir = Path(input_dir)
    if has_carvana_files(input_dir):
        raise UsageError(
            f"{input_dir} already holds Carvana data: generate into an empty folder or delete it"
        )
    width, height = size
    if width < 16 or height < 16:
        raise UsageError(f"synthetic image size {width}x{height} is too small: use at least 16x16")
    if n_train_cars < 1 or n_test_cars < 0:
        raise UsageError(
            f"cannot generate {n_train_cars} training and {n_test_cars} test cars: "
            f"use at least one training car"
        )
    rng = np.random.default_rng(seed)
    car_ids: list[str] = []
    while len(car_ids) < n_train_cars + n_test_cars:
        car_id = rng.bytes(6).hex()
        if car_id not in car_ids:
            car_ids.append(car_id)
    cars = [SyntheticCar.random(car_id, rng) for car_id in car_ids]

    folders = {name: input_dir / name for name in ("train", "train_masks", "test")}
    for folder in folders.values():
        folder.mkdir(parents=True, exist_ok=True)
    mask_rows, train_ids, test_ids = [], [], []
    for car_index, car in enumerate(cars):
        is_train = car_index < n_train_cars
        for view in range(1, VIEWS + 1):
            image_id = f"{car.car_id}_{view:02d}"
            noise = np.random.default_rng([seed, car_index, view])
            photo, mask = render_view(car, view, size, noise)
            photo.save(
                folders["train" if is_train else "test"] / f"{image_id}.jpg", quality=jpeg_quality
            )
            if is_train:
                _save_mask_gif(mask, folders["train_masks"] / f"{image_id}_mask.gif")
                mask_rows.append((f"{image_id}.jpg", rle_encode(mask)))
                train_ids.append(image_id)
            else:
                test_ids.append(image_id)

    _write_csv(input_dir / "train_masks.csv", ("img", "rle_mask"), sorted(mask_rows))
    _write_csv(
        input_dir / "sample_submission.csv",
        ("img", "rle_mask"),
        [(f"{image_id}.jpg", "1 1") for image_id in sorted(test_ids)],
    )
    metadata = []
    for car in sorted(cars, key=lambda car: car.car_id):
        make, model, trim1, trim2 = MODELS[rng.integers(len(MODELS))]
        metadata.append((car.car_id, int(rng.integers(2001, 2018)), make, model, trim1, trim2))
    _write_csv(
        input_dir / "metadata.csv", ("id", "year", "make", "model", "trim1", "trim2"), metadata
    )
    return Layout(input_dir, sorted(train_ids), sorted(test_ids), [(width, height)])


def _write_csv(path: Path, header: tuple[str, ...], rows: list[tuple]) -> None:
    with open(path, "w", newline="") as file:
        writer = csv.writer(file)
        writer.writerow(header)
        writer.writerows(rows)


def ensure_data(input_dir: str | os.PathLike, **generate_options) -> bool:
    """Generate a synthetic data set in ``input_dir`` unless it already holds Carvana data.

    Carvana data means photos in ``train/`` or any of the Kaggle zip files. Returns whether
    it generated; ``generate_options`` go to ``generate_dataset``.
    """
    if has_carvana_files(input_dir):
        return False
    generate_dataset(input_dir, **generate_options)
    return True
