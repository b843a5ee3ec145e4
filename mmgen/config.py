"""Run configuration: frozen, nested, keyword-only dataclasses filled from YAML plus overrides.

YAML files in `configs/` only set leaves of these dataclasses (torchtitan-style); an unknown key is
an error that names it. Command-line overrides use dotted paths: `--optim.lr 3e-4` or
`--optim.lr=3e-4`. The resolved config is written as JSON beside every run and checkpoint. Every
problem is a `ConfigError` naming the key and where it came from: the YAML file, or the command-line
override. The sections and their loader share this file (a little over 500 lines) so that every
setting a user can write, its default, its check and how a value is read from text are in one place.

Relative paths. Settings that name something the run reads and that must exist (`INPUT_PATHS`:
model.tokenizer, model.vae, model.init_from, model.init_text_model, run.deepspeed_config; and the
`--config` file of training/train.py) are looked up in the working directory first and, when nothing
is there and the path is one of the shipped assets (under configs/ or tokenizers/), under `ASSETS_ROOT`:
the repository root of a checkout (editable installs included), or the copy of those assets inside a
package installed from a wheel. Any other path is kept as given (a Hub id, a stage-1 VAE still to be
trained in the working directory, or an error that names the setting). What the run writes
(run.output_dir, data.shapes_dir), data.shards (a shard pattern) and run.resume are always relative to
the working directory. So `training/train.py` with no arguments works from any directory and writes
under `./runs/` there.
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from mmgen.cli import UsageError
from mmgen.objectives import OBJECTIVES, config_class, objective_config

# pyproject.toml ships configs/ and tokenizers/shapes/ in the wheel as mmgen/_data/; a checkout has them at its root.
_PACKAGED_ASSETS = Path(__file__).resolve().parent / "_data"
ASSETS_ROOT = _PACKAGED_ASSETS if _PACKAGED_ASSETS.is_dir() else Path(__file__).resolve().parents[1]
ASSET_DIRS = ("configs", "tokenizers")  # what the package ships: the only relative paths looked up in ASSETS_ROOT
# (section, key) of the settings that name an existing file or directory: the relative-path rule above
INPUT_PATHS = (("model", "tokenizer"), ("model", "vae"), ("model", "init_from"), ("model", "init_text_model"),
               ("run", "deepspeed_config"))


@dataclass(frozen=True, kw_only=True)
class ModelSection:
    """The network: a Hugging Face causal-LM backbone plus the image embedding and head."""

    init_text_model: str | None = None  # pretrained causal LM (Hub id or dir); None = from scratch
    # an mmgen export (save_pretrained dir or Hub id) whose weights start this run (a curriculum's next stage,
    # fine-tuning); the architecture comes from this config and must match it. Optimizer, schedule and data
    # start fresh; a checkpoint of this run, when resumed, takes precedence.
    init_from: str | None = None
    backbone: Literal["llama", "qwen2"] = "llama"  # architecture when training from scratch
    hidden_size: int = 256
    num_layers: int = 6
    num_heads: int = 4
    num_kv_heads: int | None = None
    intermediate_size: int | None = None  # None = 4 * hidden_size
    image_size: int = 32
    patch_size: int = 1
    # "unet": U-Net down/up blocks around the transformer instead of a linear patch embedding and head
    # (Transfusion); image_unet_width = its channels at the latent's resolution.
    image_head: Literal["linear", "adaln_mlp", "adaln_prompt", "unet"] = "linear"
    image_unet_width: int = 64
    attn_implementation: Literal["sdpa", "eager", "flex_attention"] = "sdpa"
    vae: str = "runs/vae"  # diffusers AutoencoderKL dir (with latent stats) or Hub id
    # The shapes SentencePiece tokenizer; with init_text_model, the LM's own tokenizer is used (from this path
    # when it is set, else from init_text_model) with mmgen's special tokens appended after its vocabulary.
    tokenizer: str = "tokenizers/shapes"
    gradient_checkpointing: bool = False

    def __post_init__(self):
        if self.init_from and self.init_text_model:
            raise ConfigError("model.init_from and model.init_text_model are exclusive: one source of initial weights")


@dataclass(frozen=True, kw_only=True)
class DataSection:
    """Where documents come from and how they are packed into rows."""

    source: Literal["shapes", "shards"] = "shapes"
    shards: str = "runs/data/shapes-train/{shard}"  # for source=shards: a brace pattern, glob or dir
    shapes_dir: str = "runs/data/shapes-train"  # built here by `make_shards` when source=shapes
    num_docs: int = 20000
    samples_per_shard: int = 1000
    seq_len: int = 256
    batch_size: int = 16  # rows per process per micro-step
    num_workers: int = 0
    # source=shapes: seed of the generated documents; not run.seed, so runs that differ only in their seed
    # share one set of shards (a changed setting rebuilds shapes_dir in place, under any run reading it)
    seed: int = 0
    prefetch: int = 2  # batches packed ahead by a background thread while the model computes (0 = off)
    # "all": text loss on every text token, every image a generation target; "assistant": only what the
    # assistant writes (its text, and no noisy copies for images inside user turns)
    loss_on: Literal["all", "assistant"] = "all"
    # source=shapes: document kinds and their mix, NAME or NAME=WEIGHT (t2i, caption, vqa, multiturn);
    # () = all four with mmgen.data.shapes_docs.TASK_WEIGHTS
    tasks: tuple[str, ...] = ()
    max_objects: int = 4  # source=shapes: the most objects in a scene (1 = single objects only)
    # source=shapes: scenes per text-to-image prompt, drawn in one image slot (IMM's particle group of one
    # condition; the prompt is computed once for all of them)
    particles: int = 1
    t2i_max_objects: int | None = None  # source=shapes: the most objects in a text-to-image scene (None = max_objects)
    # image-caption pairs (img2dataset shards) become chats: this share caption -> image, the rest image -> caption
    # (mmgen.data.pairs; 0.8 is Transfusion's share, Zhou et al. 2024)
    pair_text_to_image: float = 0.8
    max_caption_tokens: int | None = None  # a longer pair caption is cut (None: what leaves its image room in a row)

    def __post_init__(self):
        if self.prefetch < 0 or self.num_workers < 0:
            raise ConfigError(f"data.prefetch and data.num_workers must be >= 0, got {self.prefetch}, {self.num_workers}")
        if not 0.0 <= self.pair_text_to_image <= 1.0:
            raise ConfigError(f"data.pair_text_to_image must be in [0, 1], got {self.pair_text_to_image}")
        if self.max_caption_tokens is not None and self.max_caption_tokens < 1:
            raise ConfigError(f"data.max_caption_tokens must be >= 1 (or null), got {self.max_caption_tokens}")
        from mmgen.data.make_shards import ShapesSource  # the shapes world's settings are checked there

        try:
            ShapesSource(num_docs=self.num_docs, tasks=tuple(self.tasks), max_objects=self.max_objects,
                         particles=self.particles, t2i_max_objects=self.t2i_max_objects)
        except ValueError as err:
            raise ConfigError(f"data.{err}") from None


@dataclass(frozen=True, kw_only=True)
class ObjectiveSection:
    """The image objective: its name, its own settings, and how this run weighs and runs it (docs/design.md §7).

    `params` is the objective's config dataclass (`mmgen.objectives.OBJECTIVES`), the one home of its settings
    and their defaults. YAML files and overrides set its fields as leaves of this section, like the
    section's own (`--objective.num_particles 8`, `--objective.kernel gaussian`), and the resolved JSON
    writes them so. A field of another registered objective is accepted and left unused, so a preset can
    switch objective with `--objective.name` alone; a key of no objective is an error naming it.
    """

    name: str = "imm"
    lambda_img: float = 1.0  # the image loss's weight against the text loss
    # IMM's target branch: "prefix" runs only the target copies over the student pass's keys/values,
    # "full" a second forward of the whole batch (same numbers to rounding; prefix is cheaper, README)
    target_pass: Literal["prefix", "full"] = "prefix"
    params: Any = None  # the objective's config; None = its defaults

    def __post_init__(self):
        try:
            cls = config_class(self.name)
        except ValueError:
            raise ConfigError(f"objective.name: {self.name!r} is not one of {sorted(OBJECTIVES)}") from None
        if self.params is None:
            object.__setattr__(self, "params", cls())
        elif type(self.params) is not cls:
            raise ConfigError(f"objective.params must be a {cls.__name__} for objective {self.name!r}, "
                              f"got {type(self.params).__name__}")

    @property
    def sigma_data(self) -> float:
        """Data std of the normalised latents: the objective's, and the VAE's and model's too."""
        return self.params.sigma_data

    def leaves(self) -> dict:
        """The section as YAML writes it: its own settings and the objective's fields side by side."""
        own = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "params"}
        return {**own, **dataclasses.asdict(self.params)}


def _objective_keys() -> set[str]:
    """The keys the objective section accepts: its own and every registered objective's fields."""
    own = {f.name for f in dataclasses.fields(ObjectiveSection)} - {"params"}
    return own.union(*({f.name for f in dataclasses.fields(cls)} for _, cls in OBJECTIVES.values()))


def _build_objective(values: dict, prefix: str) -> ObjectiveSection:
    """The objective section from flat leaves: the section's own, then the named objective's fields."""
    if not isinstance(values, dict):
        raise ConfigError(f"{prefix.rstrip('.')}: expected a mapping, got {values!r}")
    known = _objective_keys()
    unknown = sorted(set(values) - known)
    if unknown:
        raise ConfigError(f"unknown config key {prefix}{unknown[0]!s} (known: {sorted(known)})")
    hints = typing.get_type_hints(ObjectiveSection)
    own = {k: _coerce(v, hints[k], f"{prefix}{k}") for k, v in values.items()
           if k in hints and k not in ("params", "name")}
    name = _coerce(values.get("name", ObjectiveSection.name), str, f"{prefix}name")
    try:
        cls = config_class(name)
    except ValueError:
        raise ConfigError(f"{prefix}name: {name!r} is not one of {sorted(OBJECTIVES)}") from None
    param_hints = typing.get_type_hints(cls)
    params = {k: _coerce(v, param_hints[k], f"{prefix}{k}") for k, v in values.items() if k in param_hints}
    try:
        config = objective_config(name, params, where=prefix.rstrip("."))
    except ValueError as err:
        raise ConfigError(str(err)) from None
    return ObjectiveSection(name=name, params=config, **own)


@dataclass(frozen=True, kw_only=True)
class OptimSection:
    lr: float = 1e-3
    weight_decay: float = 0.0
    beta1: float = 0.9
    beta2: float = 0.95
    warmup_steps: int = 100
    max_steps: int = 2000
    grad_clip: float = 1.0
    grad_accum: int = 1
    ema_decay: float = 0.999

    def __post_init__(self):
        _require("optim", self, lr="> 0", weight_decay=">= 0", beta1="in [0, 1)", beta2="in [0, 1)",
                 warmup_steps=">= 0", max_steps=">= 1", grad_clip="> 0", grad_accum=">= 1", ema_decay="in [0, 1)")


@dataclass(frozen=True, kw_only=True)
class RunSection:
    name: str = "default"
    output_dir: str = "runs"
    seed: int = 0
    mixed_precision: Literal["no", "bf16", "fp16"] = "bf16"
    log_every: int = 10
    checkpoint_every: int = 250
    keep_last: int = 2
    sample_every: int = 500
    resume: str = "auto"  # "auto" (newest complete checkpoint), "none", or a checkpoint dir
    max_nonfinite_in_a_row: int = 10
    tracker: Literal["tensorboard", "wandb", "none"] = "tensorboard"
    # CPU only: intra-op threads per process. -1 = cores / processes (`accelerate launch` exports
    # OMP_NUM_THREADS=1, which would leave a single-process run on one core), 0 = keep torch's setting.
    cpu_threads: int = -1
    deepspeed_config: str | None = None  # set by presets that run under DeepSpeed

    def __post_init__(self):
        _require("run", self, log_every=">= 1", checkpoint_every=">= 1", keep_last=">= 0", sample_every=">= 0",
                 max_nonfinite_in_a_row=">= 1")


@dataclass(frozen=True, kw_only=True)
class EvalSection:
    at_end: bool = True
    num_steps: tuple[int, ...] = (1, 2, 4, 8)
    guidance: float = 1.0
    num_samples: int = 100
    # learning curve (mmgen/training/curves.py): every curve_every steps (0 = never), curve_samples prompts
    # of each kind at each of curve_num_steps sampling steps, written to RUN/curve.jsonl and RUN/curve.png
    curve_every: int = 0
    curve_samples: int = 32
    curve_num_steps: tuple[int, ...] = (4,)

    def __post_init__(self):
        _require("eval", self, num_steps="step counts >= 1", curve_num_steps="step counts >= 1", guidance=">= 0",
                 num_samples=">= 1", curve_every=">= 0", curve_samples=">= 1")


_RANGES = {  # the ranges `_require` knows, by the words its error message uses
    ">= 0": lambda v: v >= 0,
    ">= 1": lambda v: v >= 1,
    "> 0": lambda v: v > 0,
    "in [0, 1)": lambda v: 0 <= v < 1,
    "step counts >= 1": lambda v: len(v) > 0 and all(k >= 1 for k in v),
}


def _require(section: str, obj, **ranges: str) -> None:
    """Raise a ConfigError naming `section.key` and its range (a key of `_RANGES`) for the first value outside it."""
    for key, expected in ranges.items():
        value = getattr(obj, key)
        if not _RANGES[expected](value):
            raise ConfigError(f"{section}.{key} must be {expected}, got {value!r}")


@dataclass(frozen=True, kw_only=True)
class Config:
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    objective: ObjectiveSection = field(default_factory=ObjectiveSection)
    optim: OptimSection = field(default_factory=OptimSection)
    run: RunSection = field(default_factory=RunSection)
    eval: EvalSection = field(default_factory=EvalSection)


class ConfigError(UsageError):
    """A config file or override does not fit the dataclasses; the message names the key and its source."""


def _coerce(value: Any, hint: Any, key: str) -> Any:
    """Convert a YAML/CLI value to the annotated type, or raise naming `key`."""
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        is_none = value is None or (isinstance(value, str) and value.lower() in ("none", "null"))
        if is_none and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except ConfigError as err:
                errors.append(str(err))
        raise ConfigError("; ".join(errors))
    if origin is Literal:
        for choice in args:
            if value == choice or str(value) == str(choice):
                return choice
        raise ConfigError(f"{key}: {value!r} is not one of {list(args)}")
    if origin is tuple:
        if isinstance(value, str):
            value = [v for v in value.replace("(", "").replace(")", "").split(",") if v.strip()]
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            value = [value]  # `--eval.num_steps 4`: one number is a one-element list
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        return tuple(_coerce(v, args[0], key) for v in value)
    if hint is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        raise ConfigError(f"{key}: expected true/false, got {value!r}")
    if hint in (int, float):
        if isinstance(value, bool):
            raise ConfigError(f"{key}: expected {hint.__name__}, got a boolean")
        try:
            converted = hint(value) if hint is float else int(str(value), 0) if isinstance(value, str) else value
        except (TypeError, ValueError):
            raise ConfigError(f"{key}: expected {hint.__name__}, got {value!r}") from None
        if hint is int and not isinstance(converted, int):
            if float(converted) != int(converted):
                raise ConfigError(f"{key}: expected an integer, got {value!r}")
            converted = int(converted)
        return converted
    if hint is str:
        if not isinstance(value, (str, int, float)):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return str(value)
    raise ConfigError(f"{key}: unsupported type {hint}")


def _build(cls: type, values: dict, prefix: str = "") -> Any:
    if not isinstance(values, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: expected a mapping, got {values!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise ConfigError(f"unknown config key {prefix}{unknown[0]!s} (known: {sorted(names)})")
    kwargs = {}
    for name, value in values.items():
        hint = hints[name]
        if hint is ObjectiveSection:
            kwargs[name] = _build_objective(value, f"{prefix}{name}.")
        elif dataclasses.is_dataclass(hint):
            kwargs[name] = _build(hint, value, f"{prefix}{name}.")
        else:
            kwargs[name] = _coerce(value, hint, f"{prefix}{name}")
    return cls(**kwargs)


def _set_dotted(tree: dict, dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = tree
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {dotted}: {part} is not a section")
    node[parts[-1]] = value


def parse_overrides(argv: Sequence[str]) -> dict:
    """`["--optim.lr", "3e-4", "--run.name=x"]` -> nested dict of raw string values."""
    tree: dict = {}
    items = list(argv)
    i = 0
    while i < len(items):
        arg = items[i]
        if not arg.startswith("--"):
            raise ConfigError(f"expected --section.key VALUE, got {arg!r}")
        key = arg[2:]
        if "=" in key:
            key, value = key.split("=", 1)
        else:
            if i + 1 >= len(items):
                raise ConfigError(f"override --{key} has no value")
            value = items[i + 1]
            i += 1
        if "." not in key:
            raise ConfigError(f"override --{key}: use --section.key (sections: {[f.name for f in dataclasses.fields(Config)]})")
        try:
            parsed = yaml.safe_load(value) if value != "" else value
        except yaml.YAMLError as err:
            raise ConfigError(f"command-line override --{key}: cannot read the value {value!r} "
                              f"({str(err).splitlines()[0]})") from None
        _set_dotted(tree, key.replace("-", "_"), parsed)
        i += 1
    return tree


def _unknown_key(cls: type, values: dict, prefix: str = "") -> tuple[str, list[str]] | None:
    """(dotted key, known names at its level) of the first key of `values` that `cls` does not have."""
    hints = typing.get_type_hints(cls)
    for key, value in values.items():
        if key not in hints:
            return f"{prefix}{key}", sorted(hints)
        if hints[key] is ObjectiveSection and isinstance(value, dict):
            known = _objective_keys()
            unknown = sorted(set(value) - known)
            if unknown:
                return f"{prefix}{key}.{unknown[0]}", sorted(known)
        elif dataclasses.is_dataclass(hints[key]) and isinstance(value, dict):
            found = _unknown_key(hints[key], value, f"{prefix}{key}.")
            if found:
                return found
    return None


def _merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def load_config(path: str | Path | None = None, overrides: Sequence[str] = ()) -> Config:
    """Resolve a YAML file (optional) plus dotted overrides into a frozen `Config`, with relative input
    paths resolved by the rule of the module docstring."""
    raw: dict = {}
    where = ""
    if path is not None:
        path = Path(path)
        where = f"{path}: "
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
        try:
            raw = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as err:
            raise ConfigError(f"{path}: not valid YAML ({err})") from None
        except (OSError, UnicodeDecodeError) as err:
            raise ConfigError(f"config file {path}: cannot read it ({err})") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: expected a mapping of sections at the top level")
    tree = parse_overrides(overrides)
    unknown = _unknown_key(Config, tree)
    if unknown:
        key, known = unknown
        raise ConfigError(f"command-line override --{key}: unknown config key {key} (known: {known})")
    try:
        config = _build(Config, _merge(raw, tree))
    except ConfigError as err:
        if tree and _builds(raw):  # the file alone is fine: an override (or its combination with the file)
            raise ConfigError(_from_overrides(str(err), tree)) from None
        raise ConfigError(f"{where}{err}") from None
    return resolve_paths(config)


def _builds(raw: dict) -> bool:
    try:
        _build(Config, raw)
    except ConfigError:
        return False
    return True


def _from_overrides(message: str, tree: dict) -> str:
    """`message` attributed to the one override it names, else to the command-line overrides."""
    def dotted(node: dict, prefix: str = "") -> list[str]:
        return [k for key, v in node.items()
                for k in (dotted(v, f"{prefix}{key}.") if isinstance(v, dict) else [f"{prefix}{key}"])]

    named = [key for key in dotted(tree) if key in message]
    if len(named) == 1:
        return f"command-line override --{named[0]}: {message.removeprefix(f'{named[0]}: ')}"
    return f"command-line overrides: {message}"


def resolve_input_path(value: str | None, root: Path = ASSETS_ROOT) -> str | None:
    """`value` as given when it is absolute, exists from the working directory, is not a shipped asset or is
    not under `root` either; else its path under `root` (the rule of the module docstring)."""
    if not value:
        return value
    path = Path(value)
    if path.is_absolute() or path.exists() or path.parts[0] not in ASSET_DIRS or not (root / path).exists():
        return value
    return str(root / path)


def resolve_paths(config: Config, root: Path = ASSETS_ROOT) -> Config:
    """`config` with every setting of `INPUT_PATHS` passed through `resolve_input_path`."""
    sections: dict[str, dict] = {}
    for section, key in INPUT_PATHS:
        value = getattr(getattr(config, section), key)
        resolved = resolve_input_path(value, root)
        if resolved != value:
            sections.setdefault(section, {})[key] = resolved
    return dataclasses.replace(config, **{name: dataclasses.replace(getattr(config, name), **changes)
                                          for name, changes in sections.items()})


def config_to_dict(config: Any) -> dict:
    """The config as nested plain values; the objective section flat, as YAML sets it."""
    out = dataclasses.asdict(config)
    if isinstance(config, Config):
        out["objective"] = config.objective.leaves()
    return out


def save_config_json(config: Any, path: str | Path) -> None:
    Path(path).write_text(json.dumps(config_to_dict(config), indent=2, sort_keys=True) + "\n")


def config_from_dict(values: dict) -> Config:
    return _build(Config, values)
