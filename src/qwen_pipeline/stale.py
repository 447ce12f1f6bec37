"""Outputs a failed run did not remake are marked stale, so no later run reads them as current."""

from __future__ import annotations

import logging
from typing import Any

from kedro.framework.hooks import hook_impl

logger = logging.getLogger(__name__)


class StaleOutputsHook:
    """When a node fails, the stage outputs that it and the nodes after it in the run would have remade
    are marked stale: a later run (``kedro run --pipelines train`` after a validate that stopped) is told
    they are an earlier run's, instead of reading them as current."""

    def __init__(self) -> None:
        self._pipeline = None

    @hook_impl
    def before_pipeline_run(self, run_params: dict[str, Any], pipeline, catalog) -> None:
        self._pipeline = pipeline

    @hook_impl
    def on_node_error(self, error: Exception, node, catalog, inputs, is_async, run_id) -> None:
        if self._pipeline is None:
            return
        said = (str(error).strip().splitlines() or [type(error).__name__])[0].split(". ")[0]  # its first sentence
        reason = f"the last run stopped in {node.name} before remaking it ({said})"
        for name in sorted(self._pipeline.from_nodes(node.name).all_outputs()):
            mark_stale = getattr(catalog.get(name), "mark_stale", None)  # a StageDataset
            if mark_stale is not None and mark_stale(reason):
                logger.warning("%s is an earlier run's output: marked stale", name)
