"""Train examples/tiny_model.py's TinyNet on digits and save its state dict: the README's ``tiny.pt``.

Run: python examples/train_tiny.py [tiny.pt | OUT_DIR]   (an existing file is kept; a folder gets tiny.pt in it)
"""

import sys
from pathlib import Path

import torch

import qcompile
from qcompile.models import train_float

sys.path.insert(0, str(Path(__file__).parent))
from tiny_model import make_model  # noqa: E402


def main(out: Path) -> int:
    path = out / "tiny.pt" if out.is_dir() else out
    if path.exists():
        print(f"{path} already exists; kept (delete it to train again)")
        return 0
    torch.manual_seed(0)
    data = qcompile.load_data("digits")
    assert data.y_train is not None
    model = train_float(make_model(), data.x_train, data.y_train, epochs=5)
    torch.save(model.state_dict(), path)
    print(f"wrote {path} (TinyNet trained on digits for 5 epochs; load it with --weights {path})")
    return 0


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1]) if len(sys.argv) > 1 else Path("tiny.pt")))
