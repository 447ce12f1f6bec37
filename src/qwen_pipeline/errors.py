"""Errors a user can fix (bad data, bad configuration), shown as one clear message, not a traceback."""

from __future__ import annotations

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
