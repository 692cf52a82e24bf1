"""Cheap identities of input files, used in cache keys so a changed model invalidates its caches."""

from __future__ import annotations

from pathlib import Path


def file_identity(path: str | Path) -> str:
    """name, size and modification time of a file (or a folder's config files); never reads the weights."""
    path = Path(path)
    if path.is_dir():
        parts = sorted(f"{p.relative_to(path)}:{p.stat().st_size}:{p.stat().st_mtime_ns}" for p in path.rglob("*") if p.is_file())
        return f"{path.name}[{';'.join(parts)}]"
    stat = path.stat()
    return f"{path.name}:{stat.st_size}:{stat.st_mtime_ns}"
