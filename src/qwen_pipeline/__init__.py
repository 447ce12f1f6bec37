"""qwen_pipeline: fine-tune Qwen2.5 chat models with Kedro, the LLaMA-Factory SFT way."""

__version__ = "0.1.0"


def _quiet() -> None:
    from .quiet import install

    try:
        install()
    except Exception:  # noqa: BLE001 - never stop an import over console filters
        pass


_quiet()
