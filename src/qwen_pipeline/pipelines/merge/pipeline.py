from kedro.pipeline import Node, Pipeline

from .nodes import check_merged_model, merge_adapter, merge_check_metrics, publish_merged_model


def create_pipeline(**kwargs) -> Pipeline:
    return Pipeline(
        [
            Node(
                func=merge_adapter,
                inputs=["trained_model", "base_model", "params:merge"],
                outputs="merge_staged",
                name="merge_adapter_node",
            ),
            Node(
                func=check_merged_model,
                inputs=["merge_staged", "params:merge"],
                outputs="merge_report",
                name="check_merged_model_node",
            ),
            Node(
                func=merge_check_metrics,
                inputs="merge_report",
                outputs="merge_check_metrics",
                name="merge_check_metrics_node",
            ),
            Node(
                func=publish_merged_model,
                inputs=["merge_staged", "merge_report"],
                outputs="merged_model",
                name="publish_merged_model_node",
            ),
        ]
    )
