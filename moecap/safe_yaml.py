"""YAML for suites and ``--set`` values, safe against hostile input.

PyYAML's ``safe_load`` builds only plain data, but it expands aliases: a few hundred bytes of nested
anchors (a "billion laughs") become a structure that everything downstream (validation, hashing, JSON)
walks in exponential time and memory; and it silently keeps the last of two equal keys in a mapping.
:func:`load` uses the safe loader with both closed: a document whose aliases would expand it beyond
:data:`MAX_NODES` nodes is refused before it is built, and a repeated key is an error naming both lines.
"""

from __future__ import annotations

from typing import Any

import yaml

MAX_NODES = 100_000  # a suite expanded through its aliases: far above any real one (a few hundred)


class UnsafeYAMLError(yaml.YAMLError):
    pass


class _Loader(yaml.SafeLoader):
    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, Any] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # "<<: *base": merged keys may be overridden
                continue
            key = self.construct_object(key_node, deep=True)
            try:
                hash(key)
            except TypeError:
                continue  # the base class reports an unhashable key
            if key in seen:
                first = seen[key]
                raise UnsafeYAMLError(
                    f"duplicate key {key!r} at line {key_node.start_mark.line + 1} (first at line "
                    f"{first.start_mark.line + 1}): YAML keeps only the last, so one of them would be ignored")
            seen[key] = key_node
        return super().construct_mapping(node, deep=deep)


def _expanded_size(root: yaml.Node) -> int:
    """How many nodes the document has once every alias is expanded (shared subtrees counted each time
    they are reached), computed over the composed graph without expanding it."""
    memo: dict[int, int] = {}
    stack: list[tuple[yaml.Node, bool]] = [(root, False)]
    while stack:
        node, done = stack.pop()
        if id(node) in memo:
            continue
        children: list[yaml.Node] = []
        if isinstance(node, yaml.SequenceNode):
            children = list(node.value)
        elif isinstance(node, yaml.MappingNode):
            children = [n for pair in node.value for n in pair]
        if done or not children:
            memo[id(node)] = min(1 + sum(memo[id(c)] for c in children), MAX_NODES + 1)
            continue
        stack.append((node, True))
        stack.extend((c, False) for c in children if id(c) not in memo)
    return memo[id(root)]


def load(text: str) -> Any:
    """One YAML document as plain data (see the module docstring); raises ``yaml.YAMLError``."""
    loader = _Loader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        size = _expanded_size(node)
        if size > MAX_NODES:
            raise UnsafeYAMLError(f"the document expands to more than {MAX_NODES} nodes through its aliases "
                                  "(&anchor / *alias): refused")
        return loader.construct_document(node)
    finally:
        loader.dispose()
