"""A read-only view of a transformers `DynamicCache` for the cached image step (docs/design.md §9).

During the N refinement steps of one image, the noisy image tokens must attend to the cached
prefix (and to themselves) without being written into the cache: every step sees the same
prefix. The backbone's attention layers call `cache.update(k, v, layer_idx)` and attend over
what it returns; this view returns `cat(prefix, new)` and stores nothing, so the same cache
serves every step and its length never changes.

Only plain `DynamicLayer` layers (full attention, growing by concatenation; transformers 5.24
`cache_utils.py`) can be viewed this way; anything else raises with the layer type named.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache, DynamicLayer


class FrozenPrefixCache(Cache):
    """Wraps `base`; `update` returns prefix + new keys/values without mutating `base`."""

    def __init__(self, base: Cache):  # Cache.__init__ is skipped on purpose: we own no layers
        self.base = base
        self.layers = base.layers  # read-only use: is_sliding / get_seq_length / mask sizes
        self.layer_class_to_replicate = None
        self.offloading = False

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        if layer_idx >= len(self.base.layers):
            raise ValueError(f"the prefix cache has {len(self.base.layers)} layers; layer {layer_idx} is missing")
        layer = self.base.layers[layer_idx]
        if type(layer) is not DynamicLayer:
            raise NotImplementedError(
                f"the cached image step needs DynamicLayer cache layers, got {type(layer).__name__} "
                f"at layer {layer_idx} (sliding-window/static/quantized caches are not supported)"
            )
        if not layer.is_initialized or layer.keys.numel() == 0:
            return key_states, value_states
        keys = torch.cat([layer.keys, key_states], dim=-2)  # (B, H_kv, P + N, d)
        values = torch.cat([layer.values, value_states], dim=-2)
        return keys, values
