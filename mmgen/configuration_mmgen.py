"""MMGenConfig: the one config of the interleaved text+image model (docs/design.md §6).

A transformers-5 composite config (a dataclass, like `LlavaConfig` in transformers 5.24):
`text_config` is any causal-LM config resolved through `AutoConfig` (`SubConfigSpec`), the
VAE is a plain diffusers `AutoencoderKL` config dict, everything else is a flat field.

Image geometry: an image of `image_size`^2 pixels -> a latent of `latent_size`^2 =
(image_size / vae_scale_factor)^2 with `latent_channels` channels -> `num_image_tokens` =
(latent_size / patch_size)^2 patch tokens of dimension latent_channels * patch_size^2.

Special-token ids default to the shipped shapes tokenizer (docs/design.md §2); a backbone
initialised from a pretrained LM gets them appended after its own vocabulary
(`MMGenForConditionalGeneration.from_pretrained_text_model`).
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

from transformers import AutoConfig, PretrainedConfig
from transformers.configuration_utils import SubConfigSpec

# Default backbone: a 2-layer Llama, d=64, 4 heads -- seconds per test on a 2-core CPU.
TINY_LLAMA_KWARGS: dict[str, Any] = {
    "vocab_size": 512,
    "hidden_size": 64,
    "intermediate_size": 176,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 4,
    "max_position_embeddings": 4096,
    "pad_token_id": 0,
    "bos_token_id": 2,
    "eos_token_id": 3,
    "tie_word_embeddings": False,
}

IMAGE_HEADS = ("linear", "adaln_mlp", "adaln_prompt", "unet")
PROMPT_HEADS = ("adaln_prompt", "unet")  # heads that also read the final hidden state at the image's <|boi|>

# Names of the special tokens, in the order `from_pretrained_text_model` appends them (docs/design.md §2).
SPECIAL_TOKENS: tuple[tuple[str, str], ...] = (
    ("boi_token_id", "<|boi|>"),
    ("eoi_token_id", "<|eoi|>"),
    ("image_token_id", "<|image|>"),
    ("user_token_id", "<|user|>"),
    ("assistant_token_id", "<|assistant|>"),
    ("end_token_id", "<|end|>"),
)
NUM_RESERVED_TOKENS = 6  # <|reserved_0|> .. <|reserved_5|>


class MMGenConfig(PretrainedConfig):
    """Config of `MMGenForConditionalGeneration`.

    Fields (all keyword-only):
        text_config: backbone config (dict with `model_type`, or a `PretrainedConfig`); None -> tiny Llama.
        vae_config: diffusers `AutoencoderKL` config dict; None -> `mmgen.vae.tiny_vae_config()`.
        latent_mean, latent_std: per-channel mean/std of the raw VAE latents (len = latent_channels):
            z_norm = (z - mean) / std * sigma_data (mmgen/vae.py). None -> the VAE config's own default
            (`scaling_factor`/`shift_factor`). Measured stats live in the VAE's buffers (saved weights).
        image_size, patch_size, latent_channels: image geometry (see module docstring).
        image_head: "linear" (norm -> Linear) or "adaln_mlp" (DiT/MAR-style adaLN residual MLP), both
            after a linear patch embedding; "adaln_prompt": adaln_mlp whose condition also holds the final
            hidden state at the image's <|boi|> (the prompt, as the U-Net decoder reads it); or "unet": Transfusion-style U-Net down blocks embed the latent
            and up blocks with skips decode the tokens (`mmgen/image_embedding.py`; patch_size a power of 2).
        image_head_depth: residual blocks of the adaln_mlp head.
        image_unet_width: channels of the "unet" codec at the latent's resolution (twice that below it).
        time_embed_dim: width of the sinusoidal embedding of t_in and s_in before their MLPs.
        objective: the name of the objective that trained the model; objective_params: its config's fields as
            a plain dict (None -> {}: the config dataclass's defaults). The model and this config never read
            them; samplers resolve them with `mmgen.objectives.objective_config`, which checks them.
        sigma_data: data std of the normalised latents (clean copies enter as latents / sigma_data).
        *_token_id: special-token ids (docs/design.md §2).
    """

    model_type = "mmgen"
    sub_configs_defaults: ClassVar[dict] = {
        "text_config": SubConfigSpec(config_class=AutoConfig, model_type="llama", init_kwargs=TINY_LLAMA_KWARGS),
    }

    text_config: dict | PretrainedConfig | None = None
    vae_config: dict | None = None
    latent_mean: list[float] | None = None
    latent_std: list[float] | None = None
    image_size: int = 32
    patch_size: int = 2
    latent_channels: int = 4
    image_head: str = "linear"
    image_head_depth: int = 2
    image_unet_width: int = 64
    time_embed_dim: int = 256
    objective: str = "imm"
    objective_params: dict | None = None
    sigma_data: float = 0.5
    pad_token_id: int = 0
    bos_token_id: int = 2
    eos_token_id: int = 3
    boi_token_id: int = 4
    eoi_token_id: int = 5
    image_token_id: int = 6
    user_token_id: int = 7
    assistant_token_id: int = 8
    end_token_id: int = 9
    tie_word_embeddings: bool = False

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        if self.vae_config is None:
            from mmgen.vae import tiny_vae_config  # late import: vae.py imports diffusers

            self.vae_config = dict(tiny_vae_config())
        if self.objective_params is None:
            self.objective_params = {}
        self._check()

    # ---- derived geometry -------------------------------------------------------------------------
    @property
    def vae_scale_factor(self) -> int:
        """Pixel -> latent downsampling of AutoencoderKL: 2 ** (number of down blocks - 1)."""
        return 2 ** (len(self.vae_config.get("block_out_channels", [None])) - 1)

    @property
    def latent_size(self) -> int:
        return self.image_size // self.vae_scale_factor

    @property
    def patches_per_side(self) -> int:
        return self.latent_size // self.patch_size

    @property
    def num_image_tokens(self) -> int:
        """N, the number of tokens of one image (every copy of it)."""
        return self.patches_per_side**2

    @property
    def patch_dim(self) -> int:
        return self.latent_channels * self.patch_size**2

    @property
    def head_reads_prompt(self) -> bool:
        """Whether the image head reads the final hidden state at each image's <|boi|> (`PROMPT_HEADS`)."""
        return self.image_head in PROMPT_HEADS

    def special_token_ids(self) -> dict[str, int]:
        """Token string -> id for the multimodal/chat special tokens."""
        return {name: getattr(self, field) for field, name in SPECIAL_TOKENS}

    # ---- validation -------------------------------------------------------------------------------
    def _check(self) -> None:
        """Raise ValueError naming the offending field(s)."""
        for name in ("image_size", "patch_size", "latent_channels", "image_head_depth", "image_unet_width",
                     "time_embed_dim"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"MMGenConfig.{name} must be a positive int, got {value!r}")
        if self.time_embed_dim % 2:
            raise ValueError(f"MMGenConfig.time_embed_dim must be even, got {self.time_embed_dim}")
        if not isinstance(self.vae_config, dict) or "block_out_channels" not in self.vae_config:
            raise ValueError("MMGenConfig.vae_config must be an AutoencoderKL config dict with 'block_out_channels'")
        vae_latents = self.vae_config.get("latent_channels", self.latent_channels)
        if vae_latents != self.latent_channels:
            raise ValueError(
                f"MMGenConfig.latent_channels ({self.latent_channels}) must equal "
                f"vae_config['latent_channels'] ({vae_latents})"
            )
        factor = self.vae_scale_factor * self.patch_size
        if self.image_size % factor:
            raise ValueError(
                f"MMGenConfig.image_size ({self.image_size}) must be divisible by the VAE scale factor "
                f"({self.vae_scale_factor}, from vae_config['block_out_channels']) x patch_size "
                f"({self.patch_size}) = {factor}"
            )
        for name in ("latent_mean", "latent_std"):
            values = getattr(self, name)
            if values is not None and len(values) != self.latent_channels:
                raise ValueError(
                    f"MMGenConfig.{name} has {len(values)} entries, expected latent_channels={self.latent_channels}"
                )
        if self.latent_std is not None and any(not (v > 0 and math.isfinite(v)) for v in self.latent_std):
            raise ValueError(f"MMGenConfig.latent_std must be positive and finite, got {self.latent_std}")
        if not (self.sigma_data > 0 and math.isfinite(self.sigma_data)):
            raise ValueError(f"MMGenConfig.sigma_data must be positive, got {self.sigma_data}")
        if self.image_head not in IMAGE_HEADS:
            raise ValueError(f"MMGenConfig.image_head must be one of {IMAGE_HEADS}, got {self.image_head!r}")
        if self.image_head == "unet":
            if self.patch_size & (self.patch_size - 1):
                raise ValueError(f"MMGenConfig.patch_size must be a power of two with image_head 'unet', got "
                                 f"{self.patch_size}")
            if self.image_unet_width % 8:
                raise ValueError(f"MMGenConfig.image_unet_width must be a multiple of 8 (GroupNorm groups), got "
                                 f"{self.image_unet_width}")
        if not isinstance(self.objective, str) or not self.objective:
            raise ValueError(f"MMGenConfig.objective must be an objective's name, got {self.objective!r}")
        self._check_objective_params()
        self._check_token_ids()

    def _check_objective_params(self) -> None:
        if not isinstance(self.objective_params, dict):
            raise TypeError(f"MMGenConfig.objective_params must be a dict, got {type(self.objective_params)}")
        if "sigma_data" in self.objective_params:
            raise ValueError("MMGenConfig.objective_params must not set 'sigma_data': use MMGenConfig.sigma_data")

    def _check_token_ids(self) -> None:
        vocab_size = getattr(self.text_config, "vocab_size", None)
        fields = ["pad_token_id", "bos_token_id", "eos_token_id"] + [field for field, _ in SPECIAL_TOKENS]
        seen: dict[int, str] = {}
        for field in fields:
            value = getattr(self, field)
            if not isinstance(value, int) or value < 0 or (vocab_size is not None and value >= vocab_size):
                raise ValueError(
                    f"MMGenConfig.{field} ({value!r}) must be an id in [0, text_config.vocab_size={vocab_size})"
                )
            if field in ("boi_token_id", "eoi_token_id", "image_token_id") and value in seen:
                raise ValueError(f"MMGenConfig.{field} ({value}) collides with {seen[value]}")
            seen.setdefault(value, field)


__all__ = ["NUM_RESERVED_TOKENS", "SPECIAL_TOKENS", "TINY_LLAMA_KWARGS", "MMGenConfig"]
