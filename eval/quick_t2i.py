"""Quick check of an export: text->image exact accuracy per step count, captions, prompt sensitivity.

    python eval/quick_t2i.py --model runs/default/final --out runs/quick_t2i.json [--steps 1 4] [--num 40] [--guidance 3]

Single-object and two-object prompts from the shapes grammar on the test seed
(`mmgen.evaluation.quick.t2i_prompts`), one image per prompt and seed i, scored by `score_t2i`
(overall verdict with a 95% Wilson interval, and the shares passing each partial verdict: valid,
colours, shapes, counts, nothing_extra); greedy captions of `--num` train-combination renders; and
`prompt_sensitivity` (0 = the image ignores the prompt). The full report is `eval/run.py`.
"""

import json

import torch

from mmgen.cli import ArgumentParser, UsageError, run_cli
from mmgen.evaluation.quick import (
    accuracy,
    caption_scores,
    partial_rates,
    prompt_sensitivity,
    t2i_prompts,
    t2i_scores,
)
from mmgen.loading import load_export


def main(argv=None) -> dict:
    parser = ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--steps", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--num", type=int, default=40)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cpu", help="e.g. cuda (generation runs where the model is)")
    parser.add_argument("--guidance", type=float, default=1.0, help="classifier-free guidance scale (1 = off)")
    parser.add_argument("--sampler", choices=["pushforward", "euler", "restart"], default=None,
                        help="default: the model's objective's own (IMM: pushforward, flow matching: euler)")
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error")
    args = parser.parse_args(argv)
    for flag, values in (("--steps", args.steps), ("--num", [args.num]), ("--threads", [args.threads])):
        if min(values) < 1:
            raise UsageError(f"{flag} must be >= 1, got {min(values)}")
    torch.set_num_threads(args.threads)
    model, processor = load_export(args.model, args.device)
    results = {}
    for groups, name in ((1, "single"), (2, "two")):
        prompts = t2i_prompts("train", groups, args.num)
        for steps in args.steps:
            scores = t2i_scores(model, processor, prompts, num_steps=steps, guidance=args.guidance,
                                resolution=processor.image_size, sampler=args.sampler)
            results[f"{name}@{steps}"] = {**accuracy([s["overall"] for s in scores]), **partial_rates(scores)}
            print(name, steps, results[f"{name}@{steps}"], flush=True)
    flags, _ = caption_scores(model, processor, "train", args.num, resolution=processor.image_size)
    results["caption"] = accuracy(flags)
    results["prompt_sensitivity"] = prompt_sensitivity(model, processor)
    print("caption", results["caption"], "prompt sensitivity", results["prompt_sensitivity"]["ratio"], flush=True)
    with open(args.out, "w") as f:
        json.dump(results, f, indent=1)
    return results


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
