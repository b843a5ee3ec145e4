"""training/train.py end to end on a tiny config: export, multi-process, resume, golden losses."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from train_helpers import ROOT, TINY, TRAIN_TINY_STAGE1, launch, load_script, losses, make_tiny_vae

GOLDEN = ROOT / "tests" / "data" / "golden_losses.json"


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    base = tmp_path_factory.mktemp("train_inputs")
    vae = make_tiny_vae(base / "vae")
    return {"vae": vae, "shards": base / "shards"}


def common(inputs, out: Path, name: str = "t") -> list[str]:
    return ["--model.vae", str(inputs["vae"]), "--data.shapes_dir", str(inputs["shards"]),
            "--run.output_dir", str(out), "--run.name", name]


# Relative and under runs/, so train.py's stage 1 makes it in the working directory (a name no checkout holds).
STAGE1_VAE = "runs/vae-made-by-stage-1"


@pytest.fixture(scope="module")
def user_run(inputs, tmp_path_factory) -> Path:
    """Three steps as a user runs them: `accelerate launch` from a directory of their own, without stage 1's
    VAE (made first, shrunk to seconds), outputs under ./runs/, and the end-of-run evaluation (two samples
    per cell) into the export. Returns that directory."""
    cwd = tmp_path_factory.mktemp("user")
    launch(["--model.vae", STAGE1_VAE, "--data.shapes_dir", str(inputs["shards"]), "--run.name", "t",
            "--eval.at_end", "true", "--eval.num_samples", "2", "--eval.num_steps", "1"],
           script=TRAIN_TINY_STAGE1, cwd=cwd)  # fmt: skip
    return cwd


def test_three_steps_through_accelerate_launch_give_a_loadable_export(user_run):
    run = user_run / "runs" / "t"
    final = run / "final"
    from transformers import AutoModel, AutoProcessor

    import mmgen  # noqa: F401  (registers the Auto classes)

    model = AutoModel.from_pretrained(final)
    processor = AutoProcessor.from_pretrained(final)
    assert type(model).__name__ == "MMGenForConditionalGeneration"
    assert processor.num_image_tokens == model.config.num_image_tokens == 16
    assert (final / "model.safetensors").is_file() and not list(final.glob("*.bin"))
    assert "Evaluation" in (final / "README.md").read_text()
    steps = [row["step"] for row in losses(run)]
    assert steps == [1, 2, 3]
    config = json.loads((run / "config.json").read_text())
    assert config["optim"]["max_steps"] == 3


def test_a_missing_stage1_vae_is_made_and_the_model_is_built_on_it(user_run):
    vae = user_run / STAGE1_VAE
    assert (vae / "COMPLETE").is_file() and (vae / "diffusion_pytorch_model.safetensors").is_file()
    stats = json.loads((vae / "latent_stats.json").read_text())
    exported = json.loads((user_run / "runs" / "t" / "final" / "config.json").read_text())
    assert exported["latent_mean"] == pytest.approx(stats["latents_mean"], rel=1e-6)
    assert exported["latent_std"] == pytest.approx(stats["latents_std"], rel=1e-6)


def _card_rows(card: str) -> dict[str, list[str]]:
    """The model card's evaluation table: {"t2i train/single@1": [accuracy, n, "[lo, hi]", partial], ...}."""
    section = card.split("## Evaluation", 1)[1].split("\n## ", 1)[0]
    rows = [[c.strip() for c in line.strip().strip("|").split("|")] for line in section.splitlines()
            if line.startswith("| ") and not line.startswith("| metric")]
    return {row[0]: row[1:] for row in rows}


def test_the_model_card_table_rounds_each_number_of_its_metrics_in_its_column():
    """Numbers a three-step run never reaches (its accuracies are all 0) go into the card rounded."""
    from mmgen.training.export import _metrics_table

    metrics = {"t2i": {"train/single@4": {"accuracy": 0.4378, "n": 16, "ci95": [0.2312, 0.6682],
                                          "partial": {"valid": 0.9391, "colours": 0.6249}}},
               "caption": {"heldout_combos": {"accuracy": 0.8121, "n": 16, "ci95": [0.57, 0.9341]}}}
    rows = _card_rows("## Evaluation\n" + _metrics_table(metrics))
    assert rows == {"t2i train/single@4": ["0.438", "16", "[0.231, 0.668]", "valid 0.94 colours 0.62"],
                    "caption heldout_combos": ["0.812", "16", "[0.570, 0.934]", ""]}


def test_the_model_card_shows_the_end_of_run_evaluation_numbers(user_run):
    """Every accuracy, count, interval and partial verdict of RUN/eval.json appears, rounded, in the export's
    README.md, and the export carries the same eval.json."""
    run = user_run / "runs" / "t"
    metrics = json.loads((run / "eval.json").read_text())
    assert json.loads((run / "final" / "eval.json").read_text()) == metrics
    card = (run / "final" / "README.md").read_text()
    rows = _card_rows(card)
    cells = {f"{group} {key}": v for group in ("t2i", "caption") for key, v in metrics[group].items()}
    assert set(rows) == set(cells) and len(cells) == 2 * 2 + 2  # splits x (single, two) at 1 step; captions
    for name, v in cells.items():
        accuracy, n, interval, partial = rows[name]
        assert float(accuracy) == pytest.approx(v["accuracy"], abs=5e-4) and int(n) == v["n"] == 2, name
        lo, hi = (float(x) for x in interval.strip("[]").split(","))
        assert (lo, hi) == pytest.approx(tuple(v["ci95"]), abs=5e-4), name
        words = partial.split()
        shown = {k: float(x) for k, x in zip(words[::2], words[1::2])}
        assert shown == pytest.approx(v.get("partial", {}), abs=5e-3), name
    ratio = float(re.search(r"0 = the image ignores the text\): ([0-9.]+)", card)[1])
    assert ratio == pytest.approx(metrics["prompt_sensitivity"]["ratio"], abs=5e-4)


def test_unknown_override_fails_naming_the_key():
    import importlib.util

    from mmgen.config import ConfigError

    spec = importlib.util.spec_from_file_location("train_script", ROOT / "training" / "train.py")
    train = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(train)
    assert train.parse_args(["--optim.max_steps", "7"]).optim.max_steps == 7
    with pytest.raises(ConfigError, match="optim.learning_rate"):
        train.parse_args(["--optim.learning_rate", "1"])


def _final_weights(run: Path) -> dict:
    return load_file(str(run / "final" / "model.safetensors"))


def test_sigkill_mid_run_then_resume_ends_with_identical_weights(inputs, tmp_path):
    args = ["--optim.max_steps", "6", "--run.checkpoint_every", "2", "--eval.curve_every", "3",
            "--eval.curve_samples", "2", "--eval.curve_num_steps", "1"]
    launch([*common(inputs, tmp_path, "straight"), *args])
    killed = launch([*common(inputs, tmp_path, "killed"), *args], check=False, MMGEN_TEST_KILL_AT_STEP="5")
    assert killed.returncode != 0, "the run should have been killed at step 5"
    checkpoints = sorted(p.name for p in (tmp_path / "killed" / "checkpoints").iterdir())
    assert checkpoints == ["step-00000002", "step-00000004"]
    resumed = launch([*common(inputs, tmp_path, "killed"), *args])
    assert "resumed from" in resumed.stdout + resumed.stderr
    a, b = _final_weights(tmp_path / "straight"), _final_weights(tmp_path / "killed")
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=0, msg=name)
    straight = {r["step"]: r["loss"] for r in losses(tmp_path / "straight")}
    after = {r["step"]: r["loss"] for r in losses(tmp_path / "killed")}
    assert after[6] == straight[6]
    # step 5 was logged before the kill and again after the resume from step 4: the log holds it once
    assert [r["step"] for r in losses(tmp_path / "killed")] == [1, 2, 3, 4, 5, 6]
    # the learning curve: the point logged before the kill (step 3) is kept, and the images/tokens seen come
    # back with the checkpoint, so both runs' curves agree
    from mmgen.training.curves import read_curve

    keys = ("step", "images_seen", "image_targets_seen", "tokens_seen")
    curves = [[{k: p[k] for k in keys} for p in read_curve(tmp_path / run)] for run in ("straight", "killed")]
    assert [p["step"] for p in curves[0]] == [3, 6] and curves[0] == curves[1]
    assert 0 < curves[0][0]["image_targets_seen"] <= curves[0][0]["images_seen"] < curves[0][1]["images_seen"]
    point = read_curve(tmp_path / "straight")[0]
    assert {"single@1", "two@1", "caption"} <= point.keys() and point["single@1"]["n"] == 2
    assert (tmp_path / "straight" / "curve.png").is_file()


def test_a_damaged_newest_checkpoint_resumes_from_the_previous_one(inputs, tmp_path):
    """A truncated file in the newest checkpoint: the resume warns naming it, loads the one before, and the
    metrics log ends with each step once."""
    launch([*common(inputs, tmp_path), "--optim.max_steps", "4"])
    damaged = tmp_path / "t" / "checkpoints" / "step-00000004"
    weights = damaged / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    resumed = launch([*common(inputs, tmp_path), "--optim.max_steps", "6"])
    assert f"warning: checkpoint {damaged} is damaged: model.safetensors is 1000 bytes" in resumed.stderr
    assert f"resumed from {tmp_path / 't' / 'checkpoints' / 'step-00000002'} at step 2" in resumed.stdout
    assert [r["step"] for r in losses(tmp_path / "t")] == [1, 2, 3, 4, 5, 6]
    assert _intact(damaged)  # rewritten whole at step 4 of the resumed run


def _intact(path: Path) -> bool:
    from mmgen.training.checkpointing import verify_checkpoint

    return (path / "manifest.json").is_file() and verify_checkpoint(path) is None


@pytest.mark.parametrize("args, message", [
    (["--model.hiden_size", "3"], "error: command-line override --model.hiden_size: unknown config key"),
    (["--optim.max_steps", "0"], "error: command-line override --optim.max_steps: optim.max_steps must be >= 1"),
    (["--config", "nope.yaml"], "error: config file nope.yaml does not exist"),
    (["--model.tokenizer", "nope/tok"], "error: model.tokenizer: nope/tok: no tokenizer.json"),
])  # fmt: skip
def test_configuration_errors_are_one_line_with_status_2(tmp_path, args, message):
    """From outside the repository too; --debug shows the traceback instead."""
    import subprocess
    import sys

    from train_helpers import env

    cmd = [sys.executable, str(ROOT / "training" / "train.py"), "--run.output_dir", str(tmp_path), *args]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env(), capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.startswith(message) and proc.stderr.count("\n") == 1, proc.stderr[-2000:]
    if args[0] == "--optim.max_steps":
        debug = subprocess.run([*cmd, "--debug"], cwd=tmp_path, env=env(), capture_output=True, text=True,
                               timeout=300, check=False)  # fmt: skip
        assert "Traceback" in debug.stderr and "ConfigError: command-line override" in debug.stderr


def test_the_default_config_finds_the_repositorys_tokenizer_from_another_directory(tmp_path, monkeypatch):
    from mmgen.training.build import build_tokenizer

    train = load_script("training/train.py")
    monkeypatch.chdir(tmp_path)
    cfg = train.parse_args([])
    assert cfg.model.tokenizer == str(ROOT / "tokenizers" / "shapes") and cfg.run.output_dir == "runs"
    assert len(build_tokenizer(cfg)) > 16
    assert train.parse_args(["--config", "configs/default_fm.yaml"]).objective.name == "flow_matching"


def test_golden_loss_curve_of_the_tiny_config(inputs, tmp_path):
    """20 steps of the tiny config in fp32; a change to the objective, model or data shows up here.
    Regenerate deliberately with MMGEN_UPDATE_GOLDEN=1 and say why in the commit."""
    import os

    launch([*common(inputs, tmp_path), "--optim.max_steps", "20", "--run.checkpoint_every", "100"])
    rows = losses(tmp_path / "t")
    curve = {"text": [r["loss_text"] for r in rows], "image": [r["loss_image"] for r in rows]}
    if os.environ.get("MMGEN_UPDATE_GOLDEN") == "1":
        GOLDEN.write_text(json.dumps(curve, indent=1) + "\n")
    golden = json.loads(GOLDEN.read_text())
    assert len(curve["text"]) == 20
    torch.testing.assert_close(torch.tensor(curve["text"]), torch.tensor(golden["text"]), rtol=2e-3, atol=1e-4)
    # Image losses run from ~1e-5 to ~0.1: the tolerance is relative; atol stays above float32 round-off of an
    # MMD^2 (a difference of kernel means of order 1), far below the smallest golden value.
    torch.testing.assert_close(torch.tensor(curve["image"]), torch.tensor(golden["image"]), rtol=2e-2, atol=1e-6)
    assert curve["text"][-1] < curve["text"][0]  # it learns


def test_throughput_is_logged_per_step_of_each_window_in_non_pad_tokens(inputs, tmp_path):
    """log_every 2 over 3 steps: windows of 2 and 1 steps. tokens_per_s x seconds_per_step is the non-pad
    tokens of a step (fewer than the rows' batch_size x seq_len positions, more than none)."""
    launch([*common(inputs, tmp_path), "--run.log_every", "2"])
    rows = losses(tmp_path / "t")
    assert [r["step"] for r in rows] == [2, 3]
    for r in rows:
        assert r["seconds_per_step"] > 0
        assert 0 < r["tokens_per_s"] * r["seconds_per_step"] < 4 * 128  # tiny_train.yaml: 4 rows x 128
        assert r["images_per_s"] * r["seconds_per_step"] >= 1


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["ddp", "zero2", "zero3"])
def test_two_processes_really_shard(inputs, tmp_path, mode):
    launcher = {
        "ddp": ["--multi_gpu", "--num_processes", "2"],
        "zero2": ["--use_deepspeed", "--num_processes", "2", "--zero_stage", "2"],
        "zero3": ["--use_deepspeed", "--num_processes", "2", "--zero_stage", "3",
                  "--zero3_save_16bit_model", "true"],
    }[mode]
    proc = launch(common(inputs, tmp_path), launcher=launcher, timeout=600,
                  TORCH_EXTENSIONS_DIR=str(Path.home() / ".cache" / "mmgen-torch-extensions"))
    ranks = [json.loads((tmp_path / "t" / "ranks" / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["world"] for r in ranks] == [2, 2]
    assert set(ranks[0]["shards_read"]).isdisjoint(ranks[1]["shards_read"])
    assert ranks[0]["shards_read"] and ranks[1]["shards_read"]
    assert (tmp_path / "t" / "final" / "model.safetensors").is_file(), proc.stdout[-2000:]


def test_non_finite_losses_are_skipped_counted_and_stop_the_run_when_in_a_row():
    from mmgen.training.step import NonFiniteGuard

    guard = NonFiniteGuard(max_in_a_row=3)
    assert guard.skip(False, step=1) and guard.skip(False, step=1)
    assert not guard.skip(True, step=1)  # a finite step resets the streak
    assert guard.skip(False, step=2) and guard.skip(False, step=2)
    with pytest.raises(FloatingPointError, match="3 non-finite losses in a row at step 2"):
        guard.skip(False, step=2)
    assert guard.total == 5


def test_run_seed_does_not_rebuild_the_shared_shards_but_data_seed_does(inputs, tmp_path, capsys):
    """Runs that differ only in run.seed share data.shapes_dir (rebuilding it in place would change the
    documents under a run still reading them); data.seed is what the documents are drawn from."""
    import importlib.util
    import sys

    sys.path.insert(0, str(ROOT / "training"))
    spec = importlib.util.spec_from_file_location("train_script", ROOT / "training" / "train.py")
    train = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(train)
    from train_helpers import TINY, MainProcess

    from mmgen.config import load_config

    def prepare(*overrides):
        cfg = load_config(TINY, ["--model.vae", str(inputs["vae"]), "--data.shapes_dir", str(tmp_path / "shards"),
                                 *overrides])  # fmt: skip
        train.prepare_inputs(cfg, MainProcess())
        return json.loads((tmp_path / "shards" / "train-manifest.json").read_text())["config"]["seed"]

    assert prepare("--run.seed", "5") == 0
    capsys.readouterr()
    assert prepare("--run.seed", "6") == 0 and "rebuilding" not in capsys.readouterr().err
    assert prepare("--data.seed", "1") == 1 and "rebuilding" in capsys.readouterr().err


def test_init_from_an_export_starts_from_its_weights_and_rejects_another_architecture(tmp_path):
    """model.init_from (a curriculum's next stage): the built model holds the export's weights exactly; an
    export of another width is refused with an error naming the setting."""
    from mmgen.config import ConfigError, load_config
    from mmgen.training.build import build_model, build_tokenizer, load_run_vae

    vae_dir = make_tiny_vae(tmp_path / "vae")
    vae = load_run_vae(str(vae_dir), 1.0)
    base = ["--model.vae", str(vae_dir), "--model.image_head", "unet", "--model.image_unet_width", "8"]
    cfg = load_config(TINY, base)
    torch.manual_seed(1)
    first = build_model(cfg, build_tokenizer(cfg), vae)
    first.save_pretrained(tmp_path / "stage1")
    torch.manual_seed(2)  # another init: only init_from can make the weights equal
    second = build_model(load_config(TINY, [*base, "--model.init_from", str(tmp_path / "stage1")]),
                         build_tokenizer(cfg), vae)
    a, b = first.state_dict(), second.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    torch.manual_seed(2)
    fresh = build_model(cfg, build_tokenizer(cfg), vae).state_dict()
    assert not all(torch.equal(a[k], fresh[k]) for k in a)

    with pytest.raises(ValueError, match="model.init_from"):
        wider = [*base, "--model.hidden_size", "48", "--model.init_from", str(tmp_path / "stage1")]
        build_model(load_config(TINY, wider), build_tokenizer(cfg), vae)
    with pytest.raises(ConfigError, match="exclusive"):
        load_config(TINY, ["--model.init_from", "x", "--model.init_text_model", "y"])
