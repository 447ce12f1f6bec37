from kedro.pipeline import Node, Pipeline

from .nodes import train_model


def create_pipeline(**kwargs) -> Pipeline:
    return Pipeline(
        [
            Node(
                func=train_model,
                inputs=["sft_dataset", "base_model", "params:train"],
                outputs=["trained_model", "training_history", "training_summary", "training_metrics", "loss_plot"],
                name="train_model_node",
            )
        ]
    )
