"""Build the tokenizer, VAE and model of a run from its `Config` (mmgen/config.py)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from mmgen.config import Config, ConfigError, ModelSection, resolve_input_path
from mmgen.configuration_mmgen import MMGenConfig
from mmgen.loading import looks_local
from mmgen.modeling_mmgen import MMGenForConditionalGeneration
from mmgen.tokenization import SpecialIds, load_pretrained_lm_tokenizer, load_tokenizer
from mmgen.vae import MMGenVAE


def load_run_vae(name_or_path: str, sigma_data: float) -> MMGenVAE:
    """A stage-1 output dir (latent stats in its config) or a diffusers VAE on the Hub."""
    path = Path(name_or_path)
    if path.exists() and not (path / "config.json").is_file():
        raise ConfigError(f"model.vae={name_or_path}: no config.json there (is stage 1 finished?)")
    if looks_local(name_or_path) and not path.exists():
        raise ConfigError(f"model.vae={name_or_path}: no such directory")
    try:
        return MMGenVAE.load_pretrained(name_or_path, sigma_data=sigma_data)
    except (OSError, ValueError) as err:
        raise ConfigError(f"model.vae={name_or_path}: cannot load a VAE ({_one_line(err)})") from err


def stage1_makes(vae: str) -> bool:
    """Whether `model.vae` is stage 1's output for the training script to make (a relative path under runs/)."""
    return not Path(vae).is_absolute() and str(vae).startswith("runs/")


def check_input_paths(cfg: Config) -> None:
    """ConfigError naming the setting of a model input that is meant as a directory and is not there; run
    before the minutes of data preparation. A model.vae that stage 1 makes is not checked."""
    m = cfg.model
    for key, value in (("init_from", m.init_from), ("init_text_model", m.init_text_model), ("vae", m.vae)):
        if key == "vae" and stage1_makes(value):
            continue
        if value and looks_local(value) and not Path(value).exists():
            raise ConfigError(f"model.{key}={value}: no such directory")


def objective_params(cfg: Config) -> dict:
    """The run's objective config as the exported model stores it: a plain dict, less sigma_data (a model
    config field of its own); `mmgen.objectives.objective_config` turns it back into the dataclass."""
    return {k: v for k, v in dataclasses.asdict(cfg.objective.params).items() if k != "sigma_data"}


def text_config(cfg: Config, vocab_size: int) -> dict:
    m = cfg.model
    kv = m.num_kv_heads or m.num_heads
    return {
        "model_type": m.backbone,
        "vocab_size": vocab_size,
        "hidden_size": m.hidden_size,
        "intermediate_size": m.intermediate_size or 4 * m.hidden_size,
        "num_hidden_layers": m.num_layers,
        "num_attention_heads": m.num_heads,
        "num_key_value_heads": kv,
        "max_position_embeddings": max(4096, cfg.data.seq_len),
        "pad_token_id": 0,
        "bos_token_id": 2,
        "eos_token_id": 3,
        "tie_word_embeddings": False,
    }


def build_model(cfg: Config, tokenizer, vae: MMGenVAE) -> MMGenForConditionalGeneration:
    m = cfg.model
    common = {
        "vae_config": vae.config_dict(),
        "latent_mean": vae.latent_mean.tolist(),
        "latent_std": vae.latent_std.tolist(),
        "image_size": m.image_size,
        "patch_size": m.patch_size,
        "latent_channels": vae.latent_channels,
        "image_head": m.image_head,
        "image_unet_width": m.image_unet_width,
        "objective": cfg.objective.name,
        "objective_params": objective_params(cfg),
        "sigma_data": cfg.objective.sigma_data,
    }
    if m.init_text_model:
        try:
            model = MMGenForConditionalGeneration.from_pretrained_text_model(
                m.init_text_model, tokenizer=tokenizer, attn_implementation=m.attn_implementation, **common
            )
        except OSError as err:  # not found locally or on the Hub
            raise ConfigError(f"model.init_text_model={m.init_text_model}: cannot load it ({_one_line(err)})") from err
    else:
        config = MMGenConfig(text_config=text_config(cfg, len(tokenizer)),
                             attn_implementation=m.attn_implementation, **common)
        model = MMGenForConditionalGeneration(config)
    if m.init_from:
        init_weights_from(model, m.init_from)
    check_tokenizer_fits(model, tokenizer)
    model.vae.load_state_dict(vae.state_dict())
    model.vae.requires_grad_(False)
    if m.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    return model


def init_weights_from(model: MMGenForConditionalGeneration, source: str) -> None:
    """Copy every weight of the mmgen export `source` into `model` (strict: same names and shapes)."""
    try:
        pretrained = MMGenForConditionalGeneration.from_pretrained(source)
    except (OSError, ValueError) as err:
        raise ConfigError(f"model.init_from: cannot load an mmgen export from {source!r}: {_one_line(err)}") from err
    try:
        model.load_state_dict(pretrained.state_dict())
    except RuntimeError as err:  # torch names the missing, unexpected and mis-shaped tensors
        raise ConfigError(f"model.init_from {source!r}: its weights do not fit the model this config builds "
                         f"(model.* and the VAE must match): {_one_line(err)}") from err


def check_tokenizer_fits(model: MMGenForConditionalGeneration, tokenizer) -> None:
    """Raise unless the tokenizer's special-token ids are the model config's and its ids fit the embeddings."""
    ids = SpecialIds.from_tokenizer(tokenizer).as_config()
    differ = {k: (v, getattr(model.config, k)) for k, v in ids.items() if getattr(model.config, k) != v}
    if differ:
        raise ConfigError(f"model.tokenizer: special-token ids (tokenizer, model config) differ: {differ}")
    rows = model.get_input_embeddings().weight.shape[0]
    if len(tokenizer) > rows:
        raise ConfigError(f"model.tokenizer has {len(tokenizer)} tokens, the model's embedding table {rows} rows")


def build_tokenizer(cfg: Config):
    """The shapes SentencePiece tokenizer (`model.tokenizer`), or with `model.init_text_model` the pretrained
    LM's tokenizer with mmgen's special tokens appended (`load_pretrained_lm_tokenizer`): from
    `model.tokenizer` when that is set to something other than the shapes default, else from the LM's path."""
    m = cfg.model
    default = ModelSection.__dataclass_fields__["tokenizer"].default
    lm_tokenizer = m.tokenizer not in (default, resolve_input_path(default))  # set to something of its own
    try:
        if m.init_text_model:
            return load_pretrained_lm_tokenizer(m.tokenizer if lm_tokenizer else m.init_text_model)
        return load_tokenizer(m.tokenizer)
    except (OSError, ValueError) as err:  # missing files, a Hub id that does not resolve, wrong special ids
        message = _one_line(err)
        raise ConfigError(message if message.startswith("model.") else f"model.tokenizer: {message}") from err


def _one_line(err: BaseException, limit: int = 400) -> str:
    """The error's message on one line (torch and the Hub write several), cut at `limit` characters."""
    text = " ".join(str(err).split()) or type(err).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."
