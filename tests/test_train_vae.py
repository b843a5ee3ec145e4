"""Stage 1 (mmgen.training.vae_stage, CLI training/train_vae.py): output layout, latent stats, ensure/atomicity."""

import json

import pytest
import torch
from train_helpers import TINY_STAGE1

from mmgen.training import vae_stage as tv
from mmgen.vae import MMGenVAE

DEAD_PID = 2**22 + 12345  # above Linux's default pid_max: never a live process


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A tiny stage-1 run that starts over a half-written output and a dead run's temp dir."""
    out = tmp_path_factory.mktemp("runs") / "vae"
    out.mkdir()
    (out / "config.json").write_text("{}")  # half-written: no COMPLETE marker
    stale = out.parent / f".tmp-vae-{DEAD_PID}"
    stale.mkdir()
    assert not tv.is_complete(out)
    tv.ensure_vae(out, progress=False, **TINY_STAGE1)
    return out


def test_tiny_run_writes_a_loadable_vae_with_latent_stats(run_dir):
    assert tv.is_complete(run_dir)
    for name in ("config.json", "diffusion_pytorch_model.safetensors", "latent_stats.json", "metrics.json",
                 "train_config.json", "reconstructions.png"):
        assert (run_dir / name).is_file(), name
    stats = json.loads((run_dir / "latent_stats.json").read_text())
    vae = MMGenVAE.load_pretrained(str(run_dir))
    factor = tv.VAETrainConfig().downsample_factor
    assert vae.latent_channels == 4 and vae.downsample_factor == factor
    torch.testing.assert_close(vae.latent_mean, torch.tensor(stats["latents_mean"]))
    torch.testing.assert_close(vae.latent_std, torch.tensor(stats["latents_std"]))
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["latent_shape"] == [4, 32 // factor, 32 // factor]
    assert metrics["num_params"] == sum(p.numel() for p in vae.vae.parameters())
    for split in ("eval_train", "eval_heldout_combos"):
        assert metrics[split]["judge_exact_on_originals"] == 1.0
        for mode in ("mode", "sample"):
            assert 0.0 <= metrics[split][mode]["judge_exact_tol0.5px"] <= 1.0


def test_stats_normalise_heldout_latents_to_sigma_data(run_dir):
    vae = tv.load_vae(run_dir)
    scenes = tv.take(tv.scene_stream("test-heldout", 123, "train"), 64)  # not the stats scenes
    z = vae.encode(tv.render_batch(scenes, 32))  # (B, C, h, w)
    per_channel = z.transpose(0, 1).reshape(z.shape[1], -1)  # (C, B*h*w)
    torch.testing.assert_close(per_channel.std(dim=1), torch.full((4,), 0.5), atol=0.1, rtol=0)
    torch.testing.assert_close(per_channel.mean(dim=1), torch.zeros(4), atol=0.15, rtol=0)
    raw = vae.denormalize(z)  # without the stats the latents are far from sigma_data here
    assert (raw.transpose(0, 1).reshape(4, -1).std(dim=1) - 0.5).abs().max() > 0.1


def test_half_written_output_and_dead_temp_dirs_are_replaced(run_dir):
    assert json.loads((run_dir / "config.json").read_text())["_class_name"] == "AutoencoderKL"
    assert not list(run_dir.parent.glob(".tmp-vae-*"))


def test_ensure_vae_on_a_complete_output_does_nothing(run_dir, monkeypatch):
    before = {p.name: p.stat().st_mtime_ns for p in run_dir.iterdir()}
    monkeypatch.setattr(tv, "train_vae", lambda *a, **k: pytest.fail("stage 1 reran on a complete output"))
    assert tv.ensure_vae(run_dir, **TINY_STAGE1) == run_dir
    assert {p.name: p.stat().st_mtime_ns for p in run_dir.iterdir()} == before


def test_a_run_that_dies_before_the_rename_leaves_nothing_complete(tmp_path, monkeypatch):
    out = tmp_path / "vae"

    def die(*args, **kwargs):
        raise RuntimeError("killed while writing")

    monkeypatch.setattr(tv, "save_grid", die)  # fails after the weights are already in the temp dir
    with pytest.raises(RuntimeError, match="killed while writing"):
        tv.ensure_vae(out, progress=False, **{**TINY_STAGE1, "steps": 1, "num_stats": 8})
    assert not out.exists() and not tv.is_complete(out)
    monkeypatch.setattr(tv, "train_vae", lambda cfg, progress=True: "retrained")
    assert tv.ensure_vae(out) == "retrained"


def test_amplitude_term_is_the_reconstruction_of_the_faded_image():
    """At a = 1 the faded latent is z itself and the faded target is x: the term equals the reconstruction
    loss; with a < 1 it is a different, non-negative term, and weight 0 leaves the loss as it was."""
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    cfg = tv.VAETrainConfig(base_channels=8)
    vae = AutoencoderKL.from_config(cfg.vae_config())
    x = tv.render_batch(tv.take(tv.scene_stream("t", 0), 3), 32)
    plain, diag = tv.vae_loss(vae, x, cfg, torch.Generator().manual_seed(1))
    assert "amplitude" not in diag
    one = tv.VAETrainConfig(base_channels=8, amplitude_weight=1.0, amplitude_min=1.0)
    loss, diag = tv.vae_loss(vae, x, one, torch.Generator().manual_seed(1))
    assert diag["amplitude"] == pytest.approx(diag["l1"] + diag["l2"], rel=1e-5)
    assert loss.item() == pytest.approx(plain.item() + diag["amplitude"], rel=1e-5)
    faded = tv.VAETrainConfig(base_channels=8, amplitude_weight=1.0, amplitude_min=0.3)
    _, diag = tv.vae_loss(vae, x, faded, torch.Generator().manual_seed(1))
    assert diag["amplitude"] > 0 and diag["amplitude"] != pytest.approx(diag["l1"] + diag["l2"], rel=1e-3)


def test_metrics_report_how_much_hue_survives_a_shrunken_latent(run_dir):
    metrics = json.loads((run_dir / "metrics.json").read_text())
    for split in ("eval_train", "eval_heldout_combos"):
        assert 0.0 <= metrics[split]["hue_kept_at_0.6"] <= 1.0


def test_cli_flags_set_the_config_fields_and_a_complete_output_is_not_retrained(run_dir, capsys):
    from train_helpers import load_script

    cli = load_script("training/train_vae.py")
    cfg, force = cli.parse_args(["--out", "x", "--downsample-factor", "4", "--no-bf16", "--force"])
    assert (cfg.out, cfg.downsample_factor, cfg.bf16, force) == ("x", 4, False, True)
    cli.main(["--out", str(run_dir)])
    assert "is complete; nothing to do" in capsys.readouterr().out
