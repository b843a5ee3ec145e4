"""ShapeFD / ShapeKID: distribution distances in the feature space of a small shapes classifier.

Not FID: Inception features know nothing about 32x32 renders of coloured shapes, and no Inception
weights ship offline. Instead a small CNN is trained once, deterministically, on shapes renders
(`eval/train_shapefd.py`, < 1 minute on one CPU core) to predict how many objects of each (colour, shape)
pair a scene holds and how many objects it has in all; its 64-d penultimate activations are the features. The weights
are stored beside this file (`shapefd.safetensors`) with their SHA-256 in `shapefd.json`; every result
records that hash, so numbers from different feature nets are never compared by mistake.

- ShapeFD: the Fréchet distance between Gaussians fitted to the two feature sets (Heusel et al.,
  "GANs trained by a two time-scale update rule converge to a local Nash equilibrium", NeurIPS 2017):
  ||mu_a - mu_b||^2 + Tr(S_a + S_b - 2 (S_a S_b)^(1/2)).
- ShapeKID: the unbiased MMD^2 with the cubic polynomial kernel k(x, y) = (x.y / d + 1)^3
  (Bińkowski et al., "Demystifying MMD GANs", ICLR 2018); ~0 (either sign) for equal distributions.
Both are biased by the sample size (FD strongly, KID not in expectation), so a result always comes
with the real-vs-real floor at the same size.
"""

from __future__ import annotations

import copy
import hashlib
import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn

HERE = Path(__file__).resolve().parent
WEIGHTS = HERE / "shapefd.safetensors"
INFO = HERE / "shapefd.json"
RESOLUTION = 32
FEATURE_DIM = 64


class ShapeFeatureNet(nn.Module):
    """(B, 3, 32, 32) in [0, 1] -> features (B, 64); heads: objects per (colour, shape) pair (24), count (0..4)."""

    def __init__(self, num_combos: int = 24, num_counts: int = 5):
        super().__init__()
        self.convs = nn.Sequential(
            nn.Conv2d(3, 32, 3, padding=1), nn.ReLU(),  # (B, 32, 32, 32)
            nn.Conv2d(32, 64, 3, stride=2, padding=1), nn.ReLU(),  # (B, 64, 16, 16)
            nn.Conv2d(64, 64, 3, stride=2, padding=1), nn.ReLU(),  # (B, 64, 8, 8)
        )  # fmt: skip
        # what is present (global mean) and where (a 4x4 layout of the same maps)
        self.proj = nn.Linear(64 + 64 * 16, FEATURE_DIM)
        self.combos = nn.Linear(FEATURE_DIM, num_combos)
        self.counts = nn.Linear(FEATURE_DIM, num_counts)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        h = self.convs(2 * x - 1)  # (B, 64, 8, 8)
        what = h.mean(dim=(2, 3))  # (B, 64)
        where = nn.functional.avg_pool2d(h, 2).flatten(1)  # (B, 64 * 16)
        return self.proj(torch.cat([what, where], dim=1))  # (B, 64)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        f = nn.functional.relu(self.features(x))
        return self.combos(f), self.counts(f)


def images_to_tensor(images) -> torch.Tensor:
    """PIL images (any size; box-resized to 32x32) -> (B, 3, 32, 32) float in [0, 1]."""
    arrs = []
    for im in images:
        im = im.convert("RGB")
        if im.size != (RESOLUTION, RESOLUTION):
            im = im.resize((RESOLUTION, RESOLUTION), Image.BOX)
        arrs.append(np.asarray(im, dtype=np.float32) / 255.0)
    return torch.from_numpy(np.stack(arrs)).permute(0, 3, 1, 2).contiguous()


def file_sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def load_feature_net(path: Path = WEIGHTS, check_hash: bool = True) -> tuple[ShapeFeatureNet, str]:
    """The stored feature net (eval mode) and its weights' SHA-256 (checked against shapefd.json)."""
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: run `python eval/train_shapefd.py` once")
    digest = file_sha256(path)
    info_path = path.with_suffix(".json")
    if check_hash and info_path.is_file():
        expected = json.loads(info_path.read_text())["sha256"]
        if expected != digest:
            raise ValueError(f"{path}: SHA-256 {digest[:12]} differs from {info_path.name} ({expected[:12]})")
    net = ShapeFeatureNet()
    net.load_state_dict(load_file(str(path)))
    return net.eval(), digest


@torch.no_grad()
def extract_features(net: ShapeFeatureNet, images, batch_size: int = 256) -> torch.Tensor:
    """(n, 64) float64 features of PIL images (the net runs in float64: re-judging reproduces every digit)."""
    net = copy.deepcopy(net).double()
    out = []
    for i in range(0, len(images), batch_size):
        out.append(net.features(images_to_tensor(images[i : i + batch_size]).double()))
    return torch.cat(out) if out else torch.zeros(0, FEATURE_DIM, dtype=torch.float64)


def _sqrtm_psd(m: torch.Tensor) -> torch.Tensor:
    vals, vecs = torch.linalg.eigh(m)
    return (vecs * vals.clamp_min(0).sqrt()) @ vecs.T


def frechet_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    """Fréchet distance of Gaussians fitted to feature sets a (n, d) and b (m, d) (Heusel et al. 2017)."""
    a, b = a.double(), b.double()
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = torch.cov(a.T), torch.cov(b.T)
    root_a = _sqrtm_psd(cov_a)
    # Tr((S_a S_b)^(1/2)) = Tr((S_a^(1/2) S_b S_a^(1/2))^(1/2)): a symmetric PSD matrix, so eigh is stable
    cross = torch.linalg.eigvalsh(root_a @ cov_b @ root_a).clamp_min(0).sqrt().sum()
    fd = (mu_a - mu_b).square().sum() + cov_a.trace() + cov_b.trace() - 2 * cross
    return float(fd.clamp_min(0))


def kernel_inception_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    """Unbiased MMD^2, cubic polynomial kernel (x.y/d + 1)^3 (Bińkowski et al. 2018); needs n, m >= 2."""
    a, b = a.double(), b.double()
    d, n, m = a.shape[1], a.shape[0], b.shape[0]
    k = lambda x, y: (x @ y.T / d + 1) ** 3
    kaa, kbb, kab = k(a, a), k(b, b), k(a, b)
    term_a = (kaa.sum() - kaa.diagonal().sum()) / (n * (n - 1))  # U-statistics: diagonals left out
    term_b = (kbb.sum() - kbb.diagonal().sum()) / (m * (m - 1))
    return float(term_a + term_b - 2 * kab.mean())


def distances(generated: torch.Tensor, reference: torch.Tensor) -> dict:
    return {
        "shapefd": frechet_distance(generated, reference),
        "shapekid": kernel_inception_distance(generated, reference),
        "n_generated": int(generated.shape[0]),
        "n_reference": int(reference.shape[0]),
    }
