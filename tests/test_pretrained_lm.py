"""A pretrained LM as the backbone (`model.init_text_model`): its own tokenizer with mmgen's tokens appended.

The "pretrained LM" here is a tiny Llama saved with a byte-level BPE tokenizer trained on shapes text, set
up like Qwen's: an eos token and neither bos nor pad, and an embedding table padded past the tokenizer.
"""

from __future__ import annotations

import pytest
import torch
from train_helpers import launch, make_tiny_vae

from mmgen.data.packing import DocumentPacker
from mmgen.data.shapes_docs import iter_documents
from mmgen.generation import GeneratedImage, TextDelta, generate_interleaved
from mmgen.masks import TokenKind
from mmgen.modeling_mmgen import MMGenForConditionalGeneration
from mmgen.processing_mmgen import MMGenProcessor
from mmgen.tokenization import SpecialIds, load_pretrained_lm_tokenizer

EOS = "<|endoftext|>"
PADDED_ROWS = 3  # embedding rows past the tokenizer's vocabulary, as Qwen2.5 has


@pytest.fixture(scope="module")
def lm_dir(tmp_path_factory):
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    texts = [seg["text"] for doc in iter_documents(300, seed=11, split="train", resolution=32)
             for seg in doc["segments"] if "text" in seg]  # fmt: skip
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=[EOS],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    bpe.train_from_iterator(texts, trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token=EOS)
    assert tokenizer.bos_token is None and tokenizer.pad_token is None
    path = tmp_path_factory.mktemp("pretrained_lm")
    tokenizer.save_pretrained(path)
    torch.manual_seed(0)
    llama = LlamaForCausalLM(LlamaConfig(
        vocab_size=len(tokenizer) + PADDED_ROWS, hidden_size=48, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=2, eos_token_id=tokenizer.eos_token_id, bos_token_id=None,
        pad_token_id=None, tie_word_embeddings=False, max_position_embeddings=512,
    ))  # fmt: skip
    llama.save_pretrained(path)
    return path, len(tokenizer)


def test_the_lm_tokenizer_gets_mmgen_tokens_after_its_vocabulary_and_the_model_the_same_ids(lm_dir):
    path, vocab = lm_dir
    with pytest.raises(ValueError, match="no id for pad, bos, boi"):
        SpecialIds.from_tokenizer(__import__("transformers").AutoTokenizer.from_pretrained(path))
    tokenizer = load_pretrained_lm_tokenizer(path)
    ids = SpecialIds.from_tokenizer(tokenizer)
    assert ids.bos == ids.eos == tokenizer.convert_tokens_to_ids(EOS)  # no bos: documents start with eos
    assert (ids.boi, ids.eoi, ids.image, ids.user, ids.assistant, ids.end) == tuple(range(vocab, vocab + 6))
    assert ids.pad == vocab + 12 and len(tokenizer) == vocab + 13  # after the 6 reserved tokens
    encoded = tokenizer.encode("<|user|>Draw a red circle.<|end|>", add_special_tokens=False)
    assert encoded[0] == ids.user and encoded[-1] == ids.end and len(encoded) > 2
    assert tokenizer.decode(encoded) == "<|user|>Draw a red circle.<|end|>"

    model = MMGenForConditionalGeneration.from_pretrained_text_model(str(path), tokenizer=tokenizer).eval()
    assert {k: getattr(model.config, k) for k in ids.as_config()} == ids.as_config()
    assert model.get_input_embeddings().weight.shape[0] == len(tokenizer)

    processor = MMGenProcessor.from_config(model.config, tokenizer)
    image = torch.zeros(3, 32, 32).add(0.5).clamp(0, 1)
    from PIL import Image

    pil = Image.fromarray((image.permute(1, 2, 0).numpy() * 255).astype("uint8"))
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe the image."}]},
                {"role": "assistant", "content": "A gray square."}]
    enc = processor(messages, images=[pil])
    row, kind = enc["input_ids"][0].tolist(), enc["token_kind"][0]
    assert row[0] == ids.bos and row[1] == ids.user and row[2] == ids.boi
    assert all(row[j] == ids.image for j in (kind == TokenKind.IMAGE_CLEAN).nonzero().flatten().tolist())
    assert tokenizer.decode(row).endswith("A gray square.<|end|>")
    with torch.no_grad():
        latents = model.vae.encode(enc["images"])
        out = model(**{k: v for k, v in enc.items() if k != "images"}, clean_latents=latents)
    assert torch.isfinite(out.loss)


def test_packed_rows_use_the_lm_tokenizer_ids(lm_dir):
    path, _ = lm_dir
    tokenizer = load_pretrained_lm_tokenizer(path)
    ids = SpecialIds.from_tokenizer(tokenizer)
    processor = MMGenProcessor(tokenizer, num_image_tokens=4, image_size=32)
    packer = DocumentPacker.from_processor(processor, seq_len=256, batch_size=2, text_loss="assistant")
    docs = list(iter_documents(8, seed=3, split="train", resolution=32, tasks=["caption"]))
    batch = next(packer.iter_batches(docs))
    input_ids, kind = batch["input_ids"], batch["token_kind"]
    images = (kind == TokenKind.IMAGE_CLEAN) | (kind == TokenKind.IMAGE_NOISY)
    assert bool((input_ids[images] == ids.image).all())
    assert bool((input_ids[kind == TokenKind.PAD] == ids.pad).all())
    first = input_ids[0][kind[0] == TokenKind.TEXT].tolist()
    assert first[0] == ids.bos and ids.boi in first and ids.assistant in first
    labelled = batch["labels"][0][batch["labels"][0] >= 0].tolist()
    assert labelled and ids.user not in labelled  # loss on the assistant's tokens only


def test_a_tokenizer_without_eos_is_refused_naming_it(tmp_path):
    from transformers import PreTrainedTokenizerFast

    from tokenizers import Tokenizer, models

    PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel({"a": 0, "<unk>": 1}, unk_token="<unk>")),
                            unk_token="<unk>").save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=f"{tmp_path}.*no eos token"):
        load_pretrained_lm_tokenizer(tmp_path)


def test_training_from_a_pretrained_lm_exports_a_model_that_chats(lm_dir, tmp_path):
    from transformers import AutoModel, AutoProcessor

    import mmgen  # noqa: F401  (registers the Auto classes)

    path, _ = lm_dir
    vae = make_tiny_vae(tmp_path / "vae")
    launch(["--model.vae", str(vae), "--data.shapes_dir", str(tmp_path / "shards"), "--run.output_dir",
            str(tmp_path), "--run.name", "lm", "--model.init_text_model", str(path)])  # fmt: skip
    final = tmp_path / "lm" / "final"
    model, processor = AutoModel.from_pretrained(final).eval(), AutoProcessor.from_pretrained(final)
    ids = SpecialIds.from_tokenizer(processor.tokenizer)
    assert {k: getattr(model.config, k) for k in ids.as_config()} == ids.as_config()
    assert model.config.text_config.hidden_size == 48  # the LM's, not tiny_train.yaml's 32
    parts = list(generate_interleaved(model, processor, [{"role": "user", "content": "Draw a red circle."}],
                                      max_new_tokens=4, num_steps=1, force_image=True))  # fmt: skip
    images = [p for p in parts if isinstance(p, GeneratedImage)]
    assert len(images) == 1 and images[0].image.size == (32, 32)
    assert all(isinstance(p.text, str) for p in parts if isinstance(p, TextDelta))
