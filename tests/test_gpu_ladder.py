"""eval/gpu_ladder_report.py: the GPU ladder's results folders -> one JSON + a bar chart."""

import json

import pytest
from train_helpers import load_script


def _quick(single8: float) -> dict:
    entry = lambda a: {"accuracy": a, "n": 100, "ci95": [max(0.0, a - 0.1), min(1.0, a + 0.1)]}
    return {"single@4": entry(single8 / 2), "single@8": entry(single8), "two@8": entry(0.0),
            "caption": entry(0.8), "prompt_sensitivity": {"ratio": 1.0}}


def test_report_collects_scores_training_logs_and_export_steps(tmp_path):
    report = load_script("eval/gpu_ladder_report.py")
    first, second = tmp_path / "a" / "res", tmp_path / "b" / "res"
    first.mkdir(parents=True)
    second.mkdir(parents=True)
    (first / "quick_U64.json").write_text(json.dumps(_quick(0.26)))
    (first / "metrics_U64.jsonl").write_text(
        json.dumps({"step": 50, "loss_image": 0.5, "tokens_per_s": 1.0}) + "\n"
        + json.dumps({"step": 947, "loss_image": 0.03, "tokens_per_s": 2.0, "mfu": 0.002}) + "\n")
    (first / "export_U64.log").write_text("loading...\nresumed from runs/ladder/U64/checkpoints/step-00000900 at step 900\n")
    (second / "quick_U64.json").write_text(json.dumps(_quick(0.33)))
    out = tmp_path / "docs" / "ladder.json"
    report.main(["--phase", f"first={first}", "--phase", f"resumed={second}", "--out", str(out), "--note", "n"])
    got = json.loads(out.read_text())
    assert list(got["phases"]) == ["first", "resumed"]
    u = got["phases"]["first"]["U64"]
    assert u["exported_step"] == 900 and u["train_last_logged"]["step"] == 947
    assert u["train_last_logged"]["mfu"] == 0.002
    assert got["phases"]["resumed"]["U64"]["quick_t2i"]["single@8"]["accuracy"] == 0.33
    assert "exported_step" not in got["phases"]["resumed"]["U64"]
    assert out.with_suffix(".png").stat().st_size > 1000

    with pytest.raises(SystemExit, match="no quick_"):
        report.main(["--phase", f"empty={tmp_path}", "--out", str(tmp_path / "x.json")])
