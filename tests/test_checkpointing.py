"""Checkpoints verify themselves: a manifest of sizes and SHA-256s, checked on resume, with a fall back to
the newest intact checkpoint; the per-step logs forget the steps a resumed run logs again."""

from __future__ import annotations

import json

import pytest
import torch

from mmgen.training import checkpointing
from mmgen.training.checkpointing import CheckpointError, drop_steps_after, resume_latest, save_checkpoint


@pytest.fixture
def trainer(one_thread):
    """A real single-process CPU Accelerator around a tiny model and optimizer."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    accelerator = Accelerator(cpu=True)
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 4)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    model, optimizer = accelerator.prepare(model, optimizer)
    yield accelerator, model, optimizer
    AcceleratorState._reset_state(reset_partial_state=True)


def _train_and_save(accelerator, model, optimizer, run, steps=(2, 4)) -> dict:
    """One optimizer step per saved step; returns {step: weights saved then}."""
    generator = torch.Generator().manual_seed(0)
    saved = {}
    for step in steps:
        model(torch.randn(2, 4, generator=generator)).square().sum().backward()
        optimizer.step()
        optimizer.zero_grad()
        save_checkpoint(accelerator, run, step, trainer_state={"images_seen": step}, generators={"g": generator},
                        rank_state={"data": {"position": step}})  # fmt: skip
        saved[step] = {k: v.clone() for k, v in model.state_dict().items()}
    return saved


def _resume(accelerator, run):
    warnings = []
    resumed = resume_latest(accelerator, run, generators={"g": torch.Generator()}, warn=warnings.append)
    return resumed, warnings


def test_every_file_is_in_the_manifest_with_its_size_and_hash(trainer, tmp_path):
    _train_and_save(*trainer, tmp_path, steps=(2,))
    ckpt = checkpointing.checkpoint_dir(tmp_path, 2)
    files = json.loads((ckpt / checkpointing.MANIFEST).read_text())["files"]
    on_disk = {p.relative_to(ckpt).as_posix() for p in ckpt.rglob("*") if p.is_file()}
    assert set(files) == on_disk - {checkpointing.MANIFEST, checkpointing.MARKER}
    assert {"model.safetensors", "trainer_state.json", "generators-rank0.safetensors"} <= set(files)
    assert files["trainer_state.json"]["size"] == (ckpt / "trainer_state.json").stat().st_size
    assert checkpointing.verify_checkpoint(ckpt) is None


def test_a_truncated_newest_checkpoint_falls_back_to_the_previous_one_with_a_warning(trainer, tmp_path):
    accelerator, model, _ = trainer
    saved = _train_and_save(*trainer, tmp_path)
    newest = checkpointing.checkpoint_dir(tmp_path, 4)
    weights = newest / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])  # a copy cut short
    (path, state, rank_state), warnings = _resume(accelerator, tmp_path)
    assert path == checkpointing.checkpoint_dir(tmp_path, 2)
    assert state["step"] == 2 and state["images_seen"] == 2 and rank_state == {"data": {"position": 2}}
    for name, value in model.state_dict().items():
        torch.testing.assert_close(value, saved[2][name], rtol=0, atol=0)
    assert len(warnings) == 1 and str(newest) in warnings[0]
    assert "model.safetensors is" in warnings[0] and "bytes, the manifest says" in warnings[0]


def test_a_cut_json_state_is_damage_too(trainer, tmp_path):
    _train_and_save(*trainer, tmp_path)
    state = checkpointing.checkpoint_dir(tmp_path, 4) / "trainer_state.json"
    state.write_text(state.read_text()[:10])
    (path, _, _), warnings = _resume(trainer[0], tmp_path)
    assert path.name == "step-00000002" and "trainer_state.json is" in warnings[0]


def test_a_checkpoint_without_a_manifest_loads_unverified_and_falls_back_when_it_cannot(trainer, tmp_path):
    """Checkpoints written before manifests existed: loaded as they are; a failure moves to the previous one."""
    _train_and_save(*trainer, tmp_path)
    for step in (2, 4):
        (checkpointing.checkpoint_dir(tmp_path, step) / checkpointing.MANIFEST).unlink()
    (path, _, _), warnings = _resume(trainer[0], tmp_path)
    assert path.name == "step-00000004" and warnings == []
    (checkpointing.checkpoint_dir(tmp_path, 4) / "model.safetensors").write_bytes(b"\0" * 16)
    (path, _, _), warnings = _resume(trainer[0], tmp_path)
    assert path.name == "step-00000002"
    assert "step-00000004 (written without a manifest) does not load" in warnings[0]


def test_no_intact_checkpoint_is_one_error_naming_the_run(trainer, tmp_path):
    _train_and_save(*trainer, tmp_path)
    for step in (2, 4):
        (checkpointing.checkpoint_dir(tmp_path, step) / "optimizer.bin").write_bytes(b"")
    with pytest.raises(CheckpointError) as err:
        _resume(trainer[0], tmp_path)
    assert str(err.value).startswith(f"no intact checkpoint to resume from in {tmp_path / 'checkpoints'}")
    assert "\n" not in str(err.value)
    assert _resume(trainer[0], tmp_path / "fresh") == (None, [])  # no checkpoint at all: a fresh start


def test_resuming_drops_the_logged_steps_after_the_checkpoint(tmp_path):
    log = tmp_path / "metrics.jsonl"
    rows = [{"event": "start"}, *({"step": s, "loss": 1.0 / s} for s in range(1, 6))]
    log.write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"step": 6, "lo')  # killed mid-line
    drop_steps_after(log, 3)
    assert [json.loads(line) for line in log.read_text().splitlines()] == rows[:4]
    assert not list(tmp_path.glob(".tmp-*"))
    drop_steps_after(tmp_path / "absent.jsonl", 3)  # nothing to do
