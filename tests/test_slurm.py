"""The tiny workflow on a real one-node Slurm cluster, submitted through the shipped profiles
(workflow/profiles/slurm + the slurm-cpu layer) as a user would.

The cluster is Debian's slurm-wlm with munge, MariaDB and slurmdbd (accounting, so `sacct`
sees every job), all in a temporary folder with their own sockets and free ports, and
stopped afterwards. Where the packages are missing they are installed with apt-get (about
25 s); where that is impossible (not root, no apt-get, no network) or the cluster does not
come up, the test is skipped with the reason.
"""

import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import pytest
import yaml
from test_workflow import BIN, ROOT, copy_workflow

pytestmark = pytest.mark.slow

PACKAGES = ["slurm-wlm", "munge", "slurmdbd", "mariadb-server"]
DAEMONS = ["munged", "mariadbd", "mariadb-install-db", "slurmdbd", "slurmctld", "slurmd"]
CLIENTS = ["sbatch", "sacct", "sacctmgr", "scontrol", "sinfo", "squeue", "srun", "mariadb"]
SYSTEM_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
ACCOUNT, PARTITION, CLUSTER = "rere-test", "debug", "rere"
# the tiny DAG: data, index, model, sft, 2 rl, 3 evaluate, 2 baseline, report
JOBS = 12
CPU_LAYER = yaml.safe_load((ROOT / "workflow/profiles/slurm-cpu/config.yaml").read_text())
LAYER_MEM_MB = max(r["mem_mb"] for r in CPU_LAYER["set-resources"].values())


def run(cmd, timeout=60, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, **kwargs)


def tail(text: str, n: int = 1500) -> str:
    return text[-n:].strip()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ensure_packages() -> None:
    """Install Debian's Slurm, munge and MariaDB where they are missing, or skip."""
    if os.geteuid() != 0:
        pytest.skip("a one-node Slurm cluster needs root (slurmd runs jobs as their users)")
    if all(shutil.which(b, path=SYSTEM_PATH) for b in DAEMONS + CLIENTS):
        return
    if not shutil.which("apt-get", path=SYSTEM_PATH):
        pytest.skip(f"Slurm is not installed and there is no apt-get to install {' '.join(PACKAGES)}")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive", "PATH": SYSTEM_PATH}
    for cmd in (
        ["apt-get", "update", "-qq"],
        ["apt-get", "install", "-y", "-qq", "--no-install-recommends", *PACKAGES],
    ):
        try:
            proc = run(cmd, timeout=900, env=env)
        except subprocess.TimeoutExpired:
            pytest.skip(f"`{' '.join(cmd)}` did not finish in 15 minutes")
        if proc.returncode != 0:
            pytest.skip(f"`{' '.join(cmd)}` failed, so no Slurm to test on:\n{tail(proc.stderr + proc.stdout)}")
    missing = [b for b in DAEMONS + CLIENTS if not shutil.which(b, path=SYSTEM_PATH)]
    if missing:
        pytest.skip(f"installed {' '.join(PACKAGES)} but {missing} are still missing")


class Cluster:
    """munged -> mariadbd -> slurmdbd -> slurmctld -> slurmd, each a child process of this test
    (foreground mode, own session) with its files under `root`."""

    def __init__(self, root: Path):
        self.root = root
        self.procs: list[tuple[str, subprocess.Popen]] = []
        self.conf = root / "slurm.conf"
        self.env = {
            **{k: v for k, v in os.environ.items() if not k.startswith("SLURM_")},
            "PATH": f"{SYSTEM_PATH}:{os.environ['PATH']}",
            "SLURM_CONF": str(self.conf),
        }

    # -- helpers ---------------------------------------------------------------------------
    def log(self, name: str) -> str:
        path = self.root / f"{name}.log"
        return tail(path.read_text(errors="replace")) if path.is_file() else "(no log)"

    def spawn(self, name: str, cmd: list[str]) -> None:
        out = open(self.root / f"{name}.out", "w")
        proc = subprocess.Popen(cmd, env=self.env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        self.procs.append((name, proc))

    def wait_for(self, name: str, ready, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        proc = self.procs[-1][1]
        while time.monotonic() < deadline:
            if ready():
                return
            if proc.poll() is not None:
                break
            time.sleep(0.5)
        out = (self.root / f"{name}.out").read_text(errors="replace")
        raise RuntimeError(f"{name} did not come up:\n{tail(out)}\n{self.log(name)}")

    def ok(self, *cmd: str) -> bool:
        try:
            return run(list(cmd), timeout=20, env=self.env).returncode == 0
        except subprocess.TimeoutExpired:
            return False

    def sql(self, statement: str) -> bool:
        return self.ok("mariadb", f"--socket={self.root / 'mysql.sock'}", "-uroot", "-e", statement)

    # -- the cluster -----------------------------------------------------------------------
    def write_configs(self) -> None:
        node = run(["slurmd", "-C"], env=self.env).stdout.splitlines()[0]  # this machine's CPUs/memory
        memory = int(re.search(r"RealMemory=(\d+)", node).group(1))
        if memory < LAYER_MEM_MB:  # a job would pend forever
            pytest.skip(f"this machine has {memory} MB, the slurm-cpu layer asks up to {LAYER_MEM_MB} MB per job")
        node = re.sub(r"NodeName=\S+", f"NodeName={self.host} NodeAddr=127.0.0.1", node)
        r = self.root
        self.conf.write_text(
            f"""ClusterName={CLUSTER}
SlurmctldHost={self.host}(127.0.0.1)
SlurmctldPort={free_port()}
SlurmdPort={free_port()}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=socket={r}/munge.socket
CredType=cred/munge
StateSaveLocation={r}/state
SlurmdSpoolDir={r}/spool
SlurmctldPidFile={r}/slurmctld.pid
SlurmdPidFile={r}/slurmd.pid
SlurmctldLogFile={r}/slurmctld.log
SlurmdLogFile={r}/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=127.0.0.1
AccountingStoragePort={self.dbd_port}
AccountingStoragePass={r}/munge.socket
AccountingStoreFlags=job_comment
JobCompType=jobcomp/none
MpiDefault=none
ReturnToService=2
MinJobAge=300
KillWait=5
MailProg=/bin/true
{node}
PartitionName={PARTITION} Nodes=ALL Default=YES MaxTime=INFINITE State=UP
"""
        )
        dbd = r / "slurmdbd.conf"  # found next to $SLURM_CONF
        dbd.write_text(
            f"""AuthType=auth/munge
AuthInfo=socket={r}/munge.socket
DbdHost=localhost
DbdAddr=127.0.0.1
DbdPort={self.dbd_port}
SlurmUser=root
PidFile={r}/slurmdbd.pid
LogFile={r}/slurmdbd.log
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort={self.sql_port}
StorageUser=root
StorageLoc=slurm_acct_db
"""
        )
        dbd.chmod(0o600)  # slurmdbd refuses a config others can read

    def start(self) -> None:
        r = self.root
        self.host = socket.gethostname().split(".")[0]
        self.dbd_port, self.sql_port = free_port(), free_port()
        for d in ("state", "spool", "mysql"):
            (r / d).mkdir()
        self.write_configs()
        # snakemake-executor-plugin-slurm-jobstep starts each job's command with a nested srun
        # and drops every SLURM_* variable but the job's identity from its environment,
        # SLURM_CONF included; a real cluster's srun finds /etc/slurm/slurm.conf, this one's
        # finds its config through this shim (nothing is written outside the folder).
        (r / "bin").mkdir()
        srun = r / "bin/srun"
        srun.write_text(f'#!/bin/sh\nSLURM_CONF={self.conf} exec {shutil.which("srun", path=SYSTEM_PATH)} "$@"\n')
        srun.chmod(0o755)
        self.env["PATH"] = f"{r / 'bin'}:{self.env['PATH']}"

        key = r / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o600)
        self.spawn("munged", [
            "munged", "--foreground", "--force", f"--key-file={key}", f"--socket={r}/munge.socket",
            f"--pid-file={r}/munged.pid", f"--log-file={r}/munged.log", f"--seed-file={r}/munge.seed",
        ])  # fmt: skip
        self.wait_for("munged", lambda: (r / "munge.socket").exists())

        install = run(["mariadb-install-db", f"--datadir={r}/mysql", "--user=root",
                       "--auth-root-authentication-method=socket", "--skip-test-db"], timeout=120, env=self.env)  # fmt: skip
        if install.returncode != 0:
            raise RuntimeError(f"mariadb-install-db failed:\n{tail(install.stdout + install.stderr)}")
        # No grant tables: slurmdbd logs in as root over TCP without a password (test only).
        self.spawn("mariadbd", [
            "mariadbd", "--no-defaults", f"--datadir={r}/mysql", f"--socket={r}/mysql.sock",
            f"--port={self.sql_port}", "--bind-address=127.0.0.1", "--user=root", "--skip-grant-tables",
            f"--pid-file={r}/mariadbd.pid", f"--log-error={r}/mariadbd.log", "--innodb-buffer-pool-size=64M",
        ])  # fmt: skip
        self.wait_for("mariadbd", lambda: self.sql("SELECT 1"))

        self.spawn("slurmdbd", ["slurmdbd", "-D"])
        self.wait_for("slurmdbd", lambda: self.ok("sacctmgr", "-n", "list", "cluster"))
        for args in (["add", "cluster", CLUSTER], ["add", "account", ACCOUNT, "Description=rere tests"],
                     ["add", "user", "root", f"Account={ACCOUNT}"]):  # fmt: skip
            proc = run(["sacctmgr", "-i", *args], env=self.env)
            if proc.returncode != 0 and "Nothing new added" not in proc.stdout + proc.stderr:
                raise RuntimeError(f"sacctmgr {' '.join(args)} failed:\n{tail(proc.stdout + proc.stderr)}")

        self.spawn("slurmctld", ["slurmctld", "-D", "-i", "-f", str(self.conf)])
        self.wait_for("slurmctld", lambda: self.ok("scontrol", "ping"))
        self.spawn("slurmd", ["slurmd", "-D", "-f", str(self.conf)])
        self.wait_for("slurmd", lambda: run(["sinfo", "-h", "-o", "%T"], env=self.env).stdout.strip() == "idle")

    def stop(self) -> None:
        if any(name == "slurmctld" for name, _ in self.procs):
            subprocess.run(["scancel", "--full", "--user=root"], env=self.env, capture_output=True, timeout=30)
        for _name, proc in reversed(self.procs):
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
        for _name, proc in reversed(self.procs):
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=10)
        self.procs.clear()


@pytest.fixture(scope="module")
def cluster():
    ensure_packages()
    # short path: Unix sockets live here (at most 107 bytes)
    root = Path(tempfile.mkdtemp(prefix="rere-slurm-", dir="/tmp"))
    c = Cluster(root)
    try:
        try:
            c.start()
        except (RuntimeError, OSError, subprocess.SubprocessError, IndexError) as exc:
            pytest.skip(f"the one-node Slurm cluster did not start: {exc}")
        yield c
    finally:
        c.stop()
        shutil.rmtree(root, ignore_errors=True)


def test_tiny_workflow_completes_on_a_real_slurm_cluster(cluster, tmp_path):
    work = copy_workflow(tmp_path)
    env = {
        **cluster.env,
        "PATH": f"{BIN}{os.pathsep}{cluster.env['PATH']}",
        "SLURM_ACCOUNT": ACCOUNT,
        "SLURM_PARTITION": PARTITION,
    }
    started = time.strftime("%Y-%m-%dT%H:%M:%S")
    t0 = time.monotonic()
    proc = subprocess.run(
        [
            str(BIN / "snakemake"),
            "--profile", "workflow/profiles/slurm", "--profile", "workflow/profiles/slurm-cpu",
            # the plugin waits 40 s before its first status check and 10 s more after each
            # check that finds nothing finished; the tiny jobs take seconds
            "--slurm-init-seconds-before-status-checks", "2", "--seconds-between-status-checks", "2",
            "--retries", "0",  # a failure shows at once (the profile retries twice)
            "results/table.csv", "--configfile", "tests/config/tiny.yaml",
        ],
        cwd=work, env=env, capture_output=True, text=True, timeout=1800,
    )  # fmt: skip
    wall = time.monotonic() - t0
    sacct = run(
        ["sacct", "-X", "-n", "-P", "-S", started, "--format=JobID,Comment%60,State,ExitCode,Elapsed,AllocCPUS,ReqMem"],
        env=cluster.env,
    )
    rows = [line.split("|") for line in sacct.stdout.splitlines() if line.strip()]
    listing = "\n".join(" | ".join(r) for r in rows)
    print(f"\nsnakemake through Slurm: {wall:.0f} s, {len(rows)} jobs\n{listing}")
    (tmp_path / "sacct.txt").write_text(f"wall_s={wall:.0f}\n{listing}\n")
    logs = "".join(f"\n--- {p}\n{tail(p.read_text(errors='replace'))}" for p in sorted(work.glob("logs/**/*.log")))
    slurm_logs = "".join(
        f"\n--- {p}\n{tail(p.read_text(errors='replace'))}" for p in sorted(work.glob(".snakemake/slurm_logs/**/*.log"))
    )
    assert proc.returncode == 0, tail(proc.stderr, 5000) + logs + slurm_logs + "\n" + listing

    assert len(rows) == JOBS, listing
    assert [r[2] for r in rows] == ["COMPLETED"] * JOBS, listing
    assert all(r[3] == "0:0" for r in rows), listing
    assert all(int(r[5]) <= 2 for r in rows), listing  # the CPU layer's sizes, not the GPU profile's
    assert (work / "results/table.csv").is_file()
