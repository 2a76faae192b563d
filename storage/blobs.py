"""Content stored as files under one root, written durably.

A blob's path is derived from a SHA-256 of the identifiers it is stored under (never from
their text, which comes from the wire and may hold ``../`` or 200 characters):
``<root>/<kind>/<h[0:2]>/<h[2:4]>/<h>[.r<revision>]``. A write goes to a temporary file
in the same directory, is fsynced, renamed over the final name and the directory is
fsynced, so a blob is either absent or complete after a crash, never half-written.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

__all__ = ["BlobStore", "DiskUsage"]


@dataclass(frozen=True)
class DiskUsage:
    total: int
    used: int
    free: int

    @property
    def used_fraction(self) -> float:
        return self.used / self.total if self.total else 1.0


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class BlobStore:
    """Files under ``root``; keys are relative POSIX paths chosen by :meth:`key`."""

    def __init__(self, root: str | Path, *, fsync: bool = True) -> None:
        self.root = Path(root)
        new = not self.root.exists()
        self.root.mkdir(parents=True, exist_ok=True)
        self._resolved = self.root.resolve()
        self.fsync = fsync
        if new and fsync:
            _fsync_dir(self._resolved.parent)
        self._known_dirs: set[Path] = set()

    @staticmethod
    def key(kind: str, *identifiers: str, revision: int = 1, group: str | None = None) -> str:
        """The relative path for ``identifiers`` (any text) under the folder ``kind``.

        ``group`` (e.g. a Series Instance UID) puts related blobs in one folder of their own,
        ``<kind>/<g[0:2]>/<g>/<h>``: one new folder per series instead of one per instance,
        which saves two directory fsyncs per instance on reception.
        """
        if not kind.isidentifier():
            raise ValueError(f"blob kind must be a plain name, got {kind!r}")
        h = hashlib.sha256("\x00".join(identifiers).encode("utf-8", "surrogateescape")).hexdigest()
        suffix = f".r{revision}" if revision != 1 else ""
        if group is not None:
            g = hashlib.sha256(group.encode("utf-8", "surrogateescape")).hexdigest()
            return f"{kind}/{g[:2]}/{g}/{h}{suffix}"
        return f"{kind}/{h[:2]}/{h[2:4]}/{h}{suffix}"

    def path(self, key: str) -> Path:
        p = Path(os.path.normpath(self._resolved / key))
        if self._resolved not in p.parents:
            raise ValueError(f"blob key outside the store: {key!r}")
        return p

    def _ensure_dir(self, d: Path) -> None:
        if d in self._known_dirs:
            return
        missing = []
        p = d
        while not p.exists():
            missing.append(p)
            p = p.parent
        d.mkdir(parents=True, exist_ok=True)
        if self.fsync:  # make each new directory entry durable in its parent
            for m in reversed(missing):
                _fsync_dir(m.parent)
        self._known_dirs.add(d)

    def put(self, key: str, data: bytes | memoryview) -> Path:
        """Write ``data`` under ``key`` durably (replacing what was there)."""
        final = self.path(key)
        self._ensure_dir(final.parent)
        tmp = final.with_name(f".{final.name}.{os.getpid()}.{id(data):x}.tmp")
        try:
            try:
                fh = open(tmp, "wb")  # noqa: SIM115
            except FileNotFoundError:  # the directory was removed behind our back
                self._known_dirs.discard(final.parent)
                self._ensure_dir(final.parent)
                fh = open(tmp, "wb")  # noqa: SIM115
            with fh:
                fh.write(data)
                fh.flush()
                if self.fsync:
                    os.fsync(fh.fileno())
            os.replace(tmp, final)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        if self.fsync:
            _fsync_dir(final.parent)
        return final

    def get(self, key: str) -> bytes:
        return self.path(key).read_bytes()

    def exists(self, key: str) -> bool:
        return self.path(key).is_file()

    def delete(self, key: str) -> None:
        self.path(key).unlink(missing_ok=True)

    def usage(self) -> DiskUsage:
        u = shutil.disk_usage(self.root)
        return DiskUsage(total=u.total, used=u.total - u.free, free=u.free)
