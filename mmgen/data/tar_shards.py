"""Tar shards as webdataset lays them out: expand shard patterns, walk a tar's members, group them into
samples by key, and find the damage Python's streaming tar reader passes over silently. The reader of
documents on top of this is `mmgen.data.webdata.WebDocuments` (its docstring: what counts as damage).
"""

from __future__ import annotations

import contextlib
import glob
import os
import re
import tarfile
from collections.abc import Iterable, Iterator
from urllib.parse import urlparse

import braceexpand
from webdataset.gopen import gopen
from webdataset.tariterators import base_plus_ext


class TarDamage(Exception):
    """Unreadable tar data; `key` names the sample being read when it was met (dropped with the rest)."""

    def __init__(self, message: str, key: str | None = None):
        super().__init__(message)
        self.key = key


# samples: tar samples read, good or bad; documents: delivered; tar_errors: shards cut short or
# unreadable; captions_cut: pair captions cut to their token budget (delivered); then one counter per
# sample problem (meanings: mmgen.data.sample_format).
def expand_shards(urls: str | Iterable[str]) -> list[str]:
    """Shard list from a directory (its *.tar, sorted), a glob, a brace pattern, '::'-joined
    patterns, or a list of any of these. Raises if nothing matches."""
    if isinstance(urls, str):
        urls = urls.split("::")
    out: list[str] = []
    for pattern in urls:
        if os.path.isdir(pattern):
            out.extend(sorted(glob.glob(os.path.join(pattern, "*.tar"))))
            continue
        for url in braceexpand.braceexpand(pattern):
            matched = sorted(glob.glob(url)) if glob.has_magic(url) else [url]
            out.extend(matched)
    if not out:
        raise FileNotFoundError(f"no shards match {urls!r}")
    return out


def tar_end_problem(url: str) -> str | None:
    """Why a local .tar does not end cleanly, or None (also None for remote or compressed shards).

    Python's streaming tar reader (the one we use) stops silently at a truncated file or at garbage
    after the first member, so a cut shard would lose its tail unnoticed. This walks the 512-byte
    headers (checksum + size, seeking over the data) up to the end-of-archive zero block, or up to
    the end of the file when it ends right after a member (valid data without the end marker)."""
    parsed = urlparse(url)
    path = parsed.path if parsed.scheme in ("", "file") else None
    if path is None or not path.endswith(".tar") or not os.path.isfile(path):
        return None
    block = 512
    with open(path, "rb") as f:
        file_size, offset = os.fstat(f.fileno()).st_size, 0
        while True:  # walk the headers: ~us each, where tarfile's parser costs ~40 us
            f.seek(offset)
            header = f.read(block)
            if not header and offset > 0:
                return None  # ends at a member boundary: nothing is missing
            if len(header) < block:
                return f"tar ends inside a member at byte {offset} (truncated); samples after it are lost"
            if header.count(0) == block:
                return None  # end-of-archive marker
            stored, size = _header_checksum_and_size(header)
            computed = sum(header[:148]) + 8 * 32 + sum(header[156:])  # checksum field counted as spaces
            if stored != computed or size < 0:
                return f"corrupt tar header at byte {offset} (garbage or truncated); samples after it are lost"
            offset += block + -(-size // block) * block
            if offset > file_size:
                return "tar member runs past the end of the file (truncated); samples after it are lost"


def _header_checksum_and_size(header: bytes) -> tuple[int, int]:
    """(stored checksum, member size) of a ustar/GNU header; -1 for a field that does not parse."""
    try:
        stored = int(header[148:156].strip(b"\0 ") or b"-1", 8)
        size_field = header[124:136]
        if size_field[0] & 0x80:  # GNU base-256 size
            return stored, int.from_bytes(size_field[1:], "big")
        return stored, int(size_field.strip(b"\0 ") or b"0", 8)
    except ValueError:
        return -1, -1


_META_MEMBER = re.compile(r"__[^/]*__($|/)")  # webdataset's metadata members (e.g. __index__): not samples


def tar_members(url: str) -> Iterator[tuple[str, bytes]]:
    """(name, data) of the regular members of one shard, in tar order; raises on any damage, including
    the silent stops that `tar_end_problem` finds in a local .tar."""
    stream = gopen(url)
    try:
        with tarfile.open(fileobj=stream, mode="r|*") as tar:
            for info in tar:
                if info.isreg() and not _META_MEMBER.match(info.name):
                    yield info.name, tar.extractfile(info).read()
                tar.members = []  # a streaming read need not keep every header
        stream.close()  # a pipe reports its command's exit status here
    finally:
        with contextlib.suppress(Exception):  # already failed or abandoned: the first error is the one to report
            stream.close()
    problem = tar_end_problem(url)
    if problem is not None:
        raise tarfile.ReadError(problem)


def tar_samples(members: Iterable[tuple[str, bytes]]) -> Iterator[dict]:
    """Consecutive members sharing a key -> one sample {"__key__": key, suffix: data, ...}, suffixes
    lower-cased as webdataset does. A repeated suffix is marked in "__duplicate__" (the first copy is
    kept). A damage in `members` is raised as TarDamage naming the unfinished sample, never yielded."""
    sample: dict | None = None
    try:
        for name, data in members:
            key, suffix = base_plus_ext(name)
            if key is None:  # no extension: not part of a sample
                continue
            suffix = suffix.lower()
            if sample is not None and key != sample["__key__"]:
                yield sample
                sample = None
            if sample is None:
                sample = {"__key__": key}
            if suffix in sample:
                sample.setdefault("__duplicate__", suffix)
            else:
                sample[suffix] = data
    except Exception as exn:  # gopen and tarfile raise many types (OSError, EOFError, TarError, ...)
        key = sample["__key__"] if sample is not None else None
        raise TarDamage(f"{type(exn).__name__}: {str(exn)[:200]}", key) from exn
    if sample is not None:
        yield sample
