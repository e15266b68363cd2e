"""Secrets never reach a record, a manifest, a log artifact or a published file.

A setting is a secret when its name says so (``api_key``, ``hf_token``, ``password``, ``Authorization``,
an environment variable such as ``OPENAI_API_KEY``): :func:`redact` replaces such values in nested
dicts and lists, in ``--set``-style ``key=value`` strings, in ``--flag value`` pairs of an argv and in
``Bearer`` headers, with :data:`REDACTED`. :func:`scrub` removes known secret values from free text
(a server's log). Runner arguments that hold secrets are typed ``SecretStr`` besides, so a dump of them
never shows the value.
"""

from __future__ import annotations

import re
from typing import Any, Iterable

REDACTED = "***redacted***"
_SECRET_WORDS = {"secret", "password", "passwd", "authorization", "credential", "credentials", "apikey"}
# "token" names a credential as the name's last word (hf_token, auth_token), not a unit of text
_TEXT_TOKEN = {"per", "output", "input", "prompt", "first", "next", "last", "each", "completion", "generated",
               "special", "bos", "eos", "pad", "unk", "sep", "cls", "mask", "start", "end", "max", "min", "new"}
_SECRET_PAIRS = {("api", "key"), ("access", "key"), ("private", "key"), ("secret", "key")}
# key=value inside a string (a --set override, an env assignment); whether the key is secret is decided by
# is_secret_name on its last dotted part
_ASSIGNMENT = re.compile(r"(?P<key>[A-Za-z_][\w.\-]*)(?P<sep>\s*[=:]\s*)(?P<value>[^\s,;]+)")
_BEARER = re.compile(r"(?P<key>Bearer\s+)(?P<value>[^\s\"']+)", re.IGNORECASE)


def _words(name: str) -> list[str]:
    name = re.sub(r"([a-z0-9])([A-Z])", r"\1_\2", name)  # camelCase -> camel_Case
    return [w for w in re.split(r"[^A-Za-z0-9]+", name.lower()) if w]


def is_secret_name(name: Any) -> bool:
    """``api_key``, ``hf_token``, ``OPENAI_API_KEY``, ``--api-key``, ``Authorization``, ``password`` are;
    ``output_tokens``, ``max_tokens``, ``tokenizer``, ``keys`` are not."""
    if not isinstance(name, str):
        return False
    words = _words(name.split(".")[-1])
    if words and words[-1] == "token" and (len(words) == 1 or words[-2] not in _TEXT_TOKEN):
        return True
    return any(w in _SECRET_WORDS for w in words) or any(p in _SECRET_PAIRS for p in zip(words, words[1:]))


def _redact_text(text: str) -> str:
    text = _BEARER.sub(lambda m: f"{m['key']}{REDACTED}", text)
    return _ASSIGNMENT.sub(lambda m: f"{m['key']}{m['sep']}{REDACTED}" if is_secret_name(m["key"]) else m[0], text)


def redact(obj: Any) -> Any:
    """A copy of ``obj`` with every secret value replaced by :data:`REDACTED` (see the module doc)."""
    if isinstance(obj, dict):  # a secret is a string: numbers, flags and sections under such names stay
        return {k: (REDACTED if is_secret_name(k) and isinstance(v, str) and v not in ("", REDACTED)
                    else redact(v)) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        out = []
        hide_next = False
        for item in obj:
            if hide_next and isinstance(item, str) and not item.startswith("-"):
                out.append(REDACTED)
                hide_next = False
                continue
            hide_next = isinstance(item, str) and item.startswith("-") and "=" not in item and is_secret_name(item)
            out.append(redact(item))
        return out if isinstance(obj, list) else tuple(out)
    if isinstance(obj, str):
        return _redact_text(obj)
    if type(obj).__name__ == "SecretStr":
        return REDACTED
    return obj


def secret_values(obj: Any) -> set[str]:
    """The secret values inside ``obj`` (by their names), to :func:`scrub` them from free text."""
    found: set[str] = set()
    if isinstance(obj, dict):
        for k, v in obj.items():
            if is_secret_name(k) and isinstance(v, str) and v:
                found.add(v)
            elif hasattr(v, "get_secret_value"):
                value = v.get_secret_value()
                if value:
                    found.add(value)
            else:
                found |= secret_values(v)
    elif isinstance(obj, (list, tuple)):
        for item in obj:
            found |= secret_values(item)
    return {v for v in found if len(v) >= 4}  # a one-letter "secret" would blank the whole log


def scrub(text: str, values: Iterable[str]) -> str:
    """``text`` with every one of ``values`` (and every secret-looking assignment) replaced."""
    for v in sorted(set(values), key=len, reverse=True):
        text = text.replace(v, REDACTED)
    return _redact_text(text)
