"""MLflow at the edge of semlab: the pretraining reporter, linked evaluation runs, the store
choice (with a local fallback when a server is down), syncing and comparison charts.

``mlflow`` itself is imported lazily, so ``import semlab.tracking`` stays cheap.
"""

from semlab.tracking.mlflow_reporter import MLflowReporter, run_tags
from semlab.tracking.runs import RUN_RECORD, RunLogger, find_run_record, read_run_record
from semlab.tracking.store import (
    TrackingTarget,
    TrackingUnavailableWarning,
    check_reachable,
    default_store,
    redact_uri,
    resolve_tracking,
)

__all__ = [
    "RUN_RECORD",
    "MLflowReporter",
    "RunLogger",
    "TrackingTarget",
    "TrackingUnavailableWarning",
    "check_reachable",
    "default_store",
    "find_run_record",
    "read_run_record",
    "redact_uri",
    "resolve_tracking",
    "run_tags",
]
