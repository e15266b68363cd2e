"""Hugging Face transformers, in-process.

Static batches of the workload's prompts (all of one length, so no padding); greedy decoding of exactly
``output_tokens`` tokens when ``ignore_eos``. Each forward pass is timed between device
synchronisations; every request gets one timestamp per generated token; the expert tracer records,
per pass and MoE layer, how many tokens each expert received.
"""

from __future__ import annotations

import gc
import resource
import time
from typing import Any

from moecap.runners.args import HFRunnerArgs
from moecap.runners.base import PassTrace, RequestTrace, Runner, RunTrace



class HFRunner(Runner):
    name = "hf"

    def __init__(self, args: HFRunnerArgs, hardware: Any):
        super().__init__(args, hardware)
        import torch

        want = args.device or getattr(hardware, "device", "auto") or "auto"
        if want == "auto":
            want = "cuda" if torch.cuda.is_available() else "cpu"
        if want.startswith("cuda"):
            if not torch.cuda.is_available():
                raise RuntimeError(f"runner hf: device {want!r} requested but torch sees no CUDA GPU")
            if want == "cuda":
                want = f"cuda:{torch.cuda.current_device()}"
        self.device = want
        dtype = args.dtype
        if dtype == "auto":
            dtype = "bfloat16" if self.device.startswith("cuda") else "float32"
        self.dtype_name = dtype
        self.torch_dtype = getattr(torch, dtype)
        self._threads_before: int | None = None  # torch's threads before load() set num_threads
        self.model = None
        self.tokenizer = None
        self.tracer = None
        self.model_source: dict[str, Any] = {}

    # ------------------------------------------------------------------ lifecycle
    def load(self, model_cfg: Any) -> None:
        import torch

        from moecap.models import load_causal_lm
        from moecap.runners.tracing import ExpertTracer

        self.model, self.tokenizer, self.model_source = load_causal_lm(
            model_cfg, self.device, self.torch_dtype, self.args.attn_implementation
        )
        # set once the model is here, not when constructed: the hardware peaks (calibrated before load) are
        # the machine's, every core, and so is building an embedded model on first use (training);
        # close() gives the threads back
        if self.args.num_threads and not self.device.startswith("cuda"):
            self._threads_before = torch.get_num_threads()
            torch.set_num_threads(self.args.num_threads)
        if self.args.trace_experts:
            self.tracer = ExpertTracer(self.model).attach()

    def close(self) -> None:
        import torch

        if self.tracer is not None:
            self.tracer.detach()
        self.model = self.tokenizer = self.tracer = None
        if self._threads_before is not None:
            torch.set_num_threads(self._threads_before)
            self._threads_before = None
        gc.collect()
        if self.device.startswith("cuda"):
            torch.cuda.empty_cache()

    def device_name(self) -> str:
        return self.device

    def compute_dtype(self) -> str:
        return self.dtype_name

    def model_config(self) -> dict[str, Any] | None:
        return self.model.config.to_dict() if self.model is not None else None

    def info(self) -> dict[str, Any]:
        import torch
        import transformers

        return {
            "name": self.name,
            "version": f"transformers {transformers.__version__}, torch {torch.__version__}",
            "args": self.args.model_dump(mode="json"),
            "device": self.device,
            "dtype": self.dtype_name,
            "attn_implementation": getattr(getattr(self.model, "config", None), "_attn_implementation", None),
            "torch_threads": torch.get_num_threads(),
            "model_source": self.model_source,
        }

    # ------------------------------------------------------------------ measurement
    def _sync(self) -> None:
        if self.device.startswith("cuda"):
            import torch

            torch.cuda.synchronize(self.device)

    def _forward(self, input_ids, cache):
        return self.model(input_ids=input_ids, past_key_values=cache, use_cache=True)

    def _host_calls(self) -> list[list[Any]] | None:
        """The host-memory experts the last pass ran and how (engines with a host tier)."""
        return None

    def _new_cache(self, batch: int, capacity: int):
        """A KV cache for ``batch`` sequences of up to ``capacity`` tokens."""
        from transformers import DynamicCache

        return DynamicCache(config=self.model.config)

    def _run_batch(
        self,
        prompts: list[list[int]],
        output_tokens: int,
        eos_id: int | None,
        batch_idx: int,
        origin: float,
        passes: list[PassTrace] | None,
        requests: list[RequestTrace] | None,
        first_id: int,
        progress: Any = None,
    ) -> None:
        import torch

        bsz, plen = len(prompts), len(prompts[0])
        ids = torch.tensor(prompts, dtype=torch.long, device=self.device)
        cache = self._new_cache(bsz, plen + output_tokens)
        tracer = self.tracer if passes is not None else None
        reqs = [RequestTrace(id=first_id + i, input_tokens=plen, send_s=0.0, batch=batch_idx) for i in range(bsz)]
        done = [False] * bsz

        self._sync()
        t_send = time.perf_counter() - origin
        for r in reqs:
            r.send_s = t_send
        context = [0] * bsz
        step_input = ids
        first_pass = len(passes) if passes is not None else 0
        for step in range(output_tokens):
            phase = "prefill" if step == 0 else "decode"
            new = step_input.shape[1]
            if tracer:
                tracer.begin_pass()
            self._sync()
            t0 = time.perf_counter()
            logits = self._forward(step_input, cache).logits
            next_tok = logits[:, -1, :].argmax(dim=-1)
            self._sync()
            t1 = time.perf_counter()
            # prefill counts now; decode passes are counted together after the batch (off the timed path)
            counts = tracer.end_pass(defer=phase == "decode") if tracer else None
            host_calls = self._host_calls()
            if passes is not None:
                passes.append(
                    PassTrace(
                        index=len(passes),
                        phase=phase,
                        batch=batch_idx,
                        new_tokens=[new] * bsz,
                        context_lens=list(context),
                        logits_tokens=int(logits.shape[0] * logits.shape[1]),
                        start_s=t0 - origin,
                        end_s=t1 - origin,
                        expert_counts=counts,
                        host_calls=host_calls,
                    )
                )
            context = [c + new for c in context]
            tok_list = next_tok.tolist() if (eos_id is not None) else None
            for i, r in enumerate(reqs):
                if done[i]:
                    continue
                r.token_times_s.append(t1 - origin)
                if tok_list is not None and tok_list[i] == eos_id:
                    done[i] = True
            if progress is not None:
                progress.update(1)
            if all(done):
                break
            step_input = next_tok[:, None]
        if tracer:
            decode = [p for p in passes[first_pass:] if p.phase == "decode"]
            for p, counts in zip(decode, tracer.flush(), strict=True):
                p.expert_counts = counts
        if requests is not None:
            requests.extend(reqs)

    def run(self, workload: Any, load: Any) -> RunTrace:
        import torch
        from tqdm.auto import tqdm

        from moecap.energy import EnergyTracker
        from moecap.workload import make_prompts

        if self.model is None:
            raise RuntimeError("runner hf: run() before load()")
        if load.kind != "batch":
            raise ValueError(f"runner hf drives static batches only, not a {load.kind} load")
        cfg = self.model.config
        special = list(getattr(self.tokenizer, "all_special_ids", []) or [])
        prompts = make_prompts(workload, cfg.vocab_size, self.tokenizer, special)
        max_pos = getattr(cfg, "max_position_embeddings", None)
        if max_pos and workload.input_tokens + workload.output_tokens > max_pos:
            raise ValueError(
                f"workload {workload.display_name!r}: {workload.input_tokens}+{workload.output_tokens} tokens "
                f"exceed the model's max_position_embeddings ({max_pos})"
            )
        eos_id = None if workload.ignore_eos else getattr(cfg, "eos_token_id", None)
        if isinstance(eos_id, list):
            eos_id = eos_id[0]
        bs = load.batch_size
        batches = [prompts[i : i + bs] for i in range(0, len(prompts), bs)]

        passes: list[PassTrace] = []
        requests: list[RequestTrace] = []
        with torch.inference_mode():
            for _ in range(self.args.warmup_batches):  # untimed: same shapes, a few decode steps
                self._run_batch(batches[0], min(workload.output_tokens, 4), None, -1, 0.0, None, None, 0)
            if self.device.startswith("cuda"):
                torch.cuda.reset_peak_memory_stats(self.device)
            gc.collect()
            gc.freeze()
            gc.disable()
            self._sync()
            energy = EnergyTracker(self.device).start()  # the measured window: every timed batch
            try:
                total = len(batches) * workload.output_tokens
                with tqdm(total=total, desc="passes", unit="pass", leave=False, disable=None) as bar:
                    origin = time.perf_counter()
                    for b, batch in enumerate(batches):
                        self._run_batch(
                            batch, workload.output_tokens, eos_id, b, origin, passes, requests,
                            first_id=b * bs, progress=bar,
                        )
                self._sync()
            finally:
                energy_result = energy.stop()
                gc.enable()
                gc.unfreeze()

        return RunTrace(
            passes=passes,
            requests=requests,
            model_config=cfg.to_dict(),
            moe_layers=list(self.tracer.layers) if self.tracer else [],
            weight_bytes_per_param=self._weight_bytes_per_param(),
            kv_bytes_per_elem=torch.finfo(self.torch_dtype).bits / 8,
            # transformers 5.23's MLA attention (DeepSeek) caches the compressed latent + rope key
            # (tests/test_accounting.py checks this against the real cache tensors)
            kv_cache_expanded_mla=False,
            compute_dtype=self.dtype_name,
            device=self.device,
            memory=self._memory(energy_result),
            energy=energy_result,
            tracing=(
                {"traced": True, "method": self.tracer.method, "moe_layers": len(self.tracer.layers)}
                if self.tracer
                else {"traced": False, "reason": "trace_experts is off"}
            ),
            extra={"batches": len(batches), "warmup_batches": self.args.warmup_batches},
        )

    # ------------------------------------------------------------------ quality (scoring) API
    @property
    def max_length(self) -> int:
        """Longest sequence the model takes (resolved as lm-eval's ``hf`` model does)."""
        cfg = self.model.config
        for c in (cfg, getattr(cfg, "text_config", None)):
            for attr in ("n_positions", "max_position_embeddings", "n_ctx"):
                v = getattr(c, attr, None) if c is not None else None
                if isinstance(v, int) and v > 0:
                    return v
        tok_max = getattr(self.tokenizer, "model_max_length", None)
        return tok_max if isinstance(tok_max, int) and 0 < tok_max < 1_000_000 else 2048

    def _logits(self, seqs: list[list[int]]):
        """Right-padded batch forward; the logits, [B, T, V] in the model's dtype."""
        import torch

        width = max(len(s) for s in seqs)
        ids = torch.zeros((len(seqs), width), dtype=torch.long)
        mask = torch.zeros((len(seqs), width), dtype=torch.long)
        for i, s in enumerate(seqs):
            ids[i, : len(s)] = torch.tensor(s)
            mask[i, : len(s)] = 1
        return self.model(input_ids=ids.to(self.device), attention_mask=mask.to(self.device)).logits

    def token_nll(self, windows: list[list[int]], batch_size: int = 8, progress: Any = None) -> list[tuple[float, int]]:
        """Per window: (sum of -log p(token_t | tokens_<t) over t >= 1, number of predicted tokens)."""
        import torch
        import torch.nn.functional as F

        out: list[tuple[float, int]] = []
        with torch.inference_mode():
            for i in range(0, len(windows), batch_size):
                chunk = windows[i : i + batch_size]
                logits = self._logits(chunk)
                for j, w in enumerate(chunk):
                    target = torch.tensor(w[1:], device=logits.device)
                    nll = F.cross_entropy(logits[j, : len(w) - 1].float(), target, reduction="sum")
                    out.append((float(nll), len(w) - 1))
                if progress is not None:
                    progress.update(len(chunk))
        return out

    def loglikelihood_tokens(
        self, requests: list[tuple[list[int], list[int]]], batch_size: int = 8, progress: Any = None
    ) -> list[tuple[float, bool]]:
        """Per (context, continuation) token lists: (log p(continuation | context), whether greedy
        decoding would produce the continuation). The sequence is cut from the left to max_length."""
        import torch

        out: list[tuple[float, bool]] = []
        with torch.inference_mode():
            for i in range(0, len(requests), batch_size):
                chunk = requests[i : i + batch_size]
                seqs = [(ctx + cont)[-(self.max_length + 1) :][:-1] for ctx, cont in chunk]
                logits = self._logits(seqs)
                for j, (ctx, cont) in enumerate(chunk):
                    n = len(seqs[j])
                    span = torch.log_softmax(logits[j, n - len(cont) : n].float(), dim=-1)
                    target = torch.tensor(cont, device=span.device)
                    ll = float(span.gather(-1, target[:, None]).sum())
                    greedy = bool((span.argmax(-1) == target).all())
                    out.append((ll, greedy))
                if progress is not None:
                    progress.update(len(chunk))
        return out

    def generate_tokens(
        self, prompt: list[int], max_new_tokens: int, stop: Any = None
    ) -> list[int]:
        """Greedy continuation of one prompt; ``stop(tokens) -> bool`` ends it early; EOS ends it."""
        import torch

        eos = getattr(self.model.config, "eos_token_id", None)
        eos_ids = set(eos if isinstance(eos, list) else [eos]) - {None}
        prompt = prompt[-max(1, self.max_length - max_new_tokens) :]
        cache = self._new_cache(1, len(prompt) + max_new_tokens)
        step = torch.tensor([prompt], dtype=torch.long, device=self.device)
        new: list[int] = []
        with torch.inference_mode():
            for _ in range(max_new_tokens):
                tok = int(self._forward(step, cache).logits[0, -1].argmax())
                if tok in eos_ids:
                    break
                new.append(tok)
                if stop is not None and stop(new):
                    break
                step = torch.tensor([[tok]], dtype=torch.long, device=self.device)
        return new

    def _weight_bytes_per_param(self) -> float:
        n = b = 0
        for p in self.model.parameters():
            n += p.numel()
            b += p.numel() * p.element_size()
        return b / n

    def _memory(self, energy: dict[str, Any]) -> dict[str, Any]:
        import torch

        weights = sum(p.numel() * p.element_size() for p in self.model.parameters())
        out: dict[str, Any] = {"weights_bytes": int(weights)}
        if self.device.startswith("cuda"):
            out["device_peak_allocated_bytes"] = int(torch.cuda.max_memory_allocated(self.device))
            out["device_peak_reserved_bytes"] = int(torch.cuda.max_memory_reserved(self.device))
            if energy.get("device_memory_peak_bytes"):  # NVML: the whole board, every process on it
                out["device_used_peak_bytes"] = int(energy["device_memory_peak_bytes"])
        # sampled during the measured window (this process and its children)
        if energy.get("host_rss_peak_bytes"):
            out["host_rss_peak_bytes"] = int(energy["host_rss_peak_bytes"])
        # ru_maxrss is the process's high-water mark since it started (KiB on Linux), not this cell's
        out["host_peak_rss_process_bytes"] = int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
        return out
