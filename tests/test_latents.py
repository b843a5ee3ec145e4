"""Latents cached in the shards (mmgen/data/latents.py): make_shards --vae stores each image's float16 posterior
mode beside it, training from such shards skips the encoder and gives the losses of the image shards, and a
run refuses latents of another VAE or image size with one line."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from train_helpers import make_tiny_vae

from mmgen.data.latents import vae_identity
from mmgen.data.make_shards import main as make_shards
from mmgen.data.sample_format import CachedLatent, decode_latent
from mmgen.data.webdata import WebDocuments
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


def test_make_shards_names_a_vae_it_cannot_load(tmp_path, capsys):
    with pytest.raises(SystemExit) as exited:
        make_shards([*SHAPES, "--out", str(tmp_path / "s"), "--vae", str(tmp_path / "nope")])
    err = capsys.readouterr().err
    assert exited.value.code == 2 and err.count("\n") == 1 and f"--vae {tmp_path / 'nope'}: cannot load a VAE" in err
    assert not (tmp_path / "s").exists()
