"""utils/compile.py: maybe_compile and the one clear error where compilation cannot work."""

import pytest
import torch
from torch import nn

import utils.compile as compile_mod
from utils.compile import compile_problem, maybe_compile
from utils.errors import UserError


def test_disabled_returns_the_model_itself():
    model = nn.Linear(3, 2)
    assert maybe_compile(model, False) is model


def test_enabled_wraps_the_model_without_compiling_yet(monkeypatch):
    monkeypatch.setattr(compile_mod, "compile_problem", lambda device: None)
    model = nn.Linear(3, 2)
    compiled = maybe_compile(model, True)
    assert compiled is not model
    assert compiled._orig_mod is model  # torch.compile's wrapper; compilation happens at the first call


def test_missing_cpp_compiler_is_one_clear_error(monkeypatch):
    monkeypatch.delenv("CXX", raising=False)
    monkeypatch.setattr(compile_mod.shutil, "which", lambda name: None)
    problem = compile_problem(torch.device("cpu"))
    assert problem is not None and "C++ compiler" in problem
    with pytest.raises(UserError, match="--compile needs a C\\+\\+ compiler.*without --compile"):
        maybe_compile(nn.Linear(3, 2), True)


def test_cxx_variable_names_the_compiler(monkeypatch):
    monkeypatch.setenv("CXX", "my-c++")
    monkeypatch.setattr(compile_mod.shutil, "which", lambda name: "/opt/my-c++" if name == "my-c++" else None)
    assert compile_problem(torch.device("cpu")) is None


def test_cuda_without_triton_is_reported(monkeypatch):
    monkeypatch.setattr(compile_mod, "_has_triton", lambda: False)
    assert "Triton" in compile_problem(torch.device("cuda"))
    monkeypatch.setattr(compile_mod, "_has_triton", lambda: True)
    assert compile_problem(torch.device("cuda")) is None


def test_unsupported_python_is_reported(monkeypatch):
    import torch._dynamo

    monkeypatch.setattr(torch._dynamo, "is_dynamo_supported", lambda: False)
    assert "Python version" in compile_problem(torch.device("cpu"))


@pytest.mark.slow
def test_compiled_tiny_transformer_matches_eager():
    if compile_problem(torch.device("cpu")) is not None:
        pytest.skip("torch.compile cannot work here")
    from model.layers import Transformer

    torch.manual_seed(0)
    model = Transformer(width=32, layers=1, heads=2, causal=True)
    x = torch.randn(2, 5, 32)
    compiled = maybe_compile(model, True)
    torch.testing.assert_close(compiled(x), model(x), rtol=1e-5, atol=1e-5)
