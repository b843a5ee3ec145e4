"""Training throughput on one GPU: tokens/s, images/s and MFU of the training step for two presets,
SDPA vs FlexAttention, without and with `torch.compile`; one JSON and one PNG.

    python eval/gpu_throughput.py --out OUT              # on one GPU, ~5 minutes
    DRY=1 python eval/gpu_throughput.py --out OUT        # CPU rehearsal: tiny shapes, one thread, ~1-2 min

Presets: `configs/gpu.yaml` (the 116M backbone, 12 x 768) at sequence length 2,048 and
`configs/shapes_gpu.yaml` (4 x 192, U-Net codec, batch 64 x 256). Each variant is `mmgen/evaluation/speed.py`'s
`training_throughput` (the real `compute_losses` step with the preset's objective and document mix, AdamW,
bf16 autocast, median step after warm-up) on a fresh model with random weights and a random VAE of stage 1's
architecture; tokens/s counts non-pad tokens, MFU is `mmgen.training.perf`'s (docs/speed/README.md). A
variant that fails is recorded with its error and the others still run.

DRY=1 replaces the shapes by tiny ones and runs on CPU, where FlexAttention has no backward: its variants
are timed forward-only there (said in each row's `mode` and printed).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]

# name: (preset, overrides on the GPU, overrides for DRY=1 on CPU)
PRESETS = {
    "116M_seq2048": ("configs/gpu.yaml", ["--data.seq_len", "2048", "--data.batch_size", "16"],
                     ["--model.hidden_size", "64", "--model.num_layers", "2", "--model.num_heads", "2",
                      "--model.image_size", "32", "--data.seq_len", "256", "--data.batch_size", "2"]),
    "shapes_gpu": ("configs/shapes_gpu.yaml", [],
                   ["--model.hidden_size", "64", "--model.num_layers", "2", "--model.num_heads", "2",
                    "--model.image_unet_width", "16", "--data.batch_size", "2"]),
}
ATTENTION = ("sdpa", "flex_attention")


def build(preset: str, overrides: list[str], device: torch.device):
    """(model, processor, config) of a preset with random weights; the VAE has stage 1's architecture."""
    from mmgen.config import load_config
    from mmgen.processing_mmgen import MMGenProcessor
    from mmgen.training.build import build_model, build_tokenizer
    from mmgen.training.vae_stage import VAETrainConfig
    from mmgen.vae import MMGenVAE

    cfg = load_config(ROOT / preset, overrides)
    tokenizer = build_tokenizer(cfg)
    vae = MMGenVAE.from_config(VAETrainConfig(resolution=cfg.model.image_size).vae_config(),
                               sigma_data=cfg.objective.sigma_data)
    torch.manual_seed(0)
    model = build_model(cfg, tokenizer, vae).to(device)
    return model, MMGenProcessor.from_config(model.config, tokenizer), cfg


def measure(name: str, attention: str, compiled: bool, *, dry: bool, device: torch.device) -> dict:
    from mmgen.evaluation.speed import training_throughput

    preset, gpu_args, dry_args = PRESETS[name]
    torch._dynamo.reset()  # each variant compiles its own model from scratch
    model, processor, cfg = build(preset, [*(dry_args if dry else gpu_args), "--model.attn_implementation", attention],
                                  device)
    forward_only = device.type == "cpu" and attention == "flex_attention"
    if forward_only:
        print(f"{name} {attention}: forward-only on CPU (FlexAttention has no backward there)", flush=True)
    documents = {"tasks": cfg.data.tasks, "max_objects": cfg.data.max_objects, "particles": cfg.data.particles,
                 "t2i_max_objects": cfg.data.t2i_max_objects}
    r = training_throughput(model, processor, rows=cfg.data.batch_size, seq_len=cfg.data.seq_len,
                            steps=1 if dry else 10, warmup=1 if dry else 3, compile_model=compiled,
                            forward_only=forward_only, target_pass=cfg.objective.target_pass, documents=documents)
    params = sum(p.numel() for n, p in model.named_parameters() if not n.startswith("vae."))
    return {"preset": name, "attention": attention, "compile": compiled, "params": params,
            "mode": "forward-only" if forward_only else "train", **r}


def plot(rows: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in rows if "error" not in r]
    labels = [f"{r['preset']}\n{r['attention'].replace('_attention', '')}{' compiled' if r['compile'] else ''}"
              f"{' fwd' if r['mode'] != 'train' else ''}" for r in ok]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5))
    for ax, key, unit in zip(axes, ("tokens_per_s", "images_per_s", "mfu"), ("tokens/s", "images/s", "MFU")):
        ax.bar(range(len(ok)), [r[key] for r in ok], color=["C0" if r["preset"] == ok[0]["preset"] else "C1" for r in ok])
        ax.set_xticks(range(len(ok)), labels, fontsize=7, rotation=45, ha="right")
        ax.set_title(unit)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def _one_line(err: BaseException) -> str:
    """The error on one line: its start and its end (a compiler's message ends with the cause)."""
    text = f"{type(err).__name__}: {' '.join(str(err).split())}"
    return text if len(text) <= 800 else f"{text[:300]} ... {text[-500:]}"


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="runs/gpu_throughput", help="folder for throughput.json and .png")
    parser.add_argument("--presets", nargs="+", default=list(PRESETS), choices=list(PRESETS))
    args = parser.parse_args(argv)
    dry = os.environ.get("DRY") == "1"
    device = torch.device("cpu" if dry or not torch.cuda.is_available() else "cuda")
    if device.type == "cpu":
        if not dry:
            parser.error("no CUDA device: run on a GPU, or set DRY=1 for the CPU rehearsal")
        torch.set_num_threads(1)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    env = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu", "dry": dry,
           "torch": torch.__version__, "threads": torch.get_num_threads()}
    print(json.dumps(env), flush=True)
    rows = []
    for name in args.presets:
        for attention in ATTENTION:
            for compiled in (False, True):
                start = time.perf_counter()
                try:
                    row = measure(name, attention, compiled, dry=dry, device=device)
                except Exception as err:  # noqa: BLE001  (one variant's failure is a result, the rest still run)
                    row = {"preset": name, "attention": attention, "compile": compiled,
                           "error": _one_line(err)}
                row["wall_s"] = time.perf_counter() - start
                rows.append(row)
                shown = ("error",) if "error" in row else ("mode", "tokens_per_s", "images_per_s", "mfu",
                                                           "seconds_per_step", "peak_memory_gib")
                print(json.dumps({k: row[k] for k in ("preset", "attention", "compile", *shown, "wall_s")}), flush=True)
                if device.type == "cuda":
                    torch.cuda.empty_cache()
    result = {**env, "rows": rows}
    (out / "throughput.json").write_text(json.dumps(result, indent=1) + "\n")
    plot(rows, out / "throughput.png", f"eval/gpu_throughput.py on {env['device']}{' (DRY)' if dry else ''}")
    print(f"wrote {out / 'throughput.json'} and {out / 'throughput.png'}")
    return result


if __name__ == "__main__":
    main()
