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


def test_enabled_compiles_in_place_and_keeps_the_parameter_names(monkeypatch):
    monkeypatch.setattr(compile_mod, "compile_problem", lambda device: None)
    model = nn.Linear(3, 2)
    names = list(model.state_dict())
    compiled = maybe_compile(model, True)
    assert compiled is model and list(compiled.state_dict()) == names  # checkpoints stay loadable
    assert model._compiled_call_impl is not None  # nn.Module.compile: compilation happens at the first call


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
    eager = model(x)
    compiled = maybe_compile(model, True)
    torch.testing.assert_close(compiled(x), eager, rtol=1e-5, atol=1e-5)


def test_train_py_refuses_compile_before_making_a_run_folder(monkeypatch, tmp_path, capsys):
    import train as train_entry
    from datasets.synthetic import write_synthetic

    monkeypatch.delenv("CXX", raising=False)
    monkeypatch.setattr(compile_mod.shutil, "which", lambda name: None)
    write_synthetic(str(tmp_path / "data"), "CUHK-PEDES", num_ids=8, images_per_id=2, image_size=(32, 16))
    out = tmp_path / "logs"
    assert train_entry.main(["--compile", "--root_dir", str(tmp_path / "data"), "--output_dir", str(out),
                             "--pretrain_choice", "tiny", "--from_scratch", "--img_size", "32", "16",
                             "--device", "cpu", "--num_workers", "0"]) == 2
    assert "--compile needs a C++ compiler" in capsys.readouterr().err and not out.exists()
