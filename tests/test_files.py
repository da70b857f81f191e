"""Outputs: only regular files are replaced, through a fresh temporary file; nothing else is touched."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from qcompile.cli import main
from qcompile.files import OutputPathError, check_output, write_bytes, write_text


@pytest.fixture
def fifo(tmp_path: Path) -> Path:
    path = tmp_path / "pipe.onnx"
    os.mkfifo(path)
    return path


@pytest.mark.parametrize("force", [False, True])
def test_non_regular_outputs_are_refused_with_or_without_force(tmp_path: Path, fifo: Path, force: bool) -> None:
    (tmp_path / "d.onnx").mkdir()
    (tmp_path / "link.onnx").symlink_to(tmp_path / "elsewhere.onnx")
    cases = [(tmp_path / "d.onnx", "is a directory"), (fifo, "is a named pipe"),
             (Path("/dev/null"), "is a character device"), (tmp_path / "link.onnx", "is a symbolic link")]
    for path, why in cases:
        with pytest.raises(OutputPathError, match=why):
            write_bytes(path, b"new", force)
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode) and (tmp_path / "d.onnx").is_dir()
    assert not (tmp_path / "elsewhere.onnx").exists()


def test_existing_file_is_kept_without_force_and_replaced_with_it(tmp_path: Path) -> None:
    out = tmp_path / "out.onnx"
    out.write_bytes(b"precious")
    with pytest.raises(OutputPathError, match="already exists"):
        write_bytes(out, b"new", False)
    assert out.read_bytes() == b"precious"
    write_bytes(out, b"new", True)
    assert out.read_bytes() == b"new"


def test_a_users_tmp_files_beside_the_output_are_untouched(tmp_path: Path) -> None:
    mine = {name: f"user file {name}" for name in ("out.onnx.tmp", "r.json.tmp", ".out.onnx.tmp", "sweep.tmp.png")}
    for name, text in mine.items():
        (tmp_path / name).write_text(text)
    write_bytes(tmp_path / "out.onnx", b"model", False)
    write_text(tmp_path / "r.json", "{}", False)
    assert {name: (tmp_path / name).read_text() for name in mine} == mine
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([*mine, "out.onnx", "r.json"])


def test_new_files_get_the_usual_permissions(tmp_path: Path) -> None:
    old = os.umask(0o022)
    try:
        write_bytes(tmp_path / "a.onnx", b"x", False)
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(tmp_path / "a.onnx").st_mode) == 0o644


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path: Path) -> None:
    from qcompile.files import write_output

    out = tmp_path / "out.onnx"
    out.write_bytes(b"old")

    def broken(tmp: Path) -> None:
        tmp.write_bytes(b"half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        write_output(out, True, broken)
    assert out.read_bytes() == b"old" and [p.name for p in tmp_path.iterdir()] == ["out.onnx"]


def test_missing_folder_is_refused(tmp_path: Path) -> None:
    with pytest.raises(OutputPathError, match="does not exist"):
        check_output(tmp_path / "nowhere" / "o.onnx", True)


@pytest.mark.parametrize("force", [[], ["--force"]])
@pytest.mark.parametrize("flag", ["-o", "--report"])
def test_cli_refuses_a_directory_or_device_before_compiling(tmp_path: Path, fifo: Path,
                                                            capsys: pytest.CaptureFixture[str], force: list[str],
                                                            flag: str) -> None:
    (tmp_path / "d.onnx").mkdir()
    for target in (tmp_path / "d.onnx", fifo, Path("/dev/null")):
        out = ["-o", str(tmp_path / "ok.onnx"), "--report", str(target)] if flag == "--report" else ["-o", str(target)]
        code = main(["compile", "qcompile.models:DemoNet", "--input-shape", "1,8,8", *out, *force, "--no-progress"])
        err = capsys.readouterr().err.strip()
        assert code == 2 and len(err.splitlines()) == 1 and "not a file" in err, err
    assert not (tmp_path / "ok.onnx").exists()


def test_sweep_refuses_a_folder_where_its_files_go(tmp_path: Path) -> None:
    from qcompile.sweep import refuse_existing

    (tmp_path / "sweep.json").mkdir()
    with pytest.raises(OutputPathError, match="sweep.json is a directory"):
        refuse_existing(tmp_path, True)
