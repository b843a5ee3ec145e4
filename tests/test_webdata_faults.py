"""The shard reader on faulty data: each fault is its own tiny shard, built here with tarfile. A bad sample
is skipped, warned with shard and key, and counted by kind; every good sample arrives once and intact;
the counters add up; unusual but valid data (odd image modes, a tar without end blocks, unknown segment
keys) is delivered."""

import io
import json
import tarfile
import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mmgen.data.sample_format import PROBLEMS
from mmgen.data.tar_shards import tar_end_problem
from mmgen.data.webdata import DataWarning, NoDocumentsError, WebDocuments


def png(colour=(255, 0, 0), size=(4, 4)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, colour).save(buffer, format="PNG")
    return buffer.getvalue()


def pair(key: str, caption: str = "a box") -> list[tuple[str, bytes]]:
    return [(f"{key}.png", png()), (f"{key}.txt", caption.encode())]


def document(key: str, segments: list, images: dict[str, bytes] | None = None) -> list[tuple[str, bytes]]:
    spec = json.dumps({"segments": segments, "meta": {}})  # ensure_ascii: a lone surrogate is written as \ud800
    return [(f"{key}.json", spec.encode()), *((f"{key}.{name}", data) for name, data in (images or {}).items())]


def write_members(path: Path, members: list[tuple[str, bytes]]) -> str:
    """A tar of exactly these members, in order (duplicates allowed, unlike webdataset's TarWriter)."""
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return str(path)


def read(urls, **kwargs) -> tuple[list[dict], dict, list[str]]:
    """(documents, counters, DataWarning messages) of one pass in tar order."""
    reader = WebDocuments(urls, resolution=None, shuffle=False, **kwargs)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        docs = list(reader)
    return docs, reader.stats, [str(w.message) for w in caught if issubclass(w.category, DataWarning)]


def keys(docs) -> list[str]:
    return [d["meta"]["_wds"]["key"] for d in docs]


def assert_counters_add_up(stats: dict) -> None:
    problems = sum(stats[p] for p in PROBLEMS)
    assert stats["samples"] == stats["documents"] + problems
    assert stats["skipped"] == problems + stats["tar_errors"]


def cut_inside(path: str, member: str) -> None:
    """Truncate the tar 10 bytes into the data of `member`."""
    with tarfile.open(path) as tar:
        offset = tar.getmember(member).offset_data
    Path(path).write_bytes(Path(path).read_bytes()[: offset + 10])


# ------------------------------------------------------------------------------------- one fault, one shard

FAULTS = {  # counter -> the members of one bad sample (key "bad"), read between two good pairs
    "duplicate_member": pair("bad") + [("bad.txt", b"a second caption")],
    "bad_json": [("bad.json", b"{not json"), ("bad.png", png())],
    "bad_image": [("bad.png", b"\x89PNG\r\n\x1a\n garbage"), ("bad.txt", b"a box")],
    "missing_image": document("bad", [{"text": "see"}, {"image": "0.png"}]),
    "bad_text": document("bad", [{"text": "half a pair: \ud800"}, {"image": "0.png"}], {"0.png": png()}),
    "text_too_long": pair("bad", "x" * 100_001),  # the default max_text_chars is 100_000
    "empty_document": document("bad", [{"text": ""}]),
    "invalid_sample": document("bad", [{"text": "both", "image": "0.png"}], {"0.png": png()}),
}


@pytest.mark.parametrize("problem", sorted(FAULTS))
def test_a_bad_sample_is_skipped_counted_and_named_and_its_neighbours_arrive(tmp_path, problem):
    url = write_members(tmp_path / f"{problem}.tar", pair("first") + FAULTS[problem] + pair("last"))
    docs, stats, messages = read(url)
    assert keys(docs) == ["first", "last"]
    assert stats[problem] == 1 and stats["skipped"] == 1 and stats["samples"] == 3
    assert_counters_add_up(stats)
    assert len(messages) == 1 and f"{problem}.tar" in messages[0] and "key bad" in messages[0]


def test_a_repeated_image_member_skips_the_document_and_a_later_cut_is_still_counted(tmp_path):
    repeated = document("twice", [{"image": "0.png"}, {"text": "red or blue?"}],
                        {"0.png": png((255, 0, 0))}) + [("twice.0.png", png((0, 0, 255)))]
    path = tmp_path / "dup.tar"
    write_members(path, pair("first") + repeated + pair("middle") + pair("cut"))
    cut_inside(str(path), "cut.txt")
    docs, stats, messages = read(str(path))
    assert keys(docs) == ["first", "middle"]  # "cut" lost its caption: not delivered
    assert stats["duplicate_member"] == 1 and stats["tar_errors"] == 1
    assert_counters_add_up(stats)
    assert any("key twice" in m and ".0.png occurs twice" in m for m in messages)
    assert any("dup.tar" in m and "sample cut" in m and "unreadable tar" in m for m in messages)


def test_a_key_seen_earlier_in_the_shard_is_skipped(tmp_path):
    url = write_members(tmp_path / "a.tar", pair("same", "first") + pair("other") + pair("same", "second"))
    docs, stats, messages = read(url)
    assert keys(docs) == ["same", "other"] and docs[0]["segments"][0] == {"text": "first"}
    assert stats["duplicate_key"] == 1
    assert_counters_add_up(stats)
    assert any("key same" in m and "duplicate_key" in m for m in messages)


@pytest.mark.parametrize("damage", ["cut_in_data", "cut_in_a_pipe", "not_a_tar", "missing_file", "failing_pipe"])
def test_unreadable_shards_are_one_tar_error_each(tmp_path, damage):
    path = tmp_path / "s.tar"
    url = write_members(path, pair("first") + pair("second"))
    with tarfile.open(path) as tar:
        cut = tar.getmember("second.txt").offset_data + 10
    if damage == "cut_in_data":
        path.write_bytes(path.read_bytes()[:cut])
    elif damage == "cut_in_a_pipe":
        url = f"pipe:head -c {cut} {path}"
    elif damage == "not_a_tar":
        path.write_bytes(bytes(range(256)) * 8)
    elif damage == "missing_file":
        url = str(tmp_path / "absent.tar")
    else:
        url = "pipe:exit 3"
    docs, stats, messages = read(url)
    assert keys(docs) == (["first"] if damage.startswith("cut") else [])  # "second" lost its caption
    assert stats["tar_errors"] == 1 and stats["skipped"] == 1
    assert_counters_add_up(stats)
    assert len(messages) == 1 and "unreadable tar" in messages[0]


def test_a_tar_ending_right_after_a_member_is_read_silently(tmp_path):
    path = tmp_path / "no_end_blocks.tar"
    write_members(path, pair("first") + pair("last"))
    with tarfile.open(path) as tar:
        last = tar.getmember("last.txt")
    end = last.offset_data + -(-last.size // 512) * 512  # the data's last 512-byte block
    path.write_bytes(path.read_bytes()[:end])
    assert tar_end_problem(str(path)) is None
    docs, stats, messages = read(str(path))
    assert keys(docs) == ["first", "last"] and stats["skipped"] == 0 and messages == []


def test_shards_read_through_a_pipe_url(tmp_path):
    path = write_members(tmp_path / "a.tar", pair("first") + pair("second"))
    docs, stats, messages = read(f"pipe:cat {path}")
    assert keys(docs) == ["first", "second"] and stats["skipped"] == 0 and messages == []


# ------------------------------------------------------------------------------------------------- texts


def test_max_text_chars_bounds_each_text_and_caption(tmp_path):
    url = write_members(tmp_path / "a.tar", pair("fits", "x" * 20) + pair("caption", "x" * 21)
                        + document("segment", [{"text": "x" * 21}, {"image": "0.png"}], {"0.png": png()}))
    docs, stats, _ = read(url, max_text_chars=20)
    assert keys(docs) == ["fits"] and stats["text_too_long"] == 2
    docs, stats, _ = read(url, max_text_chars=None)
    assert len(docs) == 3


def test_a_caption_that_is_not_utf8_or_holds_a_lone_surrogate_is_bad_text(tmp_path):
    surrogate = [("json.png", png()), ("json.json", json.dumps({"caption": "a \udfff box"}).encode())]
    url = write_members(tmp_path / "a.tar", [("txt.png", png()), ("txt.txt", b"caf\xe9")] + surrogate + pair("ok"))
    docs, stats, _ = read(url)
    assert keys(docs) == ["ok"] and stats["bad_text"] == 2


# -------------------------------------------------------------------------------------- segment structure


def test_unknown_segment_keys_are_ignored(tmp_path):
    segments = [{"text": "a red box", "source": "web"}, {"image": "0.png", "alt": "red"}]
    url = write_members(tmp_path / "a.tar", document("newer", segments, {"0.png": png()}))
    docs, stats, _ = read(url)
    assert [list(s) for s in docs[0]["segments"]] == [["text"], ["image"]] and stats["skipped"] == 0
    assert docs[0]["segments"][0] == {"text": "a red box"}


@pytest.mark.parametrize("segment", [{"source": "web"}, {"text": "a", "images": ["0.png"]}, {"text": 3},
                                     {"images": []}, {"images": ["0.png", 1]}, {"image": ["0.png"]}, "text"])
def test_unreadable_segments_make_an_invalid_sample(tmp_path, segment):
    url = write_members(tmp_path / "a.tar", document("bad", [segment], {"0.png": png()}))
    docs, stats, _ = read(url)
    assert docs == [] and stats["invalid_sample"] == 1


# ------------------------------------------------------------------------------------------- image modes


def _saved(image: Image.Image, fmt: str = "PNG", **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()


def _palette_with_transparency() -> bytes:
    image = Image.new("P", (3, 1))
    image.putpalette([255, 0, 0, 0, 255, 0])
    image.putdata([0, 1, 1])
    return _saved(image, transparency=1)  # index 1 (green) is fully transparent


IMAGE_MODES = {  # name -> (image bytes, the RGB pixels expected along the first row)
    "grey_16_bit": (_saved(Image.fromarray(np.array([[0, 257 * 128, 65535]], dtype=np.uint16))),
                    [(0, 0, 0), (128, 128, 128), (255, 255, 255)]),
    "palette_transparency": (_palette_with_transparency(), [(255, 0, 0), (0, 0, 0), (0, 0, 0)]),
    "grey_alpha": (_saved(Image.frombytes("LA", (3, 1), bytes([200, 255, 200, 0, 200, 128]))),
                   [(200, 200, 200), (0, 0, 0), (100, 100, 100)]),
    "rgba": (_saved(Image.frombytes("RGBA", (3, 1), bytes([255, 0, 0, 255, 0, 255, 0, 0, 0, 255, 0, 128]))),
             [(255, 0, 0), (0, 0, 0), (0, 128, 0)]),
}


@pytest.mark.parametrize("mode", sorted(IMAGE_MODES))
def test_unusual_image_modes_arrive_as_rgb_composited_on_black(tmp_path, mode):
    data, expected = IMAGE_MODES[mode]
    url = write_members(tmp_path / "a.tar", [("img.png", data), ("img.txt", b"pixels")])
    docs, stats, _ = read(url)
    image = docs[0]["segments"][1]["image"]
    assert image.mode == "RGB" and stats["skipped"] == 0
    got = [image.getpixel((x, 0)) for x in range(3)]
    assert all(abs(a - b) <= 1 for g, e in zip(got, expected) for a, b in zip(g, e)), (got, expected)


def test_a_cmyk_jpeg_arrives_in_its_colours(tmp_path):
    cmyk = Image.new("CMYK", (8, 8), (0, 255, 255, 0))  # no cyan or black, full magenta and yellow: red
    url = write_members(tmp_path / "a.tar", [("img.jpg", _saved(cmyk, "JPEG", quality=95)), ("img.txt", b"red")])
    docs, _, _ = read(url)
    red = docs[0]["segments"][1]["image"].getpixel((4, 4))
    assert red[0] > 240 and red[1] < 15 and red[2] < 15


def _rotated_left_on_disk(fmt: str) -> bytes:
    """An 16x8 image, green left half and red right half, saved lying down with EXIF orientation 6 ("turn 90
    degrees clockwise to view"), as a phone held upright writes it: viewed, it is 8x16, green on top."""
    image = Image.new("RGB", (16, 8), (255, 0, 0))
    image.paste((0, 255, 0), (0, 0, 8, 8))
    exif = image.getexif()
    exif[0x0112] = 6
    return _saved(image, fmt, exif=exif, **({"quality": 100} if fmt == "JPEG" else {}))


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_exif_orientation_is_applied(tmp_path, fmt):
    url = write_members(tmp_path / "a.tar", [("img.png", _rotated_left_on_disk(fmt)), ("img.txt", b"upright")])
    docs, _, _ = read(url)
    image = docs[0]["segments"][1]["image"]
    assert image.size == (8, 16)
    green, red = image.getpixel((4, 3)), image.getpixel((4, 12))
    assert green[1] > 200 > green[0] and red[0] > 200 > red[1]


@pytest.mark.parametrize("size", [(7, 33), (33, 7), (1, 300), (31, 31), (97, 64)])
def test_any_size_and_aspect_becomes_the_resolution_by_shorter_side_and_centre_crop(tmp_path, size):
    """Red with a green middle third across the long side: the crop is centred on it."""
    w, h = size
    image = Image.new("RGB", size, (255, 0, 0))
    if w != h:
        image.paste((0, 255, 0), (w // 3, 0, w - w // 3, h) if w > h else (0, h // 3, w, h - h // 3))
    url = write_members(tmp_path / "a.tar", [("img.jpg", _saved(image, "JPEG", quality=100)), ("img.txt", b"x")])
    reader = WebDocuments(url, resolution=8, shuffle=False)
    out = next(iter(reader))["segments"][1]["image"]
    assert out.size == (8, 8)
    centre = out.getpixel((4, 4))
    assert (centre[1] > 200 > centre[0]) if w != h else (centre[0] > 200 > centre[1])


# ---------------------------------------------------------------------------------------- resume, stream


def test_resume_after_bad_samples_continues_exactly(tmp_path):
    members = pair("a") + FAULTS["duplicate_member"] + pair("b") + [("broken.json", b"{not json")] + pair("c")
    url = write_members(tmp_path / "a.tar", members)
    first = WebDocuments(url, resolution=None, shuffle=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DataWarning)
        stream = iter(first)
        assert keys([next(stream), next(stream)]) == ["a", "b"]
        assert first.state_dict()["partial"] == {"0": {"0": 3}}  # a, bad, b: bad samples count as read
        resumed = WebDocuments(url, resolution=None, shuffle=False)
        resumed.load_state_dict(json.loads(json.dumps(first.state_dict())))
        assert keys(list(resumed)) == ["c"]
    assert resumed.stats["bad_json"] == 1 and resumed.stats["duplicate_member"] == 0


def _stream_parts():
    from mmgen.data.packing import PackingConfig
    from mmgen.tokenization import load_tokenizer

    tokenizer = load_tokenizer(str(Path(__file__).resolve().parents[1] / "tokenizers" / "shapes"))
    return tokenizer, PackingConfig(seq_len=64, num_image_tokens=4, image_size=16, num_noisy_copies=1)


def test_bad_samples_met_in_workers_reach_the_train_streams_counters(tmp_path):
    """Each of two workers reads one shard that starts with a bad sample and packs its own batches."""
    from mmgen.training.data import TrainStream

    write_members(tmp_path / "train-0.tar", FAULTS["bad_json"] + [m for i in range(6) for m in pair(f"a{i}")])
    write_members(tmp_path / "train-1.tar", FAULTS["bad_image"] + [m for i in range(6) for m in pair(f"b{i}")])
    tokenizer, packing = _stream_parts()
    stream = TrainStream(str(tmp_path / "train-*.tar"), tokenizer, packing, batch_size=1, seed=0, num_workers=2)
    try:
        batches = [next(stream), next(stream)]  # one from each worker
    finally:
        stream.close()
    stats = stream.stats
    assert stats["bad_json"] == 1 and stats["bad_image"] == 1 and stats["skipped"] == 2
    assert stats["num_documents"] == sum(b["num_documents"] for b in batches) > 0
    assert stats["documents"] >= stats["num_documents"]  # a worker reads past its last batch


@pytest.mark.parametrize("prefetch,num_workers", [(0, 0), (1, 0), (0, 2)])
def test_a_train_stream_over_only_unreadable_shards_ends_in_one_line_naming_them(tmp_path, capsys, prefetch,
                                                                                  num_workers):
    from mmgen.cli import run_cli
    from mmgen.training.data import TrainStream

    for i in range(2):
        (tmp_path / f"train-{i}.tar").write_bytes(b"not a tar" * 100)
    tokenizer, packing = _stream_parts()
    pattern = str(tmp_path / "train-*.tar")

    def first_batch(argv):
        stream = TrainStream(pattern, tokenizer, packing, batch_size=2, seed=0, prefetch=prefetch,
                             num_workers=num_workers)
        try:
            next(stream)
        finally:
            stream.close()

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DataWarning)
        with pytest.raises(NoDocumentsError, match=r"train-\*\.tar.*tar_errors=\d"):
            first_batch([])
        status = run_cli(first_batch, [])  # what the training script does with it
    err = capsys.readouterr().err
    assert status == 2 and err.startswith("error: ") and err.count("\n") == 1 and "train-*.tar" in err
