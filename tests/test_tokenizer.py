"""The SentencePiece tokenizer, its transformers conversion, special tokens and chat template."""

import io
import subprocess
import sys
from pathlib import Path

import pytest
import sentencepiece as spm
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import AutoTokenizer

from mmgen.tokenization import (
    SENTENCEPIECE_FILE,
    SPECIAL_TOKEN_IDS,
    SPECIAL_TOKENS,
    build_backend_tokenizer,
    load_tokenizer,
    write_transformers_tokenizer,
)

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = ROOT / "tokenizers" / "shapes"
SCRIPT = ROOT / "tokenizers" / "train_sentencepiece.py"
SHIPPED_FILES = (SENTENCEPIECE_FILE, "tokenizer.json", "tokenizer_config.json")


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(SHIPPED)


@pytest.fixture(scope="module")
def sp():
    return spm.SentencePieceProcessor(model_file=str(SHIPPED / SENTENCEPIECE_FILE))


def train_cli(tmp_path, *args):
    result = subprocess.run(
        [sys.executable, str(SCRIPT), *map(str, args)], check=False, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr
    return tmp_path


def test_tokenizers_dir_is_not_a_python_package():
    # an __init__.py there would shadow Hugging Face's `tokenizers` package
    assert not (ROOT / "tokenizers" / "__init__.py").exists()


def test_retraining_the_shipped_tokenizer_reproduces_its_files_byte_for_byte(tmp_path):
    out = tmp_path / "shapes"
    train_cli(tmp_path, "--input", SHIPPED / "corpus.txt", "--vocab-size", 512, "--out", out)
    for name in SHIPPED_FILES:
        assert (out / name).read_bytes() == (SHIPPED / name).read_bytes(), name


def test_special_tokens_sit_at_the_contract_ids_and_parse_inline(tok, sp):
    assert SPECIAL_TOKENS[:10] == ("<|pad|>", "<unk>", "<s>", "</s>", "<|boi|>", "<|eoi|>", "<|image|>",
                                   "<|user|>", "<|assistant|>", "<|end|>")  # fmt: skip
    for token, i in SPECIAL_TOKEN_IDS.items():
        assert tok.convert_tokens_to_ids(token) == i
        assert sp.id_to_piece(i) == token
    assert (tok.pad_token_id, tok.unk_token_id, tok.bos_token_id, tok.eos_token_id) == (0, 1, 2, 3)
    assert tok.image_token_id == 6 and tok.convert_tokens_to_ids(tok.boi_token) == 4
    ids = tok.encode("a red<|boi|><|image|><|eoi|>circle<|end|>", add_special_tokens=False)
    assert [i for i in ids if i < 16] == [4, 6, 5, 9]
    assert len(tok) == 512


_SHIPPED_TOKENIZER = []


def _shipped():  # hypothesis tests cannot take function-scoped fixtures; load once per module
    if not _SHIPPED_TOKENIZER:
        _SHIPPED_TOKENIZER.append(load_tokenizer(SHIPPED))
    return _SHIPPED_TOKENIZER[0]


@settings(max_examples=60, deadline=None)
@given(
    st.text(max_size=60)
    | st.lists(st.sampled_from(["<|user|>", "<|boi|>", " red", "  ", "é", "\n", "x"])).map("".join)
)
def test_decode_inverts_encode_for_any_text(text):
    tok = _shipped()
    ids = tok.encode(text, add_special_tokens=False)
    assert tok.decode(ids) == text


def test_byte_piece_names_written_in_text_stay_text(tok):
    ids = tok.encode("<0x41> A", add_special_tokens=False)
    assert tok.decode(ids) == "<0x41> A"


ALPHABET = [
    "a",
    " red",
    " circle",
    "Draw",
    " ",
    "  ",
    ".",
    "?",
    "é",
    "中",
    "\t",
    "<|end|>",
    "<|user|>",
    "Z",
    "9",
]


@settings(max_examples=60, deadline=None)
@given(st.lists(st.sampled_from(ALPHABET), max_size=20).map("".join))
def test_transformers_tokenizer_encodes_exactly_like_sentencepiece(text):
    sp = spm.SentencePieceProcessor(model_file=str(SHIPPED / SENTENCEPIECE_FILE))
    assert _shipped().encode(text, add_special_tokens=False) == sp.encode(text)


def test_shapes_grammar_text_needs_no_byte_fallback(tok):
    lines = (SHIPPED / "corpus.txt").read_text().splitlines()[:300]
    ids = [i for line in lines for i in tok.encode(line, add_special_tokens=False)]
    assert not [i for i in ids if 16 <= i < 16 + 256], "grammar text fell back to bytes"
    assert tok.convert_ids_to_tokens(tok.encode(" red circle", add_special_tokens=False)) == [
        "▁red",
        "▁circle",
    ]


MESSAGES = [
    {"role": "user", "content": "Draw a red circle."},
    {"role": "assistant", "content": [{"type": "image"}]},
    {"role": "user", "content": [{"type": "text", "text": "How many shapes?"}, {"type": "image"}]},
]


def test_chat_template_renders_roles_images_and_generation_prompt(tok):
    text = tok.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True)
    assert text == (
        "<s><|user|>Draw a red circle.<|end|><|assistant|><|boi|><|image|><|eoi|><|end|>"
        "<|user|>How many shapes?<|boi|><|image|><|eoi|><|end|><|assistant|>"
    )
    assert not tok.apply_chat_template(MESSAGES, tokenize=False).endswith("<|assistant|>")
    expanded = tok.apply_chat_template(MESSAGES[:2], tokenize=False, num_image_tokens=3)
    assert "<|boi|><|image|><|image|><|image|><|eoi|>" in expanded


def test_chat_template_marks_assistant_tokens(tok):
    out = tok.apply_chat_template(MESSAGES[:2], return_dict=True, return_assistant_tokens_mask=True)
    ids, mask = out["input_ids"], out["assistant_masks"]
    assert [i for i, m in zip(ids, mask) if m] == [4, 6, 5, 9]  # <|boi|><|image|><|eoi|><|end|>


def test_chat_template_rejects_unknown_roles(tok):
    with pytest.raises(Exception, match="unsupported role system"):
        tok.apply_chat_template([{"role": "system", "content": "x"}], tokenize=False)


def test_unigram_model_converts_exactly_and_round_trips(tmp_path):
    out = tmp_path / "uni"
    train_cli(
        tmp_path,
        "--input",
        SHIPPED / "corpus.txt",
        "--vocab-size",
        330,
        "--out",
        out,
        "--model-type",
        "unigram",
    )
    tok = AutoTokenizer.from_pretrained(str(out))
    sp = spm.SentencePieceProcessor(model_file=str(out / SENTENCEPIECE_FILE))
    for text in ["<|user|>Draw two blue squares.<|end|><|assistant|>", " a  b\tc é中 ", "How many?"]:
        ids = tok.encode(text, add_special_tokens=False)
        assert ids == sp.encode(text)
        assert tok.decode(ids) == text
    assert tok.chat_template is not None


def test_converter_rejects_a_model_without_the_fixed_special_ids(tmp_path):
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(["a red circle"] * 20), model_writer=model, model_type="bpe",
                                   vocab_size=12, minloglevel=2)  # fmt: skip
    path = tmp_path / "plain.model"
    path.write_bytes(model.getvalue())
    with pytest.raises(ValueError, match=r"plain\.model: id 0"):
        build_backend_tokenizer(path)
    with pytest.raises(ValueError, match="model_type"):
        write_transformers_tokenizer(SHIPPED / SENTENCEPIECE_FILE, tmp_path / "x", model_type="wordpiece")


def test_cli_names_a_missing_input_file(tmp_path):
    result = subprocess.run([sys.executable, str(SCRIPT), "--input", str(tmp_path / "nope.txt"), "--vocab-size", "300",
                             "--out", str(tmp_path / "o")], check=False, capture_output=True, text=True)  # fmt: skip
    assert result.returncode != 0 and "nope.txt" in result.stderr
