"""A local SQLite MLflow store whose artifact locations stay relative to the project, so a moved project keeps
its runs' artifacts and registered models."""

from __future__ import annotations

import logging
import sqlite3
from contextlib import closing
from pathlib import Path
from urllib.parse import unquote

from kedro.framework.hooks import hook_impl

logger = logging.getLogger(__name__)

# Where a SQL store keeps artifact locations (MLflow makes each one absolute when it creates it).
LOCATION_COLUMNS = (
    ("experiments", "artifact_location"),
    ("runs", "artifact_uri"),
    ("logged_models", "artifact_location"),
    ("model_versions", "storage_location"),
)


class PortableArtifactsHook:
    """After kedro-mlflow has opened the store (and created the experiment), rewrites the artifact locations a
    local SQLite store holds under the project folder as paths relative to it, before this run creates its own:
    MLflow then reads and writes them relative to the working directory (the project folder, where
    ``kedro run`` is started), so a project moved or copied elsewhere keeps its runs' artifacts and registered
    models. Started from another folder, the run leaves the store as it is and says so."""

    @hook_impl(trylast=True)  # after kedro-mlflow's after_context_created
    def after_context_created(self, context) -> None:
        config = getattr(context, "mlflow", None)
        project = Path(context.project_path)
        database = sqlite_database(config.server.mlflow_tracking_uri if config else None, project)
        if database is None or not database.is_file():
            return
        if Path.cwd().resolve() != project.resolve():
            logger.warning(
                "Running from %s, not the project folder %s: MLflow reads the store's artifact locations "
                "relative to the working directory; run kedro from the project folder", Path.cwd(), project,
            )  # fmt: skip
            return
        changed = relative_artifact_locations(database, project)
        if changed:
            logger.info("MLflow store %s: %d artifact locations made relative to the project", database, changed)


def sqlite_database(uri: str | None, project: Path) -> Path | None:
    """The file behind a ``sqlite:///`` tracking URI (a relative one is relative to the project); else None."""
    if not uri or not uri.startswith("sqlite:///"):
        return None
    path = Path(unquote(uri[len("sqlite:///") :].split("?", 1)[0]))  # sqlite:////abs.db is /abs.db
    return path if path.is_absolute() else project / path


def relative_artifact_locations(database: Path, project: Path) -> int:
    """Strips the project folder (as a path or a file: URI) from every stored artifact location under it.
    Returns the number of locations changed."""
    roots = {str(project.absolute()), str(project.resolve())}
    prefixes = sorted({f"{root}/" for root in roots} | {f"{Path(root).as_uri()}/" for root in roots}, key=len)
    changed = 0
    with closing(sqlite3.connect(database, timeout=60)) as connection, connection:
        for table, column in LOCATION_COLUMNS:
            for prefix in reversed(prefixes):  # longest first: file:///a/ before /a/
                try:
                    cursor = connection.execute(
                        f"UPDATE {table} SET {column} = substr({column}, ?) WHERE substr({column}, 1, ?) = ?",
                        (len(prefix) + 1, len(prefix), prefix),
                    )
                except sqlite3.OperationalError:  # a store from an MLflow without this table
                    break
                changed += max(cursor.rowcount, 0)
    return changed
