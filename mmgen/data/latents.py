"""Latents cached in the shards: every image encoded once by the frozen VAE when the shards are written, so
training skips the encoder (as fast-DiT does: github.com/chuanyangjin/fast-DiT, extract_features.py).

    python -m mmgen.data.make_shards --source jsonl --jsonl docs.jsonl --out data/mine --vae runs/vae --resolution 32

What is stored (format: `mmgen.data.sample_format`): for each image, the posterior's mode of the image as the
reader and packer prepare it (decoded, resized + centre-cropped to `resolution`, in [-1, 1]), before
normalisation, as float16. Raw rather than normalised, so a run normalises it with its own latent stats and
`objective.sigma_data` exactly as `MMGenVAE.encode` does (`encode_batch`); float16 rounds each value to 11
significant bits (relative error <= 2**-11). The image stays in the shard beside its latent: viewers, judges
and a run with another VAE still have it, and the reader never decodes it when it uses the latent.

Which VAE made a latent: `vae_identity`, a SHA-256 over what computes the raw latent (the autoencoder's
architecture config and weights; not its latent mean/std, which raw latents do not depend on). It is in
every latent member and in the manifest ("latents"). A run checks both against its own `model.vae`
(`LatentSpec`): the manifests before training starts, each document as it is read (shards without a
manifest, remote ones), and refuses with one line naming the manifest or shard and both identities.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch

from mmgen.cli import UsageError
from mmgen.data.image_transforms import image_to_tensor
from mmgen.data.sample_format import (
    IMAGE_EXTENSIONS,
    CachedLatent,
    decode_image,
    encode_latent,
    latent_member,
)

if TYPE_CHECKING:
    from mmgen.vae import MMGenVAE

# AutoencoderKL config keys that set the normalisation only (see mmgen.vae): not part of the identity
NORMALISATION_KEYS = ("latents_mean", "latents_std", "scaling_factor", "shift_factor")
SHORT = 16  # hex digits of an identity shown in messages (the manifest keeps all 64)


class LatentMismatchError(UsageError):
    """Cached latents this run cannot use: made by another VAE, or at another image size."""


def vae_identity(vae: MMGenVAE) -> str:
    """SHA-256 (hex) over the autoencoder's architecture config and its weights (names, dtypes, shapes, bytes)."""
    digest = hashlib.sha256()
    config = {k: v for k, v in vae.config_dict().items() if k not in NORMALISATION_KEYS}
    digest.update(json.dumps(config, sort_keys=True, default=str).encode("utf-8"))
    for name, tensor in sorted(vae.vae.state_dict().items()):
        tensor = tensor.detach().cpu().contiguous()
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()


# ------------------------------------------------------------------------------------- writing


@dataclass(frozen=True)
class LatentCache:
    """The `make_shards` option that stores latents: the VAE at `path`, images encoded at `resolution` (the
    training's `model.image_size`), `batch_size` images per encoder call. Build it with `LatentCache.open`."""

    path: str
    vae: MMGenVAE
    identity: str
    resolution: int
    batch_size: int = 32

    @classmethod
    def open(cls, path: str | os.PathLike, *, resolution: int, batch_size: int = 32) -> LatentCache:
        """Load the VAE (a `save_pretrained` directory, as `model.vae`); raises OSError or ValueError."""
        from mmgen.vae import MMGenVAE  # diffusers is imported only when latents are wanted

        if resolution < 1 or batch_size < 1:
            raise ValueError(f"resolution and batch_size must be >= 1, got {resolution}, {batch_size}")
        vae = MMGenVAE.load_pretrained(os.fspath(path))
        if resolution % vae.downsample_factor:
            raise ValueError(f"resolution {resolution} is not divisible by the VAE's downsample factor "
                             f"{vae.downsample_factor}")
        return cls(os.fspath(path), vae, vae_identity(vae), resolution, batch_size)

    @property
    def shape(self) -> tuple[int, int, int]:
        h = self.resolution // self.vae.downsample_factor
        return (self.vae.latent_channels, h, h)

    def manifest(self) -> dict:
        """The manifest's "latents" entry (the normalisation is recorded for reference: raw latents ignore it)."""
        return {"vae": self.identity, "vae_path": self.path, "resolution": self.resolution, "shape": list(self.shape),
                "dtype": "float16", "encoding": "posterior mode, before normalisation",
                "latents_mean": self.vae.latent_mean.tolist(), "latents_std": self.vae.latent_std.tolist()}

    def _encode(self, queued: list[tuple[dict, str, torch.Tensor]]) -> None:
        if not queued:
            return
        raw = self.vae.encode_raw(torch.stack([x for _, _, x in queued]))  # (B, C, h, w) float32
        for (sample, member, _), latent in zip(queued, raw.half().numpy()):
            if not np.isfinite(latent).all():
                raise ValueError(f"sample {sample['__key__']}, {member}: latent outside the float16 range")
            sample[latent_member(member)] = encode_latent(latent, self.identity)

    def add_latents(self, samples: Iterable[dict]) -> Iterator[dict]:
        """The samples (tar members), in order, each with a latent member beside each image member."""
        pending: list[dict] = []
        queued: list[tuple[dict, str, torch.Tensor]] = []  # (sample, image member, (3, H, W) in [-1, 1])
        for sample in samples:
            pending.append(sample)
            for member in [k for k in sample if k.rpartition(".")[2] in IMAGE_EXTENSIONS]:
                # the reader's decode and the packer's tensor: the very input the training's encoder would see
                image = decode_image(sample[member], self.resolution)
                queued.append((sample, member, image_to_tensor(image, self.resolution)))
            if len(queued) >= self.batch_size:
                self._encode(queued)
                yield from pending
                pending, queued = [], []
        self._encode(queued)
        yield from pending


# ------------------------------------------------------------------------------------- training


@dataclass(frozen=True)
class LatentSpec:
    """What a run accepts as cached latents: made by its VAE (`identity`, `vae_name` = model.vae), of `shape`
    (C, h, w) at its `image_size`."""

    identity: str
    shape: tuple[int, int, int]
    image_size: int
    vae_name: str

    @classmethod
    def of(cls, vae: MMGenVAE, image_size: int, vae_name: str) -> LatentSpec:
        h = image_size // vae.downsample_factor
        return cls(vae_identity(vae), (vae.latent_channels, h, h), image_size, vae_name)

    def _refuse(self, where: str, identity: str, shape) -> None:
        if identity != self.identity:
            raise LatentMismatchError(
                f"{where}: cached latents made by VAE {identity[:SHORT]}, but model.vae={self.vae_name} is VAE "
                f"{self.identity[:SHORT]}; remake the shards with make_shards --vae {self.vae_name} (or without --vae)")
        if tuple(shape) != self.shape:
            raise LatentMismatchError(
                f"{where}: cached latents of shape {tuple(shape)}, but model.image_size={self.image_size} needs "
                f"{self.shape}; remake the shards with make_shards --resolution {self.image_size}")

    def check_manifests(self, urls: Iterable[str]) -> None:
        """Refuse (LatentMismatchError) when a manifest beside local shards of `urls` lists one of them as having
        latents of another VAE or shape; shards without a manifest are checked document by document."""
        by_dir: dict[str, set[str]] = {}
        for url in urls:
            if os.path.isfile(url):
                by_dir.setdefault(os.path.dirname(os.path.abspath(url)), set()).add(os.path.basename(url))
        for directory, names in sorted(by_dir.items()):
            for path in sorted(glob.glob(os.path.join(directory, "*-manifest.json"))):
                try:
                    with open(path) as f:
                        manifest = json.load(f)
                    listed = {s["name"] for s in manifest["shards"]}
                    latents = manifest.get("latents")
                except (OSError, ValueError, KeyError, TypeError):
                    continue  # not one of ours: the documents are still checked one by one
                if isinstance(latents, dict) and listed & names:
                    self._refuse(f"shard manifest {path}", str(latents.get("vae")), latents.get("shape", ()))

    def check_document(self, doc: dict) -> None:
        """Refuse (LatentMismatchError, naming shard and key) a document with a cached latent of another VAE or
        shape."""
        for segment in doc["segments"]:
            for image in segment.get("images", [segment.get("image")]):
                if isinstance(image, CachedLatent):
                    info = doc["meta"].get("_wds", {})
                    where = f"shard {info.get('shard')}, key {info.get('key')}"
                    self._refuse(where, image.vae, image.latent.shape)


def stack_images(images: list, image_size: int) -> dict[str, torch.Tensor]:
    """A batch's images, in image-id order, as the packer delivers them: "images" (M_img, 3, H, W) are those to
    encode; with any cached latent also "latents" (M_cached, C, h, w) float16 and "latent_cached" (M,) bool,
    True where image id i is cached (ids not cached take the images in order, cached ones the latents)."""
    pixels = [x for x in images if not isinstance(x, CachedLatent)]
    out = {"images": torch.stack(pixels) if pixels else torch.zeros(0, 3, image_size, image_size)}
    if len(pixels) < len(images):
        out["latents"] = torch.from_numpy(np.stack([x.latent for x in images if isinstance(x, CachedLatent)]))
        out["latent_cached"] = torch.tensor([isinstance(x, CachedLatent) for x in images], dtype=torch.bool)
    return out


@torch.no_grad()
def encode_batch(vae: MMGenVAE, images: torch.Tensor, batch: dict) -> torch.Tensor:
    """Normalised latents (M, C, h, w) float32 of a packer batch: `images` (the batch's "images", on the
    device) through the encoder, and the cached raw latents normalised as `MMGenVAE.encode` normalises."""
    encoded = vae.encode(images.float()) if images.shape[0] else None
    if "latent_cached" not in batch:
        return encoded if encoded is not None else images.new_zeros(0)
    cached = batch["latent_cached"].to(images.device)
    raw = batch["latents"].to(images.device)  # (M_cached, C, h, w) float16
    out = torch.zeros((cached.shape[0], *raw.shape[1:]), device=images.device)
    out[cached] = vae.normalize(raw)
    if encoded is not None:
        out[~cached] = encoded.float()
    return out
