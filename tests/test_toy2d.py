"""Specifications of the 2-D benchmark (eval/toy2d.py) and its metrics (mmgen/evaluation/metrics2d.py)."""

import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "eval"))  # eval/ holds scripts, not a package
import toy2d

from mmgen.evaluation import metrics2d
from mmgen.evaluation import toy2d as toy2d_lib

TINY = toy2d_lib.Toy2DConfig(
    steps=40, batch_size=64, width=32, depth=2, emb_dim=16, num_eval=256, num_projections=256
)


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.mark.parametrize("name", toy2d_lib.DATASETS)
def test_datasets_are_scaled_to_sigma_data(name):
    x = toy2d_lib.sample_data(name, 20000, torch.Generator().manual_seed(0))
    assert x.shape == (20000, 2)
    torch.testing.assert_close(x.std(0), torch.full((2,), 0.5), atol=0.015, rtol=0)
    torch.testing.assert_close(x.mean(0), torch.zeros(2), atol=0.02, rtol=0)


def test_ring_has_eight_separated_modes():
    x = toy2d_lib.sample_data("ring", 4000, torch.Generator().manual_seed(0))
    angle = torch.atan2(x[:, 1], x[:, 0]) / (2 * torch.pi / 8)  # mode centres at integer values
    assert torch.quantile((angle - angle.round()).abs(), 0.99) < 0.35  # gaps between modes stay empty
    assert torch.bincount(angle.round().long() % 8).min() > 400


def test_checkerboard_leaves_odd_cells_empty():
    x = toy2d_lib.sample_data("checkerboard", 4000, torch.Generator().manual_seed(0))
    cell = torch.floor(x / (0.5 * 12**0.5 / 4)).long() + 2  # back to the 4x4 board's cell indices
    assert ((cell[:, 0] + cell[:, 1]) % 2 == 0).all()


@pytest.mark.parametrize("name", toy2d_lib.DATASETS)
def test_metrics_sit_at_the_floor_for_same_distribution_and_grow_under_a_shift(name):
    gen = torch.Generator().manual_seed(0)
    ref, same = toy2d_lib.sample_data(name, 2048, gen), toy2d_lib.sample_data(name, 2048, gen)
    directions = metrics2d.random_directions(256, 2, gen)
    floor = metrics2d.distances(same, ref, directions)
    shifted = metrics2d.distances(same + torch.tensor([0.15, 0.0]), ref, directions)
    assert floor["swd"] < 0.04 and floor["energy"] < 1e-3
    assert shifted["swd"] > 3 * floor["swd"]
    assert shifted["energy"] > 10 * floor["energy"]
    # a shift by c moves every projection by c.u, so the sliced W2 can be no smaller than the shift's mean
    assert shifted["swd"] > 0.15 / 2**0.5 * 0.9


def test_energy_distance_is_symmetric_and_zero_on_identical_samples():
    gen = torch.Generator().manual_seed(1)
    x, y = torch.randn(300, 2, generator=gen), torch.randn(300, 2, generator=gen) + 1
    assert metrics2d.energy_distance(x, x) == pytest.approx(0.0, abs=1e-12)
    assert metrics2d.energy_distance(x, y) == pytest.approx(metrics2d.energy_distance(y, x), rel=1e-9)


def test_flow_map_mlp_uses_both_times_separately():
    torch.manual_seed(0)
    net = toy2d_lib.FlowMapMLP(width=32, depth=2, emb_dim=16)
    x, t = torch.randn(5, 2), torch.full((5,), 700.0)
    g = net(x, t, torch.full((5,), 100.0))
    assert g.shape == x.shape
    assert not torch.allclose(g, net(x, t, torch.full((5,), 400.0)))  # the second time matters
    assert not torch.allclose(g, net(x, torch.full((5,), 300.0), torch.full((5,), 100.0)))


def test_both_objectives_get_the_same_forward_evaluations_per_step():
    _, _, imm = toy2d_lib.train("imm", "ring", TINY)
    _, _, fm = toy2d_lib.train("flow_matching", "ring", TINY)
    assert imm["forward_evals_per_step"] == fm["forward_evals_per_step"] == 2 * TINY.batch_size
    assert imm["net_calls_per_step"] == 2 and fm["net_calls_per_step"] == 1
    assert imm["sec_per_step"] > 0 and fm["sec_per_step"] > 0


def test_results_json_has_the_documented_shape(tmp_path):
    results = toy2d.run(TINY, ("ring",), tmp_path)
    on_disk = json.loads((tmp_path / "results.json").read_text())
    assert on_disk == json.loads(json.dumps(results))
    r = on_disk["ring"]
    assert set(r["imm"]) == set(r["imm_gaussian"]) == {"1", "2", "4", "8", "16"}
    assert set(r["fm"]) == {"1", "2", "4", "8", "16", "32", "64", "128"}
    for leaf in [r["floor"], *r["imm"].values(), *r["imm_gaussian"].values(), *r["fm"].values()]:
        assert set(leaf) == {"swd", "energy"}
        assert all(isinstance(v, float) and v >= 0 for v in leaf.values())
    assert r["imm"] != r["imm_gaussian"]  # the kernel reaches the objective
    assert (tmp_path / "toy2d.png").stat().st_size > 10_000
    assert "| IMM pushforward (Gaussian kernel) | 4 |" in (tmp_path / "results.md").read_text()
    assert json.loads((tmp_path / "config.json").read_text())["steps"] == TINY.steps


def test_particle_ablation_reports_each_seed_and_an_interval(tmp_path):
    result = toy2d.run_particles(TINY, (0, 1), tmp_path, particles=(1, 4))
    cell = result["particles"]["4"]["8"]
    assert len(cell["values"]) == 2 and cell["values"][0] != cell["values"][1]
    assert cell["swd"] == pytest.approx(sum(cell["values"]) / 2)
    assert cell["ci95"][0] < cell["swd"] < cell["ci95"][1]
    assert json.loads((tmp_path / "particles.json").read_text())["seeds"] == [0, 1]
    assert (tmp_path / "particles.png").stat().st_size > 5_000


def test_one_imm_step_beats_one_flow_matching_step_on_the_ring():
    # One Euler step of flow matching lands every sample near E[x | noise] ~ the ring's centre; a briefly
    # trained IMM flow map already spreads its one-step samples over the ring.
    cfg = toy2d_lib.Toy2DConfig(steps=300, batch_size=128, lr=3e-3, width=64, depth=2, emb_dim=32, num_eval=1024)
    reference, _, noise, directions = toy2d_lib.eval_sets("ring", cfg)
    scores = {}
    for objective in ("imm", "flow_matching"):
        net, obj_config, _ = toy2d_lib.train(objective, "ring", cfg)
        x = toy2d_lib.generate(objective, net, obj_config, 1, noise)
        scores[objective] = metrics2d.distances(x, reference, directions)
    assert scores["imm"]["swd"] < 0.5 * scores["flow_matching"]["swd"]
    assert scores["imm"]["energy"] < 0.25 * scores["flow_matching"]["energy"]
