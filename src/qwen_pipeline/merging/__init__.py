"""Merging a LoRA / DoRA adapter into its base model tensor by tensor, and checking the result.

PEFT's ``merge_and_unload`` needs the whole model in memory, and ``save_pretrained`` then builds each
shard's bytes beside it. Here each base tensor is read, merged with its adapter pieces and written
straight into its shard file, so the merge holds one tensor (plus the small adapter) at a time. The
check runs base+adapter (PEFT's own forward) and then the merged files through a model skeleton whose
weights are read one block at a time (accelerate's offload hooks; tied embeddings once per pass), so it
too stays near one block.

- ``weights``: the weight files, read and written one tensor at a time;
- ``lora``: the adapter, and W + s·BA (DoRA: rescaled rows) for one tensor;
- ``check``: the logits of base+adapter against the merged files;
- ``export``: the whole export (weights, config, generation config, tokenizer files).
"""

from .check import CheckResult, check_export, compare_logits, default_tolerance, logits, offloaded_model
from .export import export_dtype, export_merged, resolve_device, special_token_ids, write_model_files
from .lora import Adapter, merged_tensor, read_adapter
from .weights import (
    SAFETENSORS_DTYPES,
    TORCH_DTYPES,
    TensorSpec,
    read_tensor,
    return_freed_memory,
    weight_index,
    write_weights,
)

__all__ = [
    "SAFETENSORS_DTYPES",
    "TORCH_DTYPES",
    "Adapter",
    "CheckResult",
    "TensorSpec",
    "check_export",
    "compare_logits",
    "default_tolerance",
    "export_dtype",
    "export_merged",
    "logits",
    "merged_tensor",
    "offloaded_model",
    "read_adapter",
    "read_tensor",
    "resolve_device",
    "return_freed_memory",
    "special_token_ids",
    "weight_index",
    "write_model_files",
    "write_weights",
]
