"""Shapes-world documents (docs/design.md §3) and the grammar's text corpus.

Every document is {"segments": [{"text": str} | {"image": PIL RGB}, ...], "meta": dict}, a chat
with the role tokens written inline as text. Tasks:
- "t2i":       <|user|>Draw a red circle left of a blue square.<|end|><|assistant|> [image] <|end|>;
               with `particles` M > 1 the image slot holds M different scenes that all fit the prompt
               (segment {"images": [...]}: M samples of one conditional distribution, IMM's particle group)
- "caption":   <|user|> [image] Describe the image.<|end|><|assistant|>A red circle ....<|end|>
- "vqa":       <|user|> [image] How many shapes are there?<|end|><|assistant|>Two.<|end|>
- "multiturn": draw one object, "Now add ... to its right." (1-3 times), questions in between
               and at the end, every answer about the scene accumulated so far.
meta = {"task", "split", "index", "seed", "resolution", "scenes": [scene dict per image, in
order], ...} plus "prompt" (t2i spec), "caption" (spec), "question"/"answer" (vqa) or
"turns" (multiturn: one {"user": meaning, "image": k | None, "answer": value | None} per turn).
Document i depends only on (seed, split, i): any prefix of the stream is the same stream.
"""

from __future__ import annotations

import random
from collections.abc import Iterator, Mapping, Sequence

from mmgen.data import grammar as G
from mmgen.data.shapes import (
    HELDOUT_COMBOS,
    RELATIONS,
    SPLITS,
    TRAIN_COMBOS,
    Scene,
    combos_for,
    object_relations,
    place_object,
    render,
    sample_scene,
)

TASKS: tuple[str, ...] = ("t2i", "caption", "vqa", "multiturn")
TASK_WEIGHTS: dict[str, float] = {"t2i": 0.35, "caption": 0.2, "vqa": 0.3, "multiturn": 0.15}


def parse_task_weights(items: Sequence[str] | Mapping[str, float] | None) -> dict[str, float]:
    """Task mix from ``["t2i=0.6", "caption", ...]`` (a bare name keeps its ``TASK_WEIGHTS`` weight) or a
    mapping; None or empty = every task with ``TASK_WEIGHTS``. Weights need not sum to 1."""
    if not items:
        return dict(TASK_WEIGHTS)
    if isinstance(items, Mapping):
        pairs = list(items.items())
    else:
        pairs = [
            (item.split("=", 1)[0].strip(), item.split("=", 1)[1] if "=" in item else None) for item in items
        ]
    weights: dict[str, float] = {}
    for name, weight in pairs:
        if name not in TASK_WEIGHTS:
            raise ValueError(f"unknown task(s) [{name!r}]; expected some of {TASKS}")
        try:
            w = TASK_WEIGHTS[name] if weight is None else float(weight)
        except ValueError:
            raise ValueError(f"task {name!r}: weight {weight!r} is not a number") from None
        if not w > 0:
            raise ValueError(f"task {name!r}: weight must be > 0, got {w}")
        weights[name] = w
    return weights


USER, ASSISTANT, END = "<|user|>", "<|assistant|>", "<|end|>"


# --------------------------------------------------------------------------- meanings of scenes


def scene_spec(scene: Scene, rng: random.Random, p_relation: float = 0.7) -> dict:
    """A spec that exactly describes the scene (every object counted, nothing missing); for
    two distinct objects it states one true relation with probability `p_relation`."""
    groups: list[dict] = []
    for o in scene.objects:
        for g in groups:
            if (g["colour"], g["shape"]) == (o.colour, o.shape):
                g["count"] += 1
                break
        else:
            groups.append({"colour": o.colour, "shape": o.shape, "count": 1})
    spec = {"objects": groups, "relations": []}
    if len(groups) == 2 and len(scene.objects) == 2 and rng.random() < p_relation:
        a, b = rng.sample([0, 1], 2)
        rels = sorted(object_relations(scene.objects[a], scene.objects[b]))
        if rels:  # groups in sentence order, so the text parses back to this very dict
            spec = {
                "objects": [groups[a], groups[b]],
                "relations": [{"a": 0, "relation": rng.choice(rels), "b": 1}],
            }
    return spec


def answer_question(question: dict, scene: Scene):
    """The exact answer to a question about a scene (None when the question does not apply:
    a referent that is absent or not unique)."""
    q, k = question, question["kind"]
    if k == "count_all":
        return scene.count()
    if k == "count_colour":
        return scene.count(colour=q["colour"])
    if k == "count_shape":
        return scene.count(shape=q["shape"])
    if k == "exist":
        return "yes" if scene.count(q["colour"], q["shape"]) else "no"
    if k == "colour":
        objs = [o for o in scene.objects if o.shape == q["shape"]]
        return objs[0].colour if len(objs) == 1 else None
    if k == "shape":
        objs = [o for o in scene.objects if o.colour == q["colour"]]
        return objs[0].shape if len(objs) == 1 else None
    if k == "relation":
        a = [o for o in scene.objects if (o.colour, o.shape) == (q["a"]["colour"], q["a"]["shape"])]
        b = [o for o in scene.objects if (o.colour, o.shape) == (q["b"]["colour"], q["b"]["shape"])]
        if len(a) != 1 or len(b) != 1 or a[0] is b[0]:
            return None
        return "yes" if q["relation"] in object_relations(a[0], b[0]) else "no"
    raise ValueError(f"unknown question kind {k!r}")


def sample_question(scene: Scene, rng: random.Random, split: str) -> dict:
    """A random question that applies to the scene (answers balanced where it is cheap)."""
    objs = scene.objects
    unique = [o for o in objs if scene.count(o.colour, o.shape) == 1]
    options = ["count_all", "count_colour", "count_shape", "exist", "exist"]
    if any(scene.count(shape=o.shape) == 1 for o in objs):
        options.append("colour")
    if any(scene.count(colour=o.colour) == 1 for o in objs):
        options.append("shape")
    if len(unique) >= 2:
        options += ["relation", "relation"]
    kind = rng.choice(options)
    if kind == "count_all":
        return {"kind": kind}
    if kind == "count_colour":
        return {"kind": kind, "colour": rng.choice([o.colour for o in objs] + [rng.choice(G.COLOURS)])}
    if kind == "count_shape":
        return {"kind": kind, "shape": rng.choice([o.shape for o in objs] + [rng.choice(G.SHAPES)])}
    if kind == "colour":
        return {"kind": kind, "shape": rng.choice([o.shape for o in objs if scene.count(shape=o.shape) == 1])}
    if kind == "shape":
        return {
            "kind": kind,
            "colour": rng.choice([o.colour for o in objs if scene.count(colour=o.colour) == 1]),
        }
    if kind == "exist":
        if rng.random() < 0.5:
            o = rng.choice(objs)
            return {"kind": kind, "colour": o.colour, "shape": o.shape}
        absent = [c for c in combos_for(split) if not scene.count(*c)]
        colour, shape = rng.choice(absent)
        return {"kind": kind, "colour": colour, "shape": shape}
    a, b = rng.sample(unique, 2)
    rels = sorted(object_relations(a, b))
    relation = rng.choice(rels) if rels and rng.random() < 0.5 else rng.choice(RELATIONS)
    return {
        "kind": "relation",
        "a": {"colour": a.colour, "shape": a.shape},
        "relation": relation,
        "b": {"colour": b.colour, "shape": b.shape},
    }


def _question_text(question: dict, rng: random.Random, split: str) -> str:
    return G.realise_question(question, rng.choice(G.templates_for(question["kind"], split)), rng)


# --------------------------------------------------------------------------- tasks


def scenes_for_spec(spec: dict, first: Scene, rng: random.Random, count: int, tries: int = 200) -> list[Scene]:
    """`count` scenes that all fit `spec` exactly (`first` and count - 1 others with the same objects at new
    places and sizes, each passing every verdict of `check_spec`, relations included); fewer when `tries`
    random placements do not find them (a crowded scene with a relation)."""
    from mmgen.data.judge import check_spec

    combos = [(o.colour, o.shape) for o in first.objects]
    scenes = [first]
    for _ in range(tries):
        if len(scenes) == count:
            break
        scene = sample_scene(rng, combos=combos)
        if all(check_spec(spec, scene.objects).values()):
            scenes.append(scene)
    return scenes


def _t2i(rng, split, res, max_objects=4, particles=1):
    scene = sample_scene(rng, split=split, max_objects=max_objects)
    spec = scene_spec(scene, rng)
    prompt = G.realise_request("t2i", spec, rng.choice(G.templates_for("t2i", split)), rng)
    scenes = scenes_for_spec(spec, scene, rng, particles) if particles > 1 else [scene]
    image = {"images": [render(s, res) for s in scenes]} if particles > 1 else {"image": render(scene, res)}
    segs = [{"text": f"{USER}{prompt}{END}{ASSISTANT}"}, image, {"text": END}]
    return segs, {"scenes": [s.to_dict() for s in scenes], "prompt": spec}


def _caption(rng, split, res, max_objects=4):
    scene = sample_scene(rng, split=split, max_objects=max_objects)
    spec = scene_spec(scene, rng)
    ask = rng.choice(G.templates_for("describe", split))
    caption = G.realise_request("caption", spec, rng.choice(G.templates_for("caption", split)), rng)
    segs = [{"text": USER}, {"image": render(scene, res)}, {"text": f"{ask}{END}{ASSISTANT}{caption}{END}"}]
    return segs, {"scenes": [scene.to_dict()], "caption": spec}


def _vqa(rng, split, res, max_objects=4):
    scene = sample_scene(rng, split=split, max_objects=max_objects)
    question = sample_question(scene, rng, split)
    answer = answer_question(question, scene)
    text = f"{_question_text(question, rng, split)}{END}{ASSISTANT}{G.realise_answer(answer)}{END}"
    segs = [{"text": USER}, {"image": render(scene, res)}, {"text": text}]
    return segs, {"scenes": [scene.to_dict()], "question": question, "answer": answer}


def _multiturn(rng, split, res, max_objects=4):
    """Draw one object, then add objects (mostly relative to the last one), with questions; 2..4 objects
    (1..`max_objects` when that is below 2)."""
    combos = list(combos_for(split))
    need_heldout = split in ("heldout_combos", "heldout")
    num_objects = rng.randint(min(2, max_objects), max_objects)
    heldout_at = rng.randrange(num_objects) if need_heldout else -1
    scenes, turns, segs = [], [], []
    scene = Scene(())
    for k in range(num_objects):
        colour, shape = rng.choice(sorted(HELDOUT_COMBOS)) if k == heldout_at else rng.choice(combos)
        relation = rng.choice(RELATIONS) if k > 0 and rng.random() < 0.8 else None
        new = place_object(rng, scene, colour, shape, relation=relation, ref=k - 1 if relation else None)
        if new is None and relation is not None:  # no room in that direction: add anywhere
            relation, new = None, place_object(rng, scene, colour, shape)
        if new is None:
            break
        scene = new
        if k == 0:
            spec = {"objects": [{"colour": colour, "shape": shape, "count": 1}], "relations": []}
            user = G.realise_request("t2i", spec, rng.choice(G.templates_for("t2i", split)), rng)
            meaning = {"kind": "t2i", "spec": spec}
        else:
            user = G.realise_add(colour, shape, relation, rng.choice(G.templates_for("add", split)), rng)
            meaning = {"kind": "add", "object": {"colour": colour, "shape": shape}, "relation": relation}
        segs += [{"text": f"{USER}{user}{END}{ASSISTANT}"}, {"image": render(scene, res)}, {"text": END}]
        turns.append({"user": meaning, "image": len(scenes), "answer": None})
        scenes.append(scene.to_dict())
        if k > 0 and rng.random() < 0.3 or k == num_objects - 1:
            question = sample_question(scene, rng, split)
            answer = answer_question(question, scene)
            segs.append(
                {
                    "text": f"{USER}{_question_text(question, rng, split)}{END}{ASSISTANT}"
                    f"{G.realise_answer(answer)}{END}"
                }
            )
            turns.append(
                {"user": {"kind": "question", "question": question}, "image": None, "answer": answer}
            )
    return segs, {"scenes": scenes, "turns": turns}


_BUILDERS = {"t2i": _t2i, "caption": _caption, "vqa": _vqa, "multiturn": _multiturn}


def _merge_text(segments: list[dict]) -> list[dict]:
    out: list[dict] = []
    for s in segments:
        if "text" in s and out and "text" in out[-1]:
            out[-1] = {"text": out[-1]["text"] + s["text"]}
        else:
            out.append(s)
    return out


def make_document(
    index: int,
    *,
    seed: int,
    split: str = "train",
    resolution: int = 32,
    tasks: Sequence[str] | Mapping[str, float] | None = None,
    max_objects: int = 4,
    particles: int = 1,
    t2i_max_objects: int | None = None,
) -> dict:
    """Document number `index` of the stream (seed, split): the same whatever else is drawn.

    `tasks`: the document kinds and their mix (see `parse_task_weights`; default `TASK_WEIGHTS`).
    `max_objects` (1..4): the most objects in a scene (a curriculum's first stage: 1); at 4 the documents are
    those of every earlier version. `particles` M > 1: each text-to-image document answers its prompt with M
    different scenes in one image slot (`{"images": [...]}`); M = 1 gives the documents of every earlier version.
    `t2i_max_objects`: the most objects in a text-to-image scene (None = `max_objects`), so the drawing tasks can
    dwell on few objects while captions, questions and multi-turn documents keep up to `max_objects`."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
    if not 1 <= max_objects <= 4:
        raise ValueError(f"max_objects must be in 1..4, got {max_objects}")
    if particles < 1:
        raise ValueError(f"particles must be >= 1, got {particles}")
    if t2i_max_objects is not None and not 1 <= t2i_max_objects <= max_objects:
        raise ValueError(f"t2i_max_objects must be in 1..max_objects={max_objects}, got {t2i_max_objects}")
    weights = parse_task_weights(tasks)
    rng = random.Random(f"mmgen-shapes/{seed}/{split}/{index}")
    task = rng.choices(list(weights), weights=list(weights.values()))[0]
    extra = {"particles": particles} if task == "t2i" else {}
    most = t2i_max_objects if task == "t2i" and t2i_max_objects is not None else max_objects
    segments, meta = _BUILDERS[task](rng, split, resolution, most, **extra)
    meta = {"task": task, "split": split, "index": index, "seed": seed, "resolution": resolution, **meta}
    return {"segments": _merge_text(segments), "meta": meta}


def iter_documents(
    num_docs: int | None,
    *,
    seed: int,
    split: str = "train",
    resolution: int = 32,
    tasks: Sequence[str] | Mapping[str, float] | None = None,
    start: int = 0,
    max_objects: int = 4,
    particles: int = 1,
    t2i_max_objects: int | None = None,
) -> Iterator[dict]:
    """Documents start .. start+num_docs-1 of the deterministic stream (endless if num_docs is None)."""
    index = start
    while num_docs is None or index < start + num_docs:
        yield make_document(index, seed=seed, split=split, resolution=resolution, tasks=tasks,
                            max_objects=max_objects, particles=particles, t2i_max_objects=t2i_max_objects)
        index += 1


# --------------------------------------------------------------------------- tokenizer corpus


def grammar_corpus(num_lines: int, seed: int = 0) -> list[str]:
    """max(num_lines, ~150) plain-text lines for training the tokenizer: every template of
    every split, every colour/shape/number/relation phrase and every answer appears at least
    once (the first lines enumerate them), then random sentences; no chat role tokens."""
    rng = random.Random(f"mmgen-shapes-corpus/{seed}")
    lines: list[str] = []
    for c in G.COLOURS:
        for s in G.SHAPES:
            for n in range(1, 5):
                spec = {"objects": [{"colour": c, "shape": s, "count": n}], "relations": []}
                lines.append(G.realise_request("caption", spec, "There {be} {desc}.", rng))
            lines += [G.realise_answer(c), G.realise_answer(s), G.fill("{Shape}.", shape=s)]
    lines += [G.realise_answer(a) for a in ("yes", "no", 0)]
    for rel in RELATIONS:
        for p in G.REL_PHRASES[rel]:
            lines.append(f"An orange circle {p} a purple triangle.")
        for p in G.REL_IT_PHRASES[rel]:
            lines.append(f"Now add a cyan square {p}.")
    for split in ("train", "heldout"):
        for kind in G.TRAIN_TEMPLATES:
            for template in G.templates_for(kind, split):
                lines.append(_random_sentence(kind, template, rng))
    while len(lines) < num_lines:
        kind = rng.choice(tuple(G.TRAIN_TEMPLATES))
        template = rng.choice(G.TRAIN_TEMPLATES[kind] + G.HELDOUT_TEMPLATES[kind])
        lines.append(_random_sentence(kind, template, rng))
        if rng.random() < 0.3:
            lines.append(
                G.realise_answer(
                    rng.choice(["yes", "no", rng.randint(0, 4), rng.choice(G.COLOURS), rng.choice(G.SHAPES)])
                )
            )
    return lines


def _random_sentence(kind: str, template: str, rng: random.Random) -> str:
    """A random grammatical sentence of `kind` (meanings drawn directly: no scene, no answer)."""
    combo = lambda: rng.choice(TRAIN_COMBOS if rng.random() < 0.8 else tuple(sorted(HELDOUT_COMBOS)))
    if kind in ("caption", "t2i"):
        groups, total = [], rng.randint(1, 4)
        while total:
            n = rng.randint(1, total)
            colour, shape = combo()
            groups.append({"colour": colour, "shape": shape, "count": n})
            total -= n
        spec = {"objects": groups, "relations": []}
        if len(groups) == 1 and groups[0]["count"] == 1 and rng.random() < 0.5:
            colour, shape = combo()
            groups.append({"colour": colour, "shape": shape, "count": 1})
            spec["relations"] = [{"a": 0, "relation": rng.choice(RELATIONS), "b": 1}]
        return G.realise_request(kind, spec, template, rng)
    if kind == "describe":
        return template
    colour, shape = combo()
    if kind == "add":
        return G.realise_add(colour, shape, rng.choice((None,) + RELATIONS), template, rng)
    q = {"kind": kind, "colour": colour, "shape": shape}
    if kind == "relation":
        c2, s2 = combo()
        q = {
            "kind": kind,
            "a": {"colour": colour, "shape": shape},
            "relation": rng.choice(RELATIONS),
            "b": {"colour": c2, "shape": s2},
        }
    return G.realise_question(q, template, rng)
