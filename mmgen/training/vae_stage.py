"""Stage 1 of the embedded default run: a small diffusers ``AutoencoderKL`` for the shapes world.

The command line is ``training/train_vae.py``; the main job calls :func:`ensure_vae`.

1. Train on shapes-world renders (split "train"), rendered fresh from seeded scenes every step:
   loss = l1_weight * |x_hat - x| + l2_weight * (x_hat - x)^2 + kl_weight * KL(q(z|x) || N(0, I)),
   reconstruction terms are means over pixels; KL is the mean over latent elements (diffusers'
   ``DiagonalGaussianDistribution.kl`` sums, we divide by C*h*w). The decoder sees a posterior
   SAMPLE during training, so it learns to decode both the mode and nearby points.
   AdamW, warm-up + cosine, bf16 autocast on CPU (about 2x faster than fp32 on CPUs with bf16 units).
2. Measure the per-channel mean/std of the raw latents (posterior mode, what ``MMGenVAE.encode``
   returns by default) over held-out renders (new seeds), and write them into the VAE's own config
   as ``latents_mean`` / ``latents_std``: ``MMGenVAE.load_pretrained(out)`` picks them up, so
   normalised latents have std ~ sigma_data = 0.5. A copy goes to latent_stats.json.
3. Evaluate on other held-out renders: PSNR and the judge's exact-scene accuracy
   (``mmgen.data.judge``) on reconstructions from the posterior mode and from a posterior sample,
   for split "train" (new scenes) and "heldout_combos" (colour/shape pairs the VAE never saw).
4. Write everything to a temp dir beside ``out``, mark it COMPLETE, and rename it into place, so a
   killed run never leaves a directory that :func:`ensure_vae` would accept.

Output (``out``): config.json + diffusion_pytorch_model.safetensors (``save_pretrained``),
latent_stats.json, metrics.json, train_config.json, history.jsonl, reconstructions.png, COMPLETE.
Defaults: 4 latent channels at downsample factor 2 (32x32 -> 16x16x4), base 16 channels, 1000 steps.
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from mmgen.data.image_transforms import image_to_tensor, tensor_to_image
from mmgen.data.judge import judge_image, pixel_colours, scenes_match
from mmgen.data.shapes import render, sample_scene
from mmgen.training.schedule import warmup_cosine
from mmgen.vae import MMGenVAE, tiny_vae_config

MARKER = "COMPLETE"


@dataclass(frozen=True)
class VAETrainConfig:
    out: str = "runs/vae"
    steps: int = 1000
    batch_size: int = 32
    resolution: int = 32
    # architecture (mmgen.vae.tiny_vae_config)
    latent_channels: int = 4
    # 32x32 -> 16x16 latents (16 image tokens at patch size 4); factor 4 rounds the squares' corners
    downsample_factor: int = 2
    base_channels: int = 16
    layers_per_block: int = 1
    # objective and optimiser
    l1_weight: float = 1.0
    l2_weight: float = 1.0
    kl_weight: float = 1e-4
    # Amplitude equivariance (after EQ-VAE, Kouzelis et al. 2025, arXiv 2502.09509, which asks the same of
    # spatial transforms): decode(z_bg + a (z - z_bg)) should be the image faded toward the black
    # background by a, a ~ U(amplitude_min, 1), so a latent the generator has shrunk toward the background
    # decodes to a dimmer shape of the same colour instead of another colour. Off by default: it did not
    # make the generator draw the asked colours more often (docs/findings.md).
    amplitude_weight: float = 0.0
    amplitude_min: float = 0.3
    lr: float = 4e-3
    weight_decay: float = 0.01
    warmup_steps: int = 50
    grad_clip: float = 1.0
    bf16: bool = True
    heldout_share: float = 0.2  # share of training renders with held-out colour-shape pairs
    # held-out sets (scenes from seeds disjoint from training's)
    num_stats: int = 1024
    num_eval: int = 512
    sigma_data: float = 0.5
    seed: int = 0

    def vae_config(self) -> dict:
        return tiny_vae_config(latent_channels=self.latent_channels, downsample_factor=self.downsample_factor,
                               base_channels=self.base_channels, image_size=self.resolution,
                               layers_per_block=self.layers_per_block)


# --------------------------------------------------------------------------- data


def scene_stream(tag: str, seed: int, split: str = "train", heldout_share: float = 0.0):
    """Endless scenes of `split` (a share `heldout_share` from "heldout_combos" instead); `tag`
    separates training from held-out streams (str seeds hash with SHA-512 in `random.Random`, so
    streams are reproducible and independent)."""
    rng = random.Random(f"mmgen-vae-{tag}-{seed}")
    while True:
        yield sample_scene(rng, split="heldout_combos" if rng.random() < heldout_share else split)


def render_batch(scenes, resolution: int) -> torch.Tensor:
    """Scenes -> (B, 3, H, W) float32 in [-1, 1]."""
    return torch.stack([image_to_tensor(render(s, resolution), resolution) for s in scenes])


def take(stream, n: int) -> list:
    return [next(stream) for _ in range(n)]


def batches(x: torch.Tensor, size: int = 128):
    return (x[i : i + size] for i in range(0, len(x), size))


# --------------------------------------------------------------------------- training


def vae_loss(vae, x: torch.Tensor, cfg: VAETrainConfig, generator: torch.Generator):
    """(loss, diagnostics) for one batch x (B, 3, H, W) in [-1, 1]."""
    posterior = vae.encode(x).latent_dist
    z = posterior.sample(generator=generator)  # (B, C, h, w)
    x_hat = vae.decode(z).sample.float()
    err = x_hat - x
    l1, l2 = err.abs().mean(), err.pow(2).mean()
    kl = posterior.kl().float().mean() / z[0].numel()  # per latent element
    loss = cfg.l1_weight * l1 + cfg.l2_weight * l2 + cfg.kl_weight * kl
    psnr = 10 * math.log10(4.0 / max(l2.item(), 1e-12))  # images span 2 (from -1 to 1)
    diag = {"l1": l1.item(), "l2": l2.item(), "kl": kl.item(), "psnr": psnr}
    if cfg.amplitude_weight > 0:
        black = torch.full_like(x[:1], -1.0)
        z_bg = vae.encode(black).latent_dist.mode()  # (1, C, h, w)
        a = cfg.amplitude_min + (1 - cfg.amplitude_min) * torch.rand(
            (x.shape[0], 1, 1, 1), generator=generator).to(x.dtype)
        faded = vae.decode(z_bg + a.to(z.dtype) * (z - z_bg)).sample.float() - (-1 + a * (x + 1))
        amp = cfg.l1_weight * faded.abs().mean() + cfg.l2_weight * faded.pow(2).mean()
        loss = loss + cfg.amplitude_weight * amp
        diag["amplitude"] = amp.item()
    return loss, diag


def train(cfg: VAETrainConfig, progress: bool = True):
    """Train an AutoencoderKL from scratch; returns (vae, history)."""
    from diffusers import AutoencoderKL

    torch.manual_seed(cfg.seed)
    vae = AutoencoderKL.from_config(cfg.vae_config())
    vae.train()
    opt = torch.optim.AdamW(vae.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda k: warmup_cosine(k, warmup_steps=cfg.warmup_steps, max_steps=cfg.steps))
    gen = torch.Generator().manual_seed(cfg.seed)
    # The VAE is the image tokenizer, not the generative model: like a pretrained VAE it sees every
    # colour-shape pair, so held-out-pair evaluation measures the generator, not the reconstruction.
    stream = scene_stream("train", cfg.seed, "train", heldout_share=cfg.heldout_share)
    history = []
    bar = tqdm(range(cfg.steps), desc="vae", disable=not progress, dynamic_ncols=True)
    for step in bar:
        x = render_batch(take(stream, cfg.batch_size), cfg.resolution)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=cfg.bf16):
            loss, diag = vae_loss(vae, x, cfg, gen)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), cfg.grad_clip)
        opt.step()
        sched.step()
        history.append({"step": step, "loss": loss.item(), **diag})
        bar.set_postfix(loss=f"{loss.item():.4f}", psnr=f"{diag['psnr']:.1f}", kl=f"{diag['kl']:.2f}")
    vae.eval()
    return vae, history


# --------------------------------------------------------------------------- evaluation


def psnr_uint8(a: np.ndarray, b: np.ndarray) -> float:
    """PSNR in dB of two uint8 images (capped at 100 dB for identical images)."""
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return 100.0 if mse == 0 else 10 * math.log10(255.0**2 / mse)


@torch.no_grad()
def hue_kept(mvae: MMGenVAE, x: torch.Tensor, originals: list, amplitude: float) -> float:
    """Share of the originals' coloured pixels whose judged colour survives decoding the normalised latent
    shrunk toward the blank image's by `amplitude` (1.0 for a decoder linear along that path, for
    amplitude >= 0.5: the judge calls a pixel colour c from half of c's intensity on)."""
    z_bg = mvae.encode(torch.full_like(x[:1], -1.0))
    z = torch.cat([mvae.encode(b) for b in batches(x)])
    faded = torch.cat([mvae.decode(z_bg + amplitude * (b - z_bg)) for b in batches(z)])
    kept = total = 0
    for original, image in zip(originals, faded):
        want = pixel_colours(original)
        got = pixel_colours(np.asarray(tensor_to_image(image)))
        mask = want >= 0
        kept += int((got[mask] == want[mask]).sum())
        total += int(mask.sum())
    return kept / max(total, 1)


@torch.no_grad()
def evaluate(mvae: MMGenVAE, scenes, resolution: int, seed: int) -> tuple[dict, list, list]:
    """Reconstruct `scenes` through the normalised latents (mode and posterior sample) and judge
    them. Exact scene = the judgement is valid and its scene matches the truth one to one
    (colour, shape, size bucket, box centre within `tol`). Returns (metrics, originals, mode recons)."""
    x = render_batch(scenes, resolution)
    gen = torch.Generator().manual_seed(seed)
    originals = [np.asarray(tensor_to_image(img)) for img in x]
    truth = [judge_image(o) for o in originals]
    truth_valid = [j.valid and scenes_match(j.scene, s, 0.5 / resolution) for j, s in zip(truth, scenes)]
    out = {"num_images": len(scenes), "judge_exact_on_originals": float(np.mean(truth_valid)),
           "hue_kept_at_0.6": hue_kept(mvae, x, originals, 0.6)}
    recons_mode = None
    for mode in ("mode", "sample"):
        recon = torch.cat([mvae.decode(mvae.encode(b, sample=mode == "sample", generator=gen))
                           for b in batches(x)])
        images = [np.asarray(tensor_to_image(r)) for r in recon]
        judged = [judge_image(im) for im in images]
        res = {"psnr_db": float(np.mean([psnr_uint8(a, b) for a, b in zip(originals, images)])),
               "valid": float(np.mean([j.valid for j in judged]))}
        for tol_px in (0.5, 1.0):
            res[f"judge_exact_tol{tol_px:g}px"] = float(np.mean(
                [j.valid and scenes_match(j.scene, s, tol_px / resolution) for j, s in zip(judged, scenes)]))
        out[mode] = res
        if mode == "mode":
            recons_mode = images
    return out, originals, recons_mode


def save_grid(originals, recons, path: Path, columns: int = 16, scale: int = 4) -> None:
    """Rows alternate originals / reconstructions, `columns` images per row, nearest-upscaled."""
    n = len(originals) - len(originals) % columns or len(originals)
    rows = []
    for i in range(0, n, columns):
        for group in (originals, recons):
            row = [group[j] for j in range(i, min(i + columns, n))]
            row += [np.zeros_like(originals[0])] * (columns - len(row))
            rows.append(np.concatenate(row, axis=1))  # (H, columns*W, 3)
    grid = Image.fromarray(np.concatenate(rows, axis=0))
    grid.resize((grid.width * scale, grid.height * scale), Image.Resampling.NEAREST).save(path)


# --------------------------------------------------------------------------- output


def is_complete(out_dir: str | Path) -> bool:
    """A stage-1 output that finished: the marker is written last, inside the temp dir."""
    out = Path(out_dir)
    return (out / MARKER).is_file() and (out / "config.json").is_file()


def _remove_stale_temps(out: Path) -> None:
    """Temp dirs of runs that died (their pid no longer exists); a live run's temp dir is kept."""
    for tmp in out.parent.glob(f".tmp-{out.name}-*"):
        try:
            pid = int(tmp.name.rsplit("-", 1)[1])
            os.kill(pid, 0)
        except (ValueError, ProcessLookupError):
            shutil.rmtree(tmp, ignore_errors=True)
        except PermissionError:  # alive, someone else's
            pass


def train_vae(cfg: VAETrainConfig, progress: bool = True) -> Path:
    """Run stage 1 and write its output atomically to ``cfg.out``; returns that path."""
    out = Path(cfg.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_temps(out)
    tmp = out.parent / f".tmp-{out.name}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    t0 = time.time()
    vae, history = train(cfg, progress)
    train_s = time.time() - t0

    mvae = MMGenVAE(vae, sigma_data=cfg.sigma_data)
    stats_scenes = take(scene_stream("stats", cfg.seed, "train"), cfg.num_stats)
    mean, std = mvae.compute_latent_stats(batches(render_batch(stats_scenes, cfg.resolution)))
    mvae.set_latent_stats(mean, std)
    vae.register_to_config(latents_mean=mean.tolist(), latents_std=std.tolist())

    metrics = {}
    grid = None
    for split in ("train", "heldout_combos"):
        scenes = take(scene_stream(f"eval-{split}", cfg.seed, split), cfg.num_eval)
        metrics[f"eval_{split}"], originals, recons = evaluate(mvae, scenes, cfg.resolution, cfg.seed)
        grid = grid or (originals[:32], recons[:32])
    # normalised held-out latents (eval scenes, not the stats scenes): std per channel ~ sigma_data
    z = mvae.encode(render_batch(take(scene_stream("eval-train", cfg.seed, "train"), cfg.num_eval), cfg.resolution))
    num_params = sum(p.numel() for p in vae.parameters())
    metrics.update({
        "num_params": num_params,
        "latent_shape": list(z.shape[1:]),
        "heldout_normalised_latent_std": z.transpose(0, 1).reshape(z.shape[1], -1).std(dim=1).tolist(),
        "heldout_normalised_latent_mean": z.transpose(0, 1).reshape(z.shape[1], -1).mean(dim=1).tolist(),
        "train_seconds": train_s,
        "seconds_per_step": train_s / max(1, cfg.steps),
        "final_train": {k: float(np.mean([h[k] for h in history[-20:]])) for k in ("loss", "l1", "l2", "kl", "psnr")},
    })

    tmp.mkdir(parents=True)
    vae.save_pretrained(tmp, safe_serialization=True)
    stats = {"latents_mean": mean.tolist(), "latents_std": std.tolist(), "sigma_data": cfg.sigma_data,
             "posterior": "mode", "num_images": cfg.num_stats}
    (tmp / "latent_stats.json").write_text(json.dumps(stats, indent=2))
    (tmp / "train_config.json").write_text(json.dumps(asdict(cfg), indent=2))
    (tmp / "history.jsonl").write_text("".join(json.dumps(h) + "\n" for h in history))
    save_grid(*grid, tmp / "reconstructions.png")
    metrics["wall_seconds"] = time.time() - t0
    (tmp / "metrics.json").write_text(json.dumps(metrics, indent=2))
    (tmp / MARKER).write_text("stage 1 complete\n")
    if out.exists():  # an incomplete earlier attempt (ensure_vae never gets here for a complete one)
        shutil.rmtree(out)
    os.replace(tmp, out)
    return out


def ensure_vae(out_dir: str | Path = "runs/vae", progress: bool = True, **overrides) -> Path:
    """Run stage 1 only if ``out_dir`` holds no complete output (COMPLETE marker); returns ``out_dir``.

    A directory without the marker (a run killed mid-write, or a manual copy) is retrained.
    Call it on the main process only (then wait for the others): stage 1 is single-process.
    """
    if is_complete(out_dir):
        return Path(out_dir)
    return train_vae(VAETrainConfig(out=str(out_dir), **overrides), progress=progress)


def load_vae(out_dir: str | Path, sigma_data: float = 0.5) -> MMGenVAE:
    """The trained VAE with its latent stats (``latents_mean``/``latents_std`` in its config)."""
    if not is_complete(out_dir):
        raise FileNotFoundError(f"{out_dir} is not a complete stage-1 output (no {MARKER} marker)")
    return MMGenVAE.load_pretrained(str(out_dir), sigma_data=sigma_data)
