"""MFU (mmgen/training/perf.py): one FLOP count per training step and one peak, for the training log and
mmgen/evaluation/speed.py."""

from __future__ import annotations

import math
from pathlib import Path
from unittest import mock

import pytest
import torch
from modeling_helpers import latents_for, pack, tiny_config

from mmgen.modeling_mmgen import MMGenForConditionalGeneration
from mmgen.objectives import get_objective
from mmgen.training import perf
from mmgen.training.step import compute_losses

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

ROWS = [[[("t", 3), ("i",), ("t", 2), ("i",)], [("t", 5), ("i",)]], [[("t", 4), ("i",), ("t", 3)]]]


def _hand_params_per_token(d=64, layers=2, ff=176, vocab=512, patch_dim=16, freq=256):
    """tiny_config()'s trained parameters that multiply a token, counted from its shapes: Llama layers
    (q, k, v, o; gate, up, down; two norms), final norm, untied lm_head; the image input projection with
    its two time MLPs (t and s) and the linear image head. Not the input embedding table, not the VAE."""
    layer = 4 * d * d + 3 * d * ff + 2 * d
    time_mlp = freq * d + d + d * d + d
    return layers * layer + d + vocab * d + (patch_dim * d + d) + 2 * time_mlp + (d * patch_dim + patch_dim)


class _FixedLatents:
    def __init__(self, latents):
        self.latents = latents

    def encode(self, images):
        return self.latents


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return MMGenForConditionalGeneration(tiny_config())


def _step(model, objective, target_pass):
    batch, images = pack(ROWS, model.config, with_labels=True)
    batch["image_uncond"] = torch.zeros(len(images), dtype=torch.bool)
    batch["images"] = torch.zeros(len(images), 3, 8, 8)
    vae = _FixedLatents(latents_for(model.config, len(images))["clean_latents"])
    loss_fn, _ = get_objective(objective, **({"num_particles": 2} if objective == "imm" else {}))
    losses = compute_losses(model, vae, batch, loss_fn=loss_fn, lambda_img=1.0, generator=torch.Generator().manual_seed(0),
                            device=torch.device("cpu"), target_pass=target_pass)
    return batch, losses


@pytest.mark.parametrize(("objective", "target_pass", "passes"), [
    ("imm", "prefix", ["student", "prefix"]),
    ("imm", "full", ["student", "full"]),
    ("flow_matching", "prefix", ["student"]),
])
def test_step_flops_count_every_pass_the_step_ran(model, objective, target_pass, passes):
    """6N + 12 L d seq_len per trained token; IMM's target branch, run without gradient, a third of that per
    token it computes: the target copies only (one per noisy token) or the whole rows again."""
    batch, losses = _step(model, objective, target_pass)
    assert losses.diagnostics["passes"] == passes
    N = model.config.num_image_tokens
    images, text = 4, 3 + 1 + 2 + 1 + 2 + 5 + 2 + 4 + 2 + 3  # ROWS: 4 images; text incl. <|boi|>, <|eoi|>
    tokens = text + images * N + images * N  # clean and noisy copy of each image
    assert tokens == int((batch["token_kind"] != 0).sum())
    seq_len = batch["input_ids"].shape[1]
    per_token = 6 * _hand_params_per_token() + 12 * 2 * 64 * seq_len
    target_tokens = {"prefix": images * N, "full": tokens}[target_pass] if objective == "imm" else 0
    expected = per_token * tokens + per_token / 3 * target_tokens
    counts = perf.pass_token_counts(batch["token_kind"], losses.diagnostics["passes"])
    assert perf.training_flops(model, counts, seq_len) == pytest.approx(expected, rel=1e-12)
    # summed over steps: linear in the counts
    assert perf.training_flops(model, counts + counts, seq_len) == pytest.approx(2 * expected, rel=1e-12)


def test_speed_reports_the_training_log_mfu_of_its_measured_step(model):
    """mmgen/evaluation/speed.py's MFU is the shared FLOP count over its step time and the shared peak."""
    from mmgen.evaluation import speed
    from mmgen.processing_mmgen import MMGenProcessor
    from mmgen.tokenization import load_tokenizer

    processor = MMGenProcessor.from_config(model.config, load_tokenizer(str(ROOT / "tokenizers" / "shapes")))
    r = speed.training_throughput(model.eval(), processor, rows=2, seq_len=128, steps=1)
    c = r["flop_tokens"]
    assert c["target"] == c["noisy"] > 0  # IMM (tiny_config's objective) ran its target copies over the prefix
    per_token = 6 * _hand_params_per_token() + 12 * 2 * 64 * 128
    hand = per_token * (c["tokens"] - c["target"]) + per_token / 3 * c["target"]
    peak, source = perf.device_peak_flops(torch.device("cpu"), torch.bfloat16)
    assert (r["peak_flops"], r["peak_source"]) == (peak, source)  # measured once per process
    assert r["flops_per_step"] == pytest.approx(hand, rel=1e-12)
    assert r["mfu"] == pytest.approx(hand / r["seconds_per_step"] / peak, rel=1e-12)


def mock_gpu(name):
    return mock.patch.object(torch.cuda, "get_device_name", return_value=name)


def test_the_peak_is_a_datasheet_number_on_known_gpus_and_the_run_dtype_on_cpu():
    with mock_gpu("NVIDIA H100 PCIe"):
        assert perf.device_peak_flops(torch.device("cuda"), torch.bfloat16) == (756e12, "datasheet:H100 PCIe")
    with mock_gpu("NVIDIA H200"):
        assert perf.device_peak_flops(torch.device("cuda"), torch.float32) == (989e12 / 2, "datasheet:H200")
    with mock_gpu("Some New GPU"):
        peak, source = perf.device_peak_flops(torch.device("cuda"))
        assert math.isnan(peak) and "unknown GPU" in source  # NaN: MFU is NaN, never a guess
    assert [perf.training_dtype(m) for m in ("bf16", "fp16", "no")] == [torch.bfloat16, torch.float16, torch.float32]
    # fp16 autocast runs as bf16 on CPU: the same measured peak
    assert perf.device_peak_flops(torch.device("cpu"), torch.float16) == perf.device_peak_flops(torch.device("cpu"))
    assert perf.mfu(1e9, 0.5, 4e9) == 0.5


def test_the_gpu_throughput_script_refuses_a_machine_without_cuda_unless_dry(monkeypatch, capsys):
    from train_helpers import load_script

    gpu_throughput = load_script("eval/gpu_throughput.py")

    monkeypatch.delenv("DRY", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit) as exit_info:
        gpu_throughput.main(["--out", "unused"])
    assert exit_info.value.code == 2 and "DRY=1" in capsys.readouterr().err
