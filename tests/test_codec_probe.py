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
                                        ("unet", [])])
def test_codec_probe_runs_each_architecture(probe, vae_dir, tmp_path, arch, extra):
    out = tmp_path / arch
    probe.main(["--arch", arch, "--vae", str(vae_dir), "--steps", "2", "--eval-every", "2", "--num-data", "64",
                "--num-eval", "12", "--batch", "8", "--width", "32", "--heads", "2", "--layers", "1", "--ch", "8",
                "--patch", "2", "--out", str(out), *extra])
    result = json.loads(out.with_suffix(".json").read_text())
    (row,) = result["log"]
    assert row["step"] == 2 and row["images_seen"] == 16
    assert 0.0 <= row["single_object"] <= row["nothing_extra"] <= 1.0
    assert result["num_params"] > 0 and out.with_suffix(".png").stat().st_size > 0


def test_text_prompts_are_distinct_and_end_at_boi(probe):
    ids = probe.prompt_token_ids(TOKENIZER)
    assert ids.shape[0] == probe.NULL + 1 and len({tuple(r.tolist()) for r in ids}) == ids.shape[0]
    assert (ids[:, -1] == 4).all() and ids[-1, :-1].eq(0).all()  # <|boi|> last; the null prompt is only it
