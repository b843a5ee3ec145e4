"""MMGenProcessor: the tokenizer plus image pre/post-processing, producing single-document model inputs.

    processor = AutoProcessor.from_pretrained(path)         # after `import mmgen`
    inputs = processor(messages)                             # OpenAI-style chat, images inside the parts
    inputs = processor({"segments": [...]})                  # a document (docs/design.md §3) or its segments
    inputs = processor("<|user|>Describe <|image|><|end|><|assistant|>", images=[pil])
    text = processor.apply_chat_template(messages, add_generation_prompt=True)

The output (a BatchFeature of torch tensors) has the per-token metadata of docs/design.md §4 for ONE document,
(1, L) each, with no noisy copies and no padding: input_ids, position_ids, token_kind, document_ids, image_ids,
patch_ids, prefix_end, labels; plus `images` (num_images, 3, image_size, image_size) in [-1, 1] and
`image_uncond` (num_images,). Every image becomes <|boi|> + num_image_tokens x <|image|> + <|eoi|>; in text,
one image is written `<|image|>` (optionally wrapped as `<|boi|><|image|><|eoi|>`, as the chat template does).
The layout is built by mmgen.data.packing, so training rows and inference prompts agree token for token.
"""

from __future__ import annotations

import re

import torch
from PIL import Image
from transformers import AutoProcessor, BatchFeature
from transformers.processing_utils import ProcessorMixin

from mmgen.configuration_mmgen import MMGenConfig
from mmgen.data.image_transforms import image_to_tensor, tensor_to_image
from mmgen.data.packing import METADATA_KEYS, PackingConfig, build_batch, tokenize_document
from mmgen.tokenization import BOI_TOKEN, CHAT_TEMPLATE, EOI_TOKEN, IMAGE_TOKEN, SpecialIds

# One image in text: a run of <|image|> markers, optionally inside <|boi|> ... <|eoi|>.
_IMAGE_MARKER = re.compile(
    f"(?:{re.escape(BOI_TOKEN)})?((?:{re.escape(IMAGE_TOKEN)})+)(?:{re.escape(EOI_TOKEN)})?"
)


class MMGenProcessor(ProcessorMixin):
    def __init__(self, tokenizer=None, num_image_tokens: int = 64, image_size: int = 32, chat_template=None):
        if tokenizer is None:
            raise ValueError(
                "MMGenProcessor needs a tokenizer (e.g. mmgen.tokenization.load_tokenizer('tokenizers/shapes'))"
            )
        if chat_template is None:
            chat_template = tokenizer.chat_template or CHAT_TEMPLATE
        super().__init__(tokenizer, chat_template=chat_template)
        if int(num_image_tokens) < 1 or int(image_size) < 1:
            raise ValueError(
                f"MMGenProcessor: num_image_tokens ({num_image_tokens}) and image_size ({image_size}) must be >= 1"
            )
        self.num_image_tokens = int(num_image_tokens)  # N, saved in processor_config.json
        self.image_size = int(image_size)

    @classmethod
    def from_config(cls, config: MMGenConfig, tokenizer) -> MMGenProcessor:
        """N and the image size taken from the model config (N = (image_size / vae factor / patch)^2)."""
        return cls(tokenizer, num_image_tokens=config.num_image_tokens, image_size=config.image_size)

    @property
    def special_ids(self) -> SpecialIds:
        """The ids of <s>, <|boi|>, ... in this processor's tokenizer (fixed for the shapes tokenizer, appended
        after the vocabulary for a pretrained LM's)."""
        return SpecialIds.from_tokenizer(self.tokenizer, where="MMGenProcessor tokenizer")

    @property
    def model_input_names(self) -> list[str]:
        return [*METADATA_KEYS, "images", "image_uncond"]

    # ------------------------------------------------------------------------------------------ images

    def preprocess_images(self, images) -> torch.Tensor:
        """PIL images -> (n, 3, image_size, image_size) float32 in [-1, 1] (resize + centre crop)."""
        tensors = [image_to_tensor(im, self.image_size, where=f"images[{i}]") for i, im in enumerate(images)]
        return torch.stack(tensors) if tensors else torch.zeros(0, 3, self.image_size, self.image_size)

    @staticmethod
    def postprocess_images(images: torch.Tensor) -> list[Image.Image]:
        """(n, 3, H, W) or (3, H, W) tensors in [-1, 1] -> RGB PIL images."""
        images = images.unsqueeze(0) if images.dim() == 3 else images
        return [tensor_to_image(x) for x in images]

    # ------------------------------------------------------------------------------------------ inputs

    def to_segments(self, inputs, images=None, add_generation_prompt: bool = False) -> list[dict]:
        """messages | segments | {"segments": ...} | text with image markers -> a document's segments."""
        images = _flatten_images(images)
        if isinstance(inputs, dict) and "segments" in inputs:
            inputs = inputs["segments"]
        if isinstance(inputs, (list, tuple)) and len(inputs) == 1 and isinstance(inputs[0], str):
            inputs = inputs[0]
        if (
            isinstance(inputs, (list, tuple))
            and inputs
            and all(isinstance(m, dict) and "role" in m for m in inputs)
        ):
            embedded = [p.get("image") for m in inputs if not isinstance(m.get("content"), str)
                        for p in (m.get("content") or []) if p.get("type") == "image"]  # fmt: skip
            if any(im is not None for im in embedded):
                if images:
                    raise ValueError("MMGenProcessor: images given both inside the messages and as `images`")
                if any(im is None for im in embedded):
                    raise ValueError(
                        "MMGenProcessor: some image parts of the messages carry an 'image', some do not"
                    )
                images = embedded
            inputs = self.apply_chat_template(
                inputs, add_generation_prompt=add_generation_prompt, tokenize=False
            )
        if isinstance(inputs, str):
            return self._split_text(inputs, images)
        if isinstance(inputs, (list, tuple)) and all(isinstance(s, dict) for s in inputs):
            if images:
                raise ValueError("MMGenProcessor: segments carry their own images; do not pass `images` too")
            return list(inputs)
        raise TypeError(
            "MMGenProcessor: expected chat messages (dicts with 'role'), a document {'segments': [...]}, a list of "
            f"segments or a text string, got {type(inputs).__name__}"
        )

    def _split_text(self, text: str, images: list) -> list[dict]:
        segments, start, k = [], 0, 0
        for match in _IMAGE_MARKER.finditer(text):
            markers = len(match.group(1)) // len(IMAGE_TOKEN)
            if markers not in (1, self.num_image_tokens):
                raise ValueError(
                    f"MMGenProcessor: an image is written with {markers} {IMAGE_TOKEN} markers; use 1 (or exactly "
                    f"num_image_tokens={self.num_image_tokens})"
                )
            if match.start() > start:
                segments.append({"text": text[start : match.start()]})
            if k >= len(images):
                raise ValueError(
                    f"MMGenProcessor: the text has more image markers than the {len(images)} images given"
                )
            segments.append({"image": images[k]})
            k += 1
            start = match.end()
        if start < len(text):
            segments.append({"text": text[start:]})
        if k != len(images):
            raise ValueError(f"MMGenProcessor: {len(images)} images given but the text has {k} image markers")
        return segments

    def __call__(
        self,
        text=None,
        images=None,
        *,
        add_generation_prompt: bool = False,
        add_special_tokens: bool = True,
        add_eos: bool = False,
        text_loss: str = "all",
        return_tensors: str | None = "pt",
        **kwargs,
    ) -> BatchFeature:
        """One document -> model inputs (see module docstring). `text` may be messages, segments, a document
        or a string; `add_special_tokens` puts <s> first (a leading <s> in the text counts), `add_eos` </s> last."""
        if text is None:
            raise ValueError("MMGenProcessor: nothing to process (pass messages, segments or text)")
        if return_tensors not in ("pt", None):
            raise ValueError(
                f"MMGenProcessor returns torch tensors only, got return_tensors={return_tensors!r}"
            )
        segments = self.to_segments(text, images, add_generation_prompt=add_generation_prompt)
        bos = self.tokenizer.bos_token
        if segments and "text" in segments[0] and segments[0]["text"].startswith(bos):
            rest = segments[0]["text"][len(bos) :]
            segments = [{"text": rest}] + segments[1:]
            add_special_tokens = True
        config = PackingConfig(
            seq_len=1, num_image_tokens=self.num_image_tokens, image_size=self.image_size, num_noisy_copies=0,
            text_loss=text_loss, add_bos=add_special_tokens, add_eos=add_eos, special_ids=self.special_ids,
        )  # fmt: skip
        doc = tokenize_document({"segments": segments}, self.tokenizer, config, where="MMGenProcessor input")
        batch = build_batch([[doc]], config, seq_len=len(doc))
        return BatchFeature({k: batch[k] for k in self.model_input_names})


def _flatten_images(images) -> list:
    if images is None:
        return []
    if isinstance(images, (Image.Image, torch.Tensor)):
        return [images]
    images = list(images)
    # transformers' apply_chat_template passes one list of images per conversation.
    if len(images) == 1 and isinstance(images[0], (list, tuple)):
        images = list(images[0])
    return images


AutoProcessor.register(MMGenConfig, MMGenProcessor, exist_ok=True)
