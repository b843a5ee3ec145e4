"""End-of-run evaluation with the exact shapes judge, and the periodic sample grid.

Text->image: prompts from the shapes grammar on new seeds (test scenes, combinations seen in
training) and on the held-out combinations, one image per prompt forced after the assistant tag,
scored by `mmgen.data.judge.score_t2i` (overall = counts, positions, nothing extra, valid), at each
step count. Image->text: greedy captions of fresh renders scored by `score_caption` (parsed through
the grammar; unparseable = wrong). Every accuracy comes with a 95% Wilson interval.
The full report (GenEval-style tasks, VQA, interleaving, ShapeFD) is eval/run.py's job.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

from mmgen.data.judge import score_caption, score_t2i
from mmgen.data.shapes import Scene, render
from mmgen.data.shapes_docs import iter_documents

TEST_SEED = 1_000_003  # scenes and seeds never used by the training shards (which use data.seed)
_CHAT = re.compile(r"^<\|user\|>(?P<user>.*?)<\|end\|><\|assistant\|>$", re.DOTALL)


def t2i_request(doc: dict) -> str | None:
    """The user's request of a shapes-world text-to-image document (its first segment is the chat up to the
    assistant's turn), or None when the document is not laid out that way."""
    match = _CHAT.match(doc["segments"][0]["text"])
    return match["user"] if match else None


def wilson(successes: int, n: int, z: float = 1.96) -> tuple[float, float]:
    if n == 0:
        return (float("nan"), float("nan"))
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return (max(0.0, centre - half), min(1.0, centre + half))


def accuracy(flags: list[bool]) -> dict:
    k, n = sum(bool(f) for f in flags), len(flags)
    lo, hi = wilson(k, n)
    return {"accuracy": k / n if n else float("nan"), "n": n, "ci95": [lo, hi]}


def t2i_prompts(split: str, num_groups: int, n: int, seed: int = TEST_SEED) -> list[tuple[str, dict]]:
    """(user text, prompt spec) of t2i documents whose prompt names `num_groups` single objects."""
    out = []
    for doc in iter_documents(50 * n, seed=seed, split=split, tasks=["t2i"]):
        spec = doc["meta"]["prompt"]
        if len(spec["objects"]) == num_groups and all(o["count"] == 1 for o in spec["objects"]):
            request = t2i_request(doc)
            if request is not None:
                out.append((request, spec))
        if len(out) == n:
            break
    return out


def caption_set(split: str, n: int, seed: int = TEST_SEED, resolution: int = 32) -> list[tuple]:
    """(image, scene) pairs from caption documents of `split` on the test seed."""
    out = []
    for doc in iter_documents(n, seed=seed + 1, split=split, tasks=["caption"], resolution=resolution):
        scene = Scene.from_dict(doc["meta"]["scenes"][0])
        out.append((render(scene, resolution), scene))
    return out


SENSITIVITY_PROMPTS = ("Draw a red circle.", "Draw a blue square.", "Draw a green triangle.",
                       "Draw a yellow square.", "Draw a purple circle.", "Draw a white square.",
                       "Draw a cyan triangle.", "Draw an orange triangle.")


def prompt_sensitivity(model, processor, prompts=SENSITIVITY_PROMPTS, num_seeds: int = 4, num_steps: int = 1) -> dict:
    """Does the image follow the text? One-step latents z[prompt, seed] with the same noise per seed:

        ratio = mean over seeds of the mean distance between prompts
                / mean over prompts of the mean distance between seeds.

    0 = the prompt changes nothing (the model draws the same picture for every request); about 1 =
    changing the prompt moves the image as far as changing the noise. A scale-free early signal of
    text conditioning that exact-judge accuracies (0 until images are clean) do not give."""
    import torch

    from mmgen.generation import generate_images_for_prompts

    texts = [p for p in prompts for _ in range(num_seeds)]
    seeds = [s for _ in prompts for s in range(num_seeds)]
    _, lat = generate_images_for_prompts(model, processor, texts, num_steps=num_steps, seeds=seeds,
                                         return_latents=True)
    z = lat.float().reshape(len(prompts), num_seeds, -1)  # (P, S, D)

    def mean_pairwise(a):  # (groups, n, D) -> mean distance over pairs i < j within each group
        d = torch.cdist(a, a)
        n = a.shape[1]
        return (d.sum(dim=(1, 2)) / (n * (n - 1))).mean().item()

    across_prompts = mean_pairwise(z.transpose(0, 1))
    across_seeds = mean_pairwise(z)
    return {"ratio": across_prompts / across_seeds if across_seeds > 0 else float("nan"),
            "across_prompts": across_prompts, "across_seeds": across_seeds,
            "num_prompts": len(prompts), "num_seeds": num_seeds, "num_steps": num_steps}


# The judge's partial verdicts of a text->image sample: they move long before the exact one does.
PARTIAL_VERDICTS = ("valid", "colours", "shapes", "counts", "nothing_extra")


def partial_rates(scores: list[dict]) -> dict[str, float]:
    """Share of `score_t2i` verdicts that pass each of `PARTIAL_VERDICTS`."""
    return {k: sum(v[k] for v in scores) / len(scores) for k in PARTIAL_VERDICTS}


def t2i_scores(model, processor, prompts: list[tuple[str, dict]], *, num_steps: int, guidance: float = 1.0,
               resolution: int = 32, sampler: str | None = None) -> list[dict]:
    """`score_t2i` verdicts of one image per (user text, spec) prompt; prompt i uses seed i."""
    from mmgen.generation import generate_images_for_prompts

    images = generate_images_for_prompts(model, processor, [p for p, _ in prompts], num_steps=num_steps,
                                         guidance=guidance, seeds=list(range(len(prompts))), sampler=sampler)
    return [score_t2i(img, spec, resolution) for img, (_, spec) in zip(images, prompts)]


def caption_scores(model, processor, split: str, n: int, resolution: int = 32) -> tuple[list[bool], list[str]]:
    """Greedy captions of `n` fresh renders of `split` ("Describe the image."): (correct flags, captions)."""
    from mmgen.generation import caption_images

    pairs = caption_set(split, n, resolution=resolution)
    captions = caption_images(model, processor, [img for img, _ in pairs], question="Describe the image.")
    return [score_caption(text, scene)["correct"] for text, (_, scene) in zip(captions, pairs)], captions


def end_of_run_evaluation(model, processor, cfg) -> dict:
    n, res = cfg.eval.num_samples, cfg.model.image_size
    results: dict = {"t2i": {}, "caption": {}, "num_samples": n, "test_seed": TEST_SEED,
                     "guidance": cfg.eval.guidance}
    for split in ("train", "heldout_combos"):
        for groups, name in ((1, "single"), (2, "two")):
            prompts = t2i_prompts(split, groups, n)
            for steps in cfg.eval.num_steps:
                scores = t2i_scores(model, processor, prompts, num_steps=steps, guidance=cfg.eval.guidance,
                                    resolution=res)
                results["t2i"][f"{split}/{name}@{steps}"] = {
                    **accuracy([v["overall"] for v in scores]),
                    "partial": partial_rates(scores),
                }
        flags, captions = caption_scores(model, processor, split, n, resolution=res)
        results["caption"][split] = {**accuracy(flags), "examples": captions[:5]}
    results["prompt_sensitivity"] = prompt_sensitivity(model, processor)
    results["summary"] = {key: round(v["accuracy"], 4) for key, v in results["t2i"].items()
                          if key.startswith("train/")}
    results["summary"].update({f"caption/{k}": round(v["accuracy"], 4) for k, v in results["caption"].items()})
    results["summary"]["prompt_sensitivity"] = round(results["prompt_sensitivity"]["ratio"], 4)
    return results


SAMPLE_PROMPTS = ("Draw a red circle.", "Draw a blue square.", "Draw a green triangle left of a yellow circle.",
                  "Draw two white squares.")


def sample_grid(model, processor, path: Path, steps: tuple[int, ...] = (1, 2, 4)) -> None:
    """PNG grid: rows = step counts, columns = fixed prompts (same seeds); a caption sample beside it."""
    from PIL import Image

    from mmgen.generation import caption_images, generate_images_for_prompts

    path.parent.mkdir(parents=True, exist_ok=True)
    rows = [generate_images_for_prompts(model, processor, list(SAMPLE_PROMPTS), num_steps=s, guidance=1.0,
                                        seeds=list(range(len(SAMPLE_PROMPTS)))) for s in steps]
    w, h = rows[0][0].size
    grid = Image.new("RGB", (w * len(SAMPLE_PROMPTS), h * len(steps)))
    for r, images in enumerate(rows):
        for c, img in enumerate(images):
            grid.paste(img, (c * w, r * h))
    grid.resize((grid.width * 4, grid.height * 4), Image.NEAREST).save(path)
    image, scene = caption_set("train", 1)[0]
    caption = caption_images(model, processor, [image], question="Describe the image.")[0]
    path.with_suffix(".json").write_text(json.dumps(
        {"prompts": list(SAMPLE_PROMPTS), "steps": list(steps), "caption": caption, "scene": scene.to_dict()},
        indent=2))
