"""The qcompile command line: demo, compile, eval, passes, sweep.

Every user error ends in one line on stderr (``error: ...``) naming the problem and a fix, exit status 2;
``--debug`` shows the traceback instead. Existing output files are never overwritten without --force.
The arguments are parsed before torch is imported (``--help`` and usage errors take well under a second);
the commands import what they need. Ctrl-C ends any command with ``error: interrupted`` and status 130.
"""

from __future__ import annotations

import argparse
import json
import sys
import traceback
from pathlib import Path
from typing import TYPE_CHECKING, Any

from qcompile import cli_usage, threads

if TYPE_CHECKING:
    import torch

USER_ERROR, CHECK_FAILED = 2, 1


def _shape(text: str) -> tuple[int, ...]:
    try:
        dims = tuple(int(p) for p in text.replace("x", ",").split(",") if p.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not a shape like 1,28,28") from None
    if not dims or any(d <= 0 for d in dims):
        raise argparse.ArgumentTypeError(f"'{text}' is not a shape of positive sizes like 1,28,28")
    return dims


def _is_main() -> bool:
    """Rank 0 under torchrun (the rank that writes files), or the only process."""
    from qcompile import distributed

    return distributed.is_main()


def _progress(args: argparse.Namespace) -> bool:
    """--progress, else when stderr is a terminal; never on the other ranks under torchrun."""
    shown = bool(args.progress) if args.progress is not None else sys.stderr.isatty()
    return shown and _is_main()


def _refuse_existing(path: Path | None, force: bool) -> None:
    from qcompile.files import check_output

    if path is not None:
        check_output(path, force)


def _write_json(path: Path, report: dict[str, Any], force: bool) -> None:
    from qcompile.files import write_text

    write_text(path, json.dumps(report, indent=2) + "\n", force)


def _ir_dumper(args: argparse.Namespace) -> Any:
    """The --print-ir-after-all / --dump-dir callback for the pass manager, or None."""
    if not args.print_ir_after_all and not args.dump_dir:
        return None
    folder = Path(args.dump_dir) if args.dump_dir else None
    if folder is not None:
        folder.mkdir(parents=True, exist_ok=True)

    def dump(index: int, p: Any, gm: Any) -> None:
        from qcompile.ir.printer import format_ir

        text = format_ir(gm)
        if args.print_ir_after_all:
            print(f"// ----- IR after {p.spec()} -----\n{text}", file=sys.stderr)
        if folder is not None:
            from qcompile.ir.graph_view import write_dot, write_png

            stem = folder / f"{index + 1:02d}-{p.name}"
            stem.with_suffix(".txt").write_text(text + "\n")
            write_dot(gm, stem.with_suffix(".dot"))
            write_png(gm, stem.with_suffix(".png"))

    return dump


SEARCH_FLAGS = ("epochs", "fraction", "lr", "alpha", "mu", "post_training", "checkpoint", "resume", "bits", "distill")
QUANTIZERS = ("uniform", "apot")


def _quantizer(args: argparse.Namespace) -> None:
    """--quantizer apot [--w-bits N] selects the apot search (and insert-quantizers{scheme=apot})."""
    from qcompile.errors import QCompileError
    from qcompile.quant.apot import APOT_BITS

    quantizer = args.quantizer or "uniform"
    if quantizer not in QUANTIZERS:
        raise QCompileError(f"unknown quantizer '{quantizer}' (known: {', '.join(QUANTIZERS)})")
    if quantizer == "uniform":
        if args.bits is not None:
            raise QCompileError("--w-bits sets APoT weight bits; add --quantizer apot, or give uniform bits with "
                                "--policy w{N}a{M}")
        return
    if args.search not in (None, "apot"):
        raise QCompileError(f"--quantizer apot trains with the apot search; drop --search {args.search}")
    if args.bits is not None and args.bits not in APOT_BITS:
        raise QCompileError(f"--w-bits {args.bits}: APoT weights have {APOT_BITS.start}..{APOT_BITS.stop - 1} bits "
                            f"(2: ternary); choose one of those")
    args.search = "apot"


def _check_checkpoint(args: argparse.Namespace) -> None:
    """Before anything loads: --resume needs an existing --checkpoint; an existing one needs --resume or --force."""
    from qcompile.errors import QCompileError

    path = Path(args.checkpoint) if args.checkpoint else None
    if args.resume and path is None:
        raise QCompileError("--resume continues a checkpoint; pass the file with --checkpoint FILE")
    if args.resume and path is not None and not path.is_file():
        raise QCompileError(f"--resume: there is no checkpoint {path}; fix the path, or drop --resume to train "
                            "from the start")
    if path is not None and not args.resume and not args.force and path.exists():
        raise QCompileError(f"checkpoint {path} already exists; pass --resume to continue it, --force to train "
                            "again from the start and replace it, or choose another --checkpoint")
    if path is not None and not args.search:
        raise QCompileError("--checkpoint is written by a learned search; add --search NAME (aqt, bayesian-bits, "
                            "apot) or drop it")


def _pipeline(args: argparse.Namespace) -> str | None:
    """--pipeline as given, or the default pipeline with --search NAME (and its flags) choosing the bits."""
    import dataclasses

    from qcompile.api import search_pipeline
    from qcompile.errors import QCompileError
    from qcompile.search.base import searches

    _quantizer(args)
    _check_checkpoint(args)
    if not args.search:
        return args.pipeline
    if args.pipeline:
        raise QCompileError("--search and --pipeline both choose the passes; give one of them")
    known = searches()
    if args.search not in known:
        raise QCompileError(f"unknown search '{args.search}' (known: {', '.join(known)})")
    fields = [f.name for f in dataclasses.fields(known[args.search])]
    flags = (*SEARCH_FLAGS, "policy")
    values = {flag: getattr(args, flag) for flag in flags}
    given = {flag: v for flag, v in values.items() if v is not None and v is not False}  # 0 is a given value
    extra = sorted(set(given) - set(fields))
    if extra:
        raise QCompileError(f"search '{args.search}' has no option {', '.join('--' + e for e in extra)} "
                            f"(its options: {', '.join(fields) or 'none'})")
    for item in getattr(args, "option", None) or []:
        name, eq, value = item.partition("=")
        if not eq or not value or name not in fields:
            raise QCompileError(f"--option {item}: expected NAME=VALUE with NAME an option of search "
                                f"'{args.search}' ({', '.join(fields) or 'none'})")
        if name in given:
            raise QCompileError(f"--option {item}: {name} is also given as --{name}; give it once")
        given[name] = value
    if "checkpoint" in given and args.force:
        given["overwrite"] = True  # --force: replace the checkpoint too
    opts = ",".join(f"{k}={str(v).lower() if isinstance(v, bool) else v}" for k, v in given.items())
    spec = args.search + ("{" + opts + "}" if opts else "")
    return search_pipeline(spec, args.calibration_steps)


def cmd_compile(args: argparse.Namespace) -> int:
    import qcompile
    from qcompile.report import layer_table, summary_lines

    out, report_path = Path(args.output), Path(args.report) if args.report else None
    _refuse_existing(out, args.force)
    _refuse_existing(report_path, args.force)
    pipeline = _pipeline(args)  # bad flags are refused before anything loads
    data = qcompile.load_data(args.data, args.input_shape) if args.data else None
    model, example = _model_and_example(args, data)
    cm = qcompile.compile(model, example, data=data, policy=args.policy or "w8a8", pipeline=pipeline,
                          calibration_steps=args.calibration_steps, progress=_progress(args),
                          dump=_ir_dumper(args), target=args.target, ort_cpu=args.ort_cpu)
    if not _is_main():  # under torchrun every rank compiles the same model; rank 0 writes
        return 0
    verify_inputs = data.x_test[: args.verify_samples] if args.verify and data else (example if args.verify else None)
    report = cm.report(data, verify_inputs, progress=_progress(args))
    cm.save_onnx(out, force=args.force)
    if report_path:
        _write_json(report_path, report, args.force)
    print(layer_table(report))
    print("\n".join(summary_lines(report)))
    print(f"wrote {out}" + (f" and {report_path}" if report_path else ""))
    _warn_untrained(args)
    if "verify" in report and report["verify"]["mismatches"]:
        print("error: onnxruntime and the reference executor disagree", file=sys.stderr)
        return CHECK_FAILED
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    import onnx

    import qcompile
    from qcompile.api import accuracy
    from qcompile.backends.ort import run_onnx, session

    path = Path(args.model)
    if not path.is_file():
        raise qcompile.QCompileError(f"no such file: {path}")
    try:
        model = onnx.load(str(path))
        sess = session(model, threads=args.threads or 1)
    except Exception as exc:  # noqa: BLE001 - protobuf and onnxruntime raise many types
        raise qcompile.QCompileError(f"{path} is not a loadable ONNX model ({type(exc).__name__})") from None
    data = qcompile.load_data(args.data)
    if data.y_test is None:
        raise qcompile.QCompileError(f"data '{args.data}' has no labels; accuracy needs labelled data")
    expected = [d if isinstance(d, int) else None for d in sess.get_inputs()[0].shape[1:]]
    given = list(data.x_test.shape[1:])
    if len(expected) != len(given) or any(e is not None and e != g for e, g in zip(expected, given, strict=False)):
        raise qcompile.QCompileError(
            f"{path} takes inputs of shape {_dims(d or '?' for d in expected)} but the samples of '{data.name}' "
            f"are {_dims(given)}; evaluate it on data of the shape it was compiled for"
        )
    acc = accuracy(lambda b: run_onnx(sess, b.numpy()), data.x_test, data.y_test, progress=_progress(args),
                   what="onnxruntime")
    print(f"{path}: top-1 accuracy {acc:.2f} % on {len(data.x_test)} {data.name} test samples (onnxruntime)")
    return 0


def _warn_untrained(args: argparse.Namespace) -> None:
    """The one warning line for a factory model compiled without --weights (after a success, so that an
    error stays the only line when something fails)."""
    if getattr(args, "untrained", False) and _is_main():
        print(f"warning: no --weights: compiled {args.model} as it returns it (untrained unless it loads "
              "weights itself; initialised with seed 0)", file=sys.stderr)


def _dims(shape: Any) -> str:
    return ",".join(str(d) for d in shape)


def _example_shape(args: argparse.Namespace, data: Any) -> tuple[int, ...]:
    """--input-shape, else the data's; refused when the two differ."""
    from qcompile.errors import QCompileError

    shape = args.input_shape or (data.input_shape if data else None)
    if shape is None:
        raise QCompileError("the input shape is unknown; pass --input-shape C,H,W or --data")
    if data is not None and tuple(shape) != tuple(data.input_shape):
        raise QCompileError(f"--input-shape {_dims(shape)} does not match the samples of '{data.name}' "
                            f"({_dims(data.input_shape)}); drop --input-shape, or pass data of that shape")
    return tuple(shape)


def _model_and_example(args: argparse.Namespace, data: Any) -> tuple[Any, torch.Tensor]:
    """MODEL (with --weights) and an example input of --input-shape or of the data."""
    import torch

    import qcompile
    from qcompile.frontends.model_spec import load_model, load_weights

    torch.manual_seed(0)  # a factory's initial weights are the same on every run (and every rank)
    model = load_model(args.model)
    shape = _example_shape(args, data)
    if args.weights:
        if isinstance(model, Path):
            raise qcompile.QCompileError(
                "--weights applies to a factory model; a .pt2 or .onnx file carries its own weights"
            )
        load_weights(model, args.weights)
    else:
        args.untrained = not isinstance(model, Path)  # warned about once the command has succeeded
    return model, data.x_train[:1] if data and data.input_shape == shape else torch.zeros(1, *shape)


def cmd_sweep(args: argparse.Namespace) -> int:
    import qcompile
    from qcompile import sweep as sw

    if not args.output:
        raise qcompile.QCompileError("sweep writes sweep.json and sweep.png into a folder; pass -o OUTDIR")
    if not args.data:
        raise qcompile.QCompileError("a sweep measures accuracy; pass labelled --data (digits, fashion-mnist, "
                                     "FILE.npz)")
    out = Path(args.output)
    sw.refuse_existing(out, args.force)
    policies = [] if args.baselines == "none" else sw.parse_values("--baselines", args.baselines)
    points = [*sw.baseline_points(policies, args.baseline_epochs), *sw.points_from_flags(args.sweep_flags)]
    data = qcompile.load_data(args.data, args.input_shape)
    model, example = _model_and_example(args, data)
    result = sw.run_sweep(model, data, points, example=example, calibration_steps=args.calibration_steps,
                          verify_samples=args.verify_samples if args.verify else 0, progress=_progress(args),
                          log=sw.stderr_log if _is_main() else None)
    if not _is_main():
        return 0
    written = sw.write_sweep(result, out, args.force)
    print(result.table())
    print(f"wrote {' and '.join(str(p) for p in written)}")
    _warn_untrained(args)
    if any(r.mismatches for r in result.results):
        print("error: onnxruntime and the reference executor disagree", file=sys.stderr)
        return CHECK_FAILED
    return 0


def cmd_passes(args: argparse.Namespace) -> int:
    from qcompile.passes import DEFAULT_PIPELINE, PASSES
    from qcompile.passes.base import option_help

    for name in sorted(PASSES):
        cls = PASSES[name]
        print(f"{name}: {cls.summary}")
        for opt, default, help_text in option_help(cls):
            print(f"    {opt}={default}  {help_text}")
    print(f"\ndefault pipeline: {DEFAULT_PIPELINE}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    import torch

    from qcompile.demo import run_demo

    if args.threads is None:  # its small CNN trains fastest on one thread; the table then ignores the core count
        torch.set_num_threads(1)
    return run_demo(args.epochs, args.policies.split(","), Path(args.out_dir) if args.out_dir else None,
                    args.force, _progress(args))


def _common(p: argparse.ArgumentParser, top: bool = False) -> None:
    """--debug/--progress/--plugin/--threads, accepted before or after the command (subcommands must not reset them)."""
    p.set_defaults(command_parser=p)
    p.add_argument("--debug", action="store_true", default=False if top else argparse.SUPPRESS,
                   help="show Python tracebacks on errors")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None if top else argparse.SUPPRESS,
                   help="progress bars (default: when stderr is a terminal)")
    p.add_argument("--plugin", action="append", default=[] if top else argparse.SUPPRESS, metavar="MODULE",
                   help="import MODULE (package.module or file.py) first: it may register passes and searches")
    p.add_argument("--threads", type=cli_usage.positive_int, default=None if top else argparse.SUPPRESS, metavar="N",
                   help="torch threads (eval: onnxruntime threads); default: the cores less one, or "
                   "OMP_NUM_THREADS. Post-training compiles give the same bytes at any count; trained "
                   "searches repeat exactly at a fixed count")


class _SweepFlag(argparse.Action):
    """Keeps --search and the search flags in command-line order: the flags after --search NAME are its own."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any,
                 option_string: str | None = None) -> None:
        flags = [*(getattr(namespace, self.dest, None) or []), (str(option_string).lstrip("-"), str(values))]
        setattr(namespace, self.dest, flags)


def _sweep_parser(sub: Any) -> None:
    s = sub.add_parser("sweep", help="compile MODEL under a grid of search options; Pareto table and plot",
                       description="Every flag after --search NAME[,NAME] sets that search's option of the same "
                       "name; a comma-separated list sweeps it. Flags before the first --search apply to every "
                       "search that has the option.")
    _common(s)
    s.add_argument("model", help="file.py:factory, package.module:factory, a torch.export .pt2, or a float .onnx")
    s.add_argument("-o", "--output", metavar="OUTDIR", help="folder for sweep.json and sweep.png (created)")
    s.add_argument("--data", help="labelled data: digits | fashion-mnist[:DIR] | FILE.npz")
    s.add_argument("--input-shape", type=_shape, help="input shape without the batch, e.g. 1,28,28")
    s.add_argument("--weights", help="a state dict saved with torch.save (loaded with weights_only=True)")
    s.add_argument("--trust-pickle", action="store_true", help="let a .pt2 MODEL unpickle any object (runs code "
                   "from the file: only for files from a trusted author)")
    s.set_defaults(sweep_flags=[])
    flag = {"action": _SweepFlag, "dest": "sweep_flags", "default": argparse.SUPPRESS}
    s.add_argument("--search", metavar="NAME[,NAME]", help="a search to sweep (repeatable; see `qcompile passes`)",
                   **flag)
    for name, meaning in [("epochs", "training epochs"), ("fraction", "AQT calibration share of the steps"),
                          ("lr", "learning rate"), ("policy", "bit-width policy"), ("alpha", "BSQ regularizer"),
                          ("mu", "regularizer weight"), ("bits", "APoT weight bits"),
                          ("distill", "weight of the float model's soft targets")]:
        s.add_argument(f"--{name}", metavar="V[,V]", help=f"{meaning}: the search option '{name}'", **flag)
    s.add_argument("--option", metavar="NAME=V[,V]", help="any other option of the search, e.g. batch_size=32,64",
                   **flag)
    s.add_argument("--baselines", default="w8a8,w4a4", help="policies compiled post-training as references, "
                   "or none (default w8a8,w4a4)")
    s.add_argument("--baseline-epochs", type=int, help="also train each baseline policy for N epochs "
                   "(aqt{policy=P,epochs=N}), the budget of the searches")
    s.add_argument("--calibration-steps", type=int, default=32, help="calibration batches (default 32)")
    s.add_argument("--verify", action="store_true", help="count onnxruntime/reference mismatches of every point")
    s.add_argument("--verify-samples", type=int, default=256, help="test samples to verify (default 256)")
    s.add_argument("--force", action="store_true", help="replace sweep.json and sweep.png in OUTDIR")


def build_parser() -> argparse.ArgumentParser:
    from qcompile import __version__

    parser = cli_usage.Parser(prog="qcompile", description="Compile trained networks to mixed-precision "
                              "integer-only graphs and bit-exact ONNX. Run `qcompile COMMAND --help` for a "
                              "command's options.")
    parser.add_argument("--version", action="version", version=f"qcompile {__version__}")
    _common(parser, top=True)
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="train a small CNN on digits, compile it at several policies, verify",
                          description="Trains DemoNet on digits at one torch thread unless --threads N is given "
                          "(fastest for its small CNN; the table does not depend on the core count), compiles it at "
                          "each policy, exports it and verifies it in onnxruntime.")
    _common(demo)
    demo.add_argument("--epochs", type=int, default=15, help="float training epochs (default 15)")
    demo.add_argument("--policies", default="w8a8,w4a8,w4a4,aqt", help="comma-separated policies")
    demo.add_argument("--out-dir", help="also write each ONNX model and JSON report here")
    demo.add_argument("--force", action="store_true", help="replace files in --out-dir")

    c = sub.add_parser("compile", help="compile MODEL to an integer-only ONNX file")
    _common(c)
    c.add_argument("model", help="file.py:factory, package.module:factory, a torch.export .pt2, or a float .onnx")
    c.add_argument("-o", "--output", required=True, help="the ONNX file to write (never overwritten without --force)")
    c.add_argument("--input-shape", type=_shape, help="input shape without the batch, e.g. 1,28,28")
    c.add_argument("--weights", help="a state dict saved with torch.save (loaded with weights_only=True)")
    c.add_argument("--trust-pickle", action="store_true", help="let a .pt2 MODEL unpickle any object (runs code "
                   "from the file: only for files from a trusted author)")
    c.add_argument("--data", help="digits | fashion-mnist[:DIR] | random | FILE.npz (x, y): train split "
                                  "calibrates, test split measures accuracy")
    c.add_argument("--policy", help="w{N}a{M} | aqt (4-bit, first/last 8-bit) | FILE.json (default w8a8)")
    c.add_argument("--search", help="a bit-width search instead of a fixed policy: aqt (QAT with the AQT recipe), "
                                    "bsq, bayesian-bits, apot; `qcompile passes` lists every search and its options")
    c.add_argument("--quantizer", help="uniform (default) | apot: additive powers-of-two weights lowered to "
                                       "shift-add integer ops, trained with the apot search")
    c.add_argument("--w-bits", dest="bits", type=int, help="APoT weight bits, 2..7 (2: ternary; default 3); "
                                                          "per layer: --policy FILE.json")
    c.add_argument("--epochs", type=int, help="training epochs of a learned search")
    c.add_argument("--fraction", type=float, help="AQT: share of training steps that calibrate activation bounds")
    c.add_argument("--lr", type=float, help="learning rate of a learned search")
    c.add_argument("--alpha", type=float, help="BSQ: strength of the bit-plane regularizer (>= 0)")
    c.add_argument("--mu", type=float, help="Bayesian Bits: strength of the BOPs regularizer (> 0)")
    c.add_argument("--distill", type=float, help="a learned search: weight in [0, 1] of the float model's soft "
                                                 "targets in the loss (knowledge distillation; default 0)")
    c.add_argument("--post-training", action="store_true", help="Bayesian Bits: keep the weights, learn only "
                   "gates and ranges on a small set (minutes)")
    c.add_argument("--option", action="append", metavar="NAME=V", help="any other option of the search, e.g. "
                   "finetune_from=bsq (repeatable; `qcompile passes` lists them)")
    c.add_argument("--checkpoint", help="a learned search's checkpoint file (written after every epoch)")
    c.add_argument("--resume", action="store_true", help="continue a learned search from --checkpoint")
    c.add_argument("--pipeline", help="a pass pipeline replacing the default (see `qcompile passes`)")
    c.add_argument("--calibration-steps", type=int, default=32, help="calibration batches (default 32)")
    c.add_argument("--target", choices=("ort", "integer"), help="requantization contract: ort (default; float32, "
                   "exported on onnxruntime's fused QLinearConv kernels, fast and exact) or integer (dyadic, for "
                   "integer-only hardware)")
    c.add_argument("--ort-cpu", choices=("any", "avx2", "vnni"), default="any", help="target ort: any (default; "
                   "exact on every x86 CPU: 8-bit weights take the u8 x u8 kernels), avx2 (8-bit weights quantized "
                   "to 7 bits: every layer on the int8 kernels, fast on AVX2 and exact on every x86 CPU) or vnni "
                   "(int8 weights everywhere: faster, exact on CPUs with VNNI, not on AVX2-only CPUs)")
    c.add_argument("--report", help="write the JSON report here")
    c.add_argument("--verify", action="store_true", help="run the export in onnxruntime and count mismatches")
    c.add_argument("--verify-samples", type=int, default=1024, help="test samples to verify (default 1024)")
    c.add_argument("--force", action="store_true", help="replace existing output files")
    c.add_argument("--print-ir-after-all", action="store_true", help="print the IR after every pass (stderr)")
    c.add_argument("--dump-dir", help="write the IR after every pass to DIR/NN-pass.{txt,dot,png} (colored by bits)")

    e = sub.add_parser("eval", help="accuracy of an exported ONNX model in onnxruntime")
    _common(e)
    e.add_argument("model", help="the .onnx file")
    e.add_argument("--data", required=True, help="digits | fashion-mnist[:DIR] | FILE.npz with labels")

    p = sub.add_parser("passes", help="list every pass and its options")
    _common(p)
    _sweep_parser(sub)
    return parser


COMMANDS = {"demo": cmd_demo, "compile": cmd_compile, "eval": cmd_eval, "passes": cmd_passes, "sweep": cmd_sweep}


def _check_model_file(args: argparse.Namespace) -> None:
    """MODEL's file (file.py:factory, .pt2, .onnx) must exist; checked without importing torch."""
    spec = getattr(args, "model", None)
    if not spec:
        return
    if spec.endswith((".pt2", ".onnx")) and not Path(spec).is_file():
        raise cli_usage.InputError(f"no such file: {spec}")
    module = spec.rpartition(":")[0]
    if module.endswith(".py") and not Path(module).is_file():
        raise cli_usage.InputError(f"no such model file: {module}")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The parsed command line; a usage error is raised as UsageError, unknown flags too (with a suggestion)."""
    parser = build_parser()
    args, extras = parser.parse_known_args(argv)
    if extras:
        raise cli_usage.UsageError(args.command_parser, cli_usage.unknown_arguments(args.command_parser, extras))
    return args


def main(argv: list[str] | None = None) -> int:
    cli_usage.catch_interrupts()
    try:
        try:
            args = parse_args(argv)
        except cli_usage.UsageError as exc:
            line = str(exc) if str(exc).startswith("error: ") else cli_usage.usage_line(exc)
            print(line, file=sys.stderr)
            return USER_ERROR
        status = _run(args)
        interrupted_late = cli_usage.interrupted() and status != cli_usage.INTERRUPTED  # swallowed by a library
        return cli_usage.report_interrupt() if interrupted_late else status
    except KeyboardInterrupt:
        return cli_usage.report_interrupt()


def _run(args: argparse.Namespace) -> int:
    try:
        _check_model_file(args)  # before torch is imported: a mistyped path is a quick answer
        with threads.configured(args.threads):  # restored afterwards, for callers of main() in a process
            from qcompile.frontends.model_spec import import_user_module
            from qcompile.frontends.pickles import trusting_pickles

            for plugin in args.plugin:
                import_user_module(plugin)
            with trusting_pickles(getattr(args, "trust_pickle", False)):
                return COMMANDS[args.command](args)
    except Exception as exc:  # noqa: BLE001 - the one place errors become messages
        if cli_usage.interrupted():  # a library turned our KeyboardInterrupt into its own error
            return cli_usage.report_interrupt()
        if args.debug:
            traceback.print_exc()
            details = getattr(exc, "details", None) or getattr(exc.__cause__, "details", None) or []
            print("\n".join(details), file=sys.stderr)  # e.g. every unsupported node, one per line
        from qcompile.errors import one_line

        message = one_line(str(exc) or type(exc).__name__, 290)
        if isinstance(exc, cli_usage.InputError):
            print(f"error: {message}", file=sys.stderr)
            return USER_ERROR
        from qcompile.errors import QCompileError

        if not isinstance(exc, QCompileError):
            message = one_line(str(exc) or type(exc).__name__, 240)

        if isinstance(exc, QCompileError):
            print(f"error: {message}", file=sys.stderr)
            return USER_ERROR
        hint = "" if args.debug else " (run with --debug for the traceback)"
        print(f"error: internal error: {type(exc).__name__}: {message}{hint}", file=sys.stderr)
        return CHECK_FAILED


if __name__ == "__main__":
    sys.exit(main())
