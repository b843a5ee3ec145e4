"""Images/s through the training input path and the VAE encoder: image shards vs shards with cached latents.

    python eval/bench_latents.py [--vae DIR] [--num-docs 600] [--resolution 32] [--repeats 3]
                                 [--out docs/speed/latent_shards.json]

Both shard sets hold the same shapes-world documents; the second is written with `make_shards --vae` (its
one-time encoding is timed as well). Each set is read in order by `WebDocuments` (latents=True for the
cached set), packed by `DocumentPacker` and turned into normalised latents by
`mmgen.data.latents.encode_batch`, the training step's encoder call; the model step is not run. The best of
`--repeats` passes counts (the machine may be shared). Without --vae a randomly initialised VAE of the stage-1
architecture (`mmgen.training.vae_stage.VAETrainConfig`) stands in: the speed does not depend on the weights.
One torch thread.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from mmgen.data.latents import LatentCache, encode_batch
from mmgen.data.make_shards import ShapesSource, make_shards
from mmgen.data.packing import DocumentPacker, PackingConfig
from mmgen.data.webdata import WebDocuments
from mmgen.tokenization import load_tokenizer
from mmgen.training.vae_stage import VAETrainConfig
from mmgen.vae import MMGenVAE

ROOT = Path(__file__).resolve().parents[1]


def one_pass(shards: str, vae: MMGenVAE, tokenizer, packing: PackingConfig, *, latents: bool, batch_size: int) -> dict:
    reader = WebDocuments(shards, resolution=packing.image_size, shuffle=False, epochs=1, latents=latents)
    packer = DocumentPacker(tokenizer, packing, batch_size=batch_size)
    images, encoder_s, start = 0, 0.0, time.perf_counter()
    for batch in packer.iter_batches(reader):
        t = time.perf_counter()
        images += encode_batch(vae, batch["images"], batch).shape[0]
        encoder_s += time.perf_counter() - t
    return {"images": images, "seconds": time.perf_counter() - start, "encoder_seconds": encoder_s}


def measure(shards: str, vae, tokenizer, packing, *, latents: bool, batch_size: int, repeats: int) -> dict:
    best = min((one_pass(shards, vae, tokenizer, packing, latents=latents, batch_size=batch_size)
                for _ in range(repeats)), key=lambda r: r["seconds"])
    input_s = best["seconds"] - best["encoder_seconds"]
    return {"shards": "latents" if latents else "images", "images": best["images"],
            "seconds": round(best["seconds"], 3), "encoder_seconds": round(best["encoder_seconds"], 3),
            "images_per_s": round(best["images"] / best["seconds"], 1),
            "input_path_images_per_s": round(best["images"] / input_s, 1)}


def _size(directory: Path) -> int:
    return sum(p.stat().st_size for p in directory.glob("*.tar"))


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--vae", default=None, help="VAE directory (default: stage-1 architecture, random weights)")
    parser.add_argument("--num-docs", type=int, default=600)
    parser.add_argument("--resolution", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=16, help="rows per packed batch")
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    tokenizer = load_tokenizer(str(ROOT / "tokenizers" / "shapes"))
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        vae_dir = args.vae
        if vae_dir is None:
            torch.manual_seed(0)
            vae_dir = str(tmp / "vae")
            MMGenVAE.from_config(VAETrainConfig(resolution=args.resolution).vae_config()).vae.save_pretrained(vae_dir)
        source = ShapesSource(num_docs=args.num_docs, resolution=args.resolution)
        make_shards(source, tmp / "images", samples_per_shard=200)
        cache = LatentCache.open(vae_dir, resolution=args.resolution)
        start = time.perf_counter()
        written = make_shards(source, tmp / "latents", samples_per_shard=200, latents=cache)
        make_s = time.perf_counter() - start
        vae = cache.vae
        tokens = (args.resolution // vae.downsample_factor // 4) ** 2  # patch size 4, as configs/default.yaml
        packing = PackingConfig(seq_len=args.seq_len, num_image_tokens=tokens, image_size=args.resolution)
        rows = [measure(str(tmp / kind / "train-*.tar"), vae, tokenizer, packing, latents=kind == "latents",
                        batch_size=args.batch_size, repeats=args.repeats) for kind in ("images", "latents")]
        rows[0]["disk_bytes"], rows[1]["disk_bytes"] = _size(tmp / "images"), _size(tmp / "latents")
    result = {"device": "cpu", "torch_threads": 1, "vae": args.vae or "stage-1 architecture, random weights",
              "resolution": args.resolution, "latent_shape": written["latents"]["shape"],
              "num_docs": args.num_docs, "batch_size": args.batch_size, "seq_len": args.seq_len,
              "repeats": args.repeats, "rows": rows,
              "make_shards_vae_images_per_s": round(written["num_images"] / make_s, 1),
              "speedup": round(rows[1]["images_per_s"] / rows[0]["images_per_s"], 2)}
    print(json.dumps(result, indent=1))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    return result


if __name__ == "__main__":
    main()
