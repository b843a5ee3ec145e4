"""Interleaved multi-turn programs: "draw ...", "now add ...", "how many ...?", the model's own images in context.

Programs are the held-out split's multi-turn documents. The model answers turn by turn: its context is
the program's user turns so far plus ITS OWN replies (text and generated images), never the reference
images. Per turn it may emit text, images (<|boi|>) or both; it stops at <|end|>.

Judging (from files only):
- every generated image against the scene accumulated so far: valid, exactly the requested (colour,
  shape) objects (counted), and every stated relation ("add X to its right": X right of the object added
  before it) holding by GenEval's rule;
- every answer against the reference answer of the program (the scene as requested), and, as a
  consistency score, against the model's own last image as the judge decodes it;
- image emission per turn: precision = turns with an image that asked for one / turns with an image,
  recall = turns with an image that asked for one / turns that asked for one.

Files: run_dir/images/PPPPP_TT_K.png and run_dir/metadata.jsonl (one row per turn: program, turn, user
text and meaning, expects_image, the accumulated request, the reference answer, the model's text and
image paths); `judge_interleaved_run` writes scores.jsonl.
"""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path

from PIL import Image
from tqdm import tqdm

from mmgen.data.judge import judge_image, relations_between, score_answer
from mmgen.data.shapes_docs import answer_question, iter_documents
from mmgen.evaluation.quick import TEST_SEED, accuracy, wilson

_USER = re.compile(r"<\|user\|>(.*?)<\|end\|>", re.DOTALL)


def programs(split: str, n: int, seed: int = TEST_SEED) -> list[dict]:
    """Multi-turn programs: {"program", "turns": [{"user", "meaning", "expects_image", "answer", "request"}]}.

    `request` (image turns) is the accumulated scene as asked for: {"objects": [[colour, shape], ...],
    "relations": [[i, relation, j], ...]} (object i stands in `relation` to object j)."""
    out = []
    for doc in iter_documents(n, seed=seed + 4, split=split, tasks=["multiturn"]):
        text = "".join(s["text"] for s in doc["segments"] if "text" in s)
        users = _USER.findall(text)
        meta_turns = doc["meta"]["turns"]
        assert len(users) == len(meta_turns), (users, meta_turns)
        objects, relations, turns = [], [], []
        for user, t in zip(users, meta_turns):
            m = t["user"]
            if m["kind"] == "t2i":
                g = m["spec"]["objects"][0]
                objects.append([g["colour"], g["shape"]])
            elif m["kind"] == "add":
                objects.append([m["object"]["colour"], m["object"]["shape"]])
                if m["relation"]:
                    relations.append([len(objects) - 1, m["relation"], len(objects) - 2])
            turns.append({"user": user, "meaning": m, "expects_image": t["image"] is not None,
                          "answer": t["answer"],
                          "request": {"objects": [list(o) for o in objects], "relations": [list(r) for r in relations]}})  # fmt: skip
        out.append({"program": doc["meta"]["index"], "turns": turns})
    return out


def generate_interleaved_run(model, processor, progs: list[dict], run_dir: Path, *, num_steps: int = 4,
                             guidance: float = 1.0, seed: int = 0, max_new_tokens: int = 32,
                             batch_size: int = 32) -> Path:  # fmt: skip
    """Run the programs turn by turn (batched across programs) and write the transcript files."""
    from mmgen.evaluation.shapeeval import write_jsonl
    from mmgen.generation import Finished, GeneratedImage, TextDelta, generate_interleaved

    run_dir = Path(run_dir)
    (run_dir / "images").mkdir(parents=True, exist_ok=True)
    contexts = {p["program"]: [] for p in progs}  # segments so far (the model's own replies)
    rows = []
    max_turns = max(len(p["turns"]) for p in progs)
    bar = tqdm(total=sum(len(p["turns"]) for p in progs), desc="interleaved", leave=False)
    for t in range(max_turns):
        live = [p for p in progs if len(p["turns"]) > t]
        for start in range(0, len(live), batch_size):
            chunk = live[start : start + batch_size]
            docs = []
            for p in chunk:
                segs = contexts[p["program"]] + [{"text": f"<|user|>{p['turns'][t]['user']}<|end|><|assistant|>"}]
                docs.append({"segments": _merge(segs)})
            replies = [[] for _ in chunk]  # per row: segments of the reply in order
            seeds = [seed + 1000 * p["program"] + t for p in chunk]
            for part in generate_interleaved(model, processor, docs, max_new_tokens=max_new_tokens,
                                             num_steps=num_steps, guidance=guidance, seed=seeds,
                                             add_generation_prompt=False):  # fmt: skip
                if isinstance(part, TextDelta):
                    replies[part.row].append({"text": part.text})
                elif isinstance(part, GeneratedImage):
                    replies[part.row].append({"image": part.image})
                elif isinstance(part, Finished):
                    pass
            for p, doc, reply in zip(chunk, docs, replies):
                reply = _merge(reply)
                names, text = [], ""
                for seg in reply:
                    if "image" in seg:
                        name = f"images/{p['program']:05d}_{t:02d}_{len(names)}.png"
                        seg["image"].save(run_dir / name)
                        names.append(name)
                    else:
                        text += seg["text"]
                contexts[p["program"]] = _merge(doc["segments"] + reply + [{"text": "<|end|>"}])
                turn = p["turns"][t]
                rows.append({"program": p["program"], "turn": t, **turn, "output": text, "images": names,
                             "num_steps": num_steps, "guidance": guidance})  # fmt: skip
            bar.update(len(chunk))
    bar.close()
    rows.sort(key=lambda r: (r["program"], r["turn"]))
    write_jsonl(run_dir / "metadata.jsonl", rows)
    return run_dir


def _merge(segments: list[dict]) -> list[dict]:
    out: list[dict] = []
    for s in segments:
        if "text" in s and out and "text" in out[-1]:
            out[-1] = {"text": out[-1]["text"] + s["text"]}
        elif "text" not in s or s["text"]:
            out.append(s)
    return out


def request_verdict(request: dict, judgement) -> bool:
    """An image against the accumulated request: valid, exactly the requested objects, relations hold."""
    objs = judgement.objects
    if not judgement.valid:
        return False
    if Counter((o.colour, o.shape) for o in objs) != Counter(tuple(o) for o in request["objects"]):
        return False
    for i, relation, j in request["relations"]:
        a = [o for o in objs if [o.colour, o.shape] == list(request["objects"][i])]
        b = [o for o in objs if [o.colour, o.shape] == list(request["objects"][j])]
        if not any(relation in relations_between(x, y) for x in a for y in b if x is not y):
            return False
    return True


def emission_stats(turns: list[dict]) -> dict:
    """Precision/recall of image emission over turns ({"expects_image": bool, "images": list}) with Wilson CIs."""
    tp = sum(1 for t in turns if t["expects_image"] and t["images"])
    emitted = sum(1 for t in turns if t["images"])
    expected = sum(1 for t in turns if t["expects_image"])
    return {
        "precision": tp / emitted if emitted else float("nan"), "precision_ci95": list(wilson(tp, emitted)),
        "recall": tp / expected if expected else float("nan"), "recall_ci95": list(wilson(tp, expected)),
        "true_positive_turns": tp, "turns_with_image": emitted, "turns_asking_for_image": expected,
        "num_turns": len(turns),
    }  # fmt: skip


def judge_interleaved_run(run_dir: Path) -> dict:
    from mmgen.evaluation.shapeeval import read_jsonl, write_jsonl

    run_dir = Path(run_dir)
    rows = read_jsonl(run_dir / "metadata.jsonl")
    scored, last_scene = [], {}
    for row in rows:
        images = []
        for name in row["images"]:
            with Image.open(run_dir / name) as im:
                j = judge_image(im.convert("RGB"))
            images.append({"image": name, "correct": request_verdict(row["request"], j), "valid": j.valid})
            last_scene[row["program"]] = j.scene
        s = {"program": row["program"], "turn": row["turn"], "expects_image": row["expects_image"],
             "images": images}  # fmt: skip
        if row["answer"] is not None:
            s["answer_correct"] = score_answer(row["output"], row["answer"])
            own = last_scene.get(row["program"])
            q = row["meaning"]["question"]
            own_answer = answer_question(q, own) if own is not None else None
            s["answer_consistent"] = own_answer is not None and score_answer(row["output"], own_answer)
        scored.append(s)
    write_jsonl(run_dir / "scores.jsonl", scored)
    return summarise_interleaved(scored)


def summarise_interleaved(scored: list[dict]) -> dict:
    image_turns = [s for s in scored if s["expects_image"]]
    return {
        "image_accuracy": accuracy([im["correct"] for s in scored for im in s["images"]]),
        "image_turn_success": accuracy([bool(s["images"]) and s["images"][-1]["correct"] for s in image_turns]),
        "answer_accuracy": accuracy([s["answer_correct"] for s in scored if "answer_correct" in s]),
        "answer_consistency_with_own_image": accuracy(
            [s["answer_consistent"] for s in scored if "answer_consistent" in s]
        ),
        "emission": emission_stats([{"expects_image": s["expects_image"], "images": s["images"]} for s in scored]),
        "num_programs": len({s["program"] for s in scored}),
    }
