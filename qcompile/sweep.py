"""Sweeps: compile one model under a grid of search options and find the accuracy/cost Pareto front.

A ``SweepPoint`` is one search with concrete options, e.g. ``aqt{epochs=1,fraction=0.2}``. ``grid``
expands per-option value lists into their cartesian product; ``points_from_flags`` does the same for the
command line, where ``--search A,B`` starts a group and the flags after it belong to that group (each
search takes the flags it has an option for; flags before the first ``--search`` go to every group).
``baseline_points`` adds fixed policies compiled post-training (``assign-bitwidths{policy=P}``, method
``ptq``) and, given an epoch budget N, trained for it (``aqt{policy=P,epochs=N}``, method ``qat``).

Each point runs the default pipeline with its search in place of ``assign-bitwidths``, from the same
float model and seed; its report gives the accuracies (float, simulated, integer, onnx) and the costs.

Pareto front over (cost, accuracy): p dominates q when cost(p) <= cost(q) and acc(p) >= acc(q) with one
of them strict; the front is every point that no other point dominates, so two identical points are both
on it. Fronts use the integer-graph accuracy and either relative BOPs or weight bytes as the cost.
Not handled: several seeds per point (one run each, no error bars), and the float model, which is a
reference line, not a point of the front.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import os
import re
import sys
import textwrap
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from qcompile.api import compile as qcompile_compile
from qcompile.api import search_pipeline as api_search_pipeline
from qcompile.data import Dataset
from qcompile.files import write_output, write_text
from qcompile.passes.base import Pass, QCompileError
from qcompile.passes.pipeline import PassSpec
from qcompile.report import format_table
from qcompile.search.base import searches
from qcompile.search.policies import policy_assignment

Axis = Literal["bops", "bytes"]
AXES: tuple[Axis, ...] = ("bops", "bytes")
OUTPUT_FILES = ("sweep.json", "sweep.png")
SEED = 0
_VALUE = re.compile(r"[^,{}=\s]+$")


class SweepError(QCompileError):
    pass


# ------------------------------------------------------------------------------------------ points


@dataclass(frozen=True)
class SweepPoint:
    """One compile of a sweep: ``search{options}``; ``knobs`` names the options that vary in its method."""

    method: str
    search: str
    options: tuple[tuple[str, str], ...] = ()
    knobs: tuple[str, ...] = ()
    baseline: bool = False

    @property
    def spec(self) -> str:
        return str(PassSpec(self.search, self.options))

    @property
    def knob_label(self) -> str:
        values = dict(self.options)
        return " ".join(f"{k}={values[k]}" for k in self.knobs)

    def build(self) -> Pass:
        """The search pass; a value of the wrong type or out of range is a one-line error."""
        if self.search not in searches():
            raise SweepError(f"unknown search '{self.search}' (known: {', '.join(searches())})")
        try:
            return PassSpec(self.search, self.options).build()
        except ValueError as exc:
            raise SweepError(f"{exc} (in {self.spec})") from None


def search_options(search: str) -> list[str]:
    known = searches()
    if search not in known:
        raise SweepError(f"unknown search '{search}' (known: {', '.join(known)})")
    return [f.name for f in dataclasses.fields(known[search])]


def parse_values(flag: str, text: str) -> tuple[str, ...]:
    """``"0.1,0.2"`` -> ``("0.1", "0.2")``; empty items and pipeline syntax characters are refused."""
    values = tuple(v.strip() for v in text.split(","))
    if not text.strip() or any(not v for v in values):
        raise SweepError(f"{flag} needs a comma-separated list of values like 1,2,3, got '{text}'")
    bad = [v for v in values if not _VALUE.match(v)]
    if bad:
        raise SweepError(f"{flag}: value '{bad[0]}' may not contain spaces or any of {{ }} =")
    return values


def grid(search: str, knobs: Mapping[str, Sequence[str]]) -> list[SweepPoint]:
    """Every combination of the option values of one search; single values are fixed and name the method."""
    fields = search_options(search)
    unknown = [k for k in knobs if k not in fields]
    if unknown:
        raise SweepError(f"search '{search}' has no option {', '.join('--' + k for k in unknown)} "
                         f"(its options: {', '.join(fields) or 'none'})")
    fixed = tuple((k, v[0]) for k, v in knobs.items() if len(v) == 1)
    varying = [k for k, v in knobs.items() if len(v) > 1]
    method = str(PassSpec(search, fixed))
    points = []
    for combo in itertools.product(*(knobs[k] for k in varying)):
        options = tuple((k, combo[varying.index(k)] if k in varying else knobs[k][0]) for k in knobs)
        points.append(SweepPoint(method, search, options, tuple(varying)))
    for p in points:
        p.build()
    return points


def check_policy(policy: str) -> None:
    """Refuse an unknown policy name or a missing table file before anything runs."""
    if policy.endswith(".json"):
        if not Path(policy).is_file():
            raise SweepError(f"no such bit-width table: {policy}")
        return
    policy_assignment(policy, ["layer"], "layer", "layer")


def baseline_points(policies: Sequence[str], epochs: int | None = None,
                    training: Sequence[tuple[str, str]] = ()) -> list[SweepPoint]:
    """Each policy post-training (method ``ptq``) and, with ``epochs``, trained for them (method ``qat``);
    ``training`` adds options of the ``aqt`` search to the trained ones (e.g. the searches' lr, schedule)."""
    for policy in policies:
        check_policy(policy)
    points = [SweepPoint("ptq", "assign-bitwidths", (("policy", p),), ("policy",), True) for p in policies]
    if epochs is not None:
        extra = (("epochs", str(epochs)), *training)
        method = "qat{" + ",".join(f"{k}={v}" for k, v in extra) + "}"
        points += [SweepPoint(method, "aqt", (("policy", p), *extra), ("policy",), True) for p in policies]
    for p in points:
        p.build()
    return points


# ------------------------------------------------------------------------------- command-line flags

Flag = tuple[str, str]  # (option name or "search" or "option", the text after the flag)


def _split_groups(flags: Sequence[Flag]) -> tuple[list[Flag], list[tuple[str, list[Flag]]]]:
    """(flags before the first --search, [(search list, its flags), ...])."""
    shared: list[Flag] = []
    groups: list[tuple[str, list[Flag]]] = []
    for name, text in flags:
        if name == "search":
            groups.append((text, []))
        else:
            (groups[-1][1] if groups else shared).append((name, text))
    return shared, groups


def _knob(name: str, text: str) -> tuple[str, str, str]:
    """(option, values text, flag as the user wrote it); ``--option NAME=V1,V2`` names any option."""
    if name != "option":
        return name, text, "--" + name
    key, eq, values = text.partition("=")
    if not eq or not key.strip():
        raise SweepError(f"--option needs NAME=V1,V2,..., got '{text}'")
    return key.strip(), values, f"--option {key.strip()}"


def _refuse_unknown(searches_: Sequence[str], flags: Sequence[Flag]) -> None:
    """A flag that no search of ``searches_`` has an option for is an error listing their options."""
    options = {s: search_options(s) for s in searches_}
    for key, _, flag in (_knob(n, t) for n, t in flags):
        if any(key in fields for fields in options.values()):
            continue
        if len(options) == 1:
            raise SweepError(f"search '{searches_[0]}' has no option {flag} "
                             f"(its options: {', '.join(options[searches_[0]]) or 'none'})")
        listed = "; ".join(f"{s}: {', '.join(f) or 'none'}" for s, f in options.items())
        raise SweepError(f"none of the searches {', '.join(searches_)} has an option {flag} (options: {listed})")


def _group_points(searches_: Sequence[str], shared: Sequence[Flag], own: Sequence[Flag]) -> list[SweepPoint]:
    """Each search of a group with the flags it has an option for (its own flags override shared ones)."""
    _refuse_unknown(searches_, own)
    knobs = {key: (values, flag) for key, values, flag in (_knob(n, t) for n, t in [*shared, *own])}
    points = []
    for s in searches_:
        fields = search_options(s)
        points += grid(s, {k: parse_values(flag, v) for k, (v, flag) in knobs.items() if k in fields})
    return points


def points_from_flags(flags: Sequence[Flag]) -> list[SweepPoint]:
    """Sweep points from the command line's ``--search``/knob flags, in the order given.

    ``--search A,B`` starts a group; the flags after it go to each search of the group that has the option
    (at least one must). Flags before the first ``--search`` go to every search that has the option.
    """
    shared, groups = _split_groups(flags)
    if shared and not groups:
        raise SweepError(f"--{shared[0][0]} sets an option of a search; name the search with --search NAME")
    named = [(parse_values("--search", names), own) for names, own in groups]
    _refuse_unknown(list(dict.fromkeys(s for searches_, _ in named for s in searches_)), shared)
    return [p for searches_, own in named for p in _group_points(searches_, shared, own)]


# ------------------------------------------------------------------------------------------ results


@dataclass(frozen=True)
class SweepResult:
    """What one point measured: accuracies (%), costs, per-layer bits, mismatches when verified."""

    point: SweepPoint
    pipeline: str
    values: dict[str, Any]  # the point's options as the search holds them (typed)
    accuracy: dict[str, float]
    rel_bops_percent: float
    weight_bytes: int
    float_weight_bytes: int
    layers: list[dict[str, Any]]
    mismatches: int | None
    seconds: float

    @property
    def integer_accuracy(self) -> float:
        return self.accuracy["integer"]

    @property
    def compression(self) -> float:
        """Weight memory of float32 over that of this point."""
        return self.float_weight_bytes / max(self.weight_bytes, 1)

    def cost(self, axis: Axis) -> float:
        return self.rel_bops_percent if axis == "bops" else float(self.weight_bytes)

    def as_dict(self) -> dict[str, Any]:
        p = self.point
        return {"method": p.method, "search": p.search, "baseline": p.baseline,
                "knobs": {k: self.values[k] for k in p.knobs}, "options": self.values, "pipeline": self.pipeline,
                "accuracy": self.accuracy, "rel_bops_percent": self.rel_bops_percent,
                "weight_bytes": self.weight_bytes, "float_weight_bytes": self.float_weight_bytes,
                "compression": round(self.compression, 4), "layers": self.layers, "mismatches": self.mismatches,
                "seconds": round(self.seconds, 3)}


def pareto_front(points: Sequence[tuple[float, float]]) -> list[int]:
    """Indices of the (cost, accuracy) points no other point dominates, by increasing cost (see module doc)."""

    def dominated(c: float, a: float) -> bool:
        return any(c2 <= c and a2 >= a and (c2, a2) != (c, a) for c2, a2 in points)

    front = [i for i, (c, a) in enumerate(points) if not dominated(c, a)]
    return sorted(front, key=lambda i: (points[i][0], -points[i][1], i))


@dataclass(frozen=True)
class Sweep:
    """Every result of a sweep, with the float model as the reference."""

    data: str
    results: list[SweepResult]
    float_accuracy: float
    float_weight_bytes: int

    def front(self, axis: Axis) -> list[int]:
        return pareto_front([(r.cost(axis), r.integer_accuracy) for r in self.results])

    def as_dict(self) -> dict[str, Any]:
        fronts = {axis: set(self.front(axis)) for axis in AXES}
        points = [{**r.as_dict(), "pareto_bops": i in fronts["bops"], "pareto_bytes": i in fronts["bytes"]}
                  for i, r in enumerate(self.results)]
        return {"data": self.data, "accuracy_metric": "integer",
                "float": {"accuracy": self.float_accuracy, "weight_bytes": self.float_weight_bytes},
                "points": points}

    def table(self) -> str:
        fronts = {axis: set(self.front(axis)) for axis in AXES}
        verified = any(r.mismatches is not None for r in self.results)
        headers = ["method", "knob", "integer %", "onnx %", "rel. BOPs %", "weight bytes", "compression ×",
                   "Pareto BOPs", "Pareto bytes", *(["mismatches"] if verified else [])]
        rows: list[list[Any]] = [["float", "", self.float_accuracy, "", 100.0, self.float_weight_bytes, 1.0, "", "",
                                  *([""] if verified else [])]]
        for i, r in enumerate(self.results):
            marks = ["✓" if i in fronts[axis] else "" for axis in AXES]
            rows.append([r.point.method, r.point.knob_label, r.integer_accuracy, r.accuracy["onnx"],
                         r.rel_bops_percent, r.weight_bytes, r.compression, *marks,
                         *([r.mismatches] if verified else [])])
        return format_table(headers, rows)


# ------------------------------------------------------------------------------------------ running


def search_pipeline(point: SweepPoint, calibration_steps: int = 32) -> str:
    """The default pipeline with the point's search in place of assign-bitwidths."""
    return api_search_pipeline(point.spec, calibration_steps)


def run_point(model: nn.Module | str | Path, data: Dataset, example: torch.Tensor, point: SweepPoint,
              calibration_steps: int = 32, verify_samples: int = 0, progress: bool = False) -> SweepResult:
    """Compile ``model`` with one point's search (fixed seed) and measure it on the test split."""
    search = point.build()
    torch.manual_seed(SEED)
    start = time.perf_counter()
    cm = qcompile_compile(model, example, data=data, pipeline=search_pipeline(point, calibration_steps),
                          progress=progress)
    report = cm.report(data, data.x_test[:verify_samples] if verify_samples else None, progress=progress)
    totals = report["totals"]
    return SweepResult(
        point, report["pipeline"], {k: getattr(search, k) for k, _ in point.options}, report["accuracy"],
        totals["rel_bops_percent"], totals["weight_bytes"], totals["float_weight_bytes"],
        [{k: layer[k] for k in ("name", "w_bits", "a_bits", "terms", "channels", "kept_channels") if k in layer}
         for layer in report["layers"]],
        report["verify"]["mismatches"] if "verify" in report else None, time.perf_counter() - start)


def _log_line(index: int, total: int, r: SweepResult) -> str:
    label = f"{r.point.method} {r.point.knob_label}".strip()
    return (f"[{index}/{total}] {label}: integer {r.integer_accuracy:.2f} %, {r.rel_bops_percent:.2f} % BOPs, "
            f"{r.weight_bytes} weight bytes ({r.seconds:.1f} s)")


def run_sweep(model: nn.Module | str | Path, data: Dataset, points: Sequence[SweepPoint], *,
              example: torch.Tensor | None = None, calibration_steps: int = 32, verify_samples: int = 0,
              progress: bool = False, log: Callable[[str], None] | None = None) -> Sweep:
    """Run every point (all are checked first); ``log`` gets one line per finished point."""
    if not points:
        raise SweepError("nothing to sweep; name a --search or some --baselines")
    if not data.labelled:
        raise SweepError(f"a sweep measures accuracy, and data '{data.name}' has no labels; pass labelled --data")
    for p in points:
        p.build()
    example = data.x_train[:1] if example is None else example
    results = []
    for i, p in enumerate(points, 1):
        results.append(run_point(model, data, example, p, calibration_steps, verify_samples, progress))
        if log is not None:
            log(_log_line(i, len(points), results[-1]))
    first = results[0]
    return Sweep(data.name, results, first.accuracy["float"], first.float_weight_bytes)


# ------------------------------------------------------------------------------------------ output


def refuse_existing(folder: Path, force: bool) -> None:
    from qcompile.files import check_output

    if folder.exists() and not folder.is_dir():
        raise SweepError(f"{folder} exists and is not a folder; choose another output folder")
    taken = [folder / name for name in OUTPUT_FILES if os.path.lexists(folder / name)]
    if taken and not force:
        raise SweepError(f"{taken[0]} already exists; choose another output folder or pass --force "
                         "(force=True) to replace it")
    for path in taken:
        check_output(path, force)  # only regular files are replaced


def write_sweep(sweep: Sweep, folder: Path, force: bool = False) -> list[Path]:
    """Write ``sweep.json`` and ``sweep.png`` into ``folder`` (created; existing files only with ``force``)."""
    refuse_existing(folder, force)
    folder.mkdir(parents=True, exist_ok=True)
    json_path, png_path = (folder / name for name in OUTPUT_FILES)
    write_text(json_path, json.dumps(sweep.as_dict(), indent=2) + "\n", force)
    write_output(png_path, force, lambda tmp: plot_sweep(sweep, tmp))
    return [json_path, png_path]


LEGEND_WRAP = 48
"""Legend labels longer than this many characters wrap onto further lines."""


def legend_columns(labels: list[str], width_in: float, max_columns: int = 6) -> int:
    """Columns of a fontsize-8 legend whose longest label still fits the figure's width.

    A character of the 8-point font is about 0.075 in wide and a marker with its padding about 0.45 in.
    """
    widest = max((len(line) for label in labels for line in label.splitlines()), default=1)
    fit = int(width_in // (0.075 * widest + 0.45))
    return max(1, min(len(labels), max_columns, fit))


def plot_sweep(sweep: Sweep, path: Path) -> None:
    """Save ``sweep_figure(sweep)`` as a PNG."""
    sweep_figure(sweep).savefig(path, dpi=110)


def sweep_figure(sweep: Sweep) -> Any:
    """Two panels, integer accuracy vs relative BOPs and vs weight bytes (log x), fronts connected; the
    legend below them, in as many columns as its longest (wrapped) label allows."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(13, 5.5), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, 2, sharey=True)
    for ax, axis in zip(axes, AXES, strict=True):
        _panel(ax, sweep, axis)
    axes[0].set_ylabel("integer-graph top-1 accuracy (%)")
    handles, labels = axes[0].get_legend_handles_labels()
    labels = [textwrap.fill(label, LEGEND_WRAP) for label in labels]
    fig.legend(handles, labels, loc="outside lower center", ncol=legend_columns(labels, fig.get_figwidth()),
               fontsize=8)
    fig.suptitle(f"accuracy vs cost on {sweep.data}")
    fig.canvas.draw()  # lays the figure out, so that the point labels can be placed where they are free
    for ax, axis in zip(axes, AXES, strict=True):
        place_labels(ax, [(r.cost(axis), r.integer_accuracy, _short_label(r.point)) for r in sweep.results])
    return fig


LABEL_STEP = 7.0  # points: one 6-point line and a gap


def place_labels(ax: Any, items: Sequence[tuple[float, float, str]]) -> list[Any]:
    """Annotate each (x, y, text) 4 points up and right of its point, moved up in steps until its box
    overlaps no label placed before it (coinciding points get a column of labels, never one on another).

    Needs a laid-out figure (``fig.canvas.draw()`` first); the labels take no part in the layout, so
    the positions found stay valid when the figure is saved.
    """
    renderer = ax.figure.canvas.get_renderer()
    placed: list[Any] = []
    annotations = []
    for x, y, text in items:
        ann = ax.annotate(text, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=6,
                          annotation_clip=False)
        ann.set_in_layout(False)
        step = 0
        while any(ann.get_window_extent(renderer).overlaps(box) for box in placed):
            step += 1
            ann.xyann = (4, 4 + LABEL_STEP * step)
        placed.append(ann.get_window_extent(renderer))
        annotations.append(ann)
    return annotations


SEARCH_MARKERS, BASELINE_MARKERS = "o^vP*Xph", "sDd<>"


def _panel(ax: Any, sweep: Sweep, axis: Axis) -> None:
    from matplotlib.ticker import FuncFormatter

    methods = list(dict.fromkeys(r.point.method for r in sweep.results))
    n_search = n_base = 0
    for color, method in enumerate(methods):
        rs = [r for r in sweep.results if r.point.method == method]
        base = rs[0].point.baseline
        marker = BASELINE_MARKERS[n_base % 5] if base else SEARCH_MARKERS[n_search % 9]
        n_base, n_search = n_base + base, n_search + (not base)
        ax.plot([r.cost(axis) for r in rs], [r.integer_accuracy for r in rs], linestyle="none", marker=marker,
                markersize=7, color=f"C{color % 10}", markerfacecolor="none" if base else None,
                label=method + (" (baseline)" if base else ""))
    front = [sweep.results[i] for i in sweep.front(axis)]
    ax.plot([r.cost(axis) for r in front], [r.integer_accuracy for r in front], color="0.3", linewidth=1,
            zorder=0, label="Pareto front")
    ax.axhline(sweep.float_accuracy, color="0.5", linestyle="--", linewidth=1,
               label=f"float ({sweep.float_accuracy:.2f} %)")
    ax.set_xscale("log")
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ax.xaxis.set_minor_formatter(FuncFormatter(lambda v, _: f"{v:g}" if f"{v:g}"[0] in "235" else ""))
    ax.margins(x=0.08, y=0.08)
    ax.set_xlabel("relative BOPs (% of 32x32-bit)" if axis == "bops" else "weight bytes")
    ax.grid(True, which="both", alpha=0.3)


def _short_label(point: SweepPoint) -> str:
    """Just the value when one option varies, ``k=v k=v`` when several do."""
    values = dict(point.options)
    return values[point.knobs[0]] if len(point.knobs) == 1 else point.knob_label


def stderr_log(line: str) -> None:
    print(line, file=sys.stderr, flush=True)
