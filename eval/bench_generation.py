"""Speed of one image: the cached engine vs a naive recompute of the whole sequence.

For a text prefix of P tokens ending in <|boi|> and N flow-map steps:
- cached: `mmgen.generation.generate_image` on the prefix KV cache (N passes over the image tokens only,
  2N + a 1-token null cache with guidance) plus the clean pass that appends the image to the cache;
  the prefill (shared with text decoding) is timed separately;
- naive: `mmgen.generation.naive_generate_image`, N full forwards over prefix + noisy copy (2N with guidance).
Both run the same sampler from the same noise, in the same process, alternating, so the ratio is fair.

    python eval/bench_generation.py [--model DIR] [--prefixes 32 256 1024] [--steps 1 2 4 8]
                                    [--guidance 1.0] [--repeats 3] [--out runs/bench_generation.json]

Without --model, a randomly initialised model is timed (speed does not depend on the weights): by
default a Llama of d=256, 6 layers, 4 heads, with 32x32 images through the tiny test VAE (8x8 latents) at
patch 1 -> 64 image tokens; --hidden-size, --layers, --heads, --image-size and --patch-size set the shape. Prints a markdown table; writes the numbers and the setup as JSON.
"""

from __future__ import annotations

import argparse
import json
import platform
from pathlib import Path

import torch

from mmgen.configuration_mmgen import TINY_LLAMA_KWARGS, MMGenConfig
from mmgen.evaluation.speed import bench_prefix
from mmgen.modeling_mmgen import MMGenForConditionalGeneration


def build_model(args) -> MMGenForConditionalGeneration:
    if args.model:
        return MMGenForConditionalGeneration.from_pretrained(args.model).eval()
    torch.manual_seed(0)
    text = dict(
        TINY_LLAMA_KWARGS,
        model_type="llama",
        hidden_size=args.hidden_size,
        intermediate_size=int(args.hidden_size * 8 / 3) // 16 * 16,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.heads,
    )
    config = MMGenConfig(text_config=text, image_size=args.image_size, patch_size=args.patch_size)
    return MMGenForConditionalGeneration(config).eval()


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--model", default=None, help="a saved MMGen model (default: random init of the shape set below)"
    )
    p.add_argument("--hidden-size", type=int, default=256)
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--patch-size", type=int, default=1)
    p.add_argument("--prefixes", type=int, nargs="+", default=[32, 256, 1024])
    p.add_argument("--steps", type=int, nargs="+", default=[1, 2, 4, 8])
    p.add_argument("--guidance", type=float, default=1.0)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch.set_num_threads on CPU (default 1: on a shared 2-core machine, 2 OpenMP threads "
        "spin against other processes and time 10-50x slower); 0 = torch's choice",
    )
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", default="runs/bench_generation.json")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    model = build_model(args).to(args.device)
    cfg = model.config
    print(
        f"image tokens N={cfg.num_image_tokens}, layers={cfg.text_config.num_hidden_layers}, "
        f"d={cfg.text_config.hidden_size}, guidance={args.guidance}, threads={torch.get_num_threads()}"
    )
    rows = [r for P in args.prefixes for r in bench_prefix(model, P, args.steps, args.guidance, args.repeats)]
    lines = [
        "| prefix | steps | cached ms/image | naive ms/image | naive / cached | prefill ms (once) |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['prefix']} | {r['num_steps']} | {r['cached_ms']:.1f} | {r['naive_ms']:.1f} | "
            f"{r['speedup']:.2f}x | {r['prefill_ms']:.1f} |"
        )
    table = "\n".join(lines)
    print(table)
    result = {
        "rows": rows,
        "setup": {
            **{k: v for k, v in vars(args).items()},
            "num_image_tokens": cfg.num_image_tokens,
            "objective": cfg.objective,
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "machine": platform.processor() or platform.machine(),
            "device": str(model.get_input_embeddings().weight.device),
        },
        "table": table,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(f"wrote {out}")
    return result


if __name__ == "__main__":
    main()
