"""Specifications of the capacity experiment (eval/capacity.py): parallel decoding of a masked model is
invalid where one-token-per-step and autoregressive decoding are not."""

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "eval"))
import capacity

TINY = capacity.CapacityConfig(steps=300, num_samples=512, width=32, layers=1, heads=2, toy_steps=60)


def test_poker_phrases_share_words_across_hands():
    data = capacity.poker_set()
    assert data.text(data.phrases[0]) == "high card"
    # independent positions: pair and flush follow two hands each, so 10 of 36 draws are valid
    assert capacity.chance_valid(data) == pytest.approx(10 / 36)


def test_codes_are_distinct_with_balanced_positions():
    cfg = capacity.CapacityConfig()
    data = capacity.codes_set(cfg)
    assert len({tuple(p.tolist()) for p in data.phrases}) == cfg.codes_count
    for column in data.phrases.T:
        assert torch.bincount(column).max() == cfg.codes_count // cfg.codes_vocab


def test_score_counts_invalid_phrases_and_frequency_gap():
    data = capacity.poker_set()
    valid = data.phrases[[0, 1]]
    bad = torch.tensor([[data.words.index("high"), data.words.index("pair")]])
    s = capacity.score(torch.cat([valid, bad]), data)
    assert s["invalid"] == pytest.approx(1 / 3)
    assert s["invalid_examples"] == ["high pair"]
    assert s["tv_valid"] == pytest.approx(0.5 * (2 * (0.5 - 1 / 6) + 4 / 6))


def test_one_parallel_step_writes_invalid_phrases_and_one_token_per_step_does_not():
    data = capacity.poker_set()
    result = capacity.discrete(data, TINY)
    one_step, exact = result["masked"]["1"]["invalid"], result["masked"]["2"]["invalid"]
    assert one_step > 0.4  # ~1 - 10/36 when the marginals are learnt
    assert exact < 0.1 and result["ar"]["invalid"] < 0.1
    assert one_step > 4 * max(exact, result["ar"]["invalid"])


def test_one_flow_matching_step_lands_off_the_ring_between_its_modes():
    scores, _ = capacity.continuous(capacity.CapacityConfig(toy_steps=300))
    assert set(scores) == {"data", "fm_1", "fm_8", "imm_1", "imm_8", "imm_gaussian_1", "imm_gaussian_8"}
    assert scores["data"]["off_ring"] == 0.0
    # one Euler step moves towards the conditional mean, inside the ring; one IMM jump lands nearer the ring
    assert scores["fm_1"]["radius_mean"] < scores["imm_1"]["radius_mean"]
    assert scores["imm_1"]["off_ring"] < 0.5 * scores["fm_1"]["off_ring"]
