"""Outputs a failed run did not remake are marked stale, so no later run reads them as current."""

from __future__ import annotations

import logging
from typing import Any

from kedro.framework.hooks import hook_impl

logger = logging.getLogger(__name__)


class StaleOutputsHook:
    """When a run fails, every stage output of the run that it did not save (the failed node's, the nodes'
    after it, an output whose save broke off) is marked stale: a later run (``kedro run --pipelines train``
    after a validate that stopped) is told it is an earlier run's, instead of reading it as current."""

    def __init__(self) -> None:
        self._saved: set[str] = set()
        self._failed_node: str | None = None

    @hook_impl
    def before_pipeline_run(self, run_params: dict[str, Any], pipeline, catalog) -> None:
        self._saved, self._failed_node = set(), None

    @hook_impl
    def after_dataset_saved(self, dataset_name: str, data: Any, node) -> None:
        self._saved.add(dataset_name)

    @hook_impl
    def on_node_error(self, error: Exception, node, catalog, inputs, is_async, run_id) -> None:
        self._failed_node = node.name

    @hook_impl
    def on_pipeline_error(self, error: Exception, run_params: dict[str, Any], pipeline, catalog) -> None:
        said = (str(error).strip().splitlines() or [type(error).__name__])[0].split(". ")[0]  # its first sentence
        where = f" in {self._failed_node}" if self._failed_node else ""
        reason = f"the last run stopped{where} before remaking it ({said})"
        for name in sorted(pipeline.all_outputs() - self._saved):
            mark_stale = getattr(catalog.get(name), "mark_stale", None)  # a StageDataset
            if mark_stale is not None and mark_stale(reason):
                logger.warning("%s is an earlier run's output: marked stale", name)
