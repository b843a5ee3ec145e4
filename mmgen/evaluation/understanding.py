"""Image -> text: captioning (exact match and per attribute) and VQA by question type, through files.

`generate_understanding_run` renders the held-out caption/VQA documents' scenes to run_dir/images/, asks
the model (greedy, the training chat format) and writes run_dir/metadata.jsonl: one row per item with
the image, the question, the true scene/answer and the model's text. `judge_understanding_run` reads only
that file and scores with the grammar parser (`mmgen.data.judge.score_caption` / `score_answer`;
unparseable text is wrong).

VQA types: count (count_all / count_colour / count_shape), colour, shape, relation, exist_present and
exist_absent (a yes/no question about an object that is / is not in the image).
"""

from __future__ import annotations

from pathlib import Path

from PIL import Image
from tqdm import tqdm

from mmgen.data.judge import score_answer, score_caption
from mmgen.data.shapes import Scene, render
from mmgen.data.shapes_docs import iter_documents
from mmgen.evaluation.quick import TEST_SEED, accuracy

VQA_TYPES = ("count", "colour", "shape", "relation", "exist_present", "exist_absent")
CAPTION_ATTRIBUTES = ("counts", "colours", "shapes", "positions", "nothing_extra")


def question_type(question: dict, answer) -> str:
    kind = question["kind"]
    if kind.startswith("count"):
        return "count"
    if kind == "exist":
        return "exist_present" if answer == "yes" else "exist_absent"
    return kind


def _user_text(doc: dict) -> str:
    """The text after the image in a caption/VQA document, up to the assistant tag (the question)."""
    text = doc["segments"][2]["text"]
    return text.split("<|end|>")[0]


def understanding_items(split: str, num_captions: int, num_vqa: int, seed: int = TEST_SEED,
                        resolution: int = 32) -> list[dict]:  # fmt: skip
    """Caption and VQA items of `split` on the test seed (documents' own questions and templates)."""
    items = []
    for doc in iter_documents(num_captions, seed=seed + 2, split=split, tasks=["caption"], resolution=resolution):
        items.append({"task": "caption", "question": _user_text(doc), "scene": doc["meta"]["scenes"][0],
                      "doc_index": doc["meta"]["index"]})  # fmt: skip
    for doc in iter_documents(num_vqa, seed=seed + 3, split=split, tasks=["vqa"], resolution=resolution):
        m = doc["meta"]
        items.append({"task": "vqa", "question": _user_text(doc), "scene": m["scenes"][0], "doc_index": m["index"],
                      "question_meaning": m["question"], "answer": m["answer"],
                      "type": question_type(m["question"], m["answer"])})  # fmt: skip
    return items


def generate_understanding_run(model, processor, items: list[dict], run_dir: Path, *, resolution: int = 32,
                               batch_size: int = 32, max_new_tokens: int = 48) -> Path:  # fmt: skip
    from mmgen.evaluation.shapeeval import write_jsonl
    from mmgen.generation import TextDelta, caption_prompt, generate_interleaved

    run_dir = Path(run_dir)
    (run_dir / "images").mkdir(parents=True, exist_ok=True)
    rows = []
    for i, item in enumerate(items):
        name = f"images/{i:05d}.png"
        render(Scene.from_dict(item["scene"]), resolution).save(run_dir / name)
        rows.append({**item, "image": name})
    bar = tqdm(total=len(rows), desc="image->text", leave=False)
    for start in range(0, len(rows), batch_size):
        chunk = rows[start : start + batch_size]
        prompts = [caption_prompt(Image.open(run_dir / r["image"]).convert("RGB"), r["question"]) for r in chunk]
        texts = [""] * len(chunk)
        for part in generate_interleaved(model, processor, prompts, max_new_tokens=max_new_tokens,
                                         allow_images=False):  # fmt: skip
            if isinstance(part, TextDelta):
                texts[part.row] += part.text
        for row, text in zip(chunk, texts):
            row["output"] = text
        bar.update(len(chunk))
    bar.close()
    write_jsonl(run_dir / "metadata.jsonl", rows)
    return run_dir


def judge_understanding_run(run_dir: Path) -> dict:
    from mmgen.evaluation.shapeeval import read_jsonl, write_jsonl

    rows = read_jsonl(Path(run_dir) / "metadata.jsonl")
    scored = []
    for row in rows:
        if row["task"] == "caption":
            v = score_caption(row["output"], row["scene"])
            scored.append({"task": "caption", **v})
        else:
            scored.append({"task": "vqa", "type": row["type"], "correct": score_answer(row["output"], row["answer"])})
    write_jsonl(Path(run_dir) / "scores.jsonl", scored)
    return summarise_understanding(scored)


def summarise_understanding(scored: list[dict]) -> dict:
    caps = [s for s in scored if s["task"] == "caption"]
    out: dict = {"caption": {"exact_match": accuracy([s["correct"] for s in caps]),
                             "parsed": accuracy([s["parsed"] for s in caps]), "attributes": {}}}  # fmt: skip
    for attr in CAPTION_ATTRIBUTES:  # unparseable captions count as wrong on every attribute
        out["caption"]["attributes"][attr] = accuracy([bool(s.get(attr, False)) for s in caps])
    vqa = [s for s in scored if s["task"] == "vqa"]
    out["vqa"] = {"types": {}}
    for t in VQA_TYPES:
        flags = [s["correct"] for s in vqa if s["type"] == t]
        if flags:
            out["vqa"]["types"][t] = accuracy(flags)
    accs = [v["accuracy"] for v in out["vqa"]["types"].values()]
    out["vqa"]["macro_accuracy"] = sum(accs) / len(accs) if accs else float("nan")
    out["vqa"]["micro"] = accuracy([s["correct"] for s in vqa])
    return out
