"""SGLang as a served backend: ``python -m sglang.launch_server`` launched by moecap on the suite's model,
benchmarked over its OpenAI-compatible API like every other server, stopped afterwards; with
``record_experts``, the expert routing of every cell's measured window from SGLang's own recorder.

- The model, requests, device: as for vLLM (``moecap.runners.vllm``): token-id prompts on
  ``/v1/completions`` (SGLang takes ``prompt: [ids]`` and a native ``ignore_eos``), ``random:`` models
  refused, ``CUDA_VISIBLE_DEVICES`` set for a one-GPU server on ``cuda:N``.

Flags, and where their spelling was checked (SGLang's CLI of late 2025 / early 2026): every flag below is
in SGLang's server-argument reference, ``docs/advanced_features/server_arguments.md``, and in
``python/sglang/srt/server_args.py`` (where each dataclass field ``x_y`` becomes ``--x-y``):
``--model-path``, ``--served-model-name``, ``--host``, ``--port``, ``--dtype``, ``--tp-size``, ``--dp-size``,
``--ep-size`` (MoE section: ``--expert-parallel-size``/``--ep-size``/``--ep``), ``--mem-fraction-static``,
``--max-running-requests``, ``--chunked-prefill-size`` (-1 disables), ``--context-length``,
``--kv-cache-dtype``, ``--quantization``, ``--disable-radix-cache``, ``--disable-cuda-graph``,
``--attention-backend``, ``--moe-runner-backend``, ``--moe-a2a-backend`` (also docs "Expert Parallelism":
"--moe-a2a-backend: Selects the backend for all-to-all communication. --moe-runner-backend: Selects the
backend for MoE computation"), ``--random-seed``, ``--trust-remote-code``, ``--revision``,
``--expert-distribution-recorder-mode`` and ``--expert-distribution-recorder-buffer-size`` ("Circular buffer
size of expert distribution recorder. Set to -1 to denote infinite buffer"). Readiness: ``GET /health``.

Expert distribution recording (``record_experts``), from SGLang's ``python/sglang/srt/eplb/
expert_distribution.py`` and ``entrypoints/http_server.py``:

- the server starts with ``--expert-distribution-recorder-mode stat`` and an unbounded buffer
  (``--expert-distribution-recorder-buffer-size -1``), and ``SGLANG_EXPERT_DISTRIBUTION_RECORDER_DIR`` (the
  dump folder; SGLang's default is ``/tmp``) set to a folder of this runner's own;
- per cell: the warm-up requests are sent first (untimed, unrecorded), then ``POST
  /start_expert_distribution_record`` (which also resets the recorder), the measured window, ``POST
  /stop_expert_distribution_record`` and ``POST /dump_expert_distribution_record`` (the three routes accept
  GET and POST). Rank 0 writes ``expert_distribution_recorder_<time>.pt`` with ``torch.save``;
- :func:`expert_distribution_stats` turns the dump into per-MoE-layer expert counts, the tokens counted and
  the expert union of every forward pass, which go into the trace (``extra["routing_stats"]``,
  ``extra["pass_expert_unions"]``); the record's estimated decode S-MBU then uses the recorded routing
  instead of uniform routing. Per-pass timings are not exposed, so utilization stays an estimate.

The recorder needs the model's SGLang implementation to describe its experts
(``get_model_config_for_expert_location``: DeepSeek V2/V3, Qwen2-MoE, Qwen3-MoE, GPT-OSS, MiniMax, ...);
for other models (SGLang's Mixtral had none in the versions checked) SGLang refuses to start, and the log
says so.
"""

from __future__ import annotations

import glob
import os
import shutil
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from typing import Any

from moecap.runners.base import RunTrace
from moecap.runners.openai_runner import OpenAIRunner
from moecap.runners.vllm import EngineServedRunner

DUMP_DIR_ENV = "SGLANG_EXPERT_DISTRIBUTION_RECORDER_DIR"
DUMP_GLOB = "expert_distribution_recorder_*.pt"
NOT_RECORDING = (
    "SGLang records expert routing only with record_experts: true (its expert distribution recorder); "
    "it was off"
)
RECORDED = (
    "per-layer expert counts and per-pass expert unions of the measured window from SGLang's expert "
    "distribution recorder; SGLang exposes no per-pass timings, so utilization is estimated"
)


# -- the dump ------------------------------------------------------------------------------------------
def _plain(x: Any) -> Any:
    """Tensors and arrays as nested lists; lists as they are."""
    return x.tolist() if hasattr(x, "tolist") else x


def _matrix(x: Any, what: str) -> list[list[int]]:
    rows = _plain(x)
    if not isinstance(rows, list) or not rows or not all(isinstance(r, list) for r in rows):
        raise ValueError(f"{what}: expected a [layers, experts] array, got {type(x).__name__}")
    width = len(rows[0])
    if width == 0 or any(len(r) != width for r in rows):
        raise ValueError(f"{what}: rows of unequal or zero length")
    return [[int(c) for c in r] for r in rows]


def _add(a: list[list[int]], b: list[list[int]]) -> list[list[int]]:
    return [[x + y for x, y in zip(ra, rb)] for ra, rb in zip(a, b)]


def _to_logical(physical: list[list[int]], phys_to_logical: list[list[int]], n_logical: int) -> list[list[int]]:
    if len(physical) != len(phys_to_logical) or any(len(p) != len(m) for p, m in zip(physical, phys_to_logical)):
        raise ValueError("global_physical_count and last_physical_to_logical_map differ in shape")
    out = [[0] * n_logical for _ in physical]
    for layer, (counts, mapping) in enumerate(zip(physical, phys_to_logical)):
        for c, e in zip(counts, mapping):
            out[layer][int(e)] += c
    return out


def expert_distribution_stats(dump: Mapping[str, Any], *, moe_layers: Sequence[int] | None = None,
                              top_k: int | None = None, summed_ranks: int = 1) -> dict[str, Any]:
    """Per-layer expert activation counts from a loaded SGLang expert-distribution dump.

    The dump is what ``torch.load`` returns for the ``expert_distribution_recorder_*.pt`` file SGLang writes
    (``python/sglang/srt/eplb/expert_distribution.py``, ``_StatAccumulator.dump`` / ``_DetailAccumulator.dump``,
    late 2025 / early 2026), in one of two shapes:

    - ``stat`` mode: ``{"rank": 0, "logical_count": int tensor [passes, layers, logical experts],
      "average_utilization_rate_over_window": float | None}``: one row per forward pass recorded (with a
      bounded circular buffer, unused slots are all-zero rows; older SGLang wrote an already summed
      ``[layers, experts]`` tensor, also accepted). The counts are all-reduced (summed) over the server's
      ranks: when each of ``summed_ranks`` ranks counted every token (tensor parallelism without an
      all-to-all backend), pass that number and the counts are divided by it (they must divide exactly).
    - ``per_pass`` / ``per_token`` mode: ``{"records": [{"forward_pass_id", "rank", "gatherer_key",
      "global_physical_count": int tensor [layers, physical experts], ...}, ...],
      "last_physical_to_logical_map": int tensor [layers, physical experts]}``, one file per rank; physical
      slots (redundant experts included) are mapped to logical experts with the map. Records of the lowest
      rank present are used.

    A count is one (token, expert) routing: each token adds ``top_k`` to its layer. Rows cover every
    decoder layer (a dense layer's row stays zero); ``moe_layers`` keeps those layers, in that order.
    Returns ``{"source", "mode", "layers": [[count per expert] per kept layer], "tokens": tokens counted
    (the largest layer total / top_k; None without top_k), "passes": forward passes with routed tokens
    (None when the dump has no per-pass rows), "pass_expert_unions": [[experts with a count > 0, per kept
    layer] per such pass] or None, "pass_tokens": [tokens routed in each such pass] or None (without
    top_k)}``.
    """
    if not isinstance(dump, Mapping):
        raise ValueError(f"an SGLang expert distribution dump is a dict; got {type(dump).__name__}")
    if summed_ranks < 1:
        raise ValueError(f"summed_ranks must be >= 1; got {summed_ranks}")
    passes: list[list[list[int]]] | None
    if "logical_count" in dump:
        mode = "stat"
        raw = dump["logical_count"]
        shape = tuple(getattr(raw, "shape", ()) or ())
        counts = _plain(raw)
        if len(shape) == 3 and shape[0] == 0:  # recording saw no forward pass: [0, layers, experts]
            total, passes = [[0] * int(shape[2]) for _ in range(int(shape[1]))], []
        elif isinstance(counts, list) and counts and isinstance(counts[0], list) and counts[0] \
                and isinstance(counts[0][0], list):
            steps = [_matrix(step, "logical_count[step]") for step in counts]
            if len({(len(s), len(s[0])) for s in steps}) != 1:
                raise ValueError("logical_count: passes of different shapes")
            passes = [s for s in steps if any(any(r) for r in s)]  # all-zero rows: unused buffer slots
            total = [[0] * len(steps[0][0]) for _ in steps[0]]
            for s in passes:
                total = _add(total, s)
        else:
            total, passes = _matrix(counts, "logical_count"), None
        if summed_ranks > 1:
            bad = [c for row in total for c in row if c % summed_ranks]
            if bad:
                raise ValueError(
                    f"logical_count is not a multiple of summed_ranks={summed_ranks}: the ranks did not each "
                    "count every token"
                )
            total = [[c // summed_ranks for c in row] for row in total]
            if passes is not None:
                passes = [[[c // summed_ranks for c in row] for row in s] for s in passes]
    elif "records" in dump:
        records = list(dump["records"])
        if "last_physical_to_logical_map" not in dump:
            raise ValueError("a per-pass dump without last_physical_to_logical_map")
        mapping = _matrix(dump["last_physical_to_logical_map"], "last_physical_to_logical_map")
        n_logical = max(max(r) for r in mapping) + 1
        if not records:
            raise ValueError("the dump holds no records: nothing was recorded")
        rank = min(int(r.get("rank", 0)) for r in records)
        mine = sorted((r for r in records if int(r.get("rank", 0)) == rank),
                      key=lambda r: int(r.get("forward_pass_id", 0)))
        mode = "per_token" if any("topk_ids_of_layer" in r for r in mine) else "per_pass"
        steps = [_to_logical(_matrix(r["global_physical_count"], "global_physical_count"), mapping, n_logical)
                 for r in mine]
        passes = [s for s in steps if any(any(row) for row in s)]
        total = [[0] * n_logical for _ in mapping]
        for s in passes:
            total = _add(total, s)
    else:
        raise ValueError(
            "not an SGLang expert distribution dump: neither logical_count (stat mode) nor records "
            f"(per_pass/per_token mode); keys: {sorted(map(str, dump))}"
        )
    keep = list(range(len(total))) if moe_layers is None else [int(i) for i in moe_layers]
    out_of_range = [i for i in keep if not 0 <= i < len(total)]
    if out_of_range:
        raise ValueError(f"moe_layers {out_of_range} outside the dump's {len(total)} layers")
    layers = [total[i] for i in keep]
    routed = max((sum(r) for r in layers), default=0)
    tokens: int | float | None = None
    if top_k:
        tokens = routed // top_k if routed % top_k == 0 else routed / top_k
    unions = None if passes is None else [[sum(1 for c in s[i] if c > 0) for i in keep] for s in passes]
    pass_tokens = None
    if passes is not None and top_k:  # tokens routed in each pass: its busiest layer's count / top_k
        pass_tokens = [max((sum(s[i]) for i in keep), default=0) / top_k for s in passes]
    return {
        "source": f"sglang expert_distribution_recorder ({mode})",
        "mode": mode,
        "layers": layers,
        "tokens": tokens,
        "passes": None if passes is None else len(passes),
        "pass_expert_unions": unions,
        "pass_tokens": pass_tokens,
    }


# -- the runner ----------------------------------------------------------------------------------------
class SGLangRunner(EngineServedRunner):
    name = "sglang"
    engine = "sglang"

    def server_prompt_cache(self) -> str:
        return ("radix (prefix) cache off (--disable-radix-cache)" if self.args.disable_radix_cache
                else "radix (prefix) cache on")

    def __init__(self, args: Any, hardware: Any):
        super().__init__(args, hardware)
        self.dump_dir: str | None = None
        self._own_dump_dir = False

    def world_size(self) -> int:
        return (self.args.tp_size or 1) * (self.args.dp_size or 1)

    def server_command(self, model_arg: str) -> list[str]:
        a = self.args
        cmd = self.launcher_argv() + [
            "--model-path", model_arg,
            "--served-model-name", self.served_model,
            "--host", a.host, "--port", str(self.port),
            "--dtype", a.dtype,
        ]
        for flag, value in (
            ("--tp-size", a.tp_size),
            ("--dp-size", a.dp_size),
            ("--ep-size", a.ep_size),
            ("--mem-fraction-static", a.mem_fraction_static),
            ("--max-running-requests", a.max_running_requests),
            ("--chunked-prefill-size", a.chunked_prefill_size),
            ("--context-length", a.context_length),
            ("--kv-cache-dtype", a.kv_cache_dtype),
            ("--quantization", a.quantization),
            ("--attention-backend", a.attention_backend),
            ("--moe-runner-backend", a.moe_runner_backend),
            ("--moe-a2a-backend", a.moe_a2a_backend),
            ("--random-seed", a.random_seed),
        ):
            if value is not None:
                cmd += [flag, str(value)]
        if a.disable_radix_cache:
            cmd.append("--disable-radix-cache")
        if a.disable_cuda_graph:
            cmd.append("--disable-cuda-graph")
        cmd += self.model_flags()
        if a.record_experts:
            # server_args.py: expert_distribution_recorder_mode in {stat, stat_approx, per_pass, per_token};
            # buffer size -1 = an unbounded buffer, so no pass of a long window is overwritten
            cmd += ["--expert-distribution-recorder-mode", "stat",
                    "--expert-distribution-recorder-buffer-size", "-1"]
        return cmd + list(a.extra_args)

    def server_env(self) -> dict[str, str] | None:
        env = super().server_env() or dict(os.environ)
        if self.args.record_experts:
            if DUMP_DIR_ENV in self.args.env:
                self.dump_dir, self._own_dump_dir = self.args.env[DUMP_DIR_ENV], False
            else:
                if self.dump_dir is None or not self._own_dump_dir:
                    self.dump_dir, self._own_dump_dir = tempfile.mkdtemp(prefix="moecap-sglang-experts-"), True
                env[DUMP_DIR_ENV] = self.dump_dir
        return env

    # -- recording -----------------------------------------------------------------------------
    def _control(self, route: str, timeout_s: float = 120) -> None:
        """POST one of SGLang's expert-distribution routes; raise with the answer when it is not 2xx."""
        req = urllib.request.Request(f"{self.base_url}/{route}", data=b"", method="POST")
        if self.args.api_key:
            req.add_header("Authorization", f"Bearer {self.args.api_key.get_secret_value()}")
        try:
            with urllib.request.urlopen(req, timeout=timeout_s) as resp:
                resp.read()
        except urllib.error.HTTPError as err:
            body = err.read().decode("utf-8", errors="replace")[:500]
            raise RuntimeError(f"POST /{route}: HTTP {err.code}: {body}") from None

    def _dumps(self) -> set[str]:
        return set(glob.glob(os.path.join(self.dump_dir or "", DUMP_GLOB)))

    def _new_dump(self, before: set[str], timeout_s: float = 60) -> str:
        end = time.monotonic() + timeout_s
        while True:
            new = sorted(self._dumps() - before, key=os.path.getmtime)
            if new:
                time.sleep(0.2)  # torch.save writes in place: let the writer finish
                return new[-1]
            if time.monotonic() > end:
                raise TimeoutError(f"SGLang wrote no {DUMP_GLOB} into {self.dump_dir} within {timeout_s:.0f} s")
            time.sleep(0.1)

    def _model_routing(self) -> tuple[list[int] | None, int | None]:
        """MoE layer indices and top-k from the model's HF config (None, None: unknown)."""
        if not self._hf_config:
            return None, None
        try:
            from moecap.metrics.accounting import from_hf_config

            acc = from_hf_config(self._hf_config)
        except Exception:
            return None, None
        moe = [layer for layer in acc.layers if layer.is_moe]
        return [layer.index for layer in moe], (moe[0].top_k if moe else None)

    def summed_ranks(self) -> int:
        """Ranks whose stat counts SGLang sums that each routed every token: the TP ranks when tokens are
        dispatched by all-reduce/all-gather (no all-to-all backend), else 1."""
        if self.args.moe_a2a_backend in (None, "none"):
            return self.args.tp_size or 1
        return 1

    def _warm_up(self, workload: Any, load: Any, n: int) -> None:
        """The warm-up requests, sent before recording starts: the first ``n`` prompts at the load's
        concurrency (all at once for a rate load), awaited, traces dropped, as the load generator does."""
        warm_workload = workload.model_copy(update={"num_prompts": n})
        warm_load = type(load)(concurrency=load.concurrency or load.batch_size or n)
        OpenAIRunner.run(self, warm_workload, warm_load)

    def run(self, workload: Any, load: Any) -> RunTrace:
        if not self.args.record_experts:
            trace = super().run(workload, load)
            trace.tracing = {"traced": False, "source": None, "reason": NOT_RECORDING}
            return trace
        args = self.args
        self.args = args.model_copy(update={"warmup_requests": 0})  # warm-up sent here, outside the recording
        try:
            if args.warmup_requests:
                self._warm_up(workload, load, args.warmup_requests)
            before = self._dumps()
            self._control("start_expert_distribution_record")
            try:
                trace = super().run(workload, load)
            finally:
                stop_error = None
                try:
                    self._control("stop_expert_distribution_record")
                except Exception as err:  # reported below unless the run itself failed
                    stop_error = err
        finally:
            self.args = args
        try:
            if stop_error is not None:
                raise stop_error
            self._control("dump_expert_distribution_record")
            path = self._new_dump(before)
            import torch

            dump = torch.load(path, map_location="cpu", weights_only=True)
            os.remove(path)
            moe_layers, top_k = self._model_routing()
            stats = expert_distribution_stats(dump, moe_layers=moe_layers, top_k=top_k,
                                              summed_ranks=self.summed_ranks())
        except Exception as err:
            trace.tracing = {"traced": False, "source": "sglang expert_distribution_recorder",
                             "reason": f"recording expert routing failed: {type(err).__name__}: {err}"}
            return trace
        trace.extra["routing_stats"] = {"source": stats["source"], "layers": stats["layers"],
                                        "tokens": stats["tokens"]}
        if stats["pass_expert_unions"] is not None:
            trace.extra["pass_expert_unions"] = stats["pass_expert_unions"]
            if stats.get("pass_tokens") is not None:
                trace.extra["pass_tokens"] = stats["pass_tokens"]
        trace.tracing = {"traced": True, "source": stats["source"], "reason": RECORDED}
        return trace

    def close(self) -> None:
        super().close()
        if self._own_dump_dir and self.dump_dir:
            shutil.rmtree(self.dump_dir, ignore_errors=True)
            self.dump_dir, self._own_dump_dir = None, False
