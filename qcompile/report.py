"""The JSON report (the same from the CLI and the API) and its human-readable tables."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from qcompile import cost
from qcompile.ir.contract import Target

if TYPE_CHECKING:
    from qcompile.api import CompiledModel
    from qcompile.data import Dataset


REPORT_SCHEMA = 1  # bump when a key of the report changes meaning or goes away (adding keys keeps it)


def build_report(cm: CompiledModel, data: Dataset | None, verify_inputs: torch.Tensor | None,
                 progress: bool = False) -> dict[str, Any]:
    costs = cm.layer_costs()
    learned = cm.records.get("bayesian-bits", {}).get("layers", {})
    from qcompile import __version__

    report: dict[str, Any] = {
        "schema": REPORT_SCHEMA,
        "qcompile": __version__,
        "pipeline": cm.pipeline,
        "target": cm.target.value,
        **({"ort_cpu": cm.ort_cpu} if cm.target is Target.ORT else {}),
        "layers": [{**c.as_dict(), **_learned(learned.get(c.name))} for c in costs],
        "totals": {**cost.totals(costs, cost.dense_totals(cm.float_graph, cm.example_inputs)),
                   "activation_bytes": cost.activation_bytes(cm.integer_graph)},
        "passes": [{"name": t.name, "seconds": round(t.seconds, 6), "modified": t.modified} for t in cm.timings],
    }
    pointwise = cost.pointwise_costs(cm.integer_graph)
    if pointwise:  # tables, products, LayerNorms: not MACs, listed and totalled apart
        report["pointwise"] = [c.as_dict() for c in pointwise]
        report["totals"].update({k: sum(getattr(c, k) for c in pointwise) for k in ("lookups", "products",
                                                                                      "divisions", "attention_macs")})
    if cm.records:
        report["records"] = cm.records
    if data is not None and data.labelled:
        report["accuracy"] = cm.accuracies(data, progress)
    if verify_inputs is not None:
        v = cm.verify(verify_inputs, progress)
        report["verify"] = {"mismatches": v.mismatches, "compared": v.compared,
                            **({"cause": v.cause} if v.cause else {})}
    return report


def _learned(entry: dict[str, Any] | None) -> dict[str, Any]:
    """A layer's learned choice (Bayesian Bits): kept channels and final gate probabilities."""
    if entry is None:
        return {}
    return {"channels": entry["channels"], "kept_channels": entry["kept_channels"],
            "gate_probabilities": entry["gate_probabilities"]}


def format_table(headers: list[str], rows: list[list[Any]]) -> str:
    cells = [[_fmt(v) for v in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) if cells else len(h) for i, h in enumerate(headers)]

    def line(vals: list[str]) -> str:
        return "  ".join(v.rjust(w) if i else v.ljust(w) for i, (v, w) in enumerate(zip(vals, widths, strict=True)))

    return "\n".join([line(headers), line(["-" * w for w in widths]), *(line(r) for r in cells)])


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.2f}" if abs(v) >= 0.01 or v == 0 else f"{v:.3g}"
    return str(v)


def layer_table(report: dict[str, Any]) -> str:
    keys = ["name", "op", "w_bits", "a_bits", "macs", "bops", "weight_bytes", "multiplies", "shift_adds"]
    rows = [[layer.get(k, 0) for k in keys] for layer in report["layers"]]
    t = report["totals"]
    rows.append(["total", "", "", "", *(t.get(k, 0) for k in keys[4:])])
    table = format_table(["layer", "op", "w_bits", "a_bits", "MACs", "BOPs", "weight bytes", "multiplies",
                          "shift-adds"], rows)
    return table + ("\n\n" + pointwise_table(report) if report.get("pointwise") else "")


def pointwise_table(report: dict[str, Any]) -> str:
    """Table lookups, products of activations and LayerNorms: integer ops that are not MACs."""
    keys = ["name", "op", "a_bits", "elements", "lookups", "products", "divisions", "attention_macs"]
    rows = [[c.get(k, 0) for k in keys] for c in report["pointwise"]]
    t = report["totals"]
    rows.append(["total", "", "", sum(c["elements"] for c in report["pointwise"]),
                 *(t.get(k, 0) for k in keys[4:])])
    return format_table(["op (not a weight MAC)", "kind", "a_bits", "elements", "lookups", "products", "divisions",
                         "attention MACs"], rows)


def summary_lines(report: dict[str, Any]) -> list[str]:
    t = report["totals"]
    lines = [f"target {report['target']}" + (f" (ort-cpu {report['ort_cpu']})" if "ort_cpu" in report else "")
             + (": float32 requantization, onnxruntime's fused QLinearConv kernels" if report["target"] == "ort"
                else ": dyadic requantization, integer ops only"),
             f"relative BOPs {t['rel_bops_percent']:.2f} % ({t['bops']} BOPs), linear bits {t['linear_bits']}, "
             f"weights {t['weight_bytes']} bytes ({t['float_weight_bytes'] / max(t['weight_bytes'], 1):.1f}x smaller "
             f"than float32), activations {t['activation_bytes']} bytes per sample"]
    if t.get("shift_adds"):
        lines.append(f"multiplier-free: {t['multiplier_free_percent']:.2f} % of the MACs are shift-adds "
                     f"({t['shift_adds']} shift-adds, {t['multiplies']} multiplies)")
    if t.get("lookups") or t.get("products"):
        lines.append(f"outside the MACs: {t.get('lookups', 0)} table lookups, {t.get('products', 0)} integer "
                     f"products, {t.get('divisions', 0)} integer divisions per sample")
    if t.get("attention_macs"):
        lines.append(f"attention (activation x activation): {t['attention_macs']} MACs per sample, beside the "
                     "layers' weight MACs")
    if "accuracy" in report:
        lines.append("accuracy: " + ", ".join(f"{k} {v:.2f} %" for k, v in report["accuracy"].items()))
    if "verify" in report:
        v = report["verify"]
        lines.append(f"onnxruntime vs reference: {v['mismatches']} mismatching of {v['compared']} output elements"
                     + (f" ({v['cause']})" if v.get("cause") else ""))
    return lines
