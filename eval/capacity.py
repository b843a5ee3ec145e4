"""Why one parallel step cannot be exact: masked diffusion against autoregression, and its continuous twin.

A masked-diffusion language model (MDLM; Sahoo et al. 2024, arXiv 2406.07524; MaskGIT's parallel decoding,
Chang et al. 2022, arXiv 2202.04200) that fills several [MASK] positions in one step samples each from its
own marginal: from the valid phrases "high card", "two pair" and "full house" it also writes "high pair",
however well it is trained. Only one token per step (L = N steps for N tokens) is exact; an autoregressive
model with the same backbone decodes one token per step by construction. The continuous analogue is a
flow-matching model's single Euler step, which lands on the conditional mean E[x | x_1] between the modes,
against one step of an IMM flow map trained to jump (mmgen/evaluation/toy2d.py's models and training).

    python eval/capacity.py [--out runs/capacity] [--steps 1500]

For each phrase set (`poker`: 2-token poker hands; `codes`: 4-token phrases, 32 valid of 8^4) one masked
model and one autoregressive model (the same transformer, bidirectional or causal) are trained on the valid
phrases; `--num-samples` phrases are then decoded by the masked model with L = 1 .. N steps (the positions
in a random order, N / L of them per step, each sampled at temperature 1 from the model's marginal) and by
the autoregressive model, and scored: the invalid-phrase rate (with a 95% Wilson interval) and the total
variation between the valid phrases' frequencies and the uniform data distribution. Writes OUT/capacity.json,
OUT/capacity.md and OUT/capacity.png.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from mmgen.evaluation import toy2d
from mmgen.evaluation.quick import wilson
from mmgen.extras import pyplot

plt = pyplot("eval/capacity.py")  # on the Agg backend: the script only writes files

POKER = ("high card", "one pair", "two pair", "full house", "straight flush", "royal flush")


@dataclasses.dataclass(frozen=True, kw_only=True)
class CapacityConfig:
    steps: int = 1500  # training steps per language model
    batch_size: int = 256
    lr: float = 3e-3
    width: int = 64
    layers: int = 2
    heads: int = 4
    num_samples: int = 4096
    codes_length: int = 4  # tokens per phrase of the synthetic set
    codes_vocab: int = 8  # distinct tokens per position of the synthetic set
    codes_count: int = 32  # valid phrases of the synthetic set
    toy_steps: int = 1500  # training steps of each 2-D flow model (mmgen/evaluation/toy2d.py)
    seed: int = 0


@dataclasses.dataclass(frozen=True)
class PhraseSet:
    """Valid phrases as token ids (K, N) over a vocabulary; id 0 is [MASK], id 1 is [BOS]."""

    name: str
    phrases: torch.Tensor  # (K, N) long
    words: list[str]  # id -> word (ids 0 and 1 are the special tokens)

    @property
    def length(self) -> int:
        return self.phrases.shape[1]

    def text(self, ids) -> str:
        return " ".join(self.words[int(i)] for i in ids)


def poker_set() -> PhraseSet:
    words = ["[MASK]", "[BOS]"] + sorted({w for p in POKER for w in p.split()})
    phrases = torch.tensor([[words.index(w) for w in p.split()] for p in POKER])
    return PhraseSet("poker", phrases, words)


def codes_set(cfg: CapacityConfig) -> PhraseSet:
    """`codes_count` distinct random phrases of `codes_length` tokens; position i uses its own
    `codes_vocab` tokens ("a3" = token 3 of position a), each about equally often."""
    g = torch.Generator().manual_seed(cfg.seed + 7)
    n, v = cfg.codes_length, cfg.codes_vocab
    words = ["[MASK]", "[BOS]"] + [f"{chr(97 + i)}{j}" for i in range(n) for j in range(v)]
    columns = [torch.arange(cfg.codes_count) % v for _ in range(n)]  # balanced marginals
    while True:
        rows = torch.stack([c[torch.randperm(cfg.codes_count, generator=g)] for c in columns], 1)  # (K, N)
        if len({tuple(r.tolist()) for r in rows}) == cfg.codes_count:
            break
    phrases = rows + 2 + torch.arange(n)[None] * v  # ids of position i start at 2 + i v
    return PhraseSet("codes", phrases, words)


class TinyLM(nn.Module):
    """Token + position embeddings -> transformer encoder (bidirectional or causal) -> logits."""

    def __init__(self, vocab: int, length: int, cfg: CapacityConfig, causal: bool):
        super().__init__()
        self.causal = causal
        self.embed = nn.Embedding(vocab, cfg.width)
        self.pos = nn.Parameter(torch.randn(length, cfg.width) * 0.02)
        layer = nn.TransformerEncoderLayer(cfg.width, cfg.heads, 4 * cfg.width, dropout=0.0, batch_first=True,
                                           norm_first=True)
        self.body = nn.TransformerEncoder(layer, cfg.layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(cfg.width)
        self.head = nn.Linear(cfg.width, vocab)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """(B, L) ids -> (B, L, vocab) logits."""
        L = ids.shape[1]
        mask = nn.Transformer.generate_square_subsequent_mask(L) if self.causal else None
        h = self.body(self.embed(ids) + self.pos[:L], mask=mask, is_causal=self.causal)
        return self.head(self.norm(h))


def masked_batch(phrases: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """MDLM's forward process: mask each token with probability t ~ U(0, 1), at least one per phrase.
    Returns the corrupted ids and the mask (B, N) of positions to predict."""
    B, N = phrases.shape
    t = torch.rand(B, 1, generator=generator)
    masked = torch.rand(B, N, generator=generator) < t
    forced = torch.randint(0, N, (B,), generator=generator)
    masked[torch.arange(B), forced] = True
    return phrases.masked_fill(masked, 0), masked


def train_lm(data: PhraseSet, cfg: CapacityConfig, kind: str) -> TinyLM:
    """`kind` "masked": cross-entropy on the masked positions of MDLM-corrupted phrases (the mean over
    masked tokens; the 1/t ELBO weight changes the weighting, not the optimum); "ar": next-token
    cross-entropy after [BOS]."""
    torch.manual_seed(cfg.seed)
    N = data.length
    model = TinyLM(len(data.words), N + (kind == "ar"), cfg, causal=kind == "ar")
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=0.0)
    g = torch.Generator().manual_seed(cfg.seed + 1)
    for step in range(cfg.steps):
        batch = data.phrases[torch.randint(0, len(data.phrases), (cfg.batch_size,), generator=g)]  # (B, N)
        if kind == "masked":
            ids, masked = masked_batch(batch, g)
            loss = F.cross_entropy(model(ids)[masked], batch[masked])
        else:
            ids = torch.cat([torch.ones(len(batch), 1, dtype=torch.long), batch], 1)  # [BOS] + phrase
            logits = model(ids[:, :-1])  # (B, N, V)
            loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch.reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        for group in opt.param_groups:  # cosine decay: the last steps sharpen the marginals
            group["lr"] = cfg.lr * 0.5 * (1 + math.cos(math.pi * (step + 1) / cfg.steps))
        opt.step()
    return model.eval()


def _sample(logits: torch.Tensor, generator: torch.Generator, allowed: torch.Tensor) -> torch.Tensor:
    """One token per row from softmax(logits) over the `allowed` ids (never a special token)."""
    logits = logits.masked_fill(~allowed, float("-inf"))
    return torch.multinomial(logits.softmax(-1), 1, generator=generator).squeeze(-1)


@torch.no_grad()
def decode_masked(model: TinyLM, data: PhraseSet, num: int, num_steps: int, generator) -> torch.Tensor:
    """(num, N) phrases from all-[MASK] in `num_steps` parallel steps: a random order of the positions per
    phrase, split into `num_steps` near-equal chunks; each chunk's tokens are drawn independently."""
    N = data.length
    allowed = torch.ones(len(data.words), dtype=torch.bool)
    allowed[:2] = False
    ids = torch.zeros(num, N, dtype=torch.long)
    order = torch.argsort(torch.rand(num, N, generator=generator), dim=1)  # (num, N) positions by step
    bounds = [round(i * N / num_steps) for i in range(num_steps + 1)]
    rows = torch.arange(num)[:, None]
    for lo, hi in itertools.pairwise(bounds):
        positions = order[:, lo:hi]  # (num, k)
        logits = model(ids)[rows, positions]  # (num, k, V)
        k = positions.shape[1]
        tokens = _sample(logits.reshape(num * k, -1), generator, allowed).reshape(num, k)
        ids[rows, positions] = tokens
    return ids


@torch.no_grad()
def decode_ar(model: TinyLM, data: PhraseSet, num: int, generator) -> torch.Tensor:
    allowed = torch.ones(len(data.words), dtype=torch.bool)
    allowed[:2] = False
    ids = torch.ones(num, 1, dtype=torch.long)  # [BOS]
    for _ in range(data.length):
        ids = torch.cat([ids, _sample(model(ids)[:, -1], generator, allowed)[:, None]], 1)
    return ids[:, 1:]


def score(samples: torch.Tensor, data: PhraseSet) -> dict:
    """Invalid rate with its interval, TV distance of the valid phrases' frequencies to uniform, examples."""
    valid = {tuple(p.tolist()): i for i, p in enumerate(data.phrases)}
    index = [valid.get(tuple(s.tolist()), -1) for s in samples]
    good = [i for i in index if i >= 0]
    bad = len(index) - len(good)
    tv = 1.0  # no valid phrase: as far from uniform as it gets
    if good:
        freq = torch.bincount(torch.tensor(good), minlength=len(valid)).double() / len(good)
        tv = float(0.5 * (freq - 1.0 / len(valid)).abs().sum())
    examples = sorted({data.text(s) for s, i in zip(samples, index) if i < 0})[:5]
    return {"invalid": bad / len(index), "invalid_ci95": wilson(bad, len(index)), "tv_valid": tv,
            "invalid_examples": examples}


def chance_valid(data: PhraseSet) -> float:
    """The share of valid phrases when every position is drawn independently from its marginal (what one
    parallel step of a perfect masked model produces)."""
    marginals = [torch.bincount(column, minlength=len(data.words)).double() / len(column) for column in data.phrases.T]
    return float(sum(math.prod(float(m[i]) for m, i in zip(marginals, p)) for p in data.phrases))


def discrete(data: PhraseSet, cfg: CapacityConfig) -> dict:
    """Both language models on one phrase set: {"masked": {L: score}, "ar": score, "chance_valid": ...}."""
    masked, ar = train_lm(data, cfg, "masked"), train_lm(data, cfg, "ar")
    g = torch.Generator().manual_seed(cfg.seed + 2)
    out = {"length": data.length, "phrases": [data.text(p) for p in data.phrases],
           "chance_valid": chance_valid(data)}
    out["masked"] = {str(L): score(decode_masked(masked, data, cfg.num_samples, L, g), data)
                     for L in range(1, data.length + 1)}
    out["ar"] = score(decode_ar(ar, data, cfg.num_samples, g), data)
    return out


def continuous(cfg: CapacityConfig) -> tuple[dict, dict]:
    """One and eight steps of each 2-D method of mmgen/evaluation/toy2d.py (flow matching; IMM with the Laplace and the
    Gaussian kernel) on the ring (eight modes at radius ~0.70): how far the samples fall from the ring.
    Returns the scores and the samples for the plot."""
    tcfg = toy2d.Toy2DConfig(steps=cfg.toy_steps, seed=cfg.seed)
    reference, floor_set, noise, directions = toy2d.eval_sets("ring", tcfg)
    radius = float(floor_set.norm(dim=1).mean())
    scores, samples = {"data": _ring_scores(floor_set, reference, directions, radius)}, {"data": floor_set}
    for key, (objective, kernel, _) in toy2d.METHODS.items():
        net, obj_config, _ = toy2d.train(objective, "ring", dataclasses.replace(tcfg, kernel=kernel))
        for n in (1, 8):
            x = toy2d.generate(objective, net, obj_config, n, noise)
            scores[f"{key}_{n}"], samples[f"{key}_{n}"] = _ring_scores(x, reference, directions, radius), x
    return scores, samples


def _ring_scores(x, reference, directions, radius: float) -> dict:
    """Off the data: the share of samples whose radius is under half the ring's, plus the distances."""
    r = x.double().norm(dim=1)
    return {"off_ring": float((r < 0.5 * radius).double().mean()), "radius_mean": float(r.mean()),
            **toy2d.distances(x, reference, directions)}


def markdown(result: dict) -> str:
    lines = []
    for name, r in result["discrete"].items():
        title = (f"### {name} ({len(r['phrases'])} valid phrases of {r['length']} tokens; chance of a valid "
                 f"phrase when every position is drawn independently: {r['chance_valid']:.3f})")
        lines += [title, "", "| decoder | steps | invalid | 95% interval | TV of valid | invalid examples |",
                  "|---|---|---|---|---|---|"]
        rows = [("masked diffusion", L, s) for L, s in r["masked"].items()] + [("autoregressive", r["length"], r["ar"])]
        for decoder, L, s in rows:
            lo, hi = s["invalid_ci95"]
            lines.append(f"| {decoder} | {L} | {s['invalid']:.3f} | {lo:.3f}-{hi:.3f} | {s['tv_valid']:.3f} | "
                         f"{', '.join(s['invalid_examples'][:3])} |")
        lines.append("")
    lines += ["### continuous: the 2-D ring", "", "| samples | off the ring | mean radius | SWD2 |", "|---|---|---|---|"]
    for name, s in result["continuous"].items():
        lines.append(f"| {name} | {s['off_ring']:.3f} | {s['radius_mean']:.3f} | {s['swd']:.4f} |")
    return "\n".join(lines) + "\n"


def plot(result: dict, samples: dict, path: Path) -> None:
    sets = list(result["discrete"])
    fig, axes = plt.subplots(1, len(sets) + 4, figsize=(3.2 * (len(sets) + 4), 3.0))
    for ax, name in zip(axes, sets):
        r = result["discrete"][name]
        steps = [int(L) for L in r["masked"]]
        inv = [r["masked"][str(L)]["invalid"] for L in steps]
        err = [[v - r["masked"][str(L)]["invalid_ci95"][0] for L, v in zip(steps, inv)],
               [r["masked"][str(L)]["invalid_ci95"][1] - v for L, v in zip(steps, inv)]]
        ax.errorbar(steps, inv, yerr=err, fmt="o-", label="masked diffusion")
        ax.plot([r["length"]], [r["ar"]["invalid"]], "s", label=f"autoregressive ({r['length']} steps)")
        ax.set(xlabel="decoding steps L", ylabel="invalid phrases", title=f"{name} (N = {r['length']})",
               xticks=steps, ylim=(-0.03, 1.03))
        ax.legend(fontsize=7)
    titles = {"data": "ring data", "fm_1": "flow matching, 1 step", "imm_1": "IMM (Laplace), 1 step",
              "imm_gaussian_1": "IMM (Gaussian), 1 step"}
    for ax, (key, title) in zip(axes[len(sets):], titles.items()):
        x = samples[key]
        ax.scatter(x[:, 0], x[:, 1], s=0.5, alpha=0.4, rasterized=True)
        ax.set(xlim=(-1.2, 1.2), ylim=(-1.2, 1.2), xticks=[], yticks=[], aspect="equal", title=title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run(cfg: CapacityConfig, out: Path) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    result = {"discrete": {}}
    for data in (poker_set(), codes_set(cfg)):
        print(f"training the masked and autoregressive models on {data.name} ...", flush=True)
        result["discrete"][data.name] = discrete(data, cfg)
    print("training flow matching and IMM on the 2-D ring ...", flush=True)
    result["continuous"], samples = continuous(cfg)
    result["config"] = dataclasses.asdict(cfg)
    result["wall_seconds"] = time.perf_counter() - start
    (out / "capacity.json").write_text(json.dumps(result, indent=2))
    (out / "capacity.md").write_text(markdown(result))
    plot(result, samples, out / "capacity.png")
    return result


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("runs/capacity"))
    parser.add_argument("--steps", type=int, default=CapacityConfig.steps, help="training steps per language model")
    parser.add_argument("--num-samples", type=int, default=CapacityConfig.num_samples)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.steps < 1 or args.num_samples < 1:
        parser.error("--steps and --num-samples must be >= 1")
    torch.set_num_threads(1)  # tiny models: a second thread does not help, and the machine may be shared
    cfg = CapacityConfig(steps=args.steps, num_samples=args.num_samples, seed=args.seed)
    result = run(cfg, args.out)
    print(markdown(result))
    print(f"wrote {args.out}/capacity.json, capacity.md, capacity.png in {result['wall_seconds']:.0f} s")
    return result


if __name__ == "__main__":
    main()
