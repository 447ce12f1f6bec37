"""qwen_pipeline: fine-tune Qwen2.5 chat models with Kedro, the LLaMA-Factory SFT way."""

__version__ = "0.1.0"
