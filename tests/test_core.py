"""The Client and its futures end to end: a real gateway, two real providers, real task processes.

Acceptance 2 (submit/map/gather/as_completed/wait), 3 (remote errors), 4 (cancel kills the
process), 5 (timeout kills the process) and 7 (100 MiB arrays) of issue 2, as a user sees them.
"""

from __future__ import annotations

import asyncio
import concurrent.futures as cf
import os
import socket
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import cloudpickle
import numpy as np
import psutil
import pytest
from conftest import Gate, Gateway, gone, hold, start_gateway, start_provider, wait_for

from notebook_ext import (
    Client,
    Future,
    NoMatchingProvider,
    RemoteError,
    UntrustedResultError,
    as_completed,
    wait,
)

# The functions below are shipped by value: task processes cannot import this test module.
cloudpickle.register_pickle_by_value(sys.modules[__name__])


def add(x, y=0):
    return x + y


def square(x):
    return x * x


def power(x, exponent=2):
    return x**exponent


def nap(seconds):
    time.sleep(seconds)
    return seconds


def nap_then_clock(seconds):
    time.sleep(seconds)
    return time.time()


def divide_by_zero(x):
    return x / 0


class CustomFailure(Exception):
    """An exception type the client has no business rebuilding."""


class Opaque:
    """A result type that is not on the safe-result allow-list."""

    def __init__(self, value):
        self.value = value


def raise_custom(n):
    raise CustomFailure(f"custom failure {n}")


def exit_task(code):
    sys.exit(code)


def kill_self(signum):
    os.kill(os.getpid(), signum)
    time.sleep(10)


def make_opaque(value):
    return Opaque(value)


def print_pid_then_sleep(seconds):
    print(os.getpid(), flush=True)
    time.sleep(seconds)
    return "woke up"


def chatter():
    print("hello from the task", flush=True)
    print("and from stderr", file=sys.stderr, flush=True)
    time.sleep(1.5)
    return "done"


def negate(array):
    return -array


def task_pid(fut: Future, timeout: float = 15.0) -> psutil.Process:
    """The task process of ``fut``: the task prints its pid first (see print_pid_then_sleep)."""
    text = wait_for(lambda: "".join(t for s, t in fut.output if s == "stdout"), timeout,
                    message="the task printed its pid")
    # the provider reports "running" a few ms after the start, so output can arrive first
    wait_for(lambda: fut.status == "running", timeout, message="the task reported running")
    return psutil.Process(int(text.split()[0]))


def wait_idle(gateway: Gateway, timeout: float = 10.0) -> None:
    """Until the gateway runs and queues nothing: later tests start with free slots."""
    wait_for(lambda: gateway.health()["tasks"] == {"pending": 0, "running": 0}, timeout,
             message="gateway idle")


# --------------------------------------------------------------------------- submit and friends


def test_submit_returns_the_result(client: Client) -> None:
    fut = client.submit(add, 1, y=2)
    assert isinstance(fut, cf.Future)
    assert fut.result(30) == 3
    assert fut.status == "finished" and fut.done() and fut.exception() is None
    assert fut.key.startswith("add-")
    assert fut.provider in {info.id for info in client.providers()}


def test_providers_lists_both_local_providers(client: Client) -> None:
    infos = client.providers()
    assert sorted(info.name for info in infos) == ["local-0", "local-1"]
    assert all(info.id.startswith(info.name) and info.online for info in infos)
    assert all(info.sandbox in ("strong", "weak") and info.cpus >= 1 for info in infos)


def test_task_runs_in_a_provider_worker_not_the_client(client: Client,
                                                        gateway: Gateway) -> None:
    pid = client.submit(os.getpid).result(30)
    assert pid != os.getpid()
    assert pid not in {gateway.proc.pid, *gateway.provider_pids()}
    assert pid in gateway.worker_pids()


def test_map_of_1000_calls_keeps_order(client: Client) -> None:
    futures = client.map(square, range(1000))
    assert len(futures) == 1000
    assert len({f.key for f in futures}) == 1000
    assert client.gather(futures) == [i * i for i in range(1000)]
    assert all(f.status == "finished" for f in futures)


def test_map_zips_iterables_and_passes_keywords(client: Client) -> None:
    assert client.gather(client.map(add, range(5), [10, 20, 30, 40, 50])) == [10, 21, 32, 43, 54]
    assert client.gather(client.map(power, range(5), exponent=3)) == [0, 1, 8, 27, 64]
    assert client.map(square, []) == []


def test_gather(client: Client) -> None:
    futures = [client.submit(add, i, 1) for i in range(10)]
    assert client.gather(futures) == list(range(1, 11))
    assert client.gather(futures[3]) == 4


def test_gather_raises_the_first_error(client: Client) -> None:
    futures = [client.submit(add, 1, 1), client.submit(divide_by_zero, 1), client.submit(add, 2)]
    with pytest.raises(ZeroDivisionError):
        client.gather(futures)


def test_as_completed_yields_in_completion_order(client: Client, gateway: Gateway) -> None:
    wait_idle(gateway)
    slow = client.submit(nap, 1.2)  # the two providers run these side by side
    fast = client.submit(nap, 0.1)
    order = list(as_completed([slow, fast], timeout=30))
    assert order == [fast, slow]
    assert [f.result() for f in order] == [0.1, 1.2]


def test_as_completed_order_matches_the_clock(client: Client, gateway: Gateway) -> None:
    wait_idle(gateway)
    futures = client.map(nap_then_clock, [0.9, 0.1, 0.5, 0.3])
    ends = [f.result() for f in as_completed(futures, timeout=30)]
    assert len(ends) == 4
    # results reach us in the order the tasks ended (a few ms of relay may blur ties)
    assert all(b >= a - 0.1 for a, b in zip(ends, ends[1:], strict=False)), ends


def test_wait_first_completed_and_timeout(client: Client, gateway: Gateway, gate: Gate) -> None:
    wait_idle(gateway)
    fast = client.submit(nap, 0.05)
    slow = client.submit(hold, str(gate))
    done, not_done = wait([fast, slow], timeout=20, return_when="FIRST_COMPLETED")
    assert done == {fast} and not_done == {slow}
    start = time.monotonic()
    done, not_done = wait([slow], timeout=0.3)
    assert 0.25 <= time.monotonic() - start < 5
    assert done == set() and not_done == {slow}
    done, not_done = wait([fast])
    assert done == {fast} and not not_done
    with pytest.raises(ValueError):
        wait([fast], return_when="WHENEVER")
    gate.open()
    done, not_done = wait([fast, slow], timeout=20)
    assert done == {fast, slow} and slow.result() is True


def test_wait_first_exception(client: Client, gate: Gate) -> None:
    slow = client.submit(hold, str(gate))
    bad = client.submit(divide_by_zero, 1)
    done, not_done = wait([slow, bad], timeout=20, return_when="FIRST_EXCEPTION")
    assert done == {bad} and not_done == {slow}
    gate.open()
    assert slow.result(30) is True


def test_await_future_inside_asyncio_run(client: Client) -> None:
    async def main() -> tuple[int, list[int]]:
        one = await client.submit(add, 2, 3)
        many = await asyncio.gather(*client.map(square, range(5)))
        return one, list(many)

    assert asyncio.run(main()) == (5, [0, 1, 4, 9, 16])


def test_await_remote_error_raises_it(client: Client) -> None:
    async def main() -> None:
        await client.submit(divide_by_zero, 1)

    with pytest.raises(ZeroDivisionError):
        asyncio.run(main())


def test_pinning_to_an_unknown_provider_fails_clearly(client: Client) -> None:
    fut = client.submit(add, 1, providers=["no-such-provider"])
    with pytest.raises(NoMatchingProvider, match="no-such-provider|no online provider"):
        fut.result(30)
    assert fut.status == "error"


def test_pinning_to_a_provider_by_name(client: Client) -> None:
    futures = [client.submit(add, i, providers=["local-1"]) for i in range(4)]
    assert client.gather(futures) == [0, 1, 2, 3]
    assert all(f.provider.startswith("local-1") for f in futures)


def test_resources_no_provider_has_fail_clearly(client: Client) -> None:
    with pytest.raises(NoMatchingProvider, match="cpus"):
        client.submit(add, 1, resources={"cpus": 4000}).result(30)


# --------------------------------------------------------------------------- remote errors


def test_remote_zero_division_reraises_with_remote_traceback(client: Client) -> None:
    fut = client.submit(divide_by_zero, 7)
    with pytest.raises(ZeroDivisionError, match="division by zero") as info:
        fut.result(30)
    remote = str(info.value.__cause__)
    assert "Traceback" in remote
    assert "divide_by_zero" in remote and "division by zero" in remote
    assert fut.status == "error"
    assert isinstance(fut.exception(), ZeroDivisionError)


def test_remote_custom_exception_becomes_remote_error(client: Client) -> None:
    with pytest.raises(RemoteError) as info:
        client.submit(raise_custom, 42).result(30)
    err = info.value
    assert "CustomFailure" in err.type_name
    assert err.message == "custom failure 42"
    assert "raise_custom" in err.traceback
    assert "CustomFailure" in str(err) and "custom failure 42" in str(err)
    assert "raise_custom" in str(err.__cause__)


@pytest.mark.parametrize("code", [0, 3])
def test_remote_sys_exit_does_not_exit_the_client(client: Client, code: int) -> None:
    with pytest.raises(RemoteError, match="SystemExit"):
        client.submit(exit_task, code).result(30)
    assert client.submit(add, 1, 1).result(30) == 2  # the worker pool is still serving


@pytest.mark.parametrize(("call", "arg", "words"), [
    (os._exit, 3, "exited with code 3"),
    (kill_self, 9, "SIGKILL"),
], ids=["exit", "sigkill"])
def test_task_process_dying_is_a_clear_error_and_the_provider_recovers(
        client: Client, call, arg: int, words: str) -> None:
    with pytest.raises(RemoteError, match=words):
        client.submit(call, arg).result(30)
    assert client.gather(client.map(add, range(4), range(4))) == [0, 2, 4, 6]


def test_duplicate_key_of_a_running_task_is_refused(client: Client) -> None:
    first = client.submit(nap, 0.5, key="busy-key")
    with pytest.raises(ValueError, match="busy-key"):
        client.submit(add, 1, 2, key="busy-key")
    assert first.result(30) == 0.5
    assert first.key == "busy-key"


def test_key_of_a_finished_task_can_be_used_again(client: Client) -> None:
    assert client.submit(add, 1, 2, key="reused-key").result(30) == 3
    assert client.submit(add, 2, 2, key="reused-key").result(30) == 4


def test_client_without_a_gateway_says_how_to_start_one(tmp_path: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(ConnectionError, match="decompute-gateway"):
        Client(f"ws://127.0.0.1:{port}", home=tmp_path, timeout=2)


def test_untrusted_result_is_refused_and_trust_unpickles_it(client: Client) -> None:
    with pytest.raises(UntrustedResultError):
        client.submit(make_opaque, 5).result(30)
    trusted = client.submit(make_opaque, 5, trust=True).result(30)
    assert type(trusted).__name__ == "Opaque" and trusted.value == 5


def test_await_untrusted_result_raises_instead_of_hanging(client: Client) -> None:
    fut = client.submit(make_opaque, 5)
    with pytest.raises(UntrustedResultError):
        fut.result(30)

    async def main() -> None:
        await asyncio.wait_for(fut, 1.5)

    with pytest.raises(UntrustedResultError):
        asyncio.run(main())


# --------------------------------------------------------------------------- cancel and timeout


def test_cancel_kills_the_running_task_process(client: Client, gateway: Gateway) -> None:
    fut = client.submit(print_pid_then_sleep, 60)
    proc = task_pid(fut)
    assert proc.pid in gateway.worker_pids()
    assert fut.status == "running"
    assert fut.cancel() is True
    assert fut.status == "cancelled" and fut.cancelled() and fut.done()
    wait_for(lambda: gone(proc), 2.0, interval=0.01, message="the cancelled task's process exit")
    with pytest.raises(cf.CancelledError):
        fut.result(1)
    fut.cancel()  # a second cancel is harmless
    assert fut.status == "cancelled"
    assert client.submit(add, 2, 2).result(30) == 4
    wait_idle(gateway)


def test_timeout_fails_with_timeout_error_and_kills_the_process(client: Client,
                                                               gateway: Gateway) -> None:
    start = time.monotonic()
    fut = client.submit(print_pid_then_sleep, 60, timeout=1)
    proc = task_pid(fut)
    exc = fut.exception(timeout=30)  # not result(): its own timeout would also be a TimeoutError
    assert isinstance(exc, TimeoutError), exc
    assert "timeout" in str(exc)
    assert time.monotonic() - start < 15
    assert fut.status == "error"
    with pytest.raises(TimeoutError):
        fut.result(1)
    wait_for(lambda: gone(proc), 2.0, message="the timed-out task's process exit")
    wait_idle(gateway)


def test_timeout_does_not_touch_a_task_that_finishes_in_time(client: Client) -> None:
    assert client.submit(nap, 0.1, timeout=20).result(30) == 0.1


def test_cancelled_future_counts_as_done_for_wait_and_as_completed(client: Client,
                                                                   gateway: Gateway) -> None:
    fut = client.submit(print_pid_then_sleep, 60)
    task_pid(fut)
    fut.cancel()
    try:
        done, not_done = wait([fut], timeout=0.5)
        assert done == {fut} and not not_done
        assert list(as_completed([fut], timeout=0.5)) == [fut]
    finally:
        wait_idle(gateway)


# --------------------------------------------------------------------------- data and output


def test_100_mib_array_argument_and_result_round_trip(client: Client) -> None:
    array = np.arange(100 * 2**20 // 8, dtype=np.float64)
    assert array.nbytes == 100 * 2**20
    result = client.submit(negate, array).result(120)
    assert isinstance(result, np.ndarray) and result.dtype == np.float64
    assert result.shape == array.shape
    assert np.array_equal(result, -array)
    assert result.flags.writeable
    result[0] = 42.0  # users mutate results in place
    assert result[0] == 42.0


def test_small_array_results_are_writable_too(client: Client) -> None:
    result = client.submit(np.ones, (3, 4)).result(30)
    assert result.shape == (3, 4) and result.flags.writeable
    result += 1
    assert (result == 2).all()


def test_stdout_streams_before_the_task_completes(client: Client) -> None:
    fut = client.submit(chatter)
    wait_for(lambda: any("hello from the task" in t for _, t in fut.output), 10,
             message="streamed stdout")
    assert not fut.done()  # the text arrived while the task still ran
    assert fut.result(30) == "done"
    assert ("stdout", "hello from the task\n") in fut.output
    assert ("stderr", "and from stderr\n") in fut.output


def test_streamed_output_is_printed_in_the_client(gateway: Gateway, client_home: Path,
                                                  capfd: pytest.CaptureFixture[str]) -> None:
    with Client(gateway.url, home=client_home) as c:
        assert c.submit(chatter).result(30) == "done"
    out, err = capfd.readouterr()
    assert "hello from the task" in out
    assert "and from stderr" in err


# --------------------------------------------------------------------------- closing


def test_closing_a_client_kills_its_running_tasks(gateway: Gateway, client_home: Path) -> None:
    c = Client(gateway.url, home=client_home, stream_output=False)
    fut = c.submit(print_pid_then_sleep, 60)
    proc = task_pid(fut)
    c.close()
    wait_for(lambda: gone(proc), 5.0, message="the closed client's task process exit")
    wait_idle(gateway)
    with pytest.raises(RuntimeError, match="closed"):
        c.submit(add, 1)


def test_closing_a_client_resolves_its_pending_futures(gateway: Gateway,
                                                       client_home: Path) -> None:
    c = Client(gateway.url, home=client_home, stream_output=False)
    fut = c.submit(print_pid_then_sleep, 60)
    task_pid(fut)
    c.close()
    try:
        assert fut.done()
        assert fut.status == "cancelled"
    finally:
        wait_idle(gateway)


# --------------------------------------------------------------------------- a gateway of our own


@pytest.fixture
def one_slot_gateway(tmp_path: Path) -> Iterator[Gateway]:
    """A gateway with one provider of one slot (it still takes more tasks, prefetched)."""
    gw = start_gateway(tmp_path / "gw")
    provider = start_provider(gw, tmp_path, "solo", cpus=1)
    try:
        gw.wait_providers(1)
        yield gw
    finally:
        provider.stop()
        gw.stop()


def test_cancel_of_a_task_still_queued_on_the_gateway(one_slot_gateway: Gateway,
                                                      tmp_path: Path, gate: Gate) -> None:
    gw = one_slot_gateway
    with Client(gw.url, home=tmp_path / "client", stream_output=False) as c:
        def tasks_if_all_taken(n: int) -> dict | None:
            tasks = gw.health()["tasks"]
            return tasks if tasks["pending"] + tasks["running"] == n else None

        futures: list[Future] = []
        while len(futures) < 64:  # fill the slot and the provider's prefetch, then one more
            futures.append(c.submit(hold, str(gate)))
            tasks = wait_for(lambda: tasks_if_all_taken(len(futures)), 5,
                             message="the gateway took the task")
            if tasks["pending"]:
                break
        *busy, waiting = futures
        assert len(busy) >= 2 and waiting.status == "pending"
        assert waiting.cancel() is True
        assert waiting.status == "cancelled"
        wait_for(lambda: gw.health()["tasks"]["pending"] == 0, 5, message="queue emptied")
        gate.open()
        assert c.gather(busy) == [True] * len(busy)
        assert not waiting.output and waiting.provider is None
        wait_for(lambda: gw.health()["tasks"] == {"pending": 0, "running": 0}, 5,
                 message="gateway idle")


def test_cancelling_a_task_queued_on_a_provider_frees_its_slot(one_slot_gateway: Gateway,
                                                               tmp_path: Path,
                                                               gate: Gate) -> None:
    gw = one_slot_gateway
    with Client(gw.url, home=tmp_path / "client", stream_output=False) as c:
        running = c.submit(hold, str(gate))
        queued = c.submit(hold, str(gate))  # prefetched: waits on the provider for the worker
        wait_for(lambda: running.status == "running", 15, message="first task running")
        wait_for(lambda: gw.health()["tasks"]["running"] == 2, 5, message="both assigned")
        assert queued.status == "pending"
        assert queued.cancel() is True
        gate.open()
        assert running.result(30) is True
        wait_for(lambda: gw.health()["tasks"]["running"] == 0, 3,
                 message="no task left running on the gateway")
        assert c.submit(add, 1, 1).result(30) == 2


def test_cancel_racing_the_gateways_answer_does_not_raise(gateway: Gateway, client_home: Path,
                                                          gate: Gate,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    with Client(gateway.url, home=client_home, stream_output=False) as c:
        fut = c.submit(hold, str(gate))
        wait_for(lambda: fut.status == "running", 15, message="task running")
        send_cancel = c._cancel_keys

        def answer_arrives_first(keys: list[str]) -> None:
            # The thread switch that happens by itself in about one run in three on this
            # machine, made certain: the gateway's answer is handled before cancel() goes on.
            send_cancel(keys)
            wait_for(lambda: fut in cf.wait([fut], timeout=0).done, 5,
                     message="the gateway's cancelled answer handled")

        monkeypatch.setattr(c, "_cancel_keys", answer_arrives_first)
        assert fut.cancel() is True
        assert fut.status == "cancelled"
