"""ShapeEval: GenEval's six text-to-image tasks (Ghosh et al., "GenEval: An object-focused framework for
evaluating text-to-image alignment", NeurIPS 2023) on the shapes world, scored by the exact judge.

t2i documents do not name a task, so the task is derived from the prompt's spec (`prompt_class`):

    one object, count 1                     -> "single"   -> single_object | colors (alternating)
    two objects, count 1 each, no relation  -> "two"      -> two_object | colour_attr (alternating)
    one group, count >= 2                   -> counting
    two objects with a stated relation      -> position
    anything else (3-4 objects, mixed)      -> other (scored, reported, not in the overall mean)

Every task is judged as GenEval judges it, on the decoded scene of `mmgen.data.judge.judge_image`, and
only valid images (off-palette share, noise and shape fit within the judge's limits) can pass:
- single_object: exactly one object, of the requested shape (colour not checked);
- colors:        exactly one object, of the requested shape AND colour;
- two_object:    exactly two objects, with the requested shapes (colours not checked);
- colour_attr:   exactly two objects, each requested (colour, shape) pair present (binding checked);
- counting:      exactly N objects, all of the requested shape (colour not checked);
- position:      exactly the two requested (colour, shape) objects, in the stated GenEval relation.
Overall = the mean of the six task accuracies (GenEval's convention). The strict verdict of
`score_t2i` (every count, relation, nothing extra, valid) is stored per image too.

Generation and judging talk through files: `generate_t2i_run` writes one PNG per
prompt and `metadata.jsonl` (prompt text, spec, task, split, seed, steps, guidance); `judge_t2i_run`
reads only that directory and writes `scores.jsonl`.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

from PIL import Image
from tqdm import tqdm

from mmgen.data.judge import judge_image, relations_between, score_t2i
from mmgen.data.shapes_docs import iter_documents
from mmgen.evaluation.quick import TEST_SEED, accuracy, t2i_request

TASKS = ("single_object", "two_object", "counting", "colors", "position", "colour_attr")
_TASKS_OF_CLASS = {"single": ("single_object", "colors"), "two": ("two_object", "colour_attr")}


def prompt_class(spec: dict) -> str:
    """"single" | "two" | "counting" | "position" | "other" from a t2i prompt spec (see module docstring)."""
    groups, relations = spec["objects"], spec.get("relations") or []
    counts = [g["count"] for g in groups]
    if relations:
        return "position" if counts == [1, 1] else "other"
    if counts == [1]:
        return "single"
    if len(groups) == 1 and counts[0] >= 2:
        return "counting"
    if counts == [1, 1]:
        return "two"
    return "other"


def prompt_set(split: str, per_task: int, seed: int = TEST_SEED, max_docs: int = 200_000) -> list[dict]:
    """Up to `per_task` prompts for each of the six tasks (and as many "other") from t2i documents of `split`.

    Each item: {"prompt", "spec", "task", "split", "doc_index", "scene"}; "single" and "two" prompts go to
    their two tasks alternately, in stream order, so the tasks' prompt sets are disjoint.
    """
    want = {t: per_task for t in TASKS} | {"other": per_task}
    seen = Counter()
    out = []
    for doc in iter_documents(max_docs, seed=seed, split=split, tasks=["t2i"]):
        spec = doc["meta"]["prompt"]
        cls = prompt_class(spec)
        tasks = _TASKS_OF_CLASS.get(cls, (cls,))
        task = tasks[seen[cls] % len(tasks)]
        seen[cls] += 1
        request = t2i_request(doc)
        if want[task] <= 0 or request is None:
            continue
        want[task] -= 1
        out.append({"prompt": request, "spec": spec, "task": task, "split": split,
                    "doc_index": doc["meta"]["index"], "scene": doc["meta"]["scenes"][0]})  # fmt: skip
        if not any(want.values()):
            break
    return out


def task_verdict(task: str, spec: dict, judgement) -> bool:
    """GenEval's check of `task` for one judged image (see module docstring)."""
    objs = judgement.objects
    if not judgement.valid:
        return False
    groups = spec["objects"]
    if task == "single_object":
        return len(objs) == 1 and objs[0].shape == groups[0]["shape"]
    if task == "colors":
        return len(objs) == 1 and (objs[0].colour, objs[0].shape) == (groups[0]["colour"], groups[0]["shape"])
    if task == "two_object":
        return len(objs) == 2 and Counter(o.shape for o in objs) == Counter(g["shape"] for g in groups)
    if task == "colour_attr":
        want = Counter((g["colour"], g["shape"]) for g in groups)
        return len(objs) == 2 and Counter((o.colour, o.shape) for o in objs) == want
    if task == "counting":
        n, shape = groups[0]["count"], groups[0]["shape"]
        return len(objs) == n and all(o.shape == shape for o in objs)
    if task in ("position", "other"):
        if task == "other":
            return score_t2i(judgement, spec)["overall"]
        rel = spec["relations"][0]
        pick = lambda g: [o for o in objs if (o.colour, o.shape) == (g["colour"], g["shape"])]
        a, b = pick(groups[rel["a"]]), pick(groups[rel["b"]])
        return len(objs) == 2 and len(a) == 1 and len(b) == 1 and rel["relation"] in relations_between(a[0], b[0])
    raise ValueError(f"unknown ShapeEval task {task!r}")


# ------------------------------------------------------------------------------------- through files


def write_jsonl(path: Path, rows) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def generate_t2i_run(model, processor, prompts: list[dict], run_dir: Path, *, num_steps: int, guidance: float,
                     seed: int = 0, batch_size: int = 32) -> Path:
    """Images for `prompts` (prompt i uses noise seed `seed + i`: the same noise at every step count and
    guidance) -> run_dir/images/NNNNN.png + run_dir/metadata.jsonl."""
    from mmgen.generation import generate_images_for_prompts

    run_dir = Path(run_dir)
    (run_dir / "images").mkdir(parents=True, exist_ok=True)
    rows = []
    bar = tqdm(total=len(prompts), desc=f"t2i {run_dir.name}", leave=False)
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start : start + batch_size]
        seeds = [seed + start + i for i in range(len(chunk))]
        images = generate_images_for_prompts(model, processor, [p["prompt"] for p in chunk], num_steps=num_steps,
                                             guidance=guidance, seeds=seeds, batch_size=batch_size)  # fmt: skip
        for i, (p, image, s) in enumerate(zip(chunk, images, seeds)):
            name = f"images/{start + i:05d}.png"
            image.save(run_dir / name)
            rows.append({**p, "image": name, "seed": s, "num_steps": num_steps, "guidance": guidance})
        bar.update(len(chunk))
    bar.close()
    write_jsonl(run_dir / "metadata.jsonl", rows)
    return run_dir


def judge_t2i_run(run_dir: Path, resolution: int | None = None) -> list[dict]:
    """Score every image of a t2i run directory (reads only its files); writes and returns scores.jsonl rows."""
    run_dir = Path(run_dir)
    scores = []
    for row in read_jsonl(run_dir / "metadata.jsonl"):
        with Image.open(run_dir / row["image"]) as im:
            j = judge_image(im.convert("RGB"), resolution)
        strict = score_t2i(j, row["spec"])
        scores.append({
            "image": row["image"], "task": row["task"], "split": row["split"],
            "correct": bool(task_verdict(row["task"], row["spec"], j)), "strict": bool(strict["overall"]),
            "valid": bool(j.valid), "off_palette_share": j.off_palette_share, "num_objects": len(j.objects),
            "judgement": j.to_dict(),
        })  # fmt: skip
    write_jsonl(run_dir / "scores.jsonl", scores)
    return scores


def summarise_t2i(scores: list[dict]) -> dict:
    """Per task (accuracy, n, 95% Wilson interval), overall = mean of the six tasks, validity, off-palette."""
    out: dict = {"tasks": {}}
    for task in TASKS + ("other",):
        flags = [s["correct"] for s in scores if s["task"] == task]
        if flags:
            out["tasks"][task] = accuracy(flags)
    present = [out["tasks"][t]["accuracy"] for t in TASKS if t in out["tasks"]]
    out["overall"] = sum(present) / len(present) if present else float("nan")
    # CI of the overall mean: the mean of the tasks' Wilson bounds (conservative for a mean of independent
    # proportions, and never of zero width at 0 or 1 as the normal approximation would be)
    bounds = [out["tasks"][t]["ci95"] for t in TASKS if t in out["tasks"]]
    out["overall_ci95"] = [sum(b[0] for b in bounds) / len(bounds), sum(b[1] for b in bounds) / len(bounds)] if bounds else [float("nan")] * 2
    out["overall_tasks_present"] = len(present)
    out["strict"] = accuracy([s["strict"] for s in scores])
    out["validity"] = accuracy([s["valid"] for s in scores])
    n = len(scores)
    out["off_palette_share"] = sum(s["off_palette_share"] for s in scores) / n if n else float("nan")
    out["n"] = n
    return out
