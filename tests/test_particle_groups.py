"""IMM particle groups by condition: only images drawn under the same condition are compared as a set."""

from pathlib import Path

import pytest
import torch
from PIL import Image

from mmgen.data.packing import PackingConfig, collate_documents
from mmgen.objectives.imm import IMMConfig, condition_chunks, imm_loss
from mmgen.sampling import pushforward
from mmgen.tokenization import load_tokenizer
from mmgen.training.step import condition_ids, noisy_image_ids

SHIPPED = Path(__file__).resolve().parents[1] / "tokenizers" / "shapes"


def _image(colour):
    return Image.new("RGB", (8, 8), colour)


def _t2i(prompt, colour=(255, 0, 0)):
    return {"segments": [{"text": f"<|user|>{prompt}<|end|><|assistant|>"}, {"image": _image(colour)},
                         {"text": "<|end|>"}]}


def _caption(colour):
    return {"segments": [{"text": "<|user|>"}, {"image": _image(colour)},
                         {"text": "Describe the image.<|end|><|assistant|>A red square.<|end|>"}]}


def test_condition_ids_of_a_packed_batch():
    tok = load_tokenizer(SHIPPED)
    config = PackingConfig(seq_len=128, num_image_tokens=4, image_size=8, num_noisy_copies=1)
    two_turns = {"segments": [{"text": "<|user|>Draw a red circle.<|end|><|assistant|>"}, {"image": _image("red")},
                              {"text": "<|end|><|user|>Draw a red circle.<|end|><|assistant|>"},
                              {"image": _image("blue")}, {"text": "<|end|>"}]}
    docs = [_caption("red"), _t2i("Draw a red circle."), _t2i("Draw a blue square."), _caption("blue"),
            _t2i("Draw a red circle.", (0, 0, 255)), two_turns, two_turns]
    batch = collate_documents(docs, tok, config)
    ids = condition_ids(batch).tolist()
    assert len(ids) == 9  # images in document order: 1 + 1 + 1 + 1 + 1 + 2 + 2
    cap1, red1, blue, cap2, red2, turn1a, turn2a, turn1b, turn2b = ids
    assert cap1 == cap2  # both see only "<|user|><|boi|>": one condition
    assert red1 == red2 != blue  # same prompt text -> same condition, whatever the image
    assert turn1a == turn1b == red1  # the first turn's prefix is the same t2i prompt
    # a second turn's condition holds an earlier image: never shared, even by an identical document
    assert len({turn2a, turn2b, cap1, red1, blue}) == 5


def test_condition_chunks_cut_each_condition_into_groups_of_at_most_m():
    chunks = condition_chunks(torch.tensor([0, 1, 0, 0, 2, 0, 0, 1]), num_particles=4)
    assert chunks == [[0, 2, 3, 5], [6], [1, 7], [4]]


def test_grouped_loss_draws_one_time_per_group_and_counts_singletons():
    seen = []

    def net(x_in, t_in, s_in, cond):
        seen.append(t_in.clone())
        return x_in * 0.0

    x = torch.randn(5, 3, generator=torch.Generator().manual_seed(0))
    loss, diag = imm_loss(net, x, config=IMMConfig(num_particles=4),
                          generator=torch.Generator().manual_seed(1), group_ids=torch.tensor([7, 3, 7, 9, 7]))
    t = seen[0]
    assert t[0] == t[2] == t[4] and len({t[0].item(), t[1].item(), t[3].item()}) == 3
    assert diag["num_groups"] == 3 and diag["num_excluded"] == 0
    assert torch.isfinite(loss) and loss > 0  # a zero network cannot match the data, singletons included


class _CondNet(torch.nn.Module):
    """MLP on (x_in, t, t - s, one-hot condition)."""

    def __init__(self, dim=2, classes=2, width=64):
        super().__init__()
        self.classes = classes
        self.mlp = torch.nn.Sequential(torch.nn.Linear(dim + 2 + classes, width), torch.nn.SiLU(),
                                       torch.nn.Linear(width, width), torch.nn.SiLU(), torch.nn.Linear(width, dim))

    def forward(self, x_in, t_in, s_in, cond):
        onehot = torch.nn.functional.one_hot(cond, self.classes).float()
        return self.mlp(torch.cat([x_in, t_in[:, None] / 1000, s_in[:, None] / 1000, onehot], dim=1))


def _train_two_class(group_by_condition: bool, steps=400, seed=0):
    """Class 0 lives at (+0.5, +0.5), class 1 at (-0.5, -0.5); classes are mixed in every batch."""
    torch.manual_seed(seed)
    net, gen = _CondNet(), torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    config = IMMConfig(num_particles=4, p_uncond=0.0)  # no drop_cond: no guidance dropout
    centres = torch.tensor([[0.5, 0.5], [-0.5, -0.5]])
    for _ in range(steps):
        c = torch.randint(0, 2, (64,), generator=gen)
        x = centres[c] + 0.05 * torch.randn(64, 2, generator=gen)
        loss, _ = imm_loss(net, x, c, config=config, generator=gen, group_ids=c if group_by_condition else None)
        opt.zero_grad()
        loss.backward()
        opt.step()
    c = torch.tensor([0] * 200 + [1] * 200)
    noise = 0.5 * torch.randn(400, 2, generator=gen)
    samples = pushforward(net, noise, c, num_steps=1, config=config)
    return ((samples - centres[c]).norm(dim=1) < 0.25).float().mean().item()


@pytest.mark.usefixtures("one_thread")
def test_condition_grouped_imm_learns_a_two_class_conditional_in_one_step():
    # Measured with these seeds: 0.87 grouped by condition; 0.98 with the paper's mixed groups, which
    # learn this well-separated toy too (the paired student/target terms carry the condition).
    assert _train_two_class(True, steps=1500) >= 0.8


def test_samples_of_one_slot_form_one_condition_and_input_images_are_left_out():
    tok = load_tokenizer(SHIPPED)
    config = PackingConfig(seq_len=160, num_image_tokens=4, image_size=8, num_noisy_copies=1,
                           text_loss="assistant", image_loss="assistant")
    slot = {"segments": [{"text": "<|user|>Draw a red circle.<|end|><|assistant|>"},
                         {"images": [_image("red"), _image("blue"), _image("green")]}, {"text": "<|end|>"}]}
    batch = collate_documents([_caption("red"), slot, _t2i("Draw a red circle.")], tok, config)
    assert noisy_image_ids(batch).tolist() == [1, 2, 3, 4]  # image 0 is the caption's input
    assert condition_ids(batch).tolist() == [0, 0, 0, 0]  # one prompt: one condition for all four


def test_the_objective_sees_only_generation_targets():
    """compute_losses hands the loss the latents of the images with noisy copies, and the network's outputs
    for exactly those images."""
    from mmgen.training.step import compute_losses

    tok = load_tokenizer(SHIPPED)
    config = PackingConfig(seq_len=160, num_image_tokens=4, image_size=8, num_noisy_copies=1,
                           text_loss="assistant", image_loss="assistant")
    batch = collate_documents([_caption("red"), _t2i("Draw a red circle.", (0, 0, 255)),
                               _t2i("Draw a blue square.", (0, 255, 0))], tok, config)

    class Encoder:
        def encode(self, images):  # (M, 3, 8, 8) -> (M, 3, 2, 2): one latent per image, its mean colour
            return images.mean(dim=(2, 3), keepdim=True).expand(-1, -1, 2, 2)

    seen = {}

    def model(**kw):
        seen["noisy"] = kw["noisy_latents"].clone()
        out = type("Out", (), {})()
        out.loss = torch.zeros(())
        out.image_outputs = kw["noisy_latents"] * 2.0  # (M, C, h, w), zeros where an image has no copy
        return out

    def loss_fn(net, x, cond, *, generator, drop_cond):
        seen["x"] = x.clone()
        g = net(x + 1.0, torch.ones(x.shape[0]), torch.zeros(x.shape[0]), cond)
        seen["g"] = g
        return g.sum() * 0, {}

    compute_losses(model, Encoder(), batch, loss_fn=loss_fn, lambda_img=1.0, generator=torch.Generator(),
                   device=torch.device("cpu"), target_pass="full")
    latents = Encoder().encode(batch["images"])
    assert torch.equal(seen["x"], latents[1:])  # the caption's image (0) is not a target
    assert seen["noisy"][0].eq(0).all() and torch.equal(seen["noisy"][1:], latents[1:] + 1.0)
    assert torch.equal(seen["g"], 2.0 * (latents[1:] + 1.0))
