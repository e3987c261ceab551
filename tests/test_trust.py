"""Issue 3, acceptance 1-4 and 7: the trust model, driven the way users and attackers would.

Real processes on loopback: a gateway with one local provider, plus (for the secrets test) a
provider started with a secret in its environment. Each test asserts what a user sees: the error
they catch, the result they get, and that the hostile side effect did not happen.
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
from collections.abc import Iterator
from pathlib import Path

import cloudpickle
import pytest
from conftest import Gateway, gateway_fixture, start_provider

from gateway import protocol as p
from gateway.identity import KEY_FILE
from notebook_ext import Client, NoMatchingProvider, UntrustedResultError

# Task functions travel by value: the tests directory is not importable on the providers.
cloudpickle.register_pickle_by_value(sys.modules[__name__])

RESULT_TIMEOUT = 60


# --------------------------------------------------------------------------- tasks


def hostile_result(marker: str) -> object:
    """A result whose unpickling runs a shell command that creates ``marker``."""
    import subprocess

    class Hostile:  # defined in the task, so it exists only where the task runs
        def __reduce__(self):
            return subprocess.check_output, (["sh", "-c", f"touch {marker} && echo pwned"],)

    return Hostile()


def os_system_result(marker: str) -> object:
    """The classic: ``os.system`` named by the pickle (as ``posix.system``)."""
    import os

    class Hostile:
        def __reduce__(self):
            return os.system, (f"touch {marker}",)

    return Hostile()


def namespace_result(answer: int) -> argparse.Namespace:
    """A plain class from a module both sides can import: pickled by reference, by name."""
    import argparse

    return argparse.Namespace(answer=answer)


def runtime_result() -> p.Runtime:
    """A class from this repository (importable by the worker too), pickled by reference."""
    from gateway import protocol

    return protocol.Runtime(python="3.99", cloudpickle="9.9")


def connect_to(port: int) -> str:
    import socket

    socket.create_connection(("127.0.0.1", port), timeout=5).close()
    return "connected"


def allocate(nbytes: int) -> int:
    return len(bytearray(nbytes))


def add(x: int, y: int) -> int:
    return x + y


def environment() -> dict[str, str]:
    import os

    return dict(os.environ)


def read_file(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def environ_files_holding(secret: str) -> list[str]:
    """Every /proc/PID/environ this task can read that contains ``secret``."""
    import os

    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/environ", "rb") as f:
                if secret.encode() in f.read():
                    found.append(pid)
        except OSError:
            pass
    return found


# --------------------------------------------------------------------------- fixtures


net = gateway_fixture("trust", local_providers=1)


@pytest.fixture(scope="module")
def user(net: Gateway, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Client]:
    """A careful user: default trust settings, own identity."""
    with Client(net.url, home=tmp_path_factory.mktemp("user"), stream_output=False) as c:
        yield c


@pytest.fixture
def marker(tmp_path: Path) -> Path:
    """Where the hostile result would leave its mark. The dir is world-writable so whoever
    unpickles (here: the client process) could create it."""
    where = tmp_path / "open"
    where.mkdir()
    where.chmod(0o777)
    return where / "pwned"


# --------------------------------------------------------------------------- 1. safe results


def test_hostile_result_is_refused_and_nothing_runs(user: Client, marker: Path) -> None:
    fut = user.submit(hostile_result, str(marker))
    with pytest.raises(UntrustedResultError) as caught:
        fut.result(RESULT_TIMEOUT)
    assert caught.value.name == "subprocess.check_output"
    assert "subprocess.check_output" in str(caught.value)
    assert "trust=True" in str(caught.value)  # says what to do
    assert not marker.exists()
    # asking again does not run it either
    with pytest.raises(UntrustedResultError):
        fut.result(RESULT_TIMEOUT)
    assert not marker.exists()


def test_os_system_result_is_refused(user: Client, marker: Path) -> None:
    with pytest.raises(UntrustedResultError) as caught:
        user.submit(os_system_result, str(marker)).result(RESULT_TIMEOUT)
    assert caught.value.name in {"posix.system", "os.system"}
    assert not marker.exists()


def test_trust_true_per_call_lets_the_object_arrive(user: Client, marker: Path) -> None:
    value = user.submit(hostile_result, str(marker), trust=True).result(RESULT_TIMEOUT)
    assert value == b"pwned\n"
    assert marker.exists()  # trusting really means running the result's code


def test_trust_true_per_client(net: Gateway, tmp_path: Path, marker: Path) -> None:
    with Client(net.url, home=tmp_path / "trusting", trust=True, stream_output=False) as c:
        assert c.submit(hostile_result, str(marker)).result(RESULT_TIMEOUT) == b"pwned\n"
        assert marker.exists()
        # per-call trust=False overrides the client's default
        marker.unlink()
        with pytest.raises(UntrustedResultError):
            c.submit(hostile_result, str(marker), trust=False).result(RESULT_TIMEOUT)
        assert not marker.exists()


def test_trust_types_admits_exactly_one_type(net: Gateway, tmp_path: Path,
                                             marker: Path) -> None:
    with Client(net.url, home=tmp_path / "typed", stream_output=False) as c:
        refused = c.submit(namespace_result, 41)
        with pytest.raises(UntrustedResultError) as caught:
            refused.result(RESULT_TIMEOUT)
        assert caught.value.name == "argparse.Namespace"
        assert "client.trust_types('argparse.Namespace')" in str(caught.value)

        c.trust_types(argparse.Namespace)
        assert c.submit(namespace_result, 42).result(RESULT_TIMEOUT) == argparse.Namespace(
            answer=42)
        # the error told the user to do exactly this; the same future now decodes
        assert refused.result(RESULT_TIMEOUT) == argparse.Namespace(answer=41)
        # one trusted type admits nothing else
        with pytest.raises(UntrustedResultError):
            c.submit(hostile_result, str(marker)).result(RESULT_TIMEOUT)
        assert not marker.exists()


def test_trust_types_by_name(net: Gateway, tmp_path: Path) -> None:
    with Client(net.url, home=tmp_path / "named", stream_output=False) as c:
        with pytest.raises(UntrustedResultError) as caught:
            c.submit(runtime_result).result(RESULT_TIMEOUT)
        assert caught.value.name == "gateway.protocol.Runtime"
        c.trust_types("gateway.protocol.Runtime")
        value = c.submit(runtime_result).result(RESULT_TIMEOUT)
        assert value == p.Runtime(python="3.99", cloudpickle="9.9")


# --------------------------------------------------------------------------- 2. no network


def test_task_cannot_reach_the_gateway_port(user: Client, net: Gateway) -> None:
    with socket.create_connection(("127.0.0.1", net.port), timeout=5):
        pass  # the port is open to everyone outside the sandbox
    providers = user.providers()
    assert providers
    strong = [info for info in providers if info.sandbox == "strong"]
    if not strong:
        assert {info.sandbox for info in providers} == {"weak"}
        pytest.skip("this host cannot create a network namespace (unshare -n / -rn fails): "
                    "the provider says so and reports sandbox 'weak'")
    for info in strong:
        fut = user.submit(connect_to, net.port, providers=[info.id])
        with pytest.raises(OSError, match=r"(?i)unreachable|refused|timed out"):
            fut.result(RESULT_TIMEOUT)
        assert fut.provider == info.id


# --------------------------------------------------------------------------- 3. memory limit


def test_memory_limit_is_a_clear_error_and_the_provider_keeps_serving(
        user: Client, net: Gateway) -> None:
    providers_before = net.provider_pids()
    fut = user.submit(allocate, 2 * 1024**3, resources={"memory": "256MiB"})
    with pytest.raises(MemoryError) as caught:
        fut.result(RESULT_TIMEOUT)
    assert "256 MiB" in str(caught.value)
    assert fut.provider is not None
    after = user.submit(add, 40, 2, providers=[fut.provider])
    assert after.result(RESULT_TIMEOUT) == 42
    assert after.provider == fut.provider
    assert net.provider_pids() == providers_before  # the provider process never died
    # and within the limit the same memory request works
    small = user.submit(allocate, 64 * 1024**2, resources={"memory": "256MiB"},
                        providers=[fut.provider])
    assert small.result(RESULT_TIMEOUT) == 64 * 1024**2


# --------------------------------------------------------------------------- 4. secrets


def test_task_cannot_read_the_providers_environment_or_key(
        user: Client, net: Gateway, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    secret = "s3cr3t-" + os.urandom(8).hex()
    monkeypatch.setenv("SECRET_TOKEN", secret)  # inherited by the provider started next
    provider = start_provider(net, tmp_path, "secretive")
    try:
        net.wait_providers(2)
        key = tmp_path / "provider-secretive" / KEY_FILE
        assert key.read_bytes().startswith(b"-----BEGIN PRIVATE KEY")  # it exists, we can read
        assert secret.encode() in Path(f"/proc/{provider.pid}/environ").read_bytes()
        pin = {"providers": ["secretive"]}

        env = user.submit(environment, **pin).result(RESULT_TIMEOUT)
        assert "SECRET_TOKEN" not in env
        assert not any(secret in v for v in env.values())
        assert user.submit(environ_files_holding, secret, **pin).result(RESULT_TIMEOUT) == []

        fut = user.submit(read_file, str(key), **pin)
        with pytest.raises(OSError):
            fut.result(RESULT_TIMEOUT)
        assert fut.provider is not None and fut.provider.startswith("secretive")
    finally:
        provider.stop()


# --------------------------------------------------------------------------- 7. runtimes


def test_incompatible_runtime_names_the_runtimes_online(
        user: Client, monkeypatch: pytest.MonkeyPatch) -> None:
    import notebook_ext.client
    import notebook_ext.serialize

    def python27() -> p.Runtime:  # this client's own declaration of what its pickles need
        return p.Runtime(python="2.7", cloudpickle="0.1")

    monkeypatch.setattr(notebook_ext.client, "local_runtime", python27)
    monkeypatch.setattr(notebook_ext.serialize, "local_runtime", python27)
    fut = user.submit(add, 1, 2)
    with pytest.raises(NoMatchingProvider) as caught:
        fut.result(RESULT_TIMEOUT)
    text = str(caught.value)
    here = ".".join(map(str, sys.version_info[:2]))
    assert f"python {here}" in text
    assert "python 2.7" in text  # what the task needs
    monkeypatch.undo()
    assert user.submit(add, 1, 2).result(RESULT_TIMEOUT) == 3
