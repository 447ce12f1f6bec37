"""Folder writes that never leave a half-written folder where a complete one is expected."""

from __future__ import annotations

import shutil
from pathlib import Path


def swap_into_place(tmp: Path, target: Path) -> None:
    """Put the finished folder ``tmp`` (a sibling of ``target``) at ``target``: the old one is renamed
    away first and removed last, so a reader finds the old folder or the new one, never a mix."""
    old = None
    if target.exists():
        old = target.with_name(f".{target.name}.old-{tmp.name.rsplit('-', 1)[-1]}")
        target.rename(old)
    tmp.rename(target)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
