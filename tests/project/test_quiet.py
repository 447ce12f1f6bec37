"""conf/warnings.yml: libraries' notices dropped wherever they are shown; this package's warnings kept."""

from __future__ import annotations

import warnings
from pathlib import Path

from qwen_pipeline import quiet

ROOT = Path(__file__).resolve().parents[2]
SITE = "/venv/lib/python3.11/site-packages"


SEEN: list[str] = []


def shown(message, category, filename) -> str:
    SEEN.clear()
    warnings.showwarning(message, category, filename, 1)
    return "".join(SEEN)


def test_library_notices_are_dropped_where_shown_and_ours_are_not():
    saved = warnings.showwarning
    try:
        warnings.showwarning = lambda message, category, *_args, **_kw: SEEN.append(f"{category.__name__}: {message}")
        quiet.install_warning_filters(ROOT)
        # ahead of our filters (as torch and Kedro do): only the show-time rules can drop these
        warnings.simplefilter("default")
        notice = "Option '--pipeline' is deprecated"
        assert shown(DeprecationWarning(notice), DeprecationWarning, f"{SITE}/kedro/framework/cli/project.py") == ""
        assert shown(FutureWarning("x"), FutureWarning, f"{SITE}/transformers/modeling_utils.py") == ""
        hint = "\x1b[33mAdd type hints to the `predict` method to enable data validation"
        assert shown(UserWarning(hint), UserWarning, f"{SITE}/mlflow/pyfunc/utils/data_validation.py") == ""
        ours = shown(DeprecationWarning("ours"), DeprecationWarning, str(ROOT / "src/qwen_pipeline/config.py"))
        assert "DeprecationWarning: ours" in ours
        other = shown(UserWarning("a real problem"), UserWarning, f"{SITE}/torch/nn/modules/module.py")
        assert "UserWarning: a real problem" in other
    finally:
        warnings.showwarning = saved
        warnings.resetwarnings()


def test_module_names_from_paths():
    assert quiet._module(f"{SITE}/kedro/framework/cli/project.py") == "kedro.framework.cli.project"
    assert quiet._module("/work/main/src/qwen_pipeline/config.py") == "qwen_pipeline.config"
    assert quiet._module("/tmp/script.py") == ""
