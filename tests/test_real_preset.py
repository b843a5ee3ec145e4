"""configs/real_256.yaml end to end, offline: random-weight stand-ins of the architectures it names (a diffusers
AutoencoderKL with the SD-VAE config, 4 channels and factor 8, and a 16-channel one; a Llama-shaped LM at
reduced depth), shards on disk, 20 training steps, the export reloaded and one chat turn.

Reduced so it runs on CPU in seconds: 64 px instead of 256 (the VAE's factor 8 gives 8x8 latents, 16 image
tokens), narrow VAE blocks, rows of 160 tokens, batch 2, fp32.
"""

from __future__ import annotations

import pytest
import torch
from test_pretrained_lm import lm_dir  # noqa: F401  (the fixture: a tiny Llama with a Qwen-style tokenizer)
from train_helpers import ROOT, launch

from mmgen.generation import GeneratedImage, generate_interleaved

PRESET = ROOT / "configs" / "real_256.yaml"
# stabilityai/sd-vae-ft-ema's config.json with narrow blocks (128, 256, 512, 512 there) and one layer per
# block (2 there); a 16-channel VAE as FLUX's: no quant convs, its scaling and shift
SD_VAE = {"in_channels": 3, "out_channels": 3, "latent_channels": 4, "act_fn": "silu", "layers_per_block": 1,
          "block_out_channels": [8, 8, 16, 16], "norm_num_groups": 8, "sample_size": 64,
          "scaling_factor": 0.18215, "down_block_types": ["DownEncoderBlock2D"] * 4,
          "up_block_types": ["UpDecoderBlock2D"] * 4}  # fmt: skip
VAE_16 = {**SD_VAE, "latent_channels": 16, "scaling_factor": 0.3611, "shift_factor": 0.1159,
          "use_quant_conv": False, "use_post_quant_conv": False}


@pytest.mark.parametrize("vae_config", [SD_VAE, VAE_16], ids=["sd_vae_4ch", "vae_16ch"])
def test_the_real_preset_trains_exports_reloads_and_chats_with_stand_in_weights(lm_dir, tmp_path, vae_config):  # noqa: F811
    from diffusers import AutoencoderKL
    from transformers import AutoModel, AutoProcessor

    import mmgen  # noqa: F401  (registers the Auto classes)
    from mmgen.training.data import ensure_shapes_shards

    lm, _ = lm_dir
    torch.manual_seed(0)
    AutoencoderKL(**vae_config).save_pretrained(tmp_path / "vae")
    shards = ensure_shapes_shards(tmp_path / "shards", num_docs=60, resolution=64, seed=0, samples_per_shard=30)
    launch(["--config", str(PRESET), "--model.init_text_model", str(lm), "--model.vae", str(tmp_path / "vae"),
            "--data.shards", f"{shards}/train-*.tar", "--model.image_size", "64", "--data.seq_len", "160",
            "--data.batch_size", "2", "--data.num_workers", "0", "--data.prefetch", "0",
            "--optim.max_steps", "20", "--optim.warmup_steps", "2", "--run.mixed_precision", '"no"',
            "--run.cpu_threads", "1", "--run.log_every", "5", "--run.checkpoint_every", "20", "--run.sample_every", "0",
            "--run.tracker", "none", "--run.output_dir", str(tmp_path), "--eval.at_end", "false"])  # fmt: skip
    final = tmp_path / "real_256" / "final"
    model, processor = AutoModel.from_pretrained(final).eval(), AutoProcessor.from_pretrained(final)
    assert model.config.latent_channels == vae_config["latent_channels"]
    assert model.config.num_image_tokens == 16  # (64 px / 8 / patch 2)^2
    assert model.config.text_config.hidden_size == 48  # the LM's
    parts = list(generate_interleaved(model, processor, [{"role": "user", "content": "Draw a red circle."}],
                                      max_new_tokens=4, num_steps=1, force_image=True))  # fmt: skip
    images = [p for p in parts if isinstance(p, GeneratedImage)]
    assert len(images) == 1 and images[0].image.size == (64, 64)
