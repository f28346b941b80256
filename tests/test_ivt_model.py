"""IVT's shared encoder: shapes, padding mask, bidirectional mask modelling, training on a batch, save -> load."""
import argparse
import math

import pytest
import torch

from model.ivt import IVT, IVTConfig, IVTCriterion, drop_tokens, ivt_lr_rules, trim_padding
from solver.build import make_param_groups
from utils.checkpoint import Checkpointer
from utils.errors import UserError

TINY = IVTConfig(width=32, depth=2, heads=2, patch_size=8, stride=6, img_size=(32, 16), vocab_size=40,
                 max_text_positions=24, drop_path=0.1)


def tiny_model(seed=0, **kwargs):
    torch.manual_seed(seed)
    return IVT(TINY, **kwargs)


def caption_ids(rows, length, pad_from, seed=0):
    """[rows, length] ids: [CLS]=2 first, random content ids, [SEP]=3, then padding (0) from column pad_from[r]."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, TINY.vocab_size, (rows, length), generator=gen)
    ids[:, 0] = 2
    for row, end in enumerate(pad_from):
        ids[row, end - 1] = 3
        ids[row, end:] = 0
    return ids


def test_config_grid_and_sizes():
    assert IVTConfig(stride=12).grid == (31, 10) and IVTConfig(stride=12).num_patches == 310
    assert IVTConfig(stride=16).grid == (24, 8)
    assert TINY.grid == (5, 2)
    model = tiny_model()
    enc = model.encoder_vl
    assert enc.pos_embed.shape == enc.type_embed.shape == (1, 11, 32)
    assert enc.embeddings.word_embeddings.weight.shape == (40, 32)
    assert enc.blocks[0].mlp_vis.fc1.weight.shape == enc.blocks[0].mlp_txt.fc1.weight.shape == (128, 32)
    assert enc.norm.eps == 1e-6 and enc.blocks[1].norm1.eps == 1e-6 and enc.embeddings.LayerNorm.eps == 1e-12
    # Stochastic depth grows linearly to the configured rate (0 at the first block: no DropPath there).
    assert isinstance(enc.blocks[0].drop_path, torch.nn.Identity)
    assert enc.blocks[1].drop_path.drop_prob == pytest.approx(0.1)


@pytest.mark.parametrize("change, message", [
    (dict(heads=3), "multiple of --ivt_heads"),
    (dict(img_size=(4, 16)), "smaller than the 8-pixel patch"),
    (dict(drop_path=1.0), "--drop_path"),
    (dict(stride=0), "must be positive"),
])
def test_bad_config_is_a_user_error(change, message):
    fields = {**TINY.__dict__, **change}
    with pytest.raises(UserError, match=message):
        IVT(IVTConfig(**fields))


def test_bad_inputs_are_user_errors():
    model = tiny_model().eval()
    with pytest.raises(UserError, match="built for"):
        model.encode_image(torch.randn(1, 3, 32, 32))
    with pytest.raises(UserError, match="24 positions"):
        model.encode_text(torch.full((1, 30), 7))
    with pytest.raises(UserError, match="lacks pids"):
        model({"images": torch.randn(1, 3, 32, 16), "caption_ids": torch.full((1, 4), 7)})
    with pytest.raises(UserError, match="same \\[B, V\\]"):
        model({"images": torch.randn(2, 3, 3, 32, 16), "caption_ids": torch.full((2, 2, 4), 7),
               "pids": torch.tensor([0, 1])})
    with pytest.raises(UserError, match="--bmm_ratio"):
        IVT(TINY, bmm_ratio=1.0)


def test_trim_padding():
    ids = torch.tensor([[2, 7, 3, 0, 0, 0], [2, 8, 9, 3, 0, 0]])
    assert trim_padding(ids, 0).tolist() == [[2, 7, 3, 0], [2, 8, 9, 3]]
    assert trim_padding(torch.zeros(2, 4, dtype=torch.long), 0).shape == (2, 1)


def test_padding_is_masked_in_attention():
    # A caption's feature does not depend on how much padding follows it, nor on the ids at padded positions.
    model = tiny_model().eval()
    ids = caption_ids(3, 12, pad_from=[5, 9, 12])
    feats = model.encode_text(ids)
    for row, end in enumerate([5, 9, 12]):
        alone = model.encode_text(ids[row:row + 1, :end])
        assert torch.allclose(feats[row], alone[0], atol=1e-5)
    garbage = ids.clone()
    garbage[0, 5:] = 17  # not the padding id any more: changes the feature
    assert not torch.allclose(model.encode_text(garbage)[0], feats[0], atol=1e-4)


def test_drop_tokens_keeps_class_token_and_cuts_mask_consistently():
    batch, count = 3, 11
    # Token n of every sample carries the value n, so kept positions can be read off the output.
    tokens = torch.arange(count, dtype=torch.float32).view(1, count, 1).expand(batch, count, 4).clone()
    keep = torch.rand(batch, count) > 0.3
    seen = set()
    for seed in range(200):
        out, out_keep, index = drop_tokens(tokens, keep, 0.2, torch.Generator().manual_seed(seed))
        dropped = count - index.numel()
        seen.add(dropped)
        assert 0 <= dropped <= math.floor(0.2 * count)
        assert index[0] == 0 and bool((index[1:] > index[:-1]).all())
        assert torch.equal(out[:, :, 0], index.float().expand(batch, -1))  # same positions for every sample
        assert torch.equal(out_keep, keep[:, index])
    assert seen == {0, 1, 2}  # k ~ U{0..floor(0.2 * 11)}: every value occurs
    out, out_keep, index = drop_tokens(tokens, None, 0.0)
    assert out is tokens and out_keep is None and index.tolist() == list(range(count))


def test_drop_tokens_is_reproducible_from_its_generator():
    tokens = torch.randn(2, 40, 3)
    first = drop_tokens(tokens, None, 0.2, torch.Generator().manual_seed(5))[2]
    again = drop_tokens(tokens, None, 0.2, torch.Generator().manual_seed(5))[2]
    assert torch.equal(first, again)


@pytest.mark.parametrize("modality", ["image", "text"])
def test_bmm_runs_the_blocks_on_the_kept_tokens(modality):
    # encoder(x, drop_ratio) equals: embed, keep the drawn positions (and their padding flags), run the blocks.
    enc = tiny_model().encoder_vl.eval()
    if modality == "image":
        inputs = torch.randn(2, 3, 32, 16)
        tokens, keep = enc.embed_image(inputs), None
    else:
        inputs = caption_ids(2, 14, pad_from=[6, 14])
        tokens, keep = enc.embed_text(inputs)
    out = enc(inputs, modality, drop_ratio=0.5, generator=torch.Generator().manual_seed(3))
    kept, kept_flags, index = drop_tokens(tokens, keep, 0.5, torch.Generator().manual_seed(3))
    assert index.numel() < tokens.shape[1]  # this seed drops something
    assert torch.allclose(out, enc.transform(kept, modality, kept_flags), atol=1e-6)
    assert out.shape[1] == index.numel()


def test_eval_never_drops_and_forward_flattens_levels():
    model = tiny_model().eval()
    images = torch.randn(2, 3, 3, 32, 16)
    ids = caption_ids(6, 10, pad_from=[4, 5, 6, 7, 8, 10]).view(2, 3, 10)
    out = model({"images": images, "caption_ids": ids, "pids": torch.tensor([7, 9])})
    # Level-major: rows 0-1 are level 0 of samples 0 and 1, rows 2-3 level 1, rows 4-5 level 2.
    flat_images = images.transpose(0, 1).reshape(6, 3, 32, 16)
    flat_ids = ids.transpose(0, 1).reshape(6, 10)
    assert torch.allclose(out["image_feats"], model.encode_image(flat_images), atol=1e-6)
    assert torch.allclose(out["text_feats"], model.encode_text(flat_ids), atol=1e-6)
    assert out["pids"].tolist() == [7, 9, 7, 9, 7, 9]
    assert out["image_feats"].dtype == torch.float32 and out["image_feats"].shape == (6, 32)
    # Plain [B, 3, H, W] / [B, L] batches work too (one level).
    single = model({"images": flat_images, "caption_ids": flat_ids, "pids": torch.arange(6)})
    assert torch.allclose(single["image_feats"], out["image_feats"], atol=1e-6)


def test_training_forward_drops_tokens_from_the_global_generator():
    model = tiny_model(bmm_ratio=0.5)
    model.train()
    for block in model.encoder_vl.blocks:
        block.drop_path = torch.nn.Identity()
    model.encoder_vl.embeddings.dropout.p = 0.0
    batch = {"images": torch.randn(2, 3, 32, 16), "caption_ids": caption_ids(2, 9, [9, 9]),
             "pids": torch.tensor([0, 1])}
    torch.manual_seed(11)
    first = model(batch)["image_feats"]
    torch.manual_seed(11)
    again = model(batch)["image_feats"]
    assert torch.equal(first, again)
    model.eval()
    clean = model(batch)["image_feats"]
    differs = []
    model.train()
    for seed in range(6):
        torch.manual_seed(seed)
        differs.append(not torch.allclose(model(batch)["image_feats"], clean, atol=1e-6))
    assert any(differs)


def test_tiny_model_fits_a_batch():
    model = tiny_model(seed=1, bmm_ratio=0.0)
    criterion = IVTCriterion()
    gen = torch.Generator().manual_seed(0)
    pids = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])
    batch = {"images": torch.randn(8, 3, 3, 32, 16, generator=gen),
             "caption_ids": caption_ids(24, 10, pad_from=[10] * 24).view(8, 3, 10), "pids": pids}
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(30):
        loss = criterion(model(batch), batch)["cmpm_loss"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert all(math.isfinite(v) for v in losses)
    # Each row has m = 6 positives (2 samples x 3 levels) with target 1/sqrt(m): the loss is bounded below by
    # -log m (all probability spread evenly over the positives, both directions); random features start high, since
    # the probability on negatives costs about -log(1e-8) = 18.4 each.
    assert losses[-1] > -math.log(6) - 1e-4
    assert losses[-1] < 0.1 * losses[0], losses


def test_save_load_gives_identical_features(tmp_path):
    model = tiny_model(seed=3).eval()
    path = Checkpointer(model, save_dir=str(tmp_path)).save("best")
    other = tiny_model(seed=4).eval()
    images, ids = torch.randn(2, 3, 32, 16), caption_ids(2, 8, [5, 8])
    assert not torch.equal(other.encode_image(images), model.encode_image(images))
    Checkpointer(other).load(path)
    assert torch.equal(other.encode_image(images), model.encode_image(images))
    assert torch.equal(other.encode_text(ids), model.encode_text(ids))


def test_lr_rules_give_biases_twice_the_rate():
    rules = ivt_lr_rules(argparse.Namespace(bias_lr_factor=2.0))
    groups = {g["name"]: g for g in make_param_groups(tiny_model(), lr=0.005, weight_decay=1e-4,
                                                      weight_decay_bias=1e-4, rules=rules)}
    assert groups["encoder_vl.blocks.0.attn.qkv.bias"]["lr"] == pytest.approx(0.01)
    assert groups["encoder_vl.embeddings.LayerNorm.bias"]["lr"] == pytest.approx(0.01)
    assert groups["encoder_vl.blocks.1.mlp_txt.fc2.weight"]["lr"] == pytest.approx(0.005)
    assert groups["encoder_vl.cls_token"]["lr"] == pytest.approx(0.005)
    assert {g["weight_decay"] for g in groups.values()} == {1e-4}
