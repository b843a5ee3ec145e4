"""MMGenForConditionalGeneration: one causal-LM backbone for text tokens and IMM image slots.

docs/design.md §4-§6 and §9. The backbone is any Hugging Face causal LM built with
`AutoModelForCausalLM.from_config(config.text_config)` and kept whole as `language_model`
(module names unchanged, so PEFT targets such as `q_proj`/`v_proj` apply). We feed it
`inputs_embeds` (text embeddings, and at image slots patch embeddings + position + time
embeddings, `image_embedding.py`), the packer's `position_ids`, and a custom 4D mask from
`masks.py` (dense additive float for sdpa/eager, FlexAttention `BlockMask` for flex_attention).
Text logits come from the backbone's `lm_head` at text positions only; image slots go through
the image head to G_theta (the flow-map formula lives in `objectives/`, the model knows none).

Unconditional noisy copies (classifier-free guidance) see a *null context*: a `<|boi|>` token
run on its own. In a packed row the model appends, per unconditional image, one extra `<|boi|>`
token in a document of its own at the end of the row and points the copy's `prefix_end` there.
The row's own `<|boi|>` would not do: from layer 2 on its keys carry the text before it.
Generation shows the model the same null context with `null_context_cache`.

transformers 5 conventions: forward takes `cache`, there is no
`cache_position` (positions come from `position_ids` or `cache.get_seq_length()`), `dtype=`.

One model, one file, as in transformers' `modeling_*.py`: the training forward, the cached image steps
generation calls and the FLOP count read together; the parts with a life of their own live beside it
(`image_embedding.py`, `masks.py`, `cache_view.py`, `target_copies.py`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, GenerationMixin, PreTrainedModel
from transformers import initialization as init
from transformers.cache_utils import Cache, DynamicCache
from transformers.modeling_utils import slice_logits_to_keep
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING
from transformers.utils import ModelOutput

from mmgen.cache_view import FrozenPrefixCache
from mmgen.configuration_mmgen import NUM_RESERVED_TOKENS, SPECIAL_TOKENS, MMGenConfig
from mmgen.image_embedding import (
    ImageInputEmbedding,
    UNetImageDecoder,
    UNetImageEncoder,
    _conv_init,
    build_image_head,
    sincos_2d,
    unet_conv_flops,
    unpatchify,
)
from mmgen.layout import TokenKind
from mmgen.masks import build_block_mask, build_dense_mask, build_image_step_mask
from mmgen.target_copies import TargetCopies, TargetPrefix
from mmgen.tokenization import SpecialIds


@dataclass
class MMGenOutput(ModelOutput):
    """loss: text CE (mean over label tokens); logits: see `forward`; image_outputs / target_outputs /
    clean_outputs: G at the student / target / clean copy, (num_images, C, h, w); cache; last_hidden_state
    (B, L, D) after the backbone's final norm."""

    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    image_outputs: torch.Tensor | None = None
    target_outputs: torch.Tensor | None = None
    clean_outputs: torch.Tensor | None = None
    cache: Cache | None = None
    last_hidden_state: torch.Tensor | None = None
    target_prefix: TargetPrefix | None = None


def _build_vae(config: MMGenConfig):
    """The frozen VAE submodule (mmgen/vae.py), built from config; saved and loaded with the model."""
    from mmgen.vae import MMGenVAE

    # from_pretrained builds the model under `torch.device("meta")`; MMGenVAE validates its latent
    # stats with data-dependent checks, which meta tensors cannot do. The VAE is small: build it on
    # the CPU; the checkpoint's weights are loaded into it afterwards.
    if torch.empty(0).device.type == "meta":
        with torch.device("cpu"):
            return _build_vae(config)
    return MMGenVAE.from_config(config.vae_config, latent_mean=config.latent_mean,
                                latent_std=config.latent_std, sigma_data=config.sigma_data)


class MMGenPreTrainedModel(PreTrainedModel):
    config_class = MMGenConfig  # explicit: with postponed annotations the annotation is a string
    base_model_prefix = ""
    main_input_name = "input_ids"
    input_modalities = ("image", "text")
    supports_gradient_checkpointing = True
    _supports_sdpa = True
    _supports_flex_attn = True
    _supports_flash_attn = False  # custom 4D masks; flash-attn takes none

    def _init_weights(self, module):
        # The VAE keeps diffusers' own init (or its loaded weights); see MMGenForConditionalGeneration.__init__.
        super()._init_weights(module)
        if isinstance(module, (ImageInputEmbedding, UNetImageEncoder)):  # non-persistent buffer: not in the checkpoint
            init.copy_(module.pos_embed, sincos_2d(module.side, module.pos_embed.shape[-1]))
        if isinstance(module, (nn.Conv2d, nn.ConvTranspose2d)):  # torch's default, not normal(0.02): after GN
            _conv_init(module)
        # Layers marked where they are built (the U-Net's last conv, the adaln_prompt projection). transformers
        # calls this only for modules with parameters of their own, so the mark sits on the layer itself.
        if getattr(module, "zero_init", False):
            init.zeros_(module.weight)
            init.zeros_(module.bias)


class MMGenForConditionalGeneration(MMGenPreTrainedModel, GenerationMixin):
    def __init__(self, config: MMGenConfig):
        super().__init__(config)
        text = config.text_config
        # The causal-LM class of `text_config`, built directly rather than through `from_config`: under
        # DeepSpeed ZeRO-3, `from_config` partitions the backbone at construction (zero.Init) and this
        # model's own weight init would then index empty tensors. DeepSpeed partitions at prepare().
        self.language_model = MODEL_FOR_CAUSAL_LM_MAPPING[type(text)](text)
        D = text.hidden_size
        geometry = (config.patch_size, config.latent_channels, config.patches_per_side, D)
        if config.image_head == "unet":
            self.image_in = UNetImageEncoder(*geometry, config.time_embed_dim, config.image_unet_width)
            self.image_head = UNetImageDecoder(*geometry, config.image_unet_width)
        else:
            self.image_in = ImageInputEmbedding(*geometry, config.time_embed_dim)
            self.image_head = build_image_head(config.image_head, D, config.patch_dim, config.image_head_depth)
        self.vae = _build_vae(config)
        for module in self.vae.modules():  # keep diffusers' init: post_init must not re-initialise the VAE
            module._is_hf_initialized = True
        self.post_init()

    @classmethod
    def from_pretrained(cls, *args, **kwargs):
        loaded = super().from_pretrained(*args, **kwargs)
        model = loaded[0] if isinstance(loaded, tuple) else loaded  # output_loading_info=True
        model.vae.requires_grad_(False)  # loading swaps in fresh Parameters (requires_grad=True)
        return loaded

    # ---- plumbing -----------------------------------------------------------------------------------
    @property
    def backbone(self) -> PreTrainedModel:
        """The transformer without its LM head (e.g. `LlamaModel`)."""
        return self.language_model.base_model

    def get_input_embeddings(self):
        return self.language_model.get_input_embeddings()

    def set_input_embeddings(self, value):
        self.language_model.set_input_embeddings(value)

    def get_output_embeddings(self):
        return self.language_model.get_output_embeddings()

    def set_output_embeddings(self, value):
        self.language_model.set_output_embeddings(value)

    def _attn_impl(self) -> str:
        return self.language_model.config._attn_implementation or "sdpa"

    def _lm_head(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.language_model.get_output_embeddings()(hidden)

    # ---- image tokens ---------------------------------------------------------------------------------
    def _embed_images(self, embeds, token_kind, image_ids, patch_ids, copies):
        """Write image-slot embeddings into `embeds` (B, L, D); return {kind: (context, present, M)}: the
        embedding's decoder context of the images that have tokens of that kind (`present`, sorted ids), of M.

        Only those images run through the embedding (and later the head): of a slot with several samples only
        the first has a clean copy, and images read only as inputs have no noisy copy."""
        conds = {}
        for kind, (latents, t_in, s_in) in copies.items():
            sel = token_kind == kind
            name = kind.name.lower()
            if latents is None:
                if bool(sel.any()):
                    raise ValueError(f"the row has {name} tokens but no latents for them were given")
                continue
            if not bool(sel.any()):
                raise ValueError(f"latents for {name} copies were given but token_kind has no {name} tokens")
            b, l = sel.nonzero(as_tuple=True)
            present, inverse = image_ids[b, l].unique(sorted=True, return_inverse=True)  # (P,), (n,)
            img_embeds, context = self.image_in(latents[present], t_in[present], s_in[present])  # (P, N, D)
            values = img_embeds[inverse, patch_ids[b, l]]  # (n, D)
            embeds = embeds.index_put((b, l), values.to(embeds.dtype))
            conds[kind] = (context, present, latents.shape[0])
        return embeds, conds

    def _decode_image(self, hidden: torch.Tensor, context, prompt=None) -> torch.Tensor:
        """Final hidden states of images' N tokens (M, N, D) + the embedding's context -> G (M, C, h, w).
        context: the time condition (M, D) (linear embedding) or (condition, skips) (U-Net codec);
        prompt: (M, D) final hidden state at each image's <|boi|> (heads that read it: `head_reads_prompt`)."""
        cfg = self.config
        if cfg.image_head == "unet":
            return self.image_head(hidden, context, prompt)
        M, N, _ = hidden.shape
        cond = context[:, None, :].to(hidden.dtype).expand(M, N, -1)
        extra = {"prompt": prompt} if cfg.head_reads_prompt else {}
        out = self.image_head(hidden, cond, **extra)  # (M, N, C p^2)
        return unpatchify(out, cfg.patch_size, cfg.latent_channels, cfg.patches_per_side)

    def _image_outputs(self, hidden, full_hidden, meta, kind, cond):
        """The head at the tokens of one copy kind -> G (M, C, h, w); zeros where an image has none.
        full_hidden (B, L + K, D) includes the appended null-context <|boi|>s; meta is after appending them;
        cond: `_embed_images`' (context, present, M) for this kind (only the present images are decoded)."""
        cfg = self.config
        context, present, M = cond
        token_kind, _, image_ids, patch_ids, prefix_end = meta
        L = hidden.shape[1]
        sel = token_kind[:, :L] == kind
        img = torch.searchsorted(present, image_ids[:, :L][sel])  # (n,) index among the present images
        pid = patch_ids[:, :L][sel]
        P = present.shape[0]
        grid = hidden.new_zeros(P, cfg.num_image_tokens, hidden.shape[-1]).index_put((img, pid), hidden[sel])
        prompt = None
        if cfg.head_reads_prompt:  # each copy's <|boi|> (the null one for unconditional copies)
            b, _ = sel.nonzero(as_tuple=True)
            boi = full_hidden[b, prefix_end[:, :L][sel]]  # (n, D), the same for all N tokens of a copy
            prompt = full_hidden.new_zeros(P, full_hidden.shape[-1]).index_put((img,), boi)
        G = self._decode_image(grid, context, prompt)  # (P, C, h, w)
        return G.new_zeros(M, *G.shape[1:]).index_copy(0, present, G)

    def _add_null_context(self, embeds, input_ids, position_ids, meta, image_uncond):
        """Append one context-free <|boi|> per unconditional image and point its noisy copies at it.

        meta = [token_kind, document_ids, image_ids, patch_ids, prefix_end], all (B, L). Appended
        columns are PAD except the null <|boi|>s, each a TEXT token in a fresh document holding also
        the copies of its image, at the position of the image's real <|boi|>. Nothing else sees them.
        """
        kind, doc, img, pid, pe = meta
        noisy = (kind == TokenKind.IMAGE_NOISY) | (kind == TokenKind.IMAGE_TARGET)
        unc = noisy & image_uncond.to(kind.device)[img.clamp(min=0)]
        rows, cols = unc.nonzero(as_tuple=True)
        pairs = sorted({(int(r), int(img[r, c]), int(pe[r, c])) for r, c in zip(rows, cols)})
        B, L = kind.shape
        per_row = [sum(1 for r, _, _ in pairs if r == b) for b in range(B)]
        K = max(per_row)
        pad = lambda t, v: torch.cat([t, t.new_full((B, K), v)], dim=1)  # (B, L + K)
        kind, img, pid, pe = pad(kind, int(TokenKind.PAD)), pad(img, -1), pad(pid, -1), pad(pe, -1)
        doc, position_ids = pad(doc, -1), pad(position_ids, 0)
        embeds = torch.cat([embeds, embeds.new_zeros(B, K, embeds.shape[-1])], dim=1)  # (B, L + K, D)
        used = [0] * B
        for r, i, boi in pairs:
            slot = L + used[r]
            new_doc = int(doc[r].max()) + 1
            used[r] += 1
            kind[r, slot], doc[r, slot], position_ids[r, slot] = int(TokenKind.TEXT), new_doc, position_ids[r, boi]
            # <|boi|> is a text token, so its row of `embeds` is still its token embedding. (Not a second call
            # of the embedding module: under ZeRO-3 every rank must run the same module calls.)
            embeds[r, slot] = embeds[r, boi]
            copy = noisy[r] & (img[r, :L] == i)
            copy = torch.cat([copy, copy.new_zeros(K)])
            doc[r, copy], pe[r, copy] = new_doc, slot
        return embeds, position_ids, [kind, doc, img, pid, pe]

    # ---- forward --------------------------------------------------------------------------------------
    def _packed_inputs(self, embeds, input_ids, position_ids, meta, copies, image_uncond, attention_mask, cache,
                       past):
        """Packed rows' inputs for the backbone: (embeds with the image slots filled, backbone positions,
        metadata, per-kind image conditions, attention mask). `copies`: kind -> latents (clean) or
        (latents, t, s) (noisy and target copies)."""
        token_kind = meta[0]
        B, L = token_kind.shape
        for name, t in zip(("document_ids", "image_ids", "patch_ids", "prefix_end"), meta[1:]):
            if t is None or t.shape != (B, L):
                raise ValueError(f"{name} must be a (B, L)=({B}, {L}) tensor when token_kind is given")
        noisy_any = bool(((token_kind == TokenKind.IMAGE_NOISY) | (token_kind == TokenKind.IMAGE_TARGET)).any())
        if cache is not None and (past > 0 or noisy_any) and attention_mask is None:
            raise ValueError(
                "a cache with packed metadata is only for prefilling an empty cache with text and clean "
                "images; use image_step() / append_clean_image() on a filled cache"
            )
        clean_latents = copies[TokenKind.IMAGE_CLEAN]
        zeros = torch.zeros(clean_latents.shape[0] if clean_latents is not None else 0, device=embeds.device)
        clean = None if clean_latents is None else clean_latents / self.config.sigma_data
        copies = {**copies, TokenKind.IMAGE_CLEAN: (clean, zeros, zeros)}  # clean copy: t = s = 0
        embeds, conds = self._embed_images(embeds, token_kind, meta[2], meta[3], copies)
        bb_pos = position_ids
        if image_uncond is not None and bool(image_uncond.any()) and noisy_any and attention_mask is None:
            embeds, bb_pos, meta = self._add_null_context(embeds, input_ids, position_ids, meta, image_uncond)
        if attention_mask is None:
            kind, doc, img, _, pe = meta
            if self._attn_impl() == "flex_attention":
                attention_mask = build_block_mask(kind, doc, img, pe, image_uncond)
            else:
                attention_mask = build_dense_mask(kind, doc, img, pe, image_uncond, dtype=embeds.dtype)
        return embeds, bb_pos, meta, conds, attention_mask

    def _text_loss(self, hidden, labels, is_text, document_ids) -> torch.Tensor:
        """Next-token cross-entropy over labelled positions whose predicting token is TEXT of the same document."""
        valid = (labels[:, 1:] != -100) & is_text[:, :-1]  # (B, L-1): position i predicts labels[i+1]
        if document_ids is not None:
            valid &= document_ids[:, 1:] == document_ids[:, :-1]
        sel_logits = self._lm_head(hidden[:, :-1][valid]).float()  # (n, V)
        return F.cross_entropy(sel_logits, labels[:, 1:][valid]) if sel_logits.shape[0] else hidden.sum() * 0

    def _text_logits(self, hidden, is_text, logits_to_keep, *, multimodal: bool, training: bool):
        """The logits `forward` returns (its docstring): kept positions, all positions, or TEXT positions only."""
        if not isinstance(logits_to_keep, int) or logits_to_keep > 0:
            return self._lm_head(slice_logits_to_keep(hidden, logits_to_keep))
        if not multimodal:
            return self._lm_head(hidden)
        if training:
            return None
        B, L = is_text.shape
        text_logits = self._lm_head(hidden[is_text])  # (n, V)
        return text_logits.new_zeros(B, L, text_logits.shape[-1]).index_put(is_text.nonzero(as_tuple=True),
                                                                           text_logits)

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        position_ids: torch.LongTensor | None = None,
        token_kind: torch.LongTensor | None = None,
        document_ids: torch.LongTensor | None = None,
        image_ids: torch.LongTensor | None = None,
        patch_ids: torch.LongTensor | None = None,
        prefix_end: torch.LongTensor | None = None,
        clean_latents: torch.Tensor | None = None,
        noisy_latents: torch.Tensor | None = None,
        noisy_t: torch.Tensor | None = None,
        noisy_s: torch.Tensor | None = None,
        target: TargetCopies | None = None,
        image_uncond: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        cache: Cache | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        return_clean_outputs: bool = False,
        return_target_prefix: bool = False,
        **kwargs,
    ) -> MMGenOutput:
        """Two modes (docs/design.md §6):

        - text-only (`token_kind` is None): a plain causal-LM call on `input_ids` (what `generate()`
          does); `attention_mask` is the usual 2D padding mask; positions default to cache length + arange.
        - packed multimodal rows (`token_kind` etc. given, all (B, L)): image slots from the latents, the
          mask built from the metadata unless a prebuilt 4D `attention_mask` is passed. No cache by
          default; with a cache only an empty one (prefill) is accepted, and no noisy/target tokens
          (the cache never holds them: use `image_step` / `append_clean_image`).

        logits: with `logits_to_keep` > 0 (int, or index tensor) the logits of those positions; else
        with `labels` None, (B, L, V) with values at TEXT positions and 0 elsewhere (vocab logits are
        never computed for image slots); else None (training: the loss needs only label positions).
        The loss shifts internally and ignores labels whose preceding token is not TEXT of the same document.

        `target` (mmgen/target_copies.py): the second noisy copies, at the rows' IMAGE_TARGET tokens, whose G
        is `target_outputs`. Without a second full pass: a packed forward with `return_target_prefix=True`
        also returns `target_prefix` (its keys/values; None with flex_attention); the same rows' metadata with
        `target=TargetCopies(latents, t, s, prefix=that)` then run only the target copies — one per image, in
        the slots of the rows' IMAGE_NOISY tokens — over that prefix, equal to a full forward with the target
        copies in the rows (`_target_forward`).
        """
        if input_ids is None:
            raise ValueError("input_ids is required (image slots carry the <|image|> placeholder id)")
        if target is not None and target.prefix is not None:
            return self._target_forward(target, input_ids, position_ids, token_kind, image_uncond)
        B, L = input_ids.shape
        past = cache.get_seq_length() if cache is not None else 0
        if position_ids is None:
            position_ids = (torch.arange(L, device=input_ids.device) + past).expand(B, L)
        embeds = self.get_input_embeddings()(input_ids)  # (B, L, D)
        multimodal = token_kind is not None
        conds, meta, bb_pos = {}, None, position_ids
        if multimodal:
            meta = [token_kind, document_ids, image_ids, patch_ids, prefix_end]
            if return_target_prefix and cache is not None:
                raise ValueError("return_target_prefix needs a forward without a cache (a training forward)")
            use_cache = bool(use_cache or return_target_prefix) if cache is None else True
            copies = {
                TokenKind.IMAGE_CLEAN: clean_latents,
                TokenKind.IMAGE_NOISY: (noisy_latents, noisy_t, noisy_s),
                TokenKind.IMAGE_TARGET: (target.latents, target.t, target.s) if target else (None, None, None),
            }
            embeds, bb_pos, meta, conds, attention_mask = self._packed_inputs(
                embeds, input_ids, position_ids, meta, copies, image_uncond, attention_mask, cache, past)
        elif any(t is not None for t in (document_ids, image_ids, patch_ids, prefix_end, clean_latents,
                                         noisy_latents, target)):
            raise ValueError("image metadata/latents were given without token_kind")

        out = self.backbone(
            inputs_embeds=embeds, attention_mask=attention_mask, position_ids=bb_pos,
            cache=cache, use_cache=use_cache, **kwargs,
        )
        hidden = out.last_hidden_state[:, :L]  # (B, L, D): drop appended null-context columns
        is_text = token_kind == TokenKind.TEXT if multimodal else torch.ones_like(input_ids, dtype=torch.bool)

        loss = None if labels is None else self._text_loss(hidden, labels, is_text, document_ids)
        logits = self._text_logits(hidden, is_text, logits_to_keep, multimodal=multimodal, training=labels is not None)

        outputs = {}
        if multimodal:
            wanted = {TokenKind.IMAGE_NOISY: "image_outputs", TokenKind.IMAGE_TARGET: "target_outputs"}
            if return_clean_outputs:
                wanted[TokenKind.IMAGE_CLEAN] = "clean_outputs"
            for kind, name in wanted.items():
                if kind in conds:
                    outputs[name] = self._image_outputs(hidden, out.last_hidden_state, meta, kind, conds[kind])
        if return_target_prefix and multimodal and self._attn_impl() != "flex_attention":
            # None under FlexAttention: its BlockMask over a cache (Q_LEN != KV_LEN) failed to compile on CPU
            # and a dense mask crashed (torch 2.13), so the caller runs the target copies in a full forward
            outputs["target_prefix"] = TargetPrefix(cache=self._detached_cache(out.cache),
                                                    hidden=out.last_hidden_state.detach(),
                                                    meta=[m.clone() for m in meta], image_uncond=image_uncond)
        return MMGenOutput(loss=loss, logits=logits, cache=out.cache,
                           last_hidden_state=hidden, **outputs)

    # ---- IMM target copies over the student pass's prefix ---------------------------------------------
    def _detached_cache(self, cache: Cache) -> DynamicCache:
        prefix = DynamicCache(config=self.config.text_config)
        for i, layer in enumerate(cache.layers):
            prefix.update(layer.keys.detach(), layer.values.detach(), i)
        return prefix

    def _target_forward(self, target: TargetCopies, input_ids, position_ids, token_kind, image_uncond) -> MMGenOutput:
        """Target copies only: row b's Q_b target tokens mirror its IMAGE_NOISY tokens (same image, patch,
        position, prefix: the null context for images the student saw unconditionally) and run over `prefix`
        (its L + K keys) and themselves; the mask is the packed rule's rows for them on the row extended by the
        target copies. `image_uncond` must be what the student pass saw (the prefix holds its null contexts)."""
        if token_kind is None:
            raise ValueError("target.prefix needs the rows' packed metadata")
        prefix, target_latents = target.prefix, target.latents
        B, L = input_ids.shape
        same_uncond = (image_uncond is None or not bool(image_uncond.any())) if prefix.image_uncond is None else (
            image_uncond is not None and torch.equal(image_uncond.cpu(), prefix.image_uncond.cpu()))
        if not same_uncond:
            raise ValueError("target_prefix: image_uncond differs from the student pass's (its null contexts)")
        # the student pass's metadata: the rows' columns and its null-context <|boi|>s, (B, L + K) each
        token_kind, document_ids, image_ids, patch_ids, prefix_end = prefix.meta
        LK = token_kind.shape[1]
        if prefix.hidden.shape[:2] != (B, LK) or prefix.cache.get_seq_length() != LK or LK < L:
            raise ValueError(f"target_prefix was made for rows of shape {tuple(prefix.hidden.shape[:2])}, "
                             f"not ({B}, {L})")
        if position_ids is None:
            position_ids = torch.arange(L, device=input_ids.device).expand(B, L)
        input_ids = torch.cat([input_ids, input_ids.new_zeros(B, LK - L)], dim=1)
        position_ids = torch.cat([position_ids, position_ids.new_zeros(B, LK - L)], dim=1)
        src = token_kind == TokenKind.IMAGE_NOISY
        counts = src.sum(1)
        Q = max(int(counts.max()), 1)
        order = torch.argsort((~src).to(torch.int8), dim=1, stable=True)[:, :Q]  # noisy columns first, in order
        valid = torch.arange(Q, device=src.device)[None, :] < counts[:, None]  # (B, Q)
        pick = lambda t, fill: torch.where(valid, t.gather(1, order), torch.full_like(order, fill))
        q_kind = torch.where(valid, int(TokenKind.IMAGE_TARGET), int(TokenKind.PAD))
        q_doc, q_img, q_pid = pick(document_ids, -1), pick(image_ids, -1), pick(patch_ids, -1)
        q_pe, q_pos, q_ids = pick(prefix_end, -1), pick(position_ids, 0), pick(input_ids, 0)
        ext = [torch.cat([a, b], dim=1) for a, b in
               ((token_kind, q_kind), (document_ids, q_doc), (image_ids, q_img), (prefix_end, q_pe))]
        # unconditional copies already point at their own null <|boi|> (a document of its own): no window rule
        no_uncond = torch.zeros(target_latents.shape[0], dtype=torch.bool, device=input_ids.device)
        embeds = self.get_input_embeddings()(q_ids)  # (B, Q, D); image slots overwritten next
        embeds, conds = self._embed_images(embeds, q_kind, q_img, q_pid,
                                           {TokenKind.IMAGE_TARGET: (target_latents, target.t, target.s)})
        mask = build_dense_mask(*ext, no_uncond, dtype=embeds.dtype, query_start=LK)  # (B, 1, Q, L + K + Q)
        out = self.backbone(inputs_embeds=embeds, attention_mask=mask, position_ids=q_pos,
                            cache=FrozenPrefixCache(prefix.cache), use_cache=True)
        meta = [q_kind, q_doc, q_img, q_pid, q_pe]
        G = self._image_outputs(out.last_hidden_state, prefix.hidden, meta, TokenKind.IMAGE_TARGET,
                                conds[TokenKind.IMAGE_TARGET])
        return MMGenOutput(target_outputs=G, last_hidden_state=out.last_hidden_state)

    # ---- cached generation steps (docs/design.md §9) -----------------------------------------------------
    def _image_tokens_on_cache(self, cache, prefix, latents, t_in, s_in, image_position, cache_attention_mask,
                               prompt_state=None, decode=True):
        """Run N image tokens over a prefix cache (`prefix` is what the attention layers update)."""
        cfg = self.config
        B, N = latents.shape[0], cfg.num_image_tokens
        embeds, context = self.image_in(latents, t_in, s_in)  # (B, N, D), decoder context
        embeds = embeds.to(self.get_input_embeddings().weight.dtype)
        pos = torch.as_tensor(image_position, device=embeds.device, dtype=torch.long).reshape(-1, 1)
        position_ids = pos.expand(B, N)  # every token of an image shares one RoPE position
        mask = build_image_step_mask(
            cache.get_seq_length(), N, prefix_attention_mask=cache_attention_mask, batch_size=B,
            dtype=embeds.dtype, device=embeds.device,
        )  # (B, 1, N, P + N)
        out = self.backbone(inputs_embeds=embeds, attention_mask=mask, position_ids=position_ids,
                            cache=prefix, use_cache=True)
        if not decode:
            return None
        if self.config.head_reads_prompt and prompt_state is None:
            prompt_state = self.prompt_state(cache, image_position=image_position,
                                             cache_attention_mask=cache_attention_mask)
        return self._decode_image(out.last_hidden_state, context, prompt_state)  # (B, C, h, w)

    def image_step(self, cache: Cache, x_in, t_in, s_in, *, image_position, cache_attention_mask=None,
                   prompt_state=None):
        """G for one noisy image per row on a cached prefix; the cache is read, never extended or mutated.

        cache: `DynamicCache` of the prefix up to and including <|boi|> (B rows); x_in (B, C, h, w) =
        c_in(t) x_t; t_in, s_in (B,) as docs/design.md §7; image_position: int or (B,) = <|boi|> position + 1;
        cache_attention_mask: (B, P) 1 = real token (left padding). The unconditional branch is the same
        call on `null_context_cache(...)`. Every refinement step can reuse the same `cache`.
        prompt_state: `prompt_state(cache, ...)` for a head that reads the prompt (U-Net codec, adaln_prompt),
        computed once per image by the caller (recomputed here when omitted); unused otherwise.
        """
        if cache is None or cache.get_seq_length() == 0:
            raise ValueError("image_step needs a prefix cache holding at least <|boi|>")
        return self._image_tokens_on_cache(cache, FrozenPrefixCache(cache), x_in, t_in, s_in,
                                           image_position, cache_attention_mask, prompt_state)

    @torch.no_grad()
    def prompt_state(self, cache: Cache, *, image_position, cache_attention_mask=None) -> torch.Tensor | None:
        """The final hidden state at <|boi|> (B, D), the last entry of `cache`: what the U-Net decoder reads
        the prompt from (the training forward takes it from the same position). Recomputed by running
        <|boi|> again over the cache without its own entry, which reproduces the prefill exactly. None
        for heads that do not read it (`config.head_reads_prompt`)."""
        if not self.config.head_reads_prompt:
            return None
        B, P = cache.layers[0].keys.shape[0], cache.get_seq_length()
        device = self.get_input_embeddings().weight.device
        ids = torch.full((B, 1), self.config.boi_token_id, dtype=torch.long, device=device)
        pos = torch.as_tensor(image_position, device=device, dtype=torch.long).reshape(-1, 1).expand(B, 1) - 1
        data = [(layer.keys[:, :, : P - 1], layer.values[:, :, : P - 1]) for layer in cache.layers]
        before = DynamicCache(ddp_cache_data=data, config=self.config.text_config) if P > 1 else None
        mask = None
        if cache_attention_mask is not None and P > 1:
            valid = torch.cat([cache_attention_mask[:, : P - 1].bool().to(device),
                               torch.ones(B, 1, dtype=torch.bool, device=device)], dim=1)  # (B, P)
            dtype = self.get_input_embeddings().weight.dtype
            mask = torch.zeros(B, 1, 1, P, dtype=dtype, device=device).masked_fill(
                ~valid[:, None, None, :], torch.finfo(dtype).min)
        out = self.backbone(input_ids=ids, position_ids=pos, attention_mask=mask, cache=before,
                            use_cache=before is not None)
        return out.last_hidden_state[:, -1]  # (B, D)

    def append_clean_image(self, cache: Cache, latents, *, image_position, cache_attention_mask=None):
        """Run a finished image as a clean copy (latents / sigma_data, times 0) and append its N tokens to
        `cache` (in place; also returned). Then decode <|eoi|> at position image_position + 1."""
        zeros = torch.zeros(latents.shape[0], device=latents.device)
        self._image_tokens_on_cache(cache, cache, latents / self.config.sigma_data, zeros, zeros,
                                    image_position, cache_attention_mask, decode=False)
        return cache

    def null_context_cache(self, batch_size: int, boi_position: int | torch.Tensor = 0) -> DynamicCache:
        """The unconditional branch's context: a cache holding only <|boi|>, run on its own (the same null
        context the training forward gives unconditional copies). Pass image_position = boi_position + 1."""
        device = self.get_input_embeddings().weight.device
        ids = torch.full((batch_size, 1), self.config.boi_token_id, dtype=torch.long, device=device)
        pos = torch.as_tensor(boi_position, device=device, dtype=torch.long).reshape(-1, 1).expand(batch_size, 1)
        cache = DynamicCache(config=self.config.text_config)
        self.backbone(input_ids=ids, position_ids=pos, cache=cache, use_cache=True)
        return cache

    # ---- construction from a pretrained LM -------------------------------------------------------------
    @classmethod
    def from_pretrained_text_model(cls, name_or_path: str, *, tokenizer=None, dtype=None, attn_implementation=None,
                                   **config_kwargs) -> MMGenForConditionalGeneration:
        """Initialise the backbone from any pretrained causal LM; everything else is new.

        With `tokenizer` (the LM's, made mmgen's by `mmgen.tokenization.load_pretrained_lm_tokenizer`): every
        special-token id is read from it, the embeddings grow to hold its vocabulary, and each special token's
        rows that did not exist are new rows (mean-resized, transformers `resize_token_embeddings`); rows
        the LM already had (a vocabulary padded past its tokenizer's, a token it knew) are kept.
        Without: the special tokens of docs/design.md §2 (<|boi|> ... <|end|>, 6 reserved, and <|pad|> when the
        LM has no pad token) are appended after the embedding rows, in `SPECIAL_TOKENS` order — the ids
        `load_pretrained_lm_tokenizer` gives when the LM's tokenizer fills its embedding table exactly.
        bos/eos stay the LM's (bos = eos when it has none). `config_kwargs` set the other MMGenConfig fields.
        """
        lm_kwargs = {"dtype": dtype} if dtype is not None else {}
        if attn_implementation is not None:
            lm_kwargs["attn_implementation"] = attn_implementation
        lm = AutoModelForCausalLM.from_pretrained(name_or_path, **lm_kwargs)
        text = lm.config
        old_vocab = lm.get_input_embeddings().weight.shape[0]
        if tokenizer is not None:
            ids = SpecialIds.from_tokenizer(tokenizer, where=f"the tokenizer for {name_or_path}").as_config()
            new_vocab = max(old_vocab, len(tokenizer))
        else:
            ids = {field: old_vocab + i for i, (field, _) in enumerate(SPECIAL_TOKENS)}
            new_vocab = old_vocab + len(SPECIAL_TOKENS) + NUM_RESERVED_TOKENS
            pad = text.pad_token_id
            if pad is None:
                pad, new_vocab = new_vocab, new_vocab + 1
            eos = text.eos_token_id[0] if isinstance(text.eos_token_id, list) else text.eos_token_id
            bos = text.bos_token_id if text.bos_token_id is not None else eos
            ids.update(pad_token_id=pad, bos_token_id=bos, eos_token_id=eos)
        if new_vocab != old_vocab:
            lm.resize_token_embeddings(new_vocab, mean_resizing=True)
        text.pad_token_id = ids["pad_token_id"]
        config = MMGenConfig(text_config=text, **ids, **config_kwargs)
        model = cls(config)
        model.language_model = lm  # the pretrained weights, module names unchanged
        model.config.text_config = lm.config
        if dtype is not None:
            model.to(dtype)
        return model

    # ---- accounting (nanoGPT `estimate_mfu`, Chinchilla 6N) ------------------------------------------
    def estimate_flops(self, num_tokens: int, seq_len: int, *, training: bool = True,
                       image_tokens: dict[str, int] | None = None) -> float:
        """FLOPs of one step over `num_tokens` tokens in rows of `seq_len` (nanoGPT `estimate_mfu`).

        6 N per token (2 forward + 4 backward) for the N parameters each token multiplies by: all but
        the VAE and the input embedding table; plus 12 * layers * hidden * seq_len per token for the
        attention scores and values (dense, as nanoGPT counts it). Forward only: a third of that.

        `image_tokens` = {"clean": n, "noisy": n, "target": n}, the image-slot tokens of each copy among
        `num_tokens` (training). Target copies (IMM's target branch) run without gradient: a third of a
        trained token. With the U-Net codec its convolutions are counted per image (their weights are
        reused at every pixel), encoder for clean copies and encoder + decoder for the others; it needs
        `image_tokens`, since only the caller knows the mix.
        """
        cfg, text = self.config, self.config.text_config
        emb = self.get_input_embeddings().weight
        unet = cfg.image_head == "unet"
        codec = [self.image_in, self.image_head] if unet else []
        convs = (nn.Conv2d, nn.ConvTranspose2d)
        conv_params = {id(p) for c in codec for m in c.modules() if isinstance(m, convs) for p in m.parameters()}
        n = sum(p.numel() for name, p in self.named_parameters()
                if not name.startswith("vae.") and id(p) not in conv_params)
        if self.get_output_embeddings().weight is not emb:
            n -= emb.numel()
        head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
        attn = 12 * text.num_hidden_layers * text.num_attention_heads * head_dim * seq_len
        per_token = 6 * n + attn
        if unet and image_tokens is None:
            raise ValueError("estimate_flops needs image_tokens with image_head 'unet' (conv FLOPs are per image)")
        counts = {k: (image_tokens or {}).get(k, 0) for k in ("clean", "noisy", "target")}
        flops = per_token * (num_tokens - counts["target"]) + per_token / 3 * counts["target"]
        if unet:
            enc, dec = unet_conv_flops(cfg.latent_channels, cfg.patches_per_side, text.hidden_size,
                                       cfg.image_unet_width, cfg.patch_size)
            N = cfg.num_image_tokens
            flops += (3 * enc * counts["clean"] + 3 * (enc + dec) * counts["noisy"]
                      + (enc + dec) * counts["target"]) / N
        return flops if training else flops / 3


__all__ = ["MMGenForConditionalGeneration", "MMGenOutput", "MMGenPreTrainedModel"]


# Registration: `import mmgen` makes AutoConfig / AutoModel / AutoModelForCausalLM resolve "mmgen".
AutoConfig.register("mmgen", MMGenConfig, exist_ok=True)
AutoModel.register(MMGenConfig, MMGenForConditionalGeneration, exist_ok=True)
AutoModelForCausalLM.register(MMGenConfig, MMGenForConditionalGeneration, exist_ok=True)
