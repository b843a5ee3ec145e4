"""The shapes world: scenes, renders, grammar, documents, held-out split."""

import json
import random
import re

import numpy as np
import pytest
from PIL import Image

from mmgen.data import grammar as G
from mmgen.data.shapes import (
    HELDOUT_COMBOS,
    MIN_GAP,
    PALETTE,
    Scene,
    ShapeObject,
    object_relations,
    relative_position,
    render,
    sample_scene,
    scene_is_well_formed,
)
from mmgen.data.shapes_docs import answer_question, grammar_corpus, iter_documents, make_document

ROLE = re.compile(r"<\|(user|assistant|end)\|>")


def _utterances(doc):
    """Text between role tokens, in order (user and assistant utterances)."""
    text = "".join(s.get("text", "\x00") for s in doc["segments"])
    return [
        u.strip("\x00") for u in ROLE.split(text) if u.strip("\x00") and u not in ("user", "assistant", "end")
    ]


def test_scene_round_trips_through_json():
    scene = sample_scene(random.Random(0), num_objects=4)
    assert Scene.from_dict(json.loads(json.dumps(scene.to_dict()))) == scene


def test_bad_scene_values_raise_clear_errors():
    with pytest.raises(ValueError, match="colour"):
        ShapeObject("circle", "pink", "small", 0.5, 0.5)
    with pytest.raises(ValueError, match="lacks"):
        ShapeObject.from_dict({"shape": "circle"})
    with pytest.raises(ValueError, match="num_objects"):
        sample_scene(random.Random(0), num_objects=5)


def test_sampling_and_rendering_are_deterministic_from_seed():
    a = [sample_scene(random.Random(s)) for s in range(20)]
    b = [sample_scene(random.Random(s)) for s in range(20)]
    assert a == b and len(set(a)) == 20
    assert np.array_equal(np.asarray(render(a[3], 64)), np.asarray(render(b[3], 64)))


def test_scenes_are_well_formed_with_gaps_and_no_borderline_relations():
    rng = random.Random(1)
    counts = set()
    for _ in range(500):
        scene = sample_scene(rng)
        counts.add(len(scene.objects))
        assert scene_is_well_formed(scene)
        for i, a in enumerate(scene.objects):
            for b in scene.objects[i + 1 :]:
                ax0, ay0, ax1, ay1 = a.box
                bx0, by0, bx1, by1 = b.box
                assert max(bx0 - ax1, ax0 - bx1, by0 - ay1, ay0 - by1) >= MIN_GAP - 1e-9
    assert counts == {1, 2, 3, 4}


@pytest.mark.parametrize("resolution", [32, 64])
def test_render_is_an_exact_blend_of_one_palette_colour_per_pixel(resolution):
    scene = Scene(
        (
            ShapeObject("triangle", "orange", "large", 0.3, 0.3),
            ShapeObject("circle", "purple", "small", 0.75, 0.7),
        )
    )
    img = render(scene, resolution)
    assert img.mode == "RGB" and img.size == (resolution, resolution)
    px = np.asarray(img).astype(float)
    assert (px[0, 0] == 0).all()  # black background
    for colour in ("orange", "purple"):
        c = np.asarray(PALETTE[colour], dtype=float)
        alpha = px @ c / (c @ c)
        close = np.abs(px - alpha[..., None] * c).max(-1) <= 1.0
        assert close.sum() > 0
    full = {tuple(p) for p in px.reshape(-1, 3) if p.max() == 255}
    assert full <= {PALETTE["orange"], PALETTE["purple"]} and len(full) == 2  # anti-aliased, pure inside


def test_position_rule_on_hand_made_cases():
    """GenEval's rule: offset shrunk by 0.1 x summed sizes, relation when > 0.5 of the distance."""
    d = (6, 6)
    assert relative_position((10, 16), d, (22, 16), d) == {"left of"}
    assert relative_position((22, 16), d, (10, 16), d) == {"right of"}
    assert relative_position((16, 4), d, (16, 20), d) == {"above"}
    assert relative_position((10, 10), d, (20, 20), d) == {"left of", "above"}  # diagonal: both
    assert relative_position((17, 28), (1, 1), (15, 16), (1, 1)) == {"below"}  # mostly vertical
    assert relative_position((11, 11), d, (10, 10), d) == set()  # offset swallowed by the shrink
    a = ShapeObject("square", "red", "small", 0.2, 0.5)
    b = ShapeObject("circle", "blue", "small", 0.8, 0.5)
    assert object_relations(a, b) == {"left of"} and object_relations(b, a) == {"right of"}


def test_parse_text_round_trips_every_template():
    rng = random.Random(0)
    spec2 = {
        "objects": [
            {"colour": "orange", "shape": "circle", "count": 1},
            {"colour": "blue", "shape": "square", "count": 1},
        ],
        "relations": [{"a": 0, "relation": "below", "b": 1}],
    }
    spec3 = {
        "objects": [
            {"colour": "red", "shape": "triangle", "count": 3},
            {"colour": "white", "shape": "circle", "count": 1},
        ],
        "relations": [],
    }
    questions = {
        "count_all": {"kind": "count_all"},
        "count_colour": {"kind": "count_colour", "colour": "cyan"},
        "count_shape": {"kind": "count_shape", "shape": "triangle"},
        "colour": {"kind": "colour", "shape": "square"},
        "shape": {"kind": "shape", "colour": "yellow"},
        "exist": {"kind": "exist", "colour": "orange", "shape": "square"},
        "relation": {
            "kind": "relation",
            "a": {"colour": "red", "shape": "circle"},
            "relation": "left of",
            "b": {"colour": "green", "shape": "square"},
        },
    }
    for kind in G.TRAIN_TEMPLATES:
        all_templates = G.TRAIN_TEMPLATES[kind] + G.HELDOUT_TEMPLATES[kind]
        for index, template in enumerate(all_templates):
            heldout = index >= len(G.TRAIN_TEMPLATES[kind])
            cases = []
            if kind in ("caption", "t2i"):
                for spec in (spec2, spec3):
                    cases.append((G.realise_request(kind, spec, template, rng), {"kind": kind, "spec": spec}))
            elif kind == "describe":
                cases.append((template, {"kind": "describe"}))
            elif kind == "add":
                for rel in (None, "left of", "right of", "above", "below"):
                    meaning = {
                        "kind": "add",
                        "object": {"colour": "orange", "shape": "circle"},
                        "relation": rel,
                    }
                    cases.append((G.realise_add("orange", "circle", rel, template, rng), meaning))
            else:
                cases.append(
                    (
                        G.realise_question(questions[kind], template, rng),
                        {"kind": "question", "question": questions[kind]},
                    )
                )
            for text, meaning in cases:
                assert G.parse_text(text) == {**meaning, "template": index, "heldout": heldout}, text
    for answer in ["yes", "no", 0, 1, 2, 3, 4, *G.COLOURS, *G.SHAPES]:
        assert G.parse_text(G.realise_answer(answer)) == {"kind": "answer", "answer": answer}


def test_every_relation_paraphrase_parses():
    for rel, phrases in G.REL_PHRASES.items():
        for p in phrases:
            parsed = G.parse_text(f"A red circle {p} a blue square.")
            assert parsed["spec"]["relations"] == [{"a": 0, "relation": rel, "b": 1}]


@pytest.mark.parametrize(
    "text",
    [
        "Two red circle.",
        "A pink circle.",
        "Draw a red.",
        "hello",
        "",
        "A red circle and.",
        "Five red circles.",
        "Is there two red circles?",
    ],
)
def test_parse_text_rejects_what_the_grammar_cannot_say(text):
    assert G.parse_text(text) is None


def test_parse_text_ignores_case_spacing_and_role_tokens():
    assert G.parse_text("<|assistant|>  there ARE two  green squares.<|end|>")["spec"]["objects"] == [
        {"colour": "green", "shape": "square", "count": 2}
    ]


def test_documents_follow_the_contract_and_are_deterministic():
    docs = list(iter_documents(60, seed=5, resolution=64))
    again = list(iter_documents(60, seed=5, resolution=64))
    assert [d["meta"] for d in docs] == [d["meta"] for d in again]
    assert [d["meta"] for d in iter_documents(10, seed=5, start=50, resolution=64)] == [
        d["meta"] for d in docs[50:]
    ]
    assert make_document(7, seed=5, resolution=64)["meta"] == docs[7]["meta"]
    assert {d["meta"]["task"] for d in docs} == {"t2i", "caption", "vqa", "multiturn"}
    for d in docs:
        json.dumps(d["meta"])
        images = [s["image"] for s in d["segments"] if "image" in s]
        assert all(isinstance(im, Image.Image) and im.mode == "RGB" and im.size == (64, 64) for im in images)
        assert len(images) == len(d["meta"]["scenes"])
        for im, sc in zip(images, d["meta"]["scenes"]):
            assert np.array_equal(np.asarray(im), np.asarray(render(Scene.from_dict(sc), 64)))
        assert d["segments"][0]["text"].startswith("<|user|>") and d["segments"][-1]["text"].endswith(
            "<|end|>"
        )
        assert all(set(s) in ({"text"}, {"image"}) for s in d["segments"])


def test_document_text_says_what_its_meta_says():
    for d in iter_documents(200, seed=2):
        meta, utt = d["meta"], _utterances(d)
        parsed = [G.parse_text(u) for u in utt]
        assert all(p is not None for p in parsed), utt
        scenes = [Scene.from_dict(s) for s in meta["scenes"]]
        if meta["task"] == "t2i":
            assert parsed[0]["spec"] == meta["prompt"]
        elif meta["task"] == "caption":
            assert parsed[1]["spec"] == meta["caption"]
        elif meta["task"] == "vqa":
            assert parsed[0]["question"] == meta["question"]
            assert parsed[1]["answer"] == meta["answer"] == answer_question(meta["question"], scenes[0])
        else:
            for turn in meta["turns"]:
                if turn["image"] is not None and turn["user"]["kind"] == "add":
                    k = turn["image"]
                    assert scenes[k].objects[:-1] == scenes[k - 1].objects
                    rel = turn["user"]["relation"]
                    if rel is not None:
                        assert rel in object_relations(scenes[k].objects[-1], scenes[k].objects[-2])


def _combos(doc):
    return {(o["colour"], o["shape"]) for s in doc["meta"]["scenes"] for o in s["objects"]}


def test_train_split_never_produces_heldout_combos_or_templates():
    for d in iter_documents(400, seed=3, split="train"):
        assert not _combos(d) & HELDOUT_COMBOS
        for u in _utterances(d):
            assert G.parse_text(u).get("heldout", False) is False, u


def test_heldout_split_always_holds_heldout_combos_and_templates():
    for d in iter_documents(200, seed=3, split="heldout"):
        assert _combos(d) & HELDOUT_COMBOS
        user = [G.parse_text(u) for u in _utterances(d)]
        assert all(p["heldout"] for p in user if p["kind"] != "answer")
    for d in iter_documents(100, seed=3, split="heldout_templates"):
        assert not _combos(d) & HELDOUT_COMBOS


def test_unknown_split_or_task_is_a_clear_error():
    with pytest.raises(ValueError, match="split"):
        next(iter_documents(1, seed=0, split="valid"))
    with pytest.raises(ValueError, match="task"):
        next(iter_documents(1, seed=0, tasks=["poetry"]))


def test_grammar_corpus_covers_every_template_and_word():
    lines = grammar_corpus(2000, seed=0)
    assert lines == grammar_corpus(2000, seed=0) and len(lines) == 2000
    parsed = [G.parse_text(line) for line in lines]
    assert all(p is not None for p in parsed)
    used = {
        (p["kind"] if p["kind"] != "question" else p["question"]["kind"], p["template"])
        for p in parsed
        if "template" in p
    }
    for kind in G.TRAIN_TEMPLATES:
        for i in range(len(G.TRAIN_TEMPLATES[kind]) + len(G.HELDOUT_TEMPLATES[kind])):
            assert (kind, i) in used, (kind, i)
    text = " ".join(lines).lower()
    words = [*G.COLOURS, *G.SHAPES, *G.NUMBER_WORDS, "yes", "no"]
    phrases = [p for ps in list(G.REL_PHRASES.values()) + list(G.REL_IT_PHRASES.values()) for p in ps]
    assert all(w in text for w in words + phrases)


def test_every_sample_of_a_prompt_fits_it_and_the_samples_differ():
    from mmgen.data.judge import check_spec, judge_image

    for doc in iter_documents(12, seed=5, tasks=["t2i"], particles=4):
        (slot,) = [s["images"] for s in doc["segments"] if "images" in s]
        spec, scenes = doc["meta"]["prompt"], doc["meta"]["scenes"]
        assert len(slot) == len(scenes) == 4
        assert len({img.tobytes() for img in slot}) == 4  # four different scenes
        for image in slot:  # the judge reads every render as fitting the prompt (relations included)
            assert all(check_spec(spec, judge_image(image).objects).values())
    plain = make_document(3, seed=5, tasks=["t2i"])
    assert any("image" in s for s in plain["segments"]) and plain == make_document(3, seed=5, tasks=["t2i"],
                                                                                 particles=1)
    with pytest.raises(ValueError, match="particles"):
        make_document(0, seed=0, particles=0)


def test_t2i_max_objects_bounds_only_the_drawing_tasks():
    docs = list(iter_documents(200, seed=6, tasks=["t2i", "caption"], t2i_max_objects=2))
    counts = {task: {len(d["meta"]["scenes"][0]["objects"]) for d in docs if d["meta"]["task"] == task}
              for task in ("t2i", "caption")}
    assert counts["t2i"] == {1, 2} and counts["caption"] == {1, 2, 3, 4}
    with pytest.raises(ValueError, match="t2i_max_objects"):
        make_document(0, seed=0, max_objects=2, t2i_max_objects=3)
