"""Tests for model/layers.py and model/clip_model.py on tiny CPU models."""

import hashlib
import math
import urllib.error

import pytest
import torch
from torch import nn

from model import clip_model
from model.clip_model import (
    ARCHITECTURES,
    CLIP,
    CLIPConfig,
    CLIPTextCfg,
    CLIPVisionCfg,
    build_clip,
    config_from_state_dict,
    convert_weights_to_fp16,
    load_openai_state_dict,
    resize_visual_pos_embed,
    save_openai_checkpoint,
)
from model.layers import LayerNorm, MultiheadAttention, QuickGELU
from utils.errors import UserError


SMALL = CLIPConfig(
    embed_dim=32,
    vision=CLIPVisionCfg(patch_size=8, width=128, layers=2, heads=2),
    text=CLIPTextCfg(context_length=12, vocab_size=50, width=64, layers=2, heads=1),
)


def small_clip(image_size=(32, 16), stride=8, seed=0) -> CLIP:
    torch.manual_seed(seed)
    return CLIP(SMALL, image_size, stride).eval()


def random_ids(batch=2, length=12, vocab=50, seed=1):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, vocab - 1, (batch, length), generator=gen)
    ids[:, -1] = vocab - 1  # end of text: the largest id
    return ids


# ---------------------------------------------------------------- reference implementation (plain math)
def ref_attention(x, kv, attn, causal=False):
    """Multi-head attention written out with explicit softmax; x [B, Lq, D], kv [B, Lk, D]."""
    width, heads = attn.width, attn.heads
    w, b = attn.in_proj_weight, attn.in_proj_bias
    q = x @ w[:width].T + b[:width]
    k = kv @ w[width : 2 * width].T + b[width : 2 * width]
    v = kv @ w[2 * width :].T + b[2 * width :]
    split = lambda t: t.reshape(t.shape[0], t.shape[1], heads, -1).transpose(1, 2)  # noqa: E731
    q, k, v = split(q), split(k), split(v)
    scores = q @ k.transpose(-1, -2) / math.sqrt(width // heads)
    if causal:
        lq, lk = scores.shape[-2:]
        scores = scores.masked_fill(torch.ones(lq, lk).triu(1).bool(), float("-inf"))
    out = (scores.softmax(-1) @ v).transpose(1, 2).reshape(x.shape[0], x.shape[1], width)
    return out @ attn.out_proj.weight.T + attn.out_proj.bias


def ref_layer_norm(x, ln):
    mean = x.mean(-1, keepdim=True)
    var = ((x - mean) ** 2).mean(-1, keepdim=True)
    return (x - mean) / torch.sqrt(var + ln.eps) * ln.weight + ln.bias


def ref_transformer(x, transformer, causal):
    for block in transformer.resblocks:
        h = ref_layer_norm(x, block.ln_1)
        x = x + ref_attention(h, h, block.attn, causal)
        h = ref_layer_norm(x, block.ln_2) @ block.mlp.c_fc.weight.T + block.mlp.c_fc.bias
        h = h * torch.sigmoid(1.702 * h)
        x = x + h @ block.mlp.c_proj.weight.T + block.mlp.c_proj.bias
    return x


def ref_encode_image(model, images):
    v = model.visual
    patch, stride = v.conv1.kernel_size[0], v.conv1.stride[0]
    gh, gw = v.grid_size
    rows = []
    for i in range(gh):
        for j in range(gw):
            crop = images[:, :, i * stride : i * stride + patch, j * stride : j * stride + patch]
            rows.append(crop.reshape(images.shape[0], -1) @ v.conv1.weight.reshape(v.conv1.out_channels, -1).T)
    x = torch.stack(rows, 1)  # patches in row-major order
    x = torch.cat([v.class_embedding.expand(x.shape[0], 1, -1), x], 1) + v.positional_embedding
    x = ref_transformer(ref_layer_norm(x, v.ln_pre), v.transformer, causal=False)
    return ref_layer_norm(x, v.ln_post) @ v.proj


def ref_encode_text(model, ids):
    x = model.token_embedding.weight[ids] + model.positional_embedding[: ids.shape[1]]
    x = ref_transformer(x, model.transformer, causal=True)
    return ref_layer_norm(x, model.ln_final) @ model.text_projection


# ---------------------------------------------------------------- layers
def test_attention_matches_torch_multihead_attention():
    torch.manual_seed(0)
    ref = nn.MultiheadAttention(64, 4, batch_first=True)
    nn.init.normal_(ref.in_proj_bias)
    nn.init.normal_(ref.out_proj.bias)
    ours = MultiheadAttention(64, 4)
    ours.load_state_dict(ref.state_dict())  # same parameter layout, strict
    x, kv = torch.randn(3, 7, 64), torch.randn(3, 5, 64)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), ref(x, x, x, need_weights=False)[0], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(ours(x, kv), ref(x, kv, kv, need_weights=False)[0], atol=1e-5, rtol=1e-5)
        mask = torch.full((7, 7), float("-inf")).triu(1)
        causal_ref = ref(x, x, x, need_weights=False, attn_mask=mask)[0]
        torch.testing.assert_close(ours(x, is_causal=True), causal_ref, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(ours(x, kv), ref_attention(x, kv, ours), atol=1e-5, rtol=1e-5)


def test_layer_norm_computes_in_float32_and_keeps_dtype():
    torch.manual_seed(0)
    ln = LayerNorm(16)
    nn.init.normal_(ln.weight)
    nn.init.normal_(ln.bias)
    x = (torch.randn(4, 16) * 100 + 300).half()
    out = ln(x)
    assert out.dtype == torch.float16 and ln.weight.dtype == torch.float32
    expected = ref_layer_norm(x.float(), ln).detach().half()
    torch.testing.assert_close(out, expected, atol=1e-2, rtol=1e-3)


def test_quick_gelu_values():
    x = torch.tensor([0.0, 1.0, -2.0])
    expected = torch.tensor([0.0, 1.0 / (1.0 + math.exp(-1.702)), -2.0 / (1.0 + math.exp(2 * 1.702))])
    torch.testing.assert_close(QuickGELU()(x), expected)


# ---------------------------------------------------------------- CLIP forward
@pytest.mark.parametrize(
    "image_size,stride,grid",
    [((32, 16), 8, (4, 2)), ((40, 24), 6, (6, 3)), ((16, 16), 8, (2, 2)), ((30, 17), 4, (6, 3))],
)
def test_shapes_and_reference_forward(image_size, stride, grid):
    model = small_clip(image_size, stride)
    assert model.visual.grid_size == grid
    images = torch.randn(2, 3, *image_size)
    ids = random_ids(length=9)
    with torch.no_grad():
        image_tokens, text_tokens = model(images, ids)
        assert image_tokens.shape == (2, 1 + grid[0] * grid[1], 32)
        assert text_tokens.shape == (2, 9, 32)
        torch.testing.assert_close(image_tokens, ref_encode_image(model, images), atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(text_tokens, ref_encode_text(model, ids), atol=1e-4, rtol=1e-4)


def test_text_is_causal():
    model = small_clip()
    ids = random_ids()
    changed = ids.clone()
    changed[:, 6] = (changed[:, 6] + 1) % 49
    with torch.no_grad():
        a, b = model.encode_text(ids), model.encode_text(changed)
        torch.testing.assert_close(a[:, :6], b[:, :6])
        assert (a[:, 6:] - b[:, 6:]).abs().amax(-1).min() > 1e-4
        torch.testing.assert_close(model.encode_text(ids[:, :5]), a[:, :5], atol=1e-5, rtol=1e-5)


def test_bad_inputs_raise_user_error():
    model = small_clip()
    with pytest.raises(UserError, match="--img_size"):
        model.encode_image(torch.randn(1, 3, 16, 16))
    with pytest.raises(UserError, match="context length"):
        model.encode_text(torch.ones(1, 13, dtype=torch.long))
    with pytest.raises(UserError, match="smaller than"):
        CLIP(SMALL, (4, 16), 8)
    with pytest.raises(UserError, match="--stride_size"):
        CLIP(SMALL, (32, 16), 0)
    with pytest.raises(UserError, match="height, width"):
        CLIP(SMALL, (32, 16, 3), 8)


def test_initialisation_statistics():
    cfg = CLIPConfig(128, CLIPVisionCfg(8, 128, 2, 2), CLIPTextCfg(77, 1000, 128, 2, 2))
    torch.manual_seed(0)
    model = CLIP(cfg, (64, 64), 8)

    def close(tensor, std):
        assert abs(tensor.std().item() / std - 1) < 0.1, (tensor.std().item(), std)

    close(model.token_embedding.weight, 0.02)
    close(model.positional_embedding, 0.01)
    close(model.visual.positional_embedding, 128**-0.5)
    close(model.visual.proj, 128**-0.5)
    close(model.text_projection, 128**-0.5)
    for transformer in (model.transformer, model.visual.transformer):
        block = transformer.resblocks[0]
        close(block.attn.in_proj_weight, 128**-0.5)
        close(block.attn.out_proj.weight, 128**-0.5 * 4**-0.5)
        close(block.mlp.c_fc.weight, 256**-0.5)
        close(block.mlp.c_proj.weight, 128**-0.5 * 4**-0.5)


# ---------------------------------------------------------------- configs and checkpoints
@pytest.mark.parametrize("name", ["ViT-B/32", "ViT-B/16", "ViT-L/14", "tiny"])
def test_config_inferred_from_state_dict(name):
    with torch.device("meta"):
        model = CLIP(ARCHITECTURES[name], (224, 224), ARCHITECTURES[name].vision.patch_size)
    shapes = model.state_dict()
    assert config_from_state_dict(shapes) == ARCHITECTURES[name]
    prefixed = {"base_model." + k: v for k, v in shapes.items()}
    assert config_from_state_dict(prefixed, prefix="base_model.") == ARCHITECTURES[name]


def test_openai_architecture_values():
    b16, l14 = ARCHITECTURES["ViT-B/16"], ARCHITECTURES["ViT-L/14"]
    assert (b16.embed_dim, b16.vision.width, b16.vision.layers, b16.vision.heads) == (512, 768, 12, 12)
    assert (b16.text.width, b16.text.layers, b16.text.heads, b16.text.context_length) == (512, 12, 8, 77)
    assert (l14.embed_dim, l14.vision.width, l14.vision.layers, l14.vision.heads) == (768, 1024, 24, 16)
    assert (l14.text.width, l14.text.heads) == (768, 12)


def test_resnet_and_partial_state_dicts_rejected():
    with pytest.raises(UserError, match="only ViT"):
        config_from_state_dict({"visual.layer1.0.conv1.weight": torch.zeros(1), "visual.proj": torch.zeros(1)})
    with pytest.raises(UserError, match="missing visual.proj"):
        config_from_state_dict({"visual.conv1.weight": torch.zeros(8, 3, 4, 4)})


def ref_bilinear(grid, out_h, out_w):
    """Bilinear resize with half-pixel centres (align_corners=False): grid [h, w, D] -> [out_h, out_w, D]."""
    in_h, in_w = grid.shape[:2]

    def taps(out_i, out_n, in_n):
        src = max((out_i + 0.5) * in_n / out_n - 0.5, 0.0)
        lo = min(int(math.floor(src)), in_n - 1)
        hi = min(lo + 1, in_n - 1)
        return lo, hi, src - lo

    out = torch.zeros(out_h, out_w, grid.shape[2])
    for i in range(out_h):
        y0, y1, fy = taps(i, out_h, in_h)
        for j in range(out_w):
            x0, x1, fx = taps(j, out_w, in_w)
            top = grid[y0, x0] * (1 - fx) + grid[y0, x1] * fx
            bottom = grid[y1, x0] * (1 - fx) + grid[y1, x1] * fx
            out[i, j] = top * (1 - fy) + bottom * fy
    return out


def test_position_embedding_resize_matches_bilinear():
    torch.manual_seed(0)
    pos = torch.randn(1 + 4 * 4, 6)
    resized = resize_visual_pos_embed(pos, (6, 3))
    assert resized.shape == (1 + 18, 6)
    torch.testing.assert_close(resized[0], pos[0])
    expected = ref_bilinear(pos[1:].reshape(4, 4, 6), 6, 3).reshape(18, 6)
    torch.testing.assert_close(resized[1:], expected, atol=1e-5, rtol=1e-5)
    with pytest.raises(UserError, match="square"):
        resize_visual_pos_embed(torch.randn(1 + 6, 6), (2, 2))


def bilinear_reference(pos_embed, grid_size):
    """Class row kept; the square grid resized by bilinear interpolation written out point by point
    (half-pixel centres, source coordinates clamped at 0, as ``align_corners=False`` defines it)."""
    side = round((pos_embed.shape[0] - 1) ** 0.5)
    grid = pos_embed[1:].double().reshape(side, side, -1)

    def taps(out_index, out_size):
        src = max((out_index + 0.5) * side / out_size - 0.5, 0.0)
        low = min(int(src), side - 1)
        return low, min(low + 1, side - 1), src - low

    rows = []
    for i in range(grid_size[0]):
        y0, y1, wy = taps(i, grid_size[0])
        for j in range(grid_size[1]):
            x0, x1, wx = taps(j, grid_size[1])
            top = grid[y0, x0] * (1 - wx) + grid[y0, x1] * wx
            bottom = grid[y1, x0] * (1 - wx) + grid[y1, x1] * wx
            rows.append(top * (1 - wy) + bottom * wy)
    return torch.cat([pos_embed[:1], torch.stack(rows).to(pos_embed.dtype)])


def test_bilinear_reference_on_a_hand_example():
    # A 2 x 2 grid of scalars 0 1 / 2 3 doubled to 4 x 4: the first output row samples y = -0.25 -> clamped to 0.
    pos = torch.tensor([[9.0], [0.0], [1.0], [2.0], [3.0]])
    got = resize_visual_pos_embed(pos, (4, 4))
    want = bilinear_reference(pos, (4, 4))
    torch.testing.assert_close(got, want)
    assert got[0, 0] == 9.0
    assert got[1:5, 0].tolist() == [0.0, 0.25, 0.75, 1.0]       # top row: x at -0.25, 0.25, 0.75, 1.25
    assert got[5:9, 0].tolist() == [0.5, 0.75, 1.25, 1.5]       # y = 0.25: a quarter of the way to row 2 3


@pytest.mark.parametrize("torchscript", [False, True])
def test_load_openai_checkpoint_and_resize(tmp_path, torchscript):
    square = small_clip((32, 32), 8, seed=3)  # 4 x 4 grid, like OpenAI's square checkpoints
    path = tmp_path / "clip.pt"
    save_openai_checkpoint(square, path, torchscript=torchscript)
    state = load_openai_state_dict(path)
    assert set(state) == set(square.state_dict())
    model, config = build_clip(str(path), (48, 24), 8)
    assert config == SMALL and model.visual.grid_size == (6, 3)
    loaded, source = model.state_dict(), square.state_dict()
    for key, value in source.items():
        if key != "visual.positional_embedding":
            torch.testing.assert_close(loaded[key], value, msg=key)
    torch.testing.assert_close(loaded["visual.positional_embedding"],
                               bilinear_reference(source["visual.positional_embedding"], (6, 3)))
    ids = random_ids()
    with torch.no_grad():
        torch.testing.assert_close(model.eval().encode_text(ids), square.encode_text(ids))


def test_load_nested_state_dict_with_openai_extras(tmp_path):
    source = small_clip(seed=4)
    state = dict(source.state_dict())
    state.update(
        input_resolution=torch.tensor(224), context_length=torch.tensor(12), vocab_size=torch.tensor(50),
        logit_scale=torch.tensor(4.6),
    )
    path = tmp_path / "nested.pth"
    torch.save({"state_dict": state}, path)
    loaded = load_openai_state_dict(path)
    assert "input_resolution" not in loaded and "logit_scale" in loaded
    model = small_clip(seed=5)
    report = model.load_openai_weights(loaded)
    assert "loaded" in report
    for key, value in source.state_dict().items():
        torch.testing.assert_close(model.state_dict()[key], value)


def test_text_position_embedding_is_cut_to_context():
    source = small_clip(seed=6)
    short = CLIPConfig(SMALL.embed_dim, SMALL.vision, CLIPTextCfg(8, 50, 64, 2, 1))
    model = CLIP(short, (32, 16), 8)
    report = model.load_openai_weights(source.state_dict())
    assert "first 8 rows" in report
    torch.testing.assert_close(model.positional_embedding, source.positional_embedding[:8])


def test_mismatching_checkpoints_are_reported():
    model = small_clip()
    state = dict(small_clip(seed=1).state_dict())
    del state["ln_final.weight"]
    state["visual.extra"] = torch.zeros(1)
    with pytest.raises(UserError, match=r"missing keys ln_final\.weight; unexpected keys visual\.extra"):
        model.load_openai_weights(state)
    wide = CLIP(CLIPConfig(32, SMALL.vision, CLIPTextCfg(12, 60, 64, 2, 1)), (32, 16), 8)
    with pytest.raises(UserError, match=r"token_embedding\.weight: checkpoint \(60, 64\) vs model \(50, 64\)"):
        model.load_openai_weights(wide.state_dict())


def test_unreadable_checkpoints(tmp_path):
    with pytest.raises(UserError, match="not found"):
        load_openai_state_dict(tmp_path / "missing.pt")
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"\x00\x01 definitely not a checkpoint")
    with pytest.raises(UserError, match="Cannot read"):
        load_openai_state_dict(garbage)
    odd = tmp_path / "odd.pt"
    torch.save({"weight": torch.zeros(2), "epoch": 3}, odd)
    with pytest.raises(UserError, match="non-tensor entries: epoch"):
        load_openai_state_dict(odd)
    listed = tmp_path / "list.pt"
    torch.save([torch.zeros(2)], listed)
    with pytest.raises(UserError, match="holds a list"):
        load_openai_state_dict(listed)


def test_build_clip_names(tmp_path):
    model, config = build_clip("tiny", (32, 16), 16, pretrained=False)
    assert config == ARCHITECTURES["tiny"] and model.visual.grid_size == (2, 1)
    with pytest.raises(UserError, match="ViT-B/16"):
        build_clip("ViT-H/99", (32, 16), 16)
    with pytest.raises(UserError, match="--from_scratch"):
        build_clip("tiny", (32, 16), 16, pretrained=True)
    path = tmp_path / "small.pt"
    source = small_clip(seed=7)
    save_openai_checkpoint(source, path)
    scratch, config = build_clip(str(path), (32, 16), 8, pretrained=False)
    assert config == SMALL
    assert not torch.equal(scratch.text_projection, source.text_projection)


# ---------------------------------------------------------------- download
@pytest.fixture
def fake_release(tmp_path, monkeypatch):
    """A tiny checkpoint published under a fake URL whose folder is its SHA256; counts downloads."""
    path = tmp_path / "release.pt"
    save_openai_checkpoint(small_clip(seed=8), path)
    sha = hashlib.sha256(path.read_bytes()).hexdigest()
    monkeypatch.setitem(clip_model.OPENAI_URLS, "ViT-B/16", f"https://example.invalid/clip/{sha}/Fake.pt")
    calls = []

    def fake_download(url, dst, progress=True):
        calls.append(url)
        with open(dst, "wb") as handle:
            handle.write(path.read_bytes())

    monkeypatch.setattr(torch.hub, "download_url_to_file", fake_download)
    return path, calls


def test_download_verifies_and_caches(tmp_path, fake_release):
    _, calls = fake_release
    cache = tmp_path / "cache"
    model, config = build_clip("ViT-B/16", (32, 16), 8, download_root=cache)
    assert config == SMALL and len(calls) == 1 and (cache / "Fake.pt").is_file()
    build_clip("ViT-B/16", (32, 16), 8, download_root=cache)
    assert len(calls) == 1  # served from the cache
    (cache / "Fake.pt").write_bytes(b"corrupt")
    build_clip("ViT-B/16", (32, 16), 8, download_root=cache)
    assert len(calls) == 2  # corrupt cache downloaded again


def test_download_failures(tmp_path, fake_release, monkeypatch):
    def offline(url, dst, progress=True):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    with pytest.raises(UserError, match=r"https://example\.invalid/.*Fake\.pt.*by hand"):
        build_clip("ViT-B/16", (32, 16), 8, download_root=tmp_path / "c1")

    def tampered(url, dst, progress=True):
        with open(dst, "wb") as handle:
            handle.write(b"tampered")

    monkeypatch.setattr(torch.hub, "download_url_to_file", tampered)
    with pytest.raises(UserError, match="SHA256"):
        build_clip("ViT-B/16", (32, 16), 8, download_root=tmp_path / "c2")
    assert not (tmp_path / "c2" / "Fake.pt").exists()


# ---------------------------------------------------------------- fp16
def test_fp16_conversion():
    model = small_clip()
    images, ids = torch.randn(2, 3, 32, 16), random_ids()
    with torch.no_grad():
        ref_image, ref_text = model(images, ids)
        convert_weights_to_fp16(model)
        half = {name: p.dtype for name, p in model.named_parameters()}
        assert half["visual.conv1.weight"] == torch.float16
        assert half["visual.proj"] == half["text_projection"] == torch.float16
        assert half["transformer.resblocks.0.attn.in_proj_weight"] == torch.float16
        assert half["transformer.resblocks.0.attn.in_proj_bias"] == torch.float16
        assert half["transformer.resblocks.0.attn.out_proj.weight"] == torch.float16
        assert half["transformer.resblocks.0.mlp.c_fc.bias"] == torch.float16
        for name in ("ln_final.weight", "visual.ln_pre.bias", "token_embedding.weight", "positional_embedding",
                     "visual.class_embedding", "visual.positional_embedding", "transformer.resblocks.1.ln_2.weight"):
            assert half[name] == torch.float32, name
        image_tokens, text_tokens = model(images, ids)
    assert image_tokens.dtype == text_tokens.dtype == torch.float16
    torch.testing.assert_close(image_tokens.float(), ref_image, atol=3e-2, rtol=3e-2)
    torch.testing.assert_close(text_tokens.float(), ref_text, atol=3e-2, rtol=3e-2)
