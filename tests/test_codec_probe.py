"""eval/codec_probe.py: every architecture trains, samples, is judged, and writes its JSON and grid."""

from __future__ import annotations

import json

import pytest
from train_helpers import ROOT, load_script, make_tiny_vae

TOKENIZER = str(ROOT / "tokenizers" / "shapes")


@pytest.fixture(scope="module")
def probe():
    return load_script("eval/codec_probe.py")


@pytest.fixture(scope="module")
def vae_dir(tmp_path_factory):
    path = make_tiny_vae(tmp_path_factory.mktemp("probe") / "vae")  # random weights, 8x8x4 latents
    (path / "COMPLETE").write_text("")
    return path


@pytest.mark.parametrize("arch,extra", [("dit", []), ("hybrid", []), ("hybrid", ["--prompt", "text", "--tokenizer", TOKENIZER]),
                                        ("hybrid", ["--prompt", "text", "--tokenizer", TOKENIZER, "--objects", "2"]),
                                        ("hybrid", ["--prompt", "text", "--tokenizer", TOKENIZER, "--grid", "fine"]),
                                        ("unet", [])])
def test_codec_probe_runs_each_architecture(probe, vae_dir, tmp_path, arch, extra):
    out = tmp_path / arch
    probe.main(["--arch", arch, "--vae", str(vae_dir), "--steps", "2", "--eval-every", "2", "--num-data", "64",
                "--num-eval", "12", "--batch", "8", "--width", "32", "--heads", "2", "--layers", "1", "--ch", "8",
                "--patch", "2", "--out", str(out), *extra])
    result = json.loads(out.with_suffix(".json").read_text())
    (row,) = result["log"]
    assert row["step"] == 2 and row["images_seen"] == 16
    task = "two_object" if "--objects" in extra else "single_object"
    assert 0.0 <= row[task] <= row["nothing_extra"] <= 1.0
    assert result["num_params"] > 0 and out.with_suffix(".png").stat().st_size > 0


def test_text_prompts_are_distinct_and_end_at_boi(probe):
    ids = probe.prompt_token_ids(TOKENIZER)
    assert ids.shape[0] == probe.NULL + 1 and len({tuple(r.tolist()) for r in ids}) == ids.shape[0]
    assert (ids[:, -1] == 4).all() and ids[-1, :-1].eq(0).all()  # <|boi|> last; the null prompt is only it


def test_two_object_prompts_name_both_objects_in_scene_order(probe):
    texts = probe.prompt_texts(2)
    assert len(texts) == probe.num_classes(2) == 24 * 24 + 1 and len(set(texts)) == len(texts)
    red_circle, blue_square = probe.class_of("red", "circle"), probe.class_of("blue", "square")
    assert texts[probe.class_of_pairs([("red", "circle"), ("blue", "square")])] == \
        "Draw a red circle and a blue square.<|boi|>" == texts[red_circle * 24 + blue_square]
    assert texts[probe.class_of_pairs([("red", "circle")] * 2)] == "Draw two red circles.<|boi|>"
    ids = probe.prompt_token_ids(TOKENIZER, objects=2)
    assert ids.shape[0] == len(texts) and len({tuple(r.tolist()) for r in ids}) == len(texts)
