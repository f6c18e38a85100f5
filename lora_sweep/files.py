"""File modes for what lora-sweep writes through `tempfile` (to rename it into place atomically).

tempfile makes files 0600 and folders 0700, for secrecy; records, the token cache and converted models are
ordinary outputs, so they get the modes the user's umask gives any other file.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path


@functools.cache
def _umask() -> int:
    """The process's umask, read once (reading it means setting it: not something to do while other threads write)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def follow_umask(path: str | Path) -> None:
    """Give a file (0666) or folder (0777) made by tempfile the modes the umask gives an ordinary one."""
    os.chmod(path, (0o777 if os.path.isdir(path) else 0o666) & ~_umask())
