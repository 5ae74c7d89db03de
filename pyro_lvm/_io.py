"""File writing shared by fit checkpoints, the study runner and the report renderer: atomic
writes (a reader sees the old file or the new one, never half of one)."""
from __future__ import annotations

import os
import pathlib
import secrets
from typing import Tuple, Union

__all__ = ["write_atomically"]


def _create_temporary(path: pathlib.Path) -> Tuple[int, pathlib.Path]:
    """A new, exclusively created file next to ``path``: ``(descriptor, its path)``.

    Unlike :func:`tempfile.mkstemp` (always ``0600``), the file is created with mode ``0666``
    and the process umask (and any default ACL) applies, as for a file made by :func:`open`:
    after :func:`os.replace` the file has the permissions a user expects of a new file.
    """
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0)
    for _ in range(100):
        tmp = path.parent / f".{path.name}.{secrets.token_hex(8)}.tmp"
        try:
            return os.open(tmp, flags, 0o666), tmp
        except FileExistsError:  # a random name taken: draw another
            continue
    raise FileExistsError(f"could not create a temporary file next to {path}")


def write_atomically(path: Union[str, os.PathLike], data: Union[bytes, str]) -> None:
    """Write ``data`` (text is UTF-8 encoded) to a temporary file next to ``path``, then rename
    it over ``path`` (atomic on POSIX and Windows): a reader sees the old file or the new one,
    never half of one, and an exception leaves the old file and no temporary behind."""
    path = pathlib.Path(path)
    if isinstance(data, str):
        data = data.encode("utf-8")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = _create_temporary(path)
    except OSError as exc:
        raise _naming(exc, path) from None
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        if isinstance(exc, OSError):
            raise _naming(exc, path) from None
        raise


def _naming(exc: OSError, path: pathlib.Path) -> OSError:
    """The same error naming the file the caller wrote, not its temporary file: a full disk
    or a read-only directory reads "cannot write PATH" to the user."""
    if exc.errno is None or type(exc) not in (OSError, PermissionError, FileNotFoundError,
                                              IsADirectoryError, NotADirectoryError):
        return exc
    return type(exc)(exc.errno, exc.strerror, str(path))
