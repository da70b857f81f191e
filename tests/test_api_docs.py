"""The public API documents itself and speaks the API's language (force=True, not --force)."""

from __future__ import annotations

import inspect
from pathlib import Path

import pytest
import torch

import qcompile
from qcompile.api import CompiledModel, ModelError
from qcompile.models import DemoNet

PUBLIC_METHODS = ["__call__", "reference", "simulate", "to_onnx", "save_onnx", "verify", "report", "accuracies"]


@pytest.mark.parametrize("name", PUBLIC_METHODS)
def test_compiled_model_methods_have_docstrings_and_types(name: str) -> None:
    method = getattr(CompiledModel, name)
    assert inspect.getdoc(method) and len(inspect.getdoc(method) or "") > 30, name
    hints = inspect.signature(method)
    assert hints.return_annotation is not inspect.Signature.empty, name
    assert "Any" not in str(hints.return_annotation) or name == "report", name


def test_existing_file_error_names_the_argument(tmp_path: Path) -> None:
    torch.manual_seed(0)
    cm = qcompile.compile(DemoNet(), torch.randn(4, 1, 8, 8))
    out = tmp_path / "m.onnx"
    out.write_bytes(b"keep me")
    with pytest.raises(ModelError, match=r"pass force=True to replace it") as info:
        cm.save_onnx(out)
    assert "--force" not in str(info.value)
    assert out.read_bytes() == b"keep me"
    report = cm.report()
    assert report["schema"] == 1 and report["qcompile"] == qcompile.__version__
