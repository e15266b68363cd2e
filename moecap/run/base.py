"""What every part of a run shares: the executors' names, a run's outcome, how cells are run."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from moecap.records import Record
from moecap.suite import Cell

EXECUTORS = ("inline", "local", "ray")
ISOLATION = ("cell", "group")
# failure kinds a --resume runs again: the cell was lost, it did not fail on its own
LOST_KINDS = ("worker_died", "node_died")


@dataclass
class CellOutcome:
    cell: Cell
    # ok | failed | skipped (already done, or recorded by another process) | busy (claimed elsewhere) |
    # rescored (done before; its goodput scored again for the workload's changed SLOs)
    status: str
    record: Record | None = None
    path: str | None = None


@dataclass
class SuiteOutcome:
    run_id: str
    outcomes: list[CellOutcome] = field(default_factory=list)
    resumed: bool = False

    @property
    def failed(self) -> list[CellOutcome]:
        return [o for o in self.outcomes if o.status == "failed"]


@dataclass
class ExecutorOptions:
    """How cells are run (``moecap run --help`` describes each)."""

    isolate: str = "cell"
    """``cell``: a fresh worker per cell (the model loads per cell); ``group``: one worker per model x
    runner group, the model loaded once for its cells."""
    cell_timeout_s: float | None = None
    """Per phase of a worker: loading the model, then each cell; past it the worker is killed and the
    cell recorded failed (``timeout``)."""
    max_retries: int = 1
    """New workers for a cell whose worker died (crash, OOM kill, lost node)."""
    kill_grace_s: float = 10.0
    """SIGTERM to a worker's process group, then SIGKILL after this long."""
    address: str | None = None
    """Ray: the cluster (``ray.init(address=...)``); None: a local cluster (or ``RAY_ADDRESS``)."""
    gpu_type: str | None = None
    """Ray: the accelerator type cells that need GPUs must land on (``H100``, ``A100``, ...)."""
    cpus_per_cell: float = 1.0
    """Ray: CPUs each cell reserves."""
    memory_gb: float | None = None
    """Ray: host memory each cell reserves, GB (1e9 B)."""
    verbose: bool = False
    """Local workers: their own output (libraries' progress bars and warnings) on the console as well;
    it always goes to each cell's ``cell.log`` artifact."""

    def describe(self, kind: str) -> dict[str, Any]:
        out: dict[str, Any] = {"kind": kind}
        if kind != "inline":
            out.update(isolate=self.isolate, cell_timeout_s=self.cell_timeout_s, max_retries=self.max_retries)
        if kind == "ray":
            out.update(address=self.address, gpu_type=self.gpu_type, cpus_per_cell=self.cpus_per_cell,
                       memory_gb=self.memory_gb)
        return out


