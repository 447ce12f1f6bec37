from kedro.pipeline import Node, Pipeline

from .nodes import merge_adapter


def create_pipeline(**kwargs) -> Pipeline:
    return Pipeline(
        [
            Node(
                func=merge_adapter,
                inputs=["trained_model", "params:merge"],
                outputs=["merged_model", "merge_report"],
                name="merge_adapter_node",
            )
        ]
    )
