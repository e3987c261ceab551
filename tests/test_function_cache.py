"""The client's cache of pickled functions (``notebook_ext/serialize.py``) never sends a stale
pickle: whatever changed about a function since it was last sent, the bytes sent are those a
fresh ``cloudpickle.dumps`` gives, and a real kernel's redefined function runs its new body on
a real provider."""

from __future__ import annotations

import gc
import pickle
import types

import cloudpickle
import pytest
from kernel_fixtures import Kernel, kernel_fixture, network_fixture

from notebook_ext import serialize
from notebook_ext.serialize import _PICKLED, dumps_args, dumps_function

net = network_fixture("function-cache", providers=1)
kernel = kernel_fixture("function-cache", lambda k: k.run(
    "import json\nfrom notebook_ext import Client\nfc = Client(stream_output=False)"))


def namespace(code: str) -> dict:
    """A notebook's ``__main__``-like namespace (cloudpickle pickles its functions by value)."""
    ns: dict = {"__name__": "__main__"}
    exec(code, ns)  # noqa: S102 - the test's own source
    return ns


def fresh(fn) -> bytes:
    return cloudpickle.dumps(fn, protocol=5)


def sent(fn) -> bytes:
    """What the client sends for ``fn`` now, checked against its content hash."""
    func_hash, blob = dumps_function(fn)
    assert func_hash == serialize.hashlib.blake2b(blob, digest_size=16).hexdigest()
    return blob


def test_an_unchanged_function_reuses_its_pickle() -> None:
    ns = namespace("N = 1\ndef inc(x):\n    return x + N\n")
    first = sent(ns["inc"])
    assert ns["inc"] in _PICKLED
    assert sent(ns["inc"]) is first  # the cached bytes, not a new pickle


@pytest.mark.parametrize("change", [
    "N = 2",                                      # a global rebound
    "M = 5",                                      # a global it reads appears (was missing)
    "inc.__code__ = (lambda x: x * 10).__code__",  # its code swapped
    "inc.__defaults__ = (7,)",                    # a default changed
    "inc.__kwdefaults__ = {'k': 3}",              # a keyword default changed
    "inc.__doc__ = 'now documented'",             # what cloudpickle also carries
    "inc.__qualname__ = 'renamed'",
    "inc.tag = 1",                                # a function attribute
    "helper.__defaults__ = (100,)",               # a helper it calls changed
    "def helper(y=1):\n    return -y\n",          # the helper redefined
])
def test_a_changed_function_is_pickled_again(change: str) -> None:
    ns = namespace("N = 1\n"
                   "def helper(y=1):\n    return y\n"
                   "def inc(x=0, *, k=1):\n"
                   "    return x + N + helper() + (M if 'M' in globals() else 0)\n")
    before = sent(ns["inc"])
    exec(change, ns)  # noqa: S102
    after = sent(ns["inc"])
    assert after == fresh(ns["inc"]) and after != before


def test_a_redefined_function_is_a_new_entry_and_the_old_one_dies_with_it() -> None:
    ns = namespace("def f(x):\n    return x + 1\n")
    old = sent(ns["f"])
    exec("def f(x):\n    return x + 2\n", ns)  # noqa: S102 - same name, same id() possible
    gc.collect()
    new = sent(ns["f"])
    assert new != old and new == fresh(ns["f"])
    assert len([f for f in _PICKLED if f.__name__ == "f" and f.__module__ == "__main__"]) == 1


@pytest.mark.parametrize("code", [
    "def f(n):\n    return 1 if n <= 1 else n * f(n - 1)\n",            # recursion via a global
    "def f(x):\n    return x\nPAIR = (f, 1)\ndef g(x):\n    return PAIR\n",  # held in a tuple
    "def outer():\n    def f(n):\n        return n and f(n - 1)\n    return f\nf = outer()\n",
])
def test_a_cached_function_still_dies_with_its_last_reference(code: str) -> None:
    import weakref
    ns = namespace(code)
    sent(ns["f"])
    assert sent(ns["f"]) is sent(ns["f"]) and ns["f"] in _PICKLED
    if "g" in ns:
        sent(ns["g"])
    dead = weakref.ref(ns["f"])
    ns.clear()
    gc.collect()
    assert dead() is None


def test_closure_cells_are_part_of_the_fingerprint() -> None:
    ns = namespace("def make():\n"
                   "    k = 1\n"
                   "    def f(x):\n        return x + k\n"
                   "    def set_k(v):\n        nonlocal k\n        k = v\n"
                   "    return f, set_k\n"
                   "f, set_k = make()\n")
    before = sent(ns["f"])
    ns["set_k"](41)
    after = sent(ns["f"])
    assert after != before and after == fresh(ns["f"])
    assert cloudpickle.loads(after)(1) == 42


@pytest.mark.parametrize("code", [
    "STATE = []\ndef f(x):\n    return len(STATE) + x\n",        # a mutable global
    "STATE = {'a': 1}\ndef f(x):\n    return STATE['a'] + x\n",
    "class C:\n    k = 1\ndef f(x):\n    return C.k + x\n",      # a class pickled by value
    "def make():\n    box = [1]\n    return lambda x: box[0] + x\nf = make()\n",  # mutable cell
])
def test_what_may_change_in_place_is_never_cached(code: str) -> None:
    ns = namespace(code)
    assert serialize._fingerprint(ns["f"]) is None
    sent(ns["f"])
    assert ns["f"] not in _PICKLED


def test_a_mutated_global_reaches_the_pickle() -> None:
    ns = namespace("STATE = [1]\ndef f():\n    return sum(STATE)\n")
    assert cloudpickle.loads(sent(ns["f"]))() == 1
    ns["STATE"].append(10)
    assert cloudpickle.loads(sent(ns["f"]))() == 11


def test_an_importable_function_is_cached_by_reference() -> None:
    import os.path
    assert sent(os.path.join) is sent(os.path.join)
    assert sent(os.path.join) == fresh(os.path.join)


def test_non_functions_are_pickled_every_time() -> None:
    import functools
    part = functools.partial(int, base=2)
    assert sent(part) == fresh(part)
    assert not isinstance(part, types.FunctionType) and part not in _PICKLED


def test_plain_arguments_take_the_fast_pickler_and_read_back_the_same() -> None:
    for args, kwargs in [((1,), {}), ((1.5, "s", b"b", None, True), {"k": [1, (2, 3)]}),
                         (([1] * 100,), {})]:
        data = dumps_args(args, kwargs)
        assert pickle.loads(data[0]) == (args, kwargs)
    ns = namespace("def g():\n    return 3\n")
    data = dumps_args((ns["g"],), {})  # a function argument still goes through cloudpickle
    assert pickle.loads(data[0])[0][0]() == 3


def test_a_kernel_redefinition_runs_the_new_body_on_the_provider(kernel: Kernel) -> None:
    kernel.run("def body(x):\n    return x + 1\n")
    assert kernel.json("print(json.dumps(fc.submit(body, 1).result(60)))") == 2
    assert kernel.json("print(json.dumps(fc.submit(body, 1).result(60)))") == 2
    kernel.run("def body(x):\n    return x * 100\n")
    assert kernel.json("print(json.dumps(fc.submit(body, 1).result(60)))") == 100
    kernel.run("OFFSET = 5\ndef shifted(x):\n    return x + OFFSET\n")
    assert kernel.json("print(json.dumps(fc.submit(shifted, 1).result(60)))") == 6
    kernel.run("OFFSET = 50")
    assert kernel.json("print(json.dumps(fc.submit(shifted, 1).result(60)))") == 51
    kernel.run("SEEN = [1]\ndef total():\n    return sum(SEEN)\n")
    assert kernel.json("print(json.dumps(fc.submit(total).result(60)))") == 1
    kernel.run("SEEN.append(2)")
    assert kernel.json("print(json.dumps(fc.submit(total).result(60)))") == 3
    assert kernel.json("print(json.dumps(fc.gather(fc.map(body, [1, 2]))))") == [100, 200]
