"""Specification tests for mmgen.vae (tiny AutoencoderKL built offline)."""

import pytest
import torch

from mmgen.vae import MMGenVAE, tiny_vae_config


@pytest.fixture(scope="module")
def vae():
    torch.manual_seed(0)
    return MMGenVAE.from_config(tiny_vae_config())


def images(n=4, size=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, size, size, generator=g) * 2 - 1


def test_tiny_config_is_small_and_has_expected_geometry(vae):
    n = sum(p.numel() for p in vae.parameters())
    assert 100_000 <= n <= 1_000_000
    assert vae.downsample_factor == 4 and vae.latent_channels == 4
    big = MMGenVAE.from_config(tiny_vae_config(downsample_factor=8, latent_channels=8))
    assert big.downsample_factor == 8 and big.latent_channels == 8


def test_round_trip_shapes_and_range(vae):
    z = vae.encode(images())
    assert z.shape == (4, 4, 8, 8) and z.dtype == torch.float32
    x = vae.decode(z)
    assert x.shape == (4, 3, 32, 32)
    assert x.min() >= -1 and x.max() <= 1
    assert vae.decode(torch.zeros(2, 4, 4, 6)).shape == (2, 3, 16, 24)  # non-square works


def test_normalize_and_denormalize_are_inverse(vae):
    z = torch.randn(2, 4, 8, 8)
    torch.testing.assert_close(vae.denormalize(vae.normalize(z)), z)


def test_normalised_latents_have_std_sigma_data_on_the_stats_data():
    vae = MMGenVAE.from_config(tiny_vae_config())
    data = [images(4, seed=s) for s in range(3)]
    mean, std = vae.compute_latent_stats(data)
    assert mean.shape == std.shape == (4,)
    vae.set_latent_stats(mean, std)
    z = torch.cat([vae.encode(x) for x in data])  # (12, 4, 8, 8)
    per_channel = z.transpose(0, 1).reshape(4, -1)  # (C, N)
    torch.testing.assert_close(per_channel.std(dim=1, unbiased=False), torch.full((4,), 0.5), atol=1e-4, rtol=0)
    torch.testing.assert_close(per_channel.mean(dim=1), torch.zeros(4), atol=1e-4, rtol=0)


def test_default_stats_follow_the_vae_scaling_factor(vae):
    assert torch.allclose(vae.latent_std, torch.full((4,), 1 / 0.18215))
    assert torch.equal(vae.latent_mean, torch.zeros(4))


def test_sample_uses_generator_and_mode_is_deterministic(vae):
    x = images(2)
    assert torch.equal(vae.encode(x), vae.encode(x))
    a = vae.encode(x, sample=True, generator=torch.Generator().manual_seed(1))
    b = vae.encode(x, sample=True, generator=torch.Generator().manual_seed(1))
    c = vae.encode(x, sample=True, generator=torch.Generator().manual_seed(2))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_vae_is_frozen_and_stays_in_eval(vae):
    assert not any(p.requires_grad for p in vae.parameters())
    parent = torch.nn.Sequential(vae)
    parent.train()
    assert not vae.vae.training
    x = images(2).requires_grad_(True)
    z = vae.encode(x)
    assert not z.requires_grad and z.grad_fn is None
    assert not vae.decode(z).requires_grad


def test_stats_are_buffers_in_the_state_dict(vae):
    sd = vae.state_dict()
    assert "latent_mean" in sd and "latent_std" in sd
    assert any(k.startswith("vae.encoder.") for k in sd)


def test_save_pretrained_then_load_pretrained_gives_identical_outputs(tmp_path, vae):
    vae.vae.save_pretrained(tmp_path / "tiny_vae")
    loaded = MMGenVAE.load_pretrained(str(tmp_path / "tiny_vae"))
    x = images(2, seed=3)
    assert torch.equal(loaded.encode(x), vae.encode(x))
    z = vae.encode(x)
    assert torch.equal(loaded.decode(z), vae.decode(z))
    assert not any(p.requires_grad for p in loaded.parameters())


def test_config_dict_rebuilds_the_same_architecture(vae):
    cfg = vae.config_dict()
    import json

    json.dumps(cfg)  # serialisable for MMGenConfig.vae_config
    clone = MMGenVAE.from_config(cfg)
    clone.load_state_dict(vae.state_dict())
    x = images(1)
    assert torch.equal(clone.encode(x), vae.encode(x))


def test_wrong_channels_raise(vae):
    with pytest.raises(ValueError, match="in_channels=3"):
        vae.encode(torch.zeros(1, 1, 32, 32))
    with pytest.raises(ValueError, match="latent_channels=4"):
        vae.decode(torch.zeros(1, 3, 8, 8))


def test_values_outside_unit_range_raise(vae):
    with pytest.raises(ValueError, match=r"\[-1, 1\]"):
        vae.encode(images() * 255)
    vae.encode(images().clamp(-1, 1) * (1 + 1e-4))  # within tolerance: fine


def test_size_not_divisible_by_factor_raises(vae):
    with pytest.raises(ValueError, match="downsample_factor=4"):
        vae.encode(torch.zeros(1, 3, 30, 32))


def test_bad_stats_and_configs_raise(vae):
    with pytest.raises(ValueError, match="latent_std"):
        vae.set_latent_stats(torch.zeros(4), torch.zeros(4))
    with pytest.raises(ValueError, match="latent_mean"):
        vae.set_latent_stats(torch.zeros(3), torch.ones(3))
    with pytest.raises(ValueError, match="downsample_factor"):
        tiny_vae_config(downsample_factor=3)
    with pytest.raises(ValueError, match="image_size"):
        tiny_vae_config(image_size=30)
    with pytest.raises(ValueError, match="images is empty"):
        vae.compute_latent_stats([])
