"""The on-disk sample format of our webdataset shards (docs/design.md §3) and its in-memory document.

A shard is a plain `.tar`; the members of one sample share a KEY (no dots in KEY: webdataset
splits the member name at the first dot of its basename). Two sample layouts are accepted:

- image-caption pair, img2dataset style: `KEY.jpg|jpeg|png|webp` plus `KEY.txt` (the caption) or
  `KEY.json` with a `"caption"` field (other JSON fields become `meta`);
- interleaved document: `KEY.json` = `{"segments": [{"text": "..."}, {"image": "0.png"}, ...],
  "meta": {...}}`, each image segment naming a member of the same sample (`KEY.0.png`). A segment
  `{"images": ["1.png", "2.png", ...]}` is one image slot answered by several samples (e.g. renders of one
  prompt): each is a draw from the same conditional distribution, and later segments see the first.

Both decode to a document (docs/design.md §3):
`{"segments": [{"text": str} | {"image": PIL.Image.Image (RGB)} | {"images": [PIL images]}, ...], "meta": dict}`.
Anything that does not decode raises `SampleError` whose `problem` is one of `PROBLEMS`, so the
reader can count it by kind:

- bad_json: a JSON member that is not UTF-8 JSON;
- bad_image: an image member that does not decode;
- missing_image: an image segment naming an absent member, or a caption without an image;
- bad_text: a text or caption that is not valid Unicode (a lone surrogate such as "\\ud800", which JSON
  allows, or a .txt that is not UTF-8);
- text_too_long: a text or caption longer than `max_text_chars` characters (checked before any image is
  decoded, and long before tokenizing);
- duplicate_member: a member (e.g. `KEY.txt`) that occurs twice in one sample: which copy is meant is
  unknown, so the sample is skipped;
- duplicate_key: a sample whose key an earlier sample of the same shard already had;
- empty_document: no non-empty segment;
- invalid_sample: any other malformed sample (unknown layout, wrong types, a segment with none or several
  of text/image/images).

Unknown keys in a segment or in the JSON are ignored, so a newer writer can add fields.

Cached latents (optional, written by `make_shards --vae`, `mmgen.data.latents`): beside an image member
`KEY.0.png` (a pair's `KEY.jpg`) a member `KEY.0.latent.safetensors` (`KEY.latent.safetensors`) holds the
VAE's encoding of that image: one float16 tensor "latent" (C, h, w) and metadata {"vae": identity}.
`decode_sample(latents=True)` puts a `CachedLatent` in place of each image that has one (an unreadable one
is a bad_image); otherwise they are ignored.
"""

from __future__ import annotations

import io
import json
import re
from dataclasses import dataclass
from typing import Any

import numpy as np
import safetensors.numpy
from PIL import Image

from mmgen.data.image_transforms import resize_center_crop_image, to_rgb

IMAGE_EXTENSIONS = ("png", "jpg", "jpeg", "webp")
PROBLEMS = ("bad_json", "bad_image", "missing_image", "bad_text", "text_too_long", "duplicate_member",
            "duplicate_key", "empty_document", "invalid_sample")  # meanings: the module docstring
MAX_TEXT_CHARS = 100_000  # default bound on one text or caption (a book chapter; longer is a data accident)
SEGMENT_KINDS = ("text", "image", "images")
_KEY_RE = re.compile(r"^[A-Za-z0-9_\-/]+$")


class SampleError(ValueError):
    """A sample that cannot become a document; `problem` is one of PROBLEMS."""

    def __init__(self, problem: str, message: str):
        assert problem in PROBLEMS, problem
        super().__init__(message)
        self.problem = problem


def check_key(key: str) -> str:
    if not _KEY_RE.match(key):
        raise ValueError(
            f"sample key {key!r} must match {_KEY_RE.pattern} (no dots: webdataset splits at the first dot)"
        )
    return key


# ----------------------------------------------------------------------------------------- images


def resize_center_crop(image: Image.Image, resolution: int) -> Image.Image:
    """Resize the shorter side to `resolution` (bicubic), then crop the centre square (one implementation,
    shared with the packer and the processor: `mmgen.data.image_transforms`)."""
    return resize_center_crop_image(image, resolution)


def decode_image(data: bytes, resolution: int | None = None) -> Image.Image:
    """Bytes -> RGB PIL image (`to_rgb`: EXIF orientation, modes, transparency on black; optionally resized +
    centre-cropped); raises SampleError('bad_image')."""
    try:
        image = Image.open(io.BytesIO(data))
        image.load()  # forces the full decode, so truncated files fail here and not later
        image = to_rgb(image)
    except Exception as exn:  # PIL raises many types (OSError, SyntaxError, ValueError, ...)
        raise SampleError("bad_image", f"undecodable image ({type(exn).__name__}: {exn})") from exn
    if resolution is not None:
        image = resize_center_crop(image, resolution)
    return image


def encode_png(image: Image.Image) -> bytes:
    """Lossless PNG (the shapes judge needs exact palette colours, so never JPEG for shapes)."""
    buffer = io.BytesIO()
    image.convert("RGB").save(buffer, format="PNG", optimize=False)
    return buffer.getvalue()


# -------------------------------------------------------------------------------- cached latents


@dataclass(frozen=True)
class CachedLatent:
    """An image's latent as `make_shards --vae` stored it: (C, h, w) float16, before normalisation, and the
    identity of the VAE that made it (`mmgen.data.latents.vae_identity`)."""

    latent: np.ndarray
    vae: str


def latent_member(image_member: str) -> str:
    """The member holding an image member's cached latent: "0.png" -> "0.latent.safetensors", "jpg" ->
    "latent.safetensors"."""
    stem = image_member.lower().rpartition(".")[0]
    return f"{stem}.latent.safetensors" if stem else "latent.safetensors"


def encode_latent(latent: np.ndarray, vae: str) -> bytes:
    """(C, h, w) latent -> safetensors bytes (float16, metadata {"vae": identity}); no pickle."""
    return safetensors.numpy.save({"latent": np.ascontiguousarray(latent, dtype=np.float16)}, metadata={"vae": vae})


def decode_latent(data: bytes, member: str) -> CachedLatent:
    """Inverse of `encode_latent`; raises SampleError("bad_image") for anything else."""
    try:
        header = json.loads(data[8 : 8 + int.from_bytes(data[:8], "little")])  # safetensors: u64 length, JSON
        latent = safetensors.numpy.load(data)["latent"]
        vae = header["__metadata__"]["vae"]
    except Exception as exn:  # safetensors raises its own error type; a bad header any of several
        raise SampleError("bad_image", f"{member}: unreadable cached latent ({type(exn).__name__}: {exn})") from exn
    if latent.ndim != 3 or latent.dtype != np.float16:
        raise SampleError("bad_image", f"{member}: cached latent must be (C, h, w) float16, got "
                          f"{latent.dtype} {latent.shape}")
    return CachedLatent(latent, vae)


# --------------------------------------------------------------------------------------- decoding


def _image_members(sample: dict[str, Any]) -> list[str]:
    return [ext for ext in IMAGE_EXTENSIONS if ext in sample]


def _parse_json(raw: bytes) -> Any:
    try:
        return json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exn:
        raise SampleError("bad_json", f"invalid JSON ({exn})") from exn


def check_text(text: str, where: str, max_text_chars: int | None = MAX_TEXT_CHARS) -> str:
    """`text` if it is valid Unicode and at most `max_text_chars` long (None: any length); else SampleError."""
    if max_text_chars is not None and len(text) > max_text_chars:  # len() is O(1): checked first
        raise SampleError("text_too_long", f"{where}: {len(text)} characters, more than {max_text_chars}")
    try:
        text.encode("utf-8")  # a lone surrogate ("\ud800" in JSON) has no UTF-8 form: the tokenizer would fail
    except UnicodeEncodeError as exn:
        raise SampleError("bad_text", f"{where}: not valid Unicode ({exn.reason} at {exn.start})") from exn
    return text


def _member_image(sample, member, i: int, resolution, latents: bool) -> Image.Image | CachedLatent:
    member = member.lower()  # webdataset lower-cases member suffixes
    if member not in sample:
        raise SampleError("missing_image", f"segment {i} names image member {member!r}, absent from the tar")
    if latents and latent_member(member) in sample:
        return decode_latent(sample[latent_member(member)], f"segment {i} ({latent_member(member)})")
    try:
        return decode_image(sample[member], resolution)
    except SampleError as exn:
        raise SampleError("bad_image", f"segment {i} ({member}): {exn}") from exn


def _segment_kind(segment: Any, i: int, max_text_chars: int | None) -> str:
    """"text" | "image" | "images" for a well-formed segment (unknown keys ignored); else SampleError."""
    kinds = [k for k in SEGMENT_KINDS if isinstance(segment, dict) and k in segment]
    if len(kinds) != 1:
        raise SampleError("invalid_sample", f"segment {i} must have exactly one of {list(SEGMENT_KINDS)}")
    kind, value = kinds[0], segment[kinds[0]]
    if kind == "text":
        if not isinstance(value, str):
            raise SampleError("invalid_sample", f"segment {i}: text must be a string")
        check_text(value, f"segment {i}", max_text_chars)
    elif kind == "image" and not isinstance(value, str):
        raise SampleError("invalid_sample", f"segment {i}: image must name a member like '0.png'")
    elif kind == "images" and not (isinstance(value, list) and value and all(isinstance(m, str) for m in value)):
        raise SampleError("invalid_sample", f"segment {i}: images must be a non-empty list of members")
    return kind


def _decode_interleaved(sample, spec: dict, resolution, max_text_chars: int | None, latents: bool) -> dict:
    segments, meta = spec["segments"], spec.get("meta", {})
    if not isinstance(segments, list):
        raise SampleError("invalid_sample", "'segments' must be a list")
    if not isinstance(meta, dict):
        raise SampleError("invalid_sample", "'meta' must be an object")
    # Every segment is checked before any image is decoded: a bad text costs no image decode.
    kinds = [_segment_kind(segment, i, max_text_chars) for i, segment in enumerate(segments)]
    out = []
    for i, (kind, segment) in enumerate(zip(kinds, segments)):
        if kind == "text":
            if segment["text"]:
                out.append({"text": segment["text"]})
        elif kind == "images":
            out.append({"images": [_member_image(sample, m, i, resolution, latents) for m in segment["images"]]})
        else:
            out.append({"image": _member_image(sample, segment["image"], i, resolution, latents)})
    if not out:
        raise SampleError("empty_document", "document has no non-empty segment")
    return {"segments": out, "meta": dict(meta)}


def _decode_pair(sample, caption: Any, meta: dict, resolution, pair_order: str, max_text_chars: int | None,
                 latents: bool) -> dict:
    if not isinstance(caption, str):
        raise SampleError("invalid_sample", "caption must be a string")
    caption = check_text(caption.strip(), "caption", max_text_chars)
    exts = _image_members(sample)
    if not exts:
        raise SampleError("missing_image", "caption without an image member (.jpg/.jpeg/.png/.webp)")
    if not caption:
        raise SampleError("empty_document", "empty caption")
    if latents and latent_member(exts[0]) in sample:
        image = decode_latent(sample[latent_member(exts[0])], latent_member(exts[0]))
    else:
        image = decode_image(sample[exts[0]], resolution)
    text, img = {"text": caption}, {"image": image}
    segments = [text, img] if pair_order == "text_image" else [img, text]
    return {"segments": segments, "meta": {**meta, "_pair": pair_order}}  # "_pair": mmgen.data.pairs rewrites it


def decode_sample(
    sample: dict[str, Any],
    *,
    resolution: int | None = None,
    pair_order: str = "text_image",
    max_text_chars: int | None = MAX_TEXT_CHARS,
    latents: bool = False,
) -> dict:
    """A grouped webdataset sample (member suffix -> bytes) -> document (docs/design.md §3).

    resolution: resize + centre-crop every image to this square size (None keeps the size).
    pair_order: "text_image" (caption then image, for text->image) or "image_text" (captioning); a pair's meta
    says so in "_pair" (`mmgen.data.pairs.PairFormat` rewrites pairs as chats in a drawn direction).
    max_text_chars: longest text or caption accepted (None: no bound).
    latents: an image with a cached latent member becomes that `CachedLatent` (not decoded); False: images only.
    Raises SampleError with the kind of problem; the caller adds shard and key to the message.
    """
    if pair_order not in ("text_image", "image_text"):
        raise ValueError(f"pair_order must be 'text_image' or 'image_text', not {pair_order!r}")
    if "json" in sample:
        spec = _parse_json(sample["json"])
        if not isinstance(spec, dict):
            raise SampleError("invalid_sample", "JSON member must be an object")
        if "segments" in spec:
            return _decode_interleaved(sample, spec, resolution, max_text_chars, latents)
        if "caption" in spec:
            meta = {k: v for k, v in spec.items() if k != "caption"}
            return _decode_pair(sample, spec["caption"], meta, resolution, pair_order, max_text_chars, latents)
        if "txt" not in sample:
            raise SampleError("invalid_sample", "JSON member has neither 'segments' nor 'caption'")
        meta = spec
    else:
        meta = {}
    if "txt" in sample:
        try:
            caption = sample["txt"].decode("utf-8")
        except UnicodeDecodeError as exn:
            raise SampleError("bad_text", f"caption .txt is not UTF-8 ({exn})") from exn
        return _decode_pair(sample, caption, meta, resolution, pair_order, max_text_chars, latents)
    members = sorted(k for k in sample if not k.startswith("__"))
    if _image_members(sample):
        raise SampleError("invalid_sample", f"image without a caption (.txt or .json); members {members}")
    raise SampleError("invalid_sample", f"unrecognised sample layout; members {members}")


# --------------------------------------------------------------------------------------- encoding


def encode_document(document: dict, key: str) -> dict[str, bytes | str]:
    """Document (PIL images) -> tar members for `webdataset.TarWriter(encoder=False)`.

    Images are stored losslessly as `KEY.{i}.png`; the JSON keeps the segment order. Reader-added
    bookkeeping in meta (keys starting with "_") is not written.
    """
    segments, files = [], {}
    for segment in document["segments"]:
        if "text" in segment:
            segments.append({"text": segment["text"]})
            continue
        names = []
        for image in segment["images"] if "images" in segment else [segment["image"]]:
            names.append(f"{len(files)}.png")
            files[names[-1]] = encode_png(image)
        segments.append({"images": names} if "images" in segment else {"image": names[0]})
    meta = {k: v for k, v in document.get("meta", {}).items() if not k.startswith("_")}
    spec = {"segments": segments, "meta": meta}
    return {"__key__": check_key(key), "json": json.dumps(spec, sort_keys=True).encode("utf-8"), **files}


def encode_pair(
    key: str, image_bytes: bytes, image_ext: str, caption: str, extra: dict | None = None
) -> dict[str, bytes | str]:
    """img2dataset layout: the image bytes as given (no re-encoding), KEY.txt, and KEY.json."""
    image_ext = image_ext.lower().lstrip(".")
    if image_ext not in IMAGE_EXTENSIONS:
        raise ValueError(f"image extension {image_ext!r} not in {IMAGE_EXTENSIONS}")
    spec = {"caption": caption, **(extra or {})}
    return {
        "__key__": check_key(key),
        image_ext: image_bytes,
        "txt": caption.encode("utf-8"),
        "json": json.dumps(spec, sort_keys=True).encode("utf-8"),
    }
