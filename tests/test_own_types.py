"""Trusting your own types (issue 10, acceptance 5).

A class defined in a script or notebook (``__main__``) travels by value: the result's pickle
describes the class rather than naming an importable one. ``client.trust_types(Point)`` admits
exactly that class object (the one this client shipped), never a class the provider made up, and
the refusal message never suggests allowing a constructor of arbitrary classes or code.

Real processes: a gateway with a local provider, a script run as ``__main__`` in its own process,
a real Jupyter kernel; plus fast checks of the decoder on pickles made in another process.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import cloudpickle
import pytest
from conftest import Gateway, gateway_fixture
from helpers import home_env
from kernel_fixtures import Kernel, Network, kernel_fixture, network_fixture

from notebook_ext import safe_pickle
from notebook_ext.errors import UntrustedResultError

cloudpickle.register_pickle_by_value(sys.modules[__name__])

net = network_fixture("own-types", providers=1)
kernel = kernel_fixture("own-types", lambda k: k.run("import json"))
own = gateway_fixture("own-types-gw", local_providers=1)

#: Names no message may ever suggest trusting: each builds arbitrary classes or code.
CONSTRUCTORS = ("_make_skeleton_class", "builtins.type", "getattr", "_make_function",
                "_class_setstate", "CodeType")


def advice(exc: BaseException) -> str:
    """The part of the message that tells the user what to trust (after 'nothing was')."""
    return str(exc).split("nothing was unpickled.", 1)[-1]


def assert_no_dangerous_advice(exc: BaseException) -> None:
    text = advice(exc)
    for name in CONSTRUCTORS:
        assert f"trust_types({name!r})" not in text and f"trust_types('{name}" not in text, text
        assert f"client.trust_types({name})" not in text, text


# --------------------------------------------------------------------------- the decoder


def made_elsewhere(source: str) -> bytes:
    """``source`` defines ``result`` in another process's ``__main__``; its pickle, as a
    provider sends it (by value, with that process's own class ids)."""
    code = f"import sys, cloudpickle\n{source}\nsys.stdout.buffer.write(cloudpickle.dumps(" \
           f"result, protocol=5))"
    return subprocess.run([sys.executable, "-c", code], capture_output=True, check=True,
                          timeout=60).stdout


def test_a_class_the_provider_made_up_is_refused_even_under_a_trusted_name() -> None:
    blob = made_elsewhere(textwrap.dedent("""
        from dataclasses import dataclass
        @dataclass
        class Point:
            x: int
        result = Point(1)
    """))
    with pytest.raises(UntrustedResultError, match="__main__.Point") as caught:
        safe_pickle.loads(blob, extra=["__main__.Point"])  # the name alone admits nothing
    assert_no_dangerous_advice(caught.value)


@pytest.mark.parametrize("name", ["cloudpickle.cloudpickle._make_skeleton_class",
                                  "builtins.type", "builtins.getattr",
                                  "cloudpickle.cloudpickle._make_function", "types.CodeType"])
def test_the_refusal_never_suggests_trusting_a_constructor(name: str) -> None:
    exc = UntrustedResultError(name)
    assert_no_dangerous_advice(exc)
    assert "trust_types(YourClass)" in str(exc) and "trust=True" in str(exc)


# --------------------------------------------------------------------------- a script


SCRIPT = """
import json, os, sys
from dataclasses import dataclass
from notebook_ext import Client, UntrustedResultError

@dataclass
class Point:
    x: int
    y: int = 0

    def norm(self):
        return abs(self.x) + abs(self.y)

def hostile(marker):
    import subprocess

    class Hostile:
        def __reduce__(self):
            return subprocess.check_output, (["sh", "-c", f"touch {marker}"],)

    return [Point(1), Hostile()]

out = {}
with Client(os.environ["DECOMPUTE_GATEWAY"], stream_output=False) as c:
    try:
        c.submit(lambda: Point(1, 2)).result(60)
    except UntrustedResultError as exc:
        out["refused"] = str(exc)
    c.trust_types(Point)
    value = c.submit(lambda x: [Point(x, 2), {"p": Point(5)}], 3).result(60)
    out["same_class"] = type(value[0]) is Point and type(value[1]["p"]) is Point
    out["norm"] = value[0].norm()
    try:
        c.submit(hostile, sys.argv[1]).result(60)
    except UntrustedResultError as exc:
        out["hostile"] = exc.name
print(json.dumps(out))
"""


def test_trust_types_admits_a_dataclass_of_a_script(own: Gateway, tmp_path: Path) -> None:
    script = tmp_path / "analysis.py"
    script.write_text(SCRIPT)
    marker = Path("/tmp") / f"decompute-own-types-{os.getpid()}-marker"
    marker.unlink(missing_ok=True)
    env = home_env(tmp_path / "home", DECOMPUTE_GATEWAY=own.url)
    done = subprocess.run([sys.executable, str(script), str(marker)], capture_output=True,
                          text=True, env=env, cwd=tmp_path, timeout=180)
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout.strip().splitlines()[-1])
    assert "'__main__.Point'" in out["refused"] and "trust_types(Point)" in out["refused"]
    assert out["same_class"] is True and out["norm"] == 5
    assert out["hostile"] == "subprocess.check_output"
    assert not marker.exists()


# --------------------------------------------------------------------------- a notebook


def test_trust_types_admits_a_dataclass_of_a_notebook(kernel: Kernel, net: Network,
                                                      tmp_path: Path) -> None:
    marker = Path("/tmp") / f"decompute-own-types-kernel-{os.getpid()}-marker"
    marker.unlink(missing_ok=True)
    kernel.run(textwrap.dedent("""
        from dataclasses import dataclass
        from notebook_ext import Client, UntrustedResultError

        @dataclass
        class Point:
            x: int
            y: int = 0

        nb_client = Client(stream_output=False)
        try:
            nb_client.submit(lambda: Point(1)).result(60)
        except UntrustedResultError as exc:
            refusal = str(exc)
    """), timeout=120)
    got = kernel.json(textwrap.dedent(f"""
        def hostile():
            import subprocess

            class Hostile:
                def __reduce__(self):
                    return subprocess.check_output, (["sh", "-c", "touch {marker}"],)

            return Hostile()

        nb_client.trust_types(Point)
        points = nb_client.map(lambda x: Point(x, x), range(3))
        ok = [type(p.result(60)) is Point and p.result().x == i for i, p in enumerate(points)]
        try:
            nb_client.submit(hostile).result(60)
            hostile_name = None
        except UntrustedResultError as exc:
            hostile_name = exc.name
        print(json.dumps({{"refusal": refusal, "ok": ok, "hostile": hostile_name}}))
    """), timeout=120)
    kernel.run("nb_client.close()")
    assert "trust_types(Point)" in got["refusal"]
    assert "_make_skeleton_class" not in got["refusal"].split("nothing was unpickled.")[-1]
    assert got["ok"] == [True, True, True]
    assert got["hostile"] == "subprocess.check_output"
    assert not marker.exists()
