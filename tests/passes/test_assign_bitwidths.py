"""assign-bitwidths: a policy's per-layer bits land on the weight quantizers and on the input quantizers.

Expected bits are written out by hand for each model from the policy's rules: a layer's ``a`` bits go to
the quantizer that defines its input's scale, graph inputs and outputs stay 8-bit, other activations
get the policy's default.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.fx as fx
import torch.nn.functional as F
from conftest import compile_model, make_model, run_pipeline
from torch import nn

from qcompile.ir import intops as ops
from qcompile.passes import PassError
from qcompile.passes.assign_bitwidths import AssignBitwidths
from qcompile.quant.modules import ActQuant, QConv2d, QLinear
from qcompile.search.policies import PolicyError

QUANT = "canonicalize,fold-batchnorm,insert-quantizers,calibrate"


class Chain(nn.Module):
    """conv1 -> relu -> conv2 -> relu -> conv3 -> relu -> avg pool -> flatten -> fc."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 4, 3, padding=1)
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1)
        self.conv3 = nn.Conv2d(4, 4, 3, padding=1)
        self.pool = nn.AvgPool2d(8)
        self.fc = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.conv3(F.relu(self.conv2(F.relu(self.conv1(x))))))
        return self.fc(torch.flatten(self.pool(x), 1))


def producer(gm: fx.GraphModule, quant: fx.Node) -> str:
    """What an activation quantizer quantizes: 'input', a layer's module path, or the producing op's name."""
    node = quant.args[0]
    while node.op == "call_function" and node.target in (torch.relu, torch.clamp):
        node = node.args[0]
    if node.op == "placeholder":
        return "input"
    return str(node.target) if node.op == "call_module" else node.name


def bits_of(gm: fx.GraphModule) -> tuple[dict[str, int], dict[str, int]]:
    """(weight bits per layer, activation bits per quantized value)."""
    weights = {name: m.weight_quant.bits for name, m in gm.named_modules() if isinstance(m, (QConv2d, QLinear))}
    acts = {producer(gm, n): gm.get_submodule(n.target).bits for n in gm.graph.nodes
            if n.op == "call_module" and isinstance(gm.get_submodule(n.target), ActQuant)}
    return weights, acts


def assign(model: nn.Module, options: str) -> fx.GraphModule:
    return run_pipeline(model, f"{QUANT},assign-bitwidths{options}")


@pytest.mark.parametrize(("policy", "w", "a"), [("w4a8", 4, 8), ("w4a6", 4, 6), ("w2a3", 2, 3), ("w16a16", 16, 16)])
def test_uniform_policy(policy: str, w: int, a: int) -> None:
    weights, acts = bits_of(assign(Chain().eval(), f"{{policy={policy}}}"))
    assert weights == {"conv1": w, "conv2": w, "conv3": w, "fc": w}
    # the graph input and the logits stay 8-bit; every other activation gets a bits
    assert acts == {"input": 8, "conv1": a, "conv2": a, "conv3": a, "pool": a, "fc": 8}


def test_default_is_w8a8() -> None:
    weights, acts = bits_of(run_pipeline(Chain().eval(), f"{QUANT},assign-bitwidths"))
    assert set(weights.values()) == {8} and set(acts.values()) == {8}


def test_aqt_policy() -> None:
    weights, acts = bits_of(assign(Chain().eval(), "{policy=aqt}"))
    # first conv and last linear 8-bit (weights and their inputs), everything else 4-bit
    assert weights == {"conv1": 8, "conv2": 4, "conv3": 4, "fc": 8}
    assert acts == {"input": 8, "conv1": 4, "conv2": 4, "conv3": 4, "pool": 8, "fc": 8}


def test_aqt_reaches_the_integer_graph() -> None:
    cm = compile_model(Chain().eval(), "aqt")
    layers = [m for m in cm.integer_graph.modules() if isinstance(m, (ops.IntConv2d, ops.IntLinear))]
    assert [(m.w_type.bits, m.inp.bits) for m in layers] == [(8, 8), (4, 4), (4, 4), (8, 8)]


def write_table(tmp_path: Path, table: object) -> str:
    path = tmp_path / "bits.json"
    path.write_text(json.dumps(table))
    return str(path)


def test_table_policy(tmp_path: Path) -> None:
    table = write_table(tmp_path, {"conv1": {"w": 6, "a": 8}, "conv2": [3, 5], "default": {"w": 7, "a": 2}})
    weights, acts = bits_of(assign(Chain().eval(), f"{{policy=table,table={table}}}"))
    assert weights == {"conv1": 6, "conv2": 3, "conv3": 7, "fc": 7}
    # conv2's input (conv1's output) 5; conv3's and fc's inputs the default 2; the pool output (which
    # feeds fc) 2; the graph input and output 8
    assert acts == {"input": 8, "conv1": 5, "conv2": 2, "conv3": 2, "pool": 2, "fc": 8}


def test_largest_request_wins_for_a_shared_input(tmp_path: Path) -> None:
    table = write_table(tmp_path, {"left": [4, 3], "right": [4, 6], "default": [8, 8]})
    weights, acts = bits_of(assign(make_model("concat"), f"{{policy=table,table={table}}}"))
    assert weights == {"stem": 8, "left": 4, "right": 4, "fc": 8}
    assert acts["stem"] == 6  # read by left (a=3) and right (a=6)


def run_table(tmp_path: Path, table: object) -> None:
    assign(Chain().eval(), f"{{policy=table,table={write_table(tmp_path, table)}}}")


def test_table_with_unknown_layer_names_is_refused(tmp_path: Path) -> None:
    with pytest.raises(PassError, match="assign-bitwidths") as info:
        run_table(tmp_path, {"conv1": [4, 4], "nope": [4, 4], "default": [8, 8]})
    assert isinstance(info.value.__cause__, PolicyError)
    assert "nope" in str(info.value) and "conv1" in str(info.value)  # names the culprit and the real layers


def test_table_missing_layers_without_default_is_refused(tmp_path: Path) -> None:
    with pytest.raises(PassError, match=r"misses layers \['conv3', 'fc'\]"):
        run_table(tmp_path, {"conv1": [4, 4], "conv2": [4, 4]})


@pytest.mark.parametrize("entry", [[4], {"w": 4}, "4/4", [4, 4, 4]])
def test_malformed_table_entries_are_refused(tmp_path: Path, entry: object) -> None:
    with pytest.raises(PassError, match="table entry"):
        run_table(tmp_path, {"conv1": entry, "default": [8, 8]})


def test_unreadable_table_is_refused(tmp_path: Path) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(PassError, match="cannot read bit-width table"):
        assign(Chain().eval(), f"{{policy=table,table={bad}}}")
    with pytest.raises(PassError, match="cannot read bit-width table"):
        assign(Chain().eval(), f"{{policy=table,table={tmp_path / 'missing.json'}}}")


@pytest.mark.parametrize("policy", ["w1a8", "w8a17", "w0a0"])
def test_bit_widths_outside_2_to_16_are_refused(policy: str) -> None:
    with pytest.raises(PassError, match="outside the supported range 2..16"):
        assign(Chain().eval(), f"{{policy={policy}}}")


@pytest.mark.parametrize(("options", "message"), [
    ("{policy=w4}", "unknown policy 'w4'"),
    ("{policy=mixed}", "unknown policy 'mixed'"),
    ("{policy=table}", "needs table=FILE.json"),
])
def test_bad_policies_are_refused(options: str, message: str) -> None:
    with pytest.raises(PassError, match=message) as info:
        assign(Chain().eval(), options)
    assert isinstance(info.value.__cause__, PolicyError)


def test_pass_options_print_back() -> None:
    assert AssignBitwidths(policy="aqt").spec() == "assign-bitwidths{policy=aqt}"
    assert AssignBitwidths().spec() == "assign-bitwidths"


class TwoOutputs(nn.Module):
    """Returns logits and a pooled feature map: both graph outputs must stay 8-bit."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.fc = nn.Linear(4 * 4 * 4, 3)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = F.max_pool2d(F.relu(self.conv(x)), 2)
        return self.fc(features.flatten(1)), features


def test_outputs_behind_pass_through_ops_stay_8_bit() -> None:
    cm = compile_model(TwoOutputs().eval(), policy="w4a4")
    dequantize = [m for m in cm.integer_graph.modules() if isinstance(m, ops.Dequantize)]
    assert [m.inp.bits for m in dequantize] == [8, 8]
