"""The one error type a user sees as a single line: what was wrong and what is allowed."""

from __future__ import annotations

import errno
from contextlib import contextmanager
from typing import Iterator

from hydra.errors import HydraException


class UserError(Exception):
    """Bad input (config, data, model or network). The CLI prints it as one line and exits non-zero."""


# What a user can do about the file-system failures that are theirs to fix.
_FOLDERS = "point runs_dir, cache_dir or artifacts_dir at a folder you can write"
_ADVICE = {
    errno.EACCES: _FOLDERS, errno.EPERM: _FOLDERS, errno.EROFS: _FOLDERS, errno.ENOTDIR: _FOLDERS, errno.EEXIST: _FOLDERS,
    errno.ENOSPC: "free some space, or point runs_dir, cache_dir or artifacts_dir at another disk",
    errno.EDQUOT: "free some space, or point runs_dir, cache_dir or artifacts_dir at another disk",
}


@contextmanager
def file_errors() -> Iterator[None]:
    """Turn a file-system failure (unwritable or read-only folder, a path through a file, a full disk) into a
    one-line UserError naming the path: the one place an OSError becomes a user's error instead of a traceback."""
    try:
        yield
    except OSError as exc:
        if isinstance(exc, HydraException):  # Hydra's missing-config error is an IOError too: the CLI words it
            raise
        path = " -> ".join(str(p) for p in (exc.filename, exc.filename2) if p)
        what = exc.strerror or one_line(exc)
        message = f"{path}: {what}" if path else what
        advice = _ADVICE.get(exc.errno)
        raise UserError(f"{message}; {advice}" if advice else message) from None


def one_line(exc: BaseException) -> str:
    """A library's multi-line message (and its cause's) as one line: sentences joined by '; ', listed options by ', '."""
    lines: list[tuple[str, bool]] = []
    for error in (exc, exc.__cause__):
        for raw in str(error or "").splitlines():
            line = raw.strip()
            if line.startswith("Config search path"):  # Hydra's where-it-looked, noise to a user
                break
            if line and line not in (text for text, _ in lines):
                lines.append((line, raw.startswith((" ", "\t"))))
    out = ""
    for i, (line, listed) in enumerate(lines):
        if i:
            out += ", " if listed and lines[i - 1][1] else " " if lines[i - 1][0].endswith(":") else "; "
        out += line
    return out
