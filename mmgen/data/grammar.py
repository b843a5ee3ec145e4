"""The shapes-world grammar: templates that realise meanings as text, and the parser back.

Meanings are small JSON-able dicts:
- a *spec* (what a caption or a text-to-image request says about a scene):
  {"objects": [{"colour", "shape", "count"}, ...], "relations": [{"a": i, "relation": r, "b": j}]}
  where a relation refers to object groups by index (both of count 1): "group a is r group b".
- a *question*: {"kind": "count_all"} | {"kind": "count_colour", "colour"} |
  {"kind": "count_shape", "shape"} | {"kind": "colour", "shape"} | {"kind": "shape", "colour"} |
  {"kind": "relation", "a": {"colour", "shape"}, "relation": r, "b": {...}} |
  {"kind": "exist", "colour", "shape"};
- an *answer*: "yes" | "no" | int 0..4 | a colour | a shape.

Every meaning kind has several paraphrase templates; the last template(s) of each kind in
`HELDOUT_TEMPLATES` never appear in the "train" split. `parse_text` maps any text the
templates can produce (any split) back to its meaning, and returns None for anything else,
so a model's caption or answer is scored through exactly the grammar that taught it.
"""

from __future__ import annotations

import random
import re

from mmgen.data.shapes import COLOURS, SHAPES

NUMBER_WORDS = ("zero", "one", "two", "three", "four")
REL_PHRASES = {  # "A <phrase> B": A stands in the relation to B
    "left of": ("left of", "to the left of", "on the left of"),
    "right of": ("right of", "to the right of", "on the right of"),
    "above": ("above", "over"),
    "below": ("below", "under", "beneath"),
}
REL_IT_PHRASES = {  # "add A <phrase>": A stands in the relation to "it" (the last object added)
    "left of": ("to its left", "left of it", "on its left"),
    "right of": ("to its right", "right of it", "on its right"),
    "above": ("above it", "over it"),
    "below": ("below it", "under it", "beneath it"),
}

TRAIN_TEMPLATES: dict[str, tuple[str, ...]] = {
    "caption": ("{Desc}.", "There {be} {desc}.", "The image shows {desc}.", "This is a picture of {desc}."),
    "t2i": ("Draw {desc}.", "Please draw {desc}.", "Generate an image of {desc}.", "Show me {desc}."),
    "describe": ("Describe the image.", "What is in the image?", "What do you see?"),
    "add": ("Now add {np}{rel_it}.", "Add {np}{rel_it}.", "Next, add {np}{rel_it}."),
    "count_all": ("How many shapes are there?", "How many objects are in the image?", "Count the shapes."),
    "count_colour": (
        "How many {colour} shapes are there?",
        "How many {colour} objects are in the image?",
        "Count the {colour} shapes.",
    ),
    "count_shape": (
        "How many {shapes} are there?",
        "How many {shapes} are in the image?",
        "Count the {shapes}.",
    ),
    "colour": (
        "What colour is the {shape}?",
        "What is the colour of the {shape}?",
        "Which colour does the {shape} have?",
    ),
    "shape": (
        "What shape is the {colour} object?",
        "What is the shape of the {colour} object?",
        "Which shape is {colour}?",
    ),
    "relation": ("Is the {obj_a} {rel} the {obj_b}?", "Is the {obj_a} located {rel} the {obj_b}?"),
    "exist": ("Is there {np}?", "Does the image contain {np}?", "Can you see {np}?"),
}
HELDOUT_TEMPLATES: dict[str, tuple[str, ...]] = {
    "caption": ("In this picture you can see {desc}.",),
    "t2i": ("Can you paint {desc}?",),
    "describe": ("Write a caption for this image.",),
    "add": ("Put {np}{rel_it} as well.",),
    "count_all": ("What is the number of shapes?",),
    "count_colour": ("What is the number of {colour} shapes?",),
    "count_shape": ("What is the number of {shapes}?",),
    "colour": ("Tell me the colour of the {shape}.",),
    "shape": ("Name the shape of the {colour} object.",),
    "relation": ("Would you say the {obj_a} is {rel} the {obj_b}?",),
    "exist": ("Is {np} in the picture?",),
}
# Answers have ONE realisation each (exact targets); the parser also accepts the variants.
ANSWER_TEMPLATES = {
    "yesno": ("{Yesno}.",),
    "number": ("{Number}.",),
    "colour": ("{Colour}.",),
    "shape": ("A {shape}.", "{Shape}."),
}
QUESTION_KINDS = ("count_all", "count_colour", "count_shape", "colour", "shape", "relation", "exist")


def templates_for(kind: str, split: str) -> tuple[str, ...]:
    """Templates of `kind` usable in `split`: held-out templates only in heldout_templates/heldout."""
    if kind not in TRAIN_TEMPLATES:
        raise ValueError(f"unknown template kind {kind!r}; expected one of {tuple(TRAIN_TEMPLATES)}")
    if split in ("train", "heldout_combos"):
        return TRAIN_TEMPLATES[kind]
    if split in ("heldout_templates", "heldout"):
        return HELDOUT_TEMPLATES[kind]
    raise ValueError(f"unknown split {split!r}")


# --------------------------------------------------------------------------- realisation


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def noun_phrase(colour: str, shape: str, count: int = 1) -> str:
    if count == 1:
        return f"{_article(colour)} {colour} {shape}"
    return f"{NUMBER_WORDS[count]} {colour} {shape}s"


def realise_spec(spec: dict, rng: random.Random) -> str:
    """The descriptive phrase of a spec: "a red circle left of a blue square" or a list."""
    groups = spec["objects"]
    nps = [noun_phrase(g["colour"], g["shape"], g["count"]) for g in groups]
    rels = spec.get("relations") or []
    if rels:
        if len(rels) != 1 or len(groups) != 2:
            raise ValueError(f"a spec with a relation must hold exactly 2 groups and 1 relation: {spec}")
        r = rels[0]
        return f"{nps[r['a']]} {rng.choice(REL_PHRASES[r['relation']])} {nps[r['b']]}"
    return nps[0] if len(nps) == 1 else ", ".join(nps[:-1]) + " and " + nps[-1]


def _capitalise(text: str) -> str:
    return text[:1].upper() + text[1:]


def fill(template: str, **slots: str) -> str:
    """Fill `{slot}` / `{Slot}` (capitalised value) placeholders; sentence-initial capital."""

    def sub(m: re.Match) -> str:
        name = m.group(1)
        value = slots[name.lower()]
        return _capitalise(value) if name[0].isupper() else value

    return _capitalise(re.sub(r"\{(\w+)\}", sub, template))


def realise_request(kind: str, spec: dict, template: str, rng: random.Random) -> str:
    """A caption ("caption") or a text-to-image request ("t2i") for `spec`."""
    desc = realise_spec(spec, rng)
    be = "is" if spec["objects"][0]["count"] == 1 else "are"
    return fill(template, desc=desc, be=be)


def realise_add(colour: str, shape: str, relation: str | None, template: str, rng: random.Random) -> str:
    rel_it = "" if relation is None else " " + rng.choice(REL_IT_PHRASES[relation])
    return fill(template, np=noun_phrase(colour, shape), rel_it=rel_it)


def realise_question(question: dict, template: str, rng: random.Random) -> str:
    q = question
    slots = {}
    if "colour" in q:
        slots["colour"] = q["colour"]
    if "shape" in q:
        slots["shape"], slots["shapes"] = q["shape"], q["shape"] + "s"
    if q["kind"] == "exist":
        slots["np"] = noun_phrase(q["colour"], q["shape"])
    if q["kind"] == "relation":
        slots["obj_a"] = f"{q['a']['colour']} {q['a']['shape']}"
        slots["obj_b"] = f"{q['b']['colour']} {q['b']['shape']}"
        slots["rel"] = rng.choice(REL_PHRASES[q["relation"]])
    return fill(template, **slots)


def realise_answer(answer) -> str:
    if isinstance(answer, bool):
        raise TypeError("answers use 'yes'/'no', not booleans")
    if isinstance(answer, int):
        return fill(ANSWER_TEMPLATES["number"][0], number=NUMBER_WORDS[answer])
    if answer in ("yes", "no"):
        return fill(ANSWER_TEMPLATES["yesno"][0], yesno=answer)
    if answer in COLOURS:
        return fill(ANSWER_TEMPLATES["colour"][0], colour=answer)
    if answer in SHAPES:
        return fill(ANSWER_TEMPLATES["shape"][0], shape=answer)
    raise ValueError(f"not an answer of the shapes grammar: {answer!r}")


# --------------------------------------------------------------------------- parsing

_COLOUR = "|".join(COLOURS)
_SHAPE = "|".join(SHAPES)
_NUM = "|".join(NUMBER_WORDS[1:])
_NP = rf"(?:a|an|{_NUM}) (?:{_COLOUR}) (?:{_SHAPE})s?"
_NP_PARTS = re.compile(rf"(a|an|{_NUM}) ({_COLOUR}) ({_SHAPE})(s?)")
_NP_SINGLE = rf"(?:a|an|one) (?:{_COLOUR}) (?:{_SHAPE})"


def _alternation(phrases) -> str:
    return "|".join(re.escape(p) for p in sorted(phrases, key=len, reverse=True))


_REL_OF = {p: r for r, ps in REL_PHRASES.items() for p in ps}
_REL_IT_OF = {p: r for r, ps in REL_IT_PHRASES.items() for p in ps}
_SLOT_RE = {
    "desc": r"(?P<desc>.+?)",
    "be": r"(?:is|are)",
    "np": rf"(?P<np>{_NP_SINGLE})",
    "rel_it": rf"(?P<rel_it>(?: (?:{_alternation(_REL_IT_OF)}))?)",
    "colour": rf"(?P<colour>{_COLOUR})",
    "shape": rf"(?P<shape>{_SHAPE})",
    "shapes": rf"(?P<shapes>(?:{_SHAPE})s)",
    "obj_a": rf"(?P<obj_a>(?:{_COLOUR}) (?:{_SHAPE}))",
    "obj_b": rf"(?P<obj_b>(?:{_COLOUR}) (?:{_SHAPE}))",
    "rel": rf"(?P<rel>{_alternation(_REL_OF)})",
    "yesno": r"(?P<yesno>yes|no)",
    "number": r"(?P<number>zero|one|two|three|four)",
}


def _compile(template: str) -> re.Pattern:
    parts = re.split(r"\{(\w+)\}", template.lower())
    out = [re.escape(p) if i % 2 == 0 else _SLOT_RE[p] for i, p in enumerate(parts)]
    return re.compile("".join(out))


_PATTERNS: list[tuple[str, int, bool, re.Pattern]] = []  # (kind, index, heldout, regex)
for _kind, _train in TRAIN_TEMPLATES.items():
    for _i, _t in enumerate(_train + HELDOUT_TEMPLATES[_kind]):
        _PATTERNS.append((_kind, _i, _i >= len(_train), _compile(_t)))
for _kind, _ts in ANSWER_TEMPLATES.items():
    for _i, _t in enumerate(_ts):
        _PATTERNS.append(("answer_" + _kind, _i, False, _compile(_t)))


def _parse_np(text: str) -> dict | None:
    m = _NP_PARTS.fullmatch(text)
    if m is None:
        return None
    det, colour, shape, plural = m.groups()
    count = 1 if det in ("a", "an") else NUMBER_WORDS.index(det)
    if (count == 1) == bool(plural):  # number agreement: "two red circle" is not grammatical
        return None
    return {"colour": colour, "shape": shape, "count": count}


def parse_spec(desc: str) -> dict | None:
    """Inverse of `realise_spec` (lower-case input); None when not in the grammar."""
    m = re.fullmatch(rf"({_NP}) ({_alternation(_REL_OF)}) ({_NP})", desc)
    if m:
        a, b = _parse_np(m.group(1)), _parse_np(m.group(3))
        if a and b and a["count"] == 1 and b["count"] == 1:
            return {"objects": [a, b], "relations": [{"a": 0, "relation": _REL_OF[m.group(2)], "b": 1}]}
        return None
    head, sep, last = desc.rpartition(" and ")
    pieces = (head.split(", ") + [last]) if sep else [desc]
    groups = [_parse_np(p) for p in pieces]
    if not 1 <= len(groups) <= 4 or any(g is None for g in groups):
        return None
    return {"objects": groups, "relations": []}


_SPECIAL = re.compile(r"<\|[a-z_0-9]+\|>|</?s>")


def normalise(text: str) -> str:
    return " ".join(_SPECIAL.sub(" ", text).lower().split())


def parse_text(text: str) -> dict | None:
    """Meaning of a grammar sentence, or None. Returns one of
    {"kind": "caption" | "t2i", "spec": spec, ...}, {"kind": "describe", ...},
    {"kind": "add", "object": {"colour", "shape"}, "relation": r | None, ...},
    {"kind": "question", "question": question, ...}, {"kind": "answer", "answer": value};
    all but answers also carry "template" (index) and "heldout" (bool)."""
    text = normalise(text)
    for kind, index, heldout, pattern in _PATTERNS:
        m = pattern.fullmatch(text)
        if m is None:
            continue
        g = m.groupdict()
        info = {"template": index, "heldout": heldout}
        if kind.startswith("answer_"):
            if g.get("yesno"):
                return {"kind": "answer", "answer": g["yesno"]}
            if g.get("number"):
                return {"kind": "answer", "answer": NUMBER_WORDS.index(g["number"])}
            return {"kind": "answer", "answer": g.get("colour") or g.get("shape")}
        if kind in ("caption", "t2i"):
            spec = parse_spec(g["desc"])
            if spec is None:
                continue
            return {"kind": kind, "spec": spec, **info}
        if kind == "describe":
            return {"kind": "describe", **info}
        if kind == "add":
            obj = _parse_np(g["np"])
            rel = _REL_IT_OF[g["rel_it"].strip()] if g["rel_it"] else None
            return {
                "kind": "add",
                "object": {"colour": obj["colour"], "shape": obj["shape"]},
                "relation": rel,
                **info,
            }
        q: dict = {"kind": kind}
        if g.get("colour"):
            q["colour"] = g["colour"]
        if g.get("shape"):
            q["shape"] = g["shape"]
        if g.get("shapes"):
            q["shape"] = g["shapes"][:-1]
        if g.get("np"):
            obj = _parse_np(g["np"])
            q["colour"], q["shape"] = obj["colour"], obj["shape"]
        if kind == "relation":
            ca, sa = g["obj_a"].split()
            cb, sb = g["obj_b"].split()
            q = {
                "kind": "relation",
                "a": {"colour": ca, "shape": sa},
                "relation": _REL_OF[g["rel"]],
                "b": {"colour": cb, "shape": sb},
            }
        return {"kind": "question", "question": q, **info}
    return None
