"""Image pre/post-processing shared by the processor and the packer: PIL <-> (3, H, W) tensors in [-1, 1]."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image


def resize_center_crop_image(image: Image.Image, image_size: int) -> Image.Image:
    """RGB, shorter side resized to `image_size` (bicubic), centre square cropped. Exact no-op at the target size,
    so the shapes world's palette colours survive untouched."""
    image = image.convert("RGB") if image.mode != "RGB" else image
    w, h = image.size
    if (w, h) == (image_size, image_size):
        return image
    scale = image_size / min(w, h)
    new_w, new_h = max(image_size, round(w * scale)), max(image_size, round(h * scale))
    image = image.resize((new_w, new_h), Image.Resampling.BICUBIC)
    left, top = (new_w - image_size) // 2, (new_h - image_size) // 2
    return image.crop((left, top, left + image_size, top + image_size))


def image_to_tensor(image: Image.Image | torch.Tensor, image_size: int, where: str = "image") -> torch.Tensor:
    """PIL image -> (3, image_size, image_size) float32 in [-1, 1]. A tensor is checked and passed through."""
    if isinstance(image, torch.Tensor):
        if image.shape != (3, image_size, image_size):
            raise ValueError(
                f"{where}: tensor of shape {tuple(image.shape)}, expected (3, {image_size}, {image_size})"
            )
        return image.float()
    if not isinstance(image, Image.Image):
        raise TypeError(
            f"{where}: expected a PIL.Image.Image or a (3, H, W) tensor, got {type(image).__name__}"
        )
    array = np.asarray(resize_center_crop_image(image, image_size), dtype=np.uint8)  # (H, W, 3)
    return torch.from_numpy(array.copy()).permute(2, 0, 1).float().div_(127.5).sub_(1.0)


def tensor_to_image(x: torch.Tensor) -> Image.Image:
    """(3, H, W) tensor in [-1, 1] -> RGB PIL image (clamped, rounded)."""
    if x.dim() != 3 or x.shape[0] != 3:
        raise ValueError(f"expected a (3, H, W) tensor, got shape {tuple(x.shape)}")
    array = (
        ((x.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()
    )
    return Image.fromarray(array)  # (H, W, 3) uint8 -> RGB
