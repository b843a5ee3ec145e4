"""Train the ShapeFD/ShapeKID feature net once, deterministically (mmgen/evaluation/shapefd.py explains why).

    python eval/train_shapefd.py [--num-images 6000] [--epochs 4] [--out mmgen/evaluation/shapefd.safetensors]

Data: seeded renders of random shapes scenes (32x32; train and held-out colour-shape combinations, so
held-out objects have features too). Targets: how many objects of each of the 24 (colour, shape) pairs
(regression, squared error) and the number of objects (0..4, cross-entropy). One CPU thread, deterministic
algorithms, fixed seeds: the same weights on every run of this torch version. Writes the weights as
safetensors and DIR/shapefd.json with their SHA-256, the data/optimizer settings and held-out accuracy.
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

import torch
from tqdm import tqdm

from mmgen.data.shapes import COLOURS, SHAPES, render, sample_scene
from mmgen.evaluation.shapefd import WEIGHTS, ShapeFeatureNet, file_sha256, images_to_tensor

COMBOS = [(c, s) for c in COLOURS for s in SHAPES]


def make_data(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(images (n, 3, 32, 32), objects per (colour, shape) pair (n, 24), object count (n,)) of seeded scenes."""
    rng = random.Random(f"shapefd/{seed}")
    scenes = [sample_scene(rng, split="heldout_combos" if rng.random() < 0.3 else "train") for _ in range(n)]
    x = images_to_tensor([render(s, 32) for s in tqdm(scenes, desc="render", leave=False)])
    per_combo = torch.tensor([[float(s.count(c, sh)) for c, sh in COMBOS] for s in scenes])
    count = torch.tensor([len(s.objects) for s in scenes])
    return x, per_combo, count


def train(num_images: int = 6000, epochs: int = 3, batch_size: int = 32, lr: float = 1e-3, seed: int = 0):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # determinism across machines with different core counts, and speed here
    torch.use_deterministic_algorithms(True)
    try:
        torch.manual_seed(seed)
        x, per_combo, count = make_data(num_images, seed)
        xt, pt, ct = make_data(1000, seed + 1)
        net = ShapeFeatureNet()
        opt = torch.optim.Adam(net.parameters(), lr=lr)
        g = torch.Generator().manual_seed(seed)
        steps = epochs * (num_images // batch_size)
        bar = tqdm(total=steps, desc="shapefd net")
        for _ in range(epochs):
            order = torch.randperm(num_images, generator=g)
            for i in range(num_images // batch_size):
                idx = order[i * batch_size : (i + 1) * batch_size]
                logits, counts = net(x[idx])
                loss = (logits - per_combo[idx]).square().mean() + torch.nn.functional.cross_entropy(counts, count[idx])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                bar.update()
                bar.set_postfix(loss=f"{loss.item():.3f}")
        bar.close()
        net.eval()
        with torch.no_grad():
            logits, counts = net(xt)
        acc = {
            "per_combo_counts_all_exact": float((logits.round() == pt).all(1).float().mean()),
            "per_combo_count": float((logits.round() == pt).float().mean()),
            "count": float((counts.argmax(1) == ct).float().mean()),
        }
    finally:
        torch.use_deterministic_algorithms(False)
        torch.set_num_threads(threads)
    settings = {"num_images": num_images, "epochs": epochs, "batch_size": batch_size, "lr": lr, "seed": seed}
    return net, acc, settings


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--num-images", type=int, default=6000)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=str(WEIGHTS))
    args = p.parse_args(argv)
    from safetensors.torch import save_file

    start = time.perf_counter()
    net, acc, settings = train(args.num_images, args.epochs, seed=args.seed)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(out))
    info = {
        "sha256": file_sha256(out),
        "settings": settings,
        "heldout_accuracy": acc,
        "train_seconds": round(time.perf_counter() - start, 1),
        "torch": torch.__version__,
    }
    out.with_suffix(".json").write_text(json.dumps(info, indent=2) + "\n")
    print(json.dumps(info, indent=2))
    return info


if __name__ == "__main__":
    main()
