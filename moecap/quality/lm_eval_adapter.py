"""lm-eval model ``moecap``: lm-evaluation-harness tasks scored *through a live moecap runner*.

The accuracy a cell reports is then measured with the backend, precision and offloading under test,
not by a separate Hugging Face copy of the model. Two ways to build one:

- around a runner that is already loaded (the executor does this)::

      lm = MoecapLM(runner=runner, batch_size=8)

- from lm-eval ``model_args`` (command line)::

      python -m moecap.quality.lm_eval_runner --model moecap \\
          --model_args model=tiny-moe,runner=hf,dtype=float32,device=cpu --tasks moecap_mc_code

  ``model`` (alias ``pretrained``) is anything a suite's ``model.id`` takes; ``runner`` a registered
  runner that can score tokens; every other argument goes to that runner's argument schema.

Tokenization, the empty-context prefix token, the rolling windows of ``loglikelihood_rolling`` and the
left truncation follow lm-eval's own ``hf`` model (``HFLM``), so that on the same model both give the
same numbers (``tests/test_lm_eval.py`` checks it). Only this module and ``lm_eval_runner`` import
``lm_eval``; ``import moecap`` does not.
"""

from __future__ import annotations

import logging
from typing import Any

from lm_eval import utils as lm_utils
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from tqdm import tqdm

log = logging.getLogger(__name__)

_GEN_TOKS_ALIASES = ("max_gen_toks", "max_new_tokens", "max_tokens", "max_completion_tokens")
_IGNORED_GEN_KWARGS = ("do_sample", "temperature", "until", *_GEN_TOKS_ALIASES)


def _parse_batch_size(batch_size: Any, default: int = 8) -> int:
    if batch_size is None:
        return default
    if isinstance(batch_size, str):
        if batch_size.startswith("auto"):
            log.warning("moecap: batch_size=%r is not supported (no automatic detection); using %d",
                        batch_size, default)
            return default
        batch_size = int(batch_size)
    if int(batch_size) < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size!r}")
    return int(batch_size)


def build_runner(model: str, runner: str = "hf", revision: str | None = None, trust_remote_code: bool = False,
                 **runner_args: Any) -> Any:
    """Construct and load a registered moecap runner on ``model`` (for command-line use)."""
    from moecap.registry import load_object, runner_entry
    from moecap.suite import HardwareConfig, ModelConfig

    entry = runner_entry(runner)
    if not entry.quality:
        raise ValueError(f"runner {runner!r} cannot score tokens (no loglikelihood_tokens), so it cannot run lm-eval")
    args_model = load_object(entry.args)
    # accuracy runs need no expert trace: leave it off unless asked for
    if "trace_experts" in args_model.model_fields and "trace_experts" not in runner_args:
        runner_args["trace_experts"] = False
    if "warmup_batches" in args_model.model_fields and "warmup_batches" not in runner_args:
        runner_args["warmup_batches"] = 0
    args = args_model(**runner_args)
    device = getattr(args, "device", None) or "auto"
    instance = load_object(entry.cls)(args, HardwareConfig(device=device))
    instance.load(ModelConfig(id=str(model), revision=revision, trust_remote_code=bool(trust_remote_code)))
    return instance


@register_model("moecap")
class MoecapLM(TemplateLM):
    """An lm-eval ``LM`` whose every score comes from a moecap runner.

    The runner provides ``tokenizer``, ``max_length``, ``device_name()``,
    ``loglikelihood_tokens(requests, batch_size, progress)`` and
    ``generate_tokens(prompt, max_new_tokens, stop)`` (greedy).
    """

    backend = "causal"

    def __init__(
        self,
        runner: Any = None,
        batch_size: int | str | None = 8,
        *,
        model: str | None = None,
        pretrained: str | None = None,
        max_length: int | None = None,
        max_gen_toks: int = 256,
        add_bos_token: bool | None = None,
        prefix_token_id: int | None = None,
        max_batch_size: int | None = None,  # passed by lm-eval's command line; unused
        **runner_args: Any,
    ) -> None:
        super().__init__()
        self._owns_runner = False
        if runner is None or isinstance(runner, str):
            # lm-eval model_args: runner=<name> (default hf), model=<id>, the rest for the runner
            model = model or pretrained
            if not model:
                raise ValueError("moecap model_args need model=<model id> (e.g. model=tiny-moe)")
            runner = build_runner(model, runner or "hf", **runner_args)
            self._owns_runner = True
        elif runner_args or model or pretrained:
            unknown = sorted(runner_args) + [k for k, v in (("model", model), ("pretrained", pretrained)) if v]
            raise TypeError(f"MoecapLM(runner=...) takes no runner or model arguments; got {unknown}")
        if getattr(runner, "tokenizer", None) is None:
            raise ValueError(
                "the runner's model has no tokenizer (a random: model?); lm-eval tasks need one"
            )
        for method in ("loglikelihood_tokens", "generate_tokens"):
            if not callable(getattr(runner, method, None)):
                raise TypeError(f"runner {type(runner).__name__} has no {method}(): it cannot run lm-eval tasks")
        self.runner = runner
        self.tokenizer = runner.tokenizer
        self.batch_size = _parse_batch_size(batch_size)
        runner_max = int(runner.max_length)
        if max_length is not None and int(max_length) > runner_max:
            log.warning("moecap: max_length=%s exceeds the model's %d; using %d", max_length, runner_max, runner_max)
        self._max_length = min(int(max_length), runner_max) if max_length is not None else runner_max
        self._max_gen_toks = int(max_gen_toks)
        self.add_bos_token = add_bos_token
        self.custom_prefix_token_id = prefix_token_id
        self._warned: set[str] = set()

    # ------------------------------------------------------------------ construction from lm-eval
    @staticmethod
    def _merge_cli(args: dict[str, Any], additional: dict[str, Any] | None) -> dict[str, Any]:
        """lm-eval adds ``batch_size``, ``max_batch_size`` and ``device`` from its own flags, ``device``
        always (``cuda:0`` by default). ``model_args`` win over those; a CUDA device that came from
        the flags' default on a machine without CUDA becomes ``auto`` (as ``hf`` falls back)."""
        merged = dict(args)
        for key, value in (additional or {}).items():
            if value is None or key in merged:
                continue
            if key == "device" and str(value).startswith("cuda"):
                import torch

                if not torch.cuda.is_available():
                    log.info("moecap: no CUDA GPU for device=%s; using device=auto", value)
                    value = "auto"
            merged[key] = value
        return merged

    @classmethod
    def create_from_arg_string(cls, arg_string: str, additional_config: dict | None = None) -> MoecapLM:
        return cls(**cls._merge_cli(lm_utils.simple_parse_args_string(arg_string), additional_config))

    @classmethod
    def create_from_arg_obj(cls, arg_dict: dict[str, Any], additional_config: dict | None = None) -> MoecapLM:
        return cls(**cls._merge_cli(arg_dict, additional_config))

    # ------------------------------------------------------------------ what lm-eval asks of a model
    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_token_id

    @property
    def prefix_token_id(self) -> int:
        """Conditioning token for an empty context and for the first rolling window (as HFLM: BOS, else EOS)."""
        if self.custom_prefix_token_id is not None:
            return self.custom_prefix_token_id
        if self.tokenizer.bos_token_id is not None:
            return self.tokenizer.bos_token_id
        return self.tokenizer.eos_token_id

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def max_gen_toks(self) -> int:
        return self._max_gen_toks

    @property
    def device(self) -> str:
        return self.runner.device_name()

    @property
    def tokenizer_name(self) -> str:
        return str(getattr(self.tokenizer, "name_or_path", "") or "").replace("/", "__")

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, left_truncate_len: int | None = None,
                   **kwargs: Any) -> list[int]:
        """Token ids of ``string``. ``add_special_tokens=None``: the tokenizer's default (or the
        ``add_bos_token`` model argument), except that a string already starting with the prefix
        token's text gets no second one."""
        kw: dict[str, Any] = {}
        if add_special_tokens is not None:
            kw["add_special_tokens"] = add_special_tokens
        elif self.add_bos_token is not None:
            kw["add_special_tokens"] = self.add_bos_token
        if add_special_tokens is None:
            prefix = self.tokenizer.decode(self.prefix_token_id)
            if prefix and string.startswith(prefix):
                kw["add_special_tokens"] = False
        ids = self.tokenizer.encode(string, **kw)
        if left_truncate_len:
            ids = ids[-left_truncate_len:]
        return ids

    def tok_decode(self, tokens: int | list[int], skip_special_tokens: bool = True) -> str:
        if isinstance(tokens, int):
            tokens = [tokens]
        return self.tokenizer.decode(tokens, skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        return self.tokenizer.apply_chat_template(
            chat_history, tokenize=False, add_generation_prompt=add_generation_prompt,
            continue_final_message=not add_generation_prompt,
        )

    def get_model_info(self) -> dict[str, Any]:
        """Recorded by ``simple_evaluate`` in its results' ``config``."""
        info = self.runner.info() if callable(getattr(self.runner, "info", None)) else {}
        return {"moecap_runner": info, "max_length": self.max_length}

    def close(self) -> None:
        """Release the runner, if this object built it."""
        if self._owns_runner and self.runner is not None:
            self.runner.close()
            self.runner = None

    # ------------------------------------------------------------------ scoring
    def _loglikelihood_tokens(
        self, requests: list[tuple[Any, list[int], list[int]]], disable_tqdm: bool = False, **kwargs: Any
    ) -> list[tuple[float, bool]]:
        """``requests``: ``(cache key or None, context tokens, continuation tokens)``."""
        if not requests:
            return []
        for _, ctx, cont in requests:
            if not ctx or not cont:
                raise ValueError("loglikelihood requests need a non-empty context and continuation")
            if len(cont) > self.max_length:
                raise ValueError(
                    f"a continuation of {len(cont)} tokens does not fit the model's {self.max_length}-token window"
                )
        # longest first: batches of similar lengths pad little, and running out of memory happens at once
        order = sorted(range(len(requests)), key=lambda i: -(len(requests[i][1]) + len(requests[i][2])))
        pairs = [(requests[i][1], requests[i][2]) for i in order]
        with tqdm(total=len(pairs), desc="moecap loglikelihood", unit="req", disable=disable_tqdm) as bar:
            scored = self.runner.loglikelihood_tokens(pairs, batch_size=self.batch_size, progress=bar)
        if len(scored) != len(pairs):
            raise RuntimeError(f"runner returned {len(scored)} scores for {len(pairs)} requests")
        out: list[tuple[float, bool]] = [(0.0, False)] * len(requests)
        for i, (ll, greedy) in zip(order, scored, strict=True):
            answer = (float(ll), bool(greedy))
            out[i] = answer
            key = requests[i][0]
            if key is not None:
                self.cache_hook.add_partial("loglikelihood", key, answer)
        return out

    def loglikelihood_rolling(self, requests: list[Any], disable_tqdm: bool = False) -> list[float]:
        """Log-likelihood of whole documents, each conditioned on the prefix token only: disjoint
        windows of up to ``max_length`` predicted tokens, every token predicted once, each window with
        as much preceding text as fits (lm-eval's ``get_rolling_token_windows``, context_len=1)."""
        windows: list[tuple[None, list[int], list[int]]] = []
        owner: list[int] = []
        for i, req in enumerate(tqdm(requests, desc="moecap rolling windows", unit="doc", disable=disable_tqdm)):
            (string,) = req.args
            for ctx, cont in map(
                lm_utils.make_disjoint_window,
                lm_utils.get_rolling_token_windows(
                    token_list=self.tok_encode(string),
                    prefix_token=self.prefix_token_id,
                    max_seq_len=self.max_length,
                    context_len=1,
                ),
            ):
                windows.append((None, ctx, cont))
                owner.append(i)
        scores = self._loglikelihood_tokens(windows, disable_tqdm=disable_tqdm)
        totals = [0.0] * len(requests)
        for i, (ll, _) in zip(owner, scores, strict=True):
            totals[i] += ll
        for req, total in zip(requests, totals, strict=True):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
        return totals

    # ------------------------------------------------------------------ generation
    def _warn_once(self, key: str, message: str, *args: Any) -> None:
        if key not in self._warned:
            self._warned.add(key)
            log.warning(message, *args)

    def _generation_settings(self, gen_kwargs: dict[str, Any]) -> tuple[list[str], int]:
        if not isinstance(gen_kwargs, dict):
            raise TypeError(f"generation kwargs must be a dict, got {type(gen_kwargs).__name__}")
        until = gen_kwargs.get("until")
        if until is None:
            until = []
        elif isinstance(until, str):
            until = [until]
        elif not isinstance(until, (list, tuple)):
            raise ValueError(f"`until` must be a string or a list of strings, got {until!r}")
        until = [s for s in until if s]
        eos = self.tok_decode([self.eot_token_id], skip_special_tokens=False)
        if eos and eos not in until:
            until.append(eos)
        max_gen = next((gen_kwargs[k] for k in _GEN_TOKS_ALIASES if gen_kwargs.get(k) is not None), self.max_gen_toks)
        max_gen = int(max_gen)
        temperature = float(gen_kwargs.get("temperature") or 0.0)
        if gen_kwargs.get("do_sample") or (gen_kwargs.get("do_sample") is None and temperature > 0):
            raise ValueError(
                f"moecap runners decode greedily only; this task asks for sampling ({gen_kwargs})"
            )
        ignored = sorted(k for k in gen_kwargs if k not in _IGNORED_GEN_KWARGS)
        if ignored:
            self._warn_once("ignored:" + ",".join(ignored),
                            "moecap: greedy decoding ignores generation kwargs %s", ignored)
        if max_gen >= self.max_length:
            self._warn_once(
                f"max_gen:{max_gen}", "moecap: max_gen_toks=%d does not fit the model's %d-token window; using %d",
                max_gen, self.max_length, self.max_length - 1,
            )
            max_gen = self.max_length - 1
        return until, max(1, max_gen)

    def generate_until(self, requests: list[Any], disable_tqdm: bool = False) -> list[str]:
        """Greedy continuation of each context, cut before the first of its ``until`` strings (the
        EOS text included) and after at most ``max_gen_toks`` tokens."""
        out: list[str] = []
        for req in tqdm(requests, desc="moecap generate_until", unit="req", disable=disable_tqdm):
            context, gen_kwargs = req.args
            until, max_gen = self._generation_settings(gen_kwargs)

            def stop(tokens: list[int], until: list[str] = until) -> bool:
                text = self.tok_decode(tokens, skip_special_tokens=False)
                return any(s in text for s in until)

            prompt = self.tok_encode(context, left_truncate_len=self.max_length - max_gen)
            if not prompt:
                prompt = [self.prefix_token_id]
            new = self.runner.generate_tokens(prompt, max_gen, stop=stop)
            text = self.tok_decode(new)
            cut = min((text.find(s) for s in until if s in text), default=-1)
            if cut >= 0:
                text = text[:cut]
            out.append(text)
            self.cache_hook.add_partial("generate_until", req.args, text)
        return out
