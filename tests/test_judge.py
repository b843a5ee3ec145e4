"""The exact shapes-world judge: recovery, rejection, positions, text scoring."""

import random

import numpy as np
import pytest
from PIL import Image

from mmgen.data.judge import (
    connected_components,
    judge_image,
    relations_between,
    scenes_match,
    score_answer,
    score_caption,
    score_t2i,
)
from mmgen.data.shapes import Scene, ShapeObject, object_relations, render, sample_scene

TWO = {
    "objects": [
        {"colour": "red", "shape": "circle", "count": 1},
        {"colour": "blue", "shape": "square", "count": 1},
    ],
    "relations": [{"a": 0, "relation": "left of", "b": 1}],
}
GOOD = Scene(
    (ShapeObject("circle", "red", "medium", 0.25, 0.5), ShapeObject("square", "blue", "medium", 0.75, 0.5))
)


@pytest.mark.parametrize("resolution", [32, 64])
def test_judge_recovers_2000_ground_truth_scenes_exactly(resolution):
    """Every object's colour, shape and size bucket, its box centre within 1 px, every pairwise
    relation, and a valid flag, on 2,000 seeded renders (both splits' colour/shape combos)."""
    rng = random.Random(2024 + resolution)
    failures = []
    for i in range(2000):
        scene = sample_scene(rng, split="heldout_combos" if i % 2 else "train")
        j = judge_image(render(scene, resolution))
        ok = j.valid and j.off_palette_share == 0.0 and scenes_match(j.scene, scene, tol=1.0 / resolution)
        if ok:  # relations of the decoded objects = relations of the true ones
            decoded = [
                min(
                    j.objects,
                    key=lambda d: abs(d.centroid[0] - o.centroid[0]) + abs(d.centroid[1] - o.centroid[1]),
                )
                for o in scene.objects
            ]
            n = len(scene.objects)
            ok = all(
                relations_between(decoded[a], decoded[b])
                == object_relations(scene.objects[a], scene.objects[b])
                for a in range(n)
                for b in range(n)
                if a != b
            )
        if not ok:
            failures.append((i, scene, j.to_dict()))
    assert not failures, failures[:3]


def test_correct_render_passes_every_verdict():
    v = score_t2i(render(GOOD), TWO)
    assert all(
        v[k] for k in ("counts", "colours", "shapes", "positions", "nothing_extra", "valid", "overall")
    )


def test_judge_rejects_wrong_colour():
    wrong = Scene((ShapeObject("circle", "orange", "medium", 0.25, 0.5),) + GOOD.objects[1:])
    v = score_t2i(render(wrong), TWO)
    assert not v["counts"] and not v["colours"] and v["shapes"] and not v["overall"]


def test_judge_rejects_wrong_shape():
    wrong = Scene((ShapeObject("triangle", "red", "medium", 0.25, 0.5),) + GOOD.objects[1:])
    v = score_t2i(render(wrong, 64), TWO)
    assert sorted(o["shape"] for o in v["judgement"]["objects"]) == ["square", "triangle"]
    assert not v["counts"] and v["colours"] and not v["shapes"] and not v["overall"]


def test_judge_rejects_extra_object():
    extra = Scene(GOOD.objects + (ShapeObject("triangle", "green", "small", 0.5, 0.15),))
    v = score_t2i(render(extra), TWO)
    assert v["counts"] and v["positions"] and not v["nothing_extra"] and not v["overall"]


def test_judge_rejects_swapped_positions():
    swapped = Scene(
        (
            ShapeObject("circle", "red", "medium", 0.75, 0.5),
            ShapeObject("square", "blue", "medium", 0.25, 0.5),
        )
    )
    v = score_t2i(render(swapped), TWO)
    assert v["counts"] and v["nothing_extra"] and not v["positions"] and not v["overall"]


def test_judge_counts_same_colour_objects_separately():
    three = Scene(tuple(ShapeObject("triangle", "green", "small", x, 0.5) for x in (0.2, 0.5, 0.8)))
    spec = {"objects": [{"colour": "green", "shape": "triangle", "count": 3}], "relations": []}
    assert score_t2i(render(three), spec)["overall"]
    assert not score_t2i(render(Scene(three.objects[:2])), spec)["counts"]


@pytest.mark.parametrize(
    "a_xy,b_xy,relations",
    [
        ((0.2, 0.5), (0.8, 0.5), {"left of"}),
        ((0.5, 0.2), (0.5, 0.8), {"above"}),
        ((0.2, 0.2), (0.8, 0.8), {"left of", "above"}),
        ((0.8, 0.75), (0.6, 0.2), {"below"}),  # steep: horizontal shift too small after the shrink
    ],
)
def test_judged_positions_agree_with_hand_made_cases(a_xy, b_xy, relations):
    scene = Scene(
        (ShapeObject("square", "white", "small", *a_xy), ShapeObject("circle", "cyan", "small", *b_xy))
    )
    j = judge_image(render(scene, 64))
    a = next(o for o in j.objects if o.colour == "white")
    b = next(o for o in j.objects if o.colour == "cyan")
    assert relations_between(a, b) == relations == object_relations(*scene.objects)


def test_off_palette_and_noise_make_an_image_invalid():
    px = np.asarray(render(GOOD)).copy()
    px[:8, :8] = (128, 200, 40)  # a block of a colour far from every palette segment
    j = judge_image(px)
    assert j.off_palette_share == pytest.approx(64 / 1024) and not j.valid
    speck = np.asarray(render(GOOD)).copy()
    speck[2, 2] = speck[29, 29] = (255, 255, 255)
    j = judge_image(speck)
    assert (
        len(j.objects) == 2 and j.noise_share == pytest.approx(2 / 1024) and j.valid
    )  # specks are not objects
    noisy = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    assert not judge_image(noisy).valid


def test_connected_components_are_8_connected_and_per_colour():
    labels = -np.ones((6, 6), dtype=int)
    labels[0, 0] = labels[1, 1] = 3  # diagonal neighbours join
    labels[4, 4] = labels[4, 5] = 3  # separate
    labels[2, 2] = 5  # touches (1, 1) but another colour
    comp = connected_components(labels)
    assert comp[0, 0] == comp[1, 1] != comp[4, 4] == comp[4, 5]
    assert comp[2, 2] not in (comp[0, 0], comp[4, 4]) and comp[3, 3] == 36


def test_judge_accepts_float_arrays_and_resizes_pil_images():
    big = render(GOOD, 64)
    assert score_t2i(big, TWO, resolution=32)["overall"]
    assert score_t2i(np.asarray(render(GOOD)) / 255.0, TWO)["overall"]
    with pytest.raises(ValueError, match="square RGB"):
        judge_image(np.zeros((32, 16, 3), dtype=np.uint8))
    assert isinstance(big, Image.Image)


def test_captions_and_answers_are_scored_through_the_grammar():
    assert score_caption("A red circle to the left of a blue square.", GOOD)["correct"]
    assert score_caption("There is a blue square and a red circle.", GOOD.to_dict())["correct"]
    assert not score_caption("A red circle right of a blue square.", GOOD)["correct"]
    assert not score_caption("A red circle.", GOOD)["correct"]  # misses the square
    assert score_caption("a red circel and a blue square", GOOD) == {"parsed": False, "correct": False}
    assert score_answer("Two.", 2) and score_answer("<|assistant|>yes.", "yes")
    assert not score_answer("Three.", 2) and not score_answer("2", 2)
