"""Webdataset shards: sample formats, bad data counted, resumable state, worker split, writer CLI."""

import io
import json
import os
import subprocess
import sys
import warnings
from collections import Counter
from itertools import islice

import pytest
import torch
import webdataset as wds
from PIL import Image, ImageDraw

from mmgen.data.sample_format import encode_document, encode_pair, encode_png
from mmgen.data.tar_shards import tar_end_problem
from mmgen.data.webdata import DataWarning, WebDocuments, _split, collate_documents

COLOURS = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0), (255, 0, 255), (0, 255, 255)]


def drawn(i: int, size=(16, 16)) -> Image.Image:
    """A deterministic test image: black with a coloured box whose colour and place depend on i."""
    image = Image.new("RGB", size, (0, 0, 0))
    x = i % (size[0] - 4)
    ImageDraw.Draw(image).rectangle([x, 2, x + 3, 9], fill=COLOURS[i % len(COLOURS)])
    return image


def doc(i: int) -> dict:
    return {
        "segments": [
            {"text": f"doc {i} draws"},
            {"image": drawn(i)},
            {"text": "and"},
            {"image": drawn(i + 1)},
        ],
        "meta": {"index": i},
    }


def write_tar(path, samples) -> None:
    with wds.TarWriter(str(path), encoder=False, mtime=0) as writer:
        for sample in samples:
            writer.write(sample)


def write_docs(tmp_path, num_shards: int, per_shard: int) -> list[str]:
    paths = []
    for s in range(num_shards):
        path = tmp_path / f"train-{s:06d}.tar"
        write_tar(path, [encode_document(doc(s * 100 + j), f"s{s}k{j}") for j in range(per_shard)])
        paths.append(str(path))
    return paths


def keys(docs) -> list[str]:
    return [d["meta"]["_wds"]["key"] for d in docs]


def read_all(reader) -> list[dict]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DataWarning)
        return list(reader)


# ------------------------------------------------------------------------------------------ formats


def test_interleaved_and_pair_samples_round_trip_to_documents(tmp_path):
    jpg = io.BytesIO()
    drawn(3).save(jpg, format="JPEG", quality=95)
    pair_json = encode_pair("pairjson", encode_png(drawn(1)), "png", "a red box", {"url": "http://x"})
    pair_txt = {"__key__": "pairtxt", "jpg": jpg.getvalue(), "txt": b"  a blue box \n"}
    write_tar(tmp_path / "a.tar", [encode_document(doc(0), "inter"), pair_json, pair_txt])

    docs = {
        d["meta"]["_wds"]["key"]: d
        for d in read_all(WebDocuments(str(tmp_path / "a.tar"), resolution=None, shuffle=False))
    }
    inter = docs["inter"]
    assert [list(s) for s in inter["segments"]] == [["text"], ["image"], ["text"], ["image"]]
    assert inter["segments"][0]["text"] == "doc 0 draws" and inter["meta"]["index"] == 0
    assert inter["segments"][1]["image"].mode == "RGB"
    assert list(inter["segments"][1]["image"].get_flattened_data()) == list(
        drawn(0).get_flattened_data()
    )  # PNG is lossless
    assert list(inter["segments"][3]["image"].get_flattened_data()) == list(drawn(1).get_flattened_data())
    assert docs["pairjson"]["segments"][0] == {"text": "a red box"}
    assert docs["pairjson"]["meta"]["url"] == "http://x"
    assert docs["pairtxt"]["segments"][0] == {"text": "a blue box"}
    assert docs["pairtxt"]["segments"][1]["image"].size == (16, 16)

    order = WebDocuments(str(tmp_path / "a.tar"), resolution=None, shuffle=False, pair_order="image_text")
    first_pair = next(d for d in read_all(order) if d["meta"]["_wds"]["key"] == "pairjson")
    assert list(first_pair["segments"][0]) == ["image"]


def test_images_become_rgb_resized_and_centre_cropped(tmp_path):
    wide = Image.new("RGB", (60, 30), (255, 0, 0))
    ImageDraw.Draw(wide).rectangle([20, 0, 39, 29], fill=(0, 255, 0))  # green middle third
    gray = Image.new("L", (20, 20), 128)
    samples = [
        {"__key__": "wide", "png": encode_png(wide), "txt": b"wide"},
        {"__key__": "gray", "png": _png_bytes(gray), "txt": b"gray"},
    ]
    write_tar(tmp_path / "a.tar", samples)
    docs = {
        d["meta"]["_wds"]["key"]: d
        for d in read_all(WebDocuments(str(tmp_path / "a.tar"), resolution=8, shuffle=False))
    }
    image = docs["wide"]["segments"][1]["image"]
    assert image.mode == "RGB" and image.size == (8, 8)
    assert image.getpixel((4, 4)) == (0, 255, 0)  # the centre survives the crop
    red_left, _, _ = image.getpixel((0, 4))
    assert red_left > 100  # the crop keeps the middle 30x30 of 60x30: a strip of red remains at the edge
    assert docs["gray"]["segments"][1]["image"].getpixel((3, 3)) == (128, 128, 128)


def _png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


# ---------------------------------------------------------------------------------------- bad data


DAMAGED = ("cut_in_data", "garbled")


def _corrupt_shards(tmp_path) -> tuple[list[str], set[str]]:
    """mixed.tar: one bad sample of each kind + 4 good; garbage.tar: not a tar at all; two tars of
    6 documents damaged after their first members (cut inside a member, overwritten)."""
    good = [encode_document(doc(i), f"good{i}") for i in range(4)]
    bad_json = {"__key__": "badjson", "json": b"{not json", "0.png": encode_png(drawn(0))}
    bad_image = encode_document(doc(9), "badimage")
    bad_image["0.png"] = b"\x89PNG\r\n\x1a\n garbage"
    missing = encode_document(doc(8), "missing")
    del missing["1.png"]
    empty = {"__key__": "empty", "json": json.dumps({"segments": [{"text": ""}], "meta": {}}).encode()}
    invalid = {"__key__": "invalid", "json": json.dumps({"segments": [{"sound": "x.wav"}]}).encode()}
    # Bad samples first, so they are not the last thing a worker reads.
    write_tar(tmp_path / "mixed.tar", [bad_json, bad_image, missing, empty, invalid, *good])
    (tmp_path / "garbage.tar").write_bytes(bytes(range(256)) * 40)
    write_tar(tmp_path / "full.tar", [encode_document(doc(50 + i), f"dmg{i}") for i in range(6)])
    data = (tmp_path / "full.tar").read_bytes()
    half = len(data) // 2  # 512-aligned: a member header starts here
    (tmp_path / "cut_in_data.tar").write_bytes(data[: half + 512 + 40])
    (tmp_path / "garbled.tar").write_bytes(data[:half] + bytes(range(1, 256)) * 8 + data[half + 2040 :])
    os.remove(tmp_path / "full.tar")
    names = ["mixed", "garbage", *DAMAGED]
    return [str(tmp_path / f"{n}.tar") for n in names], {f"good{i}" for i in range(4)}


def test_each_kind_of_bad_data_is_skipped_counted_and_named(tmp_path):
    urls, good = _corrupt_shards(tmp_path)
    reader = WebDocuments(urls, resolution=None, shuffle=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        docs = list(reader)
    by_shard: dict[str, list[str]] = {}
    for d in docs:
        by_shard.setdefault(os.path.basename(d["meta"]["_wds"]["shard"]), []).append(d["meta"]["_wds"]["key"])
    assert set(by_shard["mixed.tar"]) == good
    for name in DAMAGED:  # the samples before the damage arrive, in order
        got = by_shard[f"{name}.tar"]
        assert 1 <= len(got) < 6 and got == [f"dmg{i}" for i in range(len(got))], name
    stats = reader.stats
    assert stats["tar_errors"] == 1 + len(DAMAGED)  # garbage.tar + each damaged tar, once
    assert stats["bad_json"] == 1 and stats["empty_document"] == 1
    # One each, all in mixed.tar: the sample a damage cuts short goes with the rest of its shard.
    assert stats["bad_image"] == stats["missing_image"] == stats["invalid_sample"] == 1
    assert stats["documents"] == len(docs)
    assert stats["samples"] == stats["documents"] + stats["skipped"] - stats["tar_errors"]
    messages = [str(w.message) for w in caught if issubclass(w.category, DataWarning)]
    assert any("mixed.tar" in m and "badjson" in m and "bad_json" in m for m in messages)
    assert any("mixed.tar" in m and "missing" in m and "'1.png'" in m for m in messages)
    assert any("garbage.tar" in m and "unreadable tar" in m for m in messages)
    for name in DAMAGED:
        assert any(f"{name}.tar" in m and ("lost" in m or "unreadable tar" in m) for m in messages), name


def test_intact_tar_has_no_end_problem(tmp_path):
    write_docs(tmp_path, num_shards=1, per_shard=3)
    assert tar_end_problem(str(tmp_path / "train-000000.tar")) is None
    assert tar_end_problem("http://example.com/remote.tar") is None  # only local files are checked


def test_bad_data_counters_reach_the_main_process_from_workers(tmp_path):
    urls, _ = _corrupt_shards(tmp_path)
    serial = WebDocuments(urls, resolution=None, shuffle=False)
    read_all(serial)
    reader = WebDocuments(urls, resolution=None, shuffle=False)
    loader = torch.utils.data.DataLoader(reader, batch_size=2, num_workers=2, collate_fn=collate_documents)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DataWarning)
        for docs in loader:
            reader.observe(docs)
    # Worker 1 reads only garbage.tar and never yields a document: its count still arrives.
    assert reader.stats == serial.stats
    assert reader.stats["tar_errors"] == 1 + len(DAMAGED)


# --------------------------------------------------------------------------------------- resuming


@pytest.mark.parametrize("k", [1, 7, 11, 30])
def test_resume_reads_every_remaining_sample_exactly_once(tmp_path, k):
    urls = write_docs(tmp_path, num_shards=5, per_shard=7)
    full = keys(read_all(WebDocuments(urls, shuffle=True, seed=3, epochs=2)))
    assert Counter(full) == Counter({key: 2 for key in set(full)}) and len(set(full)) == 35

    first = WebDocuments(urls, shuffle=True, seed=3, epochs=2)
    head = keys(islice(iter(first), k))
    state = json.loads(json.dumps(first.state_dict()))
    second = WebDocuments(urls, shuffle=True, seed=3, epochs=2)
    second.load_state_dict(state)
    rest = keys(read_all(second))
    assert head == full[:k]
    assert head + rest == full  # same topology: even the order is the uninterrupted one


@pytest.mark.parametrize("resumed_workers", [0, 2])
def test_resume_from_dataloader_workers(tmp_path, resumed_workers):
    urls = write_docs(tmp_path, num_shards=5, per_shard=6)
    reader = WebDocuments(urls, shuffle=True, seed=1, epochs=1)
    loader = torch.utils.data.DataLoader(reader, batch_size=4, num_workers=2, collate_fn=collate_documents)
    head = []
    for docs in islice(loader, 4):  # 16 documents, from both workers
        reader.observe(docs)
        head += keys(docs)
    state = json.loads(json.dumps(reader.state_dict()))
    resumed = WebDocuments(urls, shuffle=True, seed=1, epochs=1)
    resumed.load_state_dict(state)
    if resumed_workers == 0:  # a different topology
        rest = keys(read_all(resumed))
    else:
        loader = torch.utils.data.DataLoader(
            resumed, batch_size=4, num_workers=2, collate_fn=collate_documents
        )
        rest = [key for docs in loader for key in keys(docs)]
    assert Counter(head + rest) == Counter({f"s{s}k{j}": 1 for s in range(5) for j in range(6)})


def test_each_worker_resumes_in_its_own_share_of_the_epoch(tmp_path, monkeypatch):
    """Worker 0 has finished its first shard and worker 1 has not: after the resume each worker still
    reads the rest of the shards it had, in the uninterrupted order (what a worker that packs its own
    batches needs for the same batches)."""
    urls = write_docs(tmp_path, num_shards=5, per_shard=4)
    monkeypatch.setenv("NUM_WORKERS", "2")

    def worker_docs(state, worker):
        monkeypatch.setenv("WORKER", str(worker))
        reader = WebDocuments(urls, shuffle=True, seed=2, epochs=1)
        if state is not None:
            reader.load_state_dict(state)
        return list(reader)

    full = {w: worker_docs(None, w) for w in (0, 1)}
    assert [len(full[w]) for w in (0, 1)] == [12, 8]  # shards 1, 3, 5 and 2, 4 of the shuffled order
    consumed = {0: 6, 1: 2}
    book = WebDocuments(urls, shuffle=True, seed=2, epochs=1)
    book.observe([full[w][n - 1] for w, n in consumed.items()])
    state = json.loads(json.dumps(book.state_dict()))
    for w, n in consumed.items():
        assert keys(worker_docs(state, w)) == keys(full[w][n:])


def test_state_from_other_settings_is_refused(tmp_path):
    urls = write_docs(tmp_path, num_shards=2, per_shard=2)
    state = WebDocuments(urls, seed=1).state_dict()
    with pytest.raises(ValueError, match="seed"):
        WebDocuments(urls, seed=2).load_state_dict(state)


def test_resampled_stream_is_infinite_deterministic_and_resumable(tmp_path):
    urls = write_docs(tmp_path, num_shards=3, per_shard=4)
    stream = keys(islice(iter(WebDocuments(urls, resampled=True, epochs=None, seed=5)), 40))
    again = WebDocuments(urls, resampled=True, epochs=None, seed=5)
    assert keys(islice(iter(again), 40)) == stream
    assert len(set(stream)) > 4  # draws several shards
    head_reader = WebDocuments(urls, resampled=True, epochs=None, seed=5)
    head = keys(islice(iter(head_reader), 13))
    resumed = WebDocuments(urls, resampled=True, epochs=None, seed=5)
    resumed.load_state_dict(json.loads(json.dumps(head_reader.state_dict())))
    assert head + keys(islice(iter(resumed), 27)) == stream


# ------------------------------------------------------------------------------- node/worker split


def test_infinite_stream_of_a_worker_without_shards_ends_with_a_warning(tmp_path, monkeypatch):
    urls = write_docs(tmp_path, num_shards=1, per_shard=2)
    monkeypatch.setenv("WORKER", "1")  # worker 1 of 2: the only shard goes to worker 0
    monkeypatch.setenv("NUM_WORKERS", "2")
    with pytest.warns(DataWarning, match="gave no document"):
        assert list(WebDocuments(urls, epochs=None)) == []


@pytest.mark.parametrize("world,num_workers", [(1, 2), (2, 1), (2, 3)])
def test_split_replica_matches_webdataset_splitters(monkeypatch, world, num_workers):
    items = [(g, 0) for g in range(13)]
    seen = []
    for gid in range(world * num_workers):
        rank, worker = divmod(gid, num_workers)
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("WORLD_SIZE", str(world))
        monkeypatch.setenv("WORKER", str(worker))
        monkeypatch.setenv("NUM_WORKERS", str(num_workers))
        mine = list(wds.split_by_worker(wds.split_by_node(items)))
        assert mine == _split(items, (world, num_workers), gid)
        seen += mine
    assert sorted(seen) == items


def test_two_workers_read_disjoint_samples_that_cover_the_epoch(tmp_path):
    urls = write_docs(tmp_path, num_shards=4, per_shard=5)
    reader = WebDocuments(urls, shuffle=True, seed=0, epochs=1)
    loader = torch.utils.data.DataLoader(reader, batch_size=3, num_workers=2, collate_fn=collate_documents)
    by_worker: dict[int, list[str]] = {0: [], 1: []}
    for docs in loader:
        for d in docs:
            by_worker[d["meta"]["_wds"]["worker"]].append(d["meta"]["_wds"]["key"])
    assert len(by_worker[0]) == len(by_worker[1]) == 10
    assert not set(by_worker[0]) & set(by_worker[1])
    assert sorted(by_worker[0] + by_worker[1]) == sorted(f"s{s}k{j}" for s in range(4) for j in range(5))


# ------------------------------------------------------------------------------------- writer CLI


def test_make_shards_from_jsonl_via_command_line(tmp_path):
    root = tmp_path / "images"
    root.mkdir()
    for i in range(3):
        drawn(i).save(root / f"{i}.png")
    drawn(5).save(root / "photo.jpg", quality=95)
    (root / "broken.png").write_bytes(b"not a png")
    lines = [
        {
            "segments": [{"text": "first"}, {"image": "0.png"}, {"text": "then"}, {"image": "1.png"}],
            "meta": {"topic": "boxes"},
        },
        {"image": "photo.jpg", "caption": "a magenta box", "source": "mine"},
        {"segments": [{"image": "2.png"}, {"text": "a caption after"}], "key": "custom_key"},
        {"image": "nope.png", "caption": "missing file"},
        {"image": "broken.png", "caption": "broken file"},
        {"segments": [{"text": ""}]},
    ]
    jsonl = tmp_path / "docs.jsonl"
    jsonl.write_text("\n".join(json.dumps(line) for line in lines) + "\n{bad json\n")
    out = tmp_path / "shards"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "mmgen.data.make_shards",
            "--source",
            "jsonl",
            "--jsonl",
            str(jsonl),
            "--image-root",
            str(root),
            "--out",
            str(out),
            "--split",
            "val",
            "--samples-per-shard",
            "2",
        ],
        check=False,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert "line 4: missing_image" in result.stderr and "line 7: bad_json" in result.stderr
    manifest = json.loads((out / "val-manifest.json").read_text())
    assert manifest["num_samples"] == 3 and manifest["num_images"] == 4
    assert [s["num_samples"] for s in manifest["shards"]] == [2, 1]
    assert manifest["skipped"] == {"bad_image": 1, "bad_json": 1, "empty_document": 1, "missing_image": 1}
    assert manifest["config"]["samples_per_shard"] == 2 and manifest["source"] == "jsonl"

    docs = {
        d["meta"]["_wds"]["key"]: d
        for d in read_all(WebDocuments(str(out / "val-*.tar"), resolution=None, shuffle=False))
    }
    assert set(docs) == {"000000001", "000000002", "custom_key"}
    first = docs["000000001"]
    assert [s.get("text") for s in first["segments"]] == ["first", None, "then", None]
    assert list(first["segments"][3]["image"].get_flattened_data()) == list(drawn(1).get_flattened_data())
    assert first["meta"]["topic"] == "boxes"
    assert docs["000000002"]["segments"][0] == {"text": "a magenta box"}
    assert docs["000000002"]["meta"]["source"] == "mine"
    assert list(docs["custom_key"]["segments"][0]) == ["image"]


def test_make_shards_shapes_round_trips_the_shapes_world(tmp_path):
    from mmgen.data.make_shards import main
    from mmgen.data.shapes_docs import iter_documents

    manifest = main(["--source", "shapes", "--num-docs", "6", "--out", str(tmp_path), "--split", "heldout",
                     "--seed", "4", "--resolution", "32", "--samples-per-shard", "4"])  # fmt: skip
    assert manifest["num_samples"] == 6 and [s["num_samples"] for s in manifest["shards"]] == [4, 2]
    expected = list(iter_documents(6, seed=4, split="heldout", resolution=32))
    got = read_all(WebDocuments(str(tmp_path / "heldout-*.tar"), resolution=32, shuffle=False))
    assert len(got) == 6
    for want, have in zip(expected, got, strict=True):
        assert [list(s) for s in have["segments"]] == [list(s) for s in want["segments"]]
        for a, b in zip(want["segments"], have["segments"], strict=True):
            if "text" in a:
                assert a["text"] == b["text"]
            else:  # lossless PNG at the render size: the judge sees exactly the rendered pixels
                assert a["image"].tobytes() == b["image"].tobytes()
        meta = {k: v for k, v in have["meta"].items() if k != "_wds"}
        assert meta == json.loads(json.dumps(want["meta"]))


def test_make_shards_tasks_writes_only_those_document_kinds(tmp_path, capsys):
    from mmgen.data.make_shards import ShapesSource, main

    main(["--source", "shapes", "--num-docs", "12", "--out", str(tmp_path), "--tasks", "t2i", "caption"])
    got = read_all(WebDocuments(str(tmp_path / "train-*.tar"), resolution=32, shuffle=False))
    assert len(got) == 12
    assert {d["meta"]["task"] for d in got} <= {"t2i", "caption"}
    with pytest.raises(ValueError, match="unknown task"):
        ShapesSource(num_docs=2, tasks=("poem",))
    with pytest.raises(SystemExit):  # the command line names the flag in one line
        main(["--source", "shapes", "--num-docs", "2", "--out", str(tmp_path / "bad"), "--tasks", "poem"])
    assert "error: --tasks: unknown task" in capsys.readouterr().err and not (tmp_path / "bad").exists()


def test_task_mix_changes_only_the_kinds_drawn_and_bad_mixes_name_the_task():
    from mmgen.data.shapes_docs import TASK_WEIGHTS, make_document, parse_task_weights

    assert parse_task_weights(None) == TASK_WEIGHTS
    assert parse_task_weights(["t2i=3", "caption"]) == {"t2i": 3.0, "caption": TASK_WEIGHTS["caption"]}
    default = [make_document(i, seed=0)["meta"]["task"] for i in range(200)]
    assert default == [make_document(i, seed=0, tasks=list(TASK_WEIGHTS))["meta"]["task"] for i in range(200)]
    heavy = [make_document(i, seed=0, tasks=["t2i=0.8", "caption=0.2"])["meta"]["task"] for i in range(200)]
    assert set(heavy) == {"t2i", "caption"} and heavy.count("t2i") > 2 * default.count("t2i")
    for bad, match in ((["poem"], "unknown task"), (["t2i=-1"], "must be > 0"), (["t2i=x"], "not a number")):
        with pytest.raises(ValueError, match=match):
            parse_task_weights(bad)


def test_config_rejects_a_bad_task_mix_naming_the_key():
    from mmgen.config import ConfigError, load_config

    assert load_config(None, ["--data.tasks", "t2i=0.6,caption=0.4"]).data.tasks == ("t2i=0.6", "caption=0.4")
    with pytest.raises(ConfigError, match="data.tasks"):
        load_config(None, ["--data.tasks", "t2i,poem"])


def test_shapes_shards_are_rebuilt_when_their_settings_change(tmp_path, capsys):
    from mmgen.training.data import ensure_shapes_shards

    ensure_shapes_shards(tmp_path, num_docs=6, resolution=32, seed=0, samples_per_shard=4)
    first = (tmp_path / "train-000000.tar").stat().st_mtime_ns
    ensure_shapes_shards(tmp_path, num_docs=6, resolution=32, seed=0, samples_per_shard=4)
    assert (tmp_path / "train-000000.tar").stat().st_mtime_ns == first  # same settings: kept
    ensure_shapes_shards(tmp_path, num_docs=5, resolution=32, seed=0, samples_per_shard=4, tasks=["t2i"])
    assert "rebuilding" in capsys.readouterr().err
    got = read_all(WebDocuments(str(tmp_path / "train-*.tar"), resolution=32, shuffle=False))
    assert len(got) == 5 and {d["meta"]["task"] for d in got} == {"t2i"}
    (tmp_path / "train-manifest.json").unlink()  # an interrupted build: no manifest, a stray shard
    (tmp_path / "train-000009.tar").write_bytes(b"partial")
    ensure_shapes_shards(tmp_path, num_docs=5, resolution=32, seed=0, samples_per_shard=4, tasks=["t2i"])
    assert sorted(p.name for p in tmp_path.glob("train-*.tar")) == ["train-000000.tar", "train-000001.tar"]


def test_max_objects_limits_every_scene_and_older_manifests_mean_four(tmp_path, capsys):
    """data.max_objects (a curriculum's single-object stage): every scene of every task holds at most that
    many objects; shards whose manifest predates the setting count as max_objects 4 and are kept."""
    import json

    from mmgen.data.shapes_docs import iter_documents
    from mmgen.training.data import ensure_shapes_shards

    counts = {m: [len(s["objects"]) for d in iter_documents(120, seed=3, max_objects=m) for s in d["meta"]["scenes"]]
              for m in (1, 2, 4)}
    assert set(counts[1]) == {1} and set(counts[2]) == {1, 2} and max(counts[4]) == 4
    tasks = {d["meta"]["task"] for d in iter_documents(120, seed=3, max_objects=1)}
    assert tasks == {"t2i", "caption", "vqa", "multiturn"}  # every kind still drawn
    with pytest.raises(ValueError, match="max_objects"):
        next(iter_documents(1, seed=3, max_objects=5))

    ensure_shapes_shards(tmp_path, num_docs=4, resolution=32, seed=0, samples_per_shard=4)
    manifest = tmp_path / "train-manifest.json"
    data = json.loads(manifest.read_text())
    del data["config"]["max_objects"]  # as written before the setting existed
    manifest.write_text(json.dumps(data))
    first = (tmp_path / "train-000000.tar").stat().st_mtime_ns
    ensure_shapes_shards(tmp_path, num_docs=4, resolution=32, seed=0, samples_per_shard=4, max_objects=4)
    assert (tmp_path / "train-000000.tar").stat().st_mtime_ns == first
    ensure_shapes_shards(tmp_path, num_docs=4, resolution=32, seed=0, samples_per_shard=4, max_objects=1)
    assert "rebuilding" in capsys.readouterr().err
    got = read_all(WebDocuments(str(tmp_path / "train-*.tar"), resolution=32, shuffle=False))
    assert all(len(s["objects"]) == 1 for d in got for s in d["meta"]["scenes"])


def test_slots_with_several_samples_round_trip_through_shards(tmp_path):
    from mmgen.data.make_shards import main
    from mmgen.data.shapes_docs import iter_documents

    main(["--source", "shapes", "--num-docs", "4", "--out", str(tmp_path), "--seed", "2", "--tasks", "t2i",
          "--particles", "3"])  # fmt: skip
    expected = list(iter_documents(4, seed=2, tasks=["t2i"], particles=3))
    got = read_all(WebDocuments(str(tmp_path / "train-*.tar"), resolution=32, shuffle=False))
    for want, have in zip(expected, got, strict=True):
        slots = [s["images"] for s in have["segments"] if "images" in s]
        assert len(slots) == 1 and len(slots[0]) == 3
        wanted = next(s["images"] for s in want["segments"] if "images" in s)
        assert [a.tobytes() for a in wanted] == [b.tobytes() for b in slots[0]]
    manifest = json.loads((tmp_path / "train-manifest.json").read_text())
    assert manifest["config"]["particles"] == 3 and manifest["num_images"] == 12
