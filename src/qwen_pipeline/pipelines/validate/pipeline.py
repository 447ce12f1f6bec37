from kedro.pipeline import Node, Pipeline

from .nodes import accept_conversations, validate_conversations


def create_pipeline(**kwargs) -> Pipeline:
    return Pipeline(
        [
            Node(
                func=validate_conversations,
                inputs=["raw_conversations", "conversations_previous", "params:validate", "params:processing"],
                outputs=["validated_conversations", "rejected_records", "validation_report", "validation_metrics"],
                name="validate_conversations_node",
            ),
            Node(  # a run with too many rejects stops here, its reports written
                func=accept_conversations,
                inputs=["validated_conversations", "params:validate"],
                outputs="conversations",
                name="accept_conversations_node",
            ),
        ]
    )
