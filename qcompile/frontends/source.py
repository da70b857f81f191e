"""Source locations for messages: the user's file:line behind a node or an exception."""

from __future__ import annotations

import os
import re
import traceback
from types import TracebackType

import torch.fx as fx

_FRAME = re.compile(r'File "(?P<file>[^"]+)", line (?P<line>\d+), in (?P<func>\S+)')
# Library frames: this package (by location, so a user's own folder named "qcompile" is still user code),
# torch, installed packages and generated code.
_PACKAGE_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__))) + os.sep
_LIBRARY_PARTS = (f"{os.sep}torch{os.sep}", "site-packages", "<frozen", "<string>", "<eval_with_key>")


def _is_user_file(path: str) -> bool:
    return not os.path.abspath(path).startswith(_PACKAGE_DIR) and not any(part in path for part in _LIBRARY_PARTS)


def short_path(path: str) -> str:
    try:
        rel = os.path.relpath(path)
    except ValueError:
        return os.path.basename(path)
    return rel if not rel.startswith("..") else os.path.basename(path)


def node_source(node: fx.Node) -> str | None:
    """The last user frame of the node's recorded stack trace, as ``file:line``."""
    trace = node.stack_trace or node.meta.get("stack_trace")
    if not trace:
        return None
    frames = [m for m in _FRAME.finditer(trace) if _is_user_file(m["file"])]
    if not frames:
        return None
    last = frames[-1]
    return f"{short_path(last['file'])}:{last['line']}"


def exception_source(tb: TracebackType | None) -> tuple[str, str] | None:
    """(``file:line``, module class name) of the innermost user frame of a traceback."""
    found = None
    for frame, lineno in traceback.walk_tb(tb):
        path = frame.f_code.co_filename
        if _is_user_file(path):
            owner = frame.f_locals.get("self")
            owner_name = type(owner).__name__ if owner is not None else frame.f_code.co_name
            found = (f"{short_path(path)}:{lineno}", owner_name)
    return found
