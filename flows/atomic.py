"""Crash-safe file writes: a temporary file beside the target, fsynced, then renamed."""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Any


def write_bytes(path: str | Path, data: bytes) -> None:
    """Replace ``path`` with ``data`` so a reader sees the old file or the new, never half."""
    target = Path(path)
    tmp = target.with_name(target.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, target)


def write_text(path: str | Path, text: str) -> None:
    write_bytes(path, text.encode("utf-8"))


def torch_save(obj: Any, path: str | Path) -> None:
    import torch  # lazily: the text writers must not pull torch in

    buf = io.BytesIO()
    torch.save(obj, buf)
    write_bytes(path, buf.getvalue())
