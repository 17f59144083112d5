"""The one home of atomic writes: every file fastcp writes goes through here.

A file is written to a temporary name in its own folder, flushed, and renamed over the target
(``os.replace`` is atomic on POSIX and Windows), so a run killed at any moment leaves either the
old file or the new one, never half of one.
"""
from __future__ import annotations

import json
import math
import os
import tempfile
from pathlib import Path

import numpy as np
import torch


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def images_to_uint8(images: torch.Tensor) -> np.ndarray:
    """Images [B, 3, H, W] in [-1, 1] (any device/dtype) -> uint8 pixels [B, H, W, 3], as PNGs hold them."""
    return ((images.detach().float().clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).cpu().numpy()


def atomic_write_png(path: str | os.PathLike, pixels) -> None:
    """One image (a PIL image, or uint8 pixels [H, W, 3] from ``images_to_uint8``) as a PNG."""
    import io

    from PIL import Image

    image = pixels if isinstance(pixels, Image.Image) else Image.fromarray(pixels)
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    atomic_write_bytes(path, buf.getvalue())


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def json_safe(obj):
    """JSON-safe copy: NaN/inf -> None, tensors/np scalars -> Python numbers, paths -> str."""
    if isinstance(obj, dict):
        return {str(k): json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    if isinstance(obj, (np.floating, np.integer)):
        obj = obj.item()
    if isinstance(obj, torch.Tensor):
        return json_safe(obj.tolist())
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, os.PathLike):
        return str(obj)
    return obj


def atomic_write_json(path: str | os.PathLike, obj) -> None:
    atomic_write_bytes(path, (json.dumps(json_safe(obj), indent=2) + "\n").encode())


def atomic_save_safetensors(tensors: dict[str, torch.Tensor], path: str | os.PathLike,
                            metadata: dict[str, str] | None = None) -> None:
    """``safetensors.torch.save_file`` through a temporary file (tensors made contiguous, on CPU)."""
    from safetensors.torch import save

    data = save({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, metadata=metadata)
    atomic_write_bytes(path, data)


def _exchange(a: Path, b: Path) -> bool:
    """Swap two existing paths in one step (Linux ``renameat2(RENAME_EXCHANGE)``); False where
    the call is unavailable (another OS, an old kernel or C library, a file system without it)."""
    import ctypes
    import sys

    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    return renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0


class atomic_dir:
    """Fill a folder under a temporary name, then put it in place of ``target`` in one step.

        with atomic_dir(run / "model") as tmp:
            write_everything_into(tmp)

    On success the filled folder replaces ``target`` (an existing one is swapped out with
    ``RENAME_EXCHANGE`` where Linux offers it, so ``target`` is always either the old folder or the
    new one; elsewhere the old folder is renamed aside first, which leaves a moment with no
    ``target``, never a half-filled one). On an exception the temporary folder is removed and
    ``target`` is untouched.
    """

    def __init__(self, target: str | os.PathLike):
        self.target = Path(target)

    def __enter__(self) -> Path:
        self.target.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = Path(tempfile.mkdtemp(dir=self.target.parent, prefix=f".{self.target.name}.", suffix=".tmp"))
        return self.tmp

    def __exit__(self, exc_type, exc, tb) -> None:
        import shutil

        if exc_type is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            return
        if not self.target.exists():
            os.replace(self.tmp, self.target)
            return
        if _exchange(self.tmp, self.target):  # tmp now holds the old folder
            shutil.rmtree(self.tmp, ignore_errors=True)
            return
        old = Path(tempfile.mkdtemp(dir=self.target.parent, prefix=f".{self.target.name}.", suffix=".old"))
        os.replace(self.target, old / "x")
        os.replace(self.tmp, self.target)
        shutil.rmtree(old, ignore_errors=True)
