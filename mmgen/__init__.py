"""mmgen: interleaved multimodal generation with one transformer.

Text is next-token prediction; at an image slot the same backbone is a flow map trained
with Inductive Moment Matching (Zhou, Ermon & Song, ICML 2025, arXiv 2503.07565).
"""

__version__ = "0.1.0"

# Importing these registers "mmgen" with the Auto classes and MMGenProcessor with AutoProcessor.
from mmgen.configuration_mmgen import MMGenConfig
from mmgen.modeling_mmgen import MMGenForConditionalGeneration
from mmgen.processing_mmgen import MMGenProcessor

__all__ = ["MMGenConfig", "MMGenForConditionalGeneration", "MMGenProcessor", "__version__"]
