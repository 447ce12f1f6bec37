"""The console without libraries' noise: the warning filters of ``conf/warnings.yml``.

Applied when the package is imported: Kedro imports it (settings) before it loads its plugins,
whose imports raise some of those warnings.
"""

from __future__ import annotations

import builtins
import re
import warnings
from pathlib import Path

import yaml

FILTERS = Path("conf") / "warnings.yml"


def install(project: Path | None = None) -> None:
    """Apply the filters of ``<project>/conf/warnings.yml`` (project: the Kedro project above the
    current folder), if there is one."""
    if project is None:
        from kedro.utils import find_kedro_project

        project = find_kedro_project(Path.cwd())
    path = Path(project or ".") / FILTERS
    if not path.is_file():
        return
    ignored = []
    for entry in (yaml.safe_load(path.read_text()) or {}).get("filters", []):
        category = getattr(builtins, entry.get("category", "Warning"))
        message, module = entry.get("message", ""), entry.get("module", "")
        warnings.filterwarnings(entry["action"], message=message, category=category, module=module)
        if entry["action"] == "ignore" and message:
            ignored.append((re.compile(message, re.IGNORECASE), category))
    _drop_at_show(ignored)


def _drop_at_show(ignored: list[tuple[re.Pattern, type]]) -> None:
    """The same message filters where a warning is shown: MLflow shows some inside its own
    ``catch_warnings`` with a filter of its own ("once"), which no global filter can override."""
    show = warnings.showwarning
    if getattr(show, "_qwen_pipeline", False):
        return

    def showwarning(message, category, filename, lineno, file=None, line=None):
        if any(pattern.match(str(message)) and issubclass(category, kind) for pattern, kind in ignored):
            return
        show(message, category, filename, lineno, file, line)

    showwarning._qwen_pipeline = True
    warnings.showwarning = showwarning
