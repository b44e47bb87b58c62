"""Shared fixtures: a real nats-server per test session, real local deployments."""

from __future__ import annotations

import os
from typing import Any, NamedTuple

import pytest

from thunderserve.common.natsserver import NatsServer

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def pytest_collection_modifyitems(config, items) -> None:
    """Slow test files first (in their own order). scripts/test hands each xdist worker one file at a
    time in this order (`--no-loadscope-reorder`), so the long files start early and the many short
    ones fill in at the end, where one long file would otherwise run alone."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)


@pytest.fixture(scope="session")
def nats_server():
    with NatsServer() as server:
        yield server


@pytest.fixture(scope="session")
def nats_url(nats_server) -> str:
    return nats_server.url


class OtlpCollector:
    """The receiving end of OTLP/HTTP: a local HTTP server that keeps every JSON body POSTed to it."""

    def __init__(self) -> None:
        import json
        import threading
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        collector = self
        self.requests: list[tuple[str, str, dict]] = []  # (path, content type, body)

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                collector.requests.append((self.path, self.headers["Content-Type"], body))
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.end_headers()
                self.wfile.write(b"{}")

            def log_message(self, *args) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def spans(self) -> list[tuple[str, dict]]:
        """(service.name, span) of every span received."""
        out = []
        for _, _, body in list(self.requests):
            for resource in body["resourceSpans"]:
                service = next(a["value"]["stringValue"] for a in resource["resource"]["attributes"]
                               if a["key"] == "service.name")
                out += [(service, span) for scope in resource["scopeSpans"] for span in scope["spans"]]
        return out


@pytest.fixture
def otlp_collector():
    collector = OtlpCollector()
    yield collector
    collector.server.shutdown()


def start_cluster(tmp_path_factory, **kwargs):
    """A LocalCluster (NATS + router + replicas as processes), logs in a temp folder."""
    from thunderserve.common import kventropy
    from thunderserve.launcher.cluster import LocalCluster

    kventropy.warm_up()  # fills numba's cache once, so the replicas load the codec's kernels, not compile them
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
def cluster_starter(tmp_path_factory):
    """`start_cluster` for fixtures of a wider scope than `make_cluster`'s; the caller stops what it starts."""
    return lambda **kwargs: start_cluster(tmp_path_factory, **kwargs)


@pytest.fixture(scope="session")
def smollm2_cluster(tmp_path_factory):
    """The default model served as in production (no KV compression, so outputs are exact). Its
    replicas code a compressed KV cache on two threads (one run of layers each), so the tests that
    ask for a codec check the threaded path against the one-thread offline figures."""
    cluster = start_cluster(tmp_path_factory, model="smollm2", kv_codec="none", threads_per_replica=1,
                            extra_env={"THUNDERSERVE_KV_CODEC_THREADS": "2"})
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


@pytest.fixture
def three_replica_plan(tmp_path):
    """(planner, plan) for three one-GPU replicas named as a local deployment's processes are:
    prefill-0 and prefill-1 prefill, decode-0 decodes (llama-7b on A40s, the code workload)."""
    import yaml

    from thunderserve.planner.cluster import Cluster
    from thunderserve.planner.model import ModelSpec
    from thunderserve.planner.planner import Planner
    from thunderserve.planner.workload import Workload

    spec = {"name": "local-3", "nodes": [{"name": "h", "gpu": "A40", "count": 3, "intra_gbps": 100}],
            "network": {"default_gbps": 10}}
    (tmp_path / "cluster.yaml").write_text(yaml.safe_dump(spec))
    planner = Planner(Cluster.from_yaml(tmp_path / "cluster.yaml"), ModelSpec.load("llama-7b"),
                      Workload.from_name("code", rate=1.0))
    plan = planner.build_plan([["h:0"], ["h:1"], ["h:2"]], ["prefill", "prefill", "decode"],
                              ids=["prefill-0", "prefill-1", "decode-0"])
    return planner, plan


class Reference(NamedTuple):
    """An in-process model (`model, tokenizer = reference` unpacks it) and what tests ask of it."""

    model: Any
    tokenizer: Any

    def chat_ids(self, text: str) -> list[int]:
        """The token ids of a one-message chat, as the router builds them."""
        return list(self.tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                                       tokenize=True, return_dict=True)["input_ids"])

    def generate(self, ids: list[int], n: int) -> list[int]:
        """model.generate's greedy continuation of `ids`, at most `n` tokens (it stops at EOS)."""
        import torch

        with torch.inference_mode():
            out = self.model.generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False)
        return out[0, len(ids):].tolist()


@pytest.fixture(scope="session")
def smollm2_reference() -> Reference:
    """The in-process model the served outputs are compared against."""
    import torch

    from thunderserve.common.models import load_model

    torch.set_num_threads(1)
    return Reference(*load_model("smollm2"))
