"""Environments an installing provider builds for tasks' requirements (``--install-packages``).

One cached environment per requirement set, keyed by its sorted canonical requirements, under
``--envs-dir``. Each is a virtual environment (``python -m venv --without-pip``) of the provider's
own interpreter, *layered* on the provider's own packages by a ``.pth`` file that adds the
provider's site-packages after the environment's own: pip (run as ``pip --python ENV/bin/python``)
then sees what the provider already has and installs only what is missing or of another version,
into the environment; the provider's packages are never touched (pip does not uninstall what lies
outside the environment's prefix) and decompute's own imports keep working in the task process.
``venv --system-site-packages`` would layer on the *base* interpreter's packages instead, which
under a provider running from a virtualenv are not the provider's.

What keeps the volunteer safe while installing:

- **wheels only** (``--only-binary=:all:``): no package code runs at install time (an sdist would
  run its ``setup.py``); a requirement with only an sdist fails with pip's own reason;
- pip runs here, in the provider's process tree, **never with a task's privileges** and never in
  a task's sandbox; ``--isolated`` so no environment variable or config file changes what it does;
  only the index the volunteer named (``--index-url``) or a local folder (``--find-links``, with
  ``--no-index``) is used;
- the environment's files are made read-only (``a-w``) and belong to the provider: a task (its own
  uid under a root provider) cannot write into them. Under a non-root provider the task shares the
  provider's uid, so read-only modes are only a speed bump there (see the README);
- a disk quota (``--envs-quota``): after a build, the least recently used environments that no
  task is using are deleted until the cache fits; an environment bigger than the quota alone fails
  its tasks.

A build in progress delays only the tasks that need it (others keep running); concurrent tasks
with the same requirement set wait for one build, and at most ``MAX_BUILDS`` sets build at once; a
failed build fails them with pip's reason, and the tasks asking for that set in the next
``FAILURE_TTL`` seconds get the same error without another pip run. A file lock per set makes two
providers sharing ``--envs-dir`` build it once too.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import hashlib
import importlib
import importlib.metadata
import json
import logging
import os
import shutil
import site
import stat
import subprocess
import sys
import sysconfig
import threading
import time
from collections.abc import AsyncIterator, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from packaging.utils import canonicalize_name

from gateway.packages import unmet
from gateway.protocol import MAX_PACKAGE_NAME, MAX_PACKAGES, MAX_VERSION_LEN, parse_requirement

log = logging.getLogger(__name__)

#: Default disk quota of the environment cache.
DEFAULT_QUOTA = 5 << 30
#: Seconds one pip run may take before its build fails (a slow index, a huge wheel).
BUILD_TIMEOUT = 900.0
#: Lines of pip's error output kept in a failed build's message.
REASON_LINES = 12
#: pip runs at once, at most: a client asking for many different sets queues its builds
#: instead of running dozens of pips on the volunteer's machine.
MAX_BUILDS = 2
#: Seconds a failed build's error is given again without running pip (a client retrying an
#: uninstallable set must not make the provider run pip for each of its tasks).
FAILURE_TTL = 60.0
_READY = ".decompute-ready.json"  # written last: an environment without it is half built
_USED = ".decompute-last-used"  # its mtime is the environment's last use (LRU)
_PTH = "_decompute_provider.pth"


class EnvironmentBuildError(RuntimeError):
    """A requirement set could not be installed; the message carries pip's reason."""

    def as_error(self) -> dict[str, str]:
        """The task's error (a pool ``Outcome.error``): structured data, never a pickle."""
        return {"type": "EnvironmentBuildError", "module": "decompute", "traceback": "",
                "message": f"this provider could not build the task's environment: {self}"}


@dataclass(frozen=True, slots=True)
class Environment:
    """A built environment: run a task's worker with ``python``."""

    key: str
    path: Path
    requirements: tuple[str, ...]
    size: int = 0

    @property
    def python(self) -> str:
        return str(self.path / "bin" / "python")

    @property
    def site_packages(self) -> Path:
        return _site_packages(self.path)


def canonical_requirement(text: str) -> str:
    """One requirement written one way (name canonicalized, extras and specifiers sorted)."""
    req = parse_requirement(text)
    extras = f"[{','.join(sorted(canonicalize_name(e) for e in req.extras))}]" if req.extras else ""
    spec = ",".join(sorted(str(s) for s in req.specifier))
    marker = f"; {req.marker}" if req.marker is not None else ""
    return f"{canonicalize_name(req.name)}{extras}{spec}{marker}"


def requirement_key(requirements: Iterable[str]) -> tuple[tuple[str, ...], str]:
    """The sorted canonical requirement set and its cache key (a short hash of it)."""
    canon = tuple(sorted(set(map(canonical_requirement, requirements))))
    return canon, hashlib.sha256("\n".join(canon).encode()).hexdigest()[:24]


def default_envs_dir() -> str:
    """Where environments live by default: a system cache for a root provider (``/root`` is
    closed to the tasks' own uids), the user's cache otherwise; never a temp dir (the sandbox
    gives tasks a private one) nor the key folder (hidden from tasks)."""
    if os.geteuid() == 0:
        return "/var/cache/decompute/envs"
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(cache, "decompute", "envs")


def environment_args_problem(args: object, hidden: Sequence[str] = ()) -> str | None:
    """What is wrong with the provider's environment flags, or None (for argparse's error).
    ``hidden``: folders the sandbox hides from tasks (the key folder)."""
    installs = getattr(args, "install_packages", False)
    given = [flag for flag, attr in (("--index-url", "index_url"), ("--find-links", "find_links"))
             if getattr(args, attr, None)]
    if given and not installs:
        return f"{given[0]} is for --install-packages; add it to install packages for tasks"
    find_links = getattr(args, "find_links", None)
    if find_links and not os.path.isdir(find_links):
        return f"--find-links {find_links}: no such folder"
    envs_dir = os.path.realpath(getattr(args, "envs_dir", "") or default_envs_dir())
    if installs and any(envs_dir == d or envs_dir.startswith(d + "/")
                        for d in ("/tmp", "/var/tmp", "/dev/shm")):
        return (f"--envs-dir {envs_dir} is under a temp folder, which every task sees as a "
                f"fresh empty one: pick a folder elsewhere")
    for folder in map(os.path.realpath, hidden):
        if installs and (envs_dir == folder or envs_dir.startswith(folder + "/")):
            return (f"--envs-dir {envs_dir} is inside {folder}, which tasks cannot see: pick a "
                    f"folder elsewhere")
    quota = getattr(args, "envs_quota", DEFAULT_QUOTA)
    if installs and quota < 64 << 20:
        return "--envs-quota below 64MiB holds no useful environment"
    return None


def advertised_packages(path: Sequence[str] | None = None) -> dict[str, str]:
    """``{canonical name: version}`` of the distributions importable on ``path`` (default: this
    interpreter's, which the task processes share), bounded as the protocol bounds them."""
    out: dict[str, str] = {}
    dists = importlib.metadata.distributions(path=list(path) if path is not None else sys.path)
    for dist in dists:
        name, version = dist.metadata["Name"], dist.version
        if not name or not version:
            continue
        name = canonicalize_name(name)
        if len(name) > MAX_PACKAGE_NAME or len(version) > MAX_VERSION_LEN or name in out:
            continue  # the first on the path is the one imported
        out[name] = version
        if len(out) >= MAX_PACKAGES:
            log.warning("more than %d distributions installed: advertising the first %d",
                        MAX_PACKAGES, MAX_PACKAGES)
            break
    return out


def refreshed_packages(current: Mapping[str, str]) -> dict[str, str] | None:
    """The advertised packages read again, or None when they did not change (the provider
    then has nothing to tell the gateway). A few ms per hundred distributions: run it off the
    event loop, once a minute or so."""
    importlib.invalidate_caches()  # a distribution installed since the last look
    fresh = advertised_packages()
    return None if fresh == dict(current) else fresh


def _site_packages(env: Path) -> Path:
    return env / "lib" / f"python{sys.version_info[0]}.{sys.version_info[1]}" / "site-packages"


def _base_site_dirs() -> list[str]:
    """The provider's own site-packages (its virtualenv's, else the interpreter's)."""
    dirs = [*site.getsitepackages(), sysconfig.get_paths()["purelib"]]
    return [d for d in dict.fromkeys(os.path.realpath(d) for d in dirs) if os.path.isdir(d)]


def _tree_size(path: Path) -> int:
    total = 0
    for root, _dirs, files in os.walk(path):
        for name in files:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(root, name)).st_blocks * 512
    return total


def _set_writable(path: Path, writable: bool) -> None:
    """Read-only (``a-w``) or owner-writable, the whole tree; symlinks are left alone."""
    for root, dirs, files in os.walk(path):
        for name in [*dirs, *files, None]:
            p = os.path.join(root, name) if name else root
            with contextlib.suppress(OSError):
                st = os.lstat(p)
                if stat.S_ISLNK(st.st_mode):
                    continue
                mode = stat.S_IMODE(st.st_mode)
                os.chmod(p, (mode | stat.S_IWUSR) if writable
                         else mode & ~(stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH))


def _remove(path: Path) -> None:
    _set_writable(path, True)
    shutil.rmtree(path, ignore_errors=True)


def _pip_reason(stderr: str, stdout: str) -> str:
    """pip's own words for a failure: its ERROR lines, else the tail of its output."""
    lines = [ln for ln in (stderr + "\n" + stdout).splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.lstrip().startswith("ERROR")]
    return "\n".join((errors or lines)[-REASON_LINES:]) or "pip failed without a message"


@dataclass
class Environments:
    """The environment cache of one provider (or of several sharing ``root``)."""

    root: Path
    index_url: str | None = None
    find_links: str | None = None
    quota: int = DEFAULT_QUOTA
    python: str = sys.executable
    timeout: float = BUILD_TIMEOUT
    #: Builds run so far by this object, and the most that ran at once (tests read them).
    builds: int = field(default=0, init=False)
    peak_builds: int = field(default=0, init=False)
    _running_builds: int = field(default=0, init=False, repr=False)
    _building: dict[str, asyncio.Future] = field(default_factory=dict, init=False, repr=False)
    _failed: dict[str, tuple[float, EnvironmentBuildError]] = field(
        default_factory=dict, init=False, repr=False)
    _slots: threading.BoundedSemaphore = field(
        default_factory=lambda: threading.BoundedSemaphore(MAX_BUILDS), init=False, repr=False)
    _count_lock: threading.Lock = field(default_factory=threading.Lock, init=False, repr=False)
    _in_use: dict[str, int] = field(default_factory=dict, init=False, repr=False)
    _own: dict[str, str] | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        if self.index_url and self.find_links:
            raise ValueError("give --index-url or --find-links, not both")
        self.root = Path(self.root).resolve()
        self.root.mkdir(parents=True, exist_ok=True)
        # Tasks (their own uid under a root provider) must traverse to their environment.
        os.chmod(self.root, 0o755)
        (self.root / ".locks").mkdir(mode=0o700, exist_ok=True)

    # ---------------------------------------------------------------- what a task needs

    def own_packages(self) -> dict[str, str]:
        """What the provider's task processes import without an environment (read once)."""
        if self._own is None:
            self._own = advertised_packages()
        return self._own

    def needed(self, requirements: Sequence[str]) -> bool:
        """Whether a task with these requirements needs an environment (the provider's own
        packages do not meet them)."""
        python = f"{sys.version_info[0]}.{sys.version_info[1]}"
        return bool(requirements) and bool(unmet(requirements, self.own_packages(), False,
                                                 python))

    # ---------------------------------------------------------------- the cache

    def path_of(self, key: str) -> Path:
        return self.root / key

    def ready(self, key: str) -> Environment | None:
        path = self.path_of(key)
        try:
            info = json.loads((path / _READY).read_text())
        except (OSError, ValueError):
            return None
        return Environment(key, path, tuple(info.get("requirements", ())), int(info.get("size", 0)))

    def cached(self) -> list[Environment]:
        """Built environments, least recently used first."""
        envs = [env for p in self.root.iterdir() if not p.name.startswith(".")
                and (env := self.ready(p.name)) is not None]
        return sorted(envs, key=lambda e: self._last_used(e.path))

    def usage(self) -> int:
        """Bytes the cache's built environments take (as measured after each build)."""
        return sum(env.size for env in self.cached())

    @staticmethod
    def _last_used(path: Path) -> float:
        try:
            return (path / _USED).stat().st_mtime
        except OSError:
            return 0.0

    def _touch(self, env: Environment) -> None:
        with contextlib.suppress(OSError):  # the owner may set times on a read-only file
            now = time.time()
            os.utime(env.path / _USED, (now, now))

    # ---------------------------------------------------------------- using one

    @contextlib.asynccontextmanager
    async def using(self, requirements: Sequence[str]) -> AsyncIterator[Environment]:
        """The environment for ``requirements``, built if needed, kept from eviction while the
        block runs. Raises :class:`EnvironmentBuildError` with pip's reason."""
        env = await self.hold(requirements)
        try:
            yield env
        finally:
            self.release(env)

    async def hold(self, requirements: Sequence[str]) -> Environment:
        """:meth:`get`, and keep the environment from eviction until :meth:`release`."""
        env = await self.get(requirements)
        self._in_use[env.key] = self._in_use.get(env.key, 0) + 1
        return env

    def release(self, env: Environment) -> None:
        """A task that held ``env`` ended: it may be evicted again once nobody holds it."""
        left = self._in_use.get(env.key, 1) - 1
        if left > 0:
            self._in_use[env.key] = left
        else:
            self._in_use.pop(env.key, None)
        self._touch(env)

    async def get(self, requirements: Sequence[str]) -> Environment:
        """The built environment for ``requirements``: from the cache, from a build already
        under way (waits for it), or from a new build."""
        canon, key = requirement_key(requirements)
        env = self.ready(key)
        if env is not None:
            self._touch(env)
            return env
        failed = self._failed.get(key)
        if failed is not None and time.monotonic() - failed[0] < FAILURE_TTL:
            raise failed[1]
        building = self._building.get(key)
        if building is None:
            building = asyncio.ensure_future(asyncio.to_thread(self._build, canon, key))
            self._building[key] = building
            building.add_done_callback(lambda f: self._built(key, f))
        return await asyncio.shield(building)

    def _built(self, key: str, fut: asyncio.Future) -> None:
        self._building.pop(key, None)
        exc = None if fut.cancelled() else fut.exception()  # retrieved: waiters re-raise it
        if isinstance(exc, EnvironmentBuildError):
            self._failed[key] = (time.monotonic(), exc)
            for old in [k for k, (t, _) in self._failed.items()
                        if time.monotonic() - t >= FAILURE_TTL]:
                del self._failed[old]
        if exc is not None:
            log.warning("environment %s failed: %s", key, exc)

    # ---------------------------------------------------------------- building (a thread)

    def _build(self, canon: tuple[str, ...], key: str) -> Environment:
        lock = os.open(self.root / ".locks" / key, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(lock, fcntl.LOCK_EX)  # another provider on this cache may be building it
            env = self.ready(key)
            if env is not None:
                return env
            with self._slots, self._count_build():  # MAX_BUILDS pips at once
                started = time.monotonic()
                env = self._install(canon, key)
            log.info("environment %s built in %.1f s (%d MiB): %s", key,
                     time.monotonic() - started, env.size >> 20, ", ".join(canon))
        finally:
            os.close(lock)
        self._evict(keep=key)
        return env

    @contextlib.contextmanager
    def _count_build(self) -> Iterator[None]:
        with self._count_lock:
            self.builds += 1
            self._running_builds += 1
            self.peak_builds = max(self.peak_builds, self._running_builds)
        try:
            yield
        finally:
            with self._count_lock:
                self._running_builds -= 1

    def _install(self, canon: tuple[str, ...], key: str) -> Environment:
        path = self.path_of(key)
        if path.exists():  # half built by a provider that died: start over
            _remove(path)
        try:
            self._run([self.python, "-m", "venv", "--without-pip", str(path)], "create the venv")
            site_dir = _site_packages(path)
            lines = [f"import site; site.addsitedir({d!r})" for d in _base_site_dirs()]
            (site_dir / _PTH).write_text("\n".join(lines) + "\n")
            self._run(self._pip_command(path, canon), f"install {', '.join(canon)}")
            size = _tree_size(path)
            if size > self.quota:
                raise EnvironmentBuildError(
                    f"the environment for {', '.join(canon)} takes {size >> 20} MiB, more than "
                    f"this provider's --envs-quota ({self.quota >> 20} MiB)")
            (path / _READY).write_text(json.dumps({"requirements": list(canon), "size": size,
                                                   "built": time.time()}))
            (path / _USED).touch()
            _set_writable(path, False)
            return Environment(key, path, canon, size)
        except BaseException:
            _remove(path)
            raise

    def _pip_command(self, env: Path, canon: Sequence[str]) -> list[str]:
        source = (["--no-index", "--find-links", self.find_links] if self.find_links
                  else ["--index-url", self.index_url] if self.index_url else [])
        return [sys.executable, "-m", "pip", "--isolated", "--python", str(env / "bin" / "python"),
                "install", "--only-binary=:all:", "--no-input", "--disable-pip-version-check",
                "--no-warn-script-location", "--progress-bar", "off", "--no-cache-dir", *source,
                *canon]  # each parsed as PEP 508 (a name first): none can pass for an option

    def _run(self, argv: list[str], what: str) -> None:
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LANG": "C.UTF-8",
               "HOME": str(self.root / ".locks")}
        try:
            done = subprocess.run(argv, capture_output=True, text=True, timeout=self.timeout,
                                  env=env, cwd=self.root, stdin=subprocess.DEVNULL,
                                  preexec_fn=lambda: os.umask(0o022), check=False)
        except subprocess.TimeoutExpired:
            raise EnvironmentBuildError(f"could not {what}: pip took over {self.timeout:.0f} s"
                                        ) from None
        if done.returncode != 0:
            raise EnvironmentBuildError(f"could not {what} (wheels only, no code runs at "
                                        f"install):\n{_pip_reason(done.stderr, done.stdout)}")

    def _evict(self, keep: str) -> list[str]:
        """Delete least recently used environments no task uses until the cache fits."""
        envs = self.cached()
        total = sum(e.size for e in envs)
        evicted = []
        for env in envs:
            if total <= self.quota:
                break
            if env.key == keep or self._in_use.get(env.key) or env.key in self._building:
                continue
            _remove(env.path)
            total -= env.size
            evicted.append(env.key)
            log.info("environment %s evicted (least recently used; cache over --envs-quota): "
                     "%s", env.key, ", ".join(env.requirements))
        return evicted
