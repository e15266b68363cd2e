"""moecap's own engine as a runner (``engine``): the Hugging Face model with every MoE block replaced by
the expert store of :mod:`moecap.engine.store`, placed and quantized as the plan says, measured exactly
like the ``hf`` runner (static batches, per-pass timing, traced experts, per-request timestamps), so
every metric and the leaderboard apply unchanged. Records add the plan, the bytes per tier, each
expert's stored bytes (S-MBU counts the bytes of the experts a pass really read, at their precision)
and how often host experts ran on the CPU or were copied.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from moecap.runners.base import RunTrace
from moecap.runners.hf import HFRunner


class EngineRunner(HFRunner):
    name = "engine"

    def __init__(self, args: Any, hardware: Any):
        super().__init__(args, hardware)
        self.plan = None
        self.stores: list[Any] = []
        self.profile = None

    # -------------------------------------------------------------------------- lifecycle
    def _calibration_windows(self) -> list[list[int]]:
        """Token windows for profiling: held-out-free text the machine has (the stdlib), or random ids."""
        import numpy as np

        n, length = self.args.profile_windows, self.args.profile_tokens
        if n == 0:
            return []
        vocab = int(self.model.config.vocab_size)
        if self.tokenizer is not None:
            from moecap.corpus import stdlib_text

            ids = self.tokenizer(stdlib_text(max_chars=n * length * 8), add_special_tokens=False)["input_ids"]
            if len(ids) >= n * length:
                return [ids[i * length:(i + 1) * length] for i in range(n)]
        rng = np.random.default_rng(0)
        return rng.integers(0, vocab, size=(n, length)).tolist()

    def build_plan(self) -> Any:
        from moecap.engine.planner import make_plan, profile
        from moecap.engine.store import ExpertPlan, experts_per_layer
        from moecap.runners.args import EnginePlanSpec

        spec = self.args.plan
        per_layer = experts_per_layer(self.model)
        g = self.args.group_size
        if self.args.select is not None:
            from moecap.engine.pareto import load_frontier, select

            sel = self.args.select
            best = select(load_frontier(Path(sel.frontier).expanduser()), sel.max_perplexity, sel.min_tokens_per_s)
            if best is None or not best.plan_detail:
                raise ValueError(f"runner engine: no configuration in {sel.frontier} meets max_perplexity="
                                 f"{sel.max_perplexity}, min_tokens_per_s={sel.min_tokens_per_s}")
            plan = ExpertPlan.from_dict(best.plan_detail)
            plan.notes = {**plan.notes, "selected_from": sel.frontier, "measured_tokens_per_s": best.tokens_per_s,
                          "measured_perplexity": best.perplexity}
            return plan
        if isinstance(spec, str) and spec.endswith(".json"):
            plan = ExpertPlan.load(Path(spec).expanduser())
            plan.group_size = plan.group_size or g
            return plan
        if spec == "resident":
            return ExpertPlan.uniform(per_layer, "fast", "full", g, "resident")
        if spec == "offload-all":
            return ExpertPlan.uniform(per_layer, "host", "full", g, "offload-all")
        if spec in ("int8-all", "int4-all"):
            return ExpertPlan.uniform(per_layer, "fast", spec.split("-")[0], g, spec)
        assert isinstance(spec, EnginePlanSpec)
        prof = None
        if (spec.quantize_fraction or spec.offload_fraction or spec.fast_budget_gb) and self.args.profile_windows:
            prof = profile(self.model, self._calibration_windows(), precisions=(spec.precision,), group_size=g,
                           source="stdlib text" if self.tokenizer is not None else "random ids")
        self.profile = prof
        budget = spec.fast_budget_gb * 1e9 if spec.fast_budget_gb else None
        return make_plan(self.model, prof, spec.quantize_fraction, spec.precision, spec.offload_fraction, budget, g)

    def load(self, model_cfg: Any) -> None:
        import torch

        from moecap.engine.store import CostModel, install
        from moecap.models import load_causal_lm
        from moecap.runners.tracing import ExpertTracer

        self.model, self.tokenizer, self.model_source = load_causal_lm(
            model_cfg, self.device, self.torch_dtype, self.args.attn_implementation
        )
        self.plan = self.build_plan()
        host_flops = (self.args.host_gflops * 1e9) if self.args.host_gflops else _calibrated_cpu_flops()
        cost = CostModel(host_flops=host_flops, link_Bps=self.args.link_gbs * 1e9, mode=self.args.offload_mode)
        prefetch: dict[int, list[int]] = {}
        if self.args.prefetch and self.device.startswith("cuda") and self.profile is not None:
            for layer, slots in self.plan.layers.items():
                host = [e for e, s in enumerate(slots) if s.placement == "host"]
                host.sort(key=lambda e: -self.profile.freq[layer][e])
                prefetch[layer] = host[: self.args.prefetch]
        with torch.inference_mode():
            self.stores = install(self.model, self.plan, self.device, cost, prefetch, self.args.cache_size)
        if self.args.trace_experts:
            self.tracer = ExpertTracer(self.model).attach()

    def close(self) -> None:
        self.stores = []
        super().close()

    # -------------------------------------------------------------------------- accounting
    def expert_bytes(self) -> dict[int, list[float]]:
        return {s.layer: [float(b) for b in s.expert_nbytes()] for s in self.stores}

    def tier_bytes(self) -> dict[str, int]:
        out = {"fast": 0, "host": 0}
        for s in self.stores:
            for k, v in s.tier_nbytes().items():
                out[k] += v
        return out

    def _memory(self, energy: dict[str, Any]) -> dict[str, Any]:
        out = super()._memory(energy)
        tiers = self.tier_bytes()
        non_expert = out.get("weights_bytes", 0)
        out.update({
            "non_expert_weights_bytes": non_expert,
            "expert_bytes_fast": tiers["fast"],
            "expert_bytes_host": tiers["host"],
            "weights_bytes": non_expert + tiers["fast"] + tiers["host"],
            # what the fast device holds: everything but the host experts
            "fast_tier_weights_bytes": non_expert + tiers["fast"],
        })
        return out

    def run(self, workload: Any, load: Any) -> RunTrace:
        for s in self.stores:
            s.calls = dict.fromkeys(s.calls, 0)
        trace = super().run(workload, load)
        trace.expert_bytes = self.expert_bytes()
        calls: dict[str, int] = {}
        for s in self.stores:
            for k, v in s.calls.items():
                calls[k] = calls.get(k, 0) + v
        trace.extra["engine"] = {"plan": self.plan.summary(), "expert_calls": calls,
                                 "cost_model": vars(self.stores[0].cost) if self.stores else None}
        return trace

    def info(self) -> dict[str, Any]:
        out = super().info()
        if self.plan is not None:
            out["plan"] = self.plan.summary()
            out["plan_detail"] = self.plan.to_dict()
            out["tier_bytes"] = self.tier_bytes()
        if self.profile is not None:
            out["profile"] = {"tokens": self.profile.tokens, "source": self.profile.source}
        return out


def _calibrated_cpu_flops() -> float:
    """The cached calibrated fp32 matmul rate of this CPU, else a conservative 2e11 FLOP/s."""
    try:
        from moecap.hardware import detect_hardware, load_calibration

        peaks = load_calibration(detect_hardware("cpu").device_name, "float32")
        if peaks is not None:
            return float(peaks.flops_for("float32"))
    except Exception:
        pass
    return 2e11
