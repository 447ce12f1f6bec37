from kedro.pipeline import Node, Pipeline

from .nodes import validate_conversations


def create_pipeline(**kwargs) -> Pipeline:
    return Pipeline(
        [
            Node(
                func=validate_conversations,
                inputs=["raw_conversations", "conversations_previous", "params:validate", "params:processing"],
                outputs=["conversations", "rejected_records", "validation_report", "validation_metrics"],
                name="validate_conversations_node",
            )
        ]
    )
