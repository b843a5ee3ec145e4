"""Learning curves (mmgen/training/curves.py, eval/curves.py): reading, resume duplicates, plots."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from mmgen.training.curves import append_point, plot_curves, read_curve

ROOT = Path(__file__).resolve().parents[1]


def _point(step, acc, images):
    metric = {"accuracy": acc, "n": 10, "ci95": [max(0.0, acc - 0.2), min(1.0, acc + 0.2)]}
    return {"step": step, "images_seen": images, "image_targets_seen": images, "tokens_seen": 100 * step,
            "train_seconds": float(step), "single@4": metric, "caption": metric}


def test_a_point_logged_again_after_a_resume_replaces_the_earlier_one(tmp_path):
    for step, acc in ((10, 0.1), (20, 0.2), (20, 0.3), (30, 0.4)):  # killed after 20, resumed from 10
        append_point(tmp_path, _point(step, acc, 5 * step))
    points = read_curve(tmp_path)
    assert [p["step"] for p in points] == [10, 20, 30]
    assert points[1]["single@4"]["accuracy"] == 0.3
    assert read_curve(tmp_path / "missing") == []


def test_plot_overlays_runs_and_the_cli_writes_png_and_json(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir(), b.mkdir()
    for step in (10, 20):
        append_point(a, _point(step, step / 100, 5 * step))
        append_point(b, _point(step, step / 50, 8 * step))
    out = plot_curves([a, b], tmp_path / "plot.png")
    assert out.stat().st_size > 1000
    cli = subprocess.run([sys.executable, str(ROOT / "eval" / "curves.py"), str(a), str(b), "--out",
                          str(tmp_path / "cmp" / "c.png"), "--labels", "A", "B", "--x", "tokens_seen"],
                         capture_output=True, text=True, check=False)
    assert cli.returncode == 0, cli.stderr
    data = json.loads((tmp_path / "cmp" / "c.json").read_text())
    assert data["x"] == "tokens_seen" and [p["step"] for p in data["runs"]["B"]["points"]] == [10, 20]
    missing = subprocess.run([sys.executable, str(ROOT / "eval" / "curves.py"), str(tmp_path / "none"), "--out",
                              str(tmp_path / "x.png")], capture_output=True, text=True, check=False)
    assert missing.returncode == 2 and "no curve.jsonl" in missing.stderr and "Traceback" not in missing.stderr


def test_plot_without_points_names_the_setting(tmp_path):
    with pytest.raises(ValueError, match="curve_every"):
        plot_curves([tmp_path], tmp_path / "p.png")
