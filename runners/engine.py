"""moecap's own engine as a runner (``engine``): the engine's decoder (:mod:`moecap.engine.model`),
streamed from the checkpoint straight into an expert placement plan, measured exactly like the ``hf``
runner (static batches, per-pass timing, traced experts, per-request timestamps), so every metric and the
leaderboard apply unchanged.

Records add the plan (and where it came from: a preset, a file, fractions, a mixture of precisions,
the calibration data), the bytes per tier, each expert's stored bytes and placement (S-MBU counts the
bytes of the experts a pass really read, at their precision, and splits them by tier), which kernel ran
each precision in which compute dtype, how host experts ran (on the host, or copied), the cost model
behind that choice, and how the model was loaded (streamed bytes, seconds, peak memory).
"""

from __future__ import annotations

import resource
from pathlib import Path
from typing import Any

from moecap.runners.base import RunTrace
from moecap.runners.hf import HFRunner


class EngineRunner(HFRunner):
    name = "engine"

    def __init__(self, args: Any, hardware: Any):
        super().__init__(args, hardware)
        self.plan = None
        self.profile = None
        self.cost = None
        self.plan_origin: dict[str, Any] = {}
        self._has_host = False

    @property
    def stores(self) -> list[Any]:
        return self.model.stores if self.model is not None else []

    # -------------------------------------------------------------------------- sources
    def _source(self, model_cfg: Any) -> tuple[Any, Any, Any, dict[str, Any]]:
        """(transformers config, tensor source, tokenizer or None, source description) of the suite's model."""
        from moecap.engine.model import CheckpointSource, RandomSource
        from moecap.models import ModelLoadError, hf_config_from_dict, local_path_for, random_config_dict
        from moecap.registry import EMBEDDED_MODELS

        if model_cfg.id.startswith("random:"):
            ref = model_cfg.id.split(":", 1)[1]
            config = hf_config_from_dict(random_config_dict(ref, model_cfg.overrides))
            return config, RandomSource(config), None, {"kind": "random", "config": ref, "overrides": model_cfg.overrides,
                                                        "weights": "drawn per tensor by the engine (RandomSource)"}
        if model_cfg.overrides:
            raise ModelLoadError(f"model {model_cfg.id!r}: 'overrides' change the architecture and apply to random: "
                                 "models only")
        path = local_path_for(model_cfg.id)
        kind = "embedded" if model_cfg.id in EMBEDDED_MODELS else ("local" if Path(path).is_dir() else "hub")
        if kind == "hub":
            try:
                from huggingface_hub import snapshot_download

                path = snapshot_download(model_cfg.id, revision=model_cfg.revision,
                                         allow_patterns=["*.json", "*.safetensors", "tokenizer*", "*.model", "*.txt"])
            except Exception as err:
                raise ModelLoadError(
                    f"could not fetch model {model_cfg.id!r} from the Hugging Face hub ({type(err).__name__}: {err}) "
                    "(no network? set HF_HUB_OFFLINE=1 with a populated cache, or use a local directory, "
                    "'random:<config>' or an embedded model)") from err
        from transformers import AutoConfig, AutoTokenizer

        config = AutoConfig.from_pretrained(path, trust_remote_code=model_cfg.trust_remote_code)
        try:
            tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=model_cfg.trust_remote_code)
        except Exception:  # a model without a tokenizer still runs random-token workloads
            tokenizer = None
        return config, CheckpointSource(path), tokenizer, {"kind": kind, "path": str(path), "revision": model_cfg.revision}

    # -------------------------------------------------------------------------- plans
    def _plan(self, arch: Any, dtype: Any) -> tuple[Any, Any]:
        """(plan, spec) — the plan when it needs no profile, else None and the spec asking for one."""
        from moecap.engine.store import ExpertPlan, PlanError
        from moecap.runners.args import EnginePlanSpec

        spec = self.args.plan
        per_layer = arch.experts_per_layer()
        g = self.args.group_size
        if self.args.select is not None:
            from moecap.studies.pareto import load_frontier, select

            sel = self.args.select
            best = select(load_frontier(Path(sel.frontier).expanduser()), sel.max_perplexity, sel.min_tokens_per_s)
            if best is None or not best.plan_detail:
                raise ValueError(f"runner engine: no configuration in {sel.frontier} meets max_perplexity="
                                 f"{sel.max_perplexity}, min_tokens_per_s={sel.min_tokens_per_s}")
            plan = ExpertPlan.from_dict(best.plan_detail)
            plan.notes = {**plan.notes, "selected_from": sel.frontier, "measured_tokens_per_s": best.tokens_per_s,
                          "measured_perplexity": best.perplexity}
            self.plan_origin = {"kind": "selected", "frontier": sel.frontier, "configuration": best.name}
            return self._checked(plan, per_layer), None
        if isinstance(spec, str) and spec.endswith(".json"):
            path = Path(spec).expanduser()
            if not path.is_file():
                raise PlanError(f"runner engine: plan file {str(path)!r} does not exist")
            plan = ExpertPlan.load(path)
            plan.group_size = plan.group_size or g
            self.plan_origin = {"kind": "file", "path": str(path)}
            return self._checked(plan, per_layer), None
        if isinstance(spec, str):
            self.plan_origin = {"kind": "preset", "name": spec}
            placement, precision = {"resident": ("fast", "full"), "offload-all": ("host", "full"),
                                    "int8-all": ("fast", "int8"), "int4-all": ("fast", "int4"),
                                    "int3-all": ("fast", "int3"), "int2-all": ("fast", "int2")}[spec]
            return ExpertPlan.uniform(per_layer, placement, precision, g, spec), None
        assert isinstance(spec, EnginePlanSpec)
        wants_profile = bool(spec.quantize_fraction or spec.offload_fraction or spec.fast_budget_gb
                             or spec.precisions) and self.args.profile_windows > 0
        if wants_profile:
            return None, spec
        return self._plan_from(spec, arch.layout(dtype), None), None

    @staticmethod
    def _checked(plan: Any, per_layer: dict[int, int]) -> Any:
        from moecap.engine.store import PlanError

        for layer, n in per_layer.items():
            slots = plan.layers.get(layer)
            if slots is None or len(slots) != n:
                raise PlanError(f"the plan does not fit the model: MoE layer {layer} has {n} experts, the plan "
                                f"{'has no slots for it' if slots is None else f'{len(slots)} slots'}")
        return plan

    def _plan_from(self, spec: Any, layout: Any, prof: Any) -> Any:
        from moecap.engine.planner import full_expert_bytes, make_plan, mixed_plan

        g = self.args.group_size
        if spec.precisions:
            budget = (spec.fast_budget_gb * 1e9 if spec.fast_budget_gb is not None
                      else spec.fast_budget_fraction * full_expert_bytes(layout))
            self.plan_origin = {"kind": "mixed", "precisions": list(spec.precisions), "fast_budget_bytes": budget,
                                "max_error": spec.max_error}
            return mixed_plan(layout, prof, budget, spec.precisions, spec.max_error, g)
        self.plan_origin = {"kind": "fractions", **spec.model_dump(exclude_none=True)}
        budget = spec.fast_budget_gb * 1e9 if spec.fast_budget_gb else None
        return make_plan(layout, prof, spec.quantize_fraction, spec.precision, spec.offload_fraction, budget, g)

    # -------------------------------------------------------------------------- lifecycle
    def _cost_model(self, dtype: Any) -> Any:
        """Where host experts run (beside a GPU): measured rates (cached), or those the args give."""
        import torch

        from moecap.engine.store import CostModel

        dev = torch.device(self.device)
        if dev.type != "cuda":  # one memory: host experts are computed where they lie, nothing to choose
            return CostModel(mode=self.args.offload_mode, source="not used (one memory: no host-to-device link)")
        from moecap.engine.rates import measured_cost_model

        cm = measured_cost_model(dev, dtype, mode=self.args.offload_mode)
        if self.args.host_gflops:
            cm.host_flops, cm.host_Bps = self.args.host_gflops * 1e9, {}
            cm.source += f"; host rate given: {self.args.host_gflops} GFLOP/s"
        if self.args.link_gbs:
            cm.link_Bps = self.args.link_gbs * 1e9
            cm.source += f"; link given: {self.args.link_gbs} GB/s"
        return cm

    def load(self, model_cfg: Any) -> None:
        import torch

        from moecap.engine.calibration import calibration_windows
        from moecap.engine.loadmem import PeakMemory
        from moecap.engine.model import Arch, build, replace_plan
        from moecap.engine.planner import profile
        from moecap.engine.store import ExpertPlan
        from moecap.runners.tracing import ExpertTracer

        config, src, self.tokenizer, self.model_source = self._source(model_cfg)
        arch = Arch.from_config(config)
        dtype = self.torch_dtype
        self.cost = self._cost_model(dtype)
        plan, spec = self._plan(arch, dtype)
        with torch.inference_mode(), PeakMemory() as peak:
            if plan is not None:
                self.model = build(config, src, plan, self.device, dtype, self.cost, self.args.cache_size)
            else:
                # profile first: every expert at full precision (in host memory when that is another device),
                # then re-place them into the plan the profile gives
                tier = "host" if self.device.startswith("cuda") else "fast"
                self.model = build(config, src, ExpertPlan.uniform(arch.experts_per_layer(), tier, "full",
                                                                   self.args.group_size, "profiling"),
                                   self.device, dtype, self.cost, self.args.cache_size)
                windows, what = calibration_windows(self.tokenizer, self.args.calibration, self.args.profile_windows,
                                                    self.args.profile_tokens, arch.vocab)
                precisions = tuple(spec.precisions) if spec.precisions else (spec.precision,)
                self.profile = profile(self.model, windows, precisions=precisions, group_size=self.args.group_size,
                                       source=what)
                plan = self._plan_from(spec, arch.layout(dtype), self.profile)
                replace_plan(self.model, plan)
        self.plan = plan
        self._has_host = plan.count(placement="host") > 0
        # peak host memory over the load: the plan's footprint plus about one layer (with a profile, the
        # full-precision model it profiles)
        self.model.load_info.update(peak.result())
        if self.args.prefetch and self.device.startswith("cuda") and self.profile is not None:
            for n, store in enumerate(self.stores[:-1]):
                nxt = self.stores[n + 1]
                host = [e for e, s in enumerate(plan.layers[nxt.layer]) if s.placement == "host"]
                host.sort(key=lambda e: -self.profile.freq[nxt.layer][e])
                block = self.model.model.layers[store.layer].mlp
                block.next_store, block.prefetch_experts = nxt, host[: self.args.prefetch]
        for s in self.stores:
            s.log_passes = True
        if self.args.trace_experts:
            self.tracer = ExpertTracer(self.model).attach()

    # -------------------------------------------------------------------------- measurement hooks
    def _forward(self, input_ids, cache):
        # the logits of the last position only, as serving engines compute them (the records count it)
        return self.model(input_ids=input_ids, past_key_values=cache, logits_to_keep=1)

    def _new_cache(self, batch: int, capacity: int):
        return self.model.new_cache(batch, capacity)

    def _host_calls(self) -> list[list[Any]] | None:
        if not self._has_host:
            return None
        out = []
        for s in self.stores:
            out += [[s.layer, e, mode] for e, mode in s.take_pass_log()]
        return out

    # -------------------------------------------------------------------------- accounting
    def expert_bytes(self) -> dict[int, list[float]]:
        return {s.layer: [float(b) for b in s.expert_nbytes()] for s in self.stores}

    def tier_bytes(self) -> dict[str, int]:
        out = {"fast": 0, "host": 0}
        for s in self.stores:
            for k, v in s.tier_nbytes().items():
                out[k] += v
        return out

    def _weight_bytes_per_param(self) -> float:
        # every weight but the routed experts is stored in the model's dtype (expert_bytes has the rest)
        import torch

        return float(torch.empty((), dtype=self.torch_dtype).element_size())

    def _memory(self, energy: dict[str, Any]) -> dict[str, Any]:
        import torch

        tiers = self.tier_bytes()
        non_expert = self.model.non_expert_bytes()
        out: dict[str, Any] = {
            "non_expert_weights_bytes": non_expert,
            "expert_bytes_fast": tiers["fast"],
            "expert_bytes_host": tiers["host"],
            "weights_bytes": non_expert + tiers["fast"] + tiers["host"],
            # what the fast device holds: everything but the host experts
            "fast_tier_weights_bytes": non_expert + tiers["fast"],
        }
        if self.device.startswith("cuda"):
            out["device_peak_allocated_bytes"] = int(torch.cuda.max_memory_allocated(self.device))
            out["device_peak_reserved_bytes"] = int(torch.cuda.max_memory_reserved(self.device))
            if energy.get("device_memory_peak_bytes"):
                out["device_used_peak_bytes"] = int(energy["device_memory_peak_bytes"])
        if energy.get("host_rss_peak_bytes"):
            out["host_rss_peak_bytes"] = int(energy["host_rss_peak_bytes"])
        out["host_peak_rss_process_bytes"] = int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
        return out

    def _tier_peaks(self) -> dict[str, Any]:
        """The ceilings each tier's traffic is measured against: the fast device's memory (the suite's
        peaks), host DRAM (the CPU's calibrated copy bandwidth) and, with a GPU, the measured link."""
        out: dict[str, Any] = {"split": self.device.startswith("cuda")}
        try:
            from moecap.hardware import detect_hardware, load_calibration

            cpu = load_calibration(detect_hardware("cpu").device_name)
            if cpu is not None:
                out["host_Bps"] = cpu.mem_bandwidth_Bps
                out["host_source"] = cpu.source
        except Exception as err:  # no calibration: the host tier's utilization is left out, bytes stay
            out["host_error"] = f"{type(err).__name__}: {err}"
        if out["split"] and self.cost is not None:
            out["link_Bps"] = self.cost.link_Bps
            out["link_source"] = self.cost.source
        return out

    def run(self, workload: Any, load: Any) -> RunTrace:
        for s in self.stores:
            s.calls = dict.fromkeys(s.calls, 0)
            s.take_pass_log()
        trace = super().run(workload, load)
        trace.expert_bytes = self.expert_bytes()
        trace.expert_placements = {s.layer: s.expert_placements() for s in self.stores}
        calls: dict[str, int] = {}
        for s in self.stores:
            for k, v in s.calls.items():
                calls[k] = calls.get(k, 0) + v
        trace.extra["engine"] = {"plan": self.plan.summary(), "expert_calls": calls,
                                 "cost_model": self.cost.to_dict() if self.cost is not None else None,
                                 "kernels": self.model.kernels(), "tier_peaks": self._tier_peaks()}
        return trace

    def info(self) -> dict[str, Any]:
        out = super().info()
        out["attn_implementation"] = "engine (torch scaled_dot_product_attention)"
        if self.plan is not None:
            out["plan"] = self.plan.summary()
            out["plan_detail"] = self.plan.to_dict()
            out["plan_origin"] = self.plan_origin
            out["tier_bytes"] = self.tier_bytes()
        if self.model is not None:
            out["kernels"] = self.model.kernels()
            out["load"] = dict(self.model.load_info)
        if self.profile is not None:
            out["profile"] = {"tokens": self.profile.tokens, "source": self.profile.source}
        return out

