"""Errors a user can fix (bad data, bad configuration), shown as one clear message, not a traceback."""

from __future__ import annotations

import os
import sys

from kedro.framework.hooks import hook_impl
from kedro.io import DatasetError


class QwenPipelineError(Exception):
    """Base of the errors whose message says everything the user needs."""


class DataError(QwenPipelineError, ValueError):
    """Input data that cannot be used: names the file, dataset, record and field."""


class DataSourceError(QwenPipelineError, DatasetError):
    """A dataset_info.json entry or data file that cannot be read."""


def user_error(error: BaseException | None) -> QwenPipelineError | None:
    """The first user-facing error in an exception's cause/context chain."""
    seen = set()
    while error is not None and id(error) not in seen:
        if isinstance(error, QwenPipelineError):
            return error
        seen.add(id(error))
        error = error.__cause__ or error.__context__
    return None


class UserErrorHook:
    """Print user-facing errors as a short message; other errors keep Kedro's full traceback.

    Installed after the context is created, so it wraps the traceback printer Kedro's
    logging set up. ``QWEN_PIPELINE_TRACEBACK=1`` shows the full traceback anyway.
    """

    @hook_impl
    def after_context_created(self, context) -> None:
        previous = sys.excepthook

        def excepthook(kind, value, traceback):
            found = user_error(value)
            if found is None or os.environ.get("QWEN_PIPELINE_TRACEBACK"):
                previous(kind, value, traceback)
                return
            sys.stderr.write(f"\nError: {found}\n(set QWEN_PIPELINE_TRACEBACK=1 to see the full traceback)\n")

        sys.excepthook = excepthook
