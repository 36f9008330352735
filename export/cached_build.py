"""A cache folder built once: one builder at a time across processes, never seen half-written.

The toy pair, the toy head and the math expert GGUF all live in ``<cache>/<inputs hash>``. A
builder takes ``<hash>.lock``, builds into a fresh ``<hash>.building-*`` folder and renames it
into place, so a reader sees the whole folder or none; a builder that dies leaves its staging
folder behind, and the next build removes it (the kernel drops a dead builder's lock).
"""

from __future__ import annotations

import fcntl
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path


def cached_build(final: Path, build: Callable[[Path], object], *, done: str) -> Path:
    """``final``, built by ``build(staging)`` unless ``final / done`` exists already."""
    parent = final.parent
    parent.mkdir(parents=True, exist_ok=True)
    if (final / done).exists():
        return final
    with open(parent / f"{final.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (final / done).exists():
            remove_abandoned_builds(parent, locked=final.name)
            staging = Path(tempfile.mkdtemp(prefix=f"{final.name}.building-", dir=parent))
            try:
                build(staging)
                os.rename(staging, final)
            finally:
                shutil.rmtree(staging, ignore_errors=True)
    return final


def remove_abandoned_builds(parent: Path, *, locked: str) -> None:
    """Delete ``<hash>.building-*`` folders that no live builder owns.

    A builder holds ``<hash>.lock`` for as long as its folder is in use, and the kernel drops the
    lock when the builder dies, so a lock we can take means the folder was abandoned. Folders of
    other code versions would otherwise stay forever: nobody builds that hash again.
    ``locked`` is the hash whose lock the caller already holds.
    """
    for staging in sorted(parent.glob("*.building-*")):
        owner = staging.name.partition(".building-")[0]
        if owner == locked:
            shutil.rmtree(staging, ignore_errors=True)
            continue
        with open(parent / f"{owner}.lock", "a") as lock:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                continue  # its builder is still at work
            shutil.rmtree(staging, ignore_errors=True)
