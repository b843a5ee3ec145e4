"""The shapes world: scenes of coloured shapes on black, and their anti-aliased renders.

A scene holds 1-4 objects. Each object is a shape (circle, square, triangle) in one of eight
well-separated palette colours, in one of three size buckets, placed by its bounding-box
centre (cx, cy), given as fractions of the image side so one scene renders at any
resolution. Every object's bounding box is a square of side `SIZES[size]`; the circle is
inscribed in it, the triangle points up with its base on the box's bottom edge.

Placement rules (what makes the judge in `mmgen/data/judge.py` exact on ground truth):
- boxes lie >= `MARGIN` inside the image and are >= `MIN_GAP` apart along x or along y
  (2 px at 32x32; objects never touch and never share a pixel);
- every pair's GenEval position scores (see `relative_position`) stay >= `REL_MARGIN` away
  from the 0.5 decision threshold, so "left of" etc. are never borderline.

Rendering: each object's coverage is drawn at `supersample` times the resolution and
box-averaged down (anti-aliasing), then the image is sum(coverage_i * colour_i) on black.
Because objects never share a pixel, every pixel is an exact blend alpha * colour of ONE
palette colour with the background, which the judge inverts.

The held-out split: `HELDOUT_COMBOS` (colour, shape) pairs never appear in split "train".
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (255, 0, 0),
    "green": (0, 255, 0),
    "blue": (0, 0, 255),
    "yellow": (255, 255, 0),
    "purple": (160, 0, 255),
    "orange": (255, 128, 0),
    "cyan": (0, 255, 255),
    "white": (255, 255, 255),
}
COLOURS: tuple[str, ...] = tuple(PALETTE)
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
SIZES: dict[str, float] = {"small": 0.22, "medium": 0.28, "large": 0.34}  # box side / image side
RELATIONS: tuple[str, ...] = ("left of", "right of", "above", "below")

# (colour, shape) pairs that never appear in split "train": the held-out combinations that test generalisation.
HELDOUT_COMBOS: frozenset[tuple[str, str]] = frozenset(
    {("purple", "triangle"), ("orange", "circle"), ("cyan", "square"), ("white", "triangle")}
)
TRAIN_COMBOS: tuple[tuple[str, str], ...] = tuple(
    (c, s) for c in COLOURS for s in SHAPES if (c, s) not in HELDOUT_COMBOS
)
SPLITS: tuple[str, ...] = ("train", "heldout_combos", "heldout_templates", "heldout")

GRID = 64  # centres are multiples of 1/GRID of the image side (JSON-exact, resolution-free)
MARGIN = 1 / 32  # box to image border (1 px at 32x32)
MIN_GAP = 2 / 32  # box to box, along x or y (2 px at 32x32)
POSITION_THRESHOLD = 0.1  # GenEval: offset shrunk by 0.1 x summed object sizes
REL_MARGIN = 0.08  # keep |score - 0.5| >= this for every pair (no borderline relations)
SUPERSAMPLE = 8


@dataclass(frozen=True)
class ShapeObject:
    shape: str
    colour: str
    size: str
    cx: float  # bounding-box centre, fraction of the image width (0 = left)
    cy: float  # bounding-box centre, fraction of the image height (0 = top)

    def __post_init__(self):
        if self.shape not in SHAPES:
            raise ValueError(f"unknown shape {self.shape!r}; expected one of {SHAPES}")
        if self.colour not in PALETTE:
            raise ValueError(f"unknown colour {self.colour!r}; expected one of {COLOURS}")
        if self.size not in SIZES:
            raise ValueError(f"unknown size {self.size!r}; expected one of {tuple(SIZES)}")

    @property
    def side(self) -> float:
        return SIZES[self.size]

    @property
    def box(self) -> tuple[float, float, float, float]:
        h = self.side / 2
        return (self.cx - h, self.cy - h, self.cx + h, self.cy + h)

    @property
    def centroid(self) -> tuple[float, float]:
        """Centre of mass (the triangle's lies side/6 below its box centre)."""
        return (self.cx, self.cy + (self.side / 6 if self.shape == "triangle" else 0.0))

    def to_dict(self) -> dict:
        return {"shape": self.shape, "colour": self.colour, "size": self.size, "cx": self.cx, "cy": self.cy}

    @classmethod
    def from_dict(cls, d: dict) -> ShapeObject:
        try:
            return cls(d["shape"], d["colour"], d["size"], float(d["cx"]), float(d["cy"]))
        except KeyError as e:
            raise ValueError(f"object dict {d!r} lacks key {e}") from None


@dataclass(frozen=True)
class Scene:
    objects: tuple[ShapeObject, ...]

    def to_dict(self) -> dict:
        return {"objects": [o.to_dict() for o in self.objects]}

    @classmethod
    def from_dict(cls, d: dict) -> Scene:
        if "objects" not in d:
            raise ValueError(f"scene dict lacks 'objects': {d!r}")
        return cls(tuple(ShapeObject.from_dict(o) for o in d["objects"]))

    def count(self, colour: str | None = None, shape: str | None = None) -> int:
        return sum(
            (colour is None or o.colour == colour) and (shape is None or o.shape == shape)
            for o in self.objects
        )


# --------------------------------------------------------------------------- geometry


def relative_position(center_a, dims_a, center_b, dims_b) -> set[str]:
    """Relations of A relative to B by GenEval's rule (Ghosh et al., NeurIPS 2023,
    `evaluation/evaluate_images.py::relative_position`), with centroids as centres:
    the offset is shrunk by 0.1 x (dims_a + dims_b) per axis, and a relation holds when
    the shrunk offset divided by the centre distance exceeds 0.5 along that axis.
    Image coordinates: y grows downward, so "above" means dy < -0.5."""
    scores = position_scores(center_a, dims_a, center_b, dims_b)
    if scores is None:
        return set()
    dx, dy = scores
    rel = set()
    if dx < -0.5:
        rel.add("left of")
    if dx > 0.5:
        rel.add("right of")
    if dy < -0.5:
        rel.add("above")
    if dy > 0.5:
        rel.add("below")
    return rel


def position_scores(center_a, dims_a, center_b, dims_b) -> tuple[float, float] | None:
    """GenEval's (dx, dy) = shrunk offset / centre distance; None when the shrunk offset is ~0."""
    # plain floats, not numpy: this runs ~50x per sampled scene
    ox, oy = center_a[0] - center_b[0], center_a[1] - center_b[1]
    rx = math.copysign(max(abs(ox) - POSITION_THRESHOLD * (dims_a[0] + dims_b[0]), 0.0), ox)
    ry = math.copysign(max(abs(oy) - POSITION_THRESHOLD * (dims_a[1] + dims_b[1]), 0.0), oy)
    norm = math.hypot(ox, oy)
    if norm == 0.0 or (abs(rx) < 1e-3 * max(1.0, norm) and abs(ry) < 1e-3 * max(1.0, norm)):
        return None
    return rx / norm, ry / norm


def object_relations(a: ShapeObject, b: ShapeObject) -> set[str]:
    """Relations of object a relative to object b in the scene's (resolution-free) units."""
    return relative_position(a.centroid, (a.side, a.side), b.centroid, (b.side, b.side))


def _pair_ok(a: ShapeObject, b: ShapeObject) -> bool:
    ax0, ay0, ax1, ay1 = a.box
    bx0, by0, bx1, by1 = b.box
    gap = max(bx0 - ax1, ax0 - bx1, by0 - ay1, ay0 - by1)
    if gap < MIN_GAP - 1e-9:
        return False
    scores = position_scores(a.centroid, (a.side,) * 2, b.centroid, (b.side,) * 2)
    if scores is None:
        return True
    return all(abs(abs(v) - 0.5) >= REL_MARGIN for v in scores)


def scene_is_well_formed(scene: Scene) -> bool:
    """Inside the margins, pairwise gaps, and no borderline relations (see module docstring)."""
    for o in scene.objects:
        x0, y0, x1, y1 = o.box
        if min(x0, y0) < MARGIN - 1e-9 or max(x1, y1) > 1 - MARGIN + 1e-9:
            return False
    objs = scene.objects
    return all(_pair_ok(objs[i], objs[j]) for i in range(len(objs)) for j in range(i + 1, len(objs)))


# --------------------------------------------------------------------------- sampling


def combos_for(split: str) -> tuple[tuple[str, str], ...]:
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
    if split in ("train", "heldout_templates"):
        return TRAIN_COMBOS
    return TRAIN_COMBOS + tuple(sorted(HELDOUT_COMBOS))


def _random_position(rng: random.Random, size: str) -> tuple[float, float]:
    half = SIZES[size] / 2
    lo = math.ceil((MARGIN + half) * GRID - 1e-9)
    hi = math.floor((1 - MARGIN - half) * GRID + 1e-9)
    return rng.randint(lo, hi) / GRID, rng.randint(lo, hi) / GRID


def place_object(
    rng: random.Random,
    scene: Scene,
    colour: str,
    shape: str,
    size: str | None = None,
    relation: str | None = None,
    ref: int | None = None,
    tries: int = 200,
) -> Scene | None:
    """Scene plus one new object at a random free position; with `relation`, the new object
    must stand in that relation to `scene.objects[ref]`. None when no position was found."""
    for _ in range(tries):
        sz = size or rng.choice(tuple(SIZES))
        cx, cy = _random_position(rng, sz)
        if relation is not None:  # mirror into the requested half-plane (halves the rejections)
            rx, ry = scene.objects[ref].cx, scene.objects[ref].cy
            if (relation == "left of" and cx > rx) or (relation == "right of" and cx < rx):
                cx = min(max(2 * rx - cx, 0.5 - abs(cx - 0.5)), 0.5 + abs(cx - 0.5))
            if (relation == "above" and cy > ry) or (relation == "below" and cy < ry):
                cy = min(max(2 * ry - cy, 0.5 - abs(cy - 0.5)), 0.5 + abs(cy - 0.5))
        new = ShapeObject(shape, colour, sz, cx, cy)
        if relation is not None and relation not in object_relations(new, scene.objects[ref]):
            continue
        if all(_pair_ok(new, o) for o in scene.objects):
            return Scene(scene.objects + (new,))
    return None


def sample_scene(
    rng: random.Random,
    num_objects: int | None = None,
    split: str = "train",
    combos: list[tuple[str, str]] | None = None,
    max_objects: int = 4,
) -> Scene:
    """A random well-formed scene. `num_objects` in 1..4 (random in 1..`max_objects` if None). Split "train" and
    "heldout_templates" use only train combos; "heldout_combos"/"heldout" scenes contain at
    least one held-out combo. `combos` fixes the objects' (colour, shape) explicitly."""
    allowed = combos_for(split)
    if combos is None:
        if not 1 <= max_objects <= 4:
            raise ValueError(f"max_objects must be in 1..4, got {max_objects}")
        n = num_objects if num_objects is not None else rng.randint(1, max_objects)
        if not 1 <= n <= 4:
            raise ValueError(f"num_objects must be in 1..4, got {n}")
        if n >= 2 and rng.random() < 0.3:  # counting scenes: n copies of one combo
            combos = [rng.choice(allowed)] * n
        else:
            combos = [rng.choice(allowed) for _ in range(n)]
        if split in ("heldout_combos", "heldout") and not any(c in HELDOUT_COMBOS for c in combos):
            combos[rng.randrange(n)] = rng.choice(sorted(HELDOUT_COMBOS))
    elif not 1 <= len(combos) <= 4:
        raise ValueError(f"a scene holds 1..4 objects, got {len(combos)}")
    for _ in range(100):  # restart when the canvas filled up badly
        scene = Scene(())
        for colour, shape in combos:
            scene = place_object(rng, scene, colour, shape)
            if scene is None:
                break
        if scene is not None:
            return scene
    raise RuntimeError(f"could not place objects {combos} (too many large objects?)")


# --------------------------------------------------------------------------- rendering


def shape_coverage(
    shape: str, cx: float, cy: float, side: float, width: int, height: int, supersample: int = SUPERSAMPLE
) -> np.ndarray:
    """Anti-aliased coverage in [0, 1], (height, width) float32, of a shape whose box centre
    is (cx, cy) and side `side`, all in pixels of the (width x height) canvas."""
    ss = supersample
    canvas = Image.new("L", (width * ss, height * ss), 0)
    draw = ImageDraw.Draw(canvas)
    x0, x1 = round((cx - side / 2) * ss), round((cx + side / 2) * ss)
    y0, y1 = round((cy - side / 2) * ss), round((cy + side / 2) * ss)
    if x1 > x0 and y1 > y0:
        if shape == "square":
            draw.rectangle([x0, y0, x1 - 1, y1 - 1], fill=255)
        elif shape == "circle":
            draw.ellipse([x0, y0, x1 - 1, y1 - 1], fill=255)
        elif shape == "triangle":
            draw.polygon([((x0 + x1 - 1) / 2, y0), (x1 - 1, y1 - 1), (x0, y1 - 1)], fill=255)
        else:
            raise ValueError(f"unknown shape {shape!r}")
    small = canvas.reduce(ss) if ss > 1 else canvas  # box average = exact area coverage
    return np.asarray(small, dtype=np.float32) / 255.0


def render(scene: Scene, resolution: int = 32, supersample: int = SUPERSAMPLE) -> Image.Image:
    """RGB PIL image (resolution x resolution) of the scene, anti-aliased on black."""
    if resolution < 8:
        raise ValueError(f"resolution must be >= 8 (32 and 64 are the judged ones), got {resolution}")
    rgb = np.zeros((resolution, resolution, 3), dtype=np.float32)
    for o in scene.objects:
        cov = shape_coverage(
            o.shape,
            o.cx * resolution,
            o.cy * resolution,
            o.side * resolution,
            resolution,
            resolution,
            supersample,
        )
        rgb += cov[..., None] * np.asarray(PALETTE[o.colour], dtype=np.float32)
    return Image.fromarray(np.clip(np.rint(rgb), 0, 255).astype(np.uint8), "RGB")
