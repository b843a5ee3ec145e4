"""Image pre/post-processing shared by the processor and the packer: PIL <-> (3, H, W) tensors in [-1, 1]."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image, ImageOps

EXIF_ORIENTATION = 0x0112  # the EXIF tag a camera writes instead of rotating the pixels
BACKGROUND = (0, 0, 0)  # transparency is composited on black, the background of the shapes world


def _to_8_bit(image: Image.Image) -> Image.Image:
    """16/32-bit grey (a 16-bit PNG opens as "I;16" or "I") -> "L", scaled: PIL's convert clips at 255."""
    values = np.asarray(image).astype(np.int64).clip(0, 65535)  # (H, W)
    return Image.fromarray(((values * 255 + 32767) // 65535).astype(np.uint8))


def to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL image -> RGB as it is meant to be seen: EXIF orientation applied, 16/32-bit grey scaled to 8 bits,
    transparency (RGBA, LA, PA, P with a transparent index) composited on BACKGROUND, other modes (CMYK, L, 1,
    P, YCbCr) by PIL's conversion. An upright RGB image is returned as is (no copy, pixels untouched)."""
    if image.getexif().get(EXIF_ORIENTATION, 1) != 1:
        image = ImageOps.exif_transpose(image)
    if image.mode == "RGB":
        return image
    if image.mode.startswith("I"):
        image = _to_8_bit(image)
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        image = image.convert("RGBA")
        image = Image.alpha_composite(Image.new("RGBA", image.size, (*BACKGROUND, 255)), image)
    return image.convert("RGB")


def resize_center_crop_image(image: Image.Image, image_size: int) -> Image.Image:
    """`to_rgb`, then the shorter side resized to `image_size` (bicubic) and the centre square cropped. Exact no-op
    on an upright RGB image at the target size, so the shapes world's palette colours survive untouched."""
    image = to_rgb(image)
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
