"""Kedro settings for qwen_pipeline."""

from kedro.config import OmegaConfigLoader

from .quiet import LoggerLevelsHook, install_warning_filters
from .stale import StaleOutputsHook
from .summary import RunSummaryHook
from .tracking.run_names import RunNameHook
from .tracking.store import PortableArtifactsHook

# conf/warnings.yml's filters, now: Kedro reads these settings before it loads its plugins, whose imports
# raise some of those warnings (the training workers install them too: training/__main__.py).
install_warning_filters()

CONFIG_LOADER_CLASS = OmegaConfigLoader
CONFIG_LOADER_ARGS = {
    "base_env": "base",
    "default_run_env": "local",
    # conf/<env>/parameters*.yml and globals.yml override single keys, not whole top-level blocks.
    "merge_strategy": {"parameters": "soft", "globals": "soft"},
    "config_patterns": {"mlflow": ["mlflow*", "mlflow*/**"]},
}

# (Data and configuration errors print as one message naming the file, record and field: cli.py.) A run
# that ends well ends with its summary (MLflow run, outputs, counts, what to run next). A local MLflow store
# keeps its artifact locations relative to the project, so the project can be moved. Loggers keep the
# levels conf/logging.yml gives them, whatever the plugins set when they load. A run that fails marks
# the stage outputs it did not remake as stale, so none of them is later read as current. MLflow runs are
# named after their stages in run order.
HOOKS = (
    RunSummaryHook(),
    PortableArtifactsHook(),
    LoggerLevelsHook(),
    StaleOutputsHook(),
    RunNameHook(),
)
