"""No code from an input file runs: loading a ``.pt2`` archive without unpickling anything that could.

``torch.export.load`` unpickles parts of an archive: the sample inputs always (``torch.save`` format; on a
failure torch retries with ``weights_only=False``), weights and constants saved "with pickle", and
custom or opaque objects (``torch._C._pickle_load_obj`` / ``pickle.loads``). A crafted archive can put any
callable into those pickles and it runs while loading. ``guarded_unpickling()`` wraps the load: every
``torch.load`` becomes ``weights_only=True`` (torch's restricted unpickler: tensors, containers and
numbers only, no callables), and ``pickle.load``/``pickle.loads``/``torch._C._pickle_load_obj`` refuse.
Anything refused, even where torch catches the error and moves on, ends the load with a
``PickleRefusedError`` that names ``--trust-pickle``. ``trusting_pickles(True)`` (the CLI's
``--trust-pickle``) lifts the guard for archives whose author the user trusts.

Deliberately not handled: other threads unpickling while a guarded load runs (the patches are
process-wide for its duration), and code a ``file.py:factory`` MODEL or a ``--plugin`` runs: importing them
is what the user asked for.
"""

from __future__ import annotations

import contextlib
import contextvars
import pickle
import re
from collections.abc import Iterator
from typing import Any

import torch

from qcompile.errors import QCompileError

_TRUST: contextvars.ContextVar[bool] = contextvars.ContextVar("qcompile_trust_pickle", default=False)


class PickleRefusedError(QCompileError):
    """An input file would unpickle objects that can run code."""


@contextlib.contextmanager
def trusting_pickles(trust: bool = True) -> Iterator[None]:
    """Within the block, ``.pt2`` archives may unpickle anything (only for files from a trusted author)."""
    token = _TRUST.set(trust)
    try:
        yield
    finally:
        _TRUST.reset(token)


def pickles_trusted() -> bool:
    return _TRUST.get()


class _Refused(Exception):  # noqa: N818 - internal signal, turned into PickleRefusedError
    pass


@contextlib.contextmanager
def guarded_unpickling(what: str) -> Iterator[None]:
    """Run a load that must not unpickle code; raise PickleRefusedError naming ``what`` if it tried."""
    if pickles_trusted():
        yield
        return
    refused: list[str] = []
    real_load = torch.load

    def safe_load(f: Any, map_location: Any = None, *args: Any, **kwargs: Any) -> Any:
        kwargs["weights_only"] = True
        try:
            return real_load(f, map_location, *args, **kwargs)
        except pickle.UnpicklingError as exc:
            found = re.search(r"GLOBAL ([\w.]+)", str(exc))
            refused.append(f"it names {found.group(1)}" if found else "not loadable as plain tensors")
            raise _Refused(refused[-1]) from None

    def refuse(*_: Any, **__: Any) -> Any:
        refused.append("a pickled Python object")
        raise _Refused(refused[-1])

    patches = [(torch, "load", safe_load), (pickle, "load", refuse), (pickle, "loads", refuse),
               (torch._C, "_pickle_load_obj", refuse)]
    saved = [(obj, name, getattr(obj, name)) for obj, name, _ in patches]
    for obj, name, new in patches:
        setattr(obj, name, new)
    try:
        yield
    except Exception:
        if not refused:  # a failure of its own, for the caller to report
            raise
    finally:
        for obj, name, old in saved:
            setattr(obj, name, old)
    if refused:
        raise PickleRefusedError(
            f"{what} holds pickled objects that could run code when loaded ({refused[0][:60]}); re-save it "
            "from plain tensors with torch.export.save, or pass --trust-pickle if you trust its author"
        )
