"""The interleaved generation engine: cached image steps equal a full recompute, call counts,
per-row seeds, cached greedy text equals uncached greedy, stopping."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from modeling_helpers import tiny_config
from PIL import Image

from mmgen import generation as G
from mmgen.layout import MODEL_INPUT_KEYS, TokenKind
from mmgen.modeling_mmgen import MMGenForConditionalGeneration
from mmgen.processing_mmgen import MMGenProcessor
from mmgen.tokenization import load_tokenizer

TOKENIZER = Path(__file__).resolve().parents[1] / "tokenizers" / "shapes"


@pytest.fixture(scope="module", params=["linear", "unet", "adaln_prompt"])
def model(request):
    torch.manual_seed(0)
    extra = {"image_unet_width": 16} if request.param == "unet" else {}
    model = MMGenForConditionalGeneration(tiny_config(image_head=request.param, **extra)).eval()
    if request.param == "unet":  # its last conv starts at zero (G = 0): give it weights to test with
        torch.nn.init.normal_(model.image_head.conv_out.weight, std=0.05)
    if request.param == "adaln_prompt":  # its prompt projection starts at zero: give it weights to test with
        torch.nn.init.normal_(model.image_head.prompt_proj.weight, std=0.2)
    return model


@pytest.fixture(scope="module")
def processor(model):
    return MMGenProcessor.from_config(model.config, load_tokenizer(str(TOKENIZER)))


def _picture(colour=(200, 30, 30)):
    im = Image.new("RGB", (32, 32), (255, 255, 255))
    im.paste(colour, (6, 8, 20, 24))
    return im


def _parts(gen):
    parts = list(gen)
    by_row = {}
    for p in parts:
        by_row.setdefault(p.row, []).append(p)
    return parts, by_row


class CallLog:
    """Records (batch, tokens) of every backbone call."""

    def __init__(self, model):
        self.calls = []
        self.handle = model.backbone.register_forward_pre_hook(self._hook, with_kwargs=True)

    def _hook(self, module, args, kwargs):
        x = kwargs.get("inputs_embeds")
        x = kwargs["input_ids"] if x is None else x
        self.calls.append(tuple(x.shape[:2]))

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.handle.remove()


# ------------------------------------------------------------------------------------- image equivalence


@pytest.mark.parametrize("num_steps,guidance", [(1, 1.0), (3, 1.0), (2, 2.5)])
@torch.no_grad()
def test_engine_image_equals_naive_full_recompute(model, processor, num_steps, guidance):
    conversation = [
        {
            "role": "user",
            "content": [{"type": "image", "image": _picture()}, {"type": "text", "text": "Draw it again."}],
        }
    ]
    parts, _ = _parts(
        G.generate_interleaved(
            model,
            processor,
            conversation,
            max_new_tokens=1,
            force_image=True,
            num_steps=num_steps,
            guidance=guidance,
            seed=11,
        )
    )
    images = [p for p in parts if isinstance(p, G.GeneratedImage)]
    assert len(images) == 1
    batch = G.collate_prompts(model, processor, conversation, append_boi=True)
    assert batch["clean_latents"].shape[0] == 1  # the prompt's image is in the recomputed rows
    naive = G.naive_generate_image(
        model, batch, num_steps=num_steps, guidance=guidance, generators=[torch.Generator().manual_seed(11)]
    )
    torch.testing.assert_close(images[0].latent[None], naive, rtol=1e-4, atol=1e-5)
    assert images[0].image.size == (32, 32)


@torch.no_grad()
def test_batched_t2i_with_left_padding_equals_naive(model, processor):
    prompts = ["Draw a red circle.", "Draw two blue squares left of a green triangle."]
    lat = G.generate_images_for_prompts(
        model, processor, prompts, num_steps=2, guidance=3.0, seeds=[4, 5], return_latents=True
    )[1]
    batch = G.collate_prompts(model, processor, [G.t2i_prompt(p) for p in prompts], append_boi=True)
    assert (batch["token_kind"][0] == TokenKind.PAD).any()  # the short prompt really is left-padded
    naive = G.naive_generate_image(
        model, batch, num_steps=2, guidance=3.0, generators=[torch.Generator().manual_seed(s) for s in (4, 5)]
    )
    torch.testing.assert_close(lat, naive, rtol=1e-4, atol=1e-5)


def test_t2i_prompt_matches_the_training_chat_format(processor):
    from mmgen.data.shapes_docs import iter_documents

    doc = next(d for d in iter_documents(20, seed=0, tasks=["t2i"]))
    text = doc["segments"][0]["text"]
    prompt = text[len("<|user|>") : -len("<|end|><|assistant|>")]
    assert G.t2i_prompt(prompt) == text


# ------------------------------------------------------------------------------------------ call counts


@pytest.mark.parametrize("num_steps,guidance", [(1, 1.0), (4, 1.0), (2, 3.0)])
@torch.no_grad()
def test_backbone_calls_per_image(model, processor, num_steps, guidance):
    N = model.config.num_image_tokens
    batch = G.collate_prompts(model, processor, [G.t2i_prompt("Draw a red circle.")])
    L = batch["input_ids"].shape[1]
    with CallLog(model) as log:
        list(
            G.generate_interleaved(
                model,
                processor,
                [G.t2i_prompt("Draw a red circle.")],
                max_new_tokens=1,
                force_image=True,
                num_steps=num_steps,
                guidance=guidance,
            )
        )
    # the U-Net decoder's prompt state: <|boi|> once more per image (and per null context), not per step
    prompt = [(1, 1)] if model.config.head_reads_prompt else []
    image = [(1, N)] * num_steps if guidance == 1.0 else [(1, 1)] + prompt + [(1, N)] * (2 * num_steps)
    # prefill, <|boi|>, [prompt state], [null context, its prompt state], N-token steps (x2 with guidance),
    # one clean pass, <|eoi|>
    assert log.calls == [(1, L), (1, 1)] + prompt + image + [(1, N), (1, 1)]


@torch.no_grad()
def test_image_cost_does_not_grow_with_the_prefix(model, processor):
    N = model.config.num_image_tokens
    long_prompt = G.t2i_prompt("Draw a red circle. " * 20)
    with CallLog(model) as log:
        G.generate_images_for_prompts(model, processor, [long_prompt], num_steps=3, seeds=[0])
    assert log.calls[0][1] > 100  # only the prefill sees the prefix
    prompt = [(1, 1)] if model.config.head_reads_prompt else []  # <|boi|> once more: the prompt state
    assert log.calls[1:] == prompt + [(1, N)] * 3


# ------------------------------------------------------------------------------------------- per-row seeds


@torch.no_grad()
def test_t2i_image_depends_only_on_its_prompt_and_seed(model, processor):
    prompts = [
        "Draw a red circle.",
        "Draw three yellow triangles.",
        "Draw a blue square above a white circle.",
    ]
    both = G.generate_images_for_prompts(
        model, processor, prompts, num_steps=2, guidance=2.0, seeds=[7, 8, 9], return_latents=True
    )[1]
    alone = G.generate_images_for_prompts(
        model, processor, prompts[1:2], num_steps=2, guidance=2.0, seeds=[8], return_latents=True
    )[1]
    torch.testing.assert_close(both[1:2], alone, rtol=1e-4, atol=1e-5)
    other_seed = G.generate_images_for_prompts(
        model, processor, prompts[1:2], num_steps=2, guidance=2.0, seeds=[1], return_latents=True
    )[1]
    assert (other_seed - alone).abs().max() > 1e-2


@torch.no_grad()
def test_t2i_sampler_choice_reaches_the_sampler(model, processor, monkeypatch):
    """`sampler="euler"` integrates an IMM model's s = t velocity: G is called with stride 0 at every step."""
    strides = []
    from mmgen.generation import image as generation_image

    real = generation_image.sample

    def spy(net, *args, **kwargs):
        def logged(x, t_in, s_in, cond):
            strides.append(float(s_in.abs().max()))
            return net(x, t_in, s_in, cond)

        return real(logged, *args, **kwargs)

    monkeypatch.setattr(generation_image, "sample", spy)
    assert model.config.objective == "imm"
    G.generate_images_for_prompts(model, processor, ["Draw a red circle."], num_steps=3, seeds=[0])
    assert len(strides) == 3 and min(strides) > 0  # pushforward jumps: stride 1000 (t - s) > 0
    strides.clear()
    G.generate_images_for_prompts(model, processor, ["Draw a red circle."], num_steps=3, seeds=[0], sampler="euler")
    assert strides == [0.0, 0.0, 0.0]


@torch.no_grad()
def test_mixed_mode_batch_rows_equal_their_solo_runs(model, processor):
    """Row 0 draws (guidance 2, 2 steps) while row 1 samples text and row 2 answers about an image."""
    convs = [
        [{"role": "user", "content": "Draw a red circle."}],
        [{"role": "user", "content": "How many shapes are there?"}],
        [
            {
                "role": "user",
                "content": [
                    {"type": "image", "image": _picture((30, 30, 200))},
                    {"type": "text", "text": "What colour is the square?"},
                ],
            }
        ],
    ]
    kw = {"max_new_tokens": 6, "temperature": 1.0, "top_k": 40, "top_p": 0.95, "repetition_penalty": 1.1}
    options = [
        {"force_image": True, "guidance": 2.0, "num_steps": 2, "seed": 3},
        {"force_image": False, "guidance": 1.0, "num_steps": 4, "seed": 21},
        {"force_image": False, "guidance": 1.5, "num_steps": 1, "seed": 5},
    ]
    batched = {k: [o[k] for o in options] for k in options[0]}
    _, rows = _parts(G.generate_interleaved(model, processor, convs, **kw, **batched))
    for i, conv in enumerate(convs):
        _, solo = _parts(G.generate_interleaved(model, processor, conv, **kw, **options[i]))
        mine, ref = rows[i], solo[0]
        assert [type(p) for p in mine] == [type(p) for p in ref]
        assert mine[-1].token_ids == ref[-1].token_ids
        for a, b in zip(mine, ref):
            if isinstance(a, G.GeneratedImage):
                torch.testing.assert_close(a.latent, b.latent, rtol=1e-4, atol=1e-5)
    assert any(isinstance(p, G.GeneratedImage) for p in rows[0])
    assert any(isinstance(p, G.TextDelta) for p in rows[1])


# ---------------------------------------------------------------------------------------------- text


def _greedy_without_cache(model, batch, latents_after_boi, steps):
    """Greedy decoding recomputing the whole packed row every step; a forced image (given latents) first."""
    cfg, N = model.config, model.config.num_image_tokens
    row = {k: batch[k][:1] for k in MODEL_INPUT_KEYS}
    clean = batch["clean_latents"]
    M = 0 if clean is None else clean.shape[0]

    def append(row, tok, kind=TokenKind.TEXT, n=1, image=-1, pos=None):
        p = row["position_ids"][0, -1] + 1 if pos is None else pos
        new = {
            "input_ids": torch.full((1, n), tok),
            "position_ids": torch.full((1, n), int(p)),
            "token_kind": torch.full((1, n), int(kind)),
            "document_ids": torch.zeros(1, n, dtype=torch.long),
            "image_ids": torch.full((1, n), image),
            "patch_ids": torch.arange(n)[None] if image >= 0 else torch.full((1, n), -1),
            "prefix_end": torch.full((1, n), -1),
        }
        return {k: torch.cat([row[k], new[k]], dim=1) for k in row}

    out = []
    if latents_after_boi is not None:
        row = append(row, cfg.boi_token_id)
        row = append(row, cfg.image_token_id, TokenKind.IMAGE_CLEAN, N, image=M)
        row = append(row, cfg.eoi_token_id, pos=row["position_ids"][0, -1] + 1)
        clean = latents_after_boi[None] if clean is None else torch.cat([clean, latents_after_boi[None]])
        out.append(cfg.boi_token_id)
        out.append(cfg.eoi_token_id)
    for _ in range(steps):
        logits = model(**row, clean_latents=clean).logits[0, -1]
        logits[[cfg.pad_token_id, cfg.image_token_id]] = float("-inf")
        tok = int(logits.argmax())
        out.append(tok)
        row = append(row, tok)
    return out


@torch.no_grad()
def test_cached_greedy_text_equals_uncached_greedy_after_an_image(model, processor):
    conv = [
        {
            "role": "user",
            "content": [{"type": "image", "image": _picture()}, {"type": "text", "text": "Draw a blue one."}],
        }
    ]
    parts, _ = _parts(
        G.generate_interleaved(
            model, processor, conv, max_new_tokens=7, force_image=True, num_steps=2, seed=0
        )
    )
    image = next(p for p in parts if isinstance(p, G.GeneratedImage))
    tokens = parts[-1].token_ids
    assert parts[-1].reason == "length" and len(tokens) == 8  # <|boi|> + <|eoi|> + 6 text tokens
    batch = G.collate_prompts(model, processor, conv)
    assert tokens == _greedy_without_cache(model, batch, image.latent, steps=6)


@torch.no_grad()
def test_text_deltas_concatenate_to_the_decoded_reply(model, processor):
    ids = [2, 7, 40, 41, 99, 123, 9, 8]  # a text-only prompt given as token ids
    parts, _ = _parts(G.generate_interleaved(model, processor, ids, max_new_tokens=10, allow_images=False))
    text = "".join(p.text for p in parts if isinstance(p, G.TextDelta))
    assert text == processor.tokenizer.decode(parts[-1].token_ids, skip_special_tokens=False)
    assert len(parts[-1].token_ids) == 10


@torch.no_grad()
def test_generation_stops_at_end_token_without_showing_it(model, processor):
    prompt = [G.t2i_prompt("Describe a circle.")]
    parts, _ = _parts(G.generate_interleaved(model, processor, prompt, max_new_tokens=6, allow_images=False))
    free = parts[-1].token_ids
    k = next(i for i in range(2, len(free)) if free[i] not in free[:i])
    # Swap the LM-head rows of <|end|> and the k-th greedy token: greedy now says <|end|> exactly there.
    stopper = MMGenForConditionalGeneration(model.config).eval()
    stopper.load_state_dict(model.state_dict())
    W = stopper.get_output_embeddings().weight.data
    end = model.config.end_token_id
    W[[end, free[k]]] = W[[free[k], end]]
    parts, _ = _parts(
        G.generate_interleaved(stopper, processor, prompt, max_new_tokens=6, allow_images=False)
    )
    assert isinstance(parts[-1], G.Finished) and parts[-1].reason == "end"
    assert parts[-1].token_ids == free[:k]
    text = "".join(p.text for p in parts if isinstance(p, G.TextDelta))
    assert text == processor.tokenizer.decode(free[:k], skip_special_tokens=False)
    assert "<|end|>" not in text


@torch.no_grad()
def test_caption_images_is_greedy_and_batch_independent(model, processor):
    images = [_picture(), _picture((30, 200, 30)), _picture((30, 30, 200))]
    together = G.caption_images(model, processor, images, max_new_tokens=5)
    alone = [G.caption_images(model, processor, [im], max_new_tokens=5)[0] for im in images]
    assert together == alone
    assert all(isinstance(c, str) and c for c in together)


def test_prompt_sensitivity_sees_the_prompt_and_is_zero_for_one_prompt(model, processor):
    """The end-of-run diagnostic: an untrained model's one-step image already moves with the prompt
    (the noisy copy reads it); repeating one prompt gives no prompt effect (exactly zero with linear patches;
    rounding only with the U-Net codec, whose batched convolutions are not bit-identical across rows)."""
    from mmgen.evaluation.quick import prompt_sensitivity

    varied = prompt_sensitivity(model, processor, prompts=("Draw a red circle.", "Draw two blue squares."),
                                num_seeds=2)
    assert varied["ratio"] > 0 and varied["across_seeds"] > 0
    same = prompt_sensitivity(model, processor, prompts=("Draw a red circle.",) * 2, num_seeds=2)
    tol = 0.0 if model.config.image_head == "linear" else 1e-5
    assert same["across_prompts"] <= tol and same["ratio"] <= tol
