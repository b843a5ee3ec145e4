"""Latents cached in the shards (mmgen/data/latents.py): make_shards --vae stores each image's float16 posterior
mode beside it, training from such shards skips the encoder and gives the losses of the image shards, and a
run refuses latents of another VAE or image size with one line."""

from __future__ import annotations

import io
import json
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from train_helpers import ROOT, TINY, load_script, make_tiny_vae

from mmgen.config import load_config
from mmgen.data.latents import LatentMismatchError, LatentSpec, encode_batch, vae_identity
from mmgen.data.make_shards import main as make_shards
from mmgen.data.packing import PackingConfig, collate_documents
from mmgen.data.sample_format import CachedLatent, decode_latent
from mmgen.data.webdata import WebDocuments
from mmgen.objectives import get_objective
from mmgen.processing_mmgen import MMGenProcessor
from mmgen.tokenization import load_tokenizer
from mmgen.training.build import build_model, build_tokenizer, load_run_vae, objective_params
from mmgen.training.data import TrainStream
from mmgen.training.step import compute_losses
from mmgen.vae import MMGenVAE, tiny_vae_config

SHAPES = ["--source", "shapes", "--num-docs", "40", "--seed", "0", "--resolution", "32", "--samples-per-shard", "20"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    base = tmp_path_factory.mktemp("latents")
    vae = make_tiny_vae(base / "vae")
    torch.manual_seed(1)
    MMGenVAE.from_config(tiny_vae_config(base_channels=8)).vae.save_pretrained(base / "other_vae")
    make_shards([*SHAPES, "--out", str(base / "images")])
    make_shards([*SHAPES, "--out", str(base / "latents"), "--vae", str(vae)])
    return {"vae": vae, "other_vae": base / "other_vae", "images": base / "images", "latents": base / "latents"}


def _members(shard: Path) -> dict[str, bytes]:
    with tarfile.open(shard) as tar:
        return {m.name: tar.extractfile(m).read() for m in tar if m.isreg()}


def test_each_image_gets_the_float16_posterior_mode_of_the_image_and_the_vae_identity(data):
    vae = MMGenVAE.load_pretrained(str(data["vae"]))
    manifest = json.loads((data["latents"] / "train-manifest.json").read_text())
    assert manifest["latents"]["vae"] == vae_identity(vae) and manifest["latents"]["shape"] == [4, 8, 8]
    count = 0
    for shard in sorted(data["latents"].glob("*.tar")):
        members = _members(shard)
        assert members.keys() - {n for n in members if n.endswith(".latent.safetensors")} == \
            _members(data["images"] / shard.name).keys()  # the image shards' members, all kept
        for name, png in members.items():
            if not name.endswith(".png"):
                continue
            cached = decode_latent(members[name.removesuffix(".png") + ".latent.safetensors"], name)
            pixels = np.asarray(Image.open(io.BytesIO(png)).convert("RGB"), dtype=np.float32) / 127.5 - 1
            x = torch.from_numpy(pixels).permute(2, 0, 1)[None]  # (1, 3, 32, 32)
            with torch.no_grad():
                mode = vae.vae.encode(x).latent_dist.mode()[0]  # (4, 8, 8), unnormalised
            assert cached.vae == manifest["latents"]["vae"] and cached.latent.dtype == np.float16
            # float16 keeps 11 significant bits: relative error <= 2**-11 (atol: values near zero)
            torch.testing.assert_close(torch.from_numpy(cached.latent).float(), mode, rtol=2**-11, atol=1e-6)
            count += 1
    assert count == manifest["num_images"] > 0


def test_the_reader_gives_images_unless_asked_for_latents(data):
    def first_image(**kwargs):
        doc = next(iter(WebDocuments(str(data["latents"]), shuffle=False, epochs=1, **kwargs)))
        return next(s["image"] for s in doc["segments"] if "image" in s)

    assert isinstance(first_image(), Image.Image)
    assert isinstance(first_image(latents=True), CachedLatent)


def _tiny_run_losses(data, shards: Path, steps: int = 3) -> tuple[list, int]:
    """(text, image) losses of `steps` optimizer steps of the tiny config, and the number of encoder calls."""
    cfg = load_config(TINY, ["--model.vae", str(data["vae"])])
    tokenizer = build_tokenizer(cfg)
    vae = load_run_vae(cfg.model.vae, cfg.objective.sigma_data)
    torch.manual_seed(0)
    model = build_model(cfg, tokenizer, vae)
    processor = MMGenProcessor.from_config(model.config, tokenizer)
    packing = PackingConfig(seq_len=cfg.data.seq_len, num_image_tokens=model.config.num_image_tokens,
                            image_size=cfg.model.image_size, num_noisy_copies=1, special_ids=processor.special_ids)
    calls, encode = [], vae.encode

    def counted(images):
        calls.append(images.shape[0])
        return encode(images)

    vae.encode = counted
    stream = TrainStream(str(shards / "train-*.tar"), tokenizer, packing, batch_size=cfg.data.batch_size, seed=0,
                         latents=LatentSpec.of(vae, cfg.model.image_size, cfg.model.vae))
    loss_fn, _ = get_objective(cfg.objective.name, sigma_data=cfg.objective.sigma_data, **objective_params(cfg))
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.optim.lr)
    generator = torch.Generator().manual_seed(0)
    out = []
    for _ in range(steps):
        losses = compute_losses(model, vae, next(stream), loss_fn=loss_fn, lambda_img=cfg.objective.lambda_img,
                                generator=generator, device=torch.device("cpu"))
        losses.loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        out.append((losses.text.item(), losses.image.item()))
    stream.close()
    return out, sum(calls)


def test_training_from_latent_shards_skips_the_encoder_and_gives_the_losses_of_image_shards(data):
    from_latents, encoded = _tiny_run_losses(data, data["latents"])
    from_images, encoded_images = _tiny_run_losses(data, data["images"])
    assert encoded == 0 and encoded_images > 0
    # The only difference is the float16 storage, a relative change <= 2**-11 of each latent; the losses (at
    # most quadratic in the latents) move by at most about twice that.
    torch.testing.assert_close(torch.tensor(from_latents), torch.tensor(from_images), rtol=2**-10, atol=1e-7)


def test_a_batch_mixing_cached_latents_and_images_encodes_only_the_images(data):
    vae = MMGenVAE.load_pretrained(str(data["vae"]))
    tokenizer = load_tokenizer(str(ROOT / "tokenizers" / "shapes"))
    packing = PackingConfig(seq_len=256, num_image_tokens=16, image_size=32)
    images = list(WebDocuments(str(data["images"]), shuffle=False, epochs=1))[:4]
    cached = list(WebDocuments(str(data["latents"]), shuffle=False, epochs=1, latents=True))[:4]
    mixed = [images[0], cached[1], images[2], cached[3]]
    want = encode_batch(vae, (plain := collate_documents(images, tokenizer, packing))["images"], plain)
    batch = collate_documents(mixed, tokenizer, packing)
    assert 0 < batch["images"].shape[0] < want.shape[0] == batch["latent_cached"].shape[0]
    torch.testing.assert_close(encode_batch(vae, batch["images"], batch), want, rtol=2**-10, atol=1e-6)


def _stream(data, shards: str, vae_dir: Path, image_size: int = 32, prefetch: int = 0, num_workers: int = 0):
    vae = MMGenVAE.load_pretrained(str(vae_dir))
    f = vae.downsample_factor
    packing = PackingConfig(seq_len=128, num_image_tokens=(image_size // f // 2) ** 2, image_size=image_size)
    return TrainStream(shards, load_tokenizer(str(ROOT / "tokenizers" / "shapes")), packing, batch_size=2, seed=0,
                       prefetch=prefetch, num_workers=num_workers, latents=LatentSpec.of(vae, image_size, str(vae_dir)))


def test_latents_of_another_vae_or_size_are_refused_naming_the_manifest_and_both_vaes(data):
    ours = vae_identity(MMGenVAE.load_pretrained(str(data["vae"])))[:16]
    theirs = vae_identity(MMGenVAE.load_pretrained(str(data["other_vae"])))[:16]
    manifest = data["latents"] / "train-manifest.json"
    with pytest.raises(LatentMismatchError) as refused:
        _stream(data, str(data["latents"] / "train-*.tar"), data["other_vae"])
    assert str(manifest) in str(refused.value) and ours in str(refused.value) and theirs in str(refused.value)
    assert "\n" not in str(refused.value)
    with pytest.raises(LatentMismatchError, match=r"model.image_size=64 needs \(4, 16, 16\)"):
        _stream(data, str(data["latents"] / "train-*.tar"), data["vae"], image_size=64)
    _stream(data, str(data["images"] / "train-*.tar"), data["other_vae"]).close()  # no latents: any VAE


@pytest.mark.parametrize("prefetch, num_workers", [(2, 0), (0, 1)])
def test_latents_without_a_manifest_are_refused_when_read_naming_shard_and_key(data, tmp_path, prefetch, num_workers):
    shutil.copy(data["latents"] / "train-000000.tar", tmp_path / "copied.tar")
    stream = _stream(data, str(tmp_path / "copied.tar"), data["other_vae"], prefetch=prefetch, num_workers=num_workers)
    with pytest.raises(LatentMismatchError, match=r"copied.tar, key \d+: cached latents made by VAE") as refused:
        next(stream)  # from the prefetch thread or a DataLoader worker, as the trainer meets it
    assert "\n" not in str(refused.value)
    stream.close()


def test_train_py_refuses_another_vaes_latents_in_one_line(data, tmp_path, capsys):
    train = load_script("training/train.py")
    status = train.main(["--config", str(TINY), "--model.vae", str(data["other_vae"]), "--data.source", "shards",
                         "--data.shards", str(data["latents"] / "train-*.tar"), "--run.output_dir", str(tmp_path)])
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert status == 2 and err.startswith("error: shard manifest ") and "cached latents made by VAE" in err


def test_make_shards_names_a_vae_it_cannot_load(tmp_path, capsys):
    with pytest.raises(SystemExit) as exited:
        make_shards([*SHAPES, "--out", str(tmp_path / "s"), "--vae", str(tmp_path / "nope")])
    err = capsys.readouterr().err
    assert exited.value.code == 2 and err.count("\n") == 1 and f"--vae {tmp_path / 'nope'}: cannot load a VAE" in err
    assert not (tmp_path / "s").exists()
