"""mmgen: interleaved multimodal generation with one transformer.

Text is next-token prediction; at an image slot the same backbone is a flow map trained
with Inductive Moment Matching (Zhou, Ermon & Song, ICML 2025, arXiv 2503.07565).
"""

__version__ = "0.1.0"

from mmgen import modeling_mmgen as _modeling_mmgen  # noqa: F401  registers "mmgen" with the Auto classes
from mmgen import processing_mmgen as _processing_mmgen  # noqa: F401  registers MMGenProcessor with AutoProcessor
