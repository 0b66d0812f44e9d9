"""Files and directories private to the user who runs the embedded services: 0600 and 0700, the
services' umask, and `make_tree_private` for what an older version left behind
(docs/design/stack.md).
"""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import BinaryIO

from infra.errors import UserError

PRIVATE_UMASK = 0o077  # for the service processes: files 0600, directories 0700
_GROUP_OR_OTHER = 0o077


def private_directory(path: Path) -> Path:
    """Create `path` (mode 0700), or make an existing one 0700; refuse one owned by another user
    (a predictable name under /tmp could have been created by someone else first)."""
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    if path.stat().st_uid != os.getuid():
        raise UserError(f"{path} belongs to another user; remove it or choose another directory")
    os.chmod(path, 0o700)
    return path


def open_private_append(path: Path) -> BinaryIO:
    """Open `path` for appending; it is created 0600, and an existing file is made 0600."""
    stream = open(os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600), "ab")
    os.fchmod(stream.fileno(), 0o600)
    return stream


def write_private_file(path: Path, text: str) -> None:
    """Replace `path` atomically with `text`, readable by the owner only."""
    temporary = path.with_name(f".{path.name}.tmp")
    with os.fdopen(os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "w") as stream:
        stream.write(text)
    os.chmod(temporary, 0o600)
    os.replace(temporary, path)


def make_tree_private(root: Path) -> None:
    """Take group and other permissions off everything under `root` (symbolic links not followed)."""
    for directory, subdirectories, files in os.walk(root):
        for name in (*subdirectories, *files):
            path = os.path.join(directory, name)
            mode = os.lstat(path).st_mode
            if not stat.S_ISLNK(mode) and mode & _GROUP_OR_OTHER:
                os.chmod(path, stat.S_IMODE(mode) & ~_GROUP_OR_OTHER)
