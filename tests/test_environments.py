"""provider/environments.py: cached environments an installing provider builds, wheels only.

Real pip runs against wheels written by the test and served with ``--find-links`` (never the
public index); the read-only check runs the environment's interpreter inside the real sandbox.
"""

from __future__ import annotations

import asyncio
import errno
import inspect
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from wheels import write_sdist, write_wheel

from provider.environments import (
    FAILURE_TTL,
    MAX_BUILDS,
    EnvironmentBuildError,
    Environments,
    advertised_packages,
    canonical_requirement,
    requirement_key,
)
from provider.sandbox import Limits, cleanup, probe_isolation, sandbox_spec

#: Environments must live where a task can see them: not under a temp dir the sandbox replaces.
ENVS_PARENT = Path(os.environ.get("DECOMPUTE_TEST_ENVS", "/var/cache"))


@pytest.fixture
def wheelhouse(tmp_path: Path) -> Path:
    folder = tmp_path / "wheels"
    folder.mkdir()
    write_wheel(folder, "tinypkg", "1.2.0", "VALUE = 42\n")
    write_wheel(folder, "otherpkg", "0.3.0", "VALUE = 'other'\n")
    write_wheel(folder, "needsdep", "1.0.0", "import tinypkg\nVALUE = tinypkg.VALUE + 1\n",
                requires=("tinypkg>=1",))
    for name in ("bulka", "bulkb", "bulkc"):  # ~1 MiB each, incompressible: sizes for quotas
        write_wheel(folder, name, "1.0", "", extra={"blob.bin": os.urandom(1 << 20)})
    return folder


@pytest.fixture
def envs_root() -> Iterator[Path]:
    if not os.access(ENVS_PARENT, os.W_OK):
        pytest.skip(f"{ENVS_PARENT} is not writable (set DECOMPUTE_TEST_ENVS to a folder outside "
                    f"/tmp that a task's uid can traverse)")
    root = Path(tempfile.mkdtemp(prefix="decompute-envs-test-", dir=ENVS_PARENT))
    os.chmod(root, 0o755)
    yield root / "envs"
    for dirpath, dirs, _files in os.walk(root):
        for d in dirs:
            os.chmod(os.path.join(dirpath, d), 0o755)
    shutil.rmtree(root, ignore_errors=True)


def test_requirement_key_is_order_and_spelling_independent() -> None:
    a = requirement_key(["Scikit_Learn>=1.5", "numpy <3, >=2"])
    b = requirement_key(["numpy>=2,<3", "scikit-learn >= 1.5"])
    assert a == b
    assert canonical_requirement("Foo.Bar[B,a] >=1 ; python_version >= '3.8'") == \
        'foo-bar[a,b]>=1; python_version >= "3.8"'


def test_advertised_packages_are_canonical_and_bounded() -> None:
    ads = advertised_packages()
    assert ads["cloudpickle"] and ads["msgpack"]
    assert all(name == name.lower() and "_" not in name for name in ads)


def test_builds_once_for_concurrent_tasks_and_reuses_it(wheelhouse: Path,
                                                        envs_root: Path) -> None:
    envs = Environments(envs_root, find_links=str(wheelhouse))

    async def scenario() -> tuple[list, float, float]:
        t0 = time.monotonic()
        built = await asyncio.gather(*(envs.get(["tinypkg>=1"]) for _ in range(4)))
        build_s = time.monotonic() - t0
        t1 = time.monotonic()
        again = await envs.get(["TinyPkg >= 1"])
        return [*built, again], build_s, time.monotonic() - t1

    found, build_s, reuse_s = asyncio.run(scenario())
    assert envs.builds == 1, "four concurrent tasks and a later one share one build"
    assert len({e.path for e in found}) == 1
    assert reuse_s < build_s / 20 and reuse_s < 0.05, (build_s, reuse_s)
    out = subprocess.run([found[0].python, "-c", "import tinypkg, cloudpickle, gateway; "
                          "print(tinypkg.VALUE, tinypkg.__file__)"],
                         capture_output=True, text=True, check=True).stdout.split()
    assert out[0] == "42" and out[1].startswith(str(found[0].site_packages))
    print(f"build {build_s:.2f} s, reuse {reuse_s * 1000:.2f} ms")


def test_dependencies_come_from_wheels_too(wheelhouse: Path, envs_root: Path) -> None:
    envs = Environments(envs_root, find_links=str(wheelhouse))
    env = asyncio.run(envs.get(["needsdep"]))
    out = subprocess.run([env.python, "-c", "import needsdep; print(needsdep.VALUE)"],
                         capture_output=True, text=True, check=True).stdout
    assert out.strip() == "43"


def test_sdist_only_requirement_is_refused_and_nothing_runs(tmp_path: Path, wheelhouse: Path,
                                                            envs_root: Path) -> None:
    ran = tmp_path / "setup-py-ran"
    write_sdist(wheelhouse, "sdistonly", "1.0",
                f"open({str(ran)!r}, 'w').write('ran')\nfrom setuptools import setup\nsetup()\n")
    envs = Environments(envs_root, find_links=str(wheelhouse))
    with pytest.raises(EnvironmentBuildError) as err:
        asyncio.run(envs.get(["sdistonly"]))
    text = str(err.value)
    assert "sdistonly" in text and "wheels only" in text
    assert "from versions: none" in text or "No matching distribution" in text, text
    assert not ran.exists(), "the sdist's setup.py must never run"
    assert envs.cached() == [], "a failed build leaves nothing behind"
    # The next tasks with that set get the same error at once, without another pip run...
    with pytest.raises(EnvironmentBuildError, match="sdistonly"):
        asyncio.run(envs.get(["sdistonly"]))
    assert envs.builds == 1
    # ...until FAILURE_TTL has passed (the index may have gained a wheel since).
    envs._failed = {k: (t - FAILURE_TTL, e) for k, (t, e) in envs._failed.items()}
    with pytest.raises(EnvironmentBuildError):
        asyncio.run(envs.get(["sdistonly"]))
    assert envs.builds == 2


def test_unknown_requirement_fails_with_pips_reason(wheelhouse: Path, envs_root: Path) -> None:
    envs = Environments(envs_root, find_links=str(wheelhouse))
    with pytest.raises(EnvironmentBuildError, match="nosuchpkg"):
        asyncio.run(envs.get(["nosuchpkg>=1"]))


def test_quota_evicts_the_least_recently_used_unused_environment(wheelhouse: Path,
                                                                 envs_root: Path) -> None:
    envs = Environments(envs_root, find_links=str(wheelhouse), quota=int(2.6 * (1 << 20)))

    async def scenario() -> list[str]:
        a = await envs.get(["bulka"])
        b = await envs.get(["bulkb"])
        async with envs.using(["bulka"]):  # a is now the most recently used, and busy
            pass
        assert envs.usage() > 2 << 20
        c = await envs.get(["bulkc"])
        return [e.key for e in (a, b, c)]

    a, b, c = asyncio.run(scenario())
    kept = {e.key for e in envs.cached()}
    assert kept == {a, c}, "b, the least recently used, is evicted to fit the quota"
    assert not (envs_root / b).exists()
    assert envs.usage() <= envs.quota


def test_an_environment_in_use_is_not_evicted(wheelhouse: Path, envs_root: Path) -> None:
    envs = Environments(envs_root, find_links=str(wheelhouse), quota=int(1.5 * (1 << 20)))

    async def scenario() -> None:
        async with envs.using(["bulka"]) as a:
            await envs.get(["bulkb"])  # over quota, but a is running a task
            assert (envs_root / a.key).exists()

    asyncio.run(scenario())


def test_environment_bigger_than_the_quota_fails(wheelhouse: Path, envs_root: Path) -> None:
    envs = Environments(envs_root, find_links=str(wheelhouse), quota=256 << 10)
    with pytest.raises(EnvironmentBuildError, match="envs-quota"):
        asyncio.run(envs.get(["bulka"]))
    assert envs.cached() == []


def test_a_task_cannot_write_into_its_environment(wheelhouse: Path, envs_root: Path) -> None:
    iso = probe_isolation()
    if not iso.own_uid:
        pytest.skip("tasks share the provider's uid here (non-root): only the read-only bind "
                    "of the sandbox hook stops writes (see the report)")
    envs = Environments(envs_root, find_links=str(wheelhouse))
    env = asyncio.run(envs.get(["tinypkg"]))
    target = env.site_packages / "tinypkg" / "__init__.py"
    attack = (
        "import os, sys, tinypkg\n"
        "hits = []\n"
        "for p in (sys.argv[1], os.path.join(sys.argv[2], 'evil.pth'),"
        " os.path.join(sys.argv[2], 'tinypkg', 'evil.py')):\n"
        "    try:\n"
        "        open(p, 'a').write('import os')\n"
        "        hits.append(p)\n"
        "    except OSError:\n"
        "        pass\n"
        "try:\n"
        "    os.chmod(sys.argv[1], 0o666); hits.append('chmod')\n"
        "except OSError:\n"
        "    pass\n"
        "print('tinypkg', tinypkg.VALUE, 'wrote', hits)\n"
    )
    spec = sandbox_spec([env.python, "-c", attack, str(target), str(env.site_packages)],
                        limits=Limits(), isolation=iso)
    try:
        done = subprocess.run(spec.argv, env=spec.env, cwd=spec.cwd, preexec_fn=spec.preexec_fn,
                              capture_output=True, text=True, timeout=60, check=False)
    finally:
        cleanup(spec)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "tinypkg 42 wrote []", done.stdout
    assert target.read_text() == "VALUE = 42\n"


def test_needed_only_for_what_the_provider_lacks(envs_root: Path) -> None:
    envs = Environments(envs_root, find_links="/nonexistent")
    assert not envs.needed([])
    assert not envs.needed(["cloudpickle", "msgpack>=1"])
    assert envs.needed(["tinypkg"])
    assert envs.needed(["cloudpickle<0.1"])


def test_index_url_and_find_links_are_exclusive(envs_root: Path) -> None:
    with pytest.raises(ValueError, match="not both"):
        Environments(envs_root, index_url="https://example.invalid/simple", find_links="/x")


@pytest.mark.parametrize(("argv", "words"), [
    (["--find-links", "/"], "is for --install-packages"),
    (["--install-packages", "--find-links", "/no/such/folder"], "no such folder"),
    (["--install-packages", "--envs-dir", "/tmp/envs"], "temp folder"),
    (["--install-packages", "--envs-quota", "1MiB"], "64MiB"),
    (["--install-packages", "--index-url", "https://x.invalid", "--find-links", "/"],
     "not allowed with"),
])
def test_provider_flags_are_checked(argv: list[str], words: str,
                                    capsys: pytest.CaptureFixture[str]) -> None:
    from provider.__main__ import parse_args

    with pytest.raises(SystemExit):
        parse_args(argv)
    assert words in capsys.readouterr().err


def test_envs_dir_inside_the_key_folder_is_refused(tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    from provider.__main__ import parse_args

    monkeypatch.setenv("DECOMPUTE_HOME", str(ENVS_PARENT / "keys"))
    with pytest.raises(SystemExit):
        parse_args(["--install-packages", "--envs-dir", str(ENVS_PARENT / "keys" / "envs")])
    assert "tasks cannot see" in capsys.readouterr().err


READONLY_HOOK = "readonly_paths" in inspect.signature(sandbox_spec).parameters


@pytest.mark.skipif(not READONLY_HOOK, reason="sandbox_spec has no readonly_paths yet (issue 13 "
                    "hook in provider/sandbox.py: the environments bound read-only)")
def test_the_read_only_bind_stops_a_write_whatever_the_file_modes(wheelhouse: Path,
                                                                  envs_root: Path) -> None:
    """Under a non-root provider a task shares the provider's uid and could undo read-only
    modes; the read-only bind of the environments folder holds anyway (EROFS)."""
    iso = probe_isolation()
    if not iso.hide:
        pytest.skip("no mount namespace here: nothing can be bound read-only")
    envs = Environments(envs_root, find_links=str(wheelhouse))
    env = asyncio.run(envs.get(["tinypkg"]))
    subprocess.run(["chmod", "-R", "a+w", str(env.path)], check=True)  # as if the uid were shared
    target = env.site_packages / "tinypkg" / "__init__.py"
    code = ("import sys\ntry:\n    open(sys.argv[1], 'a').write('x')\n    print('wrote')\n"
            "except OSError as exc:\n    print('refused', exc.errno)\n")
    seen = {}
    for name, readonly in (("open", []), ("bound", [envs.root])):
        spec = sandbox_spec([env.python, "-c", code, str(target)], limits=Limits(),
                            isolation=iso, readonly_paths=readonly)  # type: ignore[call-arg]
        try:
            done = subprocess.run(spec.argv, env=spec.env, cwd=spec.cwd,
                                  preexec_fn=spec.preexec_fn, capture_output=True, text=True,
                                  timeout=60, check=False)
        finally:
            cleanup(spec)
        seen[name] = done.stdout.strip()
    assert seen == {"open": "wrote", "bound": f"refused {errno.EROFS}"}, seen


def test_builds_of_many_sets_run_a_few_at_a_time(wheelhouse: Path, envs_root: Path) -> None:
    """A client asking for many different sets queues their builds (MAX_BUILDS pips at once)."""
    for i in range(6):
        write_wheel(wheelhouse, f"many{i}", "1.0", "")
    envs = Environments(envs_root, find_links=str(wheelhouse))

    async def scenario() -> None:
        await asyncio.gather(*(envs.get([f"many{i}"]) for i in range(6)))

    asyncio.run(scenario())
    assert envs.builds == 6 and envs.peak_builds == MAX_BUILDS
