"""MMGenProcessor: chat/segments/text -> single-document model inputs, image pre/post-processing, save/load."""

import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoProcessor

import mmgen  # noqa: F401  (registers MMGenProcessor with AutoProcessor)
from mmgen.data.packing import PackingConfig, collate_documents
from mmgen.masks import TokenKind
from mmgen.processing_mmgen import MMGenProcessor
from mmgen.tokenization import BOI_ID, EOI_ID, IMAGE_ID, load_tokenizer

SHIPPED = Path(__file__).resolve().parents[1] / "tokenizers" / "shapes"
N, SIZE = 4, 8


@pytest.fixture(scope="module")
def processor():
    return MMGenProcessor(load_tokenizer(SHIPPED), num_image_tokens=N, image_size=SIZE)


def solid(colour, size=(SIZE, SIZE)):
    return Image.new("RGB", size, colour)


def test_messages_with_an_image_expand_to_boi_n_placeholders_eoi(processor):
    messages = [
        {"role": "user", "content": "Draw a red circle."},
        {"role": "assistant", "content": [{"type": "image", "image": solid((255, 0, 0))}]},
    ]
    out = processor(messages)
    ids = out["input_ids"][0].tolist()
    b = ids.index(BOI_ID)
    assert ids[b : b + N + 2] == [BOI_ID, *[IMAGE_ID] * N, EOI_ID]
    assert ids.count(IMAGE_ID) == N and ids[0] == processor.tokenizer.bos_token_id
    assert out["token_kind"][0, b + 1 : b + 1 + N].eq(TokenKind.IMAGE_CLEAN).all()
    assert out["position_ids"][0, b + 1 : b + 1 + N].eq(b + 1).all()
    assert out["position_ids"][0, b + N + 1] == b + 2
    assert out["images"].shape == (1, 3, SIZE, SIZE) and out["image_uncond"].tolist() == [False]
    assert out["prefix_end"].eq(-1).all() and out["document_ids"].eq(0).all()  # one document, no noisy copies
    assert set(out.keys()) == set(processor.model_input_names)


def test_processor_and_packer_agree_token_for_token(processor):
    doc = {"segments": [{"text": "<|user|>Draw a blue square.<|end|><|assistant|>"}, {"image": solid((0, 0, 255))},
                        {"text": "<|end|>"}]}  # fmt: skip
    out = processor(doc, add_eos=True)
    L = out["input_ids"].shape[1]
    packed = collate_documents([doc], processor.tokenizer, PackingConfig(seq_len=L, num_image_tokens=N,
                                                                        image_size=SIZE, num_noisy_copies=0))  # fmt: skip
    for key in processor.model_input_names:
        assert torch.equal(out[key], packed[key]), key


def test_generation_prompt_ends_with_assistant(processor):
    messages = [{"role": "user", "content": [{"type": "text", "text": "Draw two cyan triangles."}]}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True)
    assert text.endswith("<|assistant|>")
    out = processor(messages, add_generation_prompt=True)
    assert out["input_ids"][0, -1] == processor.tokenizer.convert_tokens_to_ids("<|assistant|>")
    assert out["labels"][0, 0] == -100


def test_apply_chat_template_tokenized_equals_call(processor):
    image = solid((0, 255, 0))
    messages = [
        {"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": "Count."}]}
    ]
    direct = processor(messages, add_generation_prompt=True)
    via_template = processor.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=True, return_dict=True
    )
    assert torch.equal(via_template["input_ids"], direct["input_ids"])
    assert torch.equal(via_template["images"], direct["images"])


def test_text_with_image_markers_takes_images_in_order(processor):
    red, blue = solid((255, 0, 0)), solid((0, 0, 255))
    out = processor("<s>A<|image|>then<|boi|><|image|><|eoi|>end", images=[red, blue])
    ids = out["input_ids"][0].tolist()
    assert ids.count(BOI_ID) == 2 and ids.count(IMAGE_ID) == 2 * N and ids.count(2) == 1  # one <s>
    assert out["images"][0, 0].eq(1).all() and out["images"][1, 2].eq(1).all()
    with pytest.raises(ValueError, match="2 images given but the text has 1 image markers"):
        processor("A<|image|>", images=[red, blue])
    with pytest.raises(ValueError, match="more image markers"):
        processor("A<|image|><|boi|><|image|><|eoi|>", images=[red])
    with pytest.raises(ValueError, match="3 <\\|image\\|> markers"):
        processor("<|boi|><|image|><|image|><|image|><|eoi|>", images=[red])


def test_images_are_resized_and_centre_cropped_to_minus_one_one(processor):
    wide = Image.new("RGB", (3 * SIZE, SIZE))
    wide.paste((255, 0, 0), (0, 0, SIZE, SIZE))
    wide.paste((0, 255, 0), (SIZE, 0, 2 * SIZE, SIZE))
    wide.paste((0, 0, 255), (2 * SIZE, 0, 3 * SIZE, SIZE))
    x = processor.preprocess_images([wide])
    assert x.shape == (1, 3, SIZE, SIZE)
    assert torch.equal(x[0], torch.tensor([-1.0, 1.0, -1.0]).view(3, 1, 1).expand(3, SIZE, SIZE))
    big = processor.preprocess_images([solid((255, 255, 255), (4 * SIZE, 2 * SIZE))])
    assert big.shape == (1, 3, SIZE, SIZE) and torch.allclose(big, torch.ones_like(big), atol=1e-6)


def test_processor_reads_images_of_any_mode_and_orientation_as_the_shard_reader_does(processor):
    """A user's PIL image (RGBA, LA, transparent P, CMYK, 16-bit grey, EXIF-rotated, odd sizes) becomes the
    same tensor as the same image read from a shard: one conversion for both paths."""
    from mmgen.data.sample_format import decode_image

    def saved(image, **kwargs):
        buffer = io.BytesIO()
        image.save(buffer, format="PNG" if image.mode != "CMYK" else "JPEG", **kwargs)
        return buffer.getvalue()

    rotated = Image.new("RGB", (2 * SIZE, SIZE), (255, 0, 0))
    rotated.paste((0, 255, 0), (0, 0, SIZE, SIZE))
    exif = rotated.getexif()
    exif[0x0112] = 6  # lying down on disk; viewed, the green half is on top
    palette = Image.new("P", (SIZE, SIZE))
    palette.putpalette([255, 0, 0, 0, 255, 0])
    files = [
        saved(Image.new("RGBA", (SIZE + 3, SIZE), (0, 255, 0, 128))),
        saved(Image.new("LA", (SIZE, 2 * SIZE + 1), (200, 0))),
        saved(palette, transparency=0),
        saved(Image.new("CMYK", (SIZE, SIZE), (0, 255, 255, 0))),
        saved(Image.fromarray(np.full((SIZE, 3 * SIZE), 40000, dtype=np.uint16))),
        saved(rotated, exif=exif),
    ]
    for data in files:
        opened = Image.open(io.BytesIO(data))  # what a user passes: the file as PIL opens it
        expected = np.asarray(decode_image(data, SIZE), dtype=np.float32) / 127.5 - 1.0  # (H, W, 3)
        got = processor.preprocess_images([opened])[0].permute(1, 2, 0).numpy()
        assert np.allclose(got, expected, atol=1e-6), opened.mode
    transparent = processor.preprocess_images([Image.open(io.BytesIO(files[0]))])[0]
    assert transparent[:, 0, 0].tolist() == pytest.approx([-1.0, 1 / 127.5 * 128 - 1.0, -1.0], abs=1 / 127.5)
    upright = processor.preprocess_images([Image.open(io.BytesIO(files[-1]))])[0]
    assert upright[:, 0, SIZE // 2].tolist() == [-1.0, 1.0, -1.0] and upright[:, -1, SIZE // 2].tolist() == [1.0, -1.0, -1.0]


def test_postprocess_inverts_preprocess_exactly(processor):
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8))
    back = processor.postprocess_images(processor.preprocess_images([image]))
    assert np.array_equal(np.asarray(back[0]), np.asarray(image))


def test_save_and_auto_load_round_trip(processor, tmp_path):
    processor.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "processor_config.json").read_text())
    assert config["num_image_tokens"] == N and config["image_size"] == SIZE
    loaded = AutoProcessor.from_pretrained(str(tmp_path))
    assert isinstance(loaded, MMGenProcessor)
    assert (loaded.num_image_tokens, loaded.image_size) == (N, SIZE)
    messages = [{"role": "user", "content": "Draw a red circle."}]
    assert torch.equal(loaded(messages)["input_ids"], processor(messages)["input_ids"])
    assert loaded.apply_chat_template(messages) == processor.apply_chat_template(messages)


def test_errors_name_the_problem(processor):
    with pytest.raises(TypeError, match="expected chat messages"):
        processor(42)
    with pytest.raises(ValueError, match="both inside the messages and as `images`"):
        processor([{"role": "user", "content": [{"type": "image", "image": solid((0, 0, 0))}]}],
                  images=[solid((0, 0, 0))])  # fmt: skip
    with pytest.raises(TypeError, match=r"segments\[0\]"):
        processor({"segments": [{"image": "0.png"}]})
