"""The precision modes: autocast dtype and gradient scaler per mode and device."""
import pytest
import torch

from utils.errors import UserError
from utils.precision import PRECISIONS, Precision, resolve_precision

CPU, CUDA = torch.device("cpu"), torch.device("cuda", 0)


def test_auto_is_irra_on_cuda_and_fp32_on_cpu():
    assert resolve_precision("auto", CUDA) == "fp16" and resolve_precision(None, CPU) == "fp32"
    assert PRECISIONS == ("fp16", "amp", "bf16", "fp32")
    with pytest.raises(UserError, match="--precision 'fp8'"):
        resolve_precision("fp8", CPU)


@pytest.mark.parametrize("mode, device, dtype, scaled", [
    ("amp", CUDA, torch.float16, True),      # PyTorch's AMP and IVT's recipe: fp16 autocast + scaler
    ("amp", CPU, torch.bfloat16, False),     # no fp16 autocast worth having on a CPU
    ("bf16", CUDA, torch.bfloat16, False),
    ("bf16", CPU, torch.bfloat16, False),
    ("fp16", CUDA, None, False),             # IRRA: half weights, no autocast, no scaler
    ("fp32", CPU, None, False),
])
def test_autocast_dtype_and_scaler(mode, device, dtype, scaled):
    precision = Precision(mode, device)
    assert precision.amp_dtype == dtype
    if device.type == "cpu" or torch.cuda.is_available():
        assert precision.grad_scaler().is_enabled() == scaled


def test_bf16_autocast_runs_a_layer_in_bfloat16_on_cpu():
    layer = torch.nn.Linear(4, 3)
    with Precision("bf16", CPU).autocast():
        out = layer(torch.randn(2, 4))
    assert out.dtype == torch.bfloat16 and layer.weight.dtype == torch.float32
    with Precision("fp32", CPU).autocast():
        assert layer(torch.randn(2, 4)).dtype == torch.float32
