"""Specification tests for mmgen.masks (the rule of docs/design.md §5)."""

import random

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention.flex_attention import create_mask

from mmgen.masks import (
    TokenKind,
    build_block_mask,
    build_dense_mask,
    build_image_step_block_mask,
    build_image_step_mask,
)

K = TokenKind
NOISY = (K.IMAGE_NOISY, K.IMAGE_TARGET)


# ---------------------------------------------------------------------------- reference rule
def reference_mask(kind, doc, img, pe, uncond):
    """Plain-Python loops over (b, q, k), written from the rule text of docs/design.md §5."""
    B, L = len(kind), len(kind[0])
    out = [[[False] * L for _ in range(L)] for _ in range(B)]
    for b in range(B):
        for q in range(L):
            for k in range(L):
                kq, kk = kind[b][q], kind[b][k]
                if kq == K.PAD:
                    ok = q == k
                elif kk == K.PAD or doc[b][q] != doc[b][k]:
                    ok = False
                elif kk in NOISY:
                    ok = kq == kk and img[b][q] == img[b][k]
                elif kq == K.TEXT:
                    ok = k <= q
                elif kq == K.IMAGE_CLEAN:
                    ok = k <= q or (kk == K.IMAGE_CLEAN and img[b][k] == img[b][q])
                else:  # noisy/target query, key is text or clean
                    if uncond[img[b][q]]:
                        ok = k == pe[b][q]
                    else:
                        ok = k <= pe[b][q]
                out[b][q][k] = ok
    return torch.tensor(out)[:, None]  # (B, 1, L, L)


def random_batch(rng, B, L, num_copies=None):
    """Random valid packed rows: documents of text and images, noisy copies at the end, padding."""
    kind = [[K.PAD] * L for _ in range(B)]
    doc = [[-1] * L for _ in range(B)]
    img = [[-1] * L for _ in range(B)]
    pe = [[-1] * L for _ in range(B)]
    uncond = []
    for b in range(B):
        copies = rng.choice([0, 1, 2]) if num_copies is None else num_copies
        body, images = [], []  # body: (kind, doc, img); images: (img_id, doc, boi_pos, n)
        budget = L - rng.randint(0, 4)  # leave some padding sometimes
        d = 0
        while True:
            seg = []
            seg_images = []
            for _ in range(rng.randint(1, 4)):
                if rng.random() < 0.5:
                    seg += [(K.TEXT, d, -1)] * rng.randint(1, 3)
                else:
                    n = rng.randint(1, 4)
                    i = len(uncond) + len(images) + len(seg_images)
                    boi = len(body) + len(seg)
                    seg += [(K.TEXT, d, -1)] + [(K.IMAGE_CLEAN, d, i)] * n + [(K.TEXT, d, -1)]
                    seg_images.append((i, d, boi, n))
            used = len(body) + len(seg) + copies * sum(n for *_, n in images + seg_images)
            if used > budget:
                break
            body += seg
            images += seg_images
            d += 1
        tail = []
        order = rng.choice(["per_image", "per_kind"])
        kinds = [K.IMAGE_NOISY, K.IMAGE_TARGET][:copies]
        groups = (
            [(i, c) for i in images for c in kinds] if order == "per_image"
            else [(i, c) for c in kinds for i in images]
        )
        for (i, di, boi, n), c in groups:
            tail += [(c, di, i, boi)] * n
        for pos, (kk, dd, ii) in enumerate(body):
            kind[b][pos], doc[b][pos], img[b][pos] = kk, dd, ii
        for j, (kk, dd, ii, boi) in enumerate(tail):
            pos = len(body) + j
            kind[b][pos], doc[b][pos], img[b][pos], pe[b][pos] = kk, dd, ii, boi
        uncond += [rng.random() < 0.4 for _ in images]
    return kind, doc, img, pe, uncond


def as_tensors(kind, doc, img, pe, uncond):
    t = lambda x: torch.tensor(x, dtype=torch.long)
    return t(kind), t(doc), t(img), t(pe), torch.tensor(uncond, dtype=torch.bool)


# ---------------------------------------------------------------------------- a hand-built row
def example_row():
    """doc 0: text text boi c c eoi text | doc 1: boi c eoi | noisy copies of both | target of image 0 | pad."""
    kind = [1, 1, 1, 2, 2, 1, 1, 1, 2, 1, 3, 3, 3, 4, 4, 0, 0]
    doc = [0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 0, 0, 1, 0, 0, -1, -1]
    img = [-1, -1, -1, 0, 0, -1, -1, -1, 1, -1, 0, 0, 1, 0, 0, -1, -1]
    pe = [-1] * 10 + [2, 2, 7, 2, 2, -1, -1]
    return [kind], [doc], [img], [pe]


def dense_bool(kind, doc, img, pe, uncond=None):
    t = lambda x: torch.tensor(x, dtype=torch.long)
    unc = None if uncond is None else torch.tensor(uncond)
    return build_dense_mask(t(kind), t(doc), t(img), t(pe), unc, dtype=torch.bool)[0, 0]


def test_dense_matches_reference_on_random_packed_rows():
    rng = random.Random(0)
    for trial in range(30):
        B, L = rng.randint(1, 3), rng.randint(8, 40)
        meta = random_batch(rng, B, L)
        tensors = as_tensors(*meta)
        got = build_dense_mask(*tensors, dtype=torch.bool)
        assert got.shape == (B, 1, L, L) and got.dtype == torch.bool
        assert torch.equal(got, reference_mask(*meta)), f"trial {trial}"


def test_query_start_keeps_the_last_rows_of_the_dense_mask():
    rng = random.Random(1)
    for trial in range(10):
        B, L = rng.randint(1, 3), rng.randint(8, 40)
        tensors = as_tensors(*random_batch(rng, B, L))
        start = rng.randint(1, L - 1)
        full = build_dense_mask(*tensors, dtype=torch.bool)
        assert torch.equal(build_dense_mask(*tensors, dtype=torch.bool, query_start=start), full[:, :, start:])
    with pytest.raises(ValueError, match="query_start"):
        build_dense_mask(*tensors, query_start=L)


def test_random_generator_covers_every_kind_and_uncond():
    rng = random.Random(0)
    seen, flags = set(), set()
    for _ in range(30):
        kind, *_, uncond = random_batch(rng, 2, 40)
        seen |= {k for row in kind for k in row}
        flags |= set(uncond)
    assert seen == set(TokenKind) and flags == {True, False}


def test_additive_mask_is_zero_or_finfo_min():
    kind, doc, img, pe = example_row()
    t = lambda x: torch.tensor(x, dtype=torch.long)
    for dtype in (torch.float32, torch.bfloat16):
        m = build_dense_mask(t(kind), t(doc), t(img), t(pe), dtype=dtype)
        b = build_dense_mask(t(kind), t(doc), t(img), t(pe), dtype=torch.bool)
        assert m.dtype == dtype
        assert torch.equal(m == 0, b)
        assert torch.all(m[~b] == torch.finfo(dtype).min)


def test_nothing_attends_to_noisy_copies():
    kind, doc, img, pe = example_row()
    m = dense_bool(kind, doc, img, pe)
    for k, kk in enumerate(kind[0]):
        if kk in NOISY:
            viewers = {q for q in range(len(kind[0])) if m[q, k]}
            same_copy = {q for q, kq in enumerate(kind[0]) if kq == kk and img[0][q] == img[0][k]}
            assert viewers == same_copy


def test_student_and_target_copies_of_one_image_do_not_see_each_other():
    kind, doc, img, pe = example_row()
    m = dense_bool(kind, doc, img, pe)
    assert not m[10:12, 13:15].any() and not m[13:15, 10:12].any()
    assert m[10:12, 10:12].all() and m[13:15, 13:15].all()


def test_documents_never_see_each_other():
    kind, doc, img, pe = example_row()
    m = dense_bool(kind, doc, img, pe)
    d = torch.tensor(doc[0])
    real = d >= 0
    cross = (d[:, None] != d[None, :]) & real[:, None] & real[None, :]
    assert not m[cross].any()


def test_text_is_causal():
    kind, doc, img, pe = example_row()
    m = dense_bool(kind, doc, img, pe)
    assert m[6, :7].all() and not m[6, 7:].any()  # last text token of doc 0
    assert not m[1, 2]  # no peeking forward


def test_clean_image_is_bidirectional_within_itself_and_causal_before():
    kind, doc, img, pe = example_row()
    m = dense_bool(kind, doc, img, pe)
    assert m[3, 4]  # first clean token sees the second one
    assert m[3, :3].all()  # and the text before, <|boi|> included
    assert not m[3, 5] and not m[4, 6]  # not <|eoi|> or later text


def test_conditional_noisy_copy_sees_prefix_through_boi_and_itself():
    kind, doc, img, pe = example_row()
    m = dense_bool(kind, doc, img, pe)
    expected = torch.zeros(17, dtype=torch.bool)
    expected[[0, 1, 2, 10, 11]] = True
    assert torch.equal(m[10], expected) and torch.equal(m[11], expected)


def test_uncond_noisy_copy_sees_only_its_boi():
    kind, doc, img, pe = example_row()
    m = dense_bool(kind, doc, img, pe, uncond=[True, False])
    expected = torch.zeros(17, dtype=torch.bool)
    expected[[2, 10, 11]] = True
    assert torch.equal(m[10], expected)
    assert torch.equal(m[13, :13], torch.eye(17, dtype=torch.bool)[2, :13])  # target copy too
    # image 1 stays conditional: its copy sees doc 1's prefix (boi at 7) and itself
    assert m[12].nonzero().flatten().tolist() == [7, 12]


def test_padding_rows_are_not_empty():
    kind, doc, img, pe = example_row()
    m = dense_bool(kind, doc, img, pe)
    assert m.any(dim=-1).all()
    assert m[15].nonzero().flatten().tolist() == [15]
    assert not m[:15, 15:].any()  # nobody sees padding


def test_additive_mask_gives_finite_attention_everywhere():
    rng = random.Random(1)
    tensors = as_tensors(*random_batch(rng, 3, 32))
    mask = build_dense_mask(*tensors)
    q = torch.randn(3, 2, 32, 8)
    out = F.scaled_dot_product_attention(q, q, q, attn_mask=mask)
    assert torch.isfinite(out).all()


def test_block_mask_mask_mod_equals_dense_mask():
    rng = random.Random(2)
    for _ in range(5):
        B, L = rng.randint(1, 3), rng.randint(10, 70)
        tensors = as_tensors(*random_batch(rng, B, L))
        bm = build_block_mask(*tensors, block_size=16)
        assert bm.shape == (B, 1, L, L)
        dense = create_mask(bm.mask_mod, B, 1, L, L, device="cpu")
        assert torch.equal(dense, build_dense_mask(*tensors, dtype=torch.bool))


def test_block_mask_blocks_cover_allowed_entries():
    rng = random.Random(3)
    B, L, bs = 2, 64, 16
    tensors = as_tensors(*random_batch(rng, B, L))
    bm = build_block_mask(*tensors, block_size=bs)
    blocks = bm.to_dense().bool()  # (B, 1, L/bs, L/bs): blocks the kernel visits
    dense = build_dense_mask(*tensors, dtype=torch.bool)
    per_block = dense.reshape(B, 1, L // bs, bs, L // bs, bs).any(dim=(3, 5))  # (B, 1, nq, nk)
    assert torch.equal(blocks, per_block)


def test_bad_metadata_raises_naming_the_argument():
    kind, doc, img, pe = (torch.tensor(x) for x in example_row())
    with pytest.raises(ValueError, match="document_ids"):
        build_dense_mask(kind, doc[:, :5], img, pe)
    with pytest.raises(ValueError, match="token_kind"):
        build_dense_mask(kind + 7, doc, img, pe)
    bad_pe = pe.clone()
    bad_pe[0, 10] = -1
    with pytest.raises(ValueError, match="prefix_end"):
        build_dense_mask(kind, doc, img, bad_pe)
    with pytest.raises(ValueError, match="image_uncond"):
        build_dense_mask(kind, doc, img, pe, torch.tensor([True]))
    with pytest.raises(ValueError, match="image_ids"):
        build_dense_mask(kind, doc, img.float(), pe)


# ---------------------------------------------------------------------------- cached image step
@pytest.mark.parametrize("uncond", [False, True])
def test_image_step_mask_equals_full_row_mask(uncond):
    """One document: text, <|boi|> at P-1, then N noisy tokens; the step rows are the full-row rows."""
    P, N = 6, 3
    kind = [[K.TEXT] * P + [K.IMAGE_NOISY] * N]
    doc = [[0] * (P + N)]
    img = [[-1] * P + [0] * N]
    pe = [[-1] * P + [P - 1] * N]
    full = dense_bool(kind, doc, img, pe, uncond=[uncond])[P:]  # (N, P + N)
    step = build_image_step_mask(P, N, image_uncond=uncond, dtype=torch.bool)
    assert step.shape == (1, 1, N, P + N)
    assert torch.equal(step[0, 0], full)


def test_image_step_mask_batched_with_left_padding_and_mixed_uncond():
    P, N = 5, 2
    valid = torch.tensor([[0, 1, 1, 1, 1], [1, 1, 1, 1, 1]], dtype=torch.bool)
    m = build_image_step_mask(P, N, image_uncond=torch.tensor([False, True]),
                              prefix_attention_mask=valid, dtype=torch.bool)
    assert m.shape == (2, 1, N, P + N)
    assert m[0, 0, 0].tolist() == [False, True, True, True, True, True, True]
    assert m[1, 0, 1].tolist() == [False, False, False, False, True, True, True]
    additive = build_image_step_mask(P, N, prefix_attention_mask=valid)
    assert additive.dtype == torch.float32 and torch.equal(additive == 0, build_image_step_mask(
        P, N, prefix_attention_mask=valid, dtype=torch.bool))


def test_image_step_block_mask_equals_dense():
    P, N = 37, 9
    valid = torch.ones(3, P, dtype=torch.bool)
    valid[0, :4] = False
    kw = {"image_uncond": torch.tensor([False, True, False]), "boi_position": torch.tensor([36, 20, 30]),
              "prefix_attention_mask": valid}
    bm = build_image_step_block_mask(P, N, block_size=16, **kw)
    dense = create_mask(bm.mask_mod, 3, 1, N, P + N, device="cpu")
    assert torch.equal(dense, build_image_step_mask(P, N, dtype=torch.bool, **kw))


def test_image_step_bad_arguments_raise():
    with pytest.raises(ValueError, match="boi_position"):
        build_image_step_mask(4, 2, boi_position=4)
    with pytest.raises(ValueError, match="prefix_attention_mask"):
        build_image_step_mask(4, 2, prefix_attention_mask=torch.ones(1, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match="batch sizes"):
        build_image_step_mask(4, 2, image_uncond=torch.tensor([True, False]), batch_size=3)


# ---------------------------------------------------------------------------- flex vs SDPA
# Uncompiled flex_attention (the CPU fallback) warns that it materialises the scores; expected here.
unfused_flex = pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")


@unfused_flex
def test_flex_attention_forward_matches_sdpa_with_dense_mask():
    from torch.nn.attention.flex_attention import flex_attention

    rng = random.Random(4)
    B, H, L, D = 2, 2, 48, 16
    tensors = as_tensors(*random_batch(rng, B, L))
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(B, H, L, D, generator=g) for _ in range(3))
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=build_dense_mask(*tensors))
    out = flex_attention(q, k, v, block_mask=build_block_mask(*tensors, block_size=16))
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-4)


@unfused_flex
def test_flex_attention_forward_matches_sdpa_on_cached_image_step():
    from torch.nn.attention.flex_attention import flex_attention

    B, H, P, N, D = 2, 2, 21, 7, 8
    kw = {"image_uncond": torch.tensor([False, True]), "boi_position": torch.tensor([20, 15])}
    g = torch.Generator().manual_seed(1)
    q = torch.randn(B, H, N, D, generator=g)
    k, v = (torch.randn(B, H, P + N, D, generator=g) for _ in range(2))
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=build_image_step_mask(P, N, **kw))
    out = flex_attention(q, k, v, block_mask=build_image_step_block_mask(P, N, block_size=16, **kw))
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-4)
