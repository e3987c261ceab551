"""Interrupts and endings (issue 10, acceptance 4).

Ctrl-C (SIGINT to a real ipykernel) while a cell waits on ``fut.result()`` or ``gather`` raises a
clean ``KeyboardInterrupt`` and the remote task process is gone within 2 s; a future nobody holds
any more is cancelled (Dask's semantics); a script that ends without closing its client cancels
its tasks (atexit). ``client.close()`` killing its running tasks is
``test_core.py::test_closing_a_client_kills_its_running_tasks``.

Each task prints ``PID <n>`` first (tasks have a private /tmp, so output is the one channel out),
so the test can watch the remote process itself.
"""

from __future__ import annotations

import contextlib
import gc
import inspect
import queue
import re
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import cloudpickle
from conftest import Gateway
from helpers import gone, home_env
from kernel_fixtures import Kernel, Network, kernel_fixture, network_fixture, wait_for

from notebook_ext import Client, Future

cloudpickle.register_pickle_by_value(sys.modules[__name__])

net = network_fixture("interrupts", providers=1)
kernel = kernel_fixture("interrupts", lambda k: k.run("import json"))

#: Acceptance: the remote task is cancelled within 2 s of the interrupt.
CANCEL_SECONDS = 2.0
#: What an interrupt's traceback must not show: the waiting machinery's internals.
INTERNALS = ("threading.py", "concurrent/futures", "_base.py", "wait(timeout)")


def sleeper(seconds: float = 60.0) -> None:
    import os
    import time

    print(f"PID {os.getpid()}", flush=True)
    time.sleep(seconds)


def pid_in(text: str) -> int | None:
    match = re.search(r"PID (\d+)", text)
    return int(match.group(1)) if match else None


def remote_pid(fut: Future, timeout: float = 60.0) -> int:
    """The task process of ``fut``, from what it printed."""
    return wait_for(lambda: pid_in("".join(t for _, t in fut.output)), timeout,
                    "the task to print its pid")


# --------------------------------------------------------------------------- in a kernel


def interrupt_during(kernel: Kernel, code: str) -> tuple[dict, int]:
    """Run ``code`` in the kernel and SIGINT it once its task printed its pid (the kernel's
    client streams task output to the cell); the cell's error and the task's pid."""
    msg_id = kernel.kc.execute(code)
    printed = ""
    deadline = time.monotonic() + 60
    while pid_in(printed) is None:
        assert time.monotonic() < deadline, f"no pid printed; got {printed!r}"
        with contextlib.suppress(queue.Empty):
            msg = kernel.kc.get_iopub_msg(timeout=1)
            if msg["msg_type"] == "stream":
                printed += msg["content"]["text"]
    kernel.km.interrupt_kernel()
    while True:
        reply = kernel.kc.get_shell_msg(timeout=30)
        if reply["parent_header"].get("msg_id") == msg_id:
            break
    assert reply["content"]["status"] == "error", reply["content"]
    # ipykernel aborts requests that reach it before it has finished aborting after an error
    wait_for(lambda: kernel.execute("pass").status == "ok", 30, "the kernel to take cells again")
    return reply["content"], pid_in(printed)  # type: ignore[return-value]


def test_ctrl_c_on_result_is_clean_and_cancels_the_remote_task(kernel: Kernel,
                                                                net: Network) -> None:
    kernel.run("from notebook_ext import Client\nint_client = Client()\n"
               + inspect.getsource(sleeper))
    error, pid = interrupt_during(kernel, "fut = int_client.submit(sleeper)\nfut.result()")
    wait_for(lambda: gone(pid), CANCEL_SECONDS, "the remote task process to be killed")
    assert error["ename"] == "KeyboardInterrupt"
    shown = "\n".join(error["traceback"])
    assert not any(internal in shown for internal in INTERNALS), shown
    assert kernel.json("print(json.dumps(fut.status))") == "cancelled"

    error, pid = interrupt_during(kernel, "futs = int_client.map(sleeper, [60])\n"
                                          "int_client.gather(futs)")
    wait_for(lambda: gone(pid), CANCEL_SECONDS, "the gathered task process to be killed")
    assert error["ename"] == "KeyboardInterrupt"
    assert not any(i in "\n".join(error["traceback"]) for i in INTERNALS)
    assert kernel.json("print(json.dumps(int_client.submit(sum, [1, 2]).result(60)))") == 3
    kernel.run("int_client.close()")


# --------------------------------------------------------------------------- futures nobody holds


def test_a_future_nobody_holds_is_cancelled(gateway: Gateway, client: Client) -> None:
    fut = client.submit(sleeper)
    pid = remote_pid(fut)
    del fut
    gc.collect()
    wait_for(lambda: gone(pid), 10, "the abandoned task's process to be killed")
    assert client.submit(sum, [2, 3]).result(60) == 5  # the client is none the worse


def test_a_script_that_ends_cancels_its_tasks(gateway: Gateway, tmp_path: Path) -> None:
    script = tmp_path / "job.py"
    script.write_text(inspect.getsource(sleeper) + textwrap.dedent("""
        import os, sys, time
        from notebook_ext import Client
        c = Client(os.environ["DECOMPUTE_GATEWAY"], stream_output=False)
        fut = c.submit(sleeper)
        deadline = time.monotonic() + 60
        while "PID" not in "".join(t for _, t in fut.output) and time.monotonic() < deadline:
            time.sleep(0.02)
        print("".join(t for _, t in fut.output), flush=True)
        # ends here without close(): the client is still open, the task still running
    """))
    env = home_env(tmp_path / "home", DECOMPUTE_GATEWAY=gateway.url)
    done = subprocess.run([sys.executable, str(script)], env=env, cwd=tmp_path, timeout=120,
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    pid = pid_in(done.stdout)
    assert pid is not None, done.stdout
    wait_for(lambda: gone(pid), 5, "the ended script's task process to be killed")
