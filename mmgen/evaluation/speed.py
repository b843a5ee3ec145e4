"""Speed and text perplexity of a model export, measured in one process so the ratios are fair.

- Training throughput: a few optimizer steps of the real training step (`mmgen.training.step.compute_losses`
  with the model's own objective, packed shapes rows, AdamW) on a copy of the model: tokens/s and MFU, as
  the training log computes them (`mmgen.training.perf`: the passes the step ran, 6N + attention per token;
  peak: measured bf16 matmul on CPU, data-sheet bf16 on known GPUs). bf16 autocast on both CPU and GPU.
- Image latency per step count, with the cached prefix (the engine) and without (the whole sequence
  recomputed at every step), `bench_prefix` below (its command: `eval/bench_generation.py`).
- Perplexity: exp(mean next-token NLL) over every text label of held-out shapes documents (caption, VQA,
  multi-turn; images as clean context), the packer's labels (docs/design.md §4).
"""

from __future__ import annotations

import copy
import math
import statistics
import time

import torch

from mmgen.data.packing import PackingConfig, collate_documents
from mmgen.data.shapes_docs import iter_documents
from mmgen.evaluation.quick import TEST_SEED
from mmgen.generation import collate_prompts, generate_image, naive_generate_image


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def _autocast(device):
    return torch.autocast(device.type, dtype=torch.bfloat16)


def training_throughput(model, processor, *, rows: int = 8, seq_len: int = 256, steps: int = 3, seed: int = 0,
                        target_pass: str = "prefix", warmup: int = 1, compile_model: bool = False,
                        forward_only: bool = False, documents: dict | None = None) -> dict:
    """Tokens/s, images/s and MFU of the training step on `rows` x `seq_len` packed shapes rows (median of
    `steps` after `warmup` steps). target_pass: how IMM's target branch runs (`compute_losses`); "full" is
    the second-forward baseline. compile_model: `torch.compile` the copy. forward_only: the step's passes
    with frozen weights, no backward or optimizer step (FlexAttention has no backward on CPU). documents: keyword
    arguments of `iter_documents` (tasks, particles, ...), default its mix."""
    from mmgen.objectives import get_objective
    from mmgen.training.perf import device_peak_flops, mfu, pass_token_counts, training_flops
    from mmgen.training.step import compute_losses

    cfg = model.config
    device = model.get_input_embeddings().weight.device
    net = copy.deepcopy(model).train()
    params = [p for n, p in net.named_parameters() if not n.startswith("vae.")]
    for p in params:
        p.requires_grad_(not forward_only)
    opt = torch.optim.AdamW(params, lr=1e-5)
    loss_fn, _ = get_objective(cfg.objective, sigma_data=cfg.sigma_data, **cfg.objective_params)
    packing = PackingConfig(seq_len=seq_len, num_image_tokens=cfg.num_image_tokens, image_size=cfg.image_size,
                            num_noisy_copies=1, special_ids=processor.special_ids)  # fmt: skip
    docs = list(iter_documents(rows * max(12, seq_len // 20), seed=TEST_SEED + 5, split="train",
                               resolution=cfg.image_size, **(documents or {})))
    batch = collate_documents(docs, processor.tokenizer, packing)
    batch = {k: (v[:rows] if isinstance(v, torch.Tensor) and v.dim() == 2 else v) for k, v in batch.items()}
    kept = int(batch["image_ids"].max()) + 1 if (batch["image_ids"] >= 0).any() else 0
    batch["images"], batch["image_uncond"] = batch["images"][:kept], batch["image_uncond"][:kept]
    tokens = int((batch["token_kind"] != 0).sum())
    g = torch.Generator(device=device).manual_seed(seed)
    step_net = torch.compile(net) if compile_model else net
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for i in range(warmup + steps):  # warm-up steps: allocations, kernels, compilation
        _sync(device)
        start = time.perf_counter()
        with _autocast(device):
            losses = compute_losses(step_net, net.vae, batch, loss_fn=loss_fn, lambda_img=1.0, generator=g,
                                    device=device, target_pass=target_pass)
        if not forward_only:
            losses.loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        _sync(device)
        if i >= warmup:
            times.append(time.perf_counter() - start)
    seconds = sorted(times)[len(times) // 2]
    memory = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")
    passes = [("full" if forward_only and p == "student" else p) for p in losses.diagnostics["passes"]]
    counts = pass_token_counts(batch["token_kind"], passes)  # forward-only: the student pass without backward
    flops = training_flops(model, counts, seq_len)
    peak, source = device_peak_flops(device, torch.bfloat16)
    del net, opt
    return {"tokens_per_step": tokens, "rows": rows, "seq_len": seq_len, "seconds_per_step": seconds,
            "tokens_per_s": tokens / seconds, "flops_per_step": flops, "peak_flops": peak, "peak_source": source,
            "mfu": mfu(flops, seconds, peak), "dtype": "bf16-autocast", "steps_timed": steps,
            "target_pass": target_pass, "flop_tokens": dict(counts), "passes": passes,
            "images_per_s": losses.diagnostics["num_images"] / seconds, "forward_only": forward_only,
            "compiled": compile_model, "peak_memory_gib": memory}  # fmt: skip


def image_latency(model, *, prefix: int = 256, steps=(1, 2, 4, 8), guidance: float = 1.0, repeats: int = 2) -> dict:
    """ms per image with the cached prefix and with a full recompute, per step count, and their ratio."""
    rows = bench_prefix(model, prefix, list(steps), guidance, repeats)
    one = next((r for r in rows if r["num_steps"] == min(steps)), rows[0])
    for r in rows:
        r["cached_vs_fewest_steps"] = r["cached_ms"] / one["cached_ms"]
    return {"prefix": prefix, "guidance": guidance, "repeats": repeats, "rows": rows}


@torch.no_grad()
def perplexity(model, processor, *, num_docs: int = 64, seq_len: int = 512, batch_rows: int = 8) -> dict:
    """Perplexity of held-out shapes text (caption, VQA and multi-turn documents of split "heldout").

    Top-level numbers are over every text token (user turns included); ``assistant`` holds the same over
    the assistant's tokens only, the part a model trained with ``data.loss_on: assistant`` learns to write.
    """
    cfg = model.config
    device = model.get_input_embeddings().weight.device
    docs = list(iter_documents(num_docs, seed=TEST_SEED + 6, split="heldout", tasks=["caption", "vqa", "multiturn"],
                               resolution=cfg.image_size))  # fmt: skip
    # one forward per batch; the two label sets (every text token / the assistant's) differ only in masking
    packings = {text_loss: PackingConfig(seq_len=seq_len, num_image_tokens=cfg.num_image_tokens,
                                         image_size=cfg.image_size, num_noisy_copies=0, text_loss=text_loss,
                                         special_ids=processor.special_ids)
                for text_loss in ("all", "assistant")}  # fmt: skip
    totals = {text_loss: [0.0, 0] for text_loss in packings}  # nll, tokens
    keys = ("input_ids", "position_ids", "token_kind", "document_ids", "image_ids", "patch_ids", "prefix_end")
    for start in range(0, len(docs), batch_rows):
        batches = {k: collate_documents(docs[start : start + batch_rows], processor.tokenizer, p)
                   for k, p in packings.items()}  # fmt: skip
        batch = batches["all"]
        inputs = {k: batch[k].to(device) for k in keys}
        latents = model.vae.encode(batch["images"].float().to(device)) if batch["images"].shape[0] else None
        logits = model(**inputs, clean_latents=latents).logits.float()  # (B, L, V)
        logp = torch.log_softmax(logits[:, :-1], dim=-1)
        for text_loss, b in batches.items():
            labels = b["labels"].to(device)[:, 1:]  # UNshifted labels: token i+1 is predicted at i
            mask = labels != -100
            picked = logp.gather(-1, labels.clamp_min(0)[..., None])[..., 0]
            totals[text_loss][0] -= float(picked[mask].sum())
            totals[text_loss][1] += int(mask.sum())
    sums = {k: {"perplexity": math.exp(nll / n), "nll_per_token": nll / n, "tokens": n} for k, (nll, n) in totals.items()}
    return {**sums["all"], "assistant": sums["assistant"], "documents": len(docs), "split": "heldout"}


# ------------------------------------------------------------------ one image: cached engine vs naive


def _seeded():
    return [torch.Generator().manual_seed(0)]  # the same starting noise for both paths


def timed(fn, repeats: int, device: torch.device | None = None) -> float:
    """Median wall time of `fn()` over `repeats` runs after one warm-up, in seconds."""
    device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    fn()
    times = []
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


@torch.no_grad()
def bench_prefix(model, prefix_len: int, steps: list[int], guidance: float, repeats: int) -> list[dict]:
    cfg = model.config
    g = torch.Generator().manual_seed(prefix_len)
    ids = [cfg.bos_token_id] + torch.randint(
        16, cfg.text_config.vocab_size, (prefix_len - 2,), generator=g
    ).tolist()
    batch = collate_prompts(model, None, [ids], append_boi=True)  # P tokens, the last one <|boi|>
    assert batch["input_ids"].shape[1] == prefix_len
    meta = {k: v for k, v in batch.items() if k != "clean_latents"}
    position = batch["position_ids"][:, -1] + 1
    cache_box = {}

    def prefill():
        from transformers.cache_utils import DynamicCache

        cache_box["cache"] = DynamicCache(config=cfg.text_config)
        model(**meta, cache=cache_box["cache"], logits_to_keep=1)

    prefill_s = timed(prefill, repeats)
    rows = []
    for n in steps:

        def cached(n=n):
            cache = cache_box["cache"]
            latents = generate_image(
                model, cache, image_position=position, num_steps=n, guidance=guidance, generators=_seeded()
            )
            model.append_clean_image(cache, latents, image_position=position)
            cache.crop(-cfg.num_image_tokens)  # back to the prefix for the next repeat

        def naive(n=n):
            naive_generate_image(model, batch, num_steps=n, guidance=guidance, generators=_seeded())

        cached_s, naive_s = timed(cached, repeats), timed(naive, repeats)
        rows.append(
            {
                "prefix": prefix_len,
                "num_steps": n,
                "cached_ms": 1e3 * cached_s,
                "naive_ms": 1e3 * naive_s,
                "speedup": naive_s / cached_s,
                "prefill_ms": 1e3 * prefill_s,
            }
        )
        print(
            f"  prefix {prefix_len:5d}  steps {n}: cached {1e3 * cached_s:8.1f} ms  naive {1e3 * naive_s:8.1f} ms",
            flush=True,
        )
    return rows
