"""llama.cpp as a served backend: ``llama-cpp-python[server]`` launched by moecap on a GGUF export of
the suite's model, benchmarked over its OpenAI-compatible API like every other server.

- The model: ``args.gguf`` if given, else the suite model (a local Hugging Face directory, e.g. the
  embedded ``tiny-moe``) exported by :mod:`moecap.gguf_export` at ``args.weight_type`` and cached.
- The server: ``python -m moecap.runners.llamacpp_server`` (llama-cpp-python's server plus llama.cpp's
  ``--n-cpu-moe`` / ``--override-tensor`` expert placement), started with ``interrupt_requests`` off:
  llama-cpp-python otherwise aborts a streaming request whenever another one arrives.
- Requests: text prompts that the model's tokenizer encodes to exactly the workload's input length
  (llama-cpp-python takes no token ids); ``ignore_eos`` becomes ``min_tokens = max_tokens``.
- llama-cpp-python serves one request at a time (a lock around the model): at a concurrency above 1
  requests queue, and TTFT includes that queueing, as a user of the server would see it.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from moecap.runners.openai_runner import ServedRunner

BYTES_PER_PARAM = {"f32": 4.0, "f16": 2.0, "bf16": 2.0, "q8_0": 34 / 32, "q4_0": 18 / 32}


class LlamaCppRunner(ServedRunner):
    name = "llamacpp"

    def server_prompt_cache(self) -> str:
        # llama_cpp.Llama keeps the previous prompt's KV and reuses its longest common prefix; the server
        # has no switch for it, so unique prompts are what keeps it from serving a measured prompt
        return "llama-cpp-python reuses the previous prompt's common prefix (no switch)"

    def __init__(self, args: Any, hardware: Any):
        super().__init__(args, hardware)
        self.gguf_path: str | None = None
        self.export_info: dict[str, Any] | None = None

    def model_argument(self, model: Any) -> str:
        from moecap.gguf_export import ensure_gguf

        if self.args.gguf:
            path = Path(self.args.gguf).expanduser()
            if not path.is_file():
                raise FileNotFoundError(f"runner llamacpp: args.gguf {str(path)!r} does not exist")
            self.gguf_path = str(path)
            return self.gguf_path
        if not self.local_dir:
            raise ValueError(
                f"runner llamacpp: model {model.id!r} is not a local Hugging Face directory to export to GGUF "
                "(embedded models and local paths are; random: models have no tokenizer); set args.gguf"
            )
        out = ensure_gguf(self.local_dir, self.args.weight_type, progress=True)
        self.gguf_path = str(out)
        meta = out.with_suffix(".json")
        self.export_info = json.loads(meta.read_text()) if meta.is_file() else None
        return self.gguf_path

    def server_command(self, model_arg: str) -> list[str]:
        a = self.args
        n_gpu_layers = a.n_gpu_layers if a.n_gpu_layers is not None else (0 if self._device == "cpu" else -1)
        cmd = [
            a.python or sys.executable, "-m", "moecap.runners.llamacpp_server",
            "--model", model_arg,
            "--model_alias", self.served_model,
            "--host", a.host, "--port", str(self.port),
            "--n_ctx", str(a.n_ctx),
            "--n_gpu_layers", str(n_gpu_layers),
            "--n_batch", str(a.n_batch), "--n_ubatch", str(a.n_ubatch),
            "--flash_attn", str(a.flash_attn),
            "--use_mmap", str(a.use_mmap),
            "--interrupt_requests", "False",
            "--verbose", str(a.verbose),
        ]
        if a.n_threads:
            cmd += ["--n_threads", str(a.n_threads)]
        if a.n_threads_batch:
            cmd += ["--n_threads_batch", str(a.n_threads_batch)]
        if a.n_cpu_moe:
            cmd += ["--n-cpu-moe", str(a.n_cpu_moe)]
        for item in a.override_tensor:
            cmd += ["--override-tensor", item]
        return cmd + list(a.extra_args)

    def storage_bytes(self) -> tuple[float | None, float]:
        if self.args.weight_bytes_per_param:
            return self.args.weight_bytes_per_param, self.args.kv_bytes_per_elem
        # llama.cpp's KV cache is f16 unless told otherwise
        return (None if self.args.gguf else BYTES_PER_PARAM[self.args.weight_type]), self.args.kv_bytes_per_elem

    def ready_path(self) -> str:
        return "/v1/models"

    def request_extra(self, workload: Any) -> dict[str, Any]:
        # llama-cpp-python has no ignore_eos; holding EOS back until max_tokens does the same
        return {"min_tokens": int(workload.output_tokens)} if workload.ignore_eos else {}

    def _weight_bytes(self) -> dict[str, Any] | None:
        """The GGUF's bytes per parameter per component at its real tensor types (None: no file yet)."""
        path = self.gguf_path or (str(Path(self.args.gguf).expanduser()) if self.args.gguf else None)
        if not path or not Path(path).is_file():
            return None
        if getattr(self, "_gguf_bytes_for", None) != path:
            from moecap.gguf_export import gguf_weight_bytes

            self._gguf_bytes, self._gguf_bytes_for = gguf_weight_bytes(path), path
        return self._gguf_bytes

    def compute_dtype(self) -> str:
        """The arithmetic of the matmuls that dominate: llama.cpp multiplies quantized weights (q8_0, q4_0,
        K-quants) by activations it quantizes to 8 bits, with int8 dot products (its CPU ``vec_dot_*_q8``
        kernels, its CUDA MMQ kernels); float files compute at their float type."""
        if self.args.gguf:
            info = self._weight_bytes()
            kinds = set((info or {}).get("types", {}).get("experts", {})) or {"F32"}
            if kinds - {"F32", "F16", "BF16"}:
                return "int8"
            return "float16" if "F16" in kinds else "bfloat16" if "BF16" in kinds else "float32"
        return {"f32": "float32", "f16": "float16", "bf16": "bfloat16", "q8_0": "int8", "q4_0": "int8"}[self.args.weight_type]

    def run(self, workload: Any, load: Any) -> Any:
        trace = super().run(workload, load)
        info = None if self.args.weight_bytes_per_param else self._weight_bytes()
        if info is not None:  # priced at the file's real tensor types, per component
            trace.component_bytes_per_param = dict(info["bytes_per_param"])
            trace.weight_bytes_per_param = float(info["overall_bytes_per_param"])
            trace.extra["weight_bytes_source"] = {"gguf": self.gguf_path, "types": info["types"]}
        return trace

    def info(self) -> dict[str, Any]:
        out = super().info()
        out.update({"gguf": self.gguf_path, "weight_type": None if self.args.gguf else self.args.weight_type,
                    "gguf_export": self.export_info})
        try:
            import llama_cpp

            out["llama_cpp_python_version"] = llama_cpp.__version__
        except Exception:
            pass
        return out
