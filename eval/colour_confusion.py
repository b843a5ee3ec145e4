"""Which colours does a model draw when asked for each colour? A pixel-level probe of text conditioning.

    python eval/colour_confusion.py --model runs/default/final --out runs/colour_confusion [--steps 4]
                                    [--per-colour 24] [--sampler euler] [--guidance 1]

For every palette colour c it draws "Draw a {c} {shape}." for the three shapes (`--per-colour` images,
seed i for image i) and labels every pixel as the exact judge does (`mmgen.data.judge.pixel_colours`).
Row c of the confusion matrix is the share of c's non-background pixels judged to be each palette colour
(last column: off-palette). It moves long before the exact verdict does: a model whose images are still
judged wrong can already show that it reads the colour word (a bright diagonal), or that it only gets
some colours right (the default model gets red, blue and purple right before the colours that need
green: docs/findings.md). The
`foreground` column is the share of pixels that are not background (a real single object covers 4-12%).

Writes OUT/colour_confusion.json (matrix, foreground shares, diagonal mean, settings) and
OUT/colour_confusion.png (heatmap).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

import mmgen  # noqa: F401  (registers the Auto classes)
from mmgen.data.judge import pixel_colours
from mmgen.data.shapes import COLOURS, SHAPES

COLUMNS = (*COLOURS, "off-palette")


def confusion(images_by_colour: dict[str, list], resolution: int | None = None) -> dict:
    """Row-normalised (asked colour x judged colour) shares of non-background pixels, and foreground shares."""
    matrix, foreground = [], []
    for colour in COLOURS:
        labels = np.stack([pixel_colours(im, resolution) for im in images_by_colour[colour]])
        drawn = labels[labels != -1]
        counts = np.array([(drawn == k).sum() for k in range(len(COLOURS))] + [(drawn == -2).sum()], dtype=float)
        matrix.append((counts / counts.sum()).tolist() if counts.sum() else [0.0] * len(COLUMNS))
        foreground.append(float((labels != -1).mean()))
    diagonal = [matrix[i][i] for i in range(len(COLOURS))]
    return {"rows": list(COLOURS), "columns": list(COLUMNS), "matrix": matrix, "foreground": foreground,
            "diagonal": diagonal, "diagonal_mean": float(np.mean(diagonal))}  # fmt: skip


def plot(result: dict, path: Path) -> None:
    from mmgen.extras import pyplot

    plt = pyplot("eval/colour_confusion.py")

    m = np.asarray(result["matrix"])
    fig, ax = plt.subplots(figsize=(7, 5.5))
    im = ax.imshow(m, vmin=0, vmax=1, cmap="viridis")
    ax.set_xticks(range(len(result["columns"])), result["columns"], rotation=45, ha="right")
    ax.set_yticks(range(len(result["rows"])), [f"{c} ({f:.0%} fg)" for c, f in zip(result["rows"], result["foreground"])])
    for i in range(m.shape[0]):
        for j in range(m.shape[1]):
            ax.text(j, i, f"{m[i, j]:.2f}", ha="center", va="center", fontsize=7, color="w" if m[i, j] < 0.6 else "k")
    ax.set_xlabel("colour judged in the pixels drawn")
    ax.set_ylabel("colour asked for")
    ax.set_title(f"{result['settings']['steps']} steps: diagonal mean {result['diagonal_mean']:.2f}")
    fig.colorbar(im, ax=ax, fraction=0.046)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> dict:
    from mmgen.cli import ArgumentParser, UsageError
    from mmgen.generation import generate_images_for_prompts
    from mmgen.loading import load_export

    parser = ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--per-colour", type=int, default=24, help="images per colour, spread over the 3 shapes")
    parser.add_argument("--guidance", type=float, default=1.0)
    parser.add_argument("--sampler", choices=["pushforward", "euler", "restart"], default=None)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error")
    args = parser.parse_args(argv)
    for flag, value in (("--steps", args.steps), ("--per-colour", args.per_colour), ("--threads", args.threads)):
        if value < 1:
            raise UsageError(f"{flag} must be >= 1, got {value}")
    torch.set_num_threads(args.threads)
    model, processor = load_export(args.model)
    images = {}
    for colour in COLOURS:
        prompts = [f"Draw a {colour} {SHAPES[i % len(SHAPES)]}." for i in range(args.per_colour)]
        images[colour] = generate_images_for_prompts(model, processor, prompts, num_steps=args.steps,
                                                     guidance=args.guidance, seeds=list(range(args.per_colour)),
                                                     sampler=args.sampler)  # fmt: skip
    result = confusion(images, processor.image_size)
    result["settings"] = {"model": args.model, "steps": args.steps, "per_colour": args.per_colour,
                          "guidance": args.guidance, "sampler": args.sampler or "the objective's own"}  # fmt: skip
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "colour_confusion.json").write_text(json.dumps(result, indent=1))
    plot(result, out / "colour_confusion.png")
    for colour, row, fg in zip(COLOURS, result["matrix"], result["foreground"]):
        top = sorted(zip(COLUMNS, row), key=lambda kv: -kv[1])[:3]
        print(f"{colour:>7}: fg {fg:.3f}  " + "  ".join(f"{name} {share:.2f}" for name, share in top))
    print(f"diagonal mean {result['diagonal_mean']:.3f}")
    return result


if __name__ == "__main__":
    from mmgen.cli import run_cli

    raise SystemExit(run_cli(main))
