"""Which paths under a directory the machine's other users could read or enter, for the tests that
the embedded services' files are private to the user (0600 files, 0700 directories)."""

from __future__ import annotations

import stat
from pathlib import Path
from typing import Iterator

GROUP_OR_OTHER = 0o077
GROUP_OR_OTHER_SEARCH = 0o011  # the bits that let others enter a directory


def shared_paths(root: Path, within_private_directories: bool = True) -> list[str]:
    """'MODE PATH' of each path under `root`, `root` included, whose mode grants group or other
    users any access; symbolic links (whose own mode means nothing) are neither listed nor followed.

    `within_private_directories=False` leaves out what lies inside a directory that other users
    cannot enter, which they cannot reach whatever its mode (Ray makes the directories it creates
    0777, inside the node's private temp dir).
    """
    return [f"{stat.filemode(mode)} {path}" for path, mode in _walk(root, within_private_directories)
            if mode & GROUP_OR_OTHER and not stat.S_ISLNK(mode)]


def _walk(path: Path, within_private_directories: bool) -> Iterator[tuple[Path, int]]:
    try:
        mode = path.lstat().st_mode
        children = sorted(path.iterdir()) if stat.S_ISDIR(mode) else []
    except FileNotFoundError:  # removed meanwhile by the service that wrote it
        return
    yield path, mode
    if within_private_directories or mode & GROUP_OR_OTHER_SEARCH:
        for child in children:
            yield from _walk(child, within_private_directories)
