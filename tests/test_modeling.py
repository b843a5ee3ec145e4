"""Behaviour of the MMGen forward: who sees what, the text loss, and the cached image step."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from modeling_helpers import latents_for, pack, tiny_config

from mmgen.masks import TokenKind
from mmgen.modeling_mmgen import MMGenForConditionalGeneration
from mmgen.target_copies import TargetCopies


@pytest.fixture(scope="module", params=["linear", "unet", "adaln_prompt"])
def model(request):
    """Every behaviour below holds for each image codec: linear patches, the U-Net (Transfusion-style), and
    linear patches with the prompt-reading adaLN head."""
    torch.manual_seed(0)
    extra = {"image_unet_width": 16} if request.param == "unet" else {}
    model = MMGenForConditionalGeneration(tiny_config(image_head=request.param, **extra)).eval()
    if request.param == "unet":  # its last conv starts at zero (G = 0): give it weights to test with
        torch.nn.init.normal_(model.image_head.conv_out.weight, std=0.05)
    if request.param == "adaln_prompt":  # its prompt projection starts at zero: give it weights to test with
        torch.nn.init.normal_(model.image_head.prompt_proj.weight, std=0.2)
    return model


def _visible(batch):
    kind = batch["token_kind"]
    return (kind == TokenKind.TEXT) | (kind == TokenKind.IMAGE_CLEAN)


@torch.no_grad()
def test_noisy_copy_is_invisible_to_text_and_clean_tokens(model):
    batch, images = pack([[[("t", 5), ("i",), ("t", 4)]]], model.config)
    lat = latents_for(model.config, len(images))
    out = model(**batch, **lat)
    perturbed = dict(lat, noisy_latents=lat["noisy_latents"] + torch.randn_like(lat["noisy_latents"]))
    out2 = model(**batch, **perturbed)
    vis = _visible(batch)
    assert torch.equal(out.last_hidden_state[vis], out2.last_hidden_state[vis])
    text = batch["token_kind"] == TokenKind.TEXT
    assert torch.equal(out.logits[text], out2.logits[text])
    assert not torch.allclose(out.image_outputs, out2.image_outputs)  # the copy itself did change


@torch.no_grad()
def test_clean_copy_changes_the_text_after_it(model):
    batch, images = pack([[[("t", 5), ("i",), ("t", 4)]]], model.config)
    lat = latents_for(model.config, len(images))
    out = model(**batch, **lat)
    out2 = model(**batch, **dict(lat, clean_latents=lat["clean_latents"] + 0.5))
    text = batch["token_kind"][0] == TokenKind.TEXT
    boi = images[0][1]
    before = text.clone()
    before[boi + 1 :] = False
    after = text.clone()
    after[: boi + 1] = False
    assert torch.equal(out.logits[0, before], out2.logits[0, before])  # causal: text before is untouched
    assert (out.logits[0, after] - out2.logits[0, after]).abs().max() > 1e-4


@torch.no_grad()
def test_packed_document_2_is_unaffected_by_document_1(model):
    rows_a = [[[("t", 4), ("i",), ("t", 3)], [("t", 6)]]]
    batch, images = pack(rows_a, model.config, seed=0)
    lat = latents_for(model.config, len(images))
    doc2 = batch["document_ids"] == 1
    other, _ = pack(rows_a, model.config, seed=1)  # different text ids everywhere
    mixed = {k: v.clone() for k, v in batch.items()}
    mixed["input_ids"][~doc2] = other["input_ids"][~doc2]  # change only document 1's text
    out = model(**batch, **lat)
    out2 = model(**mixed, **dict(lat, clean_latents=-lat["clean_latents"], noisy_latents=-lat["noisy_latents"]))
    assert torch.equal(out.last_hidden_state[doc2], out2.last_hidden_state[doc2])
    assert not torch.allclose(out.last_hidden_state[~doc2 & _visible(batch)],
                              out2.last_hidden_state[~doc2 & _visible(batch)])


@torch.no_grad()
def test_unconditional_copy_is_unaffected_by_text_before_its_boi(model):
    rows = [[[("t", 6), ("i",), ("t", 2)]]]
    batch, images = pack(rows, model.config, seed=0)
    other, _ = pack(rows, model.config, seed=3)
    lat = latents_for(model.config, len(images))
    uncond = torch.tensor([True])
    out = model(**batch, **lat, image_uncond=uncond)
    out2 = model(**other, **lat, image_uncond=uncond)
    torch.testing.assert_close(out.image_outputs, out2.image_outputs, rtol=0, atol=1e-6)
    cond = model(**batch, **lat, image_uncond=~uncond).image_outputs
    cond2 = model(**other, **lat, image_uncond=~uncond).image_outputs
    assert (cond - cond2).abs().max() > 1e-4  # the conditional copy does read the prompt
    # the null context does not change what text and clean tokens compute
    assert torch.equal(out.last_hidden_state[_visible(batch)],
                       model(**batch, **lat).last_hidden_state[_visible(batch)])


@torch.no_grad()
def test_image_step_on_cache_equals_full_forward_for_several_steps(model):
    cfg = model.config
    batch, images = pack([[[("t", 7), ("i",)]]], cfg)
    _, boi, image_position = images[0]
    lat = latents_for(cfg, 1)
    prefix = model(input_ids=batch["input_ids"][:, : boi + 1], use_cache=True).cache
    length = prefix.get_seq_length()
    assert length == boi + 1
    # Full-forward reference: the prefix, then only the student copy (no clean copy in the row).
    keep = (batch["token_kind"][0] != TokenKind.IMAGE_CLEAN)
    keep[boi + 1 :] &= batch["token_kind"][0, boi + 1 :] == TokenKind.IMAGE_NOISY
    row = {k: v[:, keep] for k, v in batch.items()}
    row["prefix_end"] = torch.where(row["prefix_end"] >= 0, boi, -1)
    g = torch.Generator().manual_seed(1)
    for step in range(3):
        x_in = torch.randn(lat["noisy_latents"].shape, generator=g)
        t_in, s_in = torch.tensor([900.0 - 300 * step]), torch.tensor([150.0 * (step + 1)])
        full = model(**row, noisy_latents=x_in, noisy_t=t_in, noisy_s=s_in).image_outputs
        cached = model.image_step(prefix, x_in, t_in, s_in, image_position=image_position)
        torch.testing.assert_close(cached, full, rtol=1e-4, atol=1e-5)
        assert prefix.get_seq_length() == length


@torch.no_grad()
def test_unconditional_image_step_on_null_cache_equals_training_forward(model):
    cfg = model.config
    batch, images = pack([[[("t", 5), ("i",)]]], cfg)
    image_position = images[0][2]
    lat = latents_for(cfg, 1)
    full = model(**batch, **lat, image_uncond=torch.tensor([True])).image_outputs
    null = model.null_context_cache(1, boi_position=image_position - 1)
    step = model.image_step(null, lat["noisy_latents"], lat["noisy_t"], lat["noisy_s"],
                            image_position=image_position)
    torch.testing.assert_close(step, full, rtol=1e-4, atol=1e-5)
    assert null.get_seq_length() == 1


@torch.no_grad()
def test_append_clean_image_then_text_equals_full_forward(model):
    cfg = model.config
    batch, images = pack([[[("t", 4), ("i",), ("t", 3)]]], cfg, num_noisy_copies=0)
    _, boi, image_position = images[0]
    lat = latents_for(cfg, 1)
    full = model(**batch, clean_latents=lat["clean_latents"])
    cache = model(input_ids=batch["input_ids"][:, : boi + 1], use_cache=True).cache
    model.append_clean_image(cache, lat["clean_latents"], image_position=image_position)
    N = cfg.num_image_tokens
    assert cache.get_seq_length() == boi + 1 + N
    rest = slice(boi + 1 + N, batch["input_ids"].shape[1])
    out = model(input_ids=batch["input_ids"][:, rest], position_ids=batch["position_ids"][:, rest], cache=cache)
    torch.testing.assert_close(out.logits, full.logits[:, rest], rtol=1e-4, atol=1e-5)


def test_text_loss_is_mean_ce_over_text_labels_only(model):
    batch, images = pack([[[("t", 5), ("i",), ("t", 4)], [("t", 3)]]], model.config, with_labels=True)
    labels = batch.pop("labels")
    lat = latents_for(model.config, len(images))
    out = model(**batch, **lat)
    loss = model(**batch, **lat, labels=labels).loss
    labels, kind, doc = labels[0], batch["token_kind"][0], batch["document_ids"][0]
    terms = []
    for i in range(len(labels) - 1):
        if labels[i + 1] != -100 and kind[i] == TokenKind.TEXT and doc[i] == doc[i + 1]:
            terms.append(torch.nn.functional.cross_entropy(out.logits[0, i], labels[i + 1]))
    assert len(terms) == (5 - 1) + 1 + 1 + (4 - 1) + (3 - 1)  # text->text, ->boi, eoi->text; per document
    torch.testing.assert_close(loss, torch.stack(terms).mean(), rtol=1e-5, atol=1e-6)


@torch.no_grad()
def test_eager_and_sdpa_agree():
    torch.manual_seed(0)
    sdpa = MMGenForConditionalGeneration(tiny_config()).eval()
    eager = MMGenForConditionalGeneration(tiny_config(attn_implementation="eager")).eval()
    eager.load_state_dict(sdpa.state_dict())
    assert eager.language_model.config._attn_implementation == "eager"
    batch, images = pack([[[("t", 3), ("i",), ("t", 2)]], [[("t", 6)], [("t", 2), ("i",)]]], sdpa.config,
                         num_noisy_copies=2)
    lat = latents_for(sdpa.config, len(images))
    lat.update(target=TargetCopies(lat["noisy_latents"] * 0.5, lat["noisy_t"], lat["noisy_s"] / 2))
    a, b = sdpa(**batch, **lat), eager(**batch, **lat)
    for name in ("logits", "image_outputs", "target_outputs"):
        torch.testing.assert_close(a[name], b[name], rtol=1e-4, atol=1e-5)


@pytest.mark.slow
@torch.no_grad()
def test_sdpa_and_flex_attention_forward_agree():
    torch.manual_seed(0)
    sdpa = MMGenForConditionalGeneration(tiny_config()).eval()
    flex = MMGenForConditionalGeneration(tiny_config(attn_implementation="flex_attention")).eval()
    flex.load_state_dict(sdpa.state_dict())
    batch, images = pack([[[("t", 3), ("i",), ("t", 2)]], [[("t", 6)], [("t", 2), ("i",)]]], sdpa.config)
    lat = latents_for(sdpa.config, len(images))
    a, b = sdpa(**batch, **lat), flex(**batch, **lat)
    torch.testing.assert_close(a.image_outputs, b.image_outputs, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(a.logits, b.logits, rtol=1e-4, atol=1e-5)
    # no target pass over a cache with FlexAttention (it crashed on CPU): the trainer falls back to a full pass
    assert flex(**batch, **lat, return_target_prefix=True).target_prefix is None


@torch.no_grad()
def test_generate_with_cache_equals_greedy_without_cache(model):
    prompt = torch.tensor([[2, 40, 41, 99, 123, 7, 300]])
    generated = model.generate(prompt, max_new_tokens=8, do_sample=False, use_cache=True)
    ids = prompt
    for _ in range(8):  # greedy decoding, recomputing the whole sequence every step
        next_id = model(input_ids=ids, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)
        ids = torch.cat([ids, next_id], dim=1)
    assert torch.equal(generated[:, : ids.shape[1]], ids)


def test_imm_loss_trains_through_the_model(model):
    from mmgen.objectives import get_objective

    loss_fn, _ = get_objective("imm", num_particles=2, p_uncond=0.0)  # no drop_cond: no guidance dropout
    batch, images = pack([[[("t", 3), ("i",)]], [[("t", 4), ("i",)]]], model.config)
    lat = latents_for(model.config, len(images))
    cond = {**batch, "clean_latents": lat["clean_latents"]}

    def net(x_in, t_in, s_in, c):
        return model(**c, noisy_latents=x_in, noisy_t=t_in.float(), noisy_s=s_in.float()).image_outputs

    loss, _ = loss_fn(net, lat["clean_latents"], cond, generator=torch.Generator().manual_seed(0))
    model.zero_grad()
    loss.backward()
    assert torch.isfinite(loss)
    first = model.image_in.conv_in if model.config.image_head == "unet" else model.image_in.proj
    assert first.weight.grad.abs().sum() > 0
    assert model.language_model.base_model.layers[0].self_attn.q_proj.weight.grad.abs().sum() > 0
    model.zero_grad()


@torch.no_grad()
@pytest.mark.parametrize("dropped", [False, True])
def test_target_copies_over_the_student_prefix_equal_a_full_target_forward(model, dropped):
    """IMM's target pass run over the student pass's keys/values (only the target tokens) gives what a
    second full forward gives, with several documents and images per row, rows of different image counts,
    and copies dropped to the null context (the target of a dropped image reads the same null <|boi|> as
    its student, as a full forward with the same image_uncond does)."""
    rows = [[[("t", 3), ("i",), ("t", 2), ("i",)], [("t", 5), ("i",)]], [[("t", 4), ("i",), ("t", 3)]]]
    batch, images = pack(rows, model.config)
    lat = latents_for(model.config, len(images))
    target = latents_for(model.config, len(images), seed=1)  # x_r with its own times
    uncond = torch.tensor([True, False, True, False]) if dropped else torch.zeros(len(images), dtype=torch.bool)
    student = model(**batch, **lat, image_uncond=uncond, return_target_prefix=True)
    copies = TargetCopies(target["noisy_latents"], target["noisy_t"], target["noisy_s"], prefix=student.target_prefix)
    fused = model(**batch, clean_latents=lat["clean_latents"], target=copies, image_uncond=uncond)
    full = model(**batch, clean_latents=lat["clean_latents"], noisy_latents=target["noisy_latents"],
                 noisy_t=target["noisy_t"], noisy_s=target["noisy_s"], image_uncond=uncond).image_outputs
    torch.testing.assert_close(fused.target_outputs, full, rtol=1e-4, atol=1e-5)
    if dropped:  # the null context is not the prompt: a dropped image's target differs from its conditional one
        conditional = model(**batch, clean_latents=lat["clean_latents"], noisy_latents=target["noisy_latents"],
                            noisy_t=target["noisy_t"], noisy_s=target["noisy_s"]).image_outputs
        assert (conditional[0] - fused.target_outputs[0]).abs().max() > 1e-4
        torch.testing.assert_close(conditional[1], fused.target_outputs[1], rtol=1e-4, atol=1e-5)
        with pytest.raises(ValueError, match="image_uncond differs"):
            model(**batch, clean_latents=lat["clean_latents"], target=copies)
    # and it is the target's own input that it reads: other x_r, other outputs
    other = model(**batch, clean_latents=lat["clean_latents"], image_uncond=uncond,
                  target=dataclasses.replace(copies, latents=-target["noisy_latents"]))
    assert (other.target_outputs - fused.target_outputs).abs().max() > 1e-4
    # the packed rows with the target copies inside (num_noisy_copies=2) agree too
    both, _ = pack(rows, model.config, num_noisy_copies=2)
    inline = model(**both, **lat, target=dataclasses.replace(copies, prefix=None), image_uncond=uncond).target_outputs
    torch.testing.assert_close(fused.target_outputs, inline, rtol=1e-4, atol=1e-5)


class _FixedLatents:
    """Stands in for the VAE: `compute_losses` encodes the batch's images; here they are given latents."""

    def __init__(self, latents):
        self.latents = latents

    def encode(self, images):
        return self.latents


def test_training_step_with_the_prefix_target_pass_equals_the_full_one(model):
    """compute_losses: the same loss and the same gradients whether IMM's target branch is a second full
    forward or runs over the student's keys/values (with flow-matching groups and CFG dropout drawn)."""
    from mmgen.objectives import get_objective
    from mmgen.training.step import compute_losses

    rows = [[[("t", 3), ("i",), ("t", 2), ("i",)], [("t", 5), ("i",)]], [[("t", 4), ("i",), ("t", 3)]]]
    batch, images = pack(rows, model.config, with_labels=True)
    batch["image_uncond"] = torch.zeros(len(images), dtype=torch.bool)
    batch["images"] = torch.zeros(len(images), 3, 8, 8)
    vae = _FixedLatents(latents_for(model.config, len(images))["clean_latents"])
    loss_fn, _ = get_objective("imm", num_particles=2, p_uncond=0.5, fm_fraction=0.5)
    results, calls = {}, []
    spy = model.register_forward_pre_hook(lambda m, args, kwargs: calls.append(getattr(kwargs.get("target"), "prefix", None)),
                                          with_kwargs=True)
    model.train()
    try:
        for target_pass in ("full", "prefix"):
            model.zero_grad()
            calls.clear()
            losses = compute_losses(model, vae, batch, loss_fn=loss_fn, lambda_img=10.0,
                                    generator=torch.Generator().manual_seed(0), device=torch.device("cpu"),
                                    target_pass=target_pass)
            losses.loss.backward()
            grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
            results[target_pass] = (losses, grads)
            # two calls each; with "prefix" the second one runs over the first one's keys/values
            assert [c is not None for c in calls] == [False, target_pass == "prefix"]
    finally:
        spy.remove()
        model.eval()
    (full, g_full), (fused, g_fused) = results["full"], results["prefix"]
    assert full.image > 0 and full.diagnostics["frac_fm_groups"] < 1  # an IMM group is in the loss
    torch.testing.assert_close(fused.image, full.image, rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(fused.text, full.text, rtol=0, atol=0)
    assert g_full.keys() == g_fused.keys()
    for name in g_full:
        torch.testing.assert_close(g_fused[name], g_full[name], rtol=1e-3, atol=1e-6, msg=name)


@torch.no_grad()
def test_adaln_prompt_head_starts_as_the_time_only_head_and_then_reads_the_prompt():
    torch.manual_seed(0)
    model = MMGenForConditionalGeneration(tiny_config(image_head="adaln_prompt")).eval()
    head = model.image_head
    assert not head.prompt_proj.weight.any() and not head.prompt_proj.bias.any()  # zero at init
    unet = MMGenForConditionalGeneration(tiny_config(image_head="unet", image_unet_width=16))
    assert not unet.image_head.conv_out.weight.any()  # and the U-Net's last conv: G starts at zero
    M, N, D = 2, model.config.num_image_tokens, model.config.text_config.hidden_size
    hidden, cond = torch.randn(M, N, D), torch.randn(M, N, D)
    prompts = torch.randn(2, M, D)
    time_only = [head(hidden, cond, prompt=p) for p in prompts]
    torch.testing.assert_close(time_only[0], time_only[1], rtol=0, atol=0)
    torch.nn.init.normal_(head.prompt_proj.weight, std=0.2)
    read = [head(hidden, cond, prompt=p) for p in prompts]
    assert (read[0] - read[1]).abs().mean() > 1e-3  # same image tokens, another prompt: another output
    with pytest.raises(ValueError, match="prompt state"):
        head(hidden, cond)
