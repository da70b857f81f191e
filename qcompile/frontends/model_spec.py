"""Resolve a MODEL argument: ``file.py:factory``, ``package.module:factory`` or a saved ``.pt2``.

Weights (``--weights``) are read with ``torch.load(weights_only=True)``: tensors only, no code runs.
"""

from __future__ import annotations

import importlib
import importlib.util
import pickle
import re
import sys
from pathlib import Path
from types import ModuleType

import torch
from torch import nn

from qcompile.errors import QCompileError
from qcompile.frontends.torch_fx import ModelFileError


class ModelSpecError(QCompileError):
    pass


def import_user_module(module_part: str) -> ModuleType:
    """Import ``path/to/file.py`` or ``package.module``; a failure is a one-line ModelSpecError."""
    if not module_part.endswith(".py"):
        try:
            return importlib.import_module(module_part)
        except Exception as exc:  # noqa: BLE001 - whatever the user's import raises
            raise ModelSpecError(f"cannot import module '{module_part}': {type(exc).__name__}: {exc}") from exc
    path = Path(module_part)
    if not path.is_file():
        raise ModelSpecError(f"no such file: {path}")
    spec = importlib.util.spec_from_file_location(f"qcompile_user_{path.stem}", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    try:
        spec.loader.exec_module(module)
    except Exception as exc:  # noqa: BLE001 - the user's file failed to import
        raise ModelSpecError(f"cannot import {path}: {type(exc).__name__}: {exc}") from exc
    return module


def _load_factory(module_part: str, factory: str) -> object:
    if module_part.endswith(".py") and not Path(module_part).is_file():
        raise ModelSpecError(f"no such model file: {module_part}")
    module = import_user_module(module_part)
    if not hasattr(module, factory):
        public = sorted(n for n in dir(module) if not n.startswith("_"))
        raise ModelSpecError(f"'{module_part}' has no '{factory}' (it defines: {', '.join(public[:12])})")
    return getattr(module, factory)


def load_model(spec: str) -> nn.Module | Path:
    """An nn.Module built by a factory, or the Path of a .pt2 program or an .onnx model."""
    if spec.endswith((".pt2", ".onnx")):
        path = Path(spec)
        if not path.is_file():
            raise ModelFileError(f"no such file: {path}")
        return path
    module_part, sep, factory = spec.rpartition(":")
    if not sep or not module_part or not factory:
        raise ModelSpecError(
            f"MODEL '{spec}' must be file.py:factory, package.module:factory, a .pt2 or an .onnx file"
        )
    obj = _load_factory(module_part, factory)
    model = obj() if callable(obj) and not isinstance(obj, nn.Module) else obj
    if not isinstance(model, nn.Module):
        raise ModelSpecError(f"'{spec}' returned {type(model).__name__}, not a torch.nn.Module")
    return model


def load_weights(model: nn.Module, path: str | Path) -> None:
    """Load a state dict safely into ``model``; refuse files that are unreadable or do not match."""
    path = Path(path)
    if not path.is_file():
        raise ModelFileError(f"no such weights file: {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:  # torch's restricted unpickler met a global: code, not tensors
        found = re.search(r"GLOBAL ([\w.]+)", str(exc))
        named = f" (it names {found.group(1)})" if found else ""
        raise ModelFileError(f"weights {path} hold pickled objects beyond tensors{named}, which could run code; "
                             "save plain tensors with torch.save(model.state_dict())") from None
    except Exception as exc:  # noqa: BLE001 - truncated zips, garbage
        raise ModelFileError(
            f"cannot read weights {path} ({type(exc).__name__}); save them with torch.save(model.state_dict())"
        ) from None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise ModelFileError(f"{path} holds a {type(state).__name__}, not a state dict")
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        detail = " ".join(str(exc).split())
        raise ModelSpecError(f"weights {path} do not match the model: {detail[:400]}") from None
