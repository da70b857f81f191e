"""No code from an input file runs: crafted .pt2 archives, weights, checkpoints and .npz files whose pickles
would write a marker file are refused, and the marker never appears (unless the user trusts the file)."""

from __future__ import annotations

import io
import json
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from qcompile.cli import main
from qcompile.frontends.pickles import PickleRefusedError, trusting_pickles
from qcompile.frontends.torch_fx import ModelFileError, load_pt2


class Payload:
    """Unpickling this object writes ``marker``."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (exec, (f"open({self.marker!r}, 'w').write('ran')",))


def small() -> nn.Module:
    return nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU(), nn.Flatten(), nn.Linear(72, 3)).eval()


def pickled(obj: object) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def rewrite(src: Path, dst: Path, replace: dict[str, bytes]) -> Path:
    """A copy of the zip ``src`` whose members ending in a key of ``replace`` hold its bytes instead."""
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w", zipfile.ZIP_STORED) as zout:
        for info in zin.infolist():
            data = next((v for k, v in replace.items() if info.filename.endswith(k)), zin.read(info))
            zout.writestr(info, data)
    return dst


@pytest.fixture
def pt2(tmp_path: Path) -> Path:
    path = tmp_path / "m.pt2"
    torch.export.save(torch.export.export(small(), (torch.zeros(2, 1, 8, 8),)), path)
    return path


def member(path: Path, suffix: str) -> bytes:
    with zipfile.ZipFile(path) as z:
        return z.read(next(n for n in z.namelist() if n.endswith(suffix)))


def crafted_sample_inputs(pt2: Path, marker: Path) -> Path:
    return rewrite(pt2, pt2.with_name("inputs.pt2"), {"sample_inputs/model.pt": pickled(Payload(marker))})


def crafted_weight(pt2: Path, marker: Path) -> Path:
    config = json.loads(member(pt2, "model_weights_config.json"))
    first = next(iter(config["config"].values()))
    first["use_pickle"] = True
    return rewrite(pt2, pt2.with_name("weight.pt2"), {
        "model_weights_config.json": json.dumps(config).encode(),
        f"weights/{first['path_name']}": pickled(Payload(marker)),
    })


def crafted_opaque_constant(pt2: Path, marker: Path) -> Path:
    import pickle

    config = {"config": {"c": {"path_name": "opaque_obj_0", "is_param": False, "use_pickle": True,
                               "tensor_meta": None}}}
    with zipfile.ZipFile(pt2) as z:
        prefix = z.namelist()[0].split("/")[0]
    out = rewrite(pt2, pt2.with_name("opaque.pt2"), {"model_constants_config.json": json.dumps(config).encode()})
    with zipfile.ZipFile(out, "a") as z:
        z.writestr(f"{prefix}/data/constants/opaque_obj_0", pickle.dumps(Payload(marker)))
    return out


CRAFTED = [crafted_sample_inputs, crafted_weight, crafted_opaque_constant]


@pytest.mark.parametrize("craft", CRAFTED, ids=[c.__name__ for c in CRAFTED])
def test_crafted_pt2_runs_nothing_and_names_the_flag(pt2: Path, tmp_path: Path, craft: object) -> None:
    marker = tmp_path / "marker"
    path = craft(pt2, marker)  # type: ignore[operator]
    with pytest.raises(PickleRefusedError, match="--trust-pickle"):
        load_pt2(path)
    assert not marker.exists()
    with trusting_pickles(), pytest.raises(Exception):  # noqa: B017, PT011 - the payload is no tensor or input
        load_pt2(path)
    assert marker.exists()  # the payload is real: trusted, it runs


def test_trusting_pickles_is_explicit(pt2: Path, tmp_path: Path) -> None:
    marker = tmp_path / "marker"
    path = crafted_sample_inputs(pt2, marker)
    with pytest.raises(PickleRefusedError):
        load_pt2(path)
    with trusting_pickles(), pytest.raises(Exception):  # noqa: B017, PT011 - the payload is no tuple of inputs
        load_pt2(path)
    assert marker.exists()  # the user said so


def test_a_plain_pt2_still_loads(pt2: Path) -> None:
    gm = load_pt2(pt2)
    assert any(n.op == "call_module" for n in gm.graph.nodes)


def test_cli_refuses_crafted_pt2_in_one_line(pt2: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    marker = tmp_path / "marker"
    path = crafted_weight(pt2, marker)
    code = main(["compile", str(path), "--input-shape", "1,8,8", "-o", str(tmp_path / "o.onnx"), "--no-progress"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "--trust-pickle" in err and len(err) <= 300, err
    assert not marker.exists() and not (tmp_path / "o.onnx").exists()


def test_crafted_weights_checkpoint_and_npz_run_nothing(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from qcompile.frontends.model_spec import load_weights

    marker = tmp_path / "marker"
    (tmp_path / "w.pt").write_bytes(pickled({"0.weight": Payload(marker)}))
    with pytest.raises(ModelFileError, match="hold pickled objects beyond tensors .it names exec."):
        load_weights(small(), tmp_path / "w.pt")
    np.savez(tmp_path / "d.npz", x=np.array([Payload(marker)], dtype=object))
    from qcompile.data import DataError, load_data

    with pytest.raises(DataError):
        load_data(str(tmp_path / "d.npz"))
    (tmp_path / "ck.pt").write_bytes(pickled({"signature": Payload(marker)}))
    code = main(["compile", "qcompile.models:DemoNet", "--data", "digits", "--search", "aqt", "--epochs", "1",
                 "--checkpoint", str(tmp_path / "ck.pt"), "--resume", "-o", str(tmp_path / "o.onnx"),
                 "--no-progress"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "cannot read checkpoint" in err, err
    assert not marker.exists()


def test_cli_trust_pickle_flag_lifts_the_guard(pt2: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    marker = tmp_path / "marker"
    path = crafted_weight(pt2, marker)
    main(["compile", str(path), "--input-shape", "1,8,8", "-o", str(tmp_path / "o.onnx"), "--no-progress",
          "--trust-pickle"])
    capsys.readouterr()
    assert marker.exists()
