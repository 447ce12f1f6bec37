"""End to end, as a user runs it: `kedro run --pipeline sft`, then `merge`, then `evaluate`, on a copy of the project.

Slow (about three minutes on 2 CPU cores): runs kedro in subprocesses on the demo data.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import copy_project, max_relative_logit_diff

PROJECT_ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.slow


def kedro(root: Path, *args: str, cache: Path) -> str:
    env = {
        **os.environ,
        "QWEN_PIPELINE_CACHE": str(cache),
        "KEDRO_DISABLE_TELEMETRY": "true",
        "DO_NOT_TRACK": "1",
        "COLUMNS": "200",
    }
    proc = subprocess.run(
        [sys.executable, "-m", "kedro", *args], cwd=root, env=env, capture_output=True, text=True, timeout=900
    )
    assert proc.returncode == 0, proc.stdout[-5000:] + proc.stderr[-5000:]
    return proc.stdout + proc.stderr


@pytest.fixture(scope="module")
def project(tmp_path_factory, model_cache):
    root = copy_project(tmp_path_factory.mktemp("project"))
    logs = {"sft": kedro(root, "run", "--pipeline", "sft", cache=model_cache)}
    logs["merge"] = kedro(root, "run", "--pipeline", "merge", cache=model_cache)
    logs["evaluate"] = kedro(root, "run", "--pipeline", "evaluate", cache=model_cache)
    return root, logs


def test_console_is_quiet_and_each_run_ends_with_its_summary(project):
    root, logs = project
    for name, log in logs.items():
        assert "\x1b[" not in log, name  # no colour codes when not a terminal
        for noise in ("DeprecationWarning", "FutureWarning", "UserWarning", "Traceback", "{'loss'"):
            assert noise not in log, (name, noise)
    sft = logs["sft"].split("INFO Run summary\n", 1)[1].splitlines()
    assert sft[0].startswith("  finished in ") and sft[1].startswith("  MLflow run ")
    assert (
        "(sft): mlflow ui --backend-store-uri sqlite:///mlflow.db, then http://127.0.0.1:5000/#/experiments/" in sft[1]
    )
    assert sft[2].startswith("  records: 362 read, 360 kept, 2 rejected (") and "rejected_records.json" in sft[2]
    assert sft[3].startswith("  examples: 360 (22816 tokens, 5103 learned; train 324, validation 36), 0 dropped")
    assert sft[4].startswith("  training: 41 steps, loss ") and sft[4].endswith("data/06_models/trained")
    assert re.fullmatch(r"  memory: planned [\d.]+ GiB per device of [\d.]+ free, peak seen [\d.]+ GiB", sft[5]), sft[5]
    assert sft[6:] == ["  next: kedro run --pipelines merge"]
    steps = [line.split(" INFO step ")[1].split(":")[0] for line in logs["sft"].splitlines() if " INFO step " in line]
    assert steps == [f"{n}/41" for n in (*range(4, 41, 4), 41)]  # every 4th step and the last, not each step
    merge = logs["merge"].split("INFO Run summary\n", 1)[1]
    assert "  merge: check passed (max |logit diff| " in merge and "next: kedro run --pipelines evaluate" in merge
    evaluate = logs["evaluate"].split("INFO Run summary\n", 1)[1]
    assert "  evaluation (base -> fine-tuned): eval_loss " in evaluate


def test_training_lowers_the_loss(project):
    root, _ = project
    summary = json.loads((root / "data/08_reporting/training_summary.json").read_text())
    assert (root / "data/08_reporting/training_loss.png").read_bytes()[:4] == b"\x89PNG"
    assert summary["global_steps"] == 41  # 324 training examples, batch 8, one epoch
    assert summary["last_loss"] < summary["first_loss"] - 2.0, summary


def test_adapter_loads_with_peft_and_merged_logits_match(project):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from qwen_pipeline.models import EMBEDDED_MODEL, load_causal_lm

    root, _ = project
    adapter = PeftModel.from_pretrained(load_causal_lm(EMBEDDED_MODEL), root / "data/06_models/trained").eval()
    merged = AutoModelForCausalLM.from_pretrained(root / "data/06_models/merged", dtype=torch.float32).eval()
    ids = torch.tensor([[151644, 872, 198, 3838, 374, 220, 17, 5519, 220, 18, 30, 151645, 198, 151644, 77091, 198]])
    with torch.no_grad():
        base_plus_adapter, merged_logits = adapter(ids).logits, merged(ids).logits
    assert max_relative_logit_diff(base_plus_adapter, merged_logits) < 1e-4
    # the adapter did change the model
    with torch.no_grad(), adapter.disable_adapter():
        assert float((adapter(ids).logits - merged_logits).abs().max()) > 1e-2
    report = json.loads((root / "data/08_reporting/merge_report.json").read_text())
    assert report["method"] == "streamed" and report["export_dtype"] == "float32"
    assert report["check"]["passed"] and report["check"]["max_abs_logit_diff"] <= report["check"]["tolerance"]
    assert not list((root / "data/06_models").glob(".merge-staging-*"))
    files = {p.name for p in (root / "data/06_models/merged").iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "generation_config.json"} <= files
    generation = json.loads((root / "data/06_models/merged/generation_config.json").read_text())
    assert 151645 in generation["eos_token_id"]


def test_mlflow_holds_parameters_loss_history_and_merged_model(project, monkeypatch):
    from mlflow.tracking import MlflowClient

    root, _ = project
    monkeypatch.chdir(root)  # the store's artifact locations are relative to the project
    client = MlflowClient(tracking_uri="sqlite:///mlflow.db")
    experiment = client.get_experiment_by_name("qwen_pipeline")
    runs = {r.info.run_name: r for r in client.search_runs([experiment.experiment_id])}
    assert set(runs) == {"sft", "merge", "evaluate"}
    sft = runs["sft"]
    assert sft.data.params["train.learning_rate"] == "0.005"
    assert sft.data.tags["runner"] == "SequentialRunner"  # not the object's repr
    assert sft.data.params["format.cutoff_len"] == "512"
    assert sft.data.params["model.model_name_or_path"] == "embedded:tiny-qwen2.5"
    history = client.get_metric_history(sft.info.run_id, "train/loss")  # logged live, step by step
    assert len(history) == 41 and sorted(m.step for m in history) == list(range(1, 42))
    assert history[-1].value < history[0].value
    assert sft.data.metrics["validate.rejected"] == 2.0
    assert len(client.get_metric_history(sft.info.run_id, "train/learning_rate")) == 41
    assert len(client.get_metric_history(sft.info.run_id, "train/grad_norm")) == 41
    assert len(client.get_metric_history(sft.info.run_id, "train/tokens_per_s")) == 41
    assert sft.data.metrics["train_summary.tokens_per_second"] > 0
    assert not {"train_loss", "train.learning_rate"} & set(sft.data.metrics)  # one name per curve
    assert "training_loss.png" in {a.path for a in client.list_artifacts(sft.info.run_id)}
    merge = runs["merge"]
    assert merge.data.metrics["merge_check.passed"] == 1.0 and merge.data.metrics["merge_check.top1_agreement"] == 1.0
    assert 0 < merge.data.metrics["merge_check.max_abs_logit_diff"] <= merge.data.metrics["merge_check.tolerance"]
    assert merge.data.params["merge.export_size"] == "5" and merge.data.params["merge.export_dtype"] == "auto"
    trained = json.loads((root / "data/06_models/trained/qwen_pipeline.json").read_text())
    assert trained["mlflow_run_id"] == sft.info.run_id and len(trained["data_fingerprint"]) == 64
    lineage = {
        "base_model": "embedded:tiny-qwen2.5",
        "adapter": str(root / "data/06_models/trained"),
        "data_fingerprint": trained["data_fingerprint"],
        "train_run_id": sft.info.run_id,
        "finetuning_type": "lora",
        "export_dtype": "float32",
    }
    assert {k: merge.data.tags.get(k) for k in lineage} == lineage
    version = client.get_model_version_by_alias("qwen_pipeline_merged", "candidate")
    assert version.run_id == merge.info.run_id and str(version.version) == "1"
    assert {k: version.tags.get(k) for k in lineage} == lineage
    assert "merged_model_manifest.json" in {a.path for a in client.list_artifacts(merge.info.run_id)}


def test_registered_model_loads_and_answers(project, monkeypatch):
    import mlflow

    root, _ = project
    monkeypatch.chdir(root)  # artifact locations are relative to the project
    mlflow.set_tracking_uri("sqlite:///mlflow.db")
    from qwen_pipeline.models import load_tokenizer

    model = mlflow.pyfunc.load_model("models:/qwen_pipeline_merged@candidate")
    conversations = [[{"role": "user", "content": "What is 2 + 3?"}], [{"role": "user", "content": "你好"}]]
    answer = model.predict([{"messages": c} for c in conversations], params={"max_tokens": 4})
    tokenizer = load_tokenizer(str(root / "data/06_models/merged"))
    texts = [choice["message"]["content"] for choice in answer["choices"]]
    assert len(texts) == 2 and all(len(tokenizer(t)["input_ids"]) <= 4 for t in texts), answer
    assert 2 <= answer["usage"]["completion_tokens"] <= 8, answer
    requirements = Path(mlflow.pyfunc.get_model_dependencies("models:/qwen_pipeline_merged@candidate")).read_text()
    pins = [line for line in requirements.split() if line.startswith(("torch==", "transformers==", "mlflow=="))]
    assert len(pins) == 3 and not [pin for pin in pins if "+" in pin], requirements  # installable elsewhere
    weights = Path(model.unwrap_python_model().model.name_or_path)
    exported = root / "data/06_models/merged/model.safetensors"
    assert (weights / "model.safetensors").read_bytes() == exported.read_bytes()


def test_registered_weights_are_hard_links_to_the_export(project, monkeypatch):
    from mlflow.tracking import MlflowClient

    root, logs = project
    manifest = json.loads((root / "data/06_models/merged/qwen_pipeline.json").read_text())
    registration = manifest["mlflow_model"]
    assert registration["registered_model_name"] == "qwen_pipeline_merged" and registration["version"] == "1"
    assert registration["model_uri"] == "models:/qwen_pipeline_merged/1" and registration["alias"] == "candidate"
    monkeypatch.chdir(root)  # the store's artifact locations are relative to the project
    client = MlflowClient(tracking_uri="sqlite:///mlflow.db")
    location = client.get_logged_model(registration["model_id"]).artifact_location
    assert not Path(location).is_absolute()  # relative to the project
    exported = root / "data/06_models/merged/model.safetensors"
    stored = root / location / "artifacts/merged/model.safetensors"  # artifacts/<exported folder>
    assert stored.stat().st_ino == exported.stat().st_ino and exported.stat().st_nlink == 2  # one file, two names
    assert registration["bytes_linked"] == exported.stat().st_size
    copied = [f for f in stored.parent.iterdir() if f.name != "model.safetensors"]  # tokenizer, config, manifest
    assert len(copied) >= 5 and registration["bytes_copied"] == sum(f.stat().st_size for f in copied)
    merge = client.get_run(registration["run_id"])
    assert merge.data.metrics["model_store.bytes_linked"] == registration["bytes_linked"]
    assert merge.data.metrics["model_store.bytes_copied"] == registration["bytes_copied"]
    summary = logs["merge"].split("INFO Run summary\n", 1)[1]
    assert "  registered: models:/qwen_pipeline_merged/1 (@candidate), " in summary
    assert f"{registration['bytes_linked'] / 1e6:.1f} MB hard-linked" in summary


def test_fine_tuned_beats_base_on_eval_loss_in_the_comparison(project, monkeypatch):
    import pandas as pd
    from mlflow.tracking import MlflowClient

    root, logs = project
    table = pd.read_csv(root / "data/08_reporting/eval_comparison.csv").set_index("metric")
    assert list(table.index) == ["eval_loss", "perplexity", "bleu-4", "rouge-1", "rouge-2", "rouge-l"]
    assert table.loc["eval_loss", "finetuned"] < table.loc["eval_loss", "base"] - 2.0
    assert table.loc["eval_loss", "better"] == table.loc["perplexity", "better"] == "finetuned"
    assert "Base vs fine-tuned on the validation split" in logs["evaluate"]
    predictions = pd.read_json(root / "data/07_model_output/generated_predictions.jsonl", lines=True)
    base_predictions = pd.read_json(root / "data/07_model_output/base_predictions.jsonl", lines=True)
    assert list(predictions.columns) == ["prompt", "predict", "label"] and len(predictions) == 36  # 10% of 360
    assert list(base_predictions["prompt"]) == list(predictions["prompt"])
    assert predictions["prompt"].str.endswith("<|im_start|>assistant\n").all()
    monkeypatch.chdir(root)  # the store's artifact locations are relative to the project
    client = MlflowClient(tracking_uri="sqlite:///mlflow.db")
    experiment = client.get_experiment_by_name("qwen_pipeline")
    (run,) = client.search_runs([experiment.experiment_id], "tags.`mlflow.runName` = 'evaluate'")
    metrics = run.data.metrics
    assert metrics["eval.finetuned.eval_loss"] == pytest.approx(table.loc["eval_loss", "finetuned"])
    assert metrics["eval.base.eval_loss"] == pytest.approx(table.loc["eval_loss", "base"])
    assert {f"eval.{m}.bleu-4" for m in ("base", "finetuned")} <= set(metrics)
    assert "eval_comparison.csv" in {a.path for a in client.list_artifacts(run.info.run_id)}
    # the run names the model version it evaluated, and the version carries the run's metrics
    assert run.data.tags["model_version"] == "1" and run.data.tags["model_name"] == "qwen_pipeline_merged"
    assert run.data.tags["model_uri"] == "models:/qwen_pipeline_merged/1"
    version = client.get_model_version("qwen_pipeline_merged", "1")
    assert version.tags["eval_run_id"] == run.info.run_id
    assert float(version.tags["eval.finetuned.eval_loss"]) == pytest.approx(metrics["eval.finetuned.eval_loss"])
    model_id = version.source.removeprefix("models:/")
    on_model = {m.key: m.value for m in client.get_logged_model(model_id).metrics if m.run_id == run.info.run_id}
    assert on_model == {k: v for k, v in metrics.items() if k.startswith("eval.")}
    assert "  evaluated: models:/qwen_pipeline_merged/1 (" in logs["evaluate"]


def test_rejected_records_and_counts_are_logged(project):
    root, logs = project
    assert "Validated 362 records: 360 kept, 2 rejected" in logs["sft"]
    rejected = json.loads((root / "data/08_reporting/rejected_records.json").read_text())
    assert [(r["file"], r["index"], r["reason"]) for r in rejected] == [
        ("alpaca_demo.json", 17, "missing column 'output'"),
        ("sharegpt_demo.json", 9, "message 1: role 'user' where an answer (assistant/function) was expected"),
    ]


def test_viz_build_shows_the_lineage(project, model_cache):
    root, _ = project
    kedro(root, "viz", "build", cache=model_cache)
    graph = json.loads((root / "build/api/main").read_text())
    names = {n["id"]: n["name"] for n in graph["nodes"]}
    edges = {(names[e["source"]], names[e["target"]]) for e in graph["edges"]}
    chain = [
        "raw_datasets",
        "ingest_datasets_node",
        "raw_conversations",
        "validate_conversations_node",
        "validated_conversations",
        "accept_conversations_node",
        "conversations",
        "tokenize_conversations_node",
        "sft_dataset",
        "train_model_node",
        "trained_model",
        "merge_adapter_node",
        "merge_staged",
        "check_merged_model_node",
        "merge_report",
        "publish_merged_model_node",
        "merged_model",
        "evaluate_finetuned_node",
        "finetuned_eval",
        "compare_evaluations_node",
        "eval_comparison",
    ]
    assert all(step in edges for step in zip(chain, chain[1:])), set(zip(chain, chain[1:])) - edges
    # The base model is a dataset feeding the four stages that use it: base -> trained -> merged -> evaluation.
    fed = {target for source, target in edges if source == "base_model"}
    assert fed == {"tokenize_conversations_node", "train_model_node", "merge_adapter_node", "evaluate_base_node"}
    (base,) = [n for n in graph["nodes"] if n["name"] == "base_model"]
    assert (base["type"], base["layer"]) == ("data", "raw")
    layers = ["raw", "intermediate", "primary", "models", "model_output", "reporting"]
    assert graph["layers"] == layers  # enabled: no dataset of a later layer feeds an earlier one
    for path in sorted((root / "build/api/pipelines").iterdir()):
        pipeline = json.loads(path.read_text())
        assert pipeline["layers"], path.name  # enabled on every pipeline
        layer = {n["id"]: n.get("layer") for n in pipeline["nodes"]}
        into = {}
        for edge in pipeline["edges"]:
            into.setdefault(edge["target"], []).append(edge["source"])
        for edge in pipeline["edges"]:  # every dataset -> node -> dataset step keeps the layers' order
            for source in into.get(edge["source"], []):
                if layer.get(source) and layer.get(edge["target"]):
                    assert layers.index(layer[source]) <= layers.index(layer[edge["target"]]), (path.name, edge)
    sft = json.loads((root / "build/api/pipelines/sft").read_text())
    sft_tasks = {n["name"] for n in sft["nodes"] if n["type"] == "task" and "sft" in n["pipelines"]}
    assert sft_tasks == {
        "ingest_datasets_node",
        "validate_conversations_node",
        "accept_conversations_node",
        "tokenize_conversations_node",
        "train_model_node",
    }


def test_a_moved_project_keeps_its_runs_and_models(project, model_cache, tmp_path, monkeypatch):
    """MLflow's store holds artifact locations relative to the project: a copy works with the original gone."""
    import shutil
    import sqlite3

    import mlflow

    root, _ = project
    stored = sqlite3.connect(root / "mlflow.db").execute(
        "SELECT artifact_location FROM experiments UNION ALL SELECT artifact_uri FROM runs "
        "UNION ALL SELECT artifact_location FROM logged_models UNION ALL SELECT storage_location FROM model_versions"
    )
    locations = [row[0] for row in stored]
    assert len(locations) >= 6 and not [loc for loc in locations if loc.startswith(("/", "file:"))], locations
    moved = tmp_path / "moved"
    shutil.copytree(root, moved, symlinks=True)
    hidden = root.with_name(root.name + "-away")
    root.rename(hidden)  # nothing may still point into the original folder
    try:
        kedro(moved, "run", "--pipelines", "ingest", cache=model_cache)
        monkeypatch.chdir(moved)  # artifact locations are relative to it
        mlflow.set_tracking_uri(f"sqlite:///{moved / 'mlflow.db'}")  # (MLflow caches a store per URI string)
        model = mlflow.pyfunc.load_model("models:/qwen_pipeline_merged@candidate")
        assert len(model.predict({"prompt": "hi"}, params={"max_tokens": 2})["choices"]) == 1
        client = mlflow.MlflowClient()
        runs = client.search_runs([client.get_experiment_by_name("qwen_pipeline").experiment_id])
        by_name = {r.info.run_name: r for r in runs}
        latest, sft = by_name["ingest"], by_name["sft"]  # the run made in the moved copy, and one made before
        assert not Path(latest.info.artifact_uri).is_absolute()
        assert (moved / latest.info.artifact_uri / "ingest_report.json").is_file()  # written in the copy
        report = mlflow.artifacts.download_artifacts(run_id=sft.info.run_id, artifact_path="validation_report.json")
        assert json.loads(Path(report).read_text())["kept"] == 360  # an artifact of a run made before the move
    finally:
        hidden.rename(root)


def test_data_stages_rerun_with_nothing_changed_reuses_their_outputs(project, model_cache):
    """Last in this file: it adds a run to the MLflow store the other tests count."""
    root, _ = project
    stored = {p: p.stat().st_mtime_ns for p in (root / "data").rglob("*.arrow")}
    log = kedro(root, "run", "--pipelines", "ingest,validate,format", cache=model_cache)
    assert "Ingest: datasets and parameters unchanged, reusing 362 records" in log
    assert "Validate: records and parameters unchanged, reusing 360 conversations" in log
    assert "Format: conversations, parameters and tokenizer unchanged, reusing the tokenized dataset" in log
    for report in ("ingest_report", "validation_report", "format_report"):
        assert json.loads((root / f"data/08_reporting/{report}.json").read_text())["reused"] is True
    assert {p: p.stat().st_mtime_ns for p in (root / "data").rglob("*.arrow")} == stored  # nothing rewritten
    rejected = json.loads((root / "data/08_reporting/rejected_records.json").read_text())
    assert [(r["file"], r["index"]) for r in rejected] == [("alpaca_demo.json", 17), ("sharegpt_demo.json", 9)]


@pytest.mark.parametrize("stage", ["zero2", "zero3"])
def test_deepspeed_in_the_default_one_process_trains(project, model_cache, stage):
    """The command a new user tries first (nproc_per_node: 1, trained in-process): DeepSpeed used to look for MPI
    and fail with "No module named 'mpi4py'"; now the one process is rank 0 of a world of 1."""
    root, _ = project
    log = kedro(
        root,
        "run",
        "--pipelines",
        "train",
        "--params",
        f"train.deepspeed=conf/base/deepspeed/{stage}.json,train.max_steps=1",
        cache=model_cache,
    )
    assert "mpi4py" not in log
    summary = json.loads((root / "data/08_reporting/training_summary.json").read_text())
    assert summary["global_steps"] == 1 and summary["first_loss"] > 0
    assert "Trained 1 steps" in log and "memory: planned" in log
