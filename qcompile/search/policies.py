"""Bit-width policies: uniform ``w{N}a{M}``, ``aqt`` and an explicit per-layer table.

An ``Assignment`` gives each layer (by its module name) the bits of its weights and of its *input*
activation, plus the bits of every other activation. ``aqt`` is the "Pareto-optimal quantization is
mostly 4-bit" policy: everything 4-bit, the first conv and the last linear layer 8-bit (weights and
their input activations).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from qcompile.errors import QCompileError


class PolicyError(QCompileError):
    pass


@dataclass(frozen=True)
class LayerBits:
    w: int
    a: int


@dataclass(frozen=True)
class Assignment:
    """Bits per layer; ``default_act`` is used for activations that feed no layer (adds, pools)."""

    layers: dict[str, LayerBits] = field(default_factory=dict)
    default_act: int = 8


_UNIFORM = re.compile(r"w(\d+)a(\d+)$")


def uniform(layer_names: list[str], w: int, a: int) -> Assignment:
    return Assignment({name: LayerBits(w, a) for name in layer_names}, a)


def aqt(layer_names: list[str], first: str, last: str) -> Assignment:
    layers = {name: LayerBits(4, 4) for name in layer_names}
    layers[first] = layers[last] = LayerBits(8, 8)
    return Assignment(layers, 4)


def _table_entry(name: str, value: object) -> LayerBits:
    if isinstance(value, dict) and {"w", "a"} <= value.keys():
        return LayerBits(int(value["w"]), int(value["a"]))
    if isinstance(value, list) and len(value) == 2:
        return LayerBits(int(value[0]), int(value[1]))
    raise PolicyError(f'table entry for "{name}" must be {{"w": N, "a": M}} or [N, M], got {value!r}')


def table(layer_names: list[str], path: str) -> Assignment:
    """A JSON table ``{"layer": {"w": 4, "a": 8}, ..., "default": {"w": 8, "a": 8}}``."""
    try:
        raw = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise PolicyError(f"cannot read bit-width table {path}: {exc}") from exc
    if not isinstance(raw, dict):
        raise PolicyError(f"bit-width table {path} must be a JSON object of layer -> bits")
    unknown = sorted(set(raw) - set(layer_names) - {"default"})
    if unknown:
        raise PolicyError(f"bit-width table names unknown layers {unknown}; layers are {layer_names}")
    default = _table_entry("default", raw["default"]) if "default" in raw else None
    missing = [n for n in layer_names if n not in raw]
    if missing and default is None:
        raise PolicyError(f"bit-width table misses layers {missing}; add them or a \"default\" entry")
    # a layer missing from the table takes the "default" entry (its presence is checked just above)
    layers = {n: _table_entry(n, raw[n] if n in raw else raw["default"]) for n in layer_names}
    return Assignment(layers, default.a if default else max(b.a for b in layers.values()))


POLICY_HELP = "w{N}a{M} (uniform), aqt (4-bit, first conv/last linear 8-bit), FILE.json or table (with table=FILE.json)"


def policy_assignment(policy: str, layer_names: list[str], first: str, last: str, table_path: str = "") -> Assignment:
    """The assignment a named policy gives to ``layer_names`` (in graph order)."""
    m = _UNIFORM.match(policy)
    if m:
        return uniform(layer_names, int(m[1]), int(m[2]))
    if policy == "aqt":
        return aqt(layer_names, first, last)
    if policy.endswith(".json"):
        return table(layer_names, policy)
    if policy == "table":
        if not table_path:
            raise PolicyError("policy=table needs table=FILE.json")
        return table(layer_names, table_path)
    raise PolicyError(f"unknown policy '{policy}' (known: {POLICY_HELP})")
