from kedro.pipeline import Node, Pipeline

from .nodes import evaluate_model


def create_pipeline(**kwargs) -> Pipeline:
    return Pipeline(
        [
            Node(
                func=evaluate_model,
                inputs=["merged_model", "sft_dataset", "params:evaluate"],
                outputs=["eval_metrics", "eval_report", "predictions"],
                name="evaluate_model_node",
            )
        ]
    )
