"""Fingerprints of a data stage's inputs: equal fingerprints, equal outputs, so a rerun reuses them."""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
from pathlib import Path
from typing import Any

PACKAGE = Path(__file__).resolve().parents[1]
# The code that decides what the data stages write: any change to it makes new fingerprints.
CODE = (
    "data",
    "template.py",
    "control_tokens.py",
    "conversation.py",
    "pipelines/ingest",
    "pipelines/validate",
    "pipelines/format",
)


@functools.cache
def code_version() -> str:
    digest = hashlib.sha256()
    for name in CODE:
        path = PACKAGE / name
        for file in sorted(path.rglob("*.py")) if path.is_dir() else [path]:
            digest.update(str(file.relative_to(PACKAGE)).encode() + b"\0" + file.read_bytes())
    return digest.hexdigest()


def stage_fingerprint(stage: str, *inputs: Any) -> str:
    """Hash of a stage's name, the code version and its inputs (dataclass configs, strings, lists...)."""
    parts = [dataclasses.asdict(x) if dataclasses.is_dataclass(x) else x for x in inputs]
    text = json.dumps([stage, code_version(), parts], sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()
