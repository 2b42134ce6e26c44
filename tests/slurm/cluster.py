"""A real, throw-away two-node Slurm cluster on this machine, for tests. (One module for the one class: the
daemons, jobs and diagnostics of LocalSlurmCluster share its directory, config and ports.)

Debian's Slurm (22.05) runs a genuine slurmctld plus one slurmd per "node"
here; the nodes are names (n1, n2) that all live on this host
(NodeAddr=127.0.0.1, one slurmd port each).  Everything the cluster writes
(config, state, spool, logs, its own munged socket and key) lives in one
directory, so several clusters (other engineers' test runs) can coexist:
ports are picked free at random, FirstJobId is random (the launch script
derives its rendezvous port from the job id), and munged listens on a private
socket (``AuthInfo=socket=...``) with a private key.

Use from pytest::

    from tests.slurm.cluster import LocalSlurmCluster
    with LocalSlurmCluster() as c:
        job = c.sbatch(["launch/slurm.sbatch", "trainer.max_steps=10"],
                       nodes=2, env={"NPROC_PER_NODE": "1"}, wait=True)
        assert job.returncode == 0, c.diagnose(job)

or by hand: ``tools/slurm_local.sh start|stop|status|env`` (``python -m tests.slurm``, __main__.py).

Needs root (the daemons run as root; munged as user munge).  Packages are
installed with apt-get when missing; ``install.require_slurm()`` raises
``SlurmUnavailable`` (tests turn it into a skip) when that is impossible.
"""

from __future__ import annotations

import json
import os
import random
import re
import shlex
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path

from minimax_train.tools.spawn import free_port

from .install import SBIN_DIRS, SlurmUnavailable, require_slurm, which
from .jobs import JobResult, parse_scontrol_oneliner
from .slurm_conf import slurm_conf

REPO_ROOT = Path(__file__).resolve().parents[2]
SBATCH_SCRIPT = REPO_ROOT / "launch" / "slurm.sbatch"
TORCHRUN_SCRIPT = REPO_ROOT / "launch" / "torchrun.sh"
PROBE_SCRIPT = Path(__file__).resolve().parent / "dist_probe.py"

# launcher settings that must not leak from the developer's shell into test jobs
LAUNCH_ENV_VARS = (
    "NPROC_PER_NODE",
    "MINIMAX_ENTRY",
    "MINIMAX_RUN_DIR",
    "MINIMAX_MASTER_PORT",
    "MINIMAX_ROOT",
    "MINIMAX_REQUEUE_ON_TERM",
    "MINIMAX_NNODES",
    "MINIMAX_RDZV_ENDPOINT",
    "MINIMAX_RDZV_ID",
    "MASTER_ADDR",
    "MASTER_PORT",
    "RANK",
    "WORLD_SIZE",
    "LOCAL_RANK",
    "OMP_NUM_THREADS",
)


class ClusterError(RuntimeError):
    """The local cluster failed; the message carries the daemon logs."""


# --------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # a zombie counts as dead
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def _tail(path: Path, n: int = 60) -> str:
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError as e:
        return f"<cannot read {path}: {e}>"
    return "\n".join(lines[-n:])


# --------------------------------------------------------------------------
# the cluster
# --------------------------------------------------------------------------


class LocalSlurmCluster:
    """Start/stop slurmctld + N slurmd (+ a private munged) on this host.

    ``workdir``: where everything lives (created when None, under /tmp with a
    short name: unix socket paths are limited to 107 bytes).  ``cred_expire``
    is Slurm's credential lifetime; Slurm holds a requeued job for
    cred_expire+1 s before it may start again (default 120 s), so tests use a
    small value.
    """

    def __init__(
        self,
        workdir: str | os.PathLike | None = None,
        nodes: Sequence[str] = ("n1", "n2"),
        cpus_per_node: int = 1,
        cred_expire: int = 10,
        kill_wait: int = 10,
        min_job_age: int = 300,
        keep_workdir: bool | None = None,
    ):
        self.nodes = list(nodes)
        self.cpus_per_node = cpus_per_node
        self.cred_expire = cred_expire
        self.kill_wait = kill_wait
        self.min_job_age = min_job_age  # how long `scontrol show job` still answers after the end
        self._own_dir = workdir is None
        if workdir is None:
            workdir = tempfile.mkdtemp(prefix="mmslurm-", dir="/tmp")
        self.dir = Path(workdir).resolve()
        # keep the directory after stop() when asked (MINIMAX_SLURM_KEEP=1) or when it was given to us
        self.keep_workdir = (
            (not self._own_dir or os.environ.get("MINIMAX_SLURM_KEEP") == "1") if keep_workdir is None else keep_workdir
        )
        self.conf = self.dir / "etc" / "slurm.conf"
        self.hostname = socket.gethostname().split(".")[0]
        self.ports: dict[str, int] = {}
        self.cluster_name = ""
        self.started = False
        self.start_seconds: float | None = None

    # ---- paths -----------------------------------------------------------
    @property
    def munge_dir(self) -> Path:
        return self.dir / "munge"

    @property
    def munge_socket(self) -> Path:
        return self.munge_dir / "munge.socket"

    @property
    def log_dir(self) -> Path:
        return self.dir / "log"

    @property
    def jobs_dir(self) -> Path:
        """Scratch space for job outputs (shared by all 'nodes')."""
        return self.dir / "jobs"

    def pid_files(self) -> dict[str, Path]:
        files = {f"slurmd:{n}": self.dir / "run" / f"slurmd.{n}.pid" for n in self.nodes}
        files["slurmctld"] = self.dir / "run" / "slurmctld.pid"
        files["munged"] = self.munge_dir / "munged.pid"
        return files

    @property
    def env(self) -> dict[str, str]:
        """Environment for slurm client commands (sbatch, srun, scontrol, ...)."""
        env = dict(os.environ)
        env["SLURM_CONF"] = str(self.conf)
        path = env.get("PATH", "/usr/bin:/bin")
        for d in SBIN_DIRS:
            if d not in path.split(os.pathsep):
                path += os.pathsep + d
        env["PATH"] = path
        # don't leak an outer allocation into ours
        for k in list(env):
            if k.startswith(("SLURM_", "SBATCH_", "SALLOC_", "SRUN_")) and k != "SLURM_CONF":
                del env[k]
        return env

    # ---- configuration ---------------------------------------------------
    def _write_config(self) -> None:
        self.ports: dict[str, int] = {}
        for name in ("slurmctld", *self.nodes):  # free on every address, one per daemon
            self.ports[name] = free_port("", exclude=self.ports.values())
        self.cluster_name = "mm%06d" % random.SystemRandom().randrange(10**6)
        first_job_id = random.SystemRandom().randrange(1000, 5_000_000)

        d = self.dir
        for sub in ("etc", "state", "run", "log", "jobs", *(f"spool/{n}" for n in self.nodes)):
            (d / sub).mkdir(parents=True, exist_ok=True)
        # munged runs as 'munge': it must traverse self.dir and own its own dir
        os.chmod(d, 0o755)
        import pwd

        mu = pwd.getpwnam("munge")
        self.munge_dir.mkdir(exist_ok=True)
        os.chown(self.munge_dir, mu.pw_uid, mu.pw_gid)
        os.chmod(self.munge_dir, 0o755)  # socket dir: readable, writable by owner only
        key = self.munge_dir / "munge.key"
        if not key.exists():
            key.write_bytes(os.urandom(1024))
        os.chown(key, mu.pw_uid, mu.pw_gid)
        os.chmod(key, 0o400)

        self.conf.write_text(
            slurm_conf(
                cluster_name=self.cluster_name,
                hostname=self.hostname,
                ports=self.ports,
                nodes=self.nodes,
                cpus_per_node=self.cpus_per_node,
                workdir=d,
                munge_socket=self.munge_socket,
                cred_expire=self.cred_expire,
                first_job_id=first_job_id,
                min_job_age=self.min_job_age,
                kill_wait=self.kill_wait,
            )
        )
        # CgroupPlugin=disabled stops slurmd 22.05 from starting; autodetect works
        (self.conf.parent / "cgroup.conf").write_text("CgroupPlugin=autodetect\n")
        (self.dir / "cluster.json").write_text(
            json.dumps(
                {
                    "conf": str(self.conf),
                    "nodes": self.nodes,
                    "ports": self.ports,
                    "cluster_name": self.cluster_name,
                    "hostname": self.hostname,
                },
                indent=1,
            )
        )

    # ---- processes -------------------------------------------------------
    def _daemon(self, name: str, argv: list[str], user: str | None = None) -> None:
        if user:
            argv = [which("runuser") or "runuser", "-u", user, "--", *argv]
        out = subprocess.run(argv, env=self.env, capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
        if out.returncode != 0:
            raise ClusterError(
                f"starting {name} failed (rc={out.returncode}): {' '.join(argv)}\n"
                f"{out.stdout}{out.stderr}\n{self.logs()}"
            )

    def _wait_for(self, what: str, pred: Callable[[], bool], timeout: float, interval: float = 0.25) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if pred():
                return
            time.sleep(interval)
        raise ClusterError(f"timed out after {timeout:.0f}s waiting for {what}\n{self.logs()}")

    def start(self, timeout: float = 90) -> LocalSlurmCluster:
        require_slurm()
        t0 = time.monotonic()
        self._write_config()
        try:
            # munged: as user munge, private socket/key/pid/log/seed
            md = self.munge_dir
            self._daemon(
                "munged",
                [
                    which("munged"),
                    f"--socket={self.munge_socket}",
                    f"--key-file={md / 'munge.key'}",
                    f"--pid-file={md / 'munged.pid'}",
                    f"--log-file={md / 'munged.log'}",
                    f"--seed-file={md / 'munged.seed'}",
                    "--num-threads=2",
                ],
                user="munge",
            )
            self._wait_for("munged socket", self.munge_socket.exists, 20)
            # -c: start clean, ignore any saved state
            self._daemon("slurmctld", [which("slurmctld"), "-c", "-f", str(self.conf)])
            self._wait_for(
                "slurmctld to answer",
                lambda: self._cmd(["scontrol", "ping"], check=False, timeout=10).returncode == 0,
                30,
            )
            for n in self.nodes:
                self._daemon(f"slurmd {n}", [which("slurmd"), "-N", n, "-f", str(self.conf)])
            self._wait_for("all nodes idle", self._all_idle, timeout, interval=0.5)
        except BaseException:
            self.stop()
            raise
        self.started = True
        self.start_seconds = time.monotonic() - t0
        return self

    def _all_idle(self) -> bool:
        out = self._cmd(["sinfo", "-h", "-N", "-o", "%N %t"], check=False, timeout=10)
        if out.returncode != 0:
            return False
        states = dict(line.split() for line in out.stdout.splitlines() if line.strip())
        return all(states.get(n) == "idle" for n in self.nodes)

    def stop(self, timeout: float = 30) -> None:
        """Cancel all jobs, then SIGTERM the daemons by their pid files (SIGKILL after timeout)."""
        if self.conf.exists() and self.pid("slurmctld"):
            self._cmd(["scancel", "--quiet", "-u", "root"], check=False, timeout=15)
            # give running jobs a moment to be killed by their slurmd
            deadline = time.monotonic() + min(timeout, self.kill_wait + 5)
            while time.monotonic() < deadline:
                q = self._cmd(["squeue", "-h", "-t", "R,CG,S", "-o", "%i"], check=False, timeout=10)
                if q.returncode != 0 or not q.stdout.strip():
                    break
                time.sleep(0.5)
        order = [f"slurmd:{n}" for n in self.nodes] + ["slurmctld", "munged"]
        for name in order:
            pid = self.pid(name)
            if pid:
                try:
                    os.kill(pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
                deadline = time.monotonic() + timeout / 2
                while _pid_alive(pid) and time.monotonic() < deadline:
                    time.sleep(0.1)
                if _pid_alive(pid):
                    try:
                        os.kill(pid, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
        self.started = False
        if self._own_dir and not self.keep_workdir:
            shutil.rmtree(self.dir, ignore_errors=True)

    def pid(self, name: str) -> int | None:
        """The pid from a pid file, if that process is alive and really is ours."""
        f = self.pid_files()[name]
        try:
            pid = int(f.read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return None
        if not _pid_alive(pid):
            return None
        cmd = _cmdline(pid)
        daemon = name.split(":")[0]
        marker = str(self.munge_dir) if daemon == "munged" else str(self.conf)
        if daemon not in cmd or marker not in cmd:
            return None  # pid reused by something else
        return pid

    def __enter__(self) -> LocalSlurmCluster:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # ---- diagnostics -----------------------------------------------------
    def logs(self, lines: int = 40) -> str:
        parts = []
        files = [
            self.log_dir / "slurmctld.log",
            *(self.log_dir / f"slurmd.{n}.log" for n in self.nodes),
            self.munge_dir / "munged.log",
        ]
        for f in files:
            if f.exists():
                parts.append(f"----- {f.name} (last {lines} lines) -----\n{_tail(f, lines)}")
        return "\n".join(parts) or f"<no logs under {self.dir}>"

    def diagnose(self, job: JobResult | int | None = None, lines: int = 40) -> str:
        """Everything useful for a failure message: job info + output, sinfo, daemon logs."""
        parts = []
        if job is not None:
            jid = job.job_id if isinstance(job, JobResult) else int(job)
            parts.append(
                f"----- scontrol show job {jid} -----\n"
                + self._cmd(["scontrol", "show", "job", str(jid)], check=False, timeout=10).stdout
            )
            if isinstance(job, JobResult):
                parts.append(f"----- sbatch rc={job.returncode} stdout/stderr -----\n{job.stdout}{job.stderr}")
                if job.output_path:
                    parts.append(f"----- job output {job.output_path} -----\n{_tail(job.output_path, 200)}")
        parts.append("----- sinfo -----\n" + self._cmd(["sinfo", "-N", "-l"], check=False, timeout=10).stdout)
        parts.append(self.logs(lines))
        return "\n".join(parts)

    # ---- client commands -------------------------------------------------
    def _cmd(
        self,
        argv: Sequence[str],
        check: bool = True,
        timeout: float = 60,
        env: Mapping[str, str | None] | None = None,
        cwd: str | os.PathLike | None = None,
    ) -> subprocess.CompletedProcess:
        """Run a command with this cluster's SLURM_CONF; ``env`` values of None unset a variable."""
        full_env = self.env
        for k, v in (env or {}).items():
            if v is None:
                full_env.pop(k, None)
            else:
                full_env[k] = str(v)
        try:
            out = subprocess.run(
                list(argv),
                env=full_env,
                capture_output=True,
                text=True,
                timeout=timeout,
                cwd=cwd,
                stdin=subprocess.DEVNULL,
            )
        except subprocess.TimeoutExpired as e:
            raise ClusterError(f"{' '.join(argv)} timed out after {timeout}s\n{self.logs()}") from e
        if check and out.returncode != 0:
            raise ClusterError(f"{' '.join(argv)} failed rc={out.returncode}\n{out.stdout}{out.stderr}\n{self.logs()}")
        return out

    def run(self, argv: Sequence[str], **kw) -> subprocess.CompletedProcess:
        """Run a slurm client command (scontrol, squeue, srun, ...) against this cluster."""
        return self._cmd(argv, **kw)

    def job_info(self, job_id: int) -> dict[str, str]:
        out = self._cmd(["scontrol", "show", "job", "-o", str(job_id)], check=False, timeout=15)
        return parse_scontrol_oneliner(out.stdout) if out.returncode == 0 else {}

    def sbatch(
        self,
        script: str | os.PathLike,
        args: Iterable[str] = (),
        *,
        nodes: int | None = None,
        job_name: str | None = None,
        output: str | os.PathLike | None = None,
        env: Mapping[str, str | None] | None = None,
        cwd: str | os.PathLike | None = None,
        sbatch_args: Iterable[str] = (),
        wait: bool = False,
        sbatch_wait: bool = False,
        timeout: float = 300,
    ) -> JobResult:
        """Submit ``script args`` with ``sbatch --parsable``.

        wait=True: poll ``scontrol show job`` (every 0.5 s) until the job has ended for
        good (requeues included); ``returncode`` is then the job's exit code as
        ``sbatch --wait`` reports it.  sbatch_wait=True: use the real ``sbatch --wait``
        and its exit status instead (slower: it polls after 2, 8, 32, 32... s).
        """
        if output is None:
            output = self.jobs_dir / "%x-%j.out"
        argv = ["sbatch", "--parsable", f"--output={output}"]
        if nodes is not None:
            argv.append(f"--nodes={nodes}")
        if job_name:
            argv.append(f"--job-name={job_name}")
        argv += list(sbatch_args)
        if sbatch_wait:
            argv.append("--wait")
        argv += [str(script), *args]
        t0 = time.monotonic()
        out = self._cmd(argv, check=False, timeout=timeout, env=env, cwd=cwd or self.jobs_dir)
        m = re.search(r"^(\d+)", out.stdout.strip())
        if not m:
            raise ClusterError(f"sbatch failed rc={out.returncode}: {out.stdout}{out.stderr}\n{self.logs()}")
        jid = int(m.group(1))
        res = JobResult(jid, out.returncode if sbatch_wait else None, stdout=out.stdout, stderr=out.stderr)
        res.info = self.job_info(jid)
        res.output_path = Path(res.info["StdOut"]) if res.info.get("StdOut") else None
        if wait and not sbatch_wait:
            self.wait_job(res, timeout=max(1.0, timeout - (time.monotonic() - t0)))
            res.returncode = res.exit_code
        return res

    def wait_job(
        self,
        job: JobResult | int,
        timeout: float = 300,
        until: Callable[[dict[str, str]], bool] | None = None,
        interval: float = 0.5,
    ) -> dict[str, str]:
        """Poll ``scontrol show job`` until ``until(info)`` (default: the job has ended for good:
        COMPLETED/FAILED/CANCELLED/TIMEOUT/... and not about to be requeued)."""
        jid = job.job_id if isinstance(job, JobResult) else int(job)
        final = {
            "COMPLETED",
            "FAILED",
            "CANCELLED",
            "TIMEOUT",
            "NODE_FAIL",
            "OUT_OF_MEMORY",
            "BOOT_FAIL",
            "DEADLINE",
            "PREEMPTED",
        }
        if until is None:

            def until(info):  # noqa: E306
                return info.get("JobState") in final and "REQUEUE" not in info.get("Reason", "")

        deadline = time.monotonic() + timeout
        info: dict[str, str] = {}
        while time.monotonic() < deadline:
            info = self.job_info(jid)
            if info and until(info):
                if isinstance(job, JobResult):
                    job.info = info
                return info
            time.sleep(interval)
        raise ClusterError(
            f"timed out after {timeout:.0f}s waiting for job {jid}; last info: {info}\n" + self.diagnose(job)
        )

    def scancel(
        self, job: JobResult | int, signal_name: str | None = None, batch: bool = False, full: bool = False
    ) -> subprocess.CompletedProcess:
        jid = job.job_id if isinstance(job, JobResult) else int(job)
        argv = ["scancel"]
        if signal_name:
            argv.append(f"--signal={signal_name}")
        if batch:
            argv.append("--batch")
        if full:
            argv.append("--full")
        return self._cmd([*argv, str(jid)], timeout=30)

    def launch(
        self,
        overrides: Iterable[str] = (),
        *,
        nodes: int = 2,
        nproc_per_node: int = 1,
        entry: str | os.PathLike | None = None,
        job_name: str = "mmtest",
        env: Mapping[str, str | None] | None = None,
        sbatch_args: Iterable[str] = (),
        submit_dir: str | os.PathLike | None = None,
        wait: bool = False,
        sbatch_wait: bool = False,
        timeout: float = 300,
    ) -> JobResult:
        """Submit launch/slurm.sbatch the way a user would.

        ``entry``: MINIMAX_ENTRY (None = the real trainer, ``-m minimax_train.train``;
        tests pass ``PROBE_SCRIPT``). The job is submitted from ``submit_dir``
        (default: a fresh directory under jobs/), so its default run directory is
        ``<submit_dir>/runs/<job_name>`` (``JobResult.run_dir``) and its log
        ``<submit_dir>/<job_name>-<id>.out``.  NPROC_PER_NODE=nproc_per_node.
        """
        if submit_dir is None:
            submit_dir = Path(tempfile.mkdtemp(prefix=f"{job_name}-", dir=self.jobs_dir))
        submit_dir = Path(submit_dir)
        submit_dir.mkdir(parents=True, exist_ok=True)
        job_env: dict[str, str | None] = {k: None for k in LAUNCH_ENV_VARS}
        job_env["NPROC_PER_NODE"] = str(nproc_per_node)
        if entry is not None:
            job_env["MINIMAX_ENTRY"] = str(entry)
        job_env.update(env or {})
        res = self.sbatch(
            SBATCH_SCRIPT,
            list(overrides),
            nodes=nodes,
            job_name=job_name,
            output=submit_dir / "%x-%j.out",
            env=job_env,
            cwd=submit_dir,
            sbatch_args=sbatch_args,
            wait=wait,
            sbatch_wait=sbatch_wait,
            timeout=timeout,
        )
        res.run_dir = (
            Path(job_env["MINIMAX_RUN_DIR"]) if job_env.get("MINIMAX_RUN_DIR") else submit_dir / "runs" / job_name
        )
        return res

    def preempt(self, job: JobResult | int) -> None:
        """What Slurm does before a time limit with ``--signal=B:USR1@T``: SIGUSR1 to the batch
        shell only (``scancel --signal=USR1 --batch``); launch/slurm.sbatch forwards it to the
        step and requeues the job once the step has exited."""
        self.scancel(job, "USR1", batch=True)

    def shell_env(self) -> str:
        """``export`` lines to use this cluster from a shell."""
        env = self.env
        return "\n".join(f"export {k}={shlex.quote(env[k])}" for k in ("SLURM_CONF", "PATH"))


# --------------------------------------------------------------------------
# helpers for tests
# --------------------------------------------------------------------------


def wait_for_files(
    paths: Iterable[Path], timeout: float, cluster: LocalSlurmCluster | None = None, job: JobResult | int | None = None
) -> None:
    paths = [Path(p) for p in paths]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if all(p.exists() for p in paths):
            return
        time.sleep(0.25)
    missing = [str(p) for p in paths if not p.exists()]
    msg = f"timed out after {timeout:.0f}s waiting for {missing}"
    if cluster is not None:
        msg += "\n" + cluster.diagnose(job)
    raise ClusterError(msg)


try:  # pytest fixture: `from tests.slurm.cluster import slurm_cluster` in a test module
    import pytest

    @pytest.fixture(scope="module")
    def slurm_cluster():
        """A started LocalSlurmCluster (n1, n2; 1 CPU each), stopped after the module.
        Skips the test when Slurm cannot be installed or run here."""
        try:
            require_slurm()
        except SlurmUnavailable as e:
            pytest.skip(f"local Slurm cluster unavailable: {e}")
        cluster = LocalSlurmCluster()
        cluster.start()
        try:
            yield cluster
        finally:
            cluster.stop()
except ImportError:  # pragma: no cover - CLI use without pytest
    pass
