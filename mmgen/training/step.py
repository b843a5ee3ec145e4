"""One training step's loss: text cross-entropy + lambda_img * image objective (docs/design.md §7).

The objective is a pure function of a network callable `net(x_in, t_in, s_in, cond) -> G`
(docs/design.md §7); here the callable is the whole packed forward with the image copies filled in.
The objective calls it twice: the student branch (with gradient; its forward also yields the text
loss) and the target branch (under `torch.no_grad`, live weights: IMM's stop-gradient target).
Which objective runs is a name in the config; this file never branches on it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mmgen.data.latents import encode_batch
from mmgen.data.packing import COUNTER_KEYS
from mmgen.layout import METADATA_KEYS, TokenKind
from mmgen.target_copies import TargetCopies

MODEL_KEYS = (*METADATA_KEYS, "image_uncond")  # what the packed forward takes from a packer batch


@dataclass
class StepLosses:
    loss: torch.Tensor
    text: torch.Tensor
    image: torch.Tensor
    diagnostics: dict


def split_batch(batch: dict, device: torch.device) -> tuple[dict, torch.Tensor, dict]:
    """Packer batch -> (model kwargs on device, images to encode (M_img, 3, H, W) in [-1, 1], counters)."""
    model_inputs = {k: batch[k].to(device) for k in MODEL_KEYS}
    counters = {k: int(batch[k]) for k in COUNTER_KEYS if k in batch}
    return model_inputs, batch["images"].to(device), counters


def drop_condition(cond: dict, mask: torch.Tensor) -> dict:
    """Classifier-free-guidance dropout: the masked images' student copies see only the null context."""
    return {**cond, "image_uncond": cond["image_uncond"] | mask.to(cond["image_uncond"].device)}


def noisy_image_ids(inputs: dict) -> torch.Tensor:
    """Sorted ids of the images that have noisy copies (generation targets), (num_noisy,) long."""
    kind, patch = inputs["token_kind"], inputs["patch_ids"]
    first_patch = (kind == TokenKind.IMAGE_NOISY) & (patch == 0)  # one token per image
    return inputs["image_ids"][first_patch].unique(sorted=True)


def condition_ids(inputs: dict) -> torch.Tensor:
    """One id per image with noisy copies (in image-id order, as `noisy_image_ids`): images whose conditions
    are identical share it.

    An image's condition is its document's tokens up to its `<|boi|>`. Two images share an id when
    those token ids are equal and the prefix holds no earlier image (whose content the ids do not
    show): e.g. every "<|user|><|boi|>" caption/VQA image, or two documents with the same prompt.
    IMM forms its particle groups from these ids (`imm_loss(group_ids=...)`)."""
    kind, ids, docs = inputs["token_kind"].cpu(), inputs["input_ids"].cpu(), inputs["document_ids"].cpu()
    first_patch = (kind == TokenKind.IMAGE_NOISY) & (inputs["patch_ids"].cpu() == 0)  # one token per image
    rows, cols = first_patch.nonzero(as_tuple=True)
    image = inputs["image_ids"].cpu()[rows, cols]
    end = inputs["prefix_end"].cpu()[rows, cols]
    keys: dict = {}
    out = {}
    for b, i, e in zip(rows.tolist(), image.tolist(), end.tolist()):
        in_doc = (docs[b, : e + 1] == docs[b, e]).nonzero(as_tuple=True)[0]
        has_image = bool((kind[b, in_doc] == TokenKind.IMAGE_CLEAN).any())
        key = ("unique", i) if has_image else tuple(ids[b, in_doc].tolist())
        out[i] = keys.setdefault(key, len(keys))
    return torch.tensor([out[i] for i in sorted(out)], dtype=torch.long)


TARGET_PASSES = ("prefix", "full")


def compute_losses(model, vae, batch: dict, *, loss_fn, lambda_img: float, generator: torch.Generator,
                   device: torch.device, group_by_condition: bool = False, target_pass: str = "prefix") -> StepLosses:
    """Losses of one micro-batch. `loss_fn(net, x, cond, generator=, drop_cond=)` is the objective;
    with `group_by_condition` it also gets `group_ids=condition_ids(...)` (IMM particle groups).

    target_pass: how a no-grad call of `net` after the student's (IMM's target branch) runs. "prefix":
    only the target copies' tokens, over the keys/values the student forward computed (the same weights
    see the same text and clean images; nothing reads a noisy copy) — `forward(target=TargetCopies(...))`;
    "full": a second forward of the whole rows. Equal up to float rounding (tests/test_modeling.py). Models
    with flex_attention return no prefix and get the full pass."""
    if target_pass not in TARGET_PASSES:
        raise ValueError(f"objective.target_pass must be one of {TARGET_PASSES}, got {target_pass!r}")
    inputs, images, counters = split_batch(batch, device)
    latents = encode_batch(vae, images, batch)  # (M, C, h, w); cached latents skip the encoder
    text_loss: dict[str, torch.Tensor] = {}
    prefix: dict = {}  # the student pass's keys/values, used once by the target pass after it
    passes: list[str] = []  # what ran, for the FLOP count (mmgen.training.perf.pass_token_counts)

    def net(x_in, t_in, s_in, cond):
        student = torch.is_grad_enabled()
        passes.append("student" if student else "prefix" if prefix.get("value") is not None else "full")
        if passes[-1] == "prefix":  # no prefix: the model has none (flex_attention)
            out = model(**{**cond, "labels": None}, target=TargetCopies(x_in, t_in, s_in, prefix=prefix.pop("value")))
            return out.target_outputs.float()
        reuse = student and target_pass == "prefix"
        out = model(**{**cond, "labels": cond["labels"] if student else None},
                    clean_latents=latents, noisy_latents=x_in, noisy_t=t_in, noisy_s=s_in,
                    **({"return_target_prefix": True} if reuse else {}))
        if student:
            text_loss["value"] = out.loss
        if reuse:
            prefix["value"] = out.target_prefix
        return out.image_outputs.float()

    num_images = latents.shape[0]
    # The objective sees only the images with noisy copies (generation targets); the model gets every image's
    # clean latent and the subset's noisy ones in their slots (zeros elsewhere: no token reads them).
    targets = noisy_image_ids(inputs).to(latents.device)
    num_targets = targets.shape[0]

    def full(v):  # (num_targets, ...) -> (num_images, ...), zeros for the images without noisy copies
        return v.new_zeros((num_images, *v.shape[1:])).index_copy(0, targets.to(v.device), v)

    def target_net(x_in, t_in, s_in, cond):
        return net(full(x_in), full(t_in), full(s_in), cond)[targets]

    if num_targets >= (1 if group_by_condition else 2):
        extra = {"group_ids": condition_ids(inputs)} if group_by_condition else {}
        image_loss, diag = loss_fn(target_net, latents[targets].float(), inputs, generator=generator,
                                   drop_cond=lambda cond, mask: drop_condition(cond, full(mask)), **extra)
        text = text_loss["value"]
    else:  # too few images for a particle group: text loss only (counted); the row's noisy copy is inert
        zeros = torch.zeros(num_images, device=device)
        noisy = num_targets > 0
        out = model(**inputs, clean_latents=latents if num_images else None,
                    noisy_latents=torch.zeros_like(latents) if noisy else None, noisy_t=zeros, noisy_s=zeros)
        text, image_loss, diag = out.loss, torch.zeros((), device=device), {"num_excluded": num_targets}
        passes.append("student")
    diag = {**diag, **counters, "num_images": num_images, "num_image_targets": num_targets, "passes": passes}
    return StepLosses(loss=text + lambda_img * image_loss, text=text.detach(), image=image_loss.detach(),
                      diagnostics=diag)


class NonFiniteGuard:
    """Skip optimizer steps whose loss is NaN/inf, count them, and stop after `max_in_a_row` in a row."""

    def __init__(self, max_in_a_row: int):
        if max_in_a_row < 1:
            raise ValueError(f"run.max_nonfinite_in_a_row must be >= 1, got {max_in_a_row}")
        self.max_in_a_row = max_in_a_row
        self.in_a_row = 0
        self.total = 0

    def skip(self, finite: bool, step: int) -> bool:
        """True when this step must be skipped; raises once too many non-finite steps came in a row."""
        if finite:
            self.in_a_row = 0
            return False
        self.in_a_row += 1
        self.total += 1
        if self.in_a_row >= self.max_in_a_row:
            raise FloatingPointError(
                f"{self.in_a_row} non-finite losses in a row at step {step}: stopping "
                "(lower optim.lr, check the data, or raise run.max_nonfinite_in_a_row)"
            )
        return True
