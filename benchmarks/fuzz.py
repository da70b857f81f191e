"""The long fuzz run: hundreds of mutated ONNX models, .pt2 archives, weights and .npz files, one subprocess each.

    OMP_NUM_THREADS=1 python benchmarks/fuzz.py --onnx 300 --pt2 40 --weights 40 --npz 40

Prints the outcome table (rows: input kind; columns: the outcomes of tests/fuzz/cases.py) and then every case
whose outcome is not `success` or `clean error`, with its mutation and what happened. The cases come from a
fixed seed (`--seed`); each runs the CLI in its own process (a forked child of this one, which has already
imported qcompile, or with `--spawn` a fresh `python -m qcompile compile`) with a timeout (`--timeout`).
The fast in-process subset runs in the test suite (tests/fuzz/test_fuzz.py).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "fuzz"))

from cases import BAD, OUTCOMES, generate  # noqa: E402
from runner import Result, run_forked, run_subprocess  # noqa: E402

KINDS = ("onnx", "pt2", "weights", "npz")


def table(results: list[Result]) -> str:
    shown = list(OUTCOMES)
    counts = {kind: Counter(r.outcome for r in results if r.case.kind == kind) for kind in KINDS}
    rows = [[kind, str(sum(c.values())), *(str(c[o]) for o in shown)] for kind, c in counts.items() if c]
    total = Counter(r.outcome for r in results)
    rows.append(["total", str(len(results)), *(str(total[o]) for o in shown)])
    headers = ["input", "cases", *shown]
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)),
             "  ".join("-" * w for w in widths)]
    lines += ["  ".join(v.rjust(w) if i else v.ljust(w) for i, (v, w) in enumerate(zip(r, widths, strict=True)))
              for r in rows]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    for kind, default in zip(KINDS, (300, 40, 40, 40), strict=True):
        parser.add_argument(f"--{kind}", type=int, default=default, help=f"{kind} cases (default {default})")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds before a run counts as a hang")
    parser.add_argument("--verbose", action="store_true", help="print every case as it finishes")
    parser.add_argument("--spawn", action="store_true", help="a fresh `python -m qcompile` per case (slow: the "
                        "imports) instead of a forked child of this process")
    args = parser.parse_args()
    import qcompile.api
    import qcompile.cli  # noqa: F401 - imported once here, before the children fork

    qcompile.api.torch.set_num_threads(1)
    results, start = [], time.perf_counter()
    for kind in KINDS:
        for case in generate(kind, getattr(args, kind), args.seed):
            with tempfile.TemporaryDirectory(prefix="qcompile-fuzz-") as folder:
                run = run_subprocess if args.spawn else run_forked
                result = run(case, Path(folder), args.timeout)
            results.append(result)
            if args.verbose or result.outcome in BAD:
                print(f"{case.name:12s} {result.outcome:22s} {'; '.join(case.notes)} :: {result.detail}",
                      file=sys.stderr, flush=True)
    print(table(results))
    print(f"\n{len(results)} cases in {time.perf_counter() - start:.0f} s (seed {args.seed})")
    bad = [r for r in results if r.outcome in BAD]
    for r in bad:
        print(f"{r.case.name}: {r.outcome}: {'; '.join(r.case.notes)} :: {r.detail}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
