"""Atomic file writes: the new file appears whole or not at all, and an existing file is only
replaced when asked. Every file nlsr writes (images, checkpoints, logs, JSON) goes through here.

The temporary file is ``.NAME.nlsrPID-RANDOM.tmp`` beside ``NAME`` (PID: the writer's process
id). A process killed while writing leaves it behind; :func:`remove_stale_temporaries` removes
those of dead writers, and ``nlsr upscale`` / ``nlsr train`` call it on the folders they write.
"""

from __future__ import annotations

import os
import re
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import IO

#: A temporary file of :func:`atomic_write`: ``.NAME.nlsrPID-RANDOM.tmp``.
TEMPORARY_PATTERN = re.compile(r"^\.(?P<name>.+)\.nlsr(?P<pid>\d+)-(?P<random>[A-Za-z0-9_]+)\.tmp$")
#: A temporary file whose writer is gone is removed once untouched this long (seconds): the
#: delay spares a writer on another machine sharing the folder, whose process id means nothing
#: here.
STALE_AFTER_EXIT = 10.0
#: A temporary file untouched this long (seconds) is removed even if its process id is alive
#: (process ids are reused).
STALE_AFTER = 3600.0


def atomic_write(
    path: str | Path, data: bytes | Callable[[IO[bytes]], None], *, overwrite: bool = True
) -> Path:
    """Write ``data`` (bytes, or a function writing to a binary file) to a temporary file beside
    ``path``, fsync it and move it into place.

    With ``overwrite=False`` an existing ``path`` raises ``FileExistsError`` and is never
    clobbered, even if it appears while writing. On any failure (also inside ``data``) the
    temporary file is removed and ``path`` keeps its previous content; an ``OSError`` of the
    operating system (disk full, permission denied) names ``path``, not the temporary file.
    """
    path = Path(path)
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(
            dir=path.parent, prefix=f".{path.name}.nlsr{os.getpid()}-", suffix=".tmp"
        )
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp creates 0600; give the usual permissions
        with os.fdopen(fd, "wb") as fh:
            if callable(data):
                data(fh)
            else:
                fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        if overwrite:
            os.replace(tmp, path)
        else:
            _publish_new(tmp, path)
    except OSError as e:
        if e.errno is None or not _about_target(e.filename, path):
            raise
        raise OSError(e.errno, e.strerror, str(path)) from e
    finally:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
    _fsync_dir(path.parent)
    return path


def remove_stale_temporaries(
    folder: str | Path, *, now: float | None = None, after: float = STALE_AFTER
) -> list[Path]:
    """Remove the temporary files :func:`atomic_write` left in ``folder`` (not below it) when its
    process was killed: those whose writer process no longer runs on this machine (and that
    were not modified for :data:`STALE_AFTER_EXIT` seconds), and any not modified for ``after``
    seconds. Other files are never touched. Returns the removed paths; a folder that does not
    exist or cannot be read gives an empty list."""
    now = time.time() if now is None else now
    removed: list[Path] = []
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return removed
    for entry in entries:
        match = TEMPORARY_PATTERN.match(entry.name)
        if match is None:
            continue
        try:
            if not entry.is_file(follow_symlinks=False):
                continue
            age = now - entry.stat(follow_symlinks=False).st_mtime
        except OSError:
            continue
        gone = age >= STALE_AFTER_EXIT and not _process_alive(int(match["pid"]))
        if gone or age >= after:
            try:
                os.unlink(entry.path)
            except OSError:
                continue
            removed.append(Path(entry.path))
    return sorted(removed)


def _about_target(filename: object, path: Path) -> bool:
    """Whether an OSError's file name is none, our temporary file or the target's folder."""
    if filename is None:
        return True
    if not isinstance(filename, str | bytes | os.PathLike):
        return False
    name = os.fsdecode(filename)
    return bool(TEMPORARY_PATTERN.match(os.path.basename(name))) or name == str(path.parent)


def _process_alive(pid: int) -> bool:
    """Whether process ``pid`` runs on this machine (True when that cannot be told)."""
    if pid == os.getpid():
        return True
    if os.name != "posix" or pid <= 0:
        return True  # os.kill(pid, 0) would terminate the process on Windows
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (OSError, OverflowError):
        return True  # e.g. PermissionError: it exists, owned by someone else
    return True


def _publish_new(tmp: str, path: Path) -> None:
    """Move ``tmp`` to ``path`` only if ``path`` does not exist (a hard link never clobbers)."""
    try:
        os.link(tmp, path)
    except FileExistsError:
        raise
    except OSError:  # a file system without hard links: check, then rename
        if path.exists():
            raise FileExistsError(f"{path} exists") from None
        os.replace(tmp, path)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _fsync_dir(folder: Path) -> None:
    """Persist the rename itself (not possible on every platform; the rename is atomic anyway)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
