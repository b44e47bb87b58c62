"""Shared fixtures: a real nats-server per test session, real local deployments."""

from __future__ import annotations

import os

import pytest

from thunderserve.common.natsserver import NatsServer

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def nats_server():
    with NatsServer() as server:
        yield server


@pytest.fixture(scope="session")
def nats_url(nats_server) -> str:
    return nats_server.url


def start_cluster(tmp_path_factory, **kwargs):
    """A LocalCluster (NATS + router + replicas as processes), logs in a temp folder."""
    from thunderserve.launcher.cluster import LocalCluster

    log_dir = tmp_path_factory.mktemp("cluster-logs")
    cluster = LocalCluster(log_dir=str(log_dir), log_level="INFO", **kwargs)
    try:
        cluster.start(timeout=240)
    except BaseException:
        for log in sorted(log_dir.glob("*.log")):
            print(f"--- {log.name}\n{log.read_text()[-3000:]}")
        raise
    return cluster


@pytest.fixture(scope="session")
def smollm2_cluster(tmp_path_factory):
    """The default model served as in production (no KV compression, so outputs are exact)."""
    cluster = start_cluster(tmp_path_factory, model="smollm2", kv_codec="none", threads_per_replica=1)
    yield cluster
    cluster.stop()


@pytest.fixture
def make_cluster(tmp_path_factory):
    """Start deployments with settings of the test's own (LocalCluster's arguments); all stop at its end."""
    started = []

    def make(**kwargs):
        cluster = start_cluster(tmp_path_factory, **kwargs)
        started.append(cluster)
        return cluster

    yield make
    for cluster in started:
        cluster.stop()


@pytest.fixture
def tiny_cluster(make_cluster):
    """A fresh deployment of the tiny random model, for tests that break or change it."""
    return make_cluster(model="tiny-random", threads_per_replica=1)


@pytest.fixture
def mocker_cluster(make_cluster):
    """A fresh deployment with no model (replicas answer at once): for tests of the processes."""
    return make_cluster(model="mocker", threads_per_replica=1)


@pytest.fixture(scope="session")
def smollm2_reference():
    """The in-process model the served outputs are compared against."""
    import torch

    from thunderserve.common.models import load_model

    torch.set_num_threads(1)
    model, tokenizer = load_model("smollm2")
    return model, tokenizer
