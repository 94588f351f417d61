"""``ray.local_loopback``: the switch that keeps a local Ray cluster on 127.0.0.1, and its undoing.

The switch is Ray's single-node mode (``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`` and the constant Ray read
from it); a later ``ray.local_loopback=false`` start in the same process must get Ray's own default
back, and a value the user had set must come back too. No cluster is started here: the listening
sockets of real clusters are checked in ``test_tune_sweep.py`` and ``test_job_submit_e2e.py``.
"""

from __future__ import annotations

import os

import pytest

pytest.importorskip("ray")

import ray._private.ray_constants as ray_constants  # noqa: E402

from semlab.orchestration import cluster  # noqa: E402

ENV = cluster.LOOPBACK_ENV


@pytest.fixture
def clean_switch(monkeypatch):
    """Ray's constant and semlab's record restored after the test; the variable starts unset."""
    monkeypatch.setattr(ray_constants, "ENABLE_RAY_CLUSTER", not ray_constants.IS_WINDOWS_OR_OSX)
    monkeypatch.setattr(cluster, "_env_before_binding", cluster._UNSET)
    monkeypatch.delenv(ENV, raising=False)
    return monkeypatch


def test_bind_then_unbind_gives_rays_default_back(clean_switch):
    cluster._bind_loopback()
    assert os.environ[ENV] == "0" and ray_constants.ENABLE_RAY_CLUSTER is False
    cluster._bind_loopback()  # twice: still one record of the state before
    cluster._unbind_loopback()
    assert ENV not in os.environ and ray_constants.ENABLE_RAY_CLUSTER is True
    cluster._unbind_loopback()  # nothing bound: nothing changes
    assert ENV not in os.environ and ray_constants.ENABLE_RAY_CLUSTER is True


def test_a_users_value_is_overridden_with_a_warning_and_restored(clean_switch, caplog):
    clean_switch.setenv(ENV, "1")
    with caplog.at_level("WARNING", logger=cluster.__name__):
        cluster._bind_loopback()
    assert f"{ENV}=1 in the environment is overridden" in caplog.text
    assert os.environ[ENV] == "0" and ray_constants.ENABLE_RAY_CLUSTER is False
    cluster._unbind_loopback()
    assert os.environ[ENV] == "1" and ray_constants.ENABLE_RAY_CLUSTER is True
