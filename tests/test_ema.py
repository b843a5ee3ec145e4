"""EMA weights: the update rule, and that they follow the model to its device."""

import torch

from mmgen.training.ema import EMA


def test_update_is_a_lerp_with_the_warmed_up_decay_and_swap_restores_live_weights():
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    ema = EMA(model, decay=0.9)
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    d = ema.current_decay()  # (1 + 0) / (10 + 0) = 0.1 on the first update
    ema.update(model)
    for name, p in model.named_parameters():
        torch.testing.assert_close(ema.shadow[name], d * start[name] + (1 - d) * p.detach())
    live = {n: p.detach().clone() for n, p in model.named_parameters()}
    with ema.swapped_into(model):
        torch.testing.assert_close(model.weight, ema.shadow["weight"])
    torch.testing.assert_close(model.weight, live["weight"])


def test_shadow_follows_a_model_moved_after_the_ema_was_built(tmp_path):
    # train.py builds the EMA before accelerate moves the model to the GPU (a device mismatch that only
    # showed on an H200); the meta device stands in for the GPU here.
    model = torch.nn.Linear(4, 3)
    ema = EMA(model)
    model.to("meta")
    ema.update(model)
    assert ema.shadow["weight"].device.type == "meta"
    cpu_model = torch.nn.Linear(4, 3)
    ema2 = EMA(cpu_model)
    ema2.update(cpu_model)
    ema2.save(tmp_path / "ema.safetensors")
    ema3 = EMA(torch.nn.Linear(4, 3))
    ema3.load(tmp_path / "ema.safetensors")
    torch.testing.assert_close(ema3.shadow["weight"], ema2.shadow["weight"])


def test_decay_warms_up_as_one_plus_n_over_ten_plus_n_then_holds_and_resumes_where_it_stopped(tmp_path):
    """The docstring's warm-up, min(decay, (1 + n) / (10 + n)) with n updates done, followed by hand: with
    decay 0.5 the cap is reached at n = 8 (9 / 18). A reloaded EMA continues the warm-up from its count."""
    decays = [1 / 10, 2 / 11, 3 / 12, 4 / 13, 5 / 14, 6 / 15, 7 / 16, 8 / 17, 0.5, 0.5, 0.5]
    values = [float(v) for v in (3, -1, 4, 1, -5, 9, 2, -6, 5, 3, -5)]  # the live weight before each update
    model = torch.nn.Linear(1, 1, bias=False)
    with torch.no_grad():
        model.weight.fill_(2.0)
    ema, expected = EMA(model, decay=0.5), 2.0
    for n, (d, v) in enumerate(zip(decays, values)):
        if n == 4:  # a resumed run: a new EMA loaded from the saved one
            ema.save(tmp_path / "ema.safetensors")
            ema = EMA(model, decay=0.5)
            ema.load(tmp_path / "ema.safetensors")
        with torch.no_grad():
            model.weight.fill_(v)
        ema.update(model)
        expected = d * expected + (1 - d) * v
        torch.testing.assert_close(ema.shadow["weight"], torch.full((1, 1), expected), rtol=1e-6, atol=0.0,
                                   msg=f"update {n}")
