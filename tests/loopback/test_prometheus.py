"""A real Prometheus (make tools) scrapes a real server on loopback with the shipped
scrape config and evaluates the shipped rules; the dashboard's queries parse."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import yaml

from service.proto.facegate.v1 import generation_pb2 as pb
from service.proto.facegate.v1 import generation_pb2_grpc as pb_grpc
from tests.conftest import REPO, TEST_SEED_KEY
from tests.servers import InProcessServer, free_port

DEPLOY = REPO / "deploy"


def _dashboard_queries() -> list[str]:
    dashboard = json.loads((DEPLOY / "grafana/dashboards/facegate.json").read_text())
    titles = " ".join(p["title"].lower() for p in dashboard["panels"])
    for needed in ("rejection", "similarity", "latency", "attempts", "throughput", "in-flight"):
        assert needed in titles
    assert any(p["type"] == "heatmap" for p in dashboard["panels"])
    return [t["expr"] for p in dashboard["panels"] for t in p["targets"]]


def _api(base: str, path: str, **params: str) -> Any:
    url = f"{base}{path}?{urllib.parse.urlencode(params)}"
    with urllib.request.urlopen(url, timeout=5) as response:
        return json.loads(response.read())


@pytest.fixture()
def prometheus_against(tmp_path: Path) -> Iterator[Any]:
    binary = shutil.which("prometheus")
    if binary is None:
        pytest.fail(
            "the prometheus binary is missing: run `make tools` (Debian package prometheus)"
        )
    started: list[subprocess.Popen[bytes]] = []

    def start(metrics_port: int, token_file: Path) -> str:
        config = yaml.safe_load((DEPLOY / "prometheus/prometheus.yml").read_text())
        config["global"].update(scrape_interval="1s", evaluation_interval="1s")
        scrape = config["scrape_configs"][0]
        scrape["static_configs"][0]["targets"] = [f"127.0.0.1:{metrics_port}"]
        # The shipped scrape config authenticates with the bearer token; here the token
        # is the test's file instead of the compose secret.
        assert scrape["authorization"]["type"] == "Bearer"
        scrape["authorization"]["credentials_file"] = str(token_file)
        rule_files = []
        for name in config["rule_files"]:
            rules = yaml.safe_load((DEPLOY / "prometheus" / name).read_text())
            for group in rules["groups"]:
                group["interval"] = "1s"  # shipped groups evaluate every 30s
            target = tmp_path / Path(name).name
            target.write_text(yaml.safe_dump(rules))
            rule_files.append(str(target))
        config["rule_files"] = rule_files
        (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
        port = free_port()
        log = (tmp_path / "prometheus.log").open("w")
        started.append(
            subprocess.Popen(
                [
                    binary,
                    f"--config.file={tmp_path / 'prometheus.yml'}",
                    f"--storage.tsdb.path={tmp_path / 'data'}",
                    f"--web.listen-address=127.0.0.1:{port}",
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        )
        return f"http://127.0.0.1:{port}"

    yield start
    for proc in started:
        proc.terminate()
        proc.wait(20)


@pytest.mark.slow
def test_real_prometheus_scrapes_counters_and_evaluates_rules(
    prometheus_against: Any, tmp_path: Path
) -> None:
    from tests.servers import settings_for  # the same server settings as the API tests

    index = tmp_path / "index"
    from filter.assembly import build_embedding_pipeline
    from service.demo import build_demo_index
    from service.generators import load_dcgan_digiface

    build_demo_index(
        load_dcgan_digiface(REPO / "models"),
        build_embedding_pipeline("sface", REPO / "models", "cpu"),
        identities=20,
        seed=1,
        seed_key=TEST_SEED_KEY,
    ).save(index)
    token = tmp_path / "metrics.token"
    token.write_text("prometheus-scrape-token-0123456789\n")
    server = InProcessServer(settings_for(index, tmp_path, metrics_bearer_token_file=token))
    try:
        base = prometheus_against(server.server.metrics_port, token)
        deadline = time.monotonic() + 240  # generous: the loop ends as soon as all are numbers
        values: dict[str, float] = {}
        with grpc.insecure_channel(server.target) as channel:
            stub = pb_grpc.GenerationServiceStub(channel)
            while time.monotonic() < deadline:
                stub.Generate(pb.GenerateRequest(count=4, seed=1), timeout=60)  # seed 1 resamples
                for query in (
                    "facegate_candidates_total",
                    "facegate:candidates:rate5m",
                    "facegate:candidate_reject_ratio:rate5m",
                    "facegate:attempts_per_image:mean5m",
                    'up{job="facegate"}',
                ):
                    result = _api(base, "/api/v1/query", query=f"sum({query})")["data"]["result"]
                    if result:
                        values[query] = float(result[0]["value"][1])
                # A ratio is NaN (0/0) until its window holds samples, and 0 while a rejected
                # series has only one sample in it (rate() needs two): wait until every
                # queried series is there, finite, and has seen this test's rejections.
                finite = len(values) == 5 and all(math.isfinite(v) for v in values.values())
                if (
                    finite
                    and values["facegate:candidates:rate5m"] > 0
                    and values["facegate:candidate_reject_ratio:rate5m"] > 0
                ):
                    break
                time.sleep(1.0)
            else:
                pytest.fail(f"the recording rules never all became numbers: {values}")
        assert values.get('up{job="facegate"}') == 1.0, values
        assert values["facegate_candidates_total"] > 0
        assert values["facegate:candidates:rate5m"] > 0
        assert 0 < values["facegate:candidate_reject_ratio:rate5m"] <= 1
        assert values["facegate:attempts_per_image:mean5m"] >= 1
        rules = _api(base, "/api/v1/rules")["data"]["groups"]
        assert all(r["health"] == "ok" for g in rules for r in g["rules"]), rules
        # Every dashboard query parses and runs against the real server's series.
        for expr in _dashboard_queries():
            query = expr.replace("$__rate_interval", "1m").replace("$job", ".*")
            assert _api(base, "/api/v1/query", query=query)["status"] == "success", query
    finally:
        server.stop()
