"""The shard writer on faulty JSONL input: a bad line is skipped, warned with its line number and counted
by problem in the manifest, and never stops the run; a missing input file stops it before anything is
written."""

import json
import warnings

import pytest
from PIL import Image

from mmgen.data.make_shards import main as make_shards
from mmgen.data.webdata import DataWarning, WebDocuments


def run(tmp_path, lines: list[bytes]) -> tuple[dict, list[str]]:
    """Write `lines` as docs.jsonl (images: red.png), make shards in tmp_path/out; (manifest, warnings)."""
    Image.new("RGB", (4, 4), (255, 0, 0)).save(tmp_path / "red.png")
    (tmp_path / "docs.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        manifest = make_shards(["--source", "jsonl", "--jsonl", str(tmp_path / "docs.jsonl"),
                                "--image-root", str(tmp_path), "--out", str(tmp_path / "out")])
    return manifest, [str(w.message) for w in caught]


def line(record: dict) -> bytes:
    return json.dumps(record).encode()  # ensure_ascii: a lone surrogate is written as \ud800, valid JSON


def test_bad_lines_are_skipped_counted_and_named_and_the_good_ones_written(tmp_path):
    lines = [
        line({"image": "red.png", "caption": "a red box", "key": "red"}),
        b'{"image": "red.png", "caption": "caf\xe9"}',  # Latin-1, not UTF-8
        line({"image": "red.png", "caption": "the same key again", "key": "red"}),
        line({"segments": [{"text": "half a pair \ud800"}, {"image": "red.png"}]}),
        line({"image": "red.png", "caption": "\udc00 alone"}),
        line({"segments": [{"image": "red.png"}, {"text": "a red box, again"}]}),
    ]
    manifest, messages = run(tmp_path, lines)
    assert manifest["num_samples"] == 2
    assert manifest["skipped"] == {"bad_json": 1, "bad_text": 2, "duplicate_key": 1}
    for number, problem in ((2, "bad_json"), (3, "duplicate_key"), (4, "bad_text"), (5, "bad_text")):
        assert any(f"line {number}: {problem}" in m for m in messages), (number, problem)
    reader = WebDocuments(str(tmp_path / "out"), resolution=None, shuffle=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error", DataWarning)  # what the writer wrote, the reader takes without a word
        docs = list(reader)
    assert [d["meta"]["_wds"]["key"] for d in docs] == ["red", "000000006"]
    assert docs[0]["segments"][0] == {"text": "a red box"}


def test_a_missing_jsonl_file_is_one_line_and_writes_nothing(tmp_path, capsys):
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as exit_info:
        make_shards(["--source", "jsonl", "--jsonl", str(tmp_path / "absent.jsonl"), "--out", str(out)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "absent.jsonl" in err
    assert not out.exists()


def test_input_without_a_good_line_writes_no_shard(tmp_path):
    manifest, _ = run(tmp_path, [b"{not json"])
    assert manifest["num_samples"] == 0 and manifest["shards"] == [] and manifest["skipped"] == {"bad_json": 1}
    assert list((tmp_path / "out").glob("*.tar")) == []
