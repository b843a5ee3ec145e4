"""Quick text->image check of an export: exact-judge accuracy on train-distribution prompts per step count.

    python eval/quick_t2i.py --model runs/default/final --out runs/quick_t2i.json [--steps 1 8 32] [--num 50]

Single-object and two-object prompts from the shapes grammar on the test seed
(`mmgen.training.evaluate.t2i_prompts`), one image per prompt and seed i, scored by `score_t2i`
(overall verdict and validity) with a 95% Wilson interval. The full report is `eval/run.py`.
"""

import argparse
import json

import torch

import mmgen  # noqa: F401  (registers the Auto classes)
from mmgen.data.judge import score_t2i
from mmgen.generation import generate_images_for_prompts
from mmgen.training.evaluate import accuracy, t2i_prompts


def main(argv=None) -> dict:
    from transformers import AutoModel, AutoProcessor

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--steps", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--num", type=int, default=50)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    model = AutoModel.from_pretrained(args.model).eval()
    processor = AutoProcessor.from_pretrained(args.model)
    results = {}
    for groups, name in ((1, "single"), (2, "two")):
        prompts = t2i_prompts("train", groups, args.num)
        for steps in args.steps:
            images = generate_images_for_prompts(model, processor, [p for p, _ in prompts], num_steps=steps,
                                                 seeds=list(range(len(prompts))))
            scores = [score_t2i(img, spec, processor.image_size) for img, (_, spec) in zip(images, prompts)]
            results[f"{name}@{steps}"] = {**accuracy([s["overall"] for s in scores]),
                                          "valid": sum(s["valid"] for s in scores) / len(scores)}
            print(name, steps, results[f"{name}@{steps}"], flush=True)
    with open(args.out, "w") as f:
        json.dump(results, f, indent=1)
    return results


if __name__ == "__main__":
    main()
