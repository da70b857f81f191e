"""Writing outputs safely: only regular files are ever replaced, and a file appears whole or not at all.

``check_output(path, force)`` refuses, before any work is done, an output path that is a directory, a
device, a pipe, a socket or a symbolic link (with or without ``force``), an existing regular file without
``force``, and a folder that does not exist. ``write_output`` then writes into a fresh temporary file that
``tempfile.mkstemp`` creates in the target folder (a name no other file has, created exclusively) and
renames it over the target in one step, so a reader sees the old file or the new one, never half of one;
on any failure the temporary file is removed. The new file gets the usual permissions (0666 minus the
umask), not mkstemp's 0600.

Deliberately not handled: a path that changes kind between the check and the rename (the rename then
fails with the operating system's error), and writing through symbolic links (refused: give the real path).
"""

from __future__ import annotations

import os
import stat
import tempfile
from collections.abc import Callable
from pathlib import Path

from qcompile.errors import QCompileError


class OutputPathError(QCompileError):
    """An output path that must not be written."""


def _kind(mode: int) -> str:
    kinds = [(stat.S_ISDIR, "a directory"), (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
             (stat.S_ISFIFO, "a named pipe"), (stat.S_ISSOCK, "a socket"), (stat.S_ISLNK, "a symbolic link")]
    return next((name for test, name in kinds if test(mode)), "not a regular file")


def check_output(path: str | Path, force: bool) -> Path:
    """The output ``path``, refused unless it is absent or (with ``force``) a regular file, in an existing folder."""
    path = Path(path)
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        mode = None
    except OSError as exc:
        raise OutputPathError(f"cannot use {path} as an output ({exc.strerror}); choose another path") from None
    if mode is not None and not stat.S_ISREG(mode):
        raise OutputPathError(f"{path} is {_kind(mode)}, not a file; qcompile only writes regular files: "
                              "choose a file path")
    if mode is not None and not force:
        raise OutputPathError(f"{path} already exists; choose another path or pass --force to replace it")
    if not path.parent.is_dir():
        raise OutputPathError(f"the folder {path.parent} does not exist; create it or choose another output path")
    return path


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def write_output(path: str | Path, force: bool, write: Callable[[Path], object]) -> Path:
    """Call ``write(tmp)`` on a new temporary file beside ``path``, then rename it over ``path`` (checked first)."""
    path = check_output(path, force)
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".partial" + path.suffix)
    os.close(fd)
    tmp = Path(name)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_umask())
        check_output(path, force)  # still absent or a regular file
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def write_bytes(path: str | Path, data: bytes, force: bool) -> Path:
    return write_output(path, force, lambda tmp: tmp.write_bytes(data))


def write_text(path: str | Path, text: str, force: bool) -> Path:
    return write_output(path, force, lambda tmp: tmp.write_text(text))
