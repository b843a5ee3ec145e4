"""Train mmgen's SentencePiece tokenizer and write it as a transformers tokenizer.

    python tokenizers/train_sentencepiece.py --input FILES... --vocab-size V --out DIR [--model-type bpe|unigram]

Each input file is read as UTF-8 text, one sentence per line (empty lines skipped), in the order given.
DIR receives spm.model (SentencePiece), tokenizer.json + tokenizer_config.json (transformers; special
tokens and chat template) and train_args.json. Special tokens take the fixed ids of docs/design.md §2.
Training is deterministic: one thread, no sentence sampling or shuffling, and nothing path-dependent is
stored in the model, so the same inputs give byte-identical files.

This directory is deliberately not a Python package (an __init__.py would shadow Hugging Face `tokenizers`).
"""

from __future__ import annotations

import argparse
import io
import json
import sys
from pathlib import Path


def read_sentences(files: list[str]) -> list[str]:
    sentences = []
    for name in files:
        path = Path(name)
        if not path.is_file():
            raise FileNotFoundError(f"--input {name}: no such file")
        with path.open(encoding="utf-8") as f:
            sentences.extend(line.rstrip("\n") for line in f if line.strip())
    if not sentences:
        raise ValueError(f"--input {' '.join(files)}: no non-empty lines to train on")
    return sentences


def train_sentencepiece(sentences: list[str], vocab_size: int, model_type: str = "bpe") -> bytes:
    """The serialised SentencePiece model (ids 0-15 = the specials of docs/design.md §2, then 256 byte pieces)."""
    import sentencepiece as spm

    from mmgen.tokenization import BOS_TOKEN, EOS_TOKEN, PAD_TOKEN, UNK_TOKEN, USER_DEFINED_SYMBOLS

    if model_type not in ("bpe", "unigram"):
        raise ValueError(f"--model-type must be bpe or unigram, got {model_type!r}")
    writer = io.BytesIO()
    options = dict(  # noqa: C408  (keyword form: these are SentencePiece's flag names)
        sentence_iterator=iter(sentences),  # not input=: the file path would be stored in the model
        model_writer=writer,
        model_type=model_type,
        vocab_size=vocab_size,
        pad_id=0, unk_id=1, bos_id=2, eos_id=3,
        pad_piece=PAD_TOKEN, unk_piece=UNK_TOKEN, bos_piece=BOS_TOKEN, eos_piece=EOS_TOKEN,
        # user-defined (not control) symbols: SentencePiece also matches them when written inline in text.
        user_defined_symbols=list(USER_DEFINED_SYMBOLS),
        byte_fallback=True,
        character_coverage=1.0,
        # Lossless round trip and an exact transformers conversion (see mmgen/tokenization.py).
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        add_dummy_prefix=False,
        split_by_whitespace=True,
        # Determinism.
        num_threads=1,
        input_sentence_size=0,
        shuffle_input_sentence=False,
        minloglevel=2,
    )  # fmt: skip
    try:
        spm.SentencePieceTrainer.train(**options)
    except RuntimeError as e:  # e.g. a unigram vocab larger than the corpus supports
        raise ValueError(
            f"SentencePiece training (--vocab-size {vocab_size}, --model-type {model_type}) failed: {e}"
        ) from e
    return writer.getvalue()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--input", nargs="+", required=True, help="UTF-8 text files, one sentence per line")
    parser.add_argument("--vocab-size", type=int, required=True)
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--model-type", choices=["bpe", "unigram"], default="bpe")
    args = parser.parse_args(argv)

    from mmgen.tokenization import SENTENCEPIECE_FILE, write_transformers_tokenizer

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model = train_sentencepiece(read_sentences(args.input), args.vocab_size, args.model_type)
    (out / SENTENCEPIECE_FILE).write_bytes(model)
    write_transformers_tokenizer(out / SENTENCEPIECE_FILE, out, model_type=args.model_type)
    train_args = {
        "vocab_size": args.vocab_size,
        "model_type": args.model_type,
        "inputs": [Path(f).name for f in args.input],
    }
    (out / "train_args.json").write_text(json.dumps(train_args, indent=2) + "\n")
    print(
        f"wrote {out}: {SENTENCEPIECE_FILE}, tokenizer.json, tokenizer_config.json (vocab {args.vocab_size})"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
