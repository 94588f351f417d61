"""Start or join the Ray cluster a run executes on.

``ray.address`` decides (``connect``):

- ``auto`` (default): join the cluster this process is meant for, else start a private one.
  Under ``ray job submit`` the job supervisor sets ``RAY_ADDRESS`` for the entry point, so the
  job's own cluster is used; on a machine where ``ray start`` ran, its cluster (recorded in
  ``<tmp>/ray/ray_current_cluster``) is joined. Otherwise a local single-node cluster is started
  inside this process. Unlike ``ray.init(address="auto")`` this never attaches to some other
  user's Ray instance merely because a ``gcs_server`` process is visible on the machine.
- ``local``: always start a private local cluster.
- ``none``: no Ray at all (the launcher runs the plain single-process path).
- anything else (``10.0.0.5:6379``, ``ray://head:10001``): join that cluster.

A local cluster is private to this machine: its node address is 127.0.0.1 and every one of its
services (GCS, raylets, workers, dashboard and its agents, runtime-env agent, Ray Client server)
listens on 127.0.0.1 only (``ray.local_loopback``, default true; see :func:`_bind_loopback` for why
``_node_ip_address`` alone is not enough in Ray 2.60). Ray's token authentication, on by default for
local clusters in this version, guards it besides. ``ray.local_loopback=false`` puts the node on the
machine's outward address, as Ray does by default, for a local cluster other machines must reach.
Its object store is bounded (``ray.object_store_memory_gb``).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

from omegaconf import DictConfig

logger = logging.getLogger(__name__)

NO_RAY = ("none", "off", "false", "no")


class ClusterError(RuntimeError):
    """Ray could not be reached or started; the message says what to check."""


@dataclass
class ClusterHandle:
    """What :func:`connect` did: ``started`` is True when this process owns a local cluster."""

    address: str
    started: bool

    def shutdown(self) -> None:
        """Disconnect from Ray (and stop the local cluster if this process started it)."""
        import ray

        if ray.is_initialized():
            ray.shutdown()


def wants_ray(cfg: DictConfig) -> bool:
    """False when ``ray.address`` is ``none``: run without Ray."""
    return str(cfg.ray.address).strip().lower() not in NO_RAY


def _recorded_cluster() -> str | None:
    """Address of the last ``ray start`` head on this machine, if Ray recorded one.

    Ray 2.60 has no public call for "the cluster that ``ray start`` recorded": ``ray.init("auto")``
    reads the same record but then falls back to any ``gcs_server`` visible on the machine
    (ray-project/ray#55244; the record itself comes from ray-project/ray#26678). So this reads the
    file ``ray start`` writes, ``<RAY_TMPDIR or TMPDIR or /tmp>/ray/ray_current_cluster``, the
    way Ray's own (private) ``read_ray_address`` does, without importing Ray's private modules.
    """
    tmp = os.environ.get("RAY_TMPDIR") or os.environ.get("TMPDIR") or "/tmp"
    try:
        address = (Path(tmp) / "ray" / "ray_current_cluster").read_text().strip()
    except OSError:
        return None
    return address or None


def start_local(
    num_cpus: int | None = None,
    num_gpus: int | None = None,
    object_store_memory_gb: float = 4.0,
    temp_dir: str | None = None,
    include_dashboard: bool | None = None,
    loopback_only: bool = True,
) -> ClusterHandle:
    """Start a private single-node Ray cluster inside this process (see the module doc).

    ``include_dashboard`` None is Ray's default (on when ``ray[default]`` is installed; a Tune
    sweep needs it); tests and data benchmarks pass False to start faster. ``loopback_only`` (default):
    the node's address is 127.0.0.1 and its services listen there only (see :func:`_bind_loopback`);
    False leaves Ray's default, the machine's outward address with services on all interfaces.
    """
    if loopback_only:
        _bind_loopback()
    else:
        _unbind_loopback()
    import ray

    if float(object_store_memory_gb) <= 0:
        raise ClusterError(f"object_store_memory_gb must be positive, got {object_store_memory_gb}")
    kwargs: dict = {
        "address": "local",
        "include_dashboard": include_dashboard,
        "dashboard_host": "127.0.0.1",
        "object_store_memory": int(float(object_store_memory_gb) * 1024**3),
        "namespace": "semlab",
    }
    if num_cpus is not None:
        kwargs["num_cpus"] = int(num_cpus)
    if num_gpus is not None:
        kwargs["num_gpus"] = int(num_gpus)
    if temp_dir:
        kwargs["_temp_dir"] = str(temp_dir)
    if loopback_only:
        kwargs["_node_ip_address"] = "127.0.0.1"
    ctx = ray.init(**kwargs)
    address = getattr(ctx, "address_info", {}).get("gcs_address", "local")
    logger.info("started a local Ray cluster (%s CPUs) at %s", num_cpus or "all", address)
    return ClusterHandle(address=str(address), started=True)


LOOPBACK_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"
_UNSET = object()
_env_before_binding: object = _UNSET  # LOOPBACK_ENV as it was before _bind_loopback changed it


def _bind_loopback() -> None:
    """Make the next local Ray node use 127.0.0.1 as its address and listen there only.

    Ray 2.60 has no public way to do this on Linux: ``ray.init(_node_ip_address="127.0.0.1")`` is
    replaced by the machine's outward address (GCS, raylet and workers then listen on all
    interfaces), and only ``ray._private.ray_constants.ENABLE_RAY_CLUSTER`` = False (the single-node
    mode Ray added for the firewall prompts of ray-project/ray#18730) keeps the loopback address, for
    every service. Ray reads that flag from ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER`` when it is first
    imported, and the processes the node starts read it again, so the variable is set here (for this
    process and its children), and the constant too when Ray is already imported. The same variable
    set to 0 before ``ray start --head`` keeps a hand-started head on loopback (docs/cluster.md).
    """
    global _env_before_binding
    if _env_before_binding is _UNSET:
        _env_before_binding = os.environ.get(LOOPBACK_ENV)
    if os.environ.get(LOOPBACK_ENV, "0") != "0":
        logger.warning(
            "%s=%s in the environment is overridden: ray.local_loopback is true, so the local Ray "
            "cluster listens on 127.0.0.1 only (set ray.local_loopback=false for the outward address)",
            LOOPBACK_ENV, os.environ[LOOPBACK_ENV],
        )  # fmt: skip
    os.environ[LOOPBACK_ENV] = "0"
    import ray._private.ray_constants as ray_constants  # Ray 2.60, see the docstring

    ray_constants.ENABLE_RAY_CLUSTER = False


def _unbind_loopback() -> None:
    """Undo :func:`_bind_loopback` (``ray.local_loopback=false`` after a loopback start in this process):
    the variable as it was before, and Ray's own reading of it (``ray_constants``: on Linux, multi-node
    mode unless the variable says 0)."""
    global _env_before_binding
    if _env_before_binding is _UNSET:
        return
    if _env_before_binding is None:
        os.environ.pop(LOOPBACK_ENV, None)
    else:
        os.environ[LOOPBACK_ENV] = str(_env_before_binding)
    _env_before_binding = _UNSET
    import ray._private.ray_constants as ray_constants  # Ray 2.60, see _bind_loopback

    default = not ray_constants.IS_WINDOWS_OR_OSX
    ray_constants.ENABLE_RAY_CLUSTER = ray_constants.env_bool(LOOPBACK_ENV, default)


def _join(address: str) -> ClusterHandle:
    import ray

    try:
        ray.init(address=address, namespace="semlab")
    except (ConnectionError, RuntimeError, ValueError) as exc:
        raise ClusterError(
            f"cannot join the Ray cluster at '{address}': {exc}. Check that the cluster is running "
            "(`ray status`), that RAY_ADDRESS / ray.address is right, and that this client has the "
            "cluster's auth token (RAY_AUTH_MODE=token and the token file or RAY_AUTH_TOKEN); "
            "use ray.address=local to start a private cluster or --local to run without Ray."
        ) from exc
    return ClusterHandle(address=address, started=False)


def connect(cfg: DictConfig, num_cpus: int | None = None, temp_dir: str | None = None) -> ClusterHandle:
    """Join or start the cluster named by ``cfg.ray.address`` (see the module doc).

    ``num_cpus`` and ``temp_dir`` only apply when a local cluster is started. If Ray is already
    initialised in this process (a test, a notebook), that connection is reused.
    """
    import ray

    address = str(cfg.ray.address).strip()
    if address.lower() in NO_RAY:
        raise ClusterError("ray.address is 'none': this run is configured to run without Ray (use --local)")
    if ray.is_initialized():
        return ClusterHandle(address="existing", started=False)
    if address.lower() == "local":
        return _start_configured(cfg, num_cpus, temp_dir)
    if address.lower() != "auto":
        return _join(address)
    env_address = os.environ.get("RAY_ADDRESS", "").strip()
    if env_address:
        logger.info("joining the Ray cluster from RAY_ADDRESS=%s", env_address)
        return _join(env_address)
    recorded = _recorded_cluster()
    if recorded:
        try:
            handle = _join(recorded)
            logger.info("joined the Ray cluster started by `ray start` at %s", recorded)
            return handle
        except ClusterError as exc:
            logger.warning(
                "the recorded Ray cluster %s is not reachable (%s); starting a local one", recorded, exc
            )
    return _start_configured(cfg, num_cpus, temp_dir)


def _start_configured(cfg: DictConfig, num_cpus: int | None, temp_dir: str | None) -> ClusterHandle:
    """:func:`start_local` with the config's object store bound and ``ray.local_loopback``."""
    store_gb, loopback = float(cfg.ray.object_store_memory_gb), bool(cfg.ray.get("local_loopback", True))
    return start_local(num_cpus, None, store_gb, temp_dir, loopback_only=loopback)


def cluster_resources() -> dict[str, float]:
    """Total resources of the connected cluster (``{"CPU": 2.0, "GPU": 0.0, ...}``)."""
    import ray

    return {k: float(v) for k, v in ray.cluster_resources().items()}


def require_state_api(timeout_s: float = 10.0) -> None:
    """Raise :class:`ClusterError` unless Ray's state API answers the way Ray Train will query it.

    Needed by Tune sweeps: when a ``TorchTrainer`` runs inside a Tune trial, the placement group of its
    workers is released after the trial by Ray Train's ``PlacementGroupCleaner``, which watches the
    trainer's controller through the state API, resolving the cluster as this call does (no address).
    If that fails -- the cluster has no dashboard, or several Ray clusters run on this machine and the
    state API cannot tell which one is meant -- every finished trial keeps its workers' CPUs/GPUs
    reserved and the sweep stalls once they add up to the cluster (seen with Ray 2.60).
    """
    from ray.util.state import list_nodes
    from ray.util.state.exception import RayStateApiException

    try:
        list_nodes(limit=1, timeout=timeout_s)
    except RayStateApiException as exc:
        raise ClusterError(
            "this Ray cluster has no state API (no dashboard), which a Tune sweep needs so that Ray Train "
            "can release each finished trial's workers. Install ray[default] and start the cluster with its "
            "dashboard (the default; `ray start --head --include-dashboard=true`), or run the trials one by "
            f"one with experiments/pretrain.py. Ray said: {str(exc).splitlines()[0]}"
        ) from exc
    except ConnectionError as exc:
        raise ClusterError(
            "Ray's state API cannot tell which Ray cluster to query (several run on this machine), so Ray "
            "Train could not release each finished trial's workers and the sweep would stall. Stop the other "
            f"clusters (`ray stop`, or end the processes that started them). Ray said: {exc}"
        ) from exc
