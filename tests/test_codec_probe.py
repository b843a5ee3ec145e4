"""eval/codec_probe.py: every architecture trains, samples, is judged, and writes its JSON and grid."""

from __future__ import annotations

import json

import pytest
from train_helpers import load_script, make_tiny_vae


@pytest.fixture(scope="module")
def probe():
    return load_script("eval/codec_probe.py")


@pytest.fixture(scope="module")
def vae_dir(tmp_path_factory):
    path = make_tiny_vae(tmp_path_factory.mktemp("probe") / "vae")  # random weights, 8x8x4 latents
    (path / "COMPLETE").write_text("")
    return path


@pytest.mark.parametrize("arch", ["dit", "hybrid", "unet"])
def test_codec_probe_runs_each_architecture(probe, vae_dir, tmp_path, arch):
    out = tmp_path / arch
    probe.main(["--arch", arch, "--vae", str(vae_dir), "--steps", "2", "--eval-every", "2", "--num-data", "64",
                "--num-eval", "12", "--batch", "8", "--width", "32", "--heads", "2", "--layers", "1", "--ch", "8",
                "--patch", "2", "--out", str(out)])
    result = json.loads(out.with_suffix(".json").read_text())
    (row,) = result["log"]
    assert row["step"] == 2 and row["images_seen"] == 16
    assert 0.0 <= row["single_object"] <= row["nothing_extra"] <= 1.0
    assert result["num_params"] > 0 and out.with_suffix(".png").stat().st_size > 0
