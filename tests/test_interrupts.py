"""Interrupts and endings (issue 10, acceptance 4).

Ctrl-C (SIGINT to a real ipykernel) while a cell waits on ``fut.result()`` or ``gather`` raises a
clean ``KeyboardInterrupt`` and the remote task process is gone within 2 s; a future nobody holds
any more is cancelled (Dask's semantics); a script that ends without closing its client cancels
its tasks (atexit). ``client.close()`` killing its running tasks is
``test_core.py::test_closing_a_client_kills_its_running_tasks``.

Each task writes its process id to a file in a world-writable folder under /tmp (task processes
may run as another uid and see the host's /tmp), so the test can watch the remote process itself.
"""

from __future__ import annotations

import gc
import inspect
import os
import subprocess
import sys
import tempfile
import textwrap
from collections.abc import Iterator
from pathlib import Path

import cloudpickle
import pytest
from conftest import Gateway
from helpers import gone, home_env
from kernel_fixtures import Kernel, Network, kernel_fixture, network_fixture, wait_for

from notebook_ext import Client

cloudpickle.register_pickle_by_value(sys.modules[__name__])

net = network_fixture("interrupts", providers=1)
kernel = kernel_fixture("interrupts", lambda k: k.run("import json"))

#: Acceptance: the remote task is cancelled within 2 s of the interrupt.
CANCEL_SECONDS = 2.0
#: What an interrupt's traceback must not show: the waiting machinery's internals.
INTERNALS = ("threading.py", "concurrent/futures", "_base.py", "wait(timeout)")


def sleeper(pid_file: str, seconds: float = 60.0) -> None:
    import os
    import time

    with open(pid_file + ".tmp", "w") as f:
        f.write(str(os.getpid()))
    os.rename(pid_file + ".tmp", pid_file)
    time.sleep(seconds)


@pytest.fixture
def pids() -> Iterator[Path]:
    folder = Path(tempfile.mkdtemp(prefix="decompute-test-pids-", dir="/tmp"))
    folder.chmod(0o777)
    yield folder
    for f in folder.iterdir():
        f.unlink()
    folder.rmdir()


def remote_pid(pid_file: Path, timeout: float = 60.0) -> int:
    wait_for(pid_file.exists, timeout, f"the task to start ({pid_file.name})")
    return int(pid_file.read_text())


# --------------------------------------------------------------------------- in a kernel


def interrupt_during(kernel: Kernel, code: str, pid_file: Path) -> tuple[dict, int]:
    """Run ``code`` in the kernel, SIGINT it once the task runs; the error and the task pid."""
    kernel.kc.execute(code)
    pid = remote_pid(pid_file)
    kernel.km.interrupt_kernel()
    reply = kernel.kc.get_shell_msg(timeout=30)
    while reply["msg_type"] != "execute_reply":
        reply = kernel.kc.get_shell_msg(timeout=30)
    assert reply["content"]["status"] == "error", reply["content"]
    return reply["content"], pid


def test_ctrl_c_on_result_is_clean_and_cancels_the_remote_task(kernel: Kernel, net: Network,
                                                                pids: Path) -> None:
    kernel.run("from notebook_ext import Client\nint_client = Client(stream_output=False)\n"
               + inspect.getsource(sleeper))
    pid_file = pids / "result"
    error, pid = interrupt_during(kernel, f"fut = int_client.submit(sleeper, {str(pid_file)!r})\n"
                                          f"fut.result()", pid_file)
    wait_for(lambda: gone(pid), CANCEL_SECONDS, "the remote task process to be killed")
    assert error["ename"] == "KeyboardInterrupt"
    shown = "\n".join(error["traceback"])
    assert not any(internal in shown for internal in INTERNALS), shown
    assert kernel.json("print(json.dumps(fut.status))") == "cancelled"

    pid_file = pids / "gather"
    error, pid = interrupt_during(
        kernel, f"futs = int_client.map(sleeper, [{str(pid_file)!r}])\n"
                f"int_client.gather(futs)", pid_file)
    wait_for(lambda: gone(pid), CANCEL_SECONDS, "the gathered task process to be killed")
    assert error["ename"] == "KeyboardInterrupt"
    assert not any(i in "\n".join(error["traceback"]) for i in INTERNALS)
    assert kernel.json("print(json.dumps(int_client.submit(sum, [1, 2]).result(60)))") == 3
    kernel.run("int_client.close()")


# --------------------------------------------------------------------------- futures nobody holds


def test_a_future_nobody_holds_is_cancelled(gateway: Gateway, client: Client,
                                            pids: Path) -> None:
    pid_file = pids / "dropped"
    fut = client.submit(sleeper, str(pid_file))
    pid = remote_pid(pid_file)
    del fut
    gc.collect()
    wait_for(lambda: gone(pid), 10, "the abandoned task's process to be killed")
    assert client.submit(sum, [2, 3]).result(60) == 5  # the client is none the worse


def test_a_script_that_ends_cancels_its_tasks(gateway: Gateway, pids: Path,
                                              tmp_path: Path) -> None:
    pid_file = pids / "script"
    script = tmp_path / "job.py"
    script.write_text(inspect.getsource(sleeper) + textwrap.dedent(f"""
        import os, sys, time
        from notebook_ext import Client
        c = Client(os.environ["DECOMPUTE_GATEWAY"], stream_output=False)
        fut = c.submit(sleeper, {str(pid_file)!r})
        deadline = time.monotonic() + 60
        while not os.path.exists({str(pid_file)!r}) and time.monotonic() < deadline:
            time.sleep(0.02)
        # ends here without close(): the client is still open, the task still running
    """))
    env = home_env(tmp_path / "home", DECOMPUTE_GATEWAY=gateway.url)
    done = subprocess.run([sys.executable, str(script)], env=env, cwd=tmp_path, timeout=120,
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    pid = int(pid_file.read_text())
    wait_for(lambda: gone(pid), 5, "the ended script's task process to be killed")
    assert os.path.exists(script)
