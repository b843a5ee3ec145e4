"""Generation: interleaved text and images from a chat (`generate_interleaved`), one image on a cached
prefix (`generate_image`), and batched helpers for evaluation.

- prompts.py: what a call returns (TextDelta, GeneratedImage, Finished) and prompt collation;
- image.py: the flow-map sampler on a cached prefix, and the uncached reference sampler;
- interleaved.py: the engine that decodes text and runs images as they come;
- batch.py: many prompts or captions in batches, one seed per item (used by evaluation).
"""

from mmgen.generation.batch import caption_images, generate_images_for_prompts
from mmgen.generation.image import decode_latents, generate_image, naive_generate_image
from mmgen.generation.interleaved import generate_interleaved
from mmgen.generation.prompts import (
    Finished,
    GeneratedImage,
    TextDelta,
    caption_prompt,
    collate_prompts,
    t2i_prompt,
)

__all__ = [
    "Finished",
    "GeneratedImage",
    "TextDelta",
    "caption_images",
    "caption_prompt",
    "collate_prompts",
    "decode_latents",
    "generate_image",
    "generate_images_for_prompts",
    "generate_interleaved",
    "naive_generate_image",
    "t2i_prompt",
]
