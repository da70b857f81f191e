"""Error lines: one line of at most 300 characters; unsupported ops grouped by kind with counts and the first
names and source lines; parameter reads never counted; nothing from torch's tracer or argparse before it."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from qcompile.cli import main
from qcompile.errors import MAX_LINE, group_items, one_line

MANY = textwrap.dedent(
    """
    import torch
    import torch.nn.functional as F
    from torch import nn

    class Many(nn.Module):
        def __init__(self):
            super().__init__()
            self.convs = nn.ModuleList(nn.Conv2d(1, 1, 3, padding=1) for _ in range(12))
            self.scale = nn.Parameter(torch.ones(1))

        def forward(self, x):
            for conv in self.convs:
                x = torch.exp(conv(x))
                x = torch.pow(torch.sin(x), self.scale)
            return x.flatten(1)

    class BadReshape(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(1, 2, 3)

        def forward(self, x):
            return self.conv(x).reshape(-1, 7)

    def many(): return Many()
    def bad_reshape(): return BadReshape()
    """
)


@pytest.fixture
def workdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    (tmp_path / "models.py").write_text(MANY)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def error_line(args: list[str], capfd: pytest.CaptureFixture[str]) -> str:
    """Run the CLI; the captured stderr (at the file-descriptor level) must be exactly one short error line."""
    code = main([*args, "--no-progress"])
    err = capfd.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert code != 0 and len(lines) == 1, err
    assert lines[0].startswith("error: ") and len(lines[0]) <= MAX_LINE, lines[0]
    return lines[0]


def test_many_unsupported_ops_are_grouped_by_kind(workdir: Path, capfd: pytest.CaptureFixture[str]) -> None:
    line = error_line(["compile", "models.py:many", "--input-shape", "1,8,8", "--data", "random", "-o", "o.onnx"],
                      capfd)
    assert "36 unsupported op(s): " in line  # 12 exp, 12 sin, 12 pow; the 12 reads of scale are no ops
    assert "exp x12 (exp at models.py:" in line and "sin x12 (" in line and "pow x12" in line
    assert "scale" not in line and "get_attr" not in line


def test_debug_lists_every_unsupported_node(workdir: Path, capfd: pytest.CaptureFixture[str]) -> None:
    main(["compile", "models.py:many", "--input-shape", "1,8,8", "--data", "random", "-o", "o.onnx", "--debug"])
    err = capfd.readouterr().err
    assert sum("(call_function exp at models.py:" in line for line in err.splitlines()) == 12


def test_no_tracer_output_before_the_line(workdir: Path, capfd: pytest.CaptureFixture[str]) -> None:
    line = error_line(["compile", "models.py:bad_reshape", "--input-shape", "1,8,8", "--data", "random",
                       "-o", "o.onnx"], capfd)
    assert "does not accept inputs of shape" in line and "<--- HERE" not in line


@pytest.mark.parametrize(("args", "fragment"), [
    (["compile", "models.py:many", "--input-shape", "3,a,16", "-o", "o.onnx"], "'3,a,16' is not a shape"),
    (["compile", "models.py:many"], "the following arguments are required: -o"),
    (["compile", "models.py:many", "-o", "o.onnx", "--calibration-steps", "x"], "invalid int value"),
])
def test_argparse_errors_are_one_line_pointing_at_help(workdir: Path, capfd: pytest.CaptureFixture[str],
                                                       args: list[str], fragment: str) -> None:
    assert main(args) == 2
    err = capfd.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and "usage:" not in err, err
    assert fragment in err and err.strip().endswith("see `qcompile compile --help`")


def test_one_line_keeps_the_beginning_and_the_fix() -> None:
    text = "what is wrong: " + "x" * 1000 + " ; do this to fix it"
    short = one_line(text)
    assert len(short) <= MAX_LINE and short.startswith("what is wrong") and short.endswith("do this to fix it")
    assert one_line("a\n  b") == "a b"


def test_group_items_orders_by_count_and_stays_within_budget() -> None:
    kinds = ["B"] * 3 + ["A"] * 5 + [f"K{i}" for i in range(40)]
    text = group_items(kinds, [f"n{i}" for i in range(len(kinds))])
    assert text.startswith("A x5 (n3, n4, ...), B x3 (n0, ...), K0 (n8)") and "more kind(s)" in text
    assert len(text) <= 160
