from kedro.pipeline import Node, Pipeline

from .nodes import ingest_datasets


def create_pipeline(**kwargs) -> Pipeline:
    return Pipeline(
        [
            Node(
                func=ingest_datasets,
                inputs=["raw_datasets", "raw_conversations_previous", "params:ingest", "params:processing"],
                outputs=["raw_conversations", "ingest_report"],
                name="ingest_datasets_node",
            )
        ]
    )
