"""How fast can an image pathway learn single shapes? A class-conditional stand-in, ~3 min per run.

    python eval/codec_probe.py --arch dit --out runs/probe/dit      # linear patches, like image_head=linear
    python eval/codec_probe.py --arch hybrid --prompt-film none --out runs/probe/hybrid_tokens_only
    python eval/codec_probe.py --arch hybrid --out runs/probe/hybrid  # like image_head=unet (the default)
    python eval/codec_probe.py --arch unet --out runs/probe/unet     # no transformer at all
    python eval/codec_probe.py --prompt text --objects 2 --out runs/probe/two  # two-object prompts

The full model spends most of its compute on text, clean copies and IMM's target copies, so a question
about the image pathway alone ("would another codec learn faster?") costs ~15 minutes of training per
answer there. This script answers it in ~3: single-object scenes of split "train" are encoded once with
the stage-1 VAE, and a small network is trained with flow matching to draw one of the 20 train
(colour, shape) pairs given as a class (plus a null class, dropped 10% of the time). Samples (16 Euler
steps) are judged like ShapeEval's single-object task: exactly one object, of the asked colour and shape,
valid image. It prints accuracy against images seen and writes `OUT.json` and `OUT.png` (samples).
`--objects 2` asks the same of two-object scenes ("Draw a red circle and a blue square.", "Draw two red
circles."; 576 ordered prompts), judged like ShapeEval's two-object task: exactly one of each of two
different train pairs and nothing else — attribute binding, which the full model fails (README "Results").

Architectures (same width and depth as the default backbone: 4 layers, 192 wide):
- dit: linear patch embedding -> transformer (class token + patches; adaLN optional) -> linear head;
- hybrid: U-Net down blocks -> transformer over the patch grid with a class token -> U-Net up blocks with
  skips (Transfusion, arXiv 2408.11039). The conv blocks see the time; the up blocks also see the class
  token's final state (`--prompt-film cls`), which is what `image_head: unet` does with <|boi|>'s state;
- unet: a plain 2-level conv U-Net with the class in every block (ADM-style), no transformer.

What it has measured for each architecture and prompt route, with the commands: docs/findings.md ("The
image pathway on a class-conditional stand-in"; the JSON files in docs/probe/).
"""

from __future__ import annotations

import argparse
import json
import math
import random
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from mmgen.data.judge import check_spec, judge_image
from mmgen.data.shapes import COLOURS, SHAPES, TRAIN_COMBOS, sample_scene
from mmgen.training.vae_stage import load_vae, render_batch

SIGMA_DATA = 0.5
PAIRS = [(c, s) for c in COLOURS for s in SHAPES]  # every colour-shape pair, in class order
NULL = len(PAIRS)  # class index of "no prompt" (single objects; two objects: num_classes(2) - 1)


def class_of(colour: str, shape: str) -> int:
    return COLOURS.index(colour) * len(SHAPES) + SHAPES.index(shape)


def num_classes(objects: int) -> int:
    """Prompts + the null prompt: one per pair, or one per ordered two pairs (scene order)."""
    return len(PAIRS) ** objects + 1


def class_of_pairs(pairs) -> int:
    """The class of an ordered list of (colour, shape): a single pair's, or (first, second) in base 24."""
    index = 0
    for colour, shape in pairs:
        index = index * len(PAIRS) + class_of(colour, shape)
    return index


def prompt_texts(objects: int) -> list[str]:
    """The prompt of every class, as the shapes grammar says it, then the null prompt."""
    if objects == 1:
        texts = [f"Draw a {c} {s}." for c, s in PAIRS]
    else:
        texts = [f"Draw two {c1} {s1}s." if (c1, s1) == (c2, s2) else f"Draw a {c1} {s1} and a {c2} {s2}."
                 for c1, s1 in PAIRS for c2, s2 in PAIRS]
    return [t + "<|boi|>" for t in texts] + ["<|boi|>"]


def prompt_token_ids(tokenizer_dir: str, objects: int = 1) -> torch.Tensor:
    """(classes + 1, T) ids of each class's prompt ("Draw a {colour} {shape}.<|boi|>"; the null class:
    "<|boi|>"), left-padded with <|pad|> (0), which the stand-in treats as an ordinary token."""
    from mmgen.tokenization import load_tokenizer

    tok = load_tokenizer(tokenizer_dir)
    ids = [tok(t, add_special_tokens=False)["input_ids"] for t in prompt_texts(objects)]
    T = max(map(len, ids))
    return torch.tensor([[0] * (T - len(i)) + i for i in ids])


def time_features(t: torch.Tensor, dim: int = 256) -> torch.Tensor:
    half = dim // 2
    freqs = torch.exp(-math.log(10000) * torch.arange(half) / half)
    args = 1000 * t[:, None] * freqs[None]
    return torch.cat([args.cos(), args.sin()], -1)


class Block(nn.Module):
    """Pre-norm transformer block, optionally adaLN-modulated by a condition vector (DiT)."""

    def __init__(self, width: int, heads: int, adaln: bool):
        super().__init__()
        self.adaln = adaln
        self.norm1 = nn.LayerNorm(width, elementwise_affine=False)
        self.norm2 = nn.LayerNorm(width, elementwise_affine=False)
        self.attn = nn.MultiheadAttention(width, heads, batch_first=True)
        self.mlp = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width))
        self.ada = nn.Linear(width, 6 * width)
        nn.init.zeros_(self.ada.weight)
        nn.init.zeros_(self.ada.bias)

    def forward(self, x: torch.Tensor, c: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        mods = self.ada(c)[:, None].chunk(6, -1) if self.adaln else [0.0] * 6
        s1, b1, g1, s2, b2, g2 = mods
        h = self.norm1(x) * (1 + s1) + b1
        x = x + (1 + g1) * self.attn(h, h, h, need_weights=False, attn_mask=mask)[0]
        h = self.norm2(x) * (1 + s2) + b2
        return x + (1 + g2) * self.mlp(h)


class ResBlock(nn.Module):
    """GN -> SiLU -> conv -> GN with FiLM from the condition -> SiLU -> conv, residual."""

    def __init__(self, ch: int, width: int):
        super().__init__()
        self.n1, self.c1 = nn.GroupNorm(8, ch), nn.Conv2d(ch, ch, 3, padding=1)
        self.n2, self.c2 = nn.GroupNorm(8, ch), nn.Conv2d(ch, ch, 3, padding=1)
        self.film = nn.Linear(width, 2 * ch)

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        scale, shift = self.film(c)[:, :, None, None].chunk(2, 1)
        h = self.c1(F.silu(self.n1(x)))
        return x + self.c2(F.silu(self.n2(h) * (1 + scale) + shift))


class DiT(nn.Module):
    def __init__(self, a, C: int, H: int):
        super().__init__()
        self.C, self.H, self.P = C, H, a.patch
        self.N, D = (H // a.patch) ** 2, C * a.patch**2
        self.inp = nn.Linear(D, a.width)
        self.pos = nn.Parameter(torch.randn(1, self.N, a.width) * 0.02)
        self.cls = nn.Embedding(num_classes(a.objects), a.width)
        self.t = nn.Sequential(nn.Linear(256, a.width), nn.SiLU(), nn.Linear(a.width, a.width))
        self.blocks = nn.ModuleList(Block(a.width, a.heads, a.adaln) for _ in range(a.layers))
        self.norm = nn.LayerNorm(a.width)
        self.out = nn.Linear(a.width, D)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, x, t, y):
        B, C, H, P = x.shape[0], self.C, self.H, self.P
        c = self.t(time_features(t)) + self.cls(y)
        p = x.reshape(B, C, H // P, P, H // P, P).permute(0, 2, 4, 1, 3, 5).reshape(B, self.N, -1)
        h = torch.cat([c[:, None], self.inp(p) + self.pos], 1)
        for b in self.blocks:
            h = b(h, c)
        o = self.out(self.norm(h[:, 1:])).reshape(B, H // P, H // P, C, P, P)
        return o.permute(0, 3, 1, 4, 2, 5).reshape(B, C, H, H)


class UNet(nn.Module):
    """16x16 -> 8x8 -> 4x4 and back with skips; FiLM from (time + class) in every block."""

    def __init__(self, a, C: int, H: int):
        super().__init__()
        ch, w = a.ch, a.width
        self.cls = nn.Embedding(num_classes(a.objects), w)
        self.t = nn.Sequential(nn.Linear(256, w), nn.SiLU(), nn.Linear(w, w))
        self.inp = nn.Conv2d(C, ch, 3, padding=1)
        self.d1, self.down1 = ResBlock(ch, w), nn.Conv2d(ch, 2 * ch, 3, stride=2, padding=1)
        self.d2, self.down2 = ResBlock(2 * ch, w), nn.Conv2d(2 * ch, 2 * ch, 3, stride=2, padding=1)
        self.mid = nn.ModuleList([ResBlock(2 * ch, w) for _ in range(2)])
        self.up2, self.u2 = nn.ConvTranspose2d(2 * ch, 2 * ch, 4, stride=2, padding=1), ResBlock(2 * ch, w)
        self.up1, self.u1 = nn.ConvTranspose2d(2 * ch, ch, 4, stride=2, padding=1), ResBlock(ch, w)
        self.out = nn.Conv2d(ch, C, 3, padding=1)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, x, t, y):
        c = F.silu(self.t(time_features(t)) + self.cls(y))
        h1 = self.d1(self.inp(x), c)
        h2 = self.d2(self.down1(h1), c)
        h = self.down2(h2)
        for b in self.mid:
            h = b(h, c)
        h = self.u2(self.up2(h) + h2, c)
        return self.out(F.silu(self.u1(self.up1(h) + h1, c)))


class Hybrid(nn.Module):
    """U-Net down blocks (time only) -> transformer over the 4x4 grid + a class token -> U-Net up blocks
    with skips; the up blocks' FiLM adds the class token's final state with `prompt_film` = "cls"."""

    def __init__(self, a, C: int, H: int):
        super().__init__()
        ch, w = a.ch, a.width
        self.prompt_film = a.prompt_film
        self.cls = nn.Embedding(num_classes(a.objects), w)
        self.text = None
        if a.prompt == "text":  # the class as the full model sees it: "Draw a red circle.<|boi|>", causal
            ids = prompt_token_ids(a.tokenizer, a.objects)  # (classes + 1, T), left-padded
            self.register_buffer("prompt_ids", ids, persistent=False)
            self.text = nn.Embedding(int(ids.max()) + 1, w)
            self.text_pos = nn.Parameter(torch.randn(1, ids.shape[1], w) * 0.02)
            T, N = ids.shape[1], (H // (4 if a.grid == "coarse" else 2)) ** 2
            mask = torch.zeros(T + N, T + N, dtype=torch.bool)  # True = blocked
            mask[:T, :T] = torch.ones(T, T, dtype=torch.bool).triu(1)  # text: causal
            mask[:T, T:] = True  # text never sees the image
            self.register_buffer("mask", mask, persistent=False)
        self.t = nn.Sequential(nn.Linear(256, w), nn.SiLU(), nn.Linear(w, w))
        self.inp = nn.Conv2d(C, ch, 3, padding=1)
        self.d1, self.down1 = ResBlock(ch, w), nn.Conv2d(ch, 2 * ch, 3, stride=2, padding=1)
        # grid "fine" keeps the second level at half the latent's side: 4x the tokens, each a quarter the area
        last = 2 if a.grid == "coarse" else 1
        self.d2, self.down2 = ResBlock(2 * ch, w), nn.Conv2d(2 * ch, w, 3, stride=last, padding=1)
        self.side = H // (2 * last)
        self.pos = nn.Parameter(torch.randn(1, self.side**2, w) * 0.02)
        self.blocks = nn.ModuleList(Block(w, a.heads, adaln=False) for _ in range(a.layers))
        self.norm = nn.LayerNorm(w)
        self.prompt = nn.Linear(w, w)
        up2 = nn.ConvTranspose2d(w, 2 * ch, 4, stride=2, padding=1) if last == 2 else nn.Conv2d(w, 2 * ch, 3, padding=1)
        self.up2, self.u2 = up2, ResBlock(2 * ch, w)
        self.up1, self.u1 = nn.ConvTranspose2d(2 * ch, ch, 4, stride=2, padding=1), ResBlock(ch, w)
        self.out = nn.Conv2d(ch, C, 3, padding=1)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, x, t, y):
        te = self.t(time_features(t))
        c = F.silu(te)
        h1 = self.d1(self.inp(x), c)
        h2 = self.d2(self.down1(h1), c)
        h = self.down2(h2)
        B = h.shape[0]
        tok = h.flatten(2).transpose(1, 2) + self.pos + te[:, None]
        if self.text is None:
            tok, mask, T = torch.cat([(self.cls(y) + te)[:, None], tok], 1), None, 1
        else:
            words = self.text(self.prompt_ids[y]) + self.text_pos
            tok, mask, T = torch.cat([words.to(tok.dtype), tok], 1), self.mask, words.shape[1]
        for b in self.blocks:
            tok = b(tok, te, mask)
        tok = self.norm(tok)
        if self.prompt_film == "cls":  # the class token, or the text's last token (<|boi|>)
            c = F.silu(te + self.prompt(tok[:, T - 1]))
        h = tok[:, T:].transpose(1, 2).reshape(B, -1, self.side, self.side)
        h = self.u2(self.up2(h) + h2, c)
        return self.out(F.silu(self.u1(self.up1(h) + h1, c)))


@torch.no_grad()
def evaluate(model, decode, shape, num: int, sample_steps: int, objects: int = 1) -> tuple[float, dict, np.ndarray]:
    """Exact accuracy of `num` samples (fixed noise): single objects = the train combos in turn; two objects =
    two different train combos (i, 7i + 3), exactly one of each and nothing else, as ShapeEval's two-object
    task asks."""
    model.eval()
    g = torch.Generator().manual_seed(123)
    n = len(TRAIN_COMBOS)
    asked = [[TRAIN_COMBOS[i % n]] if objects == 1 else [TRAIN_COMBOS[i % n], TRAIN_COMBOS[(7 * i + 3) % n]]
             for i in range(num)]
    y = torch.tensor([class_of_pairs(pairs) for pairs in asked])
    x = torch.randn((num, *shape), generator=g) * SIGMA_DATA
    ts = torch.linspace(1, 0, sample_steps + 1)
    for i in range(sample_steps):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            v = model(x, torch.full((num,), float(ts[i])), y).float()
        x = x - (ts[i] - ts[i + 1]) * v  # Euler on dx/dt = eps - x0
    images = ((decode(x) + 1) * 127.5).round().clamp(0, 255).byte().permute(0, 2, 3, 1).numpy()
    ok, parts = 0, {"colours": 0, "shapes": 0, "nothing_extra": 0}
    for image, pairs in zip(images, asked):
        j = judge_image(image)
        spec = {"objects": [{"colour": c, "shape": s, "count": 1} for c, s in pairs], "relations": []}
        v = check_spec(spec, j.objects)
        ok += bool(v["counts"] and v["nothing_extra"] and j.valid)
        for k in parts:
            parts[k] += bool(v[k])
    model.train()
    return ok / num, {k: v / num for k, v in parts.items()}, images


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", choices=("dit", "hybrid", "unet"), default="hybrid")
    p.add_argument("--prompt-film", choices=("cls", "none"), default="cls", help="hybrid: class state in up blocks")
    p.add_argument("--prompt", choices=("class", "text"), default="class",
                   help="hybrid: the class as one embedding, or as the tokenised prompt under causal attention")
    p.add_argument("--objects", type=int, choices=(1, 2), default=1,
                   help="objects per scene; 2: two-object scenes and prompts (the grammar's 'a X and a Y' / 'two Xs')")
    p.add_argument("--tokenizer", default="tokenizers/shapes")
    p.add_argument("--vae", default="runs/vae", help="stage-1 output (training/train_vae.py)")
    p.add_argument("--grid", choices=("coarse", "fine"), default="coarse",
                   help="hybrid: the token grid, a quarter (coarse, 4x4 on the 16x16 latent) or half the latent's side")
    p.add_argument("--patch", type=int, default=4, help="dit: patch size on the latent")
    p.add_argument("--width", type=int, default=192)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=3)
    p.add_argument("--ch", type=int, default=64, help="conv channels at the latent's resolution")
    p.add_argument("--adaln", type=int, default=1, help="dit: adaLN-modulate the blocks by time + class")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--steps", type=int, default=900)
    p.add_argument("--eval-every", type=int, default=300)
    p.add_argument("--num-data", type=int, default=20000)
    p.add_argument("--num-eval", type=int, default=96)
    p.add_argument("--sample-steps", type=int, default=16)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True, help="writes OUT.json and OUT.png")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    torch.manual_seed(a.seed)

    vae = load_vae(a.vae)
    rng = random.Random(a.seed)
    scenes = [sample_scene(rng, num_objects=a.objects) for _ in range(a.num_data)]
    with torch.no_grad():
        latents = torch.cat([vae.encode(render_batch(scenes[i : i + 512], 32)) for i in range(0, a.num_data, 512)])
    labels = torch.tensor([class_of_pairs([(o.colour, o.shape) for o in s.objects]) for s in scenes])
    null = num_classes(a.objects) - 1
    C, H = latents.shape[1], latents.shape[2]
    model = {"dit": DiT, "unet": UNet, "hybrid": Hybrid}[a.arch](a, C, H)
    num_params = sum(q.numel() for q in model.parameters())
    print(f"{a.arch}: {num_params / 1e6:.2f} M params, {len(latents)} latents {tuple(latents.shape[1:])}", flush=True)
    opt = torch.optim.AdamW(model.parameters(), lr=a.lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 50))
    g = torch.Generator().manual_seed(a.seed + 1)
    log, start, images = [], time.time(), None
    for step in range(1, a.steps + 1):
        idx = torch.randint(0, len(latents), (a.batch,), generator=g)
        x, y = latents[idx], labels[idx].clone()
        y[torch.rand(a.batch, generator=g) < 0.1] = null
        t = torch.rand(a.batch, generator=g)
        eps = torch.randn(x.shape, generator=g) * SIGMA_DATA
        tt = t[:, None, None, None]
        with torch.autocast("cpu", dtype=torch.bfloat16):
            v = model((1 - tt) * x + tt * eps, t, y).float()
        loss = F.mse_loss(v, eps - x)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if step % a.eval_every == 0 or step == a.steps:
            acc, parts, images = evaluate(model, vae.decode, (C, H, H), a.num_eval, a.sample_steps, a.objects)
            row = {"step": step, "images_seen": step * a.batch, "loss": round(loss.item(), 5),
                   ("single_object" if a.objects == 1 else "two_object"): acc, **parts,
                   "seconds": round(time.time() - start, 1)}
            log.append(row)
            print(row, flush=True)
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({"args": vars(a), "num_params": num_params, "log": log}, indent=1))
    rows = [np.concatenate(list(images[r * 12 : (r + 1) * 12]), 1) for r in range(len(images) // 12)]
    grid = Image.fromarray(np.concatenate(rows, 0))
    grid.resize((grid.width * 3, grid.height * 3), Image.NEAREST).save(out.with_suffix(".png"))
    print(f"wrote {out.with_suffix('.json')} and {out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
