"""Write webdataset shards of documents (format: mmgen/data/sample_format.py) plus a manifest.

    python -m mmgen.data.make_shards --source shapes --num-docs 10000 --out data/shapes --split train
    python -m mmgen.data.make_shards --source jsonl --jsonl docs.jsonl --image-root images/ --out data/mine

Shards are `OUT/{split}-000000.tar`, ... (`--samples-per-shard` samples each); the manifest
`OUT/{split}-manifest.json` records counts per shard, the source and the command's config. Each JSONL
line is either an interleaved document `{"segments": [{"text": ...}, {"image": "rel/path.png"}, ...],
"meta": {...}}` or a pair `{"image": "rel/path.jpg", "caption": "...", ...other fields kept...}`,
with image paths relative to `--image-root`; an optional `"key"` (no dots) names the sample.
A bad line is skipped with a warning naming file, line and problem, and counted by problem in the
manifest's "skipped"; it never stops the run. The problems are those of the reader
(mmgen/data/sample_format.py): bad_json (not UTF-8, or not JSON), missing_image, bad_image,
bad_text (a text that is not valid Unicode, e.g. a lone surrogate "\\ud800"), empty_document,
invalid_sample, and duplicate_key (a key an earlier line already wrote: the later line is skipped,
since the reader could not tell the two apart). A missing --jsonl file is a one-line error (exit
status 2) before anything is written.

With `--vae DIR` (a VAE directory, as the training's `model.vae`) each image is also encoded once, at
`--resolution` (the training's `model.image_size`), and its latent stored beside it (`mmgen.data.latents`);
the manifest's "latents" records the VAE's identity, and training from these shards skips the encoder.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
import warnings
from collections import Counter
from collections.abc import Iterator
from dataclasses import asdict, dataclass

import webdataset as wds
from tqdm import tqdm

from mmgen.data.latents import LatentCache
from mmgen.data.sample_format import (
    IMAGE_EXTENSIONS,
    SampleError,
    check_key,
    check_text,
    decode_image,
    encode_document,
    encode_pair,
)

MANIFEST_FORMAT = "mmgen-webdataset-v1"


def _read_image(image_root: str, relative: object) -> tuple[bytes, str]:
    """Original bytes (no re-encoding) and extension of an image file, checked to decode."""
    if not isinstance(relative, str):
        raise SampleError("invalid_sample", f"image path must be a string, got {relative!r}")
    path = os.path.join(image_root, relative)
    ext = os.path.splitext(path)[1].lower().lstrip(".")
    if ext not in IMAGE_EXTENSIONS:
        raise SampleError("bad_image", f"{relative}: extension not in {IMAGE_EXTENSIONS}")
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as exn:
        raise SampleError("missing_image", f"{relative}: {exn.strerror}") from exn
    decode_image(data)  # raises SampleError("bad_image") so a bad file never reaches a shard
    return data, ext


def jsonl_record_to_sample(record: object, key: str, image_root: str) -> dict:
    """One JSONL record -> tar members (raises SampleError with the problem)."""
    if not isinstance(record, dict):
        raise SampleError("invalid_sample", "line must be a JSON object")
    key = check_key(str(record.get("key", key)))
    if "segments" in record:
        segments, meta = record["segments"], record.get("meta", {})
        if not isinstance(segments, list) or not isinstance(meta, dict):
            raise SampleError("invalid_sample", "'segments' must be a list and 'meta' an object")
        out_segments, files = [], {}
        for i, segment in enumerate(segments):
            if isinstance(segment, dict) and set(segment) == {"text"} and isinstance(segment["text"], str):
                check_text(segment["text"], f"segment {i}", max_text_chars=None)
                if segment["text"]:
                    out_segments.append({"text": segment["text"]})
            elif isinstance(segment, dict) and set(segment) == {"image"}:
                data, ext = _read_image(image_root, segment["image"])
                name = f"{len(files)}.{ext}"
                files[name] = data
                out_segments.append({"image": name})
            else:
                raise SampleError(
                    "invalid_sample", f"segment {i} must be {{'text': str}} or {{'image': path}}"
                )
        if not out_segments:
            raise SampleError("empty_document", "document has no non-empty segment")
        spec = {"segments": out_segments, "meta": meta}
        return {"__key__": key, "json": json.dumps(spec, sort_keys=True).encode("utf-8"), **files}
    if "image" in record and "caption" in record:
        caption = record["caption"]
        if not isinstance(caption, str) or not caption.strip():
            raise SampleError("empty_document", "caption must be a non-empty string")
        check_text(caption, "caption", max_text_chars=None)
        data, ext = _read_image(image_root, record["image"])
        extra = {k: v for k, v in record.items() if k not in ("image", "caption", "key")}
        return encode_pair(key, data, ext, caption, extra)
    raise SampleError("invalid_sample", "line needs 'segments', or 'image' and 'caption'")


def _parse_line(raw: bytes) -> object:
    try:  # bytes in, so one line that is not UTF-8 is one bad line, not the end of the run
        return json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exn:
        raise SampleError("bad_json", f"invalid JSON ({exn})") from exn


def iter_jsonl_samples(path: str, image_root: str, skipped: Counter) -> Iterator[dict]:
    """Tar members of each good line of the JSONL file; bad lines are warned and counted in `skipped`."""
    written: set[str] = set()  # keys so far: a later line with the same key is skipped
    with open(path, "rb") as f:
        for line_number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                sample = jsonl_record_to_sample(_parse_line(line), f"{line_number:09d}", image_root)
                if sample["__key__"] in written:
                    raise SampleError("duplicate_key", f"key {sample['__key__']!r} was already written")
            except (SampleError, ValueError) as exn:
                problem = getattr(exn, "problem", "invalid_sample")
                skipped[problem] += 1
                warnings.warn(f"{path}: line {line_number}: {problem}: {exn}; skipped", stacklevel=1)
                continue
            written.add(sample["__key__"])
            yield sample


def iter_shapes_samples(num_docs: int, seed: int, split: str, resolution: int,
                        tasks: list[str] | None = None, max_objects: int = 4, particles: int = 1,
                        t2i_max_objects: int | None = None) -> Iterator[dict]:
    # imported here: only this source needs the shapes world
    from mmgen.data.shapes_docs import iter_documents

    documents = iter_documents(num_docs, seed=seed, split=split, resolution=resolution, tasks=tasks,
                               max_objects=max_objects, particles=particles, t2i_max_objects=t2i_max_objects)
    for index, document in enumerate(documents):
        yield encode_document(document, f"{index:09d}")


def write_shards(
    samples: Iterator[dict], out: str, *, split: str, samples_per_shard: int, total: int | None = None
) -> dict:
    """Write samples (tar members) into OUT/{split}-%06d.tar; returns per-shard counts. No sample, no shard."""
    os.makedirs(out, exist_ok=True)
    counts: dict[str, int] = {}
    images = 0
    samples = iter(samples)
    first = next(samples, None)
    if first is None:  # the writer opens its first shard at once: an empty tar would look like data
        return {"shards": [], "num_samples": 0, "num_images": 0}
    pattern = os.path.join(out, f"{split}-%06d.tar")
    # mtime fixed (an int: a float mtime costs an extra pax header per member) so the same
    # documents give byte-identical shards.
    with wds.ShardWriter(pattern, maxcount=samples_per_shard, verbose=0, encoder=False, mtime=0) as writer:
        progress = tqdm(itertools.chain([first], samples), total=total, unit="doc", desc=f"writing {split} shards",
                        file=sys.stderr)
        for sample in progress:
            writer.write(sample)
            name = os.path.basename(writer.fname)
            counts[name] = counts.get(name, 0) + 1
            images += sum(1 for k in sample if k.rsplit(".", 1)[-1] in IMAGE_EXTENSIONS)
    return {
        "shards": [{"name": n, "num_samples": c} for n, c in counts.items()],
        "num_samples": sum(counts.values()),
        "num_images": images,
    }


@dataclass(frozen=True, kw_only=True)
class ShapesSource:
    """The embedded shapes world: `num_docs` documents of world seed `seed`, rendered at `resolution`.

    tasks: document kinds and their mix, NAME or NAME=WEIGHT (t2i caption vqa multiturn; () = all,
    mixed by mmgen.data.shapes_docs.TASK_WEIGHTS); max_objects: the most objects in a scene, 1..4;
    particles: scenes per text-to-image prompt, in one image slot; t2i_max_objects: the most objects
    in a text-to-image scene (None = max_objects)."""

    num_docs: int
    seed: int = 0
    resolution: int = 32
    tasks: tuple[str, ...] = ()
    max_objects: int = 4
    particles: int = 1
    t2i_max_objects: int | None = None

    def __post_init__(self):
        if self.num_docs < 0:
            raise ValueError(f"num_docs must be >= 0, got {self.num_docs}")
        if not 1 <= self.max_objects <= 4:
            raise ValueError(f"max_objects must be in 1..4, got {self.max_objects}")
        if self.particles < 1:
            raise ValueError(f"particles must be >= 1, got {self.particles}")
        if self.t2i_max_objects is not None and not 1 <= self.t2i_max_objects <= self.max_objects:
            raise ValueError(f"t2i_max_objects must be in 1..max_objects, got {self.t2i_max_objects}")
        if self.tasks:
            from mmgen.data.shapes_docs import parse_task_weights

            try:
                parse_task_weights(self.tasks)
            except ValueError as exn:
                raise ValueError(f"tasks: {exn}") from None

    def samples(self, split: str, skipped: Counter) -> Iterator[dict]:
        return iter_shapes_samples(self.num_docs, self.seed, split, self.resolution, list(self.tasks) or None,
                                   self.max_objects, self.particles, self.t2i_max_objects)

    def manifest_config(self) -> dict:
        return {**asdict(self), "tasks": list(self.tasks) or None}


@dataclass(frozen=True, kw_only=True)
class JsonlSource:
    """A JSONL file of documents or pairs; image paths relative to `image_root`."""

    jsonl: str
    image_root: str = "."
    num_docs = None  # unknown until read (progress shows no total)

    def samples(self, split: str, skipped: Counter) -> Iterator[dict]:
        return iter_jsonl_samples(self.jsonl, self.image_root, skipped)

    def manifest_config(self) -> dict:
        return asdict(self)


def make_shards(source: ShapesSource | JsonlSource, out: str | os.PathLike, *, split: str = "train",
                samples_per_shard: int = 1000, latents: LatentCache | None = None) -> dict:
    """Write `source`'s samples to OUT/{split}-%06d.tar and OUT/{split}-manifest.json; returns the manifest.

    latents: also store each image's latent from this VAE (`LatentCache.open(vae_dir, resolution=...)`).
    A JSONL source that cannot be read raises OSError before anything is written."""
    if samples_per_shard < 1:
        raise ValueError(f"samples_per_shard must be >= 1, got {samples_per_shard}")
    if isinstance(source, JsonlSource):
        open(source.jsonl, "rb").close()  # checked before anything is written
    out = os.fspath(out)
    skipped: Counter = Counter()
    samples = source.samples(split, skipped)
    if latents is not None:
        samples = latents.add_latents(samples)
    written = write_shards(samples, out, split=split, samples_per_shard=samples_per_shard, total=source.num_docs)
    name = "shapes" if isinstance(source, ShapesSource) else "jsonl"
    manifest = {
        "format": MANIFEST_FORMAT,
        "source": name,
        "split": split,
        **written,
        "skipped": dict(sorted(skipped.items())),
        **({"latents": latents.manifest()} if latents is not None else {}),
        "config": {"source": name, "split": split, "samples_per_shard": samples_per_shard,
                   **source.manifest_config(), **({"vae": latents.path} if latents is not None else {})},
    }
    with open(os.path.join(out, f"{split}-manifest.json"), "w") as f:
        json.dump(manifest, f, indent=2)
    print(f"wrote {written['num_samples']} samples in {len(written['shards'])} shards to {out}"
          f" (skipped {sum(skipped.values())})", file=sys.stderr)
    return manifest


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", choices=["shapes", "jsonl"], required=True)
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--split", default="train")
    parser.add_argument("--samples-per-shard", type=int, default=1000)
    parser.add_argument("--num-docs", type=int, help="shapes: number of documents")
    parser.add_argument("--seed", type=int, default=0, help="shapes: world seed")
    parser.add_argument("--resolution", type=int, default=32,
                        help="shapes: render size; with --vae: the size images are encoded at (model.image_size)")
    parser.add_argument("--tasks", nargs="+", default=(), help="shapes: the document kinds and their mix, NAME or "
                        "NAME=WEIGHT (t2i caption vqa multiturn; default all, mixed by mmgen.data.shapes_docs.TASK_WEIGHTS)")
    parser.add_argument("--max-objects", type=int, default=4,
                        help="shapes: the most objects in a scene, 1..4 (1: single objects, a curriculum's first stage)")
    parser.add_argument("--particles", type=int, default=1,
                        help="shapes: scenes per text-to-image prompt, in one image slot ({'images': [...]})")
    parser.add_argument("--t2i-max-objects", type=int, default=None,
                        help="shapes: the most objects in a text-to-image scene (default: --max-objects)")
    parser.add_argument("--jsonl", help="jsonl: input file")
    parser.add_argument("--image-root", default=".", help="jsonl: directory image paths are relative to")
    parser.add_argument("--vae", metavar="DIR", help="also store each image's latent from this VAE (model.vae)")
    args = parser.parse_args(argv)
    try:
        if args.source == "shapes":
            if args.num_docs is None:
                parser.error("--source shapes needs --num-docs")
            source = ShapesSource(num_docs=args.num_docs, seed=args.seed, resolution=args.resolution,
                                  tasks=tuple(args.tasks), max_objects=args.max_objects, particles=args.particles,
                                  t2i_max_objects=args.t2i_max_objects)
        else:
            if args.jsonl is None:
                parser.error("--source jsonl needs --jsonl FILE")
            source = JsonlSource(jsonl=args.jsonl, image_root=args.image_root)
        if args.samples_per_shard < 1:
            raise ValueError(f"samples_per_shard must be >= 1, got {args.samples_per_shard}")
    except ValueError as exn:  # a setting out of range, named as its flag
        parser.error("--" + str(exn).replace("_", "-", 2))
    latents = None
    if args.vae is not None:
        try:
            latents = LatentCache.open(args.vae, resolution=args.resolution)
        except (OSError, ValueError) as exn:
            reason = str(exn).strip().splitlines()[0] if str(exn).strip() else type(exn).__name__
            parser.exit(2, f"{parser.prog}: error: --vae {args.vae}: cannot load a VAE ({reason})\n")
    try:
        return make_shards(source, args.out, split=args.split, samples_per_shard=args.samples_per_shard,
                           latents=latents)
    except OSError as exn:
        parser.exit(2, f"{parser.prog}: error: cannot read --jsonl {args.jsonl}: {exn.strerror}\n")


if __name__ == "__main__":
    main()
