"""SentencePiece model -> transformers fast tokenizer, with mmgen's special tokens and chat template.

The SentencePiece model is trained by `tokenizers/train_sentencepiece.py` with settings that make the
conversion exact and text round-trip lossless: identity normalisation, no dummy prefix, no removal of
extra whitespace, whitespace escaped as "▁" and kept at the start of pieces, byte fallback. Special
tokens sit at the fixed ids of docs/design.md §2 and are parsed when written inline in text.

    write_transformers_tokenizer(sp_model_file, out_dir, model_type="bpe") -> TokenizersBackend
    load_tokenizer(path) -> TokenizersBackend            # AutoTokenizer.from_pretrained, offline, ids checked
    load_pretrained_lm_tokenizer(name_or_path)           # a pretrained LM's tokenizer with mmgen's tokens appended
    SpecialIds.from_tokenizer(tokenizer)                 # the ids the packer writes, read from a tokenizer

A pretrained LM's tokenizer (`model.init_text_model`) cannot put the special tokens at ids 0-15; there
they are appended after its vocabulary, and the packer, processor and model read the ids from the
tokenizer (`SpecialIds`) and the model config instead of the fixed ids.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, fields
from pathlib import Path

from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

# docs/design.md §2: the id of each special token is fixed; the model, packer and generation engine rely on them.
PAD_TOKEN, UNK_TOKEN, BOS_TOKEN, EOS_TOKEN = "<|pad|>", "<unk>", "<s>", "</s>"
BOI_TOKEN, EOI_TOKEN, IMAGE_TOKEN = "<|boi|>", "<|eoi|>", "<|image|>"
USER_TOKEN, ASSISTANT_TOKEN, END_TOKEN = "<|user|>", "<|assistant|>", "<|end|>"
RESERVED_TOKENS = tuple(f"<|reserved_{i}|>" for i in range(6))
SPECIAL_TOKENS = (
    PAD_TOKEN, UNK_TOKEN, BOS_TOKEN, EOS_TOKEN,
    BOI_TOKEN, EOI_TOKEN, IMAGE_TOKEN, USER_TOKEN, ASSISTANT_TOKEN, END_TOKEN,
    *RESERVED_TOKENS,
)  # fmt: skip
SPECIAL_TOKEN_IDS = {token: i for i, token in enumerate(SPECIAL_TOKENS)}
PAD_ID, UNK_ID, BOS_ID, EOS_ID = 0, 1, 2, 3
BOI_ID, EOI_ID, IMAGE_ID, USER_ID, ASSISTANT_ID, END_ID = 4, 5, 6, 7, 8, 9
# Specials SentencePiece must also match inside text (its "user defined symbols"): all except the 4 meta pieces.
USER_DEFINED_SYMBOLS = SPECIAL_TOKENS[4:]

SENTENCEPIECE_FILE = "spm.model"  # not "tokenizer.model": transformers would try to convert it with protobuf

# OpenAI-style messages: content is a string or a list of {"type": "text", "text"} / {"type": "image"} parts.
# One image is rendered as <|boi|> + num_image_tokens x <|image|> + <|eoi|>; by default num_image_tokens is
# 1, a marker that MMGenProcessor expands to its N (the tokenizer alone does not know N). The assistant
# turns are wrapped in {% generation %} so `return_assistant_tokens_mask=True` works.
CHAT_TEMPLATE = """\
{%- macro render_content(content, n_img) -%}
    {%- if content is string -%}
        {{- content -}}
    {%- else -%}
        {%- for part in content -%}
            {%- if part['type'] == 'text' -%}
                {{- part['text'] -}}
            {%- elif part['type'] == 'image' -%}
                {{- '<|boi|>' ~ ('<|image|>' * n_img) ~ '<|eoi|>' -}}
            {%- else -%}
                {{- raise_exception('mmgen chat template: unsupported content part type ' ~ part['type']) -}}
            {%- endif -%}
        {%- endfor -%}
    {%- endif -%}
{%- endmacro -%}
{%- set n_img = num_image_tokens | default(1) -%}
{{- bos_token -}}
{%- for message in messages -%}
    {%- if message['role'] == 'user' -%}
        {{- '<|user|>' ~ render_content(message['content'], n_img) ~ '<|end|>' -}}
    {%- elif message['role'] == 'assistant' -%}
        {{- '<|assistant|>' -}}
        {%- generation -%}
            {{- render_content(message['content'], n_img) ~ '<|end|>' -}}
        {%- endgeneration -%}
    {%- else -%}
        {{- raise_exception('mmgen chat template: unsupported role ' ~ message['role'] ~ ' (user, assistant)') -}}
    {%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt -%}
    {{- '<|assistant|>' -}}
{%- endif -%}
"""

# Named special tokens: transformers exposes e.g. tokenizer.image_token / tokenizer.image_token_id.
NAMED_EXTRA_TOKENS = {
    "boi_token": BOI_TOKEN,
    "eoi_token": EOI_TOKEN,
    "image_token": IMAGE_TOKEN,
    "user_token": USER_TOKEN,
    "assistant_token": ASSISTANT_TOKEN,
    "end_token": END_TOKEN,
}

# Unigram score for pieces text should never be segmented into (byte pieces, controls). SentencePiece excludes
# them by type; `tokenizers` has no such notion, so a literal "<0x41>" whose characters are all out of the
# vocabulary can still become the byte piece (unigram only; BPE never builds byte pieces from text).
_NEVER_IN_TEXT = -1e9


def _read_pieces(sp_model_file: str | os.PathLike):
    """(piece, score, kind) per id; kind in {"normal", "special", "byte"}. Checks the fixed special-token ids."""
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(sp_model_file))
    pieces = []
    for i in range(sp.get_piece_size()):
        piece = sp.id_to_piece(i)
        if i < len(SPECIAL_TOKENS):
            if piece != SPECIAL_TOKENS[i]:
                raise ValueError(
                    f"{sp_model_file}: id {i} is {piece!r}, mmgen requires {SPECIAL_TOKENS[i]!r}; "
                    "train it with tokenizers/train_sentencepiece.py"
                )
            kind = "special"
        elif sp.is_byte(i):
            kind = "byte"
        elif sp.is_control(i) or sp.is_unknown(i) or sp.is_unused(i) or piece in SPECIAL_TOKEN_IDS:
            kind = "special"
        else:
            kind = "normal"
        pieces.append((piece, sp.get_score(i), kind))
    return sp, pieces


def _bpe_merges(pieces) -> list[tuple[str, str]]:
    """Merges that rebuild SentencePiece's BPE: a piece is made from any two normal pieces that concatenate to
    it, and SentencePiece applies the best-scoring merge first (ties: lower id)."""
    normal = {piece: (score, i) for i, (piece, score, kind) in enumerate(pieces) if kind == "normal"}
    ranked = []
    for piece, (score, i) in normal.items():
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            if left in normal and right in normal:
                ranked.append((-score, i, left, right))
    return [(left, right) for _, _, left, right in sorted(ranked)]


def build_backend_tokenizer(sp_model_file: str | os.PathLike, model_type: str = "bpe") -> Tokenizer:
    """A `tokenizers.Tokenizer` that encodes exactly like the SentencePiece model (checked on a probe text)."""
    sp, pieces = _read_pieces(sp_model_file)
    if model_type == "bpe":
        vocab = {piece: i for i, (piece, _, _) in enumerate(pieces)}
        model = models.BPE(
            vocab=vocab,
            merges=_bpe_merges(pieces),
            unk_token=UNK_TOKEN,
            fuse_unk=True,
            byte_fallback=True,
        )
    elif model_type == "unigram":
        vocab = [(p, s if kind == "normal" else _NEVER_IN_TEXT) for p, s, kind in pieces]
        model = models.Unigram(vocab=vocab, unk_id=UNK_ID, byte_fallback=True)
    else:
        raise ValueError(f"model_type must be 'bpe' or 'unigram', got {model_type!r} (for {sp_model_file})")
    tok = Tokenizer(model)
    # SentencePiece (split_by_whitespace, no dummy prefix): " " -> "▁", pieces start at a "▁".
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="never", split=True)
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])

    probe = "<|user|>Draw a  red circle.<|end|><|assistant|> ok\t déjà 中 99<|boi|><|image|><|eoi|>x "
    got, want = tok.encode(probe).ids, sp.encode(probe)
    if got != want:
        raise ValueError(
            f"{sp_model_file}: the converted tokenizer disagrees with SentencePiece on a probe text "
            f"({got} vs {want}); was it trained by tokenizers/train_sentencepiece.py with model_type={model_type!r}?"
        )
    return tok


def write_transformers_tokenizer(
    sp_model_file: str | os.PathLike, out_dir: str | os.PathLike, model_type: str = "bpe"
):
    """Write tokenizer.json + tokenizer_config.json (special tokens, chat template) into `out_dir`."""
    from transformers import PreTrainedTokenizerFast

    backend = build_backend_tokenizer(sp_model_file, model_type)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        unk_token=UNK_TOKEN,
        pad_token=PAD_TOKEN,
        extra_special_tokens=dict(NAMED_EXTRA_TOKENS),
        chat_template=CHAT_TEMPLATE,
        clean_up_tokenization_spaces=False,
        model_max_length=1_000_000,
    )
    check_special_token_ids(tokenizer, where=str(out_dir))
    # save_jinja_files=False: the chat template lives in tokenizer_config.json, one self-contained file.
    tokenizer.save_pretrained(str(out_dir), save_jinja_files=False)
    return tokenizer


def check_special_token_ids(tokenizer, where: str = "tokenizer", expected: dict[str, int] | None = None) -> None:
    """Raise if any special token is not at its id or is split when written inline. `expected`: token -> id,
    by default the fixed ids (docs/design.md §2)."""
    for token, want in (SPECIAL_TOKEN_IDS if expected is None else expected).items():
        got = tokenizer.convert_tokens_to_ids(token)
        if got != want:
            raise ValueError(
                f"{where}: special token {token!r} has id {got}, mmgen requires {want}"
            )
        ids = tokenizer.encode(token, add_special_tokens=False)
        if ids != [want]:
            raise ValueError(f"{where}: {token!r} written in text encodes to {ids}, expected [{want}]")


def load_tokenizer(path: str | os.PathLike):
    """AutoTokenizer.from_pretrained(path) with the fixed special-token ids checked."""
    from transformers import AutoTokenizer

    if not (Path(path) / "tokenizer.json").is_file():
        raise FileNotFoundError(
            f"{path}: no tokenizer.json (train one with tokenizers/train_sentencepiece.py)"
        )
    tokenizer = AutoTokenizer.from_pretrained(str(path))
    check_special_token_ids(tokenizer, where=str(path))
    return tokenizer


# SpecialIds fields of mmgen's own tokens (the others are the tokenizer's pad/bos/eos).
_MMGEN_TOKEN_FIELDS = {"boi": BOI_TOKEN, "eoi": EOI_TOKEN, "image": IMAGE_TOKEN, "user": USER_TOKEN,
                       "assistant": ASSISTANT_TOKEN, "end": END_TOKEN}  # fmt: skip


@dataclass(frozen=True)
class SpecialIds:
    """The token ids the packer and processor write: the fixed ids of docs/design.md §2 by default (the
    shapes tokenizer), or those of any tokenizer through `from_tokenizer` (a pretrained LM's)."""

    pad: int = PAD_ID
    bos: int = BOS_ID
    eos: int = EOS_ID
    boi: int = BOI_ID
    eoi: int = EOI_ID
    image: int = IMAGE_ID
    user: int = USER_ID
    assistant: int = ASSISTANT_ID
    end: int = END_ID

    @classmethod
    def from_tokenizer(cls, tokenizer, where: str = "tokenizer") -> SpecialIds:
        """Read every id from `tokenizer`; ValueError naming `where` and the token when one is missing."""
        ids = {"pad": tokenizer.pad_token_id, "bos": tokenizer.bos_token_id, "eos": tokenizer.eos_token_id}
        unk = tokenizer.unk_token_id
        for name, token in _MMGEN_TOKEN_FIELDS.items():
            got = tokenizer.convert_tokens_to_ids(token)
            ids[name] = None if got == unk else got
        missing = [f.name for f in fields(cls) if ids[f.name] is None]
        if missing:
            raise ValueError(
                f"{where}: no id for {', '.join(missing)} (mmgen's special tokens are missing: use "
                "mmgen.tokenization.load_pretrained_lm_tokenizer for a pretrained LM's tokenizer)"
            )
        return cls(**ids)

    def as_config(self) -> dict[str, int]:
        """The MMGenConfig fields these ids go into (`pad_token_id`, ..., `end_token_id`)."""
        return {f"{f.name}_token_id": getattr(self, f.name) for f in fields(self)}


SHAPES_SPECIAL_IDS = SpecialIds()  # the fixed ids (docs/design.md §2)


def prepare_pretrained_lm_tokenizer(tokenizer, where: str = "tokenizer"):
    """Make a pretrained LM's tokenizer mmgen's, in place, and return it.

    Appends <|boi|> ... <|end|> and the 6 reserved tokens (those it does not have already) as special
    tokens, in `SPECIAL_TOKENS` order, then <|pad|> when it has no pad token; uses its eos as bos when it has
    no bos (as `MMGenForConditionalGeneration.from_pretrained_text_model` does), and sets mmgen's chat
    template. The model built from the LM reads the ids from this tokenizer."""
    if tokenizer.eos_token is None:
        raise ValueError(f"{where}: the tokenizer has no eos token; mmgen ends documents with it")
    if tokenizer.bos_token is None:
        tokenizer.bos_token = tokenizer.eos_token
    mmgen_tokens = [BOI_TOKEN, EOI_TOKEN, IMAGE_TOKEN, USER_TOKEN, ASSISTANT_TOKEN, END_TOKEN, *RESERVED_TOKENS]
    tokenizer.add_special_tokens({"extra_special_tokens": mmgen_tokens}, replace_extra_special_tokens=False)
    if tokenizer.pad_token is None:
        tokenizer.add_special_tokens({"pad_token": PAD_TOKEN})
    tokenizer.chat_template = CHAT_TEMPLATE
    ids = SpecialIds.from_tokenizer(tokenizer, where)
    check_special_token_ids(tokenizer, where, {t: getattr(ids, name) for name, t in _MMGEN_TOKEN_FIELDS.items()})
    return tokenizer


def load_pretrained_lm_tokenizer(name_or_path: str | os.PathLike):
    """AutoTokenizer.from_pretrained(name_or_path) made mmgen's by `prepare_pretrained_lm_tokenizer`."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(name_or_path))
    except (OSError, ValueError) as err:
        raise ValueError(f"model.init_text_model: cannot load a tokenizer from {name_or_path!r}: {err}") from err
    return prepare_pretrained_lm_tokenizer(tokenizer, where=str(name_or_path))
