from kedro.pipeline import Node, Pipeline

from .nodes import compare_evaluations, evaluate_base, evaluate_finetuned


def create_pipeline(**kwargs) -> Pipeline:
    return Pipeline(
        [
            Node(
                func=evaluate_finetuned,
                inputs=["merged_model", "sft_dataset", "params:evaluate"],
                outputs=["finetuned_eval", "predictions"],
                name="evaluate_finetuned_node",
            ),
            Node(
                func=evaluate_base,
                inputs=["base_model", "merged_model", "sft_dataset", "params:evaluate"],
                outputs=["base_eval", "base_predictions"],
                name="evaluate_base_node",
            ),
            Node(
                func=compare_evaluations,
                inputs=["base_eval", "finetuned_eval"],
                outputs=["eval_metrics", "eval_comparison", "eval_report"],
                name="compare_evaluations_node",
            ),
        ]
    )
