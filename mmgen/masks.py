"""Attention masks for packed interleaved text + image rows (docs/design.md §4-§5).

Every token of a packed row carries metadata (all (B, L) long tensors): its `token_kind`
(:class:`TokenKind`), `document_ids` (-1 on padding), `image_ids` (index into the batch's flat
image list, -1 if not an image token) and `prefix_end` (for IMAGE_NOISY / IMAGE_TARGET tokens:
row index of their image's ``<|boi|>``; -1 otherwise). Per image, `image_uncond` (num_images,)
says whether that image's noisy copies are unconditional (classifier-free-guidance dropout).

The rule, for a query q and a key k of the same row (True = q may attend to k):

- never across documents; padding queries see only themselves (so no softmax row is empty and
  no NaN appears); nobody else sees padding;
- nobody sees an IMAGE_NOISY / IMAGE_TARGET token except the tokens of that same copy (same image
  id and same kind), which see each other bidirectionally;
- TEXT: causal (k <= q);
- IMAGE_CLEAN: causal, plus bidirectional within the same image's clean tokens;
- IMAGE_NOISY / IMAGE_TARGET: keys k <= prefix_end[q] that are TEXT or IMAGE_CLEAN (conditional),
  or only k == prefix_end[q] (the ``<|boi|>``) when the image is unconditional; plus its own copy.

The rule is written once, in :func:`_allowed`, with elementwise tensor ops only, so the same code
serves the dense mask (broadcast (B, L, 1) against (B, 1, L)) and the FlexAttention ``mask_mod``
(vmapped over scalars by ``create_block_mask``). The hybrid causal/bidirectional layout follows
Transfusion (Zhou et al., 2024, arXiv 2408.11039) and BAGEL (Deng et al., 2025, arXiv 2505.14683);
the FlexAttention API is ``torch.nn.attention.flex_attention`` (PyTorch docs, "FlexAttention").

Masks come in two forms:

- :func:`build_dense_mask`: (B, 1, L, L) additive float mask (0 where allowed, ``finfo.min``
  elsewhere) for ``sdpa`` / ``eager``, or a bool mask (True = allowed) with ``dtype=torch.bool``;
- :func:`build_block_mask`: a FlexAttention ``BlockMask`` with the equivalent ``mask_mod``.

For the cached image step of generation (docs/design.md §9), :func:`build_image_step_mask` gives the
rows of N image query tokens over (prefix cache of length P + themselves).
"""

from __future__ import annotations

import torch

from mmgen.layout import TokenKind

__all__ = [
    "TokenKind",
    "build_block_mask",
    "build_dense_mask",
    "build_image_step_block_mask",
    "build_image_step_mask",
    "image_token_counts",
    "to_additive",
]


def image_token_counts(token_kind: torch.Tensor) -> dict[str, int]:
    """Tokens of each image copy in a batch: {"clean", "noisy", "target"} (`estimate_flops`'s image_tokens)."""
    kinds = (("clean", TokenKind.IMAGE_CLEAN), ("noisy", TokenKind.IMAGE_NOISY), ("target", TokenKind.IMAGE_TARGET))
    return {name: int((token_kind == kind).sum()) for name, kind in kinds}


def to_additive(allowed: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Bool mask (True = attend) -> the requested dtype: itself for bool, else 0 / finfo(dtype).min."""
    if dtype == torch.bool:
        return allowed
    if not dtype.is_floating_point:
        raise ValueError(f"dtype must be torch.bool or a floating dtype, got {dtype}")
    zero = torch.zeros((), dtype=dtype, device=allowed.device)
    neg = torch.full((), torch.finfo(dtype).min, dtype=dtype, device=allowed.device)
    return torch.where(allowed, zero, neg)


# Plain ints for the rule: FlexAttention traces mask_mod with dynamo, which mishandles
# `tensor == IntEnum member` (it returned a Python bool / long tensor in torch 2.13).
_PAD, _TEXT, _IMAGE_CLEAN, _IMAGE_NOISY, _IMAGE_TARGET = (int(k) for k in TokenKind)


def _allowed(k_idx, doc_q, doc_k, lo_q, hi_q, visible_k, group_q, group_k):
    """The attention rule on per-token features (True = q attends to k).

    q attends to k iff they share a document and either
    (window) k is a TEXT/IMAGE_CLEAN token with lo_q <= k <= hi_q, or
    (group)  q and k carry the same group code (same clean image / same noisy copy / itself).
    :func:`_token_features` derives lo, hi, visible and group from the metadata so that this
    equals the rule of the module docstring (checked against a loop reference in the tests).
    Elementwise ops only: the same code runs on broadcast (B, L, L) tensors for the dense mask
    and on 0-d tensors under vmap as FlexAttention's ``mask_mod``.
    """
    window = visible_k & (k_idx >= lo_q) & (k_idx <= hi_q)
    return (doc_q == doc_k) & (window | (group_q == group_k))


def _token_features(token_kind, document_ids, image_ids, prefix_end, image_uncond):
    """Validate the metadata; return per-token features (doc, lo, hi, visible, group), all (B, L).

    - window [lo, hi] of keys a query sees among TEXT/IMAGE_CLEAN keys: [0, q] for TEXT and
      IMAGE_CLEAN (causal), [0, prefix_end] for a conditional noisy/target copy,
      [prefix_end, prefix_end] (its <|boi|> only) for an unconditional one, empty for PAD;
    - visible: the key is TEXT or IMAGE_CLEAN (nobody sees PAD or noisy/target through a window);
    - group: 3*image+0 for clean, 3*image+1 for noisy, 3*image+2 for target tokens (bidirectional
      within a clean image / a copy); -(position+1) for TEXT and PAD, i.e. only themselves.
    """
    named = {
        "token_kind": token_kind,
        "document_ids": document_ids,
        "image_ids": image_ids,
        "prefix_end": prefix_end,
    }
    for name, t in named.items():
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 2:
            raise ValueError(f"{name} must have shape (B, L), got {tuple(t.shape)}")
        if t.dtype.is_floating_point or t.dtype == torch.bool:
            raise ValueError(f"{name} must be an integer tensor, got {t.dtype}")
        if t.shape != token_kind.shape:
            raise ValueError(
                f"{name} has shape {tuple(t.shape)} but token_kind has {tuple(token_kind.shape)}"
            )
        if t.device != token_kind.device:
            raise ValueError(f"{name} is on {t.device} but token_kind is on {token_kind.device}")
    kind = token_kind.long()
    if kind.numel() and (kind.min() < 0 or kind.max() > _IMAGE_TARGET):
        raise ValueError(f"token_kind values must be in 0..{_IMAGE_TARGET} (TokenKind)")
    B, L = kind.shape
    is_noisy = (kind == _IMAGE_NOISY) | (kind == _IMAGE_TARGET)
    is_image = is_noisy | (kind == _IMAGE_CLEAN)
    if bool((is_image & (image_ids < 0)).any()):
        raise ValueError("image_ids must be >= 0 at every IMAGE_CLEAN/IMAGE_NOISY/IMAGE_TARGET token")
    if bool((is_noisy & ((prefix_end < 0) | (prefix_end >= L))).any()):
        raise ValueError(
            f"prefix_end must be in [0, L={L}) (the <|boi|> row index) at every noisy/target token"
        )

    if image_uncond is None or image_uncond.numel() == 0:
        if image_uncond is not None and bool(is_noisy.any()):
            raise ValueError("image_uncond is empty but the rows hold noisy/target tokens")
        uncond = torch.zeros_like(kind, dtype=torch.bool)
    else:
        if not isinstance(image_uncond, torch.Tensor) or image_uncond.dim() != 1:
            raise ValueError("image_uncond must be a 1-D bool tensor of shape (num_images,)")
        image_uncond = image_uncond.to(device=kind.device, dtype=torch.bool)
        n_img = image_uncond.shape[0]
        if bool((is_image & (image_ids >= n_img)).any()):
            raise ValueError(
                f"image_ids reach {int(image_ids.max())} but image_uncond has only {n_img} entries"
            )
        uncond = image_uncond[image_ids.clamp(0, n_img - 1)] & is_noisy  # (B, L)

    pos = torch.arange(L, device=kind.device).expand(B, L)  # (B, L)
    pe = prefix_end.long()
    lo = torch.where(uncond, pe, torch.zeros_like(pe))
    hi = torch.where(is_noisy, pe, pos)
    hi = torch.where(kind == _PAD, torch.full_like(pe, -1), hi)  # empty window
    visible = (kind == _TEXT) | (kind == _IMAGE_CLEAN)
    copy = (kind - _IMAGE_CLEAN).clamp(min=0)  # 0 clean, 1 noisy, 2 target
    group = torch.where(is_image, 3 * image_ids.long() + copy, -(pos + 1))
    return document_ids.long(), lo, hi, visible, group


def build_dense_mask(
    token_kind: torch.Tensor,
    document_ids: torch.Tensor,
    image_ids: torch.Tensor,
    prefix_end: torch.Tensor,
    image_uncond: torch.Tensor | None = None,
    dtype: torch.dtype = torch.float32,
    query_start: int = 0,
) -> torch.Tensor:
    """Dense (B, 1, L - query_start, L) mask: additive float (0 / finfo(dtype).min) or bool with
    ``dtype=torch.bool``. ``query_start`` > 0 keeps only the rows of the last queries (e.g. tokens run over
    a cache of the first ``query_start`` keys).

    Vectorised: one broadcast of (B, L, 1) queries against (B, 1, L) keys, no loop over L.
    """
    doc, lo, hi, visible, group = _token_features(
        token_kind, document_ids, image_ids, prefix_end, image_uncond
    )
    L = doc.shape[1]
    if not 0 <= query_start < L:
        raise ValueError(f"query_start must be in [0, L={L}), got {query_start}")
    q = lambda t: t[:, None, query_start:, None]  # (B, 1, L - query_start, 1): query axis
    k = lambda t: t[:, None, None, :]  # (B, 1, 1, L): key axis
    idx = torch.arange(L, device=doc.device)
    allowed = _allowed(idx, q(doc), k(doc), q(lo), q(hi), k(visible), q(group), k(group))
    return to_additive(allowed, dtype)  # (B, 1, L - query_start, L)


def build_block_mask(
    token_kind: torch.Tensor,
    document_ids: torch.Tensor,
    image_ids: torch.Tensor,
    prefix_end: torch.Tensor,
    image_uncond: torch.Tensor | None = None,
    block_size: int = 128,
):
    """FlexAttention ``BlockMask`` (B, H=1 broadcast, L, L) with the same rule as the dense mask.

    The ``mask_mod`` closes over the metadata tensors; the mask is built on their device.
    """
    from torch.nn.attention.flex_attention import create_block_mask

    doc, lo, hi, visible, group = _token_features(
        token_kind, document_ids, image_ids, prefix_end, image_uncond
    )
    B, L = doc.shape

    def mask_mod(b, h, q_idx, kv_idx):
        # Kernels may evaluate padded indices past L in a partial block (their result is
        # discarded); clamp the lookups so they never read out of bounds.
        q, k = q_idx.clamp(max=L - 1), kv_idx.clamp(max=L - 1)
        return _allowed(
            kv_idx, doc[b, q], doc[b, k], lo[b, q], hi[b, q], visible[b, k], group[b, q], group[b, k]
        )

    return create_block_mask(mask_mod, B, None, L, L, device=doc.device, BLOCK_SIZE=block_size)


def _image_step_inputs(prefix_length, num_image_tokens, boi_position, image_uncond,
                       prefix_attention_mask, batch_size, device):
    """Validate the cached-image-step arguments; return (B, boi (B,), uncond (B,), valid (B, P))."""
    if prefix_length < 1:
        raise ValueError(f"prefix_length must be >= 1 (it holds <|boi|>), got {prefix_length}")
    if num_image_tokens < 1:
        raise ValueError(f"num_image_tokens must be >= 1, got {num_image_tokens}")
    tensors = [t for t in (boi_position, image_uncond, prefix_attention_mask) if isinstance(t, torch.Tensor)]
    if device is None:
        device = tensors[0].device if tensors else torch.device("cpu")
    sizes = {t.shape[0] for t in tensors}
    if batch_size is not None:
        sizes.add(batch_size)
    if len(sizes) > 1:
        raise ValueError(
            f"batch sizes disagree across batch_size/boi_position/image_uncond/prefix_attention_mask: {sorted(sizes)}"
        )
    B = sizes.pop() if sizes else 1

    if boi_position is None:
        boi_position = prefix_length - 1  # <|boi|> is the last cached token
    boi = torch.as_tensor(boi_position, dtype=torch.long, device=device).expand(B)
    if bool(((boi < 0) | (boi >= prefix_length)).any()):
        raise ValueError(f"boi_position must be in [0, prefix_length={prefix_length})")
    if image_uncond is None:
        image_uncond = False
    uncond = torch.as_tensor(image_uncond, dtype=torch.bool, device=device).expand(B)
    if prefix_attention_mask is None:
        valid = torch.ones(B, prefix_length, dtype=torch.bool, device=device)
    else:
        if prefix_attention_mask.shape != (B, prefix_length):
            raise ValueError(
                f"prefix_attention_mask must have shape (B, prefix_length)=({B}, {prefix_length}), "
                f"got {tuple(prefix_attention_mask.shape)}"
            )
        valid = prefix_attention_mask.to(device=device, dtype=torch.bool)
    return B, boi, uncond, valid


def build_image_step_mask(
    prefix_length: int,
    num_image_tokens: int,
    *,
    boi_position: int | torch.Tensor | None = None,
    image_uncond: bool | torch.Tensor | None = None,
    prefix_attention_mask: torch.Tensor | None = None,
    batch_size: int | None = None,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Mask rows (B, 1, N, P + N) for N image query tokens over a prefix cache of P keys + themselves.

    Keys 0..P-1 are the cached prefix, keys P..P+N-1 the image tokens (bidirectional among
    themselves). Conditional rows see every valid prefix key (``prefix_attention_mask``: (B, P),
    True/1 = real token, default all); unconditional rows (``image_uncond``: bool or (B,)) see only
    ``boi_position`` (int or (B,); default P - 1, the ``<|boi|>`` just written to the cache).
    This matches :func:`build_dense_mask` on a full row when the cache holds only TEXT/IMAGE_CLEAN
    tokens of one document (the generation case), which ``tests/test_masks.py`` checks.
    """
    B, boi, uncond, valid = _image_step_inputs(
        prefix_length, num_image_tokens, boi_position, image_uncond, prefix_attention_mask,
        batch_size, device,
    )
    dev = valid.device
    P, N = prefix_length, num_image_tokens
    pos = torch.arange(P, device=dev)
    prefix = torch.where(uncond[:, None], pos[None, :] == boi[:, None], valid)  # (B, P)
    own = torch.ones(B, N, dtype=torch.bool, device=dev)  # (B, N): the image tokens themselves
    row = torch.cat([prefix, own], dim=1)  # (B, P + N)
    allowed = row[:, None, None, :].expand(B, 1, N, P + N)  # (B, 1, N, P + N): same for every query
    return to_additive(allowed, dtype)


def build_image_step_block_mask(
    prefix_length: int,
    num_image_tokens: int,
    *,
    boi_position: int | torch.Tensor | None = None,
    image_uncond: bool | torch.Tensor | None = None,
    prefix_attention_mask: torch.Tensor | None = None,
    batch_size: int | None = None,
    device: torch.device | str | None = None,
    block_size: int = 128,
):
    """FlexAttention ``BlockMask`` (Q_LEN = N, KV_LEN = P + N) equivalent to :func:`build_image_step_mask`."""
    from torch.nn.attention.flex_attention import create_block_mask

    B, boi, uncond, valid = _image_step_inputs(
        prefix_length, num_image_tokens, boi_position, image_uncond, prefix_attention_mask,
        batch_size, device,
    )
    P, N = prefix_length, num_image_tokens
    # Pad the validity row with the N image keys (always visible) so kv_idx indexes it directly.
    row_valid = torch.cat([valid, torch.ones(B, N, dtype=torch.bool, device=valid.device)], dim=1)

    def mask_mod(b, h, q_idx, kv_idx):
        in_prefix = kv_idx < P
        k = kv_idx.clamp(max=P + N - 1)  # padded kernel indices past KV_LEN must not read out of bounds
        prefix_ok = torch.where(uncond[b], kv_idx == boi[b], row_valid[b, k])
        return torch.where(in_prefix, prefix_ok, kv_idx >= P)

    return create_block_mask(mask_mod, B, None, N, P + N, device=valid.device, BLOCK_SIZE=block_size)
