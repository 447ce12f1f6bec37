"""ModelDataset: save/load round trips, and an interrupted save never looks complete."""

from __future__ import annotations

import pytest
import torch

from qwen_pipeline.datasets import ModelBundle, ModelDataset
from qwen_pipeline.models import EMBEDDED_MODEL, load_causal_lm


@pytest.fixture(scope="module")
def bundle(embedded_dir, tokenizer):
    return ModelBundle(model=load_causal_lm(EMBEDDED_MODEL), tokenizer=tokenizer, base_model=EMBEDDED_MODEL)


def test_round_trip_keeps_weights_and_writes_manifest_last(tmp_path, bundle):
    dataset = ModelDataset(filepath=str(tmp_path / "model"), save_args={"max_shard_size": "20MB"})
    assert not dataset.exists()
    dataset.save(bundle)
    files = sorted(p.name for p in (tmp_path / "model").iterdir())
    assert "qwen_pipeline.json" in files and "tokenizer.json" in files
    assert "model.safetensors.index.json" in files  # 39 MB of weights in 20 MB shards
    assert len([f for f in files if f.endswith(".safetensors")]) == 2
    loaded = dataset.load()
    ids = torch.tensor([[151644, 872, 198, 6023]])
    with torch.no_grad():
        assert torch.equal(loaded.model(ids).logits, bundle.model(ids).logits)
    assert loaded.base_model == EMBEDDED_MODEL
    assert [p.name for p in tmp_path.iterdir()] == ["model"]  # no temporary siblings left


def test_interrupted_save_leaves_previous_version_and_no_partial(tmp_path, bundle):
    dataset = ModelDataset(filepath=str(tmp_path / "model"))
    dataset.save(bundle)

    class Exploding:
        def save_pretrained(self, path, **kwargs):
            (path / "model.safetensors").write_bytes(b"half")
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        dataset.save(ModelBundle(model=Exploding(), tokenizer=bundle.tokenizer, base_model="x"))
    assert [p.name for p in tmp_path.iterdir()] == ["model"]
    assert dataset.exists() and dataset.load().base_model == EMBEDDED_MODEL


def test_loading_an_incomplete_directory_fails_clearly(tmp_path):
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text("{}")
    with pytest.raises(Exception, match="no complete model here"):
        ModelDataset(filepath=str(tmp_path / "model")).load()


def test_kedro_viz_shows_no_folder_size_for_a_model(tmp_path, bundle):
    """kedro-viz sizes a dataset by its filepath attribute: a folder would show as 4KB (0 shows as N/A)."""
    from kedro_viz.integrations.kedro.hooks_utils import compute_size

    ModelDataset(filepath=str(tmp_path / "model")).save(bundle)
    dataset = ModelDataset(filepath=str(tmp_path / "model"))
    assert (tmp_path / "model").is_dir() and compute_size("model", {"model": dataset}) == 0
    assert dataset._describe()["filepath"] == str(tmp_path / "model")  # still shown as the dataset's path
