"""Image-caption pairs (img2dataset shards) train both directions: caption -> image in the configured share, and
image -> caption with the caption a learned target, also when only the assistant's part is learned; long
captions are cut to a token budget and counted; the direction of a sample is the same after a resume."""

import io
import tarfile
from pathlib import Path

import pytest
from PIL import Image

from mmgen.config import ConfigError, DataSection
from mmgen.data.packing import IGNORE_INDEX, PackingConfig, tokenize_document
from mmgen.data.pairs import PairFormat, pair_segments, row_caption_budget
from mmgen.data.webdata import WebDocuments
from mmgen.masks import TokenKind
from mmgen.tokenization import BOI_ID, END_ID, load_tokenizer
from mmgen.training.data import TrainStream

SHIPPED = Path(__file__).resolve().parents[1] / "tokenizers" / "shapes"
N, SIZE = 4, 8
ASSISTANT_ONLY = PackingConfig(seq_len=256, num_image_tokens=N, image_size=SIZE, text_loss="assistant",
                               image_loss="assistant")  # fmt: skip


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(SHIPPED)


def caption(i: int) -> str:
    return f"a red circle and {['one', 'two', 'three'][i % 3]} blue squares"


def write_pairs(path: Path, keys: range) -> str:
    """img2dataset layout: KEY.png + KEY.txt per pair."""
    buffer = io.BytesIO()
    Image.new("RGB", (6, 4), (255, 0, 0)).save(buffer, format="PNG")
    with tarfile.open(path, "w") as tar:
        for i in keys:
            for name, data in ((f"{i:04d}.png", buffer.getvalue()), (f"{i:04d}.txt", caption(i).encode())):
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return str(path)


def test_pairs_train_both_directions_under_assistant_only_loss_in_the_configured_mix(tmp_path, tok):
    urls = [write_pairs(tmp_path / "a.tar", range(100)), write_pairs(tmp_path / "b.tar", range(100, 200))]
    reader = WebDocuments(urls, resolution=SIZE, shuffle=False, pairs=PairFormat(0.8, seed=0))
    directions = []
    for doc in reader:
        i = int(doc["meta"]["_wds"]["key"])
        packed = tokenize_document(doc, tok, ASSISTANT_ONLY)
        learned = [t for t in packed.labels if t != IGNORE_INDEX]
        words = tok(caption(i), add_special_tokens=False)["input_ids"]
        directions.append(doc["meta"]["_pair"])
        if directions[-1] == "text_image":  # the caption prompts, the image is drawn
            assert packed.noisy == [True] and learned == [BOI_ID, END_ID]
        else:  # the image is read, the caption written
            assert doc["meta"]["_pair"] == "image_text"
            assert packed.noisy == [False] and learned == [*words, END_ID]
    assert len(directions) == 200
    assert 0.7 <= directions.count("text_image") / 200 <= 0.9  # 0.8 drawn per pair
    assert [d["meta"]["_pair"] for d in WebDocuments(urls, resolution=SIZE, shuffle=False, pairs=PairFormat(
        0.0, seed=0))] == ["image_text"] * 200  # fmt: skip


def test_a_pair_can_change_direction_between_epochs_and_a_resume_draws_the_same(tmp_path):
    url = write_pairs(tmp_path / "a.tar", range(40))

    def reader():
        return WebDocuments(url, resolution=SIZE, shuffle=False, epochs=2, pairs=PairFormat(0.5, seed=3))

    whole = [(d["meta"]["_wds"]["position"][0], d["meta"]["_wds"]["key"], d["meta"]["_pair"]) for d in reader()]
    by_epoch = [{k: p for e, k, p in whole if e == epoch} for epoch in (0, 1)]
    assert by_epoch[0].keys() == by_epoch[1].keys() and by_epoch[0] != by_epoch[1]
    first = reader()
    head = []
    for doc in first:
        head.append(doc)
        if len(head) == 55:
            break
    first.observe(head)
    resumed = reader()
    resumed.load_state_dict(first.state_dict())
    rest = [(d["meta"]["_wds"]["position"][0], d["meta"]["_wds"]["key"], d["meta"]["_pair"]) for d in resumed]
    assert rest == whole[55:]


def test_a_long_caption_is_cut_to_the_token_budget_and_counted(tmp_path, tok):
    long_caption = " ".join(["a small red circle left of a big blue square"] * 20)
    url = str(tmp_path / "a.tar")
    with tarfile.open(url, "w") as tar:
        buffer = io.BytesIO()
        Image.new("RGB", (4, 4)).save(buffer, format="PNG")
        for name, data in (("long.png", buffer.getvalue()), ("long.txt", long_caption.encode()),
                           ("short.png", buffer.getvalue()), ("short.txt", b"a red circle")):  # fmt: skip
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    reader = WebDocuments(url, resolution=SIZE, shuffle=False,
                          pairs=PairFormat(1.0, max_caption_tokens=6, tokenizer=tok))  # fmt: skip
    docs = {d["meta"]["_wds"]["key"]: d for d in reader}
    prompt = docs["long"]["segments"][0]["text"]
    cut = prompt.removeprefix("<|user|>").removesuffix("<|end|><|assistant|>")
    assert long_caption.startswith(cut) and len(tok(cut, add_special_tokens=False)["input_ids"]) == 6
    assert docs["short"]["segments"][0]["text"] == "<|user|>a red circle<|end|><|assistant|>"
    assert reader.stats["captions_cut"] == 1 and reader.stats["documents"] == 2 and reader.stats["skipped"] == 0


def test_the_row_budget_keeps_a_pair_whole_in_a_row_in_both_directions(tok):
    packing = PackingConfig(seq_len=40, num_image_tokens=N, image_size=SIZE, num_noisy_copies=1)
    budget = row_caption_budget(tok, packing)
    image = Image.new("RGB", (SIZE, SIZE))
    words = tok(" ".join(["circle"] * 100), add_special_tokens=False)["input_ids"]
    costs = []
    for direction in ("text_image", "image_text"):
        segments = pair_segments(tok.decode(words[:budget]), image, direction)
        costs.append(tokenize_document({"segments": segments}, tok, packing).cost(packing))
    assert max(costs) == packing.seq_len  # one token more would not fit
    assert row_caption_budget(tok, PackingConfig(seq_len=10, num_image_tokens=N, image_size=SIZE)) is None


def test_a_train_stream_reads_pairs_as_both_directions(tmp_path, tok):
    url = write_pairs(tmp_path / "a.tar", range(30))
    stream = TrainStream(url, tok, ASSISTANT_ONLY, batch_size=2, seed=0, pair_text_to_image=0.5)
    batch = next(stream)
    learned = batch["labels"][batch["labels"] != IGNORE_INDEX].tolist()
    assert set(learned) - {BOI_ID, END_ID}  # caption words, written after their image
    assert batch["token_kind"].eq(TokenKind.IMAGE_NOISY).any()  # images drawn from their caption


def test_a_runs_data_section_reaches_the_readers_pair_format(tmp_path, tok):
    url = write_pairs(tmp_path / "a.tar", range(4))
    data = DataSection(batch_size=2, pair_text_to_image=0.25, max_caption_tokens=7)
    stream = TrainStream.from_config(url, tok, ASSISTANT_ONLY, data, seed=3)
    pairs = stream.reader.pairs
    assert (pairs.text_to_image, pairs.max_caption_tokens, pairs.seed) == (0.25, 7, 3)


def test_pair_settings_are_checked():
    with pytest.raises(ConfigError, match="data.pair_text_to_image"):
        DataSection(pair_text_to_image=1.5)
    with pytest.raises(ConfigError, match="data.max_caption_tokens"):
        DataSection(max_caption_tokens=0)
