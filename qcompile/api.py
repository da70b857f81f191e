"""The Python API: ``qcompile.compile(model, example_inputs, ...) -> CompiledModel``."""

from __future__ import annotations

import copy
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
from qcompile.backends.onnx_export import export_onnx
from qcompile.backends.ort import VerifyResult, run_onnx, session, verify
from qcompile.backends.reference import run_reference
from qcompile.data import Dataset
from qcompile.frontends.torch_fx import load_pt2, trace_module
from qcompile.ir.meta import Stage, get_stage
from qcompile.ir.rewrite import shallow_copy
from qcompile.passes import DEFAULT_PIPELINE, PassContext, PassManager, parse_pipeline
from qcompile.passes.base import Pass, QCompileError
from qcompile.passes.manager import PassTiming


class ModelError(QCompileError):
    pass


def default_pipeline(policy: str = "w8a8", steps: int = 32) -> str:
    text = DEFAULT_PIPELINE.replace("calibrate", f"calibrate{{steps={steps}}}" if steps != 32 else "calibrate")
    assign = f"assign-bitwidths{{policy={policy}}}" if policy != "w8a8" else "assign-bitwidths"
    return text.replace("assign-bitwidths", assign)


def search_pipeline(spec: str, steps: int = 32) -> str:
    """The default pipeline with the search ``spec`` (``name{options}``) choosing the bits.

    The search's quantizer scheme goes to insert-quantizers and the passes it asks for follow it.
    """
    from qcompile.search.base import searches

    name = spec.split("{", 1)[0]
    cls = searches().get(name)
    scheme, after = (cls.scheme, cls.followed_by) if cls is not None else ("uniform", ())
    text = default_pipeline("w8a8", steps).replace("assign-bitwidths", ",".join([spec, *after]))
    return text if scheme == "uniform" else text.replace("insert-quantizers", f"insert-quantizers{{scheme={scheme}}}")


def check_weights(model: nn.Module) -> None:
    """Refuse NaN/Inf in any parameter or buffer, naming it."""
    for name, t in [*model.named_parameters(), *model.named_buffers()]:
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise ModelError(f"weights of '{name}' contain NaN or Inf; retrain or fix the checkpoint")


def check_input_shape(model: nn.Module, example: torch.Tensor) -> None:
    try:
        with torch.no_grad():
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
    _onnx: onnx.ModelProto | None = None
    _fast: fx.GraphModule | None = None

    def __call__(self, x: torch.Tensor) -> Any:
        """Run the integer graph with the fast executor."""
        if self._fast is None:
            self._fast = fast_plan(self.integer_graph)
        with torch.no_grad():
            return self._fast(x)

    def reference(self, x: torch.Tensor) -> Any:
        return run_reference(self.integer_graph, x)

    def simulate(self, x: torch.Tensor) -> Any:
        if self.quant_graph is None:
            raise ModelError("this pipeline produced no quant-stage graph to simulate")
        with torch.no_grad():
            return self.quant_graph.eval()(x)

    def to_onnx(self) -> onnx.ModelProto:
        if self._onnx is None:
            self._onnx = export_onnx(self.integer_graph)
        return self._onnx

    def save_onnx(self, path: str | Path, force: bool = False) -> Path:
        """Write the ONNX file; an existing file is kept unless ``force`` (written atomically)."""
        path = Path(path)
        if path.exists() and not force:
            raise ModelError(f"{path} already exists; choose another output path or pass --force")
        if not path.parent.is_dir():
            raise ModelError(f"the folder {path.parent} does not exist; create it or choose another output path")
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_bytes(self.to_onnx().SerializeToString())
        tmp.replace(path)
        return path

    def verify(self, inputs: torch.Tensor) -> VerifyResult:
        return verify(self.integer_graph, self.to_onnx(), inputs)

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
        from qcompile.report import build_report

        return build_report(self, data, verify_inputs, progress)


def _trace(model: nn.Module | str | Path, example_inputs: tuple[torch.Tensor, ...]) -> fx.GraphModule:
    if isinstance(model, (str, Path)) and str(model).endswith(".onnx"):
        from qcompile.frontends.onnx_import import load_onnx

        gm = load_onnx(model, tuple(example_inputs[0].shape[1:]))
        check_input_shape(gm, example_inputs[0])
        return gm
    if isinstance(model, (str, Path)):
        return load_pt2(model)
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
) -> CompiledModel:
    """Compile ``model`` (an nn.Module, or the path of a torch.export ``.pt2`` or float ``.onnx``) to an integer graph.

    ``data`` supplies calibration batches (a Dataset's training split, or a callable returning batches);
    without it the example inputs are used. ``pipeline`` (text or passes) replaces the default pipeline
    built from ``policy`` and ``calibration_steps``. ``seed`` seeds the learned searches' trainers (batch
    order, gate samples); the same seed and inputs give the same ONNX bytes.
    """
    examples = (example_inputs,) if isinstance(example_inputs, torch.Tensor) else tuple(example_inputs)
    gm = _trace(model, examples)
    text = pipeline if isinstance(pipeline, str) else default_pipeline(policy, calibration_steps)
    passes = list(pipeline) if pipeline is not None and not isinstance(pipeline, str) else parse_pipeline(text).build()
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
    spec = ",".join(p.spec() for p in passes) if not isinstance(pipeline, str) else text
    return CompiledModel(snapshots["float"], snapshots.get("quant"), result, examples, spec, manager.timings,
                         ctx.records)

