"""The fast CPU kernels of model/kernels.py against their plain twins (and float64 where it helps)."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from model.clip_model import CLIP, CLIPConfig, CLIPTextCfg, CLIPVisionCfg
from model.kernels import (
    _dense,
    cpu_vendor_tunes_mkl,
    fast_kernels,
    fast_kernels_enabled,
    linear,
    onednn_available,
    onednn_linear_preferred,
    prefer_onednn_linear,
    quick_gelu,
)
from model.layers import Linear, MultiheadAttention, QuickGELU

needs_onednn = pytest.mark.skipif(not onednn_available(), reason="this torch build has no oneDNN linear kernel")


@pytest.fixture(autouse=True)
def onednn_linear_on_every_cpu():
    """The comparisons below exercise the oneDNN path whatever CPU runs them (by default Intel CPUs use MKL)."""
    with prefer_onednn_linear(True):
        yield


def test_the_cpu_vendor_decides_the_default_linear():
    intel = "processor\t: 0\nvendor_id\t: GenuineIntel\ncpu family\t: 6\n"
    amd = "processor\t: 0\nvendor_id\t: AuthenticAMD\ncpu family\t: 26\n"
    assert cpu_vendor_tunes_mkl(intel) and not cpu_vendor_tunes_mkl(amd) and not cpu_vendor_tunes_mkl("")
    with prefer_onednn_linear(None):
        assert onednn_linear_preferred() == (not cpu_vendor_tunes_mkl(open("/proc/cpuinfo").read()))
    with prefer_onednn_linear(False):
        assert not onednn_linear_preferred()
        x, weight = torch.randn(4, 8, requires_grad=True), torch.randn(3, 8)
        assert linear(x, weight).grad_fn.name() == F.linear(x, weight).grad_fn.name()  # MKL's F.linear itself
    assert onednn_linear_preferred()  # the fixture's setting is back


@needs_onednn
def test_the_onednn_path_is_taken_when_preferred():
    x = torch.randn(4, 8, requires_grad=True)
    assert "OneDNN" in linear(x, torch.randn(3, 8)).grad_fn.name()


def _grads(fn, *tensors):
    """fn(*tensors) and the gradients of sum(out * fixed weights) with respect to each tensor."""
    leaves = [t.detach().clone().requires_grad_() if t is not None else None for t in tensors]
    out = fn(*leaves)
    weights = torch.linspace(-1, 1, out.numel(), dtype=out.dtype).reshape(out.shape)
    (out * weights).sum().backward()
    return out.detach(), [t.grad if t is not None else None for t in leaves]


@needs_onednn
@pytest.mark.parametrize("shape", [(2, 7, 32), (5, 32), (3, 1, 32)])
@pytest.mark.parametrize("with_bias", [True, False])
def test_linear_matches_f_linear_and_float64(shape, with_bias):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(*shape, generator=gen)
    weight = torch.randn(24, 32, generator=gen) / 32**0.5
    bias = torch.randn(24, generator=gen) if with_bias else None
    fast_out, fast_grads = _grads(linear, x, weight, bias)
    with fast_kernels(False):
        plain_out, plain_grads = _grads(linear, x, weight, bias)
    exact_out, exact_grads = _grads(F.linear, x.double(), weight.double(), None if bias is None else bias.double())
    assert fast_out.shape == (*shape[:-1], 24)
    torch.testing.assert_close(fast_out, plain_out, rtol=0, atol=1e-6)
    torch.testing.assert_close(fast_out.double(), exact_out, rtol=0, atol=1e-5)
    for fast, plain, exact in zip(fast_grads, plain_grads, exact_grads):
        if plain is None:
            assert fast is None
            continue
        assert fast.shape == plain.shape
        torch.testing.assert_close(fast, plain, rtol=0, atol=1e-6)
        torch.testing.assert_close(fast.double(), exact, rtol=0, atol=1e-5)


@needs_onednn
def test_linear_with_strided_weight_views_as_attention_and_projections_use():
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2, 5, 16, generator=gen)
    in_proj = torch.randn(48, 16, generator=gen)
    proj = torch.randn(16, 8, generator=gen)
    for weight in (in_proj[16:], proj.t()):  # a row slice (cross attention's key/value), a transpose (x @ proj)
        fast_out, (gx, gw) = _grads(lambda a, w: linear(a, w), x, weight)
        plain_out, (px, pw) = _grads(lambda a, w: a @ w.t(), x, weight)
        torch.testing.assert_close(fast_out, plain_out, rtol=0, atol=1e-5)
        torch.testing.assert_close(gx, px, rtol=0, atol=1e-5)
        torch.testing.assert_close(gw, pw, rtol=0, atol=1e-5)


@needs_onednn
def test_linear_of_class_token_rows_matches_f_linear():
    # tokens[:, 0, :] has a row stride of a whole sequence; the classifier sees such inputs
    tokens = torch.randn(4, 9, 16, generator=torch.Generator().manual_seed(2))
    weight, bias = torch.randn(7, 16), torch.randn(7)
    fast_out, (gx, gw, gb) = _grads(linear, tokens[:, 0, :], weight, bias)
    plain_out, (px, pw, pb) = _grads(F.linear, tokens[:, 0, :], weight, bias)
    for fast, plain in ((fast_out, plain_out), (gx, px), (gw, pw), (gb, pb)):
        torch.testing.assert_close(fast, plain, rtol=0, atol=1e-5)


def test_dense_keeps_contiguous_and_transposed_operands_and_copies_others():
    matrix = torch.randn(6, 4)
    assert _dense(matrix) is matrix
    transposed = matrix.t()
    assert _dense(transposed) is transposed
    rows = torch.randn(3, 5, 4)[:, 0, :]  # row stride 20
    assert not rows.is_contiguous()
    copied = _dense(rows)
    assert copied.is_contiguous() and torch.equal(copied, rows)
    expanded = torch.ones(1, 4).expand(6, 4)  # stride 0, as the gradient of a sum
    assert _dense(expanded).is_contiguous()


@needs_onednn
def test_linear_takes_the_onednn_path_only_where_it_applies():
    x = torch.randn(4, 8, requires_grad=True)
    weight = torch.randn(3, 8, requires_grad=True)
    assert fast_kernels_enabled()
    assert type(linear(x, weight).grad_fn).__name__ == "_OneDNNLinearBackward"
    with fast_kernels(False):
        assert not fast_kernels_enabled()
        assert torch.equal(linear(x, weight), F.linear(x, weight))
        assert type(linear(x, weight).grad_fn).__name__ != "_OneDNNLinearBackward"
    assert fast_kernels_enabled()
    # float64, a 1-d input, an empty batch and CPU autocast all keep F.linear
    assert torch.equal(linear(x.double(), weight.double()), F.linear(x.double(), weight.double()))
    assert torch.equal(linear(x[0], weight), F.linear(x[0], weight))
    assert linear(x[:0], weight).shape == (0, 3)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert linear(x, weight).dtype == torch.bfloat16


def test_fast_kernels_restores_the_previous_setting_after_an_error():
    with pytest.raises(RuntimeError):
        with fast_kernels(False):
            raise RuntimeError("boom")
    assert fast_kernels_enabled()
    with fast_kernels(False):
        with fast_kernels(True):
            assert fast_kernels_enabled()
        assert not fast_kernels_enabled()


def test_quick_gelu_equals_the_plain_formula():
    x = torch.linspace(-12, 12, 2001)
    fast_out, (fast_grad,) = _grads(quick_gelu, x)
    plain_out, (plain_grad,) = _grads(lambda t: t * torch.sigmoid(1.702 * t), x)
    # values up to 12 in magnitude: a tolerance of 1e-6 relative to max(1, |y|)
    scale = plain_out.abs().clamp(min=1)
    assert ((fast_out - plain_out).abs() / scale).max() <= 1e-6
    assert (fast_grad - plain_grad).abs().max() <= 1e-6
    assert quick_gelu(torch.tensor(0.0)).item() == 0.0
    with fast_kernels(False):
        assert torch.equal(QuickGELU()(x), x * torch.sigmoid(1.702 * x))


def test_linear_module_keeps_nn_linear_parameters_and_state_dict():
    plain = nn.Linear(6, 4)
    module = Linear(6, 4)
    module.load_state_dict(plain.state_dict())
    assert set(module.state_dict()) == {"weight", "bias"}
    x = torch.randn(3, 6)
    torch.testing.assert_close(module(x), plain(x), rtol=0, atol=1e-6)


def _clip_and_cross_attention() -> tuple[CLIP, MultiheadAttention]:
    cfg = CLIPConfig(
        embed_dim=64,
        vision=CLIPVisionCfg(patch_size=8, width=64, layers=2, heads=2),
        text=CLIPTextCfg(context_length=12, vocab_size=50, width=64, layers=2, heads=2),
    )
    torch.manual_seed(0)
    return CLIP(cfg, (32, 16), 8), MultiheadAttention(64, 2)


def _outputs_and_grads(clip: CLIP, cross: MultiheadAttention) -> tuple[torch.Tensor, dict]:
    """Both encoders and a cross attention of text to image tokens, like IRRA's MLM branch; the gradients of
    a fixed weighted sum of everything."""
    gen = torch.Generator().manual_seed(3)
    images = torch.randn(4, 3, 32, 16, generator=gen)
    ids = torch.randint(1, 49, (4, 12), generator=gen)
    ids[:, 9:] = 0
    clip.zero_grad(set_to_none=True)
    cross.zero_grad(set_to_none=True)
    image_tokens, text_tokens = clip(images, ids)
    fused = cross(text_tokens, image_tokens)
    out = torch.cat([image_tokens.flatten(), text_tokens.flatten(), fused.flatten()])
    (out * torch.linspace(-1, 1, out.numel())).sum().backward()
    params = list(clip.named_parameters()) + [(f"cross.{n}", p) for n, p in cross.named_parameters()]
    return out.detach(), {n: p.grad.clone() for n, p in params if p.grad is not None}


def test_encoders_with_fast_kernels_match_the_plain_ones():
    clip, cross = _clip_and_cross_attention()
    with fast_kernels(False):
        plain_out, plain_grads = _outputs_and_grads(clip, cross)
    fast_out, fast_grads = _outputs_and_grads(clip, cross)
    assert set(fast_grads) == set(plain_grads) and len(plain_grads) > 40
    assert (fast_out - plain_out).abs().max() <= 1e-5 * max(1.0, plain_out.abs().max().item())
    for name, grad in plain_grads.items():
        tolerance = 1e-5 * max(1.0, grad.abs().max().item())
        assert (fast_grads[name] - grad).abs().max().item() <= tolerance, name
