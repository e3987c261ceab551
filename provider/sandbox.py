"""How a provider starts a task worker, so the volunteer is safe from the client code it runs.

This module owns the *recipe* for a worker process: its command line (namespace and privilege
wrappers around the worker program), a scrubbed environment, a private working directory and the
rlimits set in the child. It never runs client code, never unpickles anything and never passes the
host environment through: everything the worker sees is built here from an allow-list.

What it protects against, where `probe_isolation()` finds the means (`describe()` says which):

- network: a new network namespace (`unshare -n` as root, `unshare -rn` in a user namespace
  otherwise) holds only a loopback device, down: no host, LAN or internet;
- the provider's key and the host's secrets: the scrubbed env, private cwd and new HOME only stop
  *casual* access, a process with the provider's uid could still open the absolute path. So
  `hide_paths` (plus `$DECOMPUTE_HOME`, `~/.decompute`, `/root/.decompute` and `$DECOMPUTE_HIDE`,
  where a gateway lists its ledger and home for its local providers) get an empty mode-000 tmpfs
  (a file: /dev/null bound over it) in a private mount namespace, and the worker then drops every
  capability (`setpriv`) so it cannot unmount them;
- the host's temp dirs: /tmp, /var/tmp and /dev/shm are fresh tmpfs mounts (`Limits.tmp_bytes`
  each, in RAM) in that namespace, so no file or unix socket the host keeps there is reachable;
- the rest of a root host: as root each worker runs as its own unused uid (61184-65519, systemd's
  DynamicUser range): no access to root's files or to other workers, and `cleanup()` kills all it
  left running. RLIMIT_NPROC is applied only where it counts this worker alone: that uid, or
  (non-root) inside the new user namespace via `prlimit`. Real root is exempt from it, and for a
  plain non-root user it would count all the user's processes, so there it is skipped;
- processes that outlive their task: every worker gets its own cgroup (v2, root), so the pool can
  see every process a task started (`sandbox_pids`), kill them all at once (`kill_cgroup`, also
  what setsid() escapes a process group with) and meter their CPU (`provider.metering`). Without
  a cgroup, a PID namespace (`unshare --pid --fork`) whose init (`_INIT_SCRIPT`) runs the worker
  and reaps orphans: all of it dies with the worker (its death by signal N reads as exit code
  128+N there). Else, the per-task uid is swept;
- runaway use: address space, CPU seconds, file size, open files and processes (`Limits` has
  defaults for all but memory); core dumps are always off.

What it does not protect against: there is no seccomp filter, so the whole syscall surface of the
shared kernel is exposed (a kernel bug is an escape); CPU cores, caches and disk I/O are shared
with the host, rlimits bound totals not bandwidth; a GPU the worker can open is not isolated; a
non-root provider's worker keeps the provider's uid and can read all that user can outside the
hidden paths. A provider killed by SIGKILL leaves a task's setsid() daemons running (cgroup mode)
until the next provider starts and sweeps its dead predecessors' cgroups. Where a defence is
missing, the provider must say so loudly at start (`describe()`) and advertise a weak sandbox.

The worker cgroups live in `provider.cgroups`, the hook run in the child before exec in
`provider.child_setup`; their names are re-exported here.
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
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass
from functools import cache
from pathlib import Path

# Moved out by concept; re-exported (`as`) so that every name stays importable from here.
from provider.cgroups import _CGROUP_PREFIX as _CGROUP_PREFIX
from provider.cgroups import _PROBE_TIMEOUT as _PROBE_TIMEOUT
from provider.cgroups import _cgroup_base as _cgroup_base
from provider.cgroups import _kill_cgroup as _kill_cgroup
from provider.cgroups import _new_cgroup as _new_cgroup
from provider.cgroups import cgroup_of as cgroup_of
from provider.cgroups import cgroup_pids as cgroup_pids
from provider.cgroups import kill_cgroup as kill_cgroup
from provider.child_setup import _PR_SET_PDEATHSIG as _PR_SET_PDEATHSIG
from provider.child_setup import _prctl as _prctl
from provider.child_setup import _preexec as _preexec

log = logging.getLogger(__name__)

SAFE_PATH = "/usr/local/bin:/usr/bin:/bin"
_TOOL_PATH = "/usr/sbin:/usr/bin:/sbin:/bin"  # where we look for unshare & co, never the host PATH
_UID_RANGE = range(61184, 65520)  # systemd's DynamicUser range: mapped even in most containers
_COPIED_ENV = ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE")  # OpenBLAS misdetects some CPUs here
# Runs inside the new mount namespace: $1 is mount(8), $2 the size of each private temp dir, then
# the paths to keep visible up to "--" (mount points made traversable by anyone), the paths to
# mount read-only up to "--", the paths to hide up to "--", then the program.
# /tmp, /var/tmp and /dev/shm get a fresh tmpfs each (no unix socket or file of the host's is
# reachable there). What must stay visible although it lives under one of them (the interpreter,
# the installed packages, the workdir) is bound back in place from an fd opened before (-c: the
# kernel follows /proc/self/fd/N, mount(8) would not). Hiding comes last, so a path kept visible
# never uncovers a hidden one; a hidden path that the temp mounts already removed is skipped.
_HIDE_SCRIPT = (
    'm=$1; s=$2; shift 2; w=$(pwd -P); exec 3<.; n=4; k=""; '
    r'while [ "$1" != "--" ]; do eval "exec $n<\"\$1\"" || exit 125; eval "p$n=\$1"; '
    'k="$k $n"; n=$((n+1)); shift; done; shift; '
    'for d in /tmp /var/tmp /dev/shm; do if [ -d "$d" ]; then '
    '"$m" -t tmpfs -o "size=$s,mode=1777,nosuid,nodev" decompute-tmp "$d" || exit 125; fi; done; '
    r'for i in $k; do eval "p=\$p$i"; [ -d "$p" ] || (umask 022; mkdir -p "$p") || exit 125; '
    '"$m" -c --bind "/proc/self/fd/$i" "$p" || exit 125; eval "exec $i<&-"; done; '
    '[ -d "$w" ] || { mkdir -p "$w" && "$m" -c --bind /proc/self/fd/3 "$w" || exit 125; }; '
    'cd "$w" || exit 125; exec 3<&-; '
    'while [ "$1" != "--" ]; do if [ -d "$1" ]; then "$m" --bind "$1" "$1" && '
    '"$m" -o remount,bind,ro "$1" || exit 125; fi; shift; done; shift; '
    'while [ "$1" != "--" ]; do if [ -d "$1" ]; then '
    '"$m" -t tmpfs -o size=4k,mode=0,nosuid,nodev,noexec hidden "$1" || exit 125; '
    'elif [ -e "$1" ]; then "$m" --bind /dev/null "$1" || exit 125; fi; shift; done; shift; '
    'unset PWD OLDPWD; exec "$@"'
)
#: The host's temp dirs, which a task sees as fresh empty tmpfs mounts.
PRIVATE_TMP_DIRS = ("/tmp", "/var/tmp", "/dev/shm")
# The init of a task's PID namespace: runs the worker as its child, reaps orphans, and exits with
# the worker's status (128+N for signal N). The worker must not be init itself: init ignores the
# signals it sends itself and never reaps, and util-linux 2.38's unshare(1) reports an init's
# death by a signal as exit code 1.
_INIT_SCRIPT = '"$@" & wait $!'
_PROBE_CHECK = """import os, sys, provider
if sys.argv[2] and os.path.exists(sys.argv[1]):
    sys.exit("the probe key is visible")
if sys.argv[3] and os.path.exists(sys.argv[3]):
    sys.exit("the host's /tmp is visible")
print("%d.%d.%d" % sys.version_info[:3])"""
_VERSION = ".".join(map(str, sys.version_info[:3]))


_uid_lock = threading.Lock()
_uid_claims: dict[int, int] = {}  # uid -> fd holding flock on its claim file, until cleanup()


@dataclass(frozen=True, slots=True)
class Limits:
    """Per-worker resource ceilings; None leaves the provider's own limit in place.

    The defaults bound what one runaway task can take from the volunteer; the pool recycles a
    warm worker before its CPU-time limit (counted over the process's life) could hit a task.
    """

    memory_bytes: int | None = None  # RLIMIT_AS: past it allocations raise MemoryError
    cpu_seconds: int | None = 24 * 3600  # RLIMIT_CPU: past it the kernel sends SIGXCPU/SIGKILL
    file_bytes: int | None = 16 << 30  # RLIMIT_FSIZE: past it writes fail with EFBIG
    processes: int | None = 256  # RLIMIT_NPROC (threads count), only where it counts this worker
    open_files: int | None = 4096  # RLIMIT_NOFILE
    tmp_bytes: int = 256 << 20  # each private tmpfs (/tmp, /var/tmp, /dev/shm): RAM, not disk


@dataclass(frozen=True, slots=True)
class Isolation:
    """What this host lets us do; found once by `probe_isolation()`."""

    network: bool
    method: str  # "unshare -n" | "unshare -rn" | "none"
    reason: str
    hide: bool = False  # private mount namespace: hidden paths, private /tmp, /var/tmp, /dev/shm
    own_uid: bool = False  # root only: each worker runs as its own unused uid
    pid: bool = False  # own PID namespace: the worker is its init, all dies with it
    cgroup: bool = False  # own cgroup (v2): leftovers found and killed, CPU of all metered

    @property
    def contained(self) -> bool:
        """Whether every process a task starts can be found and killed when it ends."""
        return self.pid or self.cgroup or self.own_uid

    @property
    def strength(self) -> str:
        return "strong" if self.network and self.hide and self.contained else "weak"


@dataclass(frozen=True, slots=True)
class SandboxSpec:
    """Everything `create_subprocess_exec`/`Popen` needs; pass `start_new_session=True` too."""

    argv: list[str]
    env: dict[str, str]
    cwd: str
    preexec_fn: Callable[[], None]
    uid: int | None = None  # the worker's own uid (root providers), released by cleanup()
    cgroup: str | None = None  # the worker's own cgroup directory, removed by cleanup()
    pid_namespace: bool = False  # argv[0] is unshare(1) and forks the worker as the ns init


@cache
def _tool(name: str) -> str | None:
    return shutil.which(name, path=_TOOL_PATH)


def _candidates() -> list[Isolation]:
    """Strongest first; the probe keeps the first one that really runs a worker here."""
    root = os.geteuid() == 0
    unshare, setpriv, mount = _tool("unshare"), _tool("setpriv"), _tool("mount")
    combos: list[tuple[str, bool, bool, bool]] = []
    # With a cgroup no PID namespace is needed: leftovers are found with one read (not a scan of
    # /proc), their CPU is metered exactly, and a worker's death by a signal keeps its name (an
    # init in between turns it into exit code 128+N).
    cgroup = _cgroup_base() is not None
    # A root without CAP_SYS_ADMIN (some containers) may still create a user namespace.
    for method in (["unshare -n", "unshare -rn"] if root else ["unshare -rn"]) if unshare else []:
        own = [True, False] if root and setpriv and method == "unshare -n" else [False]
        pids = (False,) if cgroup else (True, False)
        combos += [(method, True, u, pid) for u in own for pid in pids] if setpriv and mount else []
        combos += [(method, False, u, pid) for u in own for pid in pids]
    combos += [("none", False, True, False)] if root else []
    user = "root without capabilities" if root else "the provider's uid"
    return [Isolation(m != "none", m, "; ".join([
        f"no network ({m})" if m != "none" else "network reachable",
        "key dirs hidden, private /tmp, /var/tmp, /dev/shm (mount namespace)" if h
        else "key dirs NOT hidden, host /tmp shared",
        "each task runs as its own uid" if u else f"tasks run as {user}",
        "own cgroup per worker" if cgroup else "own PID namespace" if pid
        else "no cgroup, no PID namespace"]), h, u, pid, cgroup)
        for m, h, u, pid in combos]


def _works(candidate: Isolation) -> tuple[str | None, str]:
    """Run a worker-like program under `candidate`: (why it failed or None, worker's Python)."""
    shared_tmp = "/tmp" if os.path.isdir("/tmp") else None
    with tempfile.TemporaryDirectory(prefix="decompute-probe-", dir=shared_tmp) as tmp:
        (key := Path(tmp, "keys", "key")).parent.mkdir()
        key.write_text("probe")
        hide = "1" if candidate.hide or candidate.own_uid else ""
        spec = None
        try:
            spec = sandbox_spec([sys.executable, "-c", _PROBE_CHECK, str(key), hide,
                                 tmp if candidate.hide and shared_tmp else ""],
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
        if not (candidate.own_uid or candidate.method == "unshare -rn"):
            reason += "; NO process limit (RLIMIT_NPROC needs a per-task uid or user namespace)"
        if not candidate.contained:
            reason += "; processes a task leaves running can ESCAPE (no PID namespace, cgroup "\
                      "or own uid)"
        if version != _VERSION:  # e.g. a task uid may not read a pyenv under a 0700 /root
            reason += f"; worker Python {version} (provider {_VERSION})"
        log.info("sandbox isolation: %s", reason)
        return dataclasses.replace(candidate, reason=reason)
    who = "ROOT, unconfined" if os.geteuid() == 0 else "the provider's uid"
    return Isolation(False, "none", f"cannot create a network namespace here ({failed}); "
                     f"key dirs NOT hidden; tasks run as {who}")


def describe(isolation: Isolation) -> str:
    """One line for the provider's start-up log; loud when any defence is missing."""
    if isolation.strength == "strong":
        return f"sandbox: strong; {isolation.reason}"
    if not isolation.network:
        return (f"WARNING: tasks can reach the network (weak sandbox): {isolation.reason}. "
                "Run the provider on Linux where `unshare -n` (root) or `unshare -rn` works.")
    return (f"WARNING: weak sandbox: {isolation.reason}. Run the provider on Linux where "
            "`unshare -m --pid --fork` works (as root, or in a user namespace).")


#: Extra paths (os.pathsep-separated) hidden from every task, e.g. a gateway's ledger and home
#: for the providers it starts beside itself (``decompute-provider --hide PATH`` adds to it).
HIDE_ENV = "DECOMPUTE_HIDE"


def default_hide_paths() -> list[Path]:
    """Where provider keys live by default, plus $DECOMPUTE_HIDE: always hidden."""
    paths = [Path(os.environ.get("DECOMPUTE_HOME") or "~/.decompute"), Path("/root/.decompute")]
    paths += [Path(x) for x in os.environ.get(HIDE_ENV, "").split(os.pathsep) if x]
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
    # A path inside another hidden one is covered already (and cannot be mounted on: it is gone).
    return [p for p in found if not any(p != q and Path(p).is_relative_to(q) for q in found)]


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


@cache
def _kept_under_private_tmp() -> tuple[str, ...]:
    """The interpreter's and decompute's own folders that live under a temp dir the sandbox
    replaces (a checkout or venv under /tmp): bound back in place so that the worker can start.
    Shallowest first, so a folder inside another is bound over its parent's binding."""
    places = [sys.prefix, sys.base_prefix, os.path.dirname(sys.executable),
              *_package_path().split(os.pathsep)]
    kept: set[str] = set()
    for place in places:
        for path in {os.path.normpath(os.path.abspath(place)), os.path.realpath(place)}:
            if any(path == d or path.startswith(d + "/") for d in PRIVATE_TMP_DIRS) \
                    and os.path.isdir(path):
                kept.add(path)
    return tuple(sorted(kept, key=lambda p: (p.count("/"), p)))


def _wrap(program: list[str], iso: Isolation, hidden: list[str], uid: int | None,
          nproc: int | None, tmp_bytes: int, readonly: Sequence[str] = ()) -> list[str]:
    if not iso.network:
        return list(program)
    argv = [_tool("unshare") or "unshare", *(["-r"] if iso.method == "unshare -rn" else []), "-n"]
    if iso.pid:  # the forked child is the namespace's init: when it dies, every process in it does
        argv += ["--pid", "--fork", "--kill-child"] + (["--mount-proc"] if iso.hide else [])
    if iso.hide:
        argv.append("-m")  # unshare(1) makes the new mount tree private: nothing leaks to the host
    if iso.pid:
        argv += ["/bin/sh", "-c", _INIT_SCRIPT, "decompute-init"]
    if iso.hide:
        argv += ["/bin/sh", "-c", _HIDE_SCRIPT, "decompute-hide", _tool("mount") or "mount",
                 str(tmp_bytes), *_kept_under_private_tmp(), "--", *readonly, "--", *hidden,
                 "--"]
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
                 hide_paths: Iterable[Path | str] | None = None,
                 readonly_paths: Iterable[Path | str] = ()) -> SandboxSpec:
    """Build how to start `program` sandboxed; the caller must `cleanup()` the spec afterwards.

    `readonly_paths` (folders, e.g. the task environments) are bound read-only in the task's
    mount namespace: not even a task with the provider's uid can write there.

    `hide_paths` must exist now (the key dir: create keys before workers). With a per-task uid,
    `workdir_root` must be searchable by others (o+x), as the default temp dir is.
    """
    iso = isolation or probe_isolation()
    root = Path(workdir_root) if workdir_root is not None else Path(tempfile.gettempdir())
    cwd = tempfile.mkdtemp(prefix="decompute-task-", dir=root)  # mode 0700, owned by us
    uid = group = None
    try:
        hidden = _hidden([*(hide_paths or []), *default_hide_paths()], cwd) if iso.hide else []
        if iso.own_uid:
            uid = _allocate_uid()
            os.chown(cwd, uid, uid)
        group = _new_cgroup() if iso.cgroup else None
    except BaseException:
        cleanup(SandboxSpec([], {}, cwd, lambda: None, uid, group))
        raise
    preexec = _preexec(_rlimits(limits, with_nproc=uid is not None),
                       uid if iso.method == "none" else None,  # else setpriv switches uid
                       group, pdeathsig=iso.pid and iso.network)
    nproc = limits.processes if iso.method == "unshare -rn" else None
    readonly = [os.path.realpath(d) for d in readonly_paths] if iso.hide else []
    argv = _wrap(program, iso, hidden, uid, nproc, limits.tmp_bytes, readonly)
    return SandboxSpec(argv, _scrubbed_env(cwd, extra_env), cwd, preexec, uid, group,
                       pid_namespace=iso.pid and iso.network)


def _process_table() -> dict[int, tuple[int, int]]:
    """pid -> (ppid, uid) of every live, non-zombie process: one pass over /proc."""
    table: dict[int, tuple[int, int]] = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        with contextlib.suppress(OSError, ValueError, IndexError):
            with open(f"/proc/{name}/stat", "rb") as f:
                fields = f.read().rsplit(b")", 1)[1].split()
            if fields[0] != b"Z":
                table[int(name)] = (int(fields[1]), os.stat(f"/proc/{name}").st_uid)
    return table


def sandbox_pids(spec: SandboxSpec, roots: Collection[int]) -> set[int]:
    """Every live process of this sandbox: its cgroup, else the descendants of `roots` and (with
    a per-task uid) every process of that uid, double-forked daemons included."""
    if spec.cgroup is not None:
        return set(cgroup_pids(spec.cgroup))
    table = _process_table()
    found = {pid for pid, (_, uid) in table.items() if spec.uid is not None and uid == spec.uid}
    found |= {pid for pid in roots if pid in table}
    children: dict[int, list[int]] = {}
    for pid, (ppid, _) in table.items():
        children.setdefault(ppid, []).append(pid)
    stack = list(found)
    while stack:
        for child in children.get(stack.pop(), []):
            if child not in found:
                found.add(child)
                stack.append(child)
    return found


def worker_pid(spec: SandboxSpec, launcher: int) -> int:
    """The pid of the program itself: `launcher`, or (PID namespace) the child of the namespace's
    init, which unshare forked. Call it once the program runs (after the worker said ready)."""
    if not spec.pid_namespace:
        return launcher
    table = _process_table()
    init = [pid for pid, (ppid, _) in table.items() if ppid == launcher]
    # The init's first child, pid 2 in the namespace (a task may have started others since).
    below = [pid for pid, (ppid, _) in table.items() if init and ppid == init[0]]
    worker = [pid for pid in below if _namespace_pid(pid) == 2]
    if len(init) != 1 or len(worker) != 1:
        raise RuntimeError(f"no task process found under pid {launcher} (init {init})")
    return worker[0]


def _namespace_pid(pid: int) -> int | None:
    with contextlib.suppress(OSError, ValueError), open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("NSpid:"):
                return int(line.split()[-1])
    return None


def strays(spec: SandboxSpec, launcher: int, worker: int) -> set[int]:
    """Processes of this sandbox besides the worker and its wrappers: what a task left running."""
    helpers = {launcher, worker}
    if spec.pid_namespace and (init := namespace_init(worker)) is not None:
        helpers.add(init)
    return sandbox_pids(spec, [launcher]) - helpers


def namespace_init(worker: int) -> int | None:
    """The init of `worker`'s PID namespace (its parent, `_INIT_SCRIPT`), if it runs under one."""
    try:
        with open(f"/proc/{worker}/stat", "rb") as f:
            parent = int(f.read().rsplit(b")", 1)[1].split()[1])
        with open(f"/proc/{parent}/cmdline", "rb") as f:
            argv = f.read().split(b"\0")
    except (OSError, ValueError, IndexError):
        return None
    return parent if argv[2:4] == [_INIT_SCRIPT.encode(), b"decompute-init"] else None


def _unlock_dirs(top: str) -> None:
    """Give ourselves rwx on every real directory under `top`; symlinks are never followed."""
    stack = [top]
    while stack:
        with contextlib.suppress(OSError):
            os.chmod(directory := stack.pop(), 0o700)
            with os.scandir(directory) as entries:
                stack += [e.path for e in entries if e.is_dir(follow_symlinks=False)]


def cleanup(spec: SandboxSpec) -> None:
    """Kill leftovers (cgroup, per-task uid) and remove the working dir, never following links."""
    try:
        if spec.cgroup is not None:
            _kill_cgroup(spec.cgroup)
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
