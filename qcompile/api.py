"""The Python API: ``qcompile.compile(model, example_inputs, ...) -> CompiledModel``."""

from __future__ import annotations

import copy
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import onnx
import torch
import torch.fx as fx
from torch import nn
from tqdm import tqdm

from qcompile import cost
from qcompile.backends.fast import plan as fast_plan
from qcompile.backends.onnx_export import ORT_CPUS, export_onnx
from qcompile.backends.ort import VerifyResult, run_onnx, session, verify
from qcompile.backends.reference import run_reference
from qcompile.data import Dataset, check_labels
from qcompile.frontends.torch_fx import load_pt2, trace_module
from qcompile.ir.contract import Target
from qcompile.ir.meta import Stage, get_stage, get_target
from qcompile.ir.rewrite import shallow_copy
from qcompile.passes import DEFAULT_PIPELINE, PassContext, PassManager, parse_pipeline
from qcompile.passes.base import Pass, QCompileError
from qcompile.passes.manager import PassTiming


class ModelError(QCompileError):
    pass


Outputs = torch.Tensor | tuple[torch.Tensor, ...]  # a model's output: one tensor, or a tuple of several


def default_pipeline(policy: str = "w8a8", steps: int = 32, target: str | None = None) -> str:
    text = DEFAULT_PIPELINE.replace("calibrate", f"calibrate{{steps={steps}}}" if steps != 32 else "calibrate")
    assign = f"assign-bitwidths{{policy={policy}}}" if policy != "w8a8" else "assign-bitwidths"
    return with_target(text.replace("assign-bitwidths", assign), target)


def with_target(text: str, target: str | None) -> str:
    """Pipeline ``text`` with ``lower-integer`` lowering to ``target`` (None: as the text says, default ort)."""
    if target is None:
        return text
    try:
        t = Target.parse(target)
    except ValueError as exc:
        raise ModelError(str(exc)) from None
    named = re.search(r"lower-integer\{[^}]*target=([a-z]+)", text)
    if named is not None:
        if named.group(1) != t.value:
            raise ModelError(f"the pipeline lowers to target '{named.group(1)}' but target '{t.value}' was asked "
                             "for; give the target once")
        return text
    if t is Target.ORT:  # lower-integer's default
        return text
    if "lower-integer{" in text:
        return text.replace("lower-integer{", f"lower-integer{{target={t.value},", 1)
    return re.sub(r"lower-integer(?![-\w{])", f"lower-integer{{target={t.value}}}", text, count=1)


def with_ort_cpu(passes: list[Pass], ort_cpu: str) -> list[Pass]:
    """``passes`` for ``ort_cpu``: ``avx2`` puts ``limit-weight-bits{bits=7}`` right before ``lower-integer``
    (passes/limit_weight_bits.py); ``any`` and ``vnni`` only choose the export's weight form."""
    from qcompile.passes.limit_weight_bits import LimitWeightBits
    from qcompile.passes.lower_integer import LowerInteger

    if ort_cpu not in ORT_CPUS:
        raise ModelError(f"unknown ort_cpu {ort_cpu!r} (valid: {', '.join(ORT_CPUS)})")
    at = next((i for i, p in enumerate(passes) if isinstance(p, LowerInteger)), None)
    if ort_cpu != "avx2" or at is None:
        return passes
    if Target.parse(passes[at].target) is not Target.ORT:  # type: ignore[attr-defined]
        raise ModelError("--ort-cpu avx2 narrows 8-bit weights to 7 bits for onnxruntime's int8 kernels, which "
                         "only target ort uses; drop it for target integer")
    return [*passes[:at], LimitWeightBits(bits=7), *passes[at:]]


def search_pipeline(spec: str, steps: int = 32, target: str | None = None) -> str:
    """The default pipeline with the search ``spec`` (``name{options}``) choosing the bits.

    The search's quantizer scheme goes to insert-quantizers and the passes it asks for follow it.
    """
    from qcompile.search.base import searches

    name = spec.split("{", 1)[0]
    cls = searches().get(name)
    scheme, after = (cls.scheme, cls.followed_by) if cls is not None else ("uniform", ())
    text = default_pipeline("w8a8", steps, target).replace("assign-bitwidths", ",".join([spec, *after]))
    return text if scheme == "uniform" else text.replace("insert-quantizers", f"insert-quantizers{{scheme={scheme}}}")


def check_weights(model: nn.Module) -> None:
    """Refuse NaN/Inf in any parameter or buffer, naming it."""
    for name, t in [*model.named_parameters(), *model.named_buffers()]:
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise ModelError(f"weights of '{name}' contain NaN or Inf; retrain or fix the checkpoint")


def check_input_shape(model: nn.Module, example: torch.Tensor) -> None:
    from qcompile.frontends.torch_fx import quiet_torch

    try:
        with torch.no_grad(), quiet_torch():  # torch.fx prints the generated code around a failure
            model.eval()(example)
    except Exception as exc:  # noqa: BLE001 - any failure here means the shape does not fit
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise ModelError(
            f"the model does not accept inputs of shape {tuple(example.shape)}: {first}; pass the shape the "
            "model expects with --input-shape C,H,W"
        ) from None


def accuracy(predict: Callable[[torch.Tensor], Any], x: torch.Tensor, y: torch.Tensor, batch: int = 256,
             progress: bool = False, what: str = "evaluate") -> float:
    correct = 0
    for start in tqdm(range(0, len(x), batch), what, disable=not progress, leave=False):
        out = predict(x[start : start + batch])
        out = torch.as_tensor(out[0] if isinstance(out, (list, tuple)) else out)
        correct += int((out.argmax(dim=1) == y[start : start + batch]).sum())
    return 100.0 * correct / len(x)


@dataclass
class CompiledModel:
    """A compiled model: the float, quant (simulation) and integer graphs, and what was measured."""

    float_graph: fx.GraphModule
    quant_graph: fx.GraphModule | None
    integer_graph: fx.GraphModule
    example_inputs: tuple[torch.Tensor, ...]
    pipeline: str
    timings: list[PassTiming] = field(default_factory=list)
    records: dict[str, Any] = field(default_factory=dict)  # what searches and passes learned (PassContext.records)
    ort_cpu: str = "any"  # ort target: "any" / "avx2" (exact on every x86 CPU; avx2: 7-bit weights) or "vnni"
    _onnx: onnx.ModelProto | None = None
    _fast: fx.GraphModule | None = None

    def __call__(self, x: torch.Tensor) -> Outputs:
        """Run the integer graph on the fast executor: float32 inputs (N, C, H, W) in, float32 out
        (a tensor, or a tuple for a model with several outputs).

        The same values, bit for bit, as ``reference(x)`` and as onnxruntime on ``to_onnx()``.
        """
        if self._fast is None:
            self._fast = fast_plan(self.integer_graph)
        with torch.no_grad():
            out: Outputs = self._fast(x)
        return out

    def reference(self, x: torch.Tensor) -> Outputs:
        """Run the integer graph on the reference executor (int64 numpy, the executable spec); float32 out."""
        out: Outputs = run_reference(self.integer_graph, x)
        return out

    def simulate(self, x: torch.Tensor) -> Outputs:
        """Run the quant graph in eval mode: the fake-quantized float model the integer graph was lowered from.

        Tables, LayerNorm, softmax and constant arithmetic compute the integer graph's integers
        (``quant/integer_sim.py``); convs, linears, adds and pools are float arithmetic then rounding, equal
        to the integer graph except at rounding near-ties, so it is not guaranteed bit-exact. Raises
        ModelError when the pipeline had no quant stage.
        """
        if self.quant_graph is None:
            raise ModelError("this pipeline produced no quant-stage graph to simulate")
        with torch.no_grad():
            out: Outputs = self.quant_graph.eval()(x)
        return out

    @property
    def target(self) -> Target:
        """The requantization contract the integer graph follows (``ort`` or ``integer``)."""
        return get_target(self.integer_graph)

    def to_onnx(self) -> onnx.ModelProto:
        """The integer-only ONNX model (standard operators, checked with ``onnx.checker`` full check), built once."""
        if self._onnx is None:
            self._onnx = export_onnx(self.integer_graph, self.ort_cpu)
        return self._onnx

    def save_onnx(self, path: str | Path, force: bool = False) -> Path:
        """Write the ONNX file atomically, onto a regular file only (qcompile.files); kept unless ``force``."""
        from qcompile.files import check_output, write_bytes

        if Path(path).is_file() and not force:  # the Python spelling of the fix (the CLI says --force)
            raise ModelError(f"{path} already exists; choose another output path or pass force=True to replace it")
        check_output(path, force)  # before the export runs
        return write_bytes(path, self.to_onnx().SerializeToString(), force)

    def verify(self, inputs: torch.Tensor, progress: bool = False) -> VerifyResult:
        """Run ``inputs`` through onnxruntime (the export) and the reference executor; count differing elements.

        ``VerifyResult.mismatches`` is the number of output elements that differ in any bit (0 when exact),
        ``compared`` the number compared; ``cause`` names a known reason (the CPU) when there is one.
        """
        return verify(self.integer_graph, self.to_onnx(), inputs, progress=progress)

    def layer_costs(self) -> list[cost.LayerCost]:
        return cost.layer_costs(self.integer_graph)

    def accuracies(self, data: Dataset, progress: bool = False) -> dict[str, float]:
        """Top-1 accuracy (%) on the test split: float, simulated, integer executor, onnxruntime."""
        assert data.y_test is not None
        x, y = data.x_test, data.y_test
        sess = session(self.to_onnx())
        with torch.no_grad():
            result = {"float": accuracy(self.float_graph.eval(), x, y, progress=progress, what="float")}
            if self.quant_graph is not None:
                result["simulated"] = accuracy(self.simulate, x, y, progress=progress, what="simulated")
            result["integer"] = accuracy(self, x, y, progress=progress, what="integer")
        result["onnx"] = accuracy(lambda b: run_onnx(sess, b.numpy()), x, y, progress=progress, what="onnxruntime")
        return result

    def report(self, data: Dataset | None = None, verify_inputs: torch.Tensor | None = None,
               progress: bool = False) -> dict[str, Any]:
        """The JSON report, as the command line's ``--report`` writes it (a dict of JSON types).

        Keys: ``schema`` (the report format's version), ``qcompile``, ``pipeline``, ``layers``,
        ``totals``, ``passes`` (timings), ``records`` (what searches learned) when any; ``accuracy``
        (float, simulated, integer, onnx; %) when ``data`` is labelled; ``verify`` (mismatches,
        compared) when ``verify_inputs`` are given. See the README for every field.
        """
        from qcompile.report import build_report

        return build_report(self, data, verify_inputs, progress)


def _check_labels(gm: fx.GraphModule, examples: tuple[torch.Tensor, ...], data: Dataset) -> None:
    """Labels must be class indices of the model's (first) output [N, classes]."""
    with torch.no_grad():
        out = gm.eval()(*examples)
    out = out[0] if isinstance(out, (list, tuple)) else out
    if isinstance(out, torch.Tensor) and out.dim() == 2:
        check_labels(data, out.shape[1])


def _trace(model: nn.Module | str | Path, example_inputs: tuple[torch.Tensor, ...]) -> fx.GraphModule:
    if isinstance(model, (str, Path)) and str(model).endswith(".onnx"):
        from qcompile.frontends.onnx_import import load_onnx

        gm = load_onnx(model, example_inputs[0])
        check_weights(gm)
        check_input_shape(gm, example_inputs[0])
        return gm
    if isinstance(model, (str, Path)):
        gm = load_pt2(model)
        check_weights(gm)
        check_input_shape(gm, example_inputs[0])
        return gm
    model = copy.deepcopy(model)  # tracing sets eval mode and passes may touch modules: the user's stays as it was
    check_weights(model)
    check_input_shape(model, example_inputs[0])
    return trace_module(model, example_inputs)


def compile(  # noqa: A001 - the verb users expect
    model: nn.Module | str | Path,
    example_inputs: torch.Tensor | Sequence[torch.Tensor],
    *,
    data: Dataset | Callable[[], Iterable[torch.Tensor]] | None = None,
    policy: str = "w8a8",
    pipeline: str | Sequence[Pass] | None = None,
    calibration_steps: int = 32,
    progress: bool = False,
    verify_each: bool = True,
    dump: Callable[[int, Pass, fx.GraphModule], None] | None = None,
    seed: int = 0,
    target: str | None = None,
    ort_cpu: str = "any",
) -> CompiledModel:
    """Compile ``model`` (an nn.Module, or the path of a torch.export ``.pt2`` or float ``.onnx``) to an integer graph.

    ``data`` supplies calibration batches (a Dataset's training split, or a callable returning batches);
    without it the example inputs are used. ``pipeline`` (text or passes) replaces the default pipeline
    built from ``policy`` and ``calibration_steps``. ``seed`` seeds the learned searches' trainers (batch
    order, gate samples); the same seed and inputs give the same ONNX bytes. ``target`` is the
    requantization contract of the integer graph: ``ort`` (float32, exported on onnxruntime's fused
    QLinearConv kernels; the default) or ``integer`` (dyadic, for integer-only hardware), None for what the
    pipeline text says; ``ort_cpu`` chooses the ort
    export's weight form (``any``: exact on every x86 CPU, 8-bit weights on u8 x u8 kernels; ``avx2``: 8-bit
    weights quantized to 7 bits so that every layer takes the int8 kernels, fast on AVX2 and exact on every
    x86 CPU; ``vnni``: int8 weights, exact on VNNI CPUs only).
    """
    examples = (example_inputs,) if isinstance(example_inputs, torch.Tensor) else tuple(example_inputs)
    gm = _trace(model, examples)
    if isinstance(data, Dataset) and data.labelled:
        _check_labels(gm, examples, data)
    text = with_target(pipeline, target) if isinstance(pipeline, str) else default_pipeline(policy, calibration_steps,
                                                                                             target)
    passes = list(pipeline) if pipeline is not None and not isinstance(pipeline, str) else parse_pipeline(text).build()
    given = len(passes)
    passes = with_ort_cpu(passes, ort_cpu)
    calibration = data.calibration() if isinstance(data, Dataset) else data or (lambda: [examples[0]])
    dataset = data if isinstance(data, Dataset) else None
    ctx = PassContext(examples, calibration, dataset=dataset, progress=progress, seed=seed)
    snapshots: dict[str, fx.GraphModule] = {"float": gm}

    def after(index: int, p: Pass, graph: fx.GraphModule) -> None:
        stage = get_stage(graph)
        if stage is Stage.FLOAT:  # canonical float graph: batch-agnostic, the accuracy reference
            snapshots["float"] = shallow_copy(graph)
        elif stage is Stage.QUANT:
            snapshots["quant"] = graph
        if dump is not None:
            dump(index, p, graph)

    manager = PassManager(passes, verify_each=verify_each, dump=after)
    result = manager.run(gm, ctx)
    if get_stage(result) is not Stage.INTEGER:
        raise ModelError(f"the pipeline '{text}' did not end in an integer graph; finish it with lower-integer")
    spec = ",".join(p.spec() for p in passes) if not isinstance(pipeline, str) or len(passes) != given else text
    return CompiledModel(snapshots["float"], snapshots.get("quant"), result, examples, spec, manager.timings,
                         ctx.records, ort_cpu)

