"""Cluster profiles: what one grid task asks of Slurm, validated, and turned into submitit's sbatch parameters."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

from utp_dist.config import ConfigError, build_section, read_yaml
from utp_dist.train_command import EXPECT_CUDA_ENV

# sbatch's long options (Slurm 22.05 `man sbatch`), for the profile's free `sbatch:` block
SBATCH_OPTIONS = frozenset(
    """
account acctg-freq array batch bb bbf begin chdir cluster-constraint clusters comment constraint container contiguous
core-spec cores-per-socket cpu-freq cpus-per-gpu cpus-per-task deadline delay-boot dependency distribution error
exclude exclusive export export-file extra-node-info get-user-env gid gpu-bind gpu-freq gpus gpus-per-node
gpus-per-socket gpus-per-task gres gres-flags hint hold ignore-pbs input job-name kill-on-invalid-dep licenses
mail-type mail-user mcs-label mem mem-bind mem-per-cpu mem-per-gpu mincpus network nice no-kill no-requeue nodefile
nodelist nodes ntasks ntasks-per-core ntasks-per-gpu ntasks-per-node ntasks-per-socket open-mode output overcommit
oversubscribe parsable partition power prefer priority profile propagate qos quiet reboot requeue reservation
signal sockets-per-node spread-job switches test-only thread-spec threads-per-core time time-min tmp uid use-min-nodes
verbose wait wait-all-nodes wckey wrap
""".split()
)
# options the profile sets through its own keys, or that submitit must own for the array and its logs
OWNED = {
    "account": "account",
    "array": "array_parallelism",
    "constraint": "constraint",
    "cpus-per-task": "cpus_per_task",
    "error": "(submitit's log files)",
    "gpus-per-node": "gpus_per_node",
    "job-name": "(the sweep name)",
    "mem": "mem",
    "nodes": "nodes",
    "ntasks-per-node": "tasks_per_node",
    "output": "(submitit's log files)",
    "partition": "partition",
    "qos": "qos",
    "signal": "signal_delay_s",
    "time": "time_min",
    "wrap": "(the task command)",
}


@dataclass
class Resources:
    """What each array task of a grid asks Slurm for; a profile under slurm/profiles/ sets them, a grid's resources: block overrides."""

    partition: str | None = None
    """Slurm partition; null = the cluster's default."""
    account: str | None = None
    """Slurm account to charge."""
    qos: str | None = None
    """Quality of service."""
    time_min: int = 60
    """Wall-time limit of one task (minutes); a timed-out task is requeued and resumes."""
    nodes: int = 1
    """Nodes per task (multi-node training)."""
    gpus_per_node: int = 0
    """GPUs per node; one training process is started per GPU."""
    tasks_per_node: int | None = None
    """Training processes per node; null = gpus_per_node (or 1 without GPUs)."""
    cpus_per_task: int | None = None
    """CPU cores per training process (DataLoader workers + 1 is a good start)."""
    mem: str | None = None
    """Memory per node, in sbatch's syntax (e.g. 64G)."""
    constraint: str | None = None
    """Node features required (sbatch --constraint)."""
    array_parallelism: int = 256
    """Array tasks of the grid that may run at once."""
    signal_delay_s: int = 120
    """Seconds before the time limit at which Slurm sends USR2, so the run can save and be requeued."""
    max_requeues: int = 3
    """Requeues per task after a timeout or preemption, before it is left stopped."""
    sbatch: dict = field(default_factory=dict)
    """Extra sbatch options without the dashes, e.g. {mail-type: END, exclusive: true}."""
    setup: list[str] = field(default_factory=list)
    """Shell lines run before the task (module load, source venv/bin/activate, export ...)."""

    def __post_init__(self) -> None:
        for key in ("time_min", "nodes", "array_parallelism", "signal_delay_s"):
            if getattr(self, key) < 1:
                raise ConfigError(f"{key} must be >= 1, got {getattr(self, key)}")
        for key in ("gpus_per_node", "max_requeues"):
            if getattr(self, key) < 0:
                raise ConfigError(f"{key} must be >= 0, got {getattr(self, key)}")
        for key in ("tasks_per_node", "cpus_per_task"):
            if getattr(self, key) is not None and getattr(self, key) < 1:
                raise ConfigError(f"{key} must be >= 1 or null, got {getattr(self, key)}")
        if self.signal_delay_s >= 60 * self.time_min:
            raise ConfigError(
                f"signal_delay_s ({self.signal_delay_s}) must be shorter than the time limit "
                f"(time_min {self.time_min} = {60 * self.time_min} s), or every attempt is stopped at once"
            )
        self.sbatch = {_option(str(k)): v for k, v in self.sbatch.items()}

    @property
    def processes_per_node(self) -> int:
        """Training processes per node."""
        return self.tasks_per_node or max(1, self.gpus_per_node)

    def device_check(self) -> list[str]:
        """The setup line that makes each training process fail at start when it sees fewer GPUs than its share (not train on the CPU)."""
        if not self.gpus_per_node:
            return []
        return [f"export {EXPECT_CUDA_ENV}={max(1, self.gpus_per_node // self.processes_per_node)}"]

    def submitit_parameters(self, job_name: str) -> dict:
        """Keyword arguments for submitit's SlurmExecutor.update_parameters."""
        params = {
            "job_name": job_name,
            "time": self.time_min,
            "nodes": self.nodes,
            "ntasks_per_node": self.processes_per_node,
            "array_parallelism": self.array_parallelism,
            "signal_delay_s": self.signal_delay_s,
            # scontrol requeue (submitit's requeue) is refused on clusters whose default is --no-requeue
            "additional_parameters": {"requeue": True, **self.sbatch},
            "setup": list(self.setup) + self.device_check(),
        }
        optional = {
            "partition": self.partition,
            "account": self.account,
            "qos": self.qos,
            "cpus_per_task": self.cpus_per_task,
            "mem": self.mem,
            "constraint": self.constraint,
            "gpus_per_node": self.gpus_per_node or None,
        }
        if self.cpus_per_task:  # srun of Slurm 22.05-23.02 no longer inherits sbatch's --cpus-per-task
            params["srun_args"] = ["--cpus-per-task", str(self.cpus_per_task)]
        return params | {k: v for k, v in optional.items() if v is not None}

    def summary(self) -> str:
        """One line for the dry-run table."""
        gpus = f"{self.gpus_per_node} GPU/node" if self.gpus_per_node else "no GPU"
        return f"{self.nodes} node(s) x {self.processes_per_node} process(es), {gpus}, {self.time_min} min"


def _option(key: str) -> str:
    name = key.lstrip("-").replace("_", "-")
    if name in OWNED:
        raise ConfigError(f"sbatch.{key}: set it with the profile key '{OWNED[name]}', not in the sbatch block")
    if name not in SBATCH_OPTIONS:
        raise ConfigError(f"sbatch.{key} is not an sbatch option; valid ones: {', '.join(sorted(SBATCH_OPTIONS - set(OWNED)))}")
    return name


def load_resources(profile: str | Path | None, overrides: dict, where: str) -> Resources:
    """The profile file (if any) with the grid's resources: block on top, validated; errors name the file."""
    raw: dict = {}
    if profile is not None:
        raw = read_yaml(profile)
        _build(raw, str(profile))
    return _build({**raw, **overrides}, f"{where}: resources")


def _build(raw: dict, where: str) -> Resources:
    try:
        return build_section(Resources, raw, "")
    except ConfigError as err:
        raise ConfigError(f"{where}: {err}") from None


def as_dict(resources: Resources) -> dict:
    """The resources as stored in the sweep ledger."""
    return asdict(resources)
