"""One run of a suite (DESIGN.md section 1): cells measured on loaded runners (``measure``), each cell's
report assembled from its traces (``assemble``), the driver that claims cells and writes records
(``driver``), signals (``signals``), and where cells run: inline (``driver``), worker subprocesses
(``local_executor``, ``worker``) or Ray (``ray_executor``). The executors import the driver's parts, the
driver picks an executor by name: no module here imports one that imports it back."""

from moecap.run.assemble import build_report, price_run
from moecap.run.base import EXECUTORS, ISOLATION, CellOutcome, ExecutorOptions, SuiteOutcome
from moecap.run.driver import Driver, ResumeError, make_executor, run_suite

__all__ = ["EXECUTORS", "ISOLATION", "CellOutcome", "Driver", "ExecutorOptions", "ResumeError", "SuiteOutcome",
           "build_report", "make_executor", "price_run", "run_suite"]
