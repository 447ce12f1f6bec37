from kedro.pipeline import Node, Pipeline

from .nodes import tokenize_conversations


def create_pipeline(**kwargs) -> Pipeline:
    return Pipeline(
        [
            Node(
                func=tokenize_conversations,
                inputs=["conversations", "sft_dataset_previous", "base_model", "params:format", "params:processing"],
                outputs=["sft_dataset", "format_report", "dropped_records"],
                name="tokenize_conversations_node",
            )
        ]
    )
