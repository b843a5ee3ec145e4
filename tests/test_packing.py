"""Packing documents into rows (docs/design.md §3 documents, §4 layout and metadata)."""

import itertools
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from mmgen.data.packing import (
    IGNORE_INDEX,
    DocumentPacker,
    PackingConfig,
    collate_documents,
    tokenize_document,
)
from mmgen.masks import TokenKind
from mmgen.tokenization import (
    ASSISTANT_ID,
    BOI_ID,
    BOS_ID,
    END_ID,
    EOI_ID,
    EOS_ID,
    IMAGE_ID,
    PAD_ID,
    load_tokenizer,
)

SHIPPED = Path(__file__).resolve().parents[1] / "tokenizers" / "shapes"


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(SHIPPED)


def red(size=8):
    return Image.new("RGB", (size, size), (255, 0, 0))


def chat_t2i(prompt="Draw a red circle.", size=8):
    return {
        "segments": [
            {"text": f"<|user|>{prompt}<|end|><|assistant|>"},
            {"image": red(size)},
            {"text": "<|end|>"},
        ]
    }


# ----------------------------------------------------------------------------- exact layouts


def test_t2i_document_layout_positions_and_labels(tok):
    cfg = PackingConfig(seq_len=48, num_image_tokens=4, image_size=8, num_noisy_copies=2)
    batch = collate_documents([chat_t2i()], tok, cfg)
    ids = batch["input_ids"][0].tolist()
    prompt = tok.encode("<|user|>Draw a red circle.<|end|><|assistant|>", add_special_tokens=False)
    boi = 1 + len(prompt)
    assert ids[: boi + 7] == [BOS_ID, *prompt, BOI_ID, *[IMAGE_ID] * 4, EOI_ID, END_ID]
    assert ids[boi + 7] == EOS_ID
    doc_len = boi + 8
    pos = batch["position_ids"][0].tolist()
    assert pos[:doc_len] == [*range(boi + 1), *[boi + 1] * 4, boi + 2, boi + 3, boi + 4]
    kinds = batch["token_kind"][0].tolist()
    assert kinds[doc_len : doc_len + 8] == [TokenKind.IMAGE_NOISY] * 4 + [TokenKind.IMAGE_TARGET] * 4
    assert pos[doc_len : doc_len + 8] == [boi + 1] * 8  # noisy copies share the clean copy's position
    assert batch["prefix_end"][0, doc_len : doc_len + 8].tolist() == [boi] * 8
    assert batch["patch_ids"][0, doc_len : doc_len + 8].tolist() == [0, 1, 2, 3] * 2
    assert batch["image_ids"][0].tolist().count(0) == 12
    assert kinds[doc_len + 8 :] == [TokenKind.PAD] * (48 - doc_len - 8)
    assert batch["document_ids"][0, doc_len + 8 :].eq(-1).all()
    labels = batch["labels"][0].tolist()
    assert labels[0] == IGNORE_INDEX  # nothing in the document predicts its first token
    assert labels[boi] == BOI_ID  # the model learns when to start an image
    assert labels[boi + 1 : boi + 6] == [IGNORE_INDEX] * 5  # image tokens and the forced <|eoi|>
    assert labels[boi + 6 : boi + 8] == [END_ID, EOS_ID]
    assert all(v == IGNORE_INDEX for v in labels[doc_len:])
    assert batch["images"].shape == (1, 3, 8, 8)
    assert batch["images"][0, 0].eq(1.0).all() and batch["images"][0, 1:].eq(-1.0).all()
    assert batch["image_uncond"].tolist() == [False]


def test_assistant_only_text_loss_masks_the_user_turn(tok):
    cfg = PackingConfig(seq_len=64, num_image_tokens=2, image_size=8, text_loss="assistant")
    doc = {"segments": [{"text": "<|user|>How many?<|end|><|assistant|>Two.<|end|>"}]}
    batch = collate_documents([doc], tok, cfg)
    ids, labels = batch["input_ids"][0].tolist(), batch["labels"][0].tolist()
    a = ids.index(ASSISTANT_ID)
    end = ids.index(END_ID, a)
    assert all(v == IGNORE_INDEX for v in labels[: a + 1])
    assert labels[a + 1 : end + 1] == ids[a + 1 : end + 1]
    assert all(v == IGNORE_INDEX for v in labels[end + 1 :])


def test_image_that_only_fits_without_its_noisy_copies_starts_a_new_row(tok):
    caption = {"segments": [{"text": "a red circle"}]}
    n_caption = len(
        tokenize_document(caption, tok, PackingConfig(seq_len=1, num_image_tokens=1, image_size=8))
    )
    image_doc = {"segments": [{"image": red()}]}  # <s> <|boi|> N <|eoi|> </s>
    N = 6
    seq_len = n_caption + 4 + N + 3  # room for the clean copy but not for its noisy copy (N more)
    cfg = PackingConfig(seq_len=seq_len, num_image_tokens=N, image_size=8, num_noisy_copies=1)
    batch = collate_documents([caption, image_doc], tok, cfg)
    assert batch["input_ids"].shape[0] == 2
    assert (batch["token_kind"][0] == TokenKind.IMAGE_CLEAN).sum() == 0
    assert (batch["token_kind"][1] == TokenKind.IMAGE_CLEAN).sum() == N
    assert (batch["token_kind"][1] == TokenKind.IMAGE_NOISY).sum() == N
    no_copies = PackingConfig(seq_len=seq_len, num_image_tokens=N, image_size=8, num_noisy_copies=0)
    assert collate_documents([caption, image_doc], tok, no_copies)["input_ids"].shape[0] == 1


def test_document_longer_than_a_row_is_cut_at_a_segment_boundary_and_counted(tok):
    doc = {"segments": [{"text": "a red circle"}, {"image": red()}, {"text": "and more"}, {"image": red()}]}
    full = tokenize_document(doc, tok, PackingConfig(seq_len=1, num_image_tokens=4, image_size=8))
    cut = full.cuts[2][0]  # after the first image
    cfg = PackingConfig(seq_len=cut + 4 + 2, num_image_tokens=4, image_size=8, num_noisy_copies=1)
    batch = collate_documents([doc], tok, cfg)
    assert batch["num_truncated_documents"] == 1 and batch["num_dropped_images"] == 1
    assert batch["images"].shape[0] == 1
    assert batch["input_ids"][0, :cut].tolist() == full.input_ids[:cut]
    assert batch["token_kind"][0, cut : cut + 4].eq(TokenKind.IMAGE_NOISY).all()
    assert batch["token_kind"][0, cut + 4 :].eq(TokenKind.PAD).all()


def test_image_larger_than_a_row_drops_the_document_and_counts_it(tok):
    cfg = PackingConfig(seq_len=10, num_image_tokens=16, image_size=8)
    batch = collate_documents([{"segments": [{"image": red()}]}, {"segments": [{"text": "ok"}]}], tok, cfg)
    assert batch["num_truncated_documents"] == 1 and batch["num_dropped_images"] == 1
    assert batch["num_documents"] == 1 and batch["images"].shape == (0, 3, 8, 8)


def test_malformed_documents_are_skipped_and_counted(tok):
    cfg = PackingConfig(seq_len=32, num_image_tokens=2, image_size=8)
    bad = [
        {"segments": []},
        {"segments": [{"text": 3}]},
        {"text": "x"},
        {"segments": [{"text": "<|image|>"}]},
    ]
    batch = collate_documents([*bad, {"segments": [{"text": "ok"}]}], tok, cfg)
    assert batch["num_skipped_documents"] == 4 and batch["num_documents"] == 1


def test_document_error_names_the_segment(tok):
    cfg = PackingConfig(seq_len=32, num_image_tokens=2, image_size=8)
    with pytest.raises(ValueError, match=r"doc7: segments\[1\]"):
        tokenize_document(
            {"segments": [{"text": "a"}, {"image": "x.png", "text": "b"}]}, tok, cfg, where="doc7"
        )
    with pytest.raises(TypeError, match=r"segments\[0\]"):
        tokenize_document({"segments": [{"image": "x.png"}]}, tok, cfg)


def test_config_rejects_bad_values():
    with pytest.raises(ValueError, match="num_noisy_copies"):
        PackingConfig(seq_len=8, num_image_tokens=1, image_size=8, num_noisy_copies=3)
    with pytest.raises(ValueError, match="text_loss"):
        PackingConfig(seq_len=8, num_image_tokens=1, image_size=8, text_loss="user")


def test_resume_continues_with_identical_batches(tok):
    docs = [chat_t2i(f"Draw {i} red circles.") if i % 3 else {"segments": [{"text": f"caption {i}"}]}
            for i in range(23)]  # fmt: skip
    cfg = PackingConfig(seq_len=40, num_image_tokens=4, image_size=8)
    reference = list(DocumentPacker(tok, cfg, batch_size=2).iter_batches(docs))
    first = DocumentPacker(tok, cfg, batch_size=2)
    stream = first.iter_batches(docs)
    for _ in range(2):
        next(stream)
    resumed = DocumentPacker(tok, cfg, batch_size=2)
    resumed.load_state_dict(first.state_dict())
    rest = list(resumed.iter_batches(docs))
    assert len(rest) == len(reference) - 2
    for got, want in zip(rest, reference[2:]):
        for key in ("input_ids", "position_ids", "labels", "images", "num_documents"):
            assert torch.equal(torch.as_tensor(got[key]), torch.as_tensor(want[key]))
    assert resumed.stats["num_documents"] == sum(b["num_documents"] for b in reference) == len(docs)


# ----------------------------------------------------------------------------- properties

WORDS = [
    "a",
    "red",
    "blue",
    "circle",
    "square",
    "left of",
    "Two.",
    "<|user|>",
    "<|assistant|>",
    "<|end|>",
    " ",
    "é",
]


@st.composite
def documents(draw):
    segments = []
    for _ in range(draw(st.integers(1, 5))):
        if draw(st.booleans()):
            segments.append(
                {"text": "".join(draw(st.lists(st.sampled_from(WORDS), min_size=1, max_size=12)))}
            )
        else:
            colour = draw(st.tuples(*[st.integers(0, 255)] * 3))
            segments.append({"image": Image.new("RGB", (draw(st.sampled_from([4, 6, 9])),) * 2, colour)})
    return {"segments": segments}


def _check_batch(batch, cfg):
    N, C = cfg.num_image_tokens, cfg.num_noisy_copies
    B, L = batch["input_ids"].shape
    assert L == cfg.seq_len
    num_images = batch["images"].shape[0]
    assert batch["image_uncond"].shape == (num_images,) and not batch["image_uncond"].any()
    assert batch["images"].abs().le(1).all()
    seen_images = []
    for b in range(B):
        row = {k: batch[k][b].tolist() for k in ("input_ids", "position_ids", "token_kind", "document_ids",
                                                  "image_ids", "patch_ids", "prefix_end", "labels")}  # fmt: skip
        kind, doc, img = row["token_kind"], row["document_ids"], row["image_ids"]
        # Row layout: documents, then noisy copies, then padding.
        order = [
            0 if k in (TokenKind.TEXT, TokenKind.IMAGE_CLEAN) else 1 if k != TokenKind.PAD else 2
            for k in kind
        ]
        assert order == sorted(order)
        n_doc_tokens = order.count(0)
        # Document ids: 0, 1, ... contiguous over the document tokens; -1 exactly on padding.
        docs = doc[:n_doc_tokens]
        assert docs[0] == 0 and all(0 <= b2 - a2 <= 1 for a2, b2 in itertools.pairwise(docs))
        assert all((d == -1) == (k == TokenKind.PAD) for d, k in zip(doc, kind))
        # Positions restart per document; images: <|boi|> p, every image token p + 1, <|eoi|> p + 2.
        j = 0
        while j < n_doc_tokens:
            if j == 0 or doc[j] != doc[j - 1]:
                expect = 0
            assert row["position_ids"][j] == expect, (b, j)
            if row["input_ids"][j] == BOI_ID:
                clean = list(range(j + 1, j + 1 + N))
                assert [kind[i] for i in clean] == [TokenKind.IMAGE_CLEAN] * N  # never split
                assert [row["position_ids"][i] for i in clean] == [expect + 1] * N
                assert [row["patch_ids"][i] for i in clean] == list(range(N))
                image_id = img[j + 1]
                assert [img[i] for i in clean] == [image_id] * N
                assert row["input_ids"][j + 1 + N] == EOI_ID and row["position_ids"][j + 1 + N] == expect + 2
                seen_images.append(image_id)
                # Its noisy copies: same image id and position, prefix_end at this <|boi|>, same document.
                copies = [i for i in range(n_doc_tokens, L) if img[i] == image_id]
                assert len(copies) == C * N
                for i in copies:
                    assert (
                        row["position_ids"][i] == expect + 1
                        and row["prefix_end"][i] == j
                        and doc[i] == doc[j]
                    )
                assert sorted(kind[i] for i in copies) == [TokenKind.IMAGE_NOISY] * (N if C else 0) + [
                    TokenKind.IMAGE_TARGET
                ] * (N if C == 2 else 0)
                j += N + 2
                expect += 3
                continue
            assert kind[j] == TokenKind.TEXT and row["input_ids"][j] not in (IMAGE_ID, PAD_ID)
            j += 1
            expect += 1
        # Labels: -100 on everything but text; <|eoi|> never learned; learned labels equal the token.
        for i in range(L):
            lab, t = row["labels"][i], row["input_ids"][i]
            if kind[i] != TokenKind.TEXT or t == EOI_ID or (i == 0 or doc[i] != doc[i - 1]):
                assert lab == IGNORE_INDEX
            else:
                assert lab in (t, IGNORE_INDEX)
                if cfg.text_loss == "all":
                    assert lab == t
        assert all(p == -1 for p, k in zip(row["prefix_end"], kind) if k not in (3, 4))
    assert sorted(seen_images) == list(range(num_images))  # flat, each image once


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    docs=st.lists(documents(), min_size=1, max_size=7),
    seq_len=st.integers(6, 80),
    N=st.integers(1, 6),
    copies=st.sampled_from([0, 1, 2]),
    text_loss=st.sampled_from(["all", "assistant"]),
    batch_size=st.integers(1, 3),
)
def test_packing_properties(tok, docs, seq_len, N, copies, text_loss, batch_size):
    cfg = PackingConfig(seq_len=seq_len, num_image_tokens=N, image_size=4, num_noisy_copies=copies,
                        text_loss=text_loss)  # fmt: skip
    packer = DocumentPacker(tok, cfg, batch_size=batch_size)
    batches = list(packer.iter_batches(docs))
    for batch in batches:
        assert batch["input_ids"].shape[0] <= batch_size
        _check_batch(batch, cfg)
    # Conservation: every document is placed whole, or its truncation (and lost images) is counted.
    expected = [tokenize_document(d, tok, cfg) for d in docs]
    too_long = [e for e in expected if e.cost(cfg) > seq_len]
    placed_lengths = []
    for batch in batches:
        for b in range(batch["input_ids"].shape[0]):
            d = batch["document_ids"][b]
            kinds = batch["token_kind"][b]
            for k in range(int(d.max()) + 1):
                placed_lengths.append(int(((d == k) & ((kinds == 1) | (kinds == 2))).sum()))
    stats = packer.stats
    assert stats["num_truncated_documents"] == len(too_long)
    assert stats["num_documents"] == len(placed_lengths)
    total_images = sum(len(e.images) for e in expected)
    assert stats["num_dropped_images"] == total_images - sum(b["images"].shape[0] for b in batches)
    fits = iter(placed_lengths)
    for e in expected:
        if e.cost(cfg) <= seq_len:
            assert next(fits) == len(e)  # whole documents keep every token
        elif any(c[0] + copies * N * c[1] <= seq_len and c[0] > 1 for c in e.cuts) or (
            len(e.cuts) > 1 and e.cuts[1][1] == 0 and seq_len > 1
        ):
            assert next(fits) < len(e)


# ----------------------------------------------------------------------------- image slots with samples


def test_slot_with_samples_has_one_clean_copy_and_a_noisy_copy_per_sample(tok):
    cfg = PackingConfig(seq_len=64, num_image_tokens=4, image_size=8, num_noisy_copies=1)
    colours = [(255, 0, 0), (0, 0, 255), (0, 255, 0)]
    doc = {"segments": [{"text": "<|user|>Draw a circle.<|end|><|assistant|>"},
                        {"images": [Image.new("RGB", (8, 8), c) for c in colours]}, {"text": "<|end|>"}]}
    batch = collate_documents([doc], tok, cfg)
    kinds, ids = batch["token_kind"][0], batch["image_ids"][0]
    clean, noisy = kinds == TokenKind.IMAGE_CLEAN, kinds == TokenKind.IMAGE_NOISY
    assert int(clean.sum()) == 4 and ids[clean].eq(0).all()  # later tokens see the first sample
    assert int(noisy.sum()) == 12 and ids[noisy].tolist() == [0] * 4 + [1] * 4 + [2] * 4
    boi = batch["input_ids"][0].tolist().index(BOI_ID)
    assert batch["prefix_end"][0][noisy].eq(boi).all()  # every sample reads the same prompt
    assert batch["position_ids"][0][noisy].eq(boi + 1).all()
    assert batch["images"].shape == (3, 3, 8, 8)
    assert batch["images"][1, 2].eq(1.0).all()  # sample order kept (the second is blue)


def test_images_in_user_turns_are_not_generation_targets_when_learning_the_assistant_only(tok):
    caption = {"segments": [{"text": "<|user|>"}, {"image": red()},
                            {"text": "Describe the image.<|end|><|assistant|>A red square.<|end|>"}]}
    for image_loss, expected in (("all", [0, 1]), ("assistant", [1])):
        cfg = PackingConfig(seq_len=96, num_image_tokens=4, image_size=8, text_loss="assistant",
                            image_loss=image_loss)
        batch = collate_documents([caption, chat_t2i()], tok, cfg)
        noisy = batch["token_kind"] == TokenKind.IMAGE_NOISY
        assert batch["image_ids"][noisy].unique().tolist() == expected
        assert batch["images"].shape[0] == 2  # the caption's image is still read (its clean copy)


def test_a_document_that_fits_only_because_its_input_image_has_no_noisy_copy_is_kept_whole(tok):
    caption = {"segments": [{"text": "<|user|>"}, {"image": red()},
                            {"text": "Describe.<|end|><|assistant|>A red square.<|end|>"}]}
    needed = len(tokenize_document(caption, tok, PackingConfig(seq_len=64, num_image_tokens=8, image_size=8)))
    cfg = PackingConfig(seq_len=needed, num_image_tokens=8, image_size=8, image_loss="assistant")
    packer = DocumentPacker(tok, cfg, batch_size=1)
    batch = next(packer.iter_batches([caption]))
    assert batch["num_truncated_documents"] == 0
    assert int((batch["token_kind"] == TokenKind.IMAGE_CLEAN).sum()) == 8
