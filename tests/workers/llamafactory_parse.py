"""Run with the Python of a venv holding llamafactory==0.9.5: LLaMA-Factory's own argument parsing of a recipe, as
``llamafactory-cli train FILE`` (``train``) or ``llamafactory-cli export FILE`` (``export``) does it before loading
anything. Prints {"ok": true, "parsed": {key: value as parsed}} or {"ok": false, "error": ...}.

This machine has no bf16 GPU, which transformers' and LLaMA-Factory's checks of ``bf16: true`` refuse; the check
is answered as on a GPU host (the recipe is what is being checked, not this machine)."""

import json
import os
import sys

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["CUDA_VISIBLE_DEVICES"] = ""


def main(path: str, kind: str) -> dict:
    import llamafactory.hparams.parser as parser
    import transformers.training_args as hf_training_args
    from llamafactory.hparams import get_infer_args, get_ray_args, get_train_args, read_args

    hf_training_args.is_torch_bf16_gpu_available = parser.is_torch_bf16_gpu_available = lambda *a, **k: True
    sys.argv = [sys.argv[0], path]  # as `llamafactory-cli <kind> FILE` leaves it for read_args
    args = read_args(None)
    if kind == "train":
        get_ray_args(args)
        parsed = get_train_args(args)
    else:
        parsed = get_infer_args(args)
        if parsed[0].export_dir is None:  # what export_model checks before loading
            raise ValueError("Please specify `export_dir` to save model.")
    values = {}
    for group in parsed:
        for key in args:
            if hasattr(group, key):
                value = getattr(group, key)
                values[key] = value if isinstance(value, (str, int, float, bool, list, type(None))) else str(value)
    return values


if __name__ == "__main__":
    saved = os.dup(1)
    os.dup2(2, 1)  # LLaMA-Factory logs to stdout: keep it for the answer
    try:
        answer = {"ok": True, "parsed": main(*sys.argv[1:3])}
    except BaseException as error:  # noqa: BLE001 - the answer says what it was
        answer = {"ok": False, "error": f"{type(error).__name__}: {error}"}
    os.write(saved, json.dumps(answer, default=str).encode())
