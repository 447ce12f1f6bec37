"""Regenerate ``src/qwen_pipeline/resources/llamafactory_0.9.5_keys.json``: every argument LLaMA-Factory 0.9.5's
train and export parsers take (its ModelArguments, DataArguments, TrainingArguments, FinetuningArguments,
GeneratingArguments) and its default. Run with the Python of a venv that has llamafactory==0.9.5:

    /tmp/lfvenv/bin/python scripts/llamafactory_keys.py > src/qwen_pipeline/resources/llamafactory_0.9.5_keys.json
"""

import dataclasses
import enum
import json
import sys

from llamafactory.extras.env import VERSION
from llamafactory.hparams.parser import _TRAIN_ARGS


def plain(value):
    """A default as JSON has it (enums by value, anything else JSON lacks as its text)."""
    if isinstance(value, enum.Enum):
        return plain(value.value)
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    if isinstance(value, dict):
        return {str(k): plain(v) for k, v in value.items()}
    return str(value)


keys = {}
for cls in _TRAIN_ARGS:
    for field in dataclasses.fields(cls):
        if not field.init or field.name.startswith("_"):
            continue
        if field.default is not dataclasses.MISSING:
            default = field.default
        elif field.default_factory is not dataclasses.MISSING:
            default = field.default_factory()
        else:
            default = None
        keys.setdefault(field.name, plain(default))
if VERSION != "0.9.5":
    sys.exit(f"llamafactory {VERSION}: this list is of 0.9.5")
json.dump(dict(sorted(keys.items())), sys.stdout, indent=1)
sys.stdout.write("\n")
