"""``python -m moecap.runners.llamacpp_server``: llama-cpp-python's OpenAI-compatible server with
llama.cpp's MoE placement knobs, which its own command line lacks.

Takes every ``llama_cpp.server`` flag, plus:

- ``--override-tensor REGEX=BUFFER_TYPE`` (repeatable; llama.cpp's ``-ot``): tensors whose name matches
  ``REGEX`` are allocated in that buffer type (``CPU``, ``CUDA0``, ...);
- ``--n-cpu-moe N`` (llama.cpp's flag of that name): the expert tensors (``ffn_{gate,up,down}_exps``)
  of the first ``N`` layers stay in host memory while the rest of the model is offloaded.

llama-cpp-python declares ``llama_model_params.tensor_buft_overrides`` but never fills it; this module
fills it (a NULL-terminated array of ``{pattern, buffer type}``) just before the model is loaded, with
the buffer types looked up by name among ggml's registered devices, and logs what it applied.
"""

from __future__ import annotations

import argparse
import ctypes
import os
import sys
from typing import Any


def n_cpu_moe_patterns(n: int) -> list[str]:
    """Override patterns that keep the experts of layers ``0..n-1`` in host memory."""
    return [rf"blk\.{i}\.ffn_(up|down|gate)_exps" for i in range(n)]


def parse_override(item: str) -> tuple[str, str]:
    pattern, sep, buft = item.rpartition("=")
    if not sep or not pattern or not buft:
        raise ValueError(f"--override-tensor takes REGEX=BUFFER_TYPE, got {item!r}")
    return pattern, buft


class _Override(ctypes.Structure):
    _fields_ = [("pattern", ctypes.c_char_p), ("buft", ctypes.c_void_p)]


def _ggml() -> ctypes.CDLL:
    import llama_cpp

    lib_dir = os.path.join(os.path.dirname(llama_cpp.__file__), "lib")
    lib = ctypes.CDLL(os.path.join(lib_dir, "libggml.so"))
    base = ctypes.CDLL(os.path.join(lib_dir, "libggml-base.so"))
    lib.ggml_backend_dev_count.restype = ctypes.c_size_t
    lib.ggml_backend_dev_get.argtypes = [ctypes.c_size_t]
    lib.ggml_backend_dev_get.restype = ctypes.c_void_p
    base.ggml_backend_dev_buffer_type.argtypes = [ctypes.c_void_p]
    base.ggml_backend_dev_buffer_type.restype = ctypes.c_void_p
    base.ggml_backend_buft_name.argtypes = [ctypes.c_void_p]
    base.ggml_backend_buft_name.restype = ctypes.c_char_p
    lib._base = base
    return lib


def buffer_types() -> dict[str, int]:
    """Name -> ``ggml_backend_buffer_type_t`` of every registered device (``CPU``, ``CUDA0``, ...)."""
    lib = _ggml()
    out: dict[str, int] = {}
    for i in range(lib.ggml_backend_dev_count()):
        dev = lib.ggml_backend_dev_get(i)
        buft = lib._base.ggml_backend_dev_buffer_type(dev)
        if buft:
            out[lib._base.ggml_backend_buft_name(buft).decode()] = buft
    return out


_KEEP: list[Any] = []  # the arrays and strings llama.cpp points into must outlive the model


def install_overrides(overrides: list[tuple[str, str]], log: Any = None) -> None:
    """Make every later model load of llama-cpp-python use ``overrides`` (pattern, buffer-type name)."""
    import llama_cpp.llama_cpp as C

    if log is None:
        # llama-cpp-python points fd 2 at /dev/null while it loads a model quietly: log through a copy
        err_fd = os.dup(2)

        def log(line: str) -> None:
            os.write(err_fd, (line + "\n").encode())

    original = C.llama_model_load_from_file

    def load(path: bytes, params: Any) -> Any:
        available = buffer_types()
        by_lower = {k.lower(): v for k, v in available.items()}
        arr = (_Override * (len(overrides) + 1))()
        for j, (pattern, name) in enumerate(overrides):
            buft = by_lower.get(name.lower())
            if buft is None:
                raise ValueError(f"--override-tensor {pattern}={name}: unknown buffer type {name!r}; "
                                 f"available: {', '.join(available) or 'none'}")
            encoded = pattern.encode()
            _KEEP.append(encoded)
            arr[j].pattern = encoded
            arr[j].buft = buft
        arr[len(overrides)].pattern = None
        arr[len(overrides)].buft = None
        _KEEP.append(arr)
        params.tensor_buft_overrides = ctypes.cast(arr, ctypes.c_void_p)
        for pattern, name in overrides:
            log(f"moecap-llamacpp: tensor override {pattern} -> {name}")
        return original(path, params)

    C.llama_model_load_from_file = load


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(add_help=False)
    ap.add_argument("--override-tensor", "-ot", action="append", default=[])
    ap.add_argument("--n-cpu-moe", type=int, default=0)
    ours, rest = ap.parse_known_args(sys.argv[1:] if argv is None else argv)
    if ours.n_cpu_moe < 0:
        ap.error("--n-cpu-moe must be >= 0")
    overrides = [(p, "CPU") for p in n_cpu_moe_patterns(ours.n_cpu_moe)]
    try:
        overrides += [parse_override(item) for item in ours.override_tensor]
    except ValueError as err:
        ap.error(str(err))
    if overrides:
        install_overrides(overrides)
    from llama_cpp.server.__main__ import main as server_main

    sys.argv = [sys.argv[0]] + rest
    server_main()


if __name__ == "__main__":
    main()
