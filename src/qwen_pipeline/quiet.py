"""The console without libraries' noise: the warning filters of ``conf/warnings.yml``, and the logger
levels of ``conf/logging.yml`` held against libraries that reset them.

The filters are installed by ``settings.py`` (Kedro reads it before it loads its plugins, whose imports
raise some of those warnings) and by the training workers.
"""

from __future__ import annotations

import builtins
import re
import warnings
from pathlib import Path

import yaml
from kedro.framework.hooks import hook_impl

FILTERS = Path("conf") / "warnings.yml"


def install_warning_filters(project: Path | None = None) -> None:
    """Apply the filters of ``<project>/conf/warnings.yml`` (project: the Kedro project above the
    current folder), if there is one."""
    if project is None:
        from kedro.utils import find_kedro_project

        project = find_kedro_project(Path.cwd())
    path = Path(project or ".") / FILTERS
    if not path.is_file():
        return
    rules = []
    for entry in (yaml.safe_load(path.read_text()) or {}).get("filters", []):
        category = getattr(builtins, entry.get("category", "Warning"))
        message, module = entry.get("message", ""), entry.get("module", "")
        warnings.filterwarnings(entry["action"], message=message, category=category, module=module)
        if entry["action"] == "ignore":
            text = re.compile(message, re.IGNORECASE) if message else None
            rules.append((text, category, re.compile(module) if module else None))
    _drop_at_show(rules)


def _module(filename: str) -> str:
    """The dotted module name of a source file under site-packages or src ("" if neither)."""
    parts = Path(filename).with_suffix("").parts
    for root in ("site-packages", "src"):
        if root in parts:
            return ".".join(parts[len(parts) - parts[::-1].index(root) :])
    return ""


def _drop_at_show(rules: list[tuple[re.Pattern | None, type, re.Pattern | None]]) -> None:
    """The same rules where a warning is shown. Filters alone do not hold: other libraries insert
    theirs ahead (torch, Kedro re-adding "default" for its deprecations), and MLflow shows some
    warnings inside its own ``catch_warnings`` with a filter of its own."""
    show = warnings.showwarning
    if getattr(show, "_qwen_pipeline", False):
        return

    def showwarning(message, category, filename, lineno, file=None, line=None):
        module = _module(filename)
        for pattern, kind, where in rules:
            if issubclass(category, kind) and (pattern is None or pattern.match(str(message))):
                if where is None or where.match(module):
                    return
        show(message, category, filename, lineno, file, line)

    showwarning._qwen_pipeline = True
    warnings.showwarning = showwarning


class LoggerLevelsHook:
    """Re-applies the logger levels of the project's logging configuration once the plugins are loaded:
    kedro-mlflow sets its logger to INFO when imported, and MLflow configures its own loggers (its own
    handler and level) when it is first imported, both after Kedro read conf/logging.yml."""

    @hook_impl(tryfirst=True)  # before kedro-mlflow's hook opens the store (MLflow's "Creating tables")
    def after_context_created(self, context) -> None:
        import logging

        from kedro.framework.project import LOGGING

        for name, config in (LOGGING.data.get("loggers") or {}).items():
            if "level" in (config or {}):
                logging.getLogger(name).setLevel(config["level"])
