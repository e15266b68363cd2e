"""llama.cpp as a served backend, launched by moecap on a GGUF export of the suite's model and
benchmarked over its OpenAI-compatible API like every other server.

- The model: ``args.gguf`` if given, else the suite model (a local Hugging Face directory, e.g. the
  embedded ``tiny-moe``) exported by :mod:`moecap.gguf_export` at ``args.weight_type`` and cached.
- The server (``args.server``):

  - ``llama-server``: llama.cpp's own C++ server (found or built by :mod:`moecap.llamacpp_build`), with
    continuous batching over ``args.parallel`` slots sharing one KV pool (``--kv-unified``), prompt
    caching off (``--no-cache-prompt``), and llama.cpp's native ``--n-cpu-moe`` / ``--override-tensor``
    expert placement. Prompts are token ids of exactly the workload's length; ``ignore_eos`` is
    llama-server's own request field.
  - ``llama-cpp-python``: ``python -m moecap.runners.llamacpp_server`` (llama-cpp-python's server plus
    the two placement flags it lacks). It serves one request at a time (a lock around the model), so at
    a concurrency above 1 requests queue and TTFT includes the queueing: its records say
    ``"serving": "serialised"``. Prompts are texts that encode to the workload's length; ``ignore_eos``
    becomes ``min_tokens = max_tokens``.
  - ``auto`` (default): llama-server when one is found, else llama-cpp-python.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from moecap.runners.openai_runner import ServedRunner

BYTES_PER_PARAM = {"f32": 4.0, "f16": 2.0, "bf16": 2.0, "q8_0": 34 / 32, "q4_0": 18 / 32}


def gguf_context_length(path: str) -> int | None:
    """The training context a GGUF file declares (``<arch>.context_length``), or None."""
    try:
        import gguf

        reader = gguf.GGUFReader(path)
        arch = reader.fields["general.architecture"].contents()
        return int(reader.fields[f"{arch}.context_length"].contents())
    except Exception:
        return None


class LlamaCppRunner(ServedRunner):
    name = "llamacpp"

    def __init__(self, args: Any, hardware: Any):
        super().__init__(args, hardware)
        self.gguf_path: str | None = None
        self.export_info: dict[str, Any] | None = None
        self.binary: str | None = None
        self.kind = self._resolve_server()

    def _resolve_server(self) -> str:
        """``llama-server`` or ``llama-cpp-python``, as ``args.server`` asks and this machine has."""
        from moecap.llamacpp_build import LlamaCppNotFound, find_llama_server

        want = self.args.server
        if want == "llama-cpp-python":
            return want
        try:
            found = find_llama_server(self.args.server_binary)
        except LlamaCppNotFound as err:
            raise FileNotFoundError(f"runner llamacpp: {err}") from None
        if found is not None:
            self.binary = str(found)
            return "llama-server"
        if want == "llama-server":
            raise FileNotFoundError(
                "runner llamacpp: args.server is llama-server but none was found: set args.server_binary or "
                "$MOECAP_LLAMA_SERVER, put llama-server on PATH, or build one with `moecap llamacpp build`")
        print("moecap: llamacpp: no llama-server found (moecap llamacpp build makes one); serving through "
              "llama-cpp-python, one request at a time (records say serialised)", file=sys.stderr, flush=True)
        return "llama-cpp-python"

    @property
    def serving(self) -> str:
        """How requests share the server: ``continuous-batching`` (llama-server) or ``serialised``."""
        return "continuous-batching" if self.kind == "llama-server" else "serialised"

    def prompt_format(self) -> str:
        if self.args.prompt_format:
            return self.args.prompt_format
        return "ids" if self.kind == "llama-server" else "text"

    def server_prompt_cache(self) -> str:
        if self.kind == "llama-server":
            return "llama-server --no-cache-prompt (no request reuses another's KV)"
        # llama_cpp.Llama keeps the previous prompt's KV and reuses its longest common prefix; the server
        # has no switch for it, so unique prompts are what keeps it from serving a measured prompt
        return "llama-cpp-python reuses the previous prompt's common prefix (no switch)"

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
        # expert placement: llama-server's own flags, which moecap.runners.llamacpp_server spells the same
        placement = (["--n-cpu-moe", str(a.n_cpu_moe)] if a.n_cpu_moe else []) + [
            flag for item in a.override_tensor for flag in ("--override-tensor", item)]
        if self.kind == "llama-server":
            cmd = [
                self.binary, "--model", model_arg, "--alias", self.served_model,
                "--host", a.host, "--port", str(self.port),
                *self._context_flags(model_arg), "--n-gpu-layers", "all" if n_gpu_layers < 0 else str(n_gpu_layers),
                "--batch-size", str(a.n_batch), "--ubatch-size", str(a.n_ubatch),
                "--flash-attn", "on" if a.flash_attn else "off",
                "--no-cache-prompt", "--metrics", "--no-webui",
            ]
            if a.parallel:
                cmd += ["--parallel", str(a.parallel)]
            if not a.use_mmap:
                cmd += ["--load-mode", "none"]
            if a.n_threads:
                cmd += ["--threads", str(a.n_threads)]
            if a.n_threads_batch:
                cmd += ["--threads-batch", str(a.n_threads_batch)]
            if a.verbose:
                cmd += ["--verbose"]
            return cmd + placement + list(a.extra_args)
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
        return cmd + placement + list(a.extra_args)

    def storage_bytes(self) -> tuple[float | None, float]:
        if self.args.weight_bytes_per_param:
            return self.args.weight_bytes_per_param, self.args.kv_bytes_per_elem
        # llama.cpp's KV cache is f16 unless told otherwise
        return (None if self.args.gguf else BYTES_PER_PARAM[self.args.weight_type]), self.args.kv_bytes_per_elem

    def _context_flags(self, gguf_path: str) -> list[str]:
        """One KV pool shared by the slots, sized so that every slot can hold a whole context (``n_ctx``,
        else the model's own): llama-server's ``--ctx-size`` is the pool, which ``--parallel`` slots would
        otherwise split between them."""
        ctx = self.args.n_ctx or gguf_context_length(gguf_path)
        if not ctx:
            return ["--ctx-size", "0", "--kv-unified"]
        return ["--kv-unified", "--kv-unified-per-slot", str(ctx)]

    def ready_path(self) -> str:
        # llama-server's /health answers 503 until the model is loaded
        return "/health" if self.kind == "llama-server" else "/v1/models"

    def request_extra(self, workload: Any) -> dict[str, Any]:
        if self.kind == "llama-server":  # it takes ignore_eos itself
            return {}
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
        trace.extra["serving"] = self.serving
        info = None if self.args.weight_bytes_per_param else self._weight_bytes()
        if info is not None:  # priced at the file's real tensor types, per component
            trace.component_bytes_per_param = dict(info["bytes_per_param"])
            trace.weight_bytes_per_param = float(info["overall_bytes_per_param"])
            trace.extra["weight_bytes_source"] = {"gguf": self.gguf_path, "types": info["types"]}
        return trace

    def info(self) -> dict[str, Any]:
        out = super().info()
        out.update({"gguf": self.gguf_path, "weight_type": None if self.args.gguf else self.args.weight_type,
                    "gguf_export": self.export_info, "server_kind": self.kind, "serving": self.serving})
        if self.kind == "llama-server":
            from moecap.llamacpp_build import server_version

            if getattr(self, "_version", None) is None:
                self._version = server_version(self.binary)
            out.update({"llama_server": self.binary, "llama_server_version": self._version})
            return out
        try:
            import llama_cpp

            out["llama_cpp_python_version"] = llama_cpp.__version__
        except Exception:
            pass
        return out
