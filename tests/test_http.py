"""Acceptance 9 of issue 2: ``GET /health`` (JSON) and ``GET /metrics`` (Prometheus text) answer
on the gateway's port while tasks run; anything else is refused and the gateway keeps serving.
"""

from __future__ import annotations

import json
import re
import socket
import sys
import threading
import time
import urllib.request

import cloudpickle
import pytest
from conftest import Gate, Gateway, hold, http_get, wait_for

from gateway.protocol import VERSION
from notebook_ext import Client

cloudpickle.register_pickle_by_value(sys.modules[__name__])


def nap(seconds):
    time.sleep(seconds)
    return seconds


def metric(text: str, name: str) -> float:
    """The value of an unlabelled sample in Prometheus text."""
    match = re.search(rf"^{name} (\S+)$", text, re.MULTILINE)
    assert match, f"{name} missing from /metrics:\n{text}"
    return float(match.group(1))


def idle(gateway: Gateway) -> None:
    wait_for(lambda: gateway.health()["tasks"] == {"pending": 0, "running": 0}, 10,
             message="gateway idle")


def test_health_and_metrics_answer_while_a_long_task_runs(client: Client, gateway: Gateway,
                                                          gate: Gate) -> None:
    idle(gateway)
    fut = client.submit(hold, str(gate))
    wait_for(lambda: fut.status == "running", 15, message="task running")
    try:
        start = time.monotonic()
        status, body = http_get(gateway.port, "/health")
        assert status == 200
        assert time.monotonic() - start < 2
        health = json.loads(body)
        assert health["status"] == "ok"
        assert health["providers"] == 2
        assert sorted(health["provider_names"]) == ["local-0", "local-1"]
        assert health["tasks"]["running"] >= 1
        assert health["protocol"] == VERSION

        status, text = http_get(gateway.port, "/metrics")
        assert status == 200
        assert "# TYPE decompute_providers_online gauge" in text
        assert "# TYPE decompute_tasks_running gauge" in text
        assert metric(text, "decompute_providers_online") == 2
        assert metric(text, "decompute_tasks_running") >= 1
        assert metric(text, "decompute_tasks_submitted_total") >= 1
    finally:
        gate.open()
    assert fut.result(30) is True
    wait_for(lambda: metric(http_get(gateway.port, "/metrics")[1],
                            "decompute_tasks_running") == 0, 10, message="tasks_running back to 0")


@pytest.mark.parametrize(("path", "content_type"), [
    ("/health", "application/json"), ("/metrics", "text/plain; version=0.0.4"),
])
def test_one_content_type_that_says_what_the_body_is(gateway: Gateway, path: str,
                                                     content_type: str) -> None:
    with urllib.request.urlopen(f"http://127.0.0.1:{gateway.port}{path}", timeout=5) as resp:
        assert resp.headers.get_all("Content-Type") == [content_type]


def test_query_strings_are_ignored(gateway: Gateway) -> None:
    status, body = http_get(gateway.port, "/health?verbose=1")
    assert status == 200 and json.loads(body)["status"] == "ok"


def test_endpoints_answer_during_a_burst_of_tasks(client: Client, gateway: Gateway) -> None:
    futures = client.map(nap, [0.002] * 400)
    answers: list[int] = []

    def poll() -> None:
        while not all(f.done() for f in futures):
            answers.append(http_get(gateway.port, "/health")[0])
            answers.append(http_get(gateway.port, "/metrics")[0])

    poller = threading.Thread(target=poll)
    poller.start()
    assert client.gather(futures) == [0.002] * 400
    poller.join(30)
    assert answers and set(answers) == {200}


@pytest.mark.parametrize("path", ["/", "/nope", "/health/extra", "/metrics.json", "/%00"])
def test_unknown_path_is_refused_and_the_gateway_keeps_serving(client: Client, gateway: Gateway,
                                                               path: str) -> None:
    status, _ = http_get(gateway.port, path)
    assert status != 200
    assert http_get(gateway.port, "/health")[0] == 200
    assert client.submit(nap, 0).result(30) == 0


def test_non_get_and_garbage_requests_do_not_hurt_the_gateway(client: Client,
                                                              gateway: Gateway) -> None:
    request = urllib.request.Request(f"http://127.0.0.1:{gateway.port}/health", data=b"x",
                                     method="POST")
    try:
        with urllib.request.urlopen(request, timeout=5) as resp:
            assert resp.status != 200
    except urllib.error.HTTPError as exc:
        assert exc.code != 200
    except (urllib.error.URLError, ConnectionError):
        pass  # closing the connection on a bad request is fine too
    for junk in (b"NOT HTTP AT ALL\r\n\r\n", b"\x00\xff" * 100, b"GET /health HTTP/1.1\r\n"):
        with socket.create_connection(("127.0.0.1", gateway.port), timeout=5) as sock:
            sock.sendall(junk)
    assert http_get(gateway.port, "/health")[0] == 200
    assert client.submit(nap, 0).result(30) == 0
