"""Parse untrusted JSON and YAML without letting the input choose how deep the parser recurses.

CPython's JSON decoder and PyYAML's composer recurse once per nesting level. They stop at the interpreter's
recursion limit, but py_ecc (imported by eth_account, so by every Sealroom service) raises that limit to
100 000 at import time; a 200 KB body of ``[`` then runs the C decoder off the thread's stack and the process
dies with SIGSEGV. Two defences, both used at every place that parses bytes from outside:

- :func:`restore_recursion_limit`, called first by every entry point, puts the limit back to CPython's
  default, so any deep recursion that slips through raises ``RecursionError`` instead of crashing;
- :func:`loads` and :func:`load_yaml` refuse documents nested deeper than :data:`MAX_NESTING` levels before
  the recursive part of the parser sees them (a cheap bracket count for JSON, a check on the parser's event
  stream for YAML), with :class:`TooDeeplyNested`.

This module imports nothing from the project, so every role (``kms``, ``compose``, ``cvm``, ``auditor``,
``sealing_cli``) can use it without an import circle.
"""

from __future__ import annotations

import json
import re
import sys
from itertools import accumulate
from typing import Any

import yaml
from yaml.events import AliasEvent, CollectionEndEvent, CollectionStartEvent

__all__ = [
    "DEFAULT_RECURSION_LIMIT",
    "MAX_NESTING",
    "JsonTooDeep",
    "TooDeeplyNested",
    "YamlTooDeep",
    "json_nesting",
    "load_yaml",
    "loads",
    "restore_recursion_limit",
]

MAX_NESTING = 64
"""The deepest nesting of arrays/objects (JSON) or sequences/mappings (YAML) accepted from outside. Sealroom's
own documents (receipts, app-compose.json, manifests, event logs, DCAP collateral) stay under 12."""

DEFAULT_RECURSION_LIMIT = 1000
"""CPython's default recursion limit: deep enough for the project, shallow enough for any thread's C stack."""


class TooDeeplyNested(ValueError):
    """A document nests deeper than the limit; it was refused before the recursive parser saw it."""

    def __init__(self, what: str, max_depth: int) -> None:
        super().__init__(f"{what} is nested deeper than {max_depth} levels")
        self.max_depth = max_depth


class JsonTooDeep(TooDeeplyNested, json.JSONDecodeError):
    """JSON nested too deep. A ``json.JSONDecodeError`` too, so every caller that refuses bad JSON refuses it."""

    def __init__(self, max_depth: int, doc: str) -> None:
        json.JSONDecodeError.__init__(self, f"the JSON is nested deeper than {max_depth} levels", doc, 0)
        self.args = (self.msg,)  # no "line 1 column 1": the depth is not found at one place
        self.max_depth = max_depth


class YamlTooDeep(TooDeeplyNested, yaml.YAMLError):
    """YAML nested too deep (anchors and aliases count at the depth they expand to). A ``yaml.YAMLError`` too."""

    def __init__(self, max_depth: int) -> None:
        TooDeeplyNested.__init__(self, "the YAML", max_depth)


# --- recursion limit ---------------------------------------------------------------------------------------------

def restore_recursion_limit(limit: int = DEFAULT_RECURSION_LIMIT) -> None:
    """Put the interpreter's recursion limit back to ``limit`` (CPython's default) for the whole process.

    py_ecc raises it to 100 000 when it is first imported (``py_ecc/__init__.py``, pulled in by eth_keyfile,
    so by eth_account and web3). It is imported here first, so that no later import can raise the limit again.
    Call this at the start of every entry point, after its imports.
    """
    try:
        import py_ecc  # noqa: F401  (its import is what raises the limit)
    except ImportError:  # pragma: no cover - a dependency of eth_account, always installed here
        pass
    sys.setrecursionlimit(limit)


# --- JSON --------------------------------------------------------------------------------------------------------

# A JSON string, escapes included (an unterminated one runs to the end), or one bracket. Outside strings JSON
# has no quote character, so removing the strings leaves exactly the brackets the decoder will nest on.
_JSON_STRING = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"?', re.DOTALL)
_NOT_A_BRACKET = re.compile(r"[^\[\]{}]+")
_STEP = {"[": 1, "{": 1, "]": -1, "}": -1}


def _text(document: str | bytes | bytearray) -> str:
    if isinstance(document, str):
        return document
    # As json.loads does for bytes: UTF-8, -16 or -32, told apart by the first bytes.
    return bytes(document).decode(json.detect_encoding(document), "surrogatepass")


def json_nesting(document: str | bytes | bytearray) -> int:
    """How deep the arrays and objects of a JSON document nest (0 for a scalar), without parsing it.

    Linear and non-recursive; an invalid document gets a number too (the decoder refuses it anyway, at the
    first bracket that does not close, so the count up to there is what it would have recursed to).
    Raises ``UnicodeDecodeError`` for bytes that are not UTF-8/16/32, as ``json.loads`` would.
    """
    brackets = _NOT_A_BRACKET.sub("", _JSON_STRING.sub("", _text(document)))
    return max(accumulate(map(_STEP.__getitem__, brackets)), default=0)


def loads(document: str | bytes | bytearray, *, max_depth: int = MAX_NESTING, **kwargs: Any) -> Any:
    """``json.loads`` for untrusted input: raises :class:`JsonTooDeep` (a ``JSONDecodeError``) for a document
    nested deeper than ``max_depth``, before the decoder sees it. Other arguments go to ``json.loads``."""
    text = _text(document)
    if json_nesting(text) > max_depth:
        raise JsonTooDeep(max_depth, text)
    return json.loads(text, **kwargs)


# --- YAML --------------------------------------------------------------------------------------------------------

class _DepthLimitedSafeLoader(yaml.SafeLoader):
    """PyYAML's SafeLoader, refusing a document as soon as its parser emits an event deeper than the limit.

    The composer (recursive) pulls events one at a time with ``get_event``; counting there stops it before it
    recurses past the limit. An alias counts at its own depth plus the height of what its anchor holds, so
    aliases cannot stack anchored nodes into a deeper structure than the text shows.
    """

    max_depth = MAX_NESTING

    def __init__(self, stream: Any) -> None:
        super().__init__(stream)
        self._heights: list[int] = []  # per open collection: the height of its subtree so far
        self._anchors: list[str | None] = []
        self._anchored_height: dict[str, int] = {}

    def _reach(self, depth: int) -> None:
        if depth > self.max_depth:
            raise YamlTooDeep(self.max_depth)

    def _grow_parent(self, height: int) -> None:
        if self._heights:
            self._heights[-1] = max(self._heights[-1], height + 1)

    def get_event(self) -> Any:
        event = super().get_event()
        if isinstance(event, CollectionStartEvent):
            self._heights.append(1)
            self._anchors.append(event.anchor)
            self._reach(len(self._heights))
        elif isinstance(event, CollectionEndEvent) and self._heights:
            height, anchor = self._heights.pop(), self._anchors.pop()
            if anchor is not None:
                self._anchored_height[anchor] = height
            self._grow_parent(height)
        elif isinstance(event, AliasEvent):
            height = self._anchored_height.get(event.anchor, 0)
            self._reach(len(self._heights) + height)
            self._grow_parent(height)
        return event


def load_yaml(text: str | bytes, *, max_depth: int = MAX_NESTING) -> Any:
    """``yaml.safe_load`` for untrusted input: raises :class:`YamlTooDeep` (a ``yaml.YAMLError``) as soon as the
    document nests deeper than ``max_depth``, before the composer recurses that deep. Other errors as
    ``yaml.safe_load``."""
    loader = _DepthLimitedSafeLoader(text)
    loader.max_depth = max_depth
    try:
        return loader.get_single_data()
    finally:
        loader.dispose()
