#!/usr/bin/env python3
"""Private single-node Slurm cluster with accounting (munged, MariaDB, slurmdbd, slurmctld, slurmd) in one folder.

    python slurm/cluster.py start DIR [--gpus N]   # prints: export SLURM_CONF=DIR/etc/slurm.conf
    python slurm/cluster.py status DIR
    python slurm/cluster.py stop DIR

Importable: start(dir, gpus=2) -> {"SLURM_CONF": ...}; stop(dir). Needs root and the Debian packages
slurmctld slurmd slurmdbd slurm-client munge mariadb-server. Stdlib only.
"""

from __future__ import annotations

import argparse
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

DAEMONS = ("munged", "mariadbd", "slurmdbd", "slurmctld", "slurmd")
# the node is named after this host: jobs use node names as addresses (submitit's MASTER_ADDR is the first node's name)
CLUSTER, NODE, PARTITION = "utp", socket.gethostname().split(".")[0], "debug"
MARKER = "UTP_SLURM_DIR"  # put in each daemon's environment so stop() never signals a recycled pid
MIN_CPUS = 8  # declared CPUs (config_overrides) so 4+ single-CPU array tasks run at once on a small box
READY_TIMEOUT = 30.0
_PROCS: dict[int, subprocess.Popen] = {}  # keeps in-process children referenced so stop() can reap them


def _layout(d: Path) -> dict[str, Path]:
    sock = Path((d / "run" / "sockdir").read_text().strip()) if (d / "run" / "sockdir").exists() else d / "run"
    return {
        "etc": d / "etc",
        "log": d / "log",
        "run": d / "run",
        "var": d / "var",
        "dev": d / "dev",
        "sock": sock,
        "conf": d / "etc" / "slurm.conf",
    }


def _client_env(conf: Path | None) -> dict[str, str]:
    # An outer Slurm job's SLURM_* variables would make sbatch/srun target the wrong job or cluster.
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    if conf:
        env["SLURM_CONF"] = str(conf)
    return env


def _run(cmd: list[str], env: dict[str, str] | None = None, timeout: float = 15) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)


def _ok(cmd: list[str], env: dict[str, str] | None = None, want: str | None = None) -> bool | str:
    """True if cmd succeeds (and prints `want`), else a one-line reason for the failure message."""
    try:
        r = _run(cmd, env, timeout=10)
    except subprocess.TimeoutExpired:
        return f"`{cmd[0]}` timed out"
    if r.returncode == 0 and (want is None or r.stdout.strip() == want):
        return True
    out = (r.stderr.strip() or r.stdout.strip() or f"exit {r.returncode}").splitlines()[-1]
    return f"`{' '.join(cmd[:3])}` said: {out}"


def _free_ports(n: int) -> list[int]:
    socks = []
    try:
        for _ in range(n):  # hold all open at once so the n ports differ
            s = socket.socket()
            s.bind(("", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _stat(pid: int) -> tuple[str, str, int]:
    """(comm, state, session id) of a process, from /proc/PID/stat."""
    head, tail = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)
    fields = tail.split()
    return head.split("(", 1)[1], fields[0], int(fields[3])


def _alive(pid: int, d: Path) -> bool:
    if pid in _PROCS:
        if _PROCS[pid].poll() is not None:  # reaps our own child, so Popen knows it ended
            return False
    else:
        try:
            os.waitpid(pid, os.WNOHANG)  # reap an inherited child, else it lingers as a zombie
        except ChildProcessError:
            pass
    try:
        state = _stat(pid)[1]
        environ = Path(f"/proc/{pid}/environ").read_bytes()
    except (OSError, IndexError, ValueError):
        return False
    return state != "Z" and f"{MARKER}={d}".encode() in environ.split(b"\0")


def _kill_jobs(d: Path) -> None:
    """SIGKILL the sessions of this cluster's slurmstepd processes: stopping slurmd leaves jobs running."""

    def procs():
        for p in Path("/proc").iterdir():
            if p.name.isdigit():
                try:
                    yield int(p.name), _stat(int(p.name))
                except (OSError, IndexError, ValueError):
                    pass

    sids = {sid for pid, (comm, _, sid) in procs() if comm == "slurmstepd" and _alive(pid, d)}
    for _ in range(50):
        left = [pid for pid, (_, state, sid) in procs() if sid in sids and state != "Z"]
        if not left:
            return
        for pid in left:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.05)


def _pid(d: Path, name: str) -> int | None:
    try:
        return int((d / "run" / f"{name}.pid").read_text())
    except (OSError, ValueError):
        return None


def _tail(path: Path, n: int = 5) -> str:
    try:
        lines = [ln.strip() for ln in path.read_text(errors="replace").splitlines() if ln.strip()]
    except OSError:
        return "(no log)"
    return " | ".join(lines[-n:]) or "(empty log)"


def _console(d: Path, name: str) -> Path:
    # Slurm daemons in -D mode log to stderr and to their timestamped LogFile; keep the two apart.
    return d / "log" / (f"{name}.out" if name.startswith("slurm") else f"{name}.log")


def _spawn(d: Path, name: str, cmd: list[str], env: dict[str, str]) -> subprocess.Popen:
    log = open(_console(d, name), "ab")
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True, cwd=d)
    log.close()
    _PROCS[proc.pid] = proc
    (d / "run" / f"{name}.pid").write_text(f"{proc.pid}\n")
    return proc


def _wait(d: Path, name: str, proc: subprocess.Popen, ready, timeout: float = READY_TIMEOUT) -> None:
    deadline, last = time.monotonic() + timeout, ""
    while True:
        if proc.poll() is not None:
            why = f"exited with code {proc.returncode}"
        elif (last := ready()) is True:
            return
        elif time.monotonic() > deadline:
            why = f"not ready after {timeout:.0f}s; {last}"
        else:
            time.sleep(0.1)
            continue
        log = _console(d, name)
        raise RuntimeError(f"{name} failed to start ({why}); log {log}: {_tail(log)}")


def _node_line(gpus: int) -> str:
    hw = dict(kv.split("=", 1) for kv in _run(["slurmd", "-C"], _client_env(None)).stdout.split()[:7])
    cpus = max(MIN_CPUS, int(hw["CPUs"]))
    mem = int(int(hw["RealMemory"]) * 0.9)  # below the real figure so slurmd never drains the node for memory
    gres = f" Gres=gpu:{gpus}" if gpus else ""
    return (
        f"NodeName={NODE} NodeHostname={socket.gethostname()} NodeAddr=127.0.0.1 CPUs={cpus} Boards=1 "
        f"SocketsPerBoard=1 CoresPerSocket={cpus} ThreadsPerCore=1 RealMemory={mem}{gres} State=UNKNOWN"
    )


def _write_configs(d: Path, p: dict[str, Path], ports: dict[str, int], gpus: int, dbpass: str) -> None:
    munge = p["sock"] / "munge.socket"
    var, log = p["var"], p["log"]
    # submitit derives a job's torch.distributed port from its job id: two private clusters on one machine (CI runners,
    # parallel test sessions) that both count from 1 would give their jobs the same ports
    first_job_id = 1000 + secrets.randbelow(1_000_000)
    (p["etc"] / "slurm.conf").write_text(f"""\
ClusterName={CLUSTER}
SlurmctldHost=localhost
SlurmctldPort={ports["slurmctld"]}
SlurmdPort={ports["slurmd"]}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=socket={munge},cred_expire=10
StateSaveLocation={var}/state
SlurmdSpoolDir={p["sock"]}/spool
SlurmctldPidFile={var}/slurmctld.pid
SlurmdPidFile={var}/slurmd.pid
SlurmctldLogFile={log}/slurmctld.log
SlurmdLogFile={log}/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
MailProg=/bin/true
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/linux
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=localhost
AccountingStoragePort={ports["slurmdbd"]}
AccountingStoragePass={munge}
AccountingStorageTRES=gres/gpu
JobCompType=jobcomp/none
SchedulerParameters=batch_sched_delay=0,sched_interval=2,bf_interval=1
MinJobAge=3600
FirstJobId={first_job_id}
ReturnToService=2
JobRequeue=1
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
MpiDefault=none
KillWait=5
InactiveLimit=0
Waittime=0
SlurmdParameters=config_overrides
GresTypes=gpu
{_node_line(gpus)}
PartitionName={PARTITION} Nodes={NODE} Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO
""")
    last = f"-{gpus - 1}" if gpus > 1 else ""
    (p["etc"] / "gres.conf").write_text(f"AutoDetect=off\nNodeName={NODE} Name=gpu File={p['dev']}/fakegpu[0{last}]\n" if gpus else "")
    dbd = p["etc"] / "slurmdbd.conf"
    dbd.touch(mode=0o600)
    dbd.chmod(0o600)  # slurmdbd refuses a conf readable by others
    dbd.write_text(f"""\
AuthType=auth/munge
AuthInfo=socket={munge}
DbdHost=localhost
DbdPort={ports["slurmdbd"]}
SlurmUser=root
DebugLevel=info
LogFile={log}/slurmdbd.log
PidFile={var}/slurmdbd.pid
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort={ports["mariadbd"]}
StorageUser=slurm
StoragePass={dbpass}
StorageLoc=slurm_acct_db
""")


def start(dir: Path, gpus: int = 2) -> dict[str, str]:
    """Start the cluster in `dir`; return the environment variables clients need (RuntimeError on failure)."""
    d = Path(dir).resolve()
    if os.geteuid() != 0:
        raise RuntimeError("slurm/cluster.py must run as root (slurmd, mknod and SlurmUser=root need it)")
    if any(_alive(pid, d) for pid in filter(None, (_pid(d, n) for n in DAEMONS))):
        raise RuntimeError(f"a cluster already runs in {d}; stop it first")
    try:
        _start(d, gpus)
    except (OSError, subprocess.SubprocessError) as e:
        stop(d)
        raise RuntimeError(f"cluster start in {d} failed: {e}") from e
    except BaseException:
        stop(d)
        raise
    return {"SLURM_CONF": str(d / "etc" / "slurm.conf")}


def _start(d: Path, gpus: int) -> None:
    for sub in ("etc", "log", "run", "var/state", "dev"):
        (d / sub).mkdir(parents=True, exist_ok=True)
    # Unix sockets (munge, MariaDB, slurmstepd's in the spool) must fit in 108 bytes; pytest dirs can be long.
    if len(str(d / "run")) > 50 and not (d / "run" / "sockdir").exists():
        (d / "run" / "sockdir").write_text(tempfile.mkdtemp(prefix="utp-slurm-") + "\n")
    p = _layout(d)
    (p["sock"] / "spool").mkdir(parents=True, exist_ok=True)
    for k in range(gpus):
        dev = p["dev"] / f"fakegpu{k}"
        if not dev.is_char_device():  # slurmd rejects GRES files that are not devices; 1,3 is /dev/null
            dev.unlink(missing_ok=True)
            os.mknod(dev, 0o666 | 0o020000, os.makedev(1, 3))
    key = p["etc"] / "munge.key"
    if not key.exists():
        key.write_bytes(secrets.token_bytes(1024))
        key.chmod(0o400)
    ports = dict(zip(DAEMONS[1:], _free_ports(4), strict=True))
    dbpass = secrets.token_hex(16)
    _write_configs(d, p, ports, gpus, dbpass)
    (p["run"] / "ports").write_text("".join(f"{k}={v}\n" for k, v in ports.items()))

    conf, sock, db = p["conf"], p["sock"], p["var"] / "db"
    env = _client_env(conf)
    denv = {**env, MARKER: str(d)}
    # --force: munged otherwise refuses a socket under a dir that is not world-executable (pytest's are 0700).
    proc = _spawn(
        d,
        "munged",
        [
            "munged",
            "-F",
            "--force",
            f"--socket={sock}/munge.socket",
            f"--key-file={key}",
            f"--pid-file={p['var']}/munged.pid",
            f"--seed-file={p['var']}/munged.seed",
        ],
        denv,
    )
    _wait(d, "munged", proc, lambda: _ok(["munge", "-n", "-S", f"{sock}/munge.socket"]))

    mariadb_opts = [
        "--no-defaults",
        f"--datadir={db}",
        "--user=root",
        "--innodb-buffer-pool-size=512M",
        "--innodb-log-file-size=64M",
        "--innodb-lock-wait-timeout=900",
    ]  # below these slurmdbd logs an error
    if not (db / "mysql").exists():
        r = _run(
            ["mariadb-install-db", *mariadb_opts, "--auth-root-authentication-method=normal", "--skip-test-db", "--skip-name-resolve"],
            timeout=120,
        )
        if r.returncode:
            (p["log"] / "mariadbd.log").write_text(r.stdout + r.stderr)
            raise RuntimeError(f"mariadb-install-db failed; log {p['log']}/mariadbd.log: {_tail(p['log'] / 'mariadbd.log')}")
    proc = _spawn(
        d,
        "mariadbd",
        [
            "mariadbd",
            *mariadb_opts,
            f"--socket={sock}/mysql.sock",
            f"--port={ports['mariadbd']}",
            "--bind-address=127.0.0.1",
            "--skip-name-resolve",
            f"--pid-file={p['var']}/mariadbd.pid",
        ],
        denv,
    )
    sql = (
        "CREATE DATABASE IF NOT EXISTS slurm_acct_db; "
        f"CREATE OR REPLACE USER 'slurm'@'127.0.0.1' IDENTIFIED BY '{dbpass}'; "
        "GRANT ALL ON slurm_acct_db.* TO 'slurm'@'127.0.0.1';"
    )
    _wait(d, "mariadbd", proc, lambda: _ok(["mariadb", "--no-defaults", "-S", f"{sock}/mysql.sock", "-u", "root", "-e", sql]))

    proc = _spawn(d, "slurmdbd", ["slurmdbd", "-D"], denv)
    _wait(d, "slurmdbd", proc, lambda: _ok(["sacctmgr", "-n", "list", "cluster"], env))

    proc = _spawn(d, "slurmctld", ["slurmctld", "-D", "-f", str(conf)], denv)
    _wait(d, "slurmctld", proc, lambda: _ok(["scontrol", "ping"], env))

    proc = _spawn(d, "slurmd", ["slurmd", "-D", "-N", NODE, "-f", str(conf)], denv)
    _wait(d, "slurmd", proc, lambda: _ok(["sinfo", "-h", "-n", NODE, "-o", "%t"], env, "idle"))
    _wait(d, "slurmdbd", _PROCS[_pid(d, "slurmdbd")], lambda: _ok(["sacct", "-n", "-X", "-a"], env))


def _kill(d: Path, name: str, grace: float = 10.0) -> None:
    pid = _pid(d, name)
    if pid is None:
        return
    deadline = time.monotonic() + grace
    for sig in (signal.SIGTERM, signal.SIGKILL):
        if _alive(pid, d):
            os.kill(pid, sig)
        while _alive(pid, d) and (sig == signal.SIGKILL or time.monotonic() < deadline):
            time.sleep(0.05)
    _PROCS.pop(pid, None)


def stop(dir: Path) -> None:
    """Stop the cluster in `dir` by its recorded pids, in reverse start order; idempotent."""
    d = Path(dir).resolve()
    if not (d / "run").is_dir():
        return
    for name in reversed(DAEMONS):
        _kill(d, name)
        (d / "run" / f"{name}.pid").unlink(missing_ok=True)
        if name == "slurmd":
            _kill_jobs(d)
    sockdir = d / "run" / "sockdir"
    if sockdir.exists():
        shutil.rmtree(sockdir.read_text().strip(), ignore_errors=True)
        sockdir.unlink()


def status(dir: Path) -> dict[str, int | None]:
    """Map each daemon to its pid if it runs, else None."""
    d = Path(dir).resolve()
    return {n: pid if pid and _alive(pid, d) else None for n in DAEMONS for pid in [_pid(d, n)]}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("command", choices=("start", "stop", "status"))
    ap.add_argument("dir", type=Path)
    ap.add_argument("--gpus", type=int, default=2, help="fake GPUs on the node (start only)")
    a = ap.parse_args(argv)
    if a.command == "start":
        try:
            env = start(a.dir, a.gpus)
        except RuntimeError as e:
            print(f"cluster.py: {e}", file=sys.stderr)
            return 1
        for k, v in env.items():
            print(f"export {k}={v}")
    elif a.command == "stop":
        stop(a.dir)
    else:
        st = status(a.dir)
        for n, pid in st.items():
            print(f"{n}: {f'running (pid {pid})' if pid else 'stopped'}")
        return 0 if all(st.values()) else 3
    return 0


if __name__ == "__main__":
    sys.exit(main())
