"""The exact shapes-world judge: image -> scene, prompt verdicts, and text scoring.

Rules (GenEval-style, Ghosh et al., NeurIPS 2023; no learned parts):
1. Pixels. A render is an alpha-blend of ONE palette colour c with black at every pixel, so
   each pixel p is projected on every segment {alpha * c : 0 <= alpha <= 1}; the nearest
   segment gives the pixel's colour and its coverage alpha. Residual > `OFF_PALETTE` (RGB in
   [0, 1]) = off-palette pixel; alpha >= 0.5 = the colour; else background.
2. Objects. Connected components (8-connected) per colour; components under `min_pixels`
   are noise (counted, not objects).
3. Shape. For each candidate shape, a template is rendered with the same anti-aliased
   renderer, its size fitted from the component's soft area and its centre from the soft
   centroid; the shape with the best soft IoU wins. The fitted side gives the size bucket.
4. Positions: centroids and fitted sides under GenEval's rule (`shapes.relative_position`).
An image is `valid` when off-palette share <= `MAX_OFF_PALETTE`, noise share <=
`MAX_NOISE`, and every object's best IoU >= `MIN_IOU`.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field

import numpy as np
from PIL import Image

from mmgen.data.grammar import parse_text
from mmgen.data.shapes import PALETTE, SHAPES, SIZES, Scene, ShapeObject, relative_position, shape_coverage

OFF_PALETTE = 0.2
MAX_OFF_PALETTE = 0.05
MAX_NOISE = 0.02
MIN_IOU = 0.6
AREA_FACTOR = {"circle": math.pi / 4, "square": 1.0, "triangle": 0.5}  # area / side^2
_COLOUR_NAMES = tuple(PALETTE)
_P = np.asarray(list(PALETTE.values()), dtype=np.float32) / 255.0  # (K, 3)
_PP = (_P * _P).sum(1)  # (K,)
_OFFSETS = [(dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1) if (dy, dx) != (0, 0)]

__all__ = [
    "DetectedObject",
    "Judgement",
    "check_spec",
    "connected_components",
    "judge_image",
    "parse_text",
    "pixel_colours",
    "relations_between",
    "scenes_match",
    "score_answer",
    "score_caption",
    "score_t2i",
]


@dataclass(frozen=True)
class DetectedObject:
    colour: str
    shape: str
    size: str
    centroid: tuple[float, float]  # fraction of the image side
    side: float  # fitted box side, fraction of the image side
    pixels: int
    iou: float

    def to_shape_object(self) -> ShapeObject:
        dy = self.side / 6 if self.shape == "triangle" else 0.0
        return ShapeObject(self.shape, self.colour, self.size, self.centroid[0], self.centroid[1] - dy)

    def to_dict(self) -> dict:
        return {
            "colour": self.colour,
            "shape": self.shape,
            "size": self.size,
            "centroid": list(self.centroid),
            "side": self.side,
            "pixels": self.pixels,
            "iou": self.iou,
        }


@dataclass
class Judgement:
    objects: list[DetectedObject]
    off_palette_share: float
    noise_share: float
    valid: bool
    scene: Scene = field(init=False)

    def __post_init__(self):
        self.scene = Scene(tuple(o.to_shape_object() for o in self.objects))

    def to_dict(self) -> dict:
        return {
            "objects": [o.to_dict() for o in self.objects],
            "off_palette_share": self.off_palette_share,
            "noise_share": self.noise_share,
            "valid": self.valid,
            "scene": self.scene.to_dict(),
        }


def _as_rgb(image, resolution: int | None) -> np.ndarray:
    if isinstance(image, Image.Image):
        image = image.convert("RGB")
        if resolution is not None and image.size != (resolution, resolution):
            image = image.resize((resolution, resolution), Image.BOX)
        image = np.asarray(image)
    arr = np.asarray(image)
    if arr.ndim != 3 or arr.shape[2] != 3 or arr.shape[0] != arr.shape[1]:
        raise ValueError(f"judge expects a square RGB image (H, W, 3), got shape {arr.shape}")
    if resolution is not None and arr.shape[0] != resolution:
        raise ValueError(
            f"image is {arr.shape[0]}px but resolution={resolution} (pass a PIL image to resize)"
        )
    return arr.astype(np.float32) / 255.0 if arr.dtype == np.uint8 else arr.astype(np.float32)


def _pixel_labels(rgb: np.ndarray):
    """Per pixel: nearest palette segment k, coverage alpha along it, and the label
    (k if alpha >= 0.5, -1 background, -2 off-palette). rgb (H, W, 3) in [0, 1]."""
    dot = rgb @ _P.T  # (H, W, K)
    alpha = np.clip(dot / _PP, 0.0, 1.0)
    resid2 = (rgb * rgb).sum(-1, keepdims=True) - 2 * alpha * dot + alpha * alpha * _PP  # |p - a c|^2
    k = resid2.argmin(-1)  # (H, W)
    a = np.take_along_axis(alpha, k[..., None], -1)[..., 0]
    r = np.sqrt(np.maximum(np.take_along_axis(resid2, k[..., None], -1)[..., 0], 0.0))
    label = np.where(r > OFF_PALETTE, -2, np.where(a >= 0.5, k, -1))
    return k, alpha, label


def pixel_colours(image, resolution: int | None = None) -> np.ndarray:
    """(H, W) int: the palette index (order of `mmgen.data.shapes.COLOURS`) each pixel is judged to show,
    -1 for background, -2 for off-palette, exactly as `judge_image` labels pixels."""
    return _pixel_labels(_as_rgb(image, resolution))[2]


def connected_components(labels: np.ndarray) -> np.ndarray:
    """8-connected components of equal labels >= 0 (vectorised min-label propagation with
    pointer jumping). Returns (H, W) int: the flat index of each component's root pixel,
    H*W where labels < 0."""
    H, W = labels.shape
    n = H * W
    fg = labels >= 0
    padded = np.pad(labels, 1, constant_values=-1)
    same = [fg & (padded[1 + dy : 1 + dy + H, 1 + dx : 1 + dx + W] == labels) for dy, dx in _OFFSETS]
    comp = np.where(fg, np.arange(n).reshape(H, W), n)
    while True:
        cp = np.pad(comp, 1, constant_values=n)
        best = comp
        for (dy, dx), m in zip(_OFFSETS, same):
            best = np.minimum(best, np.where(m, cp[1 + dy : 1 + dy + H, 1 + dx : 1 + dx + W], n))
        ext = np.append(best.ravel(), n)
        for _ in range(3):  # pointer jumping: each label is a pixel of the same component
            best = ext[best]
            ext = np.append(best.ravel(), n)
        if np.array_equal(best, comp):
            return comp
        comp = best


def _classify(soft: np.ndarray, x0: int, y0: int, res: int):
    """Best (shape, iou, side_px, centroid_px) for a soft coverage window whose top-left pixel is (x0, y0)."""
    area = float(soft.sum())
    hh, ww = soft.shape
    ys, xs = np.mgrid[0:hh, 0:ww]
    mx = float((soft * (xs + 0.5)).sum() / area)
    my = float((soft * (ys + 0.5)).sum() / area)
    best = None
    for shape in SHAPES:
        side = math.sqrt(area / AREA_FACTOR[shape])
        cy = my - (side / 6 if shape == "triangle" else 0.0)
        tmpl = shape_coverage(shape, mx, cy, side, ww, hh)
        iou = float(np.minimum(soft, tmpl).sum() / max(np.maximum(soft, tmpl).sum(), 1e-9))
        if best is None or iou > best[1]:
            best = (shape, iou, side)
    return best[0], best[1], best[2], (mx + x0, my + y0)


def judge_image(image, resolution: int | None = None, min_pixels: int | None = None) -> Judgement:
    """Decode a rendered (or generated) image into objects. `image`: PIL image or (H, W, 3)
    array (uint8 or float in [0, 1]); a PIL image of another size is box-resized to `resolution`."""
    rgb = _as_rgb(image, resolution)
    res = rgb.shape[0]
    min_pixels = min_pixels if min_pixels is not None else max(4, round(0.004 * res * res))
    k, alpha, label = _pixel_labels(rgb)
    comp = connected_components(label)
    n = res * res
    sizes = np.bincount(comp.ravel(), minlength=n + 1)[:n]
    roots = np.flatnonzero(sizes)
    objects, noise = [], 0
    for root in roots:
        if sizes[root] < min_pixels:
            noise += int(sizes[root])
            continue
        mask = comp == root
        colour = int(label.flat[root])
        rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
        y0, y1 = max(rows[0] - 1, 0), min(rows[-1] + 2, res)
        x0, x1 = max(cols[0] - 1, 0), min(cols[-1] + 2, res)
        win = (slice(y0, y1), slice(x0, x1))
        # the component plus its own anti-aliased fringe (background pixels of the same hue)
        keep = mask[win] | ((label[win] == -1) & (k[win] == colour))
        soft = np.where(keep, alpha[win][..., colour], 0.0)
        shape, iou, side, (cx, cy) = _classify(soft, x0, y0, res)
        size = min(SIZES, key=lambda s: abs(SIZES[s] - side / res))
        objects.append(
            DetectedObject(
                _COLOUR_NAMES[colour], shape, size, (cx / res, cy / res), side / res, int(sizes[root]), iou
            )
        )
    objects.sort(key=lambda o: (o.centroid[1], o.centroid[0]))
    off = float((label == -2).mean())
    noise_share = noise / n
    valid = off <= MAX_OFF_PALETTE and noise_share <= MAX_NOISE and all(o.iou >= MIN_IOU for o in objects)
    return Judgement(objects, off, noise_share, valid)


# --------------------------------------------------------------------------- verdicts


def relations_between(a, b) -> set[str]:
    """GenEval relations of a relative to b (ShapeObject or DetectedObject: centroid + side)."""
    return relative_position(a.centroid, (a.side, a.side), b.centroid, (b.side, b.side))


def check_spec(spec: dict, objects) -> dict[str, bool]:
    """Verdicts of a spec against objects (ShapeObject or DetectedObject: colour, shape,
    centroid, side): counts exact per group, colours/shapes as multisets, positions (each
    stated relation holds between the unique objects of its groups), nothing extra."""
    objects = list(objects)
    groups = spec["objects"]
    found = Counter((o.colour, o.shape) for o in objects)
    counts = all(found[(g["colour"], g["shape"])] == g["count"] for g in groups)
    want_c, want_s = Counter(), Counter()
    for g in groups:
        want_c[g["colour"]] += g["count"]
        want_s[g["shape"]] += g["count"]
    colours = Counter(o.colour for o in objects) == want_c
    shapes = Counter(o.shape for o in objects) == want_s
    positions = True
    for r in spec.get("relations") or []:
        ga, gb = groups[r["a"]], groups[r["b"]]
        a = [o for o in objects if (o.colour, o.shape) == (ga["colour"], ga["shape"])]
        b = [o for o in objects if (o.colour, o.shape) == (gb["colour"], gb["shape"])]
        positions &= len(a) == 1 and len(b) == 1 and r["relation"] in relations_between(a[0], b[0])
    nothing_extra = len(objects) == sum(g["count"] for g in groups)
    return {
        "counts": counts,
        "colours": colours,
        "shapes": shapes,
        "positions": positions,
        "nothing_extra": nothing_extra,
    }


def score_t2i(image, prompt_meta: dict, resolution: int | None = None) -> dict:
    """Verdicts for a generated image against a prompt spec (meta["prompt"]):
    counts, colours, shapes, positions, nothing_extra, valid, and overall = counts and
    positions and nothing_extra and valid. `image` may be a Judgement already."""
    j = image if isinstance(image, Judgement) else judge_image(image, resolution)
    v = check_spec(prompt_meta, j.objects)
    v["valid"] = j.valid
    v["overall"] = v["counts"] and v["positions"] and v["nothing_extra"] and j.valid
    return {
        **v,
        "num_objects": len(j.objects),
        "off_palette_share": j.off_palette_share,
        "judgement": j.to_dict(),
    }


def score_caption(text: str, scene: Scene | dict) -> dict:
    """A model's caption against the true scene: parsed through the grammar (unparseable =
    wrong), then every stated group counted exactly, nothing missing, relations true."""
    scene = Scene.from_dict(scene) if isinstance(scene, dict) else scene
    parsed = parse_text(text)
    if parsed is None or parsed["kind"] != "caption":
        return {"parsed": False, "correct": False}
    v = check_spec(parsed["spec"], scene.objects)
    return {"parsed": True, **v, "correct": all(v.values())}


def score_answer(text: str, answer) -> bool:
    """True when `text` parses to exactly the expected answer."""
    parsed = parse_text(text)
    return parsed is not None and parsed["kind"] == "answer" and parsed["answer"] == answer


def scenes_match(decoded: Scene, truth: Scene, tol: float) -> bool:
    """Same objects (colour, shape, size) one to one, box centres within `tol` (fraction)."""
    if len(decoded.objects) != len(truth.objects):
        return False
    left = list(decoded.objects)
    for t in truth.objects:
        hit = next(
            (
                d
                for d in left
                if (d.colour, d.shape, d.size) == (t.colour, t.shape, t.size)
                and abs(d.cx - t.cx) <= tol
                and abs(d.cy - t.cy) <= tol
            ),
            None,
        )
        if hit is None:
            return False
        left.remove(hit)
    return True


def _benchmark(argv=None) -> None:
    """`python -m mmgen.data.judge --num 2000 --resolution 32`: exact-scene accuracy and speed
    of the judge on seeded ground-truth renders."""
    import argparse
    import random
    import time

    from mmgen.data.shapes import render, sample_scene

    ap = argparse.ArgumentParser(description=_benchmark.__doc__)
    ap.add_argument("--num", type=int, default=2000)
    ap.add_argument("--resolution", type=int, default=32)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    rng = random.Random(args.seed)
    scenes = [sample_scene(rng, split="heldout_combos" if i % 2 else "train") for i in range(args.num)]
    images = [render(s, args.resolution) for s in scenes]
    start = time.perf_counter()
    judged = [judge_image(im) for im in images]
    seconds = time.perf_counter() - start
    exact = sum(j.valid and scenes_match(j.scene, s, 1.0 / args.resolution) for j, s in zip(judged, scenes))
    print(
        f"resolution {args.resolution}: exact scenes {exact}/{args.num} ({exact / args.num:.2%}), "
        f"{args.num / seconds:.0f} images/s (judge only, 1 process)"
    )


if __name__ == "__main__":
    _benchmark()
