"""Where MLflow records go: tracking-URI choice, reachability check, local fallback.

Resolution order for the tracking URI of a run whose outputs live in ``output_dir``:

1. ``cfg.mlflow.tracking_uri`` when set (explicit, and saved with the run's config);
2. the ``MLFLOW_TRACKING_URI`` environment variable;
3. semlab's default: a SQLite database beside the run directories,
   ``sqlite:///<output_dir>/../mlflow.db``, with artifacts in ``<output_dir>/../mlartifacts``.
   Runs whose output directories are siblings (``outputs/run_a``, ``outputs/run_b``, the trials
   of a sweep) share one store, so they compare in one table, and nothing depends on the current
   working directory (MLflow's own default, ``sqlite:///<cwd>/mlflow.db``, does).

A remote (``http(s)://``) store is checked with ``GET <uri>/health`` before a run starts. When it
does not answer, semlab warns and logs to a fallback SQLite store inside the run directory
(``<output_dir>/mlflow_fallback.db``, artifacts in ``<output_dir>/mlflow_fallback_artifacts``);
``semlab sync`` copies such a run to the intended server later.
"""

from __future__ import annotations

import base64
import dataclasses
import logging
import os
import urllib.error
import urllib.parse
import urllib.request
import warnings
from pathlib import Path
from typing import Any

from semlab.utils.redact import SECRET_KEY_RE, redact_text  # noqa: F401 (SECRET_KEY_RE re-exported)

logger = logging.getLogger(__name__)

DEFAULT_DB_NAME = "mlflow.db"
DEFAULT_ARTIFACT_DIR = "mlartifacts"
FALLBACK_DB_NAME = "mlflow_fallback.db"
FALLBACK_ARTIFACT_DIR = "mlflow_fallback_artifacts"
ENV_TRACKING_URI = "MLFLOW_TRACKING_URI"


class TrackingUnavailableWarning(UserWarning):
    """The configured MLflow tracking server did not answer; semlab logs to a local fallback store."""


@dataclasses.dataclass(frozen=True)
class TrackingTarget:
    """The store a run logs to.

    ``uri``: tracking URI in use; ``artifact_location``: artifact root for experiments semlab
    creates (None: let the server decide); ``source``: 'config' | 'env' | 'default' | 'fallback';
    ``intended_uri``: what was asked for (differs from ``uri`` after a fallback); ``reason``: why.
    """

    uri: str
    artifact_location: str | None
    source: str
    intended_uri: str
    reason: str = ""

    @property
    def is_fallback(self) -> bool:
        return self.source == "fallback"


def sqlite_uri(path: str | os.PathLike) -> str:
    """``sqlite:///`` URI of an absolute database path (``sqlite:////abs/path.db`` on POSIX)."""
    return "sqlite:///" + str(Path(path).expanduser().resolve())


def redact_uri(uri: str) -> str:
    """Remove user info (``user:password@``) and credential-like query values from a URI.

    A URI with neither is returned unchanged (``sqlite:////abs/path.db`` keeps its slashes).
    """
    return redact_text(uri)


def default_store(output_dir: str | os.PathLike) -> tuple[str, str]:
    """semlab's default ``(tracking_uri, artifact_location)`` for a run in ``output_dir``."""
    root = Path(output_dir).expanduser().resolve().parent
    return sqlite_uri(root / DEFAULT_DB_NAME), (root / DEFAULT_ARTIFACT_DIR).as_uri()


def fallback_store(output_dir: str | os.PathLike) -> tuple[str, str]:
    """The local ``(tracking_uri, artifact_location)`` used when the configured store is down."""
    out = Path(output_dir).expanduser().resolve()
    return sqlite_uri(out / FALLBACK_DB_NAME), (out / FALLBACK_ARTIFACT_DIR).as_uri()


def local_artifact_location(uri: str) -> str | None:
    """Artifact root beside a local SQLite database (``<db dir>/mlartifacts``); None for other stores."""
    if uri.startswith("sqlite:///"):
        db = Path(urllib.parse.unquote(uri[len("sqlite:///") :]))
        return (db.parent / DEFAULT_ARTIFACT_DIR).as_uri()
    if uri.startswith("file:") or "://" not in uri:
        return None  # MLflow's file store keeps artifacts inside its own directory
    return None


def requested_uri(cfg: Any, output_dir: str | os.PathLike) -> tuple[str, str]:
    """The tracking URI asked for, and where it came from: ('config' | 'env' | 'default')."""
    from_cfg = _cfg_get(cfg, "mlflow.tracking_uri", "") or ""
    if str(from_cfg).strip():
        return str(from_cfg).strip(), "config"
    from_env = os.environ.get(ENV_TRACKING_URI, "").strip()
    if from_env:
        return from_env, "env"
    return default_store(output_dir)[0], "default"


def check_reachable(uri: str, timeout: float = 5.0) -> tuple[bool, str]:
    """Is the store at ``uri`` usable? Returns ``(ok, reason)``.

    ``http(s)://``: ``GET <uri>/health`` must answer 200. ``sqlite:///``: the database's folder
    must be creatable and writable. ``file:`` / plain paths: the folder must be creatable.
    Other schemes (databricks, postgresql...) are assumed reachable; MLflow reports their errors.
    """
    scheme = urllib.parse.urlsplit(uri).scheme.lower()
    if scheme in ("http", "https"):
        url, request = _health_request(uri)
        try:
            with urllib.request.urlopen(request, timeout=timeout) as resp:  # noqa: S310 (http(s) only)
                if resp.status == 200:
                    return True, "ok"
                return False, f"GET {redact_uri(url)} answered HTTP {resp.status}"
        except urllib.error.HTTPError as exc:
            return False, f"GET {redact_uri(url)} answered HTTP {exc.code}"
        except (urllib.error.URLError, OSError, ValueError) as exc:
            reason = getattr(exc, "reason", exc)
            return False, f"cannot reach {redact_uri(url)}: {reason}"
    if scheme == "sqlite":
        path = urllib.parse.unquote(uri[len("sqlite:///") :]) if uri.startswith("sqlite:///") else ""
        if not path or path == ":memory:":
            return True, "ok"
        return _writable_dir(Path(path).parent)
    if scheme in ("", "file"):
        path = urllib.parse.urlsplit(uri).path if scheme == "file" else uri
        return _writable_dir(Path(urllib.parse.unquote(path)))
    return True, "not checked"


def _health_request(uri: str) -> tuple[str, urllib.request.Request]:
    """``GET <server>/health`` for a tracking URI: user info (``user:pw@``) becomes a Basic auth header
    (urllib cannot connect to a host written with it), the query string is not part of the path."""
    parts = urllib.parse.urlsplit(uri)
    host = parts.hostname or ""
    netloc = f"[{host}]" if ":" in host else host
    if parts.port is not None:
        netloc += f":{parts.port}"
    url = urllib.parse.urlunsplit((parts.scheme, netloc, parts.path.rstrip("/") + "/health", "", ""))
    request = urllib.request.Request(url, method="GET")
    if parts.username is not None:
        user = urllib.parse.unquote(parts.username)
        password = urllib.parse.unquote(parts.password or "")
        token = base64.b64encode(f"{user}:{password}".encode()).decode()
        request.add_header("Authorization", f"Basic {token}")
    return url, request


def _writable_dir(folder: Path) -> tuple[bool, str]:
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        return False, f"cannot create {folder}: {exc}"
    if not os.access(folder, os.W_OK):
        return False, f"{folder} is not writable"
    return True, "ok"


def resolve_tracking(cfg: Any, output_dir: str | os.PathLike, timeout: float = 5.0) -> TrackingTarget:
    """Choose the store for a run in ``output_dir`` (see the module docstring), falling back locally.

    A store that is down yields a ``TrackingUnavailableWarning`` (also logged) and the fallback
    SQLite store inside ``output_dir``; the run goes on.
    """
    uri, source = requested_uri(cfg, output_dir)
    ok, reason = check_reachable(uri, timeout=timeout)
    if ok:
        artifact = default_store(output_dir)[1] if source == "default" else local_artifact_location(uri)
        return TrackingTarget(uri=uri, artifact_location=artifact, source=source, intended_uri=uri)
    fb_uri, fb_artifacts = fallback_store(output_dir)
    message = (
        f"MLflow tracking store {redact_uri(uri)} (from {source}) is not available ({reason}); "
        f"logging this run locally to {fb_uri} instead. Nothing is lost: once the server is back, "
        f"copy the run with `semlab sync --output-dir {Path(output_dir)} --to <tracking uri>`."
    )
    warnings.warn(message, TrackingUnavailableWarning, stacklevel=2)
    logger.warning(message)
    return TrackingTarget(
        uri=fb_uri, artifact_location=fb_artifacts, source="fallback", intended_uri=uri, reason=reason
    )


def _cfg_get(cfg: Any, dotted: str, default: Any) -> Any:
    node = cfg
    for part in dotted.split("."):
        if node is None:
            return default
        try:
            node = node[part] if part in node else None
        except TypeError:
            node = getattr(node, part, None)
    return default if node is None else node
