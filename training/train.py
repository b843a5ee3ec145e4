"""Train mmgen: `accelerate launch training/train.py [--config FILE] [--section.key VALUE ...]`.

With no arguments it runs the embedded default (configs/default.yaml) on this machine: stage 1
(the VAE, training/train_vae.py) if its output is missing, the shapes-world shards if missing,
then the model, an evaluation with the exact shapes judge, and a Hugging Face export in
`runs/<name>/final/`. With a config it scales through accelerate (DDP, DeepSpeed ZeRO-2/3).

The loop, in order: batch -> losses (text CE + lambda_img * IMM, mmgen/training/step.py) ->
backward -> clip -> optimizer/scheduler step -> EMA -> log -> checkpoint (atomic) -> samples.

A wrong setting, file or checkpoint ends the run with one line `error: ...` naming it and exit status
2 (`--debug` shows the traceback); relative paths follow the rule in mmgen/config.py, so the script
runs from any directory. Under `accelerate launch` the launcher adds its own report of the exit status
unless it is given `--quiet`.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import sys
import time
from collections import Counter
from pathlib import Path

import torch

from mmgen.cli import ArgumentParser, run_cli
from mmgen.config import ASSETS_ROOT, Config, ConfigError, load_config, resolve_input_path, save_config_json
from mmgen.data.latents import LatentSpec
from mmgen.data.packing import PackingConfig
from mmgen.extras import require
from mmgen.layout import TokenKind
from mmgen.objectives import get_objective
from mmgen.processing_mmgen import MMGenProcessor
from mmgen.training import checkpointing
from mmgen.training.accel import build_accelerator
from mmgen.training.build import (
    build_model,
    build_tokenizer,
    check_input_paths,
    load_run_vae,
    stage1_makes,
)
from mmgen.training.data import TrainStream, ensure_shapes_shards
from mmgen.training.ema import EMA
from mmgen.training.perf import device_peak_flops, mfu, pass_token_counts, training_dtype, training_flops
from mmgen.training.schedule import build_scheduler
from mmgen.training.step import NonFiniteGuard, compute_losses

METRICS_FILE = "metrics.jsonl"  # one line per logged step


def parse_args(argv=None) -> Config:
    parser = ArgumentParser(description=__doc__.split("\n\n")[0],
                            epilog="Overrides: --section.key VALUE, e.g. --optim.max_steps 100")
    parser.add_argument("--config", default=str(ASSETS_ROOT / "configs" / "default.yaml"),
                        help="YAML preset (a relative path is looked up here, then among mmgen's shipped configs)")
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error")
    args, overrides = parser.parse_known_args(argv)
    return load_config(resolve_input_path(args.config), overrides)


def prepare_inputs(cfg: Config, accelerator) -> str:
    """Stage 1 and the embedded shards, made once by the main process; returns the shard pattern."""
    with accelerator.main_process_first():
        vae_path = Path(cfg.model.vae)
        if accelerator.is_main_process and stage1_makes(cfg.model.vae):
            from mmgen.training.vae_stage import ensure_vae

            ensure_vae(vae_path, resolution=cfg.model.image_size, sigma_data=cfg.objective.sigma_data)
        if cfg.data.source == "shapes":
            if accelerator.is_main_process:
                _check_writable("data.shapes_dir", Path(cfg.data.shapes_dir))
                ensure_shapes_shards(cfg.data.shapes_dir, num_docs=cfg.data.num_docs,
                                     resolution=cfg.model.image_size, seed=cfg.data.seed,
                                     samples_per_shard=cfg.data.samples_per_shard, tasks=cfg.data.tasks,
                                     max_objects=cfg.data.max_objects, particles=cfg.data.particles,
                                     t2i_max_objects=cfg.data.t2i_max_objects)
            return f"{cfg.data.shapes_dir}/train-*.tar"
    return cfg.data.shards


def _check_writable(key: str, path: Path) -> None:
    """ConfigError naming `key` unless `path` is a directory this process can write, or can be made one."""
    existing = next(p for p in (path, *path.parents, Path(".")) if p.exists())
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(f"{key}={path}: {existing} is not a writable directory")


def main(argv=None) -> int:
    return run_cli(train, argv)


def train(argv: list[str]) -> None:
    cfg = parse_args(argv)
    if cfg.eval.curve_every:  # a missing 'plots' extra fails now, not at the first curve point
        require("matplotlib", f"eval.curve_every={cfg.eval.curve_every} (the curve.png plot; 0 turns it off)")
    run_dir = Path(cfg.run.output_dir) / cfg.run.name
    accelerator = build_accelerator(mixed_precision=cfg.run.mixed_precision, grad_accum=cfg.optim.grad_accum,
                                    project_dir=str(run_dir), tracker=cfg.run.tracker)
    device, rank, world = accelerator.device, accelerator.process_index, accelerator.num_processes
    if device.type == "cpu" and cfg.run.cpu_threads != 0:
        threads = cfg.run.cpu_threads if cfg.run.cpu_threads > 0 else max(1, (os.cpu_count() or 1) // world)
        torch.set_num_threads(threads)
        accelerator.print(f"CPU: {threads} thread(s) per process")
    torch.manual_seed(cfg.run.seed)
    if accelerator.is_main_process:
        try:
            run_dir.mkdir(parents=True, exist_ok=True)
            save_config_json(cfg, run_dir / "config.json")
        except OSError as err:
            raise ConfigError(f"run.output_dir={cfg.run.output_dir}: cannot write {run_dir} "
                              f"({err.strerror or err})") from err
    check_input_paths(cfg)  # before the minutes of stage 1 and shards: a wrong path fails at once
    tokenizer = build_tokenizer(cfg)
    shards = prepare_inputs(cfg, accelerator)

    vae = load_run_vae(cfg.model.vae, cfg.objective.sigma_data)
    model = build_model(cfg, tokenizer, vae)
    processor = MMGenProcessor.from_config(model.config, tokenizer)
    num_image_tokens = model.config.num_image_tokens
    ds_plugin = accelerator.state.deepspeed_plugin
    if ds_plugin is not None:  # no dataloader goes through prepare(): tell DeepSpeed the micro-batch size
        ds_plugin.deepspeed_config["train_micro_batch_size_per_gpu"] = cfg.data.batch_size
    # ZeRO-3 partitions parameters across ranks, so a full-weight EMA would need a gather every step.
    zero3 = ds_plugin is not None and ds_plugin.zero_stage == 3
    ema = None if zero3 else EMA(model, decay=cfg.optim.ema_decay)
    if zero3:
        accelerator.print("ZeRO-3: EMA disabled (evaluation and export use the live weights)")
    loss_fn, _ = get_objective(cfg.objective.name, **dataclasses.asdict(cfg.objective.params))
    group_by_condition = getattr(cfg.objective.params, "particle_groups", None) == "condition"  # IMM's groups
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.optim.lr, betas=(cfg.optim.beta1, cfg.optim.beta2),
                                  weight_decay=cfg.optim.weight_decay)
    scheduler = build_scheduler(optimizer, warmup_steps=cfg.optim.warmup_steps, max_steps=cfg.optim.max_steps)
    num_trainable = sum(p.numel() for p in params)
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    vae.to(accelerator.device)  # the frozen encoder stays outside DDP/DeepSpeed (ZeRO-3 would partition it)
    raw_model = accelerator.unwrap_model(model)

    packing = PackingConfig(seq_len=cfg.data.seq_len, num_image_tokens=num_image_tokens,
                            image_size=cfg.model.image_size, num_noisy_copies=1, text_loss=cfg.data.loss_on,
                            image_loss=cfg.data.loss_on,
                            special_ids=processor.special_ids)
    try:
        stream = TrainStream.from_config(shards, tokenizer, packing, cfg.data, seed=cfg.run.seed,
                                         latents=LatentSpec.of(vae, cfg.model.image_size, cfg.model.vae))
    except FileNotFoundError as err:  # a shard pattern that matches nothing
        raise ConfigError(f"data.shards: {err}") from err
    generator = torch.Generator().manual_seed(cfg.run.seed * 1000 + rank)  # objective times, noise, CFG dropout
    step, seen = _resume(cfg, accelerator, run_dir, generator, ema, stream)
    accelerator.print(f"rank {rank}/{world}: shards {shards}; {num_trainable:,} trainable params")
    if accelerator.is_main_process:
        accelerator.init_trackers(cfg.run.name)

    tokens_per_step = cfg.data.batch_size * cfg.data.seq_len * cfg.optim.grad_accum * world
    peak, peak_source = device_peak_flops(device, training_dtype(cfg.run.mixed_precision))
    progress = _progress(accelerator, step, cfg.optim.max_steps)
    guard = NonFiniteGuard(cfg.run.max_nonfinite_in_a_row)
    # this log window: steps, their own seconds (data wait included; checkpoints, samples and curve points
    # not), this rank's images and the token counts of the passes it ran
    window_steps, window_seconds, images_seen, window_tokens, flop_tokens = 0, 0.0, 0, 0, Counter()
    while step < cfg.optim.max_steps:
        step_start = time.perf_counter()
        model.train()
        for _ in range(cfg.optim.grad_accum):
            with accelerator.accumulate(model):
                batch = next(stream)
                losses = compute_losses(model, vae, batch, loss_fn=loss_fn,
                                        lambda_img=cfg.objective.lambda_img, generator=generator, device=device,
                                        group_by_condition=group_by_condition,
                                        target_pass=cfg.objective.target_pass)
                # every rank must agree, or DDP/DeepSpeed would wait for a backward that never comes
                finite = bool(accelerator.reduce((~torch.isfinite(losses.loss.detach())).float(), "max") == 0)
                if finite:
                    accelerator.backward(losses.loss)
                if accelerator.sync_gradients and finite:
                    accelerator.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip)
                if finite:
                    optimizer.step()
                    scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                flop_tokens.update(pass_token_counts(batch["token_kind"], losses.diagnostics["passes"]))  # this rank's
                images_seen += losses.diagnostics.get("num_images", 0)
                window_tokens += int((batch["token_kind"] != TokenKind.PAD).sum())
                seen["images_seen"] += world * losses.diagnostics.get("num_images", 0)
                seen["image_targets_seen"] += world * losses.diagnostics.get("num_image_targets", 0)
                seen["tokens_seen"] += tokens_per_step // cfg.optim.grad_accum
        if guard.skip(finite, step):
            continue
        step += 1
        step_seconds = time.perf_counter() - step_start
        seen["train_seconds"] += step_seconds
        window_steps, window_seconds = window_steps + 1, window_seconds + step_seconds
        if ema is not None:
            ema.update(raw_model)
        if step % cfg.run.log_every == 0 or step == cfg.optim.max_steps:
            seconds = window_seconds / window_steps
            # FLOPs are linear in the token counts: one count per log window (ranks assumed alike)
            flops_per_step = world * training_flops(raw_model, flop_tokens, cfg.data.seq_len) / window_steps
            logs = {"loss": losses.loss.item(), "loss_text": losses.text.item(), "loss_image": losses.image.item(),
                    "lr": scheduler.get_last_lr()[0], "seconds_per_step": seconds,
                    "tokens_per_s": world * window_tokens / window_seconds,  # non-pad tokens, all ranks
                    "images_per_s": world * images_seen / window_seconds, "mfu": mfu(flops_per_step, seconds, peak),
                    "nonfinite_total": guard.total, **_scalars(losses.diagnostics), **_prefixed(stream.stats)}
            accelerator.log(logs, step=step)
            if accelerator.is_main_process:
                with open(run_dir / METRICS_FILE, "a") as f:
                    f.write(json.dumps({"step": step, **logs}) + "\n")
            progress.set_postfix(loss=f"{logs['loss']:.3f}", text=f"{logs['loss_text']:.3f}",
                                 img=f"{logs['loss_image']:.3f}", tok_s=f"{logs['tokens_per_s']:.0f}",
                                 mfu=f"{logs['mfu']:.1%}")
            window_steps, window_seconds, images_seen, window_tokens, flop_tokens = 0, 0.0, 0, 0, Counter()
        progress.update(1)
        if step % cfg.run.checkpoint_every == 0 or step == cfg.optim.max_steps:
            checkpointing.save_checkpoint(accelerator, run_dir, step, trainer_state={"peak_flops": peak_source, **seen},
                                          generators={"objective": generator}, ema=ema,
                                          rank_state={"data": stream.state_dict()}, keep_last=cfg.run.keep_last)
        if cfg.run.sample_every and step % cfg.run.sample_every == 0 and accelerator.is_main_process:
            _samples(raw_model, ema, processor, run_dir, step)
        if cfg.eval.curve_every and step % cfg.eval.curve_every == 0 and accelerator.is_main_process:
            _curve_point(cfg, raw_model, ema, processor, run_dir, step, seen)
        if os.environ.get("MMGEN_TEST_KILL_AT_STEP") == str(step):  # tests: SIGKILL mid-run, then resume
            os.kill(os.getpid(), signal.SIGKILL)
    progress.close()
    stream.close()
    (run_dir / "ranks").mkdir(parents=True, exist_ok=True)
    (run_dir / "ranks" / f"rank{rank}.json").write_text(json.dumps(
        {"rank": rank, "world": world, "shards_read": stream.shards_read, "data": stream.stats}))
    accelerator.wait_for_everyone()
    full_state = accelerator.get_state_dict(model) if zero3 else None  # ZeRO-3: gathered on every rank
    if accelerator.is_main_process:
        _finish(cfg, raw_model, ema, processor, run_dir, step, state_dict=full_state)
    accelerator.end_training()


def _resume(cfg: Config, accelerator, run_dir: Path, generator, ema, stream) -> tuple[int, dict]:
    """Load run.resume's checkpoint ("auto": the newest intact one) into the model, optimizer, EMA, generator
    and stream; returns (step, images/tokens seen). The per-step logs lose the steps after it, which the
    run now logs again."""
    from mmgen.training.curves import CURVE_FILE

    seen = {"images_seen": 0, "image_targets_seen": 0, "tokens_seen": 0, "train_seconds": 0.0}  # all ranks
    resumed = None
    if cfg.run.resume == "auto":
        resumed = checkpointing.resume_latest(accelerator, run_dir, generators={"objective": generator}, ema=ema)
    elif cfg.run.resume != "none":
        resumed = checkpointing.resume_from(accelerator, cfg.run.resume,
                                            generators={"objective": generator}, ema=ema)
    step = 0
    if resumed is not None:
        path, state, rank_state = resumed
        step = state["step"]
        seen = {k: state.get(k, 0) for k in seen}
        stream.load_state_dict(rank_state["data"])
        accelerator.print(f"resumed from {path} at step {step}")
    if accelerator.is_main_process:
        for log in (METRICS_FILE, CURVE_FILE):
            checkpointing.drop_steps_after(run_dir / log, step)
    return step, seen


def _progress(accelerator, start: int, total: int):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=start, disable=not accelerator.is_main_process, desc="train",
                dynamic_ncols=True)


def _scalars(diag: dict) -> dict:
    out = {}
    for k, v in diag.items():
        if isinstance(v, torch.Tensor):
            v = v.float().mean().item() if v.numel() else float("nan")
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            out[f"diag/{k}"] = v
    return out


def _prefixed(stats: dict) -> dict:
    return {f"data/{k}": v for k, v in stats.items()}


def _samples(model, ema, processor, run_dir: Path, step: int) -> None:
    import contextlib

    from mmgen.evaluation.quick import sample_grid

    with ema.swapped_into(model) if ema is not None else contextlib.nullcontext():
        sample_grid(model, processor, run_dir / "samples" / f"step-{step:08d}.png")


def _curve_point(cfg: Config, model, ema, processor, run_dir: Path, step: int, seen: dict) -> None:
    import contextlib

    from mmgen.training.curves import append_point, curve_point, plot_curves

    model.eval()
    with ema.swapped_into(model) if ema is not None else contextlib.nullcontext(), torch.no_grad():
        point = curve_point(model, processor, num_samples=cfg.eval.curve_samples,
                            num_steps=cfg.eval.curve_num_steps, resolution=cfg.model.image_size)
    model.train()
    append_point(run_dir, {"step": step, **seen, **point})
    plot_curves([run_dir], run_dir / "curve.png", labels=[cfg.run.name])
    print(f"curve step {step}: " + ", ".join(f"{k} {v['accuracy']:.2f}" for k, v in point.items()), flush=True)


def _finish(cfg: Config, model, ema, processor, run_dir: Path, step: int, state_dict=None) -> None:
    """EMA weights -> evaluation -> export (model + processor + model card) in RUN/final.

    Under ZeRO-3 (`state_dict` given: the gathered live weights) the local model is partitioned, so
    the end-of-run evaluation is skipped and the export writes the gathered weights."""
    from mmgen.evaluation.quick import end_of_run_evaluation
    from mmgen.training.export import export_final

    if ema is not None:
        ema.copy_to(model)
    model.eval()
    metrics = end_of_run_evaluation(model, processor, cfg) if cfg.eval.at_end and state_dict is None else {}
    if metrics:
        (run_dir / "eval.json").write_text(json.dumps(metrics, indent=2))
    export_final(model, processor, cfg, run_dir / "final", step=step, metrics=metrics, state_dict=state_dict)
    print(f"exported {run_dir / 'final'}" + (f"; eval: {json.dumps(metrics.get('summary', {}))}" if metrics else ""))


if __name__ == "__main__":
    sys.exit(main())
