"""MMGen as a Hugging Face model: config validation, save/load, Hub push, pretrained backbones, scale basics."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from types import SimpleNamespace
from unittest import mock

import pytest
import torch
from huggingface_hub import HfApi
from modeling_helpers import latents_for, pack, tiny_config
from transformers import AutoModel, AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

import mmgen  # noqa: F401  (registration)
from mmgen.configuration_mmgen import SPECIAL_TOKENS, MMGenConfig
from mmgen.modeling_mmgen import MMGenForConditionalGeneration
from mmgen.objectives import objective_config
from mmgen.target_copies import TargetCopies


def _model(**overrides):
    torch.manual_seed(0)
    return MMGenForConditionalGeneration(tiny_config(**overrides)).eval()


def _inputs(config, seed=0):
    batch, images = pack([[[("t", 4), ("i",), ("t", 3)]], [[("t", 5), ("i",)]]], config,
                         num_noisy_copies=2, seed=seed, with_labels=True)
    lat = latents_for(config, len(images), seed=seed)
    lat.update(target=TargetCopies(0.9 * lat["noisy_latents"], 0.8 * lat["noisy_t"], lat["noisy_s"] / 3))
    return {**batch, **lat}


# ---- config -----------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "overrides, field",
    [
        ({"image_size": 30}, "image_size"),
        ({"patch_size": 3}, "image_size"),  # 32 is not divisible by 4 (VAE) x 3 (patch): names both numbers
        ({"patch_size": 0}, "patch_size"),
        ({"latent_channels": 8}, "latent_channels"),
        ({"image_head": "mlp"}, "image_head"),
        ({"objective_params": {"sigma_data": 1.0}}, "objective_params"),
        ({"latent_std": [1.0, 1.0]}, "latent_std"),
        ({"latent_std": [1.0, 0.0, 1.0, 1.0]}, "latent_std"),
        ({"sigma_data": -0.5}, "sigma_data"),
        ({"boi_token_id": 4000}, "boi_token_id"),
        ({"image_token_id": 4}, "image_token_id"),
        ({"time_embed_dim": 255}, "time_embed_dim"),
    ],
)
def test_bad_config_raises_an_error_naming_the_field(overrides, field):
    with pytest.raises(ValueError, match=field):
        MMGenConfig(**overrides)


@pytest.mark.parametrize(
    "overrides, field",
    [
        ({"objective": "ddpm"}, "objective"),
        ({"objective_params": {"num_particle": 4}}, "objective_params"),
        ({"objective_params": {"time_input": "sideways"}}, "objective_params"),
    ],
)
def test_bad_objective_settings_raise_an_error_naming_the_field_where_they_are_resolved(overrides, field):
    config = MMGenConfig(**overrides)  # the model config stores the objective's settings unread
    with pytest.raises(ValueError, match=field):
        objective_config(config.objective, config.objective_params, sigma_data=config.sigma_data)


def test_the_model_its_config_and_the_processor_import_no_objective_sampler_or_script():
    import subprocess
    import sys

    code = ("import sys, mmgen; print(sorted(m for m in sys.modules if m.startswith(('mmgen.objectives', "
            "'mmgen.sampling', 'mmgen.generation', 'mmgen.training', 'training', 'eval'))))")
    root = str(Path(__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([root, os.environ.get("PYTHONPATH", "")])}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env)
    assert out.stdout.strip() == "[]"


def test_config_geometry_and_roundtrip(tmp_path):
    config = MMGenConfig()
    assert config.latent_size == config.image_size // config.vae_scale_factor
    assert config.num_image_tokens == (config.latent_size // config.patch_size) ** 2
    assert config.text_config.model_type == "llama" and config.text_config.tie_word_embeddings is False
    config.save_pretrained(tmp_path)
    again = MMGenConfig.from_pretrained(tmp_path)
    assert again.to_dict() == config.to_dict()
    resolved = objective_config(again.objective, again.objective_params, sigma_data=again.sigma_data)
    assert resolved.num_particles == 4  # IMMConfig's default reaches the objective


def test_message_names_both_numbers_when_image_size_does_not_divide():
    with pytest.raises(ValueError, match=r"image_size \(36\).*scale factor \(4.*patch_size \(2\)"):
        MMGenConfig(image_size=36)


# ---- save / load ------------------------------------------------------------------------------------
@pytest.mark.parametrize("image_head", ["adaln_mlp", "unet"])
@torch.no_grad()
def test_save_and_from_pretrained_are_bit_exact_in_fp32_with_the_vae(tmp_path, image_head):
    model = _model(image_head=image_head, image_unet_width=16)
    if image_head == "unet":  # zero-initialised last conv: give it weights, so equal outputs mean something
        torch.nn.init.normal_(model.image_head.conv_out.weight, std=0.05)
    model.vae.set_latent_stats(torch.tensor([0.1, -0.2, 0.3, 0.0]), torch.tensor([1.5, 0.5, 2.0, 1.0]))
    inputs = _inputs(model.config)
    ref = model(**inputs, logits_to_keep=0)
    model.save_pretrained(tmp_path)
    files = sorted(os.listdir(tmp_path))
    assert "model.safetensors" in files and not any(f.endswith((".bin", ".pt", ".pth")) for f in files)
    for loader in (MMGenForConditionalGeneration, AutoModel, AutoModelForCausalLM):
        loaded = loader.from_pretrained(tmp_path).eval()
        assert type(loaded) is MMGenForConditionalGeneration
        out = loaded(**inputs)
        assert torch.equal(out.loss, ref.loss)
        assert torch.equal(out.image_outputs, ref.image_outputs) and ref.image_outputs.abs().sum() > 0
        assert torch.equal(out.target_outputs, ref.target_outputs)
        for (name, a), (_, b) in zip(model.vae.state_dict().items(), loaded.vae.state_dict().items()):
            assert torch.equal(a, b), name
        images = torch.rand(1, 3, 32, 32) * 2 - 1
        assert torch.equal(model.vae.decode(model.vae.encode(images)), loaded.vae.decode(loaded.vae.encode(images)))
        assert not any(p.requires_grad for p in loaded.vae.parameters())


def test_push_to_hub_uploads_the_safetensors_checkpoint(tmp_path):
    model = _model()
    uploaded = tmp_path / "uploaded"

    def fake_commit(self, repo_id, operations, **kwargs):
        uploaded.mkdir()
        for op in operations:
            shutil.copy(op.path_or_fileobj, uploaded / op.path_in_repo)
        return SimpleNamespace(commit_url=f"https://hf.co/{repo_id}/commit/0")

    with (
        mock.patch.object(HfApi, "create_repo", autospec=True,
                          side_effect=lambda self, repo_id, **kw: SimpleNamespace(repo_id=repo_id)) as create_repo,
        mock.patch.object(HfApi, "create_commit", autospec=True, side_effect=fake_commit) as create_commit,
    ):
        model.push_to_hub("someone/mmgen-tiny")
    assert create_repo.call_count == 1 and create_commit.call_count == 1
    names = set(os.listdir(uploaded))
    assert {"config.json", "model.safetensors"} <= names
    assert not any(n.endswith(".bin") for n in names)
    loaded = AutoModel.from_pretrained(uploaded)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), loaded.state_dict().values()))


@torch.no_grad()
def test_bfloat16_loading_runs_the_forward(tmp_path):
    model = _model()
    model.save_pretrained(tmp_path)
    bf16 = MMGenForConditionalGeneration.from_pretrained(tmp_path, dtype=torch.bfloat16).eval()
    assert bf16.language_model.lm_head.weight.dtype == torch.bfloat16
    inputs = _inputs(model.config)
    ref, out = model(**inputs), bf16(**inputs)
    assert out.image_outputs.dtype == torch.bfloat16
    assert torch.isfinite(out.loss) and torch.isfinite(out.image_outputs).all()
    torch.testing.assert_close(out.loss.float(), ref.loss, rtol=0.05, atol=0.05)


# ---- pretrained backbone ------------------------------------------------------------------------------
@torch.no_grad()
def test_init_from_pretrained_llama_keeps_its_text_logits(tmp_path):
    torch.manual_seed(1)
    llama_cfg = LlamaConfig(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                            num_attention_heads=4, num_key_value_heads=2, bos_token_id=1, eos_token_id=2,
                            tie_word_embeddings=False)
    llama = LlamaForCausalLM(llama_cfg).eval()
    llama.save_pretrained(tmp_path / "llama")
    model = MMGenForConditionalGeneration.from_pretrained_text_model(str(tmp_path / "llama")).eval()
    old = llama_cfg.vocab_size
    assert [getattr(model.config, f) for f, _ in SPECIAL_TOKENS] == list(range(old, old + len(SPECIAL_TOKENS)))
    assert model.config.pad_token_id == model.config.text_config.vocab_size - 1  # Llama had none: appended
    assert model.get_input_embeddings().weight.shape[0] == model.config.text_config.vocab_size == old + 13
    ids = torch.randint(3, old, (2, 12), generator=torch.Generator().manual_seed(0))
    ours = model(input_ids=ids).logits
    torch.testing.assert_close(ours[..., :old], llama(input_ids=ids).logits, rtol=0, atol=0)
    assert ours.shape[-1] == old + 13
    # LoRA/PEFT targets keep the backbone's names
    names = {n.rsplit(".", 1)[-1] for n, _ in model.named_modules()}
    assert {"q_proj", "k_proj", "v_proj", "o_proj"} <= names
    # and the multimodal forward runs on the resized backbone
    assert model(**_inputs(model.config)).image_outputs is not None


# ---- scale basics -------------------------------------------------------------------------------------
@pytest.mark.filterwarnings("ignore:`gradient_checkpointing_enable` is deprecated:FutureWarning")
def test_gradient_checkpointing_reaches_the_backbone_and_keeps_gradients():
    model = _model().train()
    inputs = _inputs(model.config)
    model(**inputs).loss.backward()
    ref = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    model.gradient_checkpointing_enable()
    assert model.language_model.base_model.gradient_checkpointing
    assert all(layer.gradient_checkpointing for layer in model.language_model.base_model.layers)
    model(**inputs).loss.backward()
    for n, g in ref.items():
        torch.testing.assert_close(model.get_parameter(n).grad, g, rtol=1e-4, atol=1e-6)


def test_estimate_flops_is_6n_plus_attention_per_token():
    model = _model()
    text = model.config.text_config
    n = model.num_parameters() - sum(p.numel() for p in model.vae.parameters())
    n -= model.get_input_embeddings().weight.numel()
    attn = 12 * text.num_hidden_layers * text.hidden_size * 128
    assert model.estimate_flops(1000, 128) == (6 * n + attn) * 1000
    assert model.estimate_flops(1000, 128, training=False) == pytest.approx((6 * n + attn) * 1000 / 3)
    assert model.num_parameters(only_trainable=True) == model.num_parameters() - sum(
        p.numel() for p in model.vae.parameters()
    )


@pytest.mark.parametrize("patch_size", [1, 2])
def test_unet_codec_flops_match_torch_flop_counter(patch_size):
    """The analytic conv FLOPs of the U-Net codec equal what torch counts running it, and estimate_flops
    adds them per image: encoder for clean copies, encoder + decoder (x3 trained, x1 target) otherwise."""
    from torch.utils.flop_counter import FlopCounterMode

    from mmgen.image_embedding import unet_conv_flops

    model = _model(image_head="unet", image_unet_width=16, patch_size=patch_size)
    cfg = model.config
    M, N, D = 3, cfg.num_image_tokens, cfg.text_config.hidden_size
    latents = torch.randn(M, cfg.latent_channels, cfg.latent_size, cfg.latent_size)
    t = torch.full((M,), 500.0)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        tokens, context = model.image_in(latents, t, t)
    conv_ops = lambda c: sum(v for op, v in c.get_flop_counts()["Global"].items() if "convolution" in str(op))
    enc_counted = conv_ops(counter)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        G = model.image_head(tokens, context, torch.randn(M, D))
    assert tokens.shape == (M, N, D) and G.shape == latents.shape
    enc, dec = unet_conv_flops(cfg.latent_channels, cfg.patches_per_side, D, 16, patch_size)
    assert (enc * M, dec * M) == (enc_counted, conv_ops(counter))

    base = model.estimate_flops(1000, 128, image_tokens={"clean": 0, "noisy": 0, "target": 0})
    with_images = model.estimate_flops(1000, 128, image_tokens={"clean": 2 * N, "noisy": N, "target": N})
    per_token = base / 1000  # 6 N + attention
    convs = 3 * 2 * enc + 3 * (enc + dec) + (enc + dec)  # 2 clean images, 1 trained and 1 target copy
    assert with_images - base == pytest.approx(convs - per_token * N * 2 / 3)  # target tokens: forward only
    with pytest.raises(ValueError, match="image_tokens"):
        model.estimate_flops(1000, 128)
