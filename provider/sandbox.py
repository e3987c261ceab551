"""How a provider starts a task worker, so the volunteer is safe from the client code it runs.

This module owns the *recipe* for a worker process: its command line (namespace and privilege
wrappers around the worker program), a scrubbed environment, a private working directory and the
rlimits set in the child. It never runs client code, never unpickles anything and never passes the
host environment through: everything the worker sees is built here from an allow-list.

What it protects against, where `probe_isolation()` finds the means (`describe()` says which):

- network: a new network namespace (`unshare -n` as root, `unshare -rn` in a user namespace
  otherwise) holds only a loopback device, down: no host, LAN or internet;
- the provider's key: the scrubbed env, private cwd and new HOME only stop *casual* access, a
  process with the provider's uid could still open the absolute path. So `hide_paths` (plus
  `$DECOMPUTE_HOME`, `~/.decompute`, `/root/.decompute`) get an empty mode-000 tmpfs in a private
  mount namespace, and the worker then drops every capability (`setpriv`) so it cannot unmount them;
- the rest of a root host: as root each worker runs as its own unused uid (61184-65519, systemd's
  DynamicUser range): no access to root's files or to other workers, and `cleanup()` kills all it
  left running. RLIMIT_NPROC is applied only where it counts this worker alone: that uid, or
  (non-root) inside the new user namespace via `prlimit`. Real root is exempt from it, and for a
  plain non-root user it would count all the user's processes, so there it is skipped;
- runaway use: address space, CPU seconds, file size, open files; core dumps are always off.

What it does not protect against: there is no seccomp filter, so the whole syscall surface of the
shared kernel is exposed (a kernel bug is an escape); CPU cores, caches, disk I/O and world-writable
dirs (/tmp, /dev/shm) are shared with the host, rlimits bound totals not bandwidth; a GPU the worker
can open is not isolated; a non-root provider's worker keeps the provider's uid and can read all
that user can outside the hidden paths. Where no namespace can be created, the provider must say so
loudly at start (`describe()`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import grp
import importlib.util
import logging
import os
import pwd
import random
import resource
import shutil
import stat
import subprocess
import sys
import tempfile
import threading
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from functools import cache
from pathlib import Path

log = logging.getLogger(__name__)

SAFE_PATH = "/usr/local/bin:/usr/bin:/bin"
_TOOL_PATH = "/usr/sbin:/usr/bin:/sbin:/bin"  # where we look for unshare & co, never the host PATH
_UID_RANGE = range(61184, 65520)  # systemd's DynamicUser range: mapped even in most containers
_PROBE_TIMEOUT = 5.0
_COPIED_ENV = ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE")  # OpenBLAS misdetects some CPUs here
# Runs inside the new mount namespace: $1 is mount(8), then paths up to "--", then the program.
_HIDE_SCRIPT = (
    'm=$1; shift; while [ "$1" != "--" ]; do if [ -d "$1" ]; then '
    '"$m" -t tmpfs -o size=4k,mode=0,nosuid,nodev,noexec hidden "$1" || exit 125; '
    'else "$m" --bind /dev/null "$1" || exit 125; fi; shift; done; shift; '
    'unset PWD OLDPWD; exec "$@"'
)
_PROBE_CHECK = """import os, sys, provider
if sys.argv[2] and os.path.exists(sys.argv[1]):
    sys.exit("the probe key is visible")
print("%d.%d.%d" % sys.version_info[:3])"""
_VERSION = ".".join(map(str, sys.version_info[:3]))

_uid_lock = threading.Lock()
_uid_claims: dict[int, int] = {}  # uid -> fd holding flock on its claim file, until cleanup()


@dataclass(frozen=True, slots=True)
class Limits:
    """Per-worker resource ceilings; None leaves the provider's own limit in place."""

    memory_bytes: int | None = None  # RLIMIT_AS: past it allocations raise MemoryError
    cpu_seconds: int | None = None  # RLIMIT_CPU: past it the kernel sends SIGKILL
    file_bytes: int | None = None  # RLIMIT_FSIZE: past it writes fail with EFBIG
    processes: int | None = None  # RLIMIT_NPROC, only where it counts this worker alone
    open_files: int | None = None  # RLIMIT_NOFILE


@dataclass(frozen=True, slots=True)
class Isolation:
    """What this host lets us do; found once by `probe_isolation()`."""

    network: bool
    method: str  # "unshare -n" | "unshare -rn" | "none"
    reason: str
    hide: bool = False  # private mount namespace: hidden paths get an empty tmpfs
    own_uid: bool = False  # root only: each worker runs as its own unused uid

    @property
    def strength(self) -> str:
        return "strong" if self.network else "weak"


@dataclass(frozen=True, slots=True)
class SandboxSpec:
    """Everything `create_subprocess_exec`/`Popen` needs; pass `start_new_session=True` too."""

    argv: list[str]
    env: dict[str, str]
    cwd: str
    preexec_fn: Callable[[], None]
    uid: int | None = None  # the worker's own uid (root providers), released by cleanup()


@cache
def _tool(name: str) -> str | None:
    return shutil.which(name, path=_TOOL_PATH)


def _candidates() -> list[Isolation]:
    """Strongest first; the probe keeps the first one that really runs a worker here."""
    root = os.geteuid() == 0
    unshare, setpriv, mount = _tool("unshare"), _tool("setpriv"), _tool("mount")
    combos: list[tuple[str, bool, bool]] = []
    # A root without CAP_SYS_ADMIN (some containers) may still create a user namespace.
    for method in (["unshare -n", "unshare -rn"] if root else ["unshare -rn"]) if unshare else []:
        own = [True, False] if root and setpriv and method == "unshare -n" else [False]
        combos += [(method, True, u) for u in own] if setpriv and mount else []
        combos += [(method, False, u) for u in own]
    combos += [("none", False, True)] if root else []
    user = "root without capabilities" if root else "the provider's uid"
    return [Isolation(m != "none", m, "; ".join([
        f"no network ({m})" if m != "none" else "network reachable",
        "key dirs hidden (mount namespace)" if h else "key dirs NOT hidden",
        "each task runs as its own uid" if u else f"tasks run as {user}"]), h, u)
        for m, h, u in combos]


def _works(candidate: Isolation) -> tuple[str | None, str]:
    """Run a worker-like program under `candidate`: (why it failed or None, worker's Python)."""
    with tempfile.TemporaryDirectory(prefix="decompute-probe-") as tmp:
        (key := Path(tmp, "keys", "key")).parent.mkdir()
        key.write_text("probe")
        hide = "1" if candidate.hide or candidate.own_uid else ""
        spec = None
        try:
            spec = sandbox_spec([sys.executable, "-c", _PROBE_CHECK, str(key), hide],
                                limits=Limits(processes=64), isolation=candidate,
                                hide_paths=[key.parent])
            done = subprocess.run(spec.argv, env=spec.env, cwd=spec.cwd, preexec_fn=spec.preexec_fn,
                                  stdin=subprocess.DEVNULL, capture_output=True, text=True,
                                  timeout=_PROBE_TIMEOUT, check=False)
        except (OSError, RuntimeError, ValueError, subprocess.SubprocessError) as exc:
            return f"{candidate.method}: {exc}", ""
        finally:
            if spec is not None:
                cleanup(spec)
    version, err = done.stdout.strip(), done.stderr.strip().splitlines()
    if done.returncode != 0:
        return f"{candidate.method}: exit {done.returncode}{': ' + err[-1] if err else ''}", ""
    if version.rsplit(".", 1)[0] != _VERSION.rsplit(".", 1)[0]:
        return f"{candidate.method}: worker runs Python {version}", ""
    return None, version


@cache
def probe_isolation() -> Isolation:
    """Find (once per process) the strongest isolation this host really supports."""
    failed = "unshare(1) not found"
    for candidate in _candidates():
        why, version = _works(candidate)
        if why is not None:
            log.debug("sandbox candidate rejected: %s", why)
            failed = why if why.startswith("unshare") else failed
            continue
        reason = candidate.reason if candidate.network else f"{candidate.reason} ({failed})"
        if version != _VERSION:  # e.g. a task uid may not read a pyenv under a 0700 /root
            reason += f"; worker Python {version} (provider {_VERSION})"
        log.info("sandbox isolation: %s", reason)
        return dataclasses.replace(candidate, reason=reason)
    who = "ROOT, unconfined" if os.geteuid() == 0 else "the provider's uid"
    return Isolation(False, "none", f"cannot create a network namespace here ({failed}); "
                     f"key dirs NOT hidden; tasks run as {who}")


def describe(isolation: Isolation) -> str:
    """One line for the provider's start-up log; loud when tasks can reach the network."""
    if isolation.network:
        return f"sandbox: strong; {isolation.reason}"
    return (f"WARNING: tasks can reach the network (weak sandbox): {isolation.reason}. "
            "Run the provider on Linux where `unshare -n` (root) or `unshare -rn` works.")


def default_hide_paths() -> list[Path]:
    """Where provider keys live by default: always hidden, whatever the caller passes."""
    paths = [Path(os.environ.get("DECOMPUTE_HOME") or "~/.decompute"), Path("/root/.decompute")]
    with contextlib.suppress(RuntimeError, KeyError):  # a uid with no home at all
        paths.append(Path.home() / ".decompute")
    return paths


def _hidden(paths: Iterable[Path | str], cwd: str) -> list[str]:
    found: list[str] = []
    for path in paths:
        try:
            real = os.path.realpath(os.path.expanduser(path), strict=True)
        except OSError:  # absent, or unreadable even to us: nothing a worker could read either
            continue
        if Path(cwd).resolve().is_relative_to(real):
            raise ValueError(f"workdir {cwd} is inside hidden path {real}; pick another root")
        found += [] if real in found else [real]
    return found


@cache
def _package_path() -> str:
    """PYTHONPATH that makes `provider` and `gateway` import, from where they are installed."""
    spec = importlib.util.find_spec("gateway")
    dirs = [Path(__file__).resolve().parent, *(spec and spec.submodule_search_locations or [])]
    return os.pathsep.join(dict.fromkeys(str(Path(d).resolve().parent) for d in dirs))


def _scrubbed_env(cwd: str, extra_env: Mapping[str, str] | None) -> dict[str, str]:
    env = {
        "PATH": SAFE_PATH, "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8", "HOME": cwd, "TMPDIR": cwd,
        "PYTHONUNBUFFERED": "1", "PYTHONDONTWRITEBYTECODE": "1", "PYTHONNOUSERSITE": "1",
        "PYTHONPATH": _package_path(),
        # One BLAS thread per worker: the provider sells cores by the task, not by the library.
        "OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
    }
    env.update({name: os.environ[name] for name in _COPIED_ENV if name in os.environ})
    env.update(extra_env or {})
    return env


def _rlimits(limits: Limits, with_nproc: bool) -> list[tuple[int, int]]:
    wanted = [
        (resource.RLIMIT_AS, limits.memory_bytes), (resource.RLIMIT_CPU, limits.cpu_seconds),
        (resource.RLIMIT_FSIZE, limits.file_bytes), (resource.RLIMIT_NOFILE, limits.open_files),
        (resource.RLIMIT_CORE, 0),  # a core dump of a 4 GiB worker would fill the volunteer's disk
        (resource.RLIMIT_NPROC, limits.processes if with_nproc else None),
    ]
    out = []
    for which, value in wanted:
        if value is not None:
            hard = resource.getrlimit(which)[1]  # a non-root child may not raise its hard limit
            out.append((which, value if hard == resource.RLIM_INFINITY else min(value, hard)))
    return out


def _preexec(rlimits: list[tuple[int, int]], uid: int | None) -> Callable[[], None]:
    def apply() -> None:  # runs in the child between fork and exec: keep it to plain syscalls
        os.umask(0o077)
        for which, value in rlimits:
            resource.setrlimit(which, (value, value))
        if uid is not None:
            os.setgroups([])
            os.setgid(uid)
            os.setuid(uid)

    return apply


def _claim(uid: int, busy: set[int], claims: Path) -> bool:
    """Take `uid` if no account, group or process uses it and no other provider holds it."""
    if uid in busy or uid in _uid_claims:
        return False
    for lookup in (pwd.getpwuid, grp.getgrgid):
        with contextlib.suppress(KeyError):
            lookup(uid)
            return False  # an account or group has it: its files would become the task's
    fd = os.open(claims / str(uid), os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o600)
    try:  # flock dies with its holder, so a crashed provider frees its uids by itself
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        return False
    _uid_claims[uid] = fd
    return True


def _allocate_uid() -> int:
    # cleanup() kills every process of the uid: it must be ours alone, across providers too.
    claims = Path("/run" if os.access("/run", os.W_OK) else tempfile.gettempdir(), "decompute-uids")
    claims.mkdir(mode=0o700, exist_ok=True)
    if not stat.S_ISDIR((st := os.lstat(claims)).st_mode) or st.st_uid != os.geteuid():
        raise RuntimeError(f"{claims} is not a directory of ours; remove it")
    busy: set[int] = set()
    for entry in os.scandir("/proc"):  # uids of running processes (owners of /proc/PID)
        with contextlib.suppress(OSError):  # the process may be gone by now
            busy |= {entry.stat().st_uid} if entry.name.isdigit() else set()
    with _uid_lock:
        for uid in random.sample(_UID_RANGE, len(_UID_RANGE)):
            if _claim(uid, busy, claims):
                return uid
    raise RuntimeError("no free sandbox uid left; clean up finished workers")


def _wrap(program: list[str], iso: Isolation, hidden: list[str], uid: int | None,
          nproc: int | None) -> list[str]:
    if not iso.network:
        return list(program)
    argv = [_tool("unshare") or "unshare", *(["-r"] if iso.method == "unshare -rn" else []), "-n"]
    if iso.hide:
        argv.append("-m")  # unshare(1) makes the new mount tree private: nothing leaks to the host
        if hidden:
            argv += ["/bin/sh", "-c", _HIDE_SCRIPT, "decompute-hide", _tool("mount") or "mount",
                     *hidden, "--"]
    if setpriv := _tool("setpriv"):
        # No capabilities left, so the hiding mounts cannot be undone; uid switch for root.
        argv += [setpriv, "--inh-caps=-all", "--bounding-set=-all", "--no-new-privs"]
        argv += [f"--reuid={uid}", f"--regid={uid}", "--clear-groups"] if uid is not None else []
        argv.append("--")
    if nproc is not None and iso.method == "unshare -rn" and (prlimit := _tool("prlimit")):
        argv += [prlimit, f"--nproc={nproc}:{nproc}", "--"]  # counted inside the new user ns
    return argv + list(program)


def sandbox_spec(program: list[str], *, limits: Limits, workdir_root: Path | None = None,
                 extra_env: Mapping[str, str] | None = None, isolation: Isolation | None = None,
                 hide_paths: Iterable[Path | str] | None = None) -> SandboxSpec:
    """Build how to start `program` sandboxed; the caller must `cleanup()` the spec afterwards.

    `hide_paths` must exist now (the key dir: create keys before workers). With a per-task uid,
    `workdir_root` must be searchable by others (o+x), as the default temp dir is.
    """
    iso = isolation or probe_isolation()
    root = Path(workdir_root) if workdir_root is not None else Path(tempfile.gettempdir())
    cwd = tempfile.mkdtemp(prefix="decompute-task-", dir=root)  # mode 0700, owned by us
    uid = None
    try:
        hidden = _hidden([*(hide_paths or []), *default_hide_paths()], cwd) if iso.hide else []
        if iso.own_uid:
            uid = _allocate_uid()
            os.chown(cwd, uid, uid)
    except BaseException:
        cleanup(SandboxSpec([], {}, cwd, lambda: None, uid))
        raise
    preexec = _preexec(_rlimits(limits, with_nproc=uid is not None),
                       uid if iso.method == "none" else None)  # else setpriv switches uid
    nproc = limits.processes if iso.method == "unshare -rn" else None
    argv = _wrap(program, iso, hidden, uid, nproc)
    return SandboxSpec(argv, _scrubbed_env(cwd, extra_env), cwd, preexec, uid)


def _unlock_dirs(top: str) -> None:
    """Give ourselves rwx on every real directory under `top`; symlinks are never followed."""
    stack = [top]
    while stack:
        with contextlib.suppress(OSError):
            os.chmod(directory := stack.pop(), 0o700)
            with os.scandir(directory) as entries:
                stack += [e.path for e in entries if e.is_dir(follow_symlinks=False)]


def cleanup(spec: SandboxSpec) -> None:
    """Kill leftovers (per-task uid only) and remove the working dir, never following links."""
    try:
        if spec.uid is not None and (kill := _tool("kill")):
            # Everything running as this uid is the task's, double-forked daemons included.
            subprocess.run([kill, "-9", "-1"], user=spec.uid, group=spec.uid, extra_groups=[],
                           env={}, stdin=subprocess.DEVNULL, capture_output=True, timeout=5,
                           check=False)
        with contextlib.suppress(FileNotFoundError):
            if not stat.S_ISDIR(os.lstat(spec.cwd).st_mode):  # swapped for a link: drop the link
                os.unlink(spec.cwd)
            shutil.rmtree(spec.cwd, ignore_errors=True)  # fd-based: never follows symlinks
            if os.path.lexists(spec.cwd):  # a non-root task left directories we may not enter
                _unlock_dirs(spec.cwd)
                shutil.rmtree(spec.cwd, ignore_errors=True)
        if os.path.lexists(spec.cwd):
            log.warning("could not fully remove sandbox dir %s", spec.cwd)
    finally:
        if spec.uid is not None:
            with _uid_lock:
                fd = _uid_claims.pop(spec.uid, None)
            if fd is not None:
                os.close(fd)
