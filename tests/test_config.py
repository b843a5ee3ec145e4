"""Run configs: YAML presets resolve into the frozen dataclasses; bad keys and values are named."""

import json
import re
from pathlib import Path

import pytest

from mmgen.config import Config, ConfigError, config_from_dict, config_to_dict, load_config

ROOT = Path(__file__).resolve().parents[1]
PRESETS = sorted((ROOT / "configs").glob("*.yaml"))
DEEPSPEED = sorted((ROOT / "configs" / "deepspeed").glob("*.json"))
ACCELERATE = sorted((ROOT / "configs" / "accelerate").glob("*.yaml"))


def test_presets_exist():
    names = {p.name for p in PRESETS}
    assert {"default.yaml", "default_fm.yaml", "gpu.yaml", "multigpu_zero2.yaml", "multinode_zero3.yaml"} <= names


@pytest.mark.parametrize("path", PRESETS, ids=lambda p: p.name)
def test_every_preset_resolves(path):
    config = load_config(path)
    assert isinstance(config, Config)
    assert config.model.image_size % config.model.patch_size == 0
    if config.run.deepspeed_config:
        assert (ROOT / config.run.deepspeed_config).is_file()


def test_default_and_fm_twin_share_backbone_data_and_optimiser():
    """The twins differ in the objective and in the number of steps (equal compute: a flow-matching step
    has no target forward, so it is cheaper and the twin gets more of them); everything else is equal."""
    imm = config_to_dict(load_config(ROOT / "configs/default.yaml"))
    fm = config_to_dict(load_config(ROOT / "configs/default_fm.yaml"))
    assert imm["objective"]["name"] == "imm" and fm["objective"]["name"] == "flow_matching"
    assert imm["model"] == fm["model"] and imm["data"] == fm["data"] and imm["eval"] == fm["eval"]
    for key in ("sigma_data", "p_uncond"):
        assert imm["objective"][key] == fm["objective"][key]
    assert fm["optim"]["max_steps"] > imm["optim"]["max_steps"]
    imm["optim"]["max_steps"] = fm["optim"]["max_steps"]
    assert imm["optim"] == fm["optim"]
    imm["run"]["name"] = fm["run"]["name"]
    assert imm["run"] == fm["run"]


def test_unknown_key_in_yaml_is_named(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("optim:\n  learning_rate: 0.1\n")
    with pytest.raises(ConfigError, match="optim.learning_rate"):
        load_config(bad)


def test_unknown_section_is_named():
    with pytest.raises(ConfigError, match="optimizer"):
        load_config(None, ["--optimizer.lr", "1"])


def test_overrides_are_typed():
    config = load_config(None, ["--optim.lr", "3e-4", "--run.name=x", "--eval.num_steps", "1,2", "--model.num_kv_heads", "none"])
    assert config.optim.lr == pytest.approx(3e-4)
    assert config.run.name == "x"
    assert config.eval.num_steps == (1, 2)
    assert config.model.num_kv_heads is None
    assert load_config(None, ["--eval.num_steps", "4"]).eval.num_steps == (4,)  # one number, one-element list


@pytest.mark.parametrize(
    "override, field",
    [
        (["--optim.max_steps", "ten"], "optim.max_steps"),
        (["--objective.name", "gan"], "objective.name"),
        (["--run.resume"], "run.resume"),
        (["--model.gradient_checkpointing", "maybe"], "model.gradient_checkpointing"),
    ],
)
def test_bad_override_values_name_the_field(override, field):
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        load_config(None, override)


def test_json_round_trip_is_identity():
    config = load_config(ROOT / "configs/default.yaml", ["--optim.lr", "0.01"])
    assert config_from_dict(json.loads(json.dumps(config_to_dict(config)))) == config


def _fill_auto(node):
    fills = {
        "train_batch_size": 8,
        "train_micro_batch_size_per_gpu": 4,
        "gradient_accumulation_steps": 2,
        "gradient_clipping": 1.0,
        "lr": 1e-4,
        "betas": [0.9, 0.95],
        "weight_decay": 0.0,
        "enabled": True,
        "reduce_bucket_size": 5e8,
        "stage3_prefetch_bucket_size": 5e8,
        "stage3_param_persistence_threshold": 1e5,
    }
    if isinstance(node, dict):
        return {k: (fills[k] if v == "auto" else _fill_auto(v)) for k, v in node.items()}
    return node


@pytest.mark.parametrize("path", DEEPSPEED, ids=lambda p: p.name)
def test_deepspeed_configs_validate(path):
    # DeepSpeedConfig rejects unknown keys (pydantic extra="forbid") and inconsistent batch sizes.
    from deepspeed.runtime.config import DeepSpeedConfig

    raw = json.loads(path.read_text())
    filled = _fill_auto(raw)
    ds = DeepSpeedConfig(filled)
    assert ds.zero_optimization_stage == raw["zero_optimization"]["stage"]
    # No optimizer block: train.py passes torch's AdamW as a client optimizer, so DeepSpeed never
    # JIT-builds fused_adam (~60 s on CPU) and accelerate never sees two optimizers.
    assert "optimizer" not in raw and "scheduler" not in raw
    if ds.zero_optimization_stage == 3:
        assert raw["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] is True


@pytest.mark.parametrize("path", ACCELERATE, ids=lambda p: p.name)
def test_accelerate_configs_pass_accelerate_launch_up_to_starting_the_processes(path, monkeypatch):
    """`accelerate launch --config_file configs/accelerate/NAME training/train.py` from the repository root (as
    the README runs it), with accelerate's launchers replaced by a recorder: the file loads into accelerate's
    config class, the launch command accepts it and picks one launcher, and a DeepSpeed file it names loads
    into accelerate's DeepSpeedPlugin at the ZeRO stage of its file name (ZeRO-3 gathering 16-bit weights,
    which the export needs)."""
    from accelerate.commands import launch
    from accelerate.commands.config.config_args import ClusterConfig, load_config_from_file
    from accelerate.utils import DeepSpeedPlugin, DistributedType

    monkeypatch.chdir(ROOT)
    relative = str(path.relative_to(ROOT))
    config = load_config_from_file(relative)
    assert isinstance(config, ClusterConfig)
    calls = []
    for name in [n for n in dir(launch) if n.endswith("_launcher")]:  # none may start a process
        monkeypatch.setattr(launch, name, lambda args, name=name: calls.append((name, args)))
    launch.launch_command(launch.launch_command_parser().parse_args(["--config_file", relative, "training/train.py"]))
    [(launcher, args)] = calls
    assert (args.num_processes, args.num_machines) == (config.num_processes, config.num_machines)
    if config.distributed_type != DistributedType.DEEPSPEED:
        assert launcher == "simple_launcher" and config.num_processes == 1
        return
    assert launcher == "deepspeed_launcher"
    plugin = DeepSpeedPlugin(hf_ds_config=args.deepspeed_config_file, zero3_init_flag=args.zero3_init_flag,
                             zero3_save_16bit_model=args.zero3_save_16bit_model)
    assert plugin.zero_stage == int(re.search(r"zero(\d)", path.name)[1])
    assert plugin.zero_stage != 3 or plugin.zero3_save_16bit_model


@pytest.mark.parametrize("objective", ["imm", "flow_matching"])
def test_time_shift_reaches_the_objective_the_model_samples_with(objective):
    """`objective.time_shift` goes into the exported model config, so generation uses the same grid."""
    from mmgen.configuration_mmgen import MMGenConfig
    from mmgen.objectives import objective_config
    from mmgen.training.build import objective_params

    cfg = load_config(ROOT / "configs" / "default.yaml", ["--objective.name", objective, "--objective.time_shift", "3"])
    params = objective_params(cfg)
    assert params["time_shift"] == 3.0
    model_config = MMGenConfig(objective=objective, objective_params=params)
    resolved = objective_config(model_config.objective, model_config.objective_params, sigma_data=model_config.sigma_data)
    assert resolved.time_shift == 3.0


@pytest.mark.parametrize("override, message", [
    (["--run.log_every", "0"], "run.log_every must be >= 1"),
    (["--run.checkpoint_every", "0"], "run.checkpoint_every must be >= 1"),
    (["--optim.max_steps", "0"], "optim.max_steps must be >= 1"),
    (["--optim.warmup_steps", "-1"], "optim.warmup_steps must be >= 0"),
    (["--optim.lr", "-0.001"], "optim.lr must be > 0"),
    (["--optim.ema_decay", "1"], "optim.ema_decay must be in [0, 1)"),
    (["--eval.curve_num_steps", "[0]"], "eval.curve_num_steps must be step counts >= 1"),
    (["--eval.curve_every", "-2"], "eval.curve_every must be >= 0"),
])
def test_out_of_range_values_are_refused_naming_the_key(override, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config(ROOT / "configs" / "default.yaml", override)


def test_every_preset_is_in_range():
    for path in sorted((ROOT / "configs").glob("*.yaml")):
        load_config(path)


def test_a_removed_key_is_an_unknown_key(tmp_path):
    """data.shuffle_buffer was accepted and never used; an old config that sets it is told so."""
    old = tmp_path / "old.yaml"
    old.write_text("data:\n  shuffle_buffer: 1000\n")
    with pytest.raises(ConfigError, match=re.escape(f"{old}: unknown config key data.shuffle_buffer")):
        load_config(old)


@pytest.mark.parametrize("override, message", [
    (["--model.hiden_size", "3"], "command-line override --model.hiden_size: unknown config key model.hiden_size"),
    (["--optim.max_steps", "ten"], "command-line override --optim.max_steps: expected int, got 'ten'"),
    (["--optim.lr=-1"], "command-line override --optim.lr: optim.lr must be > 0, got -1.0"),
    (["--optim.lr", "[1,"], "command-line override --optim.lr: cannot read the value '[1,'"),
])  # fmt: skip
def test_a_bad_override_is_named_as_the_command_line_not_the_file(override, message):
    with pytest.raises(ConfigError) as err:
        load_config(ROOT / "configs" / "default.yaml", override)
    assert str(err.value).startswith(message) and "default.yaml" not in str(err.value)


def test_a_bad_value_in_the_file_is_named_as_the_file_even_with_overrides(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("optim:\n  max_steps: 0\n")
    with pytest.raises(ConfigError, match=re.escape(f"{bad}: optim.max_steps must be >= 1")):
        load_config(bad, ["--optim.lr", "0.1"])
    assert load_config(bad, ["--optim.max_steps", "5"]).optim.max_steps == 5  # an override may fix the file


def test_relative_input_paths_are_found_from_any_directory(tmp_path, monkeypatch):
    """The rule of mmgen/config.py: a relative input path is looked up in the working directory, then (for
    the shipped configs/ and tokenizers/) in the repository; outputs and runs/ stay in the working directory."""
    monkeypatch.chdir(tmp_path)
    config = load_config(ROOT / "configs" / "default.yaml")
    assert config.model.tokenizer == str(ROOT / "tokenizers" / "shapes")
    assert (config.run.output_dir, config.data.shapes_dir) == ("runs", "runs/data/shapes-train")
    zero2 = load_config(ROOT / "configs" / "multigpu_zero2.yaml")
    assert zero2.run.deepspeed_config == str(ROOT / "configs" / "deepspeed" / "zero2.json")
    assert zero2.model.init_text_model == "HuggingFaceTB/SmolLM2-360M"  # in neither place: kept (a Hub id)
    # the checkout's other files (its runs/vae, say) are not this directory's: kept as given
    assert load_config(ROOT / "configs" / "default.yaml", ["--model.vae", "README.md"]).model.vae == "README.md"
    (tmp_path / "tokenizers" / "shapes").mkdir(parents=True)  # one of the working directory's own wins
    assert load_config(ROOT / "configs" / "default.yaml").model.tokenizer == "tokenizers/shapes"
    assert load_config(None, ["--model.tokenizer", "/abs/tok"]).model.tokenizer == "/abs/tok"
