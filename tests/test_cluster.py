"""The cluster path on this machine: what `ray job submit --working-dir .` uploads, the sweep's storage and resource
checks, and (`ray`) a real multi-node Ray cluster — a head with 0 CPUs and two worker nodes, separate `ray start`
processes on 127.0.0.1 — running the sweep as a Ray job: storage one node cannot see refused, trials on the worker
nodes, `ray job stop` and a resubmission that resumes, a worker node killed mid-trial and its trial finished on the
other node from its checkpoint, the jobs in the dashboard's job API and TensorBoard events per trial."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
import zipfile
from pathlib import Path

import pytest

from visurf_ray.config import ConfigError
from visurf_ray.numerics import PINNED_CPU_NUMERICS, ray_env_vars
from visurf_ray.sweep import load_sweep

ROOT = Path(__file__).resolve().parents[1]
RAY = Path(sys.executable).parent / "ray"
GPU_SWEEP = ROOT / "experiments" / "configs" / "sweep_qwen2_5_vl_3b.yaml"
LEFT_OUT = (".git", ".venv", ".whl", "runs", "results", "wandb", ".cache", ".mypy_cache", ".ruff_cache", ".hypothesis")
MAX_UPLOAD_BYTES = 4 * 2**20


@pytest.mark.parametrize("include_gitignore", [True, False], ids=["gitignore+rayignore", "rayignore-alone"])
def test_job_upload_holds_the_project_only(tmp_path, include_gitignore):
    """The package Ray builds for `--working-dir .` (its own packaging code; `include_gitignore=False` is
    RAY_RUNTIME_ENV_IGNORE_GITIGNORE=1): the sources, no environment, run output, cache or git history."""
    from ray._private.runtime_env.packaging import GCS_STORAGE_MAX_SIZE, create_package

    package = tmp_path / "working_dir.zip"
    create_package(str(ROOT), package, include_gitignore=include_gitignore)
    names = zipfile.ZipFile(package).namelist()
    folders = {name.split("/")[0] for name in names if "/" in name}
    assert not [folder for folder in folders if folder.startswith(LEFT_OUT)], folders
    assert {"visurf_ray", "experiments", "analysis"} <= folders
    assert {"visurf_ray/sweep.py", "experiments/sweep.py", "pyproject.toml", "cluster.yaml"} <= set(names)
    assert not [name for name in names if "__pycache__" in name or ".egg-info" in name]
    assert package.stat().st_size < min(MAX_UPLOAD_BYTES, GCS_STORAGE_MAX_SIZE)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("storage_dir=ftp://bucket/sweeps", r"storage_dir='ftp://bucket/sweeps' is not supported: a URI's scheme"),
        ("tune.gpus_per_trial=1", r"tune\.gpus_per_trial=1.0 is invalid with ray\.num_workers=8"),
        ("experiment.ray.num_workers=0", r"tune\.gpus_per_trial=0 is invalid with ray\.use_gpu=true"),
    ],
)
def test_sweep_storage_and_trial_resources_are_checked(override, message):
    load_sweep(GPU_SWEEP)  # as shipped: 8 GPU workers per trial, the trial itself on 1 CPU
    with pytest.raises(ConfigError, match=message):
        load_sweep(GPU_SWEEP, [override])


def _can_hide_a_folder() -> bool:
    """Whether a process here may start in a mount namespace of its own (root, `unshare`, the capability)."""
    return (
        shutil.which("unshare") is not None
        and subprocess.run(["unshare", "--mount", "true"], capture_output=True).returncode == 0
    )


def _free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


class LocalCluster:
    """A head (0 CPUs: it runs the job's driver, no trial) and worker nodes of 1 CPU each, every node its own
    `ray start` on 127.0.0.1 with its own ports and temp dir. Stopped by killing its own processes only (other Ray
    clusters on the machine are left alone). `node_local`: a folder the last worker node does not see (it runs in a
    mount namespace of its own with an empty tmpfs over that folder), as a path on one machine's disk of a cluster."""

    def __init__(self, root: Path, workers: int, node_local: Path | None = None):
        self.root = root
        self.node_local = node_local
        self.last_worker = f"worker{workers - 1}"
        head_ports = _free_ports(9)
        self.gcs_port, self.dashboard_port = head_ports[:2]
        self.address = f"http://127.0.0.1:{self.dashboard_port}"
        self.env = {  # without conftest's RAY_ADDRESS "local" and the kernel switches, as a shell's `ray start`
            **{name: value for name, value in os.environ.items() if name not in ("RAY_ADDRESS", *PINNED_CPU_NUMERICS)},
            "PATH": f"{RAY.parent}{os.pathsep}{os.environ['PATH']}",
            "RAY_JOB_STOP_WAIT_TIME_S": "60",  # `ray job stop`: time for the sweep to save its state after SIGTERM
        }
        self.names: list[str] = []  # node names, each also a custom resource of its node
        head = ["--head", f"--port={self.gcs_port}", f"--dashboard-port={self.dashboard_port}"]
        self._start("head", head, head_ports)
        for index in range(workers):
            self._start(f"worker{index}", [f"--address=127.0.0.1:{self.gcs_port}"], _free_ports(9))

    def _start(self, name: str, role: list[str], ports: list[int]) -> None:
        temp = self.root / name
        temp.mkdir(parents=True)
        self.names.append(name)
        options = [
            *role,
            "--node-ip-address=127.0.0.1",
            f"--num-cpus={0 if name == 'head' else 1}",
            "--num-gpus=0",
            f"--resources={json.dumps({name: 1})}",
            f"--temp-dir={temp}",
            f"--node-manager-port={ports[2]}",
            f"--object-manager-port={ports[3]}",
            f"--dashboard-agent-listen-port={ports[4]}",
            f"--dashboard-agent-grpc-port={ports[5]}",
            f"--metrics-export-port={ports[6]}",
            f"--runtime-env-agent-port={ports[7]}",
            "--disable-usage-stats",
        ]
        if name == "head":
            options += ["--dashboard-host=127.0.0.1", "--include-dashboard=true"]
            options.append(f"--ray-client-server-port={ports[8]}")
        command = [str(RAY), "start", *options]
        if name == self.last_worker and self.node_local is not None:
            self.node_local.mkdir(parents=True, exist_ok=True)
            hide = 'mount -t tmpfs tmpfs "$0" && exec "$@"'
            private_mounts = ["unshare", "--mount", "--propagation", "private"]
            command = [*private_mounts, "sh", "-c", hide, str(self.node_local), *command]
        subprocess.run(command, env=self.env, check=True, capture_output=True, timeout=120)

    def ray(self, *args: str, check: bool = True) -> str:
        """`ray <args>` (a job command against this cluster's dashboard); its stdout."""
        done = subprocess.run(
            [str(RAY), *args], cwd=ROOT, env=self.env, capture_output=True, text=True, timeout=120, check=False
        )
        assert not check or done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        return done.stdout

    def nodes(self) -> dict[str, str]:
        """Alive node ids by node name (head, worker0, ...), from the dashboard's state API."""
        with urllib.request.urlopen(f"{self.address}/api/v0/nodes?limit=100&detail=1", timeout=10) as response:
            rows = json.load(response)["data"]["result"]["result"]
        return {
            next(r for r in row["resources_total"] if r in self.names): row["node_id"]
            for row in rows
            if row["state"] == "ALIVE"
        }

    def jobs(self) -> dict[str, str]:
        """The dashboard's job API: status by submission id."""
        with urllib.request.urlopen(f"{self.address}/api/jobs/", timeout=10) as response:
            return {job["submission_id"]: job["status"] for job in json.load(response)}

    def wait_for_job(self, submission_id: str, statuses: set[str], timeout: float) -> str:
        deadline = time.time() + timeout
        while (status := self.jobs().get(submission_id)) not in statuses:
            assert time.time() < deadline, f"job {submission_id} still {status}:\n{self.logs(submission_id)}"
            time.sleep(1)
        return status

    def logs(self, submission_id: str) -> str:
        return self.ray("job", "logs", f"--address={self.address}", submission_id, check=False)[-6000:]

    def processes(self, name: str | None = None):
        """This cluster's processes (those of node `name` only, when given): every process whose command line names
        one of its temp dirs, and their descendants (the workers)."""
        import psutil

        marker = str(self.root / name) if name else str(self.root)
        found = {}
        for process in psutil.process_iter(["cmdline"]):
            with contextlib.suppress(psutil.Error):
                if marker in " ".join(process.info["cmdline"] or []):
                    for member in (process, *process.children(recursive=True)):
                        found[member.pid] = member
        return list(found.values())

    def kill(self, name: str | None = None) -> None:
        """SIGKILL node `name` (the whole cluster when None): a lost machine."""
        import psutil

        for process in self.processes(name):
            with contextlib.suppress(psutil.Error):
                process.kill()


def _trial_reports(experiment: Path) -> dict[str, list[dict]]:
    """Each trial folder's reports (Tune's result.json, one JSON object a line), for trials that reported."""
    reports = {}
    for result in experiment.glob("*/result.json"):
        with contextlib.suppress(json.JSONDecodeError):  # a line being written
            rows = [json.loads(line) for line in result.read_text().splitlines() if line]
            if rows:
                reports[result.parent.name] = rows
    return reports


@pytest.mark.ray
def test_workers_of_a_joined_cluster_start_with_the_drivers_kernel_switches():
    """Nodes started without the switches (`ray start` from a shell): a driver that joins them (`init_ray`, as the
    sweep's `connect_ray`) gives its workers its own switches from their start (/proc/self/environ: the environment
    the worker process began with, before any `import visurf_ray` of its own)."""
    import ray

    from visurf_ray.train.launcher import init_ray

    @ray.remote(num_cpus=1)
    def initial_switches() -> dict[str, str]:
        with open("/proc/self/environ") as environ:
            pairs = (entry.split("=", 1) for entry in environ.read().split("\0") if "=" in entry)
            return {key: value for key, value in pairs if key in PINNED_CPU_NUMERICS}

    cluster_dir = Path(f"/tmp/visurf-switches-{os.getpid()}")  # short: Ray's socket paths must fit 107 bytes
    cluster = None
    try:
        cluster = LocalCluster(cluster_dir, workers=1)
        init_ray(f"127.0.0.1:{cluster.gcs_port}")
        assert ray.get(initial_switches.remote(), timeout=120) == ray_env_vars()
    finally:
        ray.shutdown()
        if cluster is not None:
            cluster.kill()
        shutil.rmtree(cluster_dir, ignore_errors=True)


@pytest.mark.ray
def test_sweep_as_a_job_on_a_local_multi_node_cluster(small_policy_dir, tmp_path):
    steps, sft_steps = 64, 16  # ~0.2 s a step here: seconds to stop the job, or kill a node, mid-trial

    def last(trial: str) -> int:
        """The final step of a trial (by its folder name)."""
        return sft_steps if trial.startswith("SFT_") else steps

    name = "pytest-cluster"
    experiment = tmp_path / "runs" / name
    sweep_args = [
        f"name={name}",
        f"variants={{SFT: {{objective.paradigm: sft, steps: {sft_steps}}}, RLVR: {{objective.paradigm: rlvr}}, "
        "ViSurf: {objective.paradigm: visurf}}",
        "seeds=[0]",
        f"experiment.model.path={small_policy_dir}",
        f"experiment.steps={steps}",
        f"experiment.eval_every={steps}",
        "experiment.checkpoint_every=1",
        "experiment.data.eval_size=2",
        "experiment.data.prompts_per_step=2",
        "experiment.objective.num_rollouts=2",
        "experiment.rollout.max_new_tokens=8",
        "experiment.rollout.eval_max_new_tokens=8",
        "experiment.deepspeed.enabled=false",
        f"output_dir={tmp_path / 'results'}",
        f"storage_dir={tmp_path / 'runs'}",
    ]
    cluster_dir = Path(f"/tmp/visurf-cluster-{os.getpid()}")  # short: Ray's socket paths must fit 107 bytes
    cluster = None
    try:
        node_local = cluster_dir / "node-local" if _can_hide_a_folder() else None
        cluster = LocalCluster(cluster_dir, workers=2, node_local=node_local)
        deadline = time.time() + 60
        while len(nodes := cluster.nodes()) < 3:
            assert time.time() < deadline, nodes
            time.sleep(1)

        def submit(submission_id: str, *overrides: str) -> None:
            cluster.ray(
                "job", "submit", f"--address={cluster.address}", f"--submission-id={submission_id}",
                "--working-dir", ".", "--no-wait", "--", "python", "experiments/sweep.py", *sweep_args, *overrides,
            )  # fmt: skip

        # 0. Storage that one node cannot see: the driver refuses it, naming the path.
        if node_local is not None:
            submit("sweep-0", f"storage_dir={node_local / 'runs'}")
            assert cluster.wait_for_job("sweep-0", {"SUCCEEDED", "FAILED", "STOPPED"}, 120) == "FAILED"
            logs = cluster.logs("sweep-0")
            assert (
                f"storage_dir resolves to '{node_local / 'runs'}', which 1 of the cluster's 3 nodes do not see" in logs
            )

        # 1. Submit; stop the job once SFT (the short trial) has finished, while another trial is mid-run.
        submit("sweep-1")
        deadline = time.time() + 240
        while not (finished := {t for t, rows in _trial_reports(experiment).items() if rows[-1]["step"] == last(t)}):
            assert time.time() < deadline and cluster.jobs()["sweep-1"] in ("PENDING", "RUNNING"), cluster.logs(
                "sweep-1"
            )
            time.sleep(0.2)
        cluster.ray("job", "stop", f"--address={cluster.address}", "sweep-1")
        assert cluster.wait_for_job("sweep-1", {"STOPPED", "FAILED", "SUCCEEDED"}, 90) == "STOPPED"
        before = {trial: len(rows) for trial, rows in _trial_reports(experiment).items()}
        assert len(finished) < 3 and len(before) > len(finished), "no trial was left mid-run by the stop"
        finished_reports = {trial: rows for trial, rows in _trial_reports(experiment).items() if trial in finished}

        # 2. Resubmit: the sweep resumes. Kill the worker node of a trial running in this job, between checkpoints.
        submit("sweep-2")
        deadline = time.time() + 300
        while not (
            caught := [
                (trial, rows)
                for trial, rows in _trial_reports(experiment).items()
                if len(rows) > before.get(trial, 0) and 2 <= rows[-1]["step"] < last(trial) - 8
            ]
        ):
            assert time.time() < deadline and cluster.jobs()["sweep-2"] in ("PENDING", "RUNNING"), cluster.logs(
                "sweep-2"
            )
            time.sleep(0.2)
        moved, rows_at_kill = caught[0][0], len(caught[0][1])
        lost = caught[0][1][-1]["node_id"]
        lost_name = next(name for name, node_id in nodes.items() if node_id == lost)
        survivor = next(node_id for name, node_id in nodes.items() if name not in ("head", lost_name))
        cluster.kill(lost_name)
        assert cluster.wait_for_job("sweep-2", {"SUCCEEDED", "FAILED", "STOPPED"}, 400) == "SUCCEEDED", cluster.logs(
            "sweep-2"
        )
        logs = cluster.logs("sweep-2")
        assert "3 trials, 0 failed" in logs, logs

        # Trials ran on the worker nodes only; the one on the lost node finished on the other from its checkpoint.
        reports = _trial_reports(experiment)
        assert len(reports) == 3 and all(rows[-1]["step"] == last(trial) for trial, rows in reports.items())
        assert {row["node_id"] for rows in reports.values() for row in rows} <= {nodes["worker0"], nodes["worker1"]}
        rows = reports[moved]
        retried_at = next(i for i in range(rows_at_kill, len(rows)) if rows[i]["node_id"] == survivor)
        assert {row["node_id"] for row in rows[retried_at:]} == {survivor}
        assert 1 < rows[retried_at]["step"] <= rows[retried_at - 1]["step"] + 1, "not resumed from its checkpoint"
        assert (experiment / moved / "error.txt").is_file()  # the lost node, recorded, then retried
        assert {trial: reports[trial] for trial in finished} == finished_reports  # not run again

        # The driver collected every trial and wrote the report; dashboards: the job API and TensorBoard per trial.
        out_dir = tmp_path / "results" / name
        assert "ViSurf" in (out_dir / "summary.md").read_text()
        import pandas as pd

        assert pd.read_parquet(out_dir / "results.parquet")["trial_id"].nunique() == 3
        assert {"sweep-1": "STOPPED", "sweep-2": "SUCCEEDED"}.items() <= cluster.jobs().items()
        assert all(list((experiment / trial).glob("train/tensorboard/events.out.tfevents.*")) for trial in reports)
    finally:
        if cluster is not None:
            cluster.kill()
        shutil.rmtree(cluster_dir, ignore_errors=True)
