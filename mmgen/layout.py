"""The layout of a packed row, shared by data, masks, model, training step and generation.

Every token of a packed row carries metadata, all (B, L) long tensors: its `token_kind`
(:class:`TokenKind`), `position_ids`, `document_ids` (-1 on padding), `image_ids` (index into the
batch's flat image list, -1 if not an image token), `patch_ids` (row-major 0..N-1 inside an image)
and `prefix_end` (for IMAGE_NOISY / IMAGE_TARGET tokens: row index of their image's ``<|boi|>``; -1
otherwise). The packer adds `labels` for the text loss. This module holds only these names, so that
the data pipeline needs no model module and the model needs no data module.
"""

from __future__ import annotations

from enum import IntEnum

__all__ = ["IGNORE_INDEX", "METADATA_KEYS", "MODEL_INPUT_KEYS", "TokenKind"]


class TokenKind(IntEnum):
    """Kind of each token of a packed row. ``<|boi|>`` and ``<|eoi|>`` are TEXT tokens."""

    PAD = 0
    TEXT = 1
    IMAGE_CLEAN = 2
    IMAGE_NOISY = 3
    IMAGE_TARGET = 4


# What the model reads of a row, per token
MODEL_INPUT_KEYS = ("input_ids", "position_ids", "token_kind", "document_ids", "image_ids", "patch_ids", "prefix_end")
# What the packer writes per token: the model's inputs and the (unshifted) text labels
METADATA_KEYS = (*MODEL_INPUT_KEYS, "labels")
IGNORE_INDEX = -100  # label of a token without text loss (torch.nn.functional.cross_entropy's ignore_index)
