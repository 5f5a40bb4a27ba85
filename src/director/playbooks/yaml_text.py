"""YAML text for ``director.playbooks.documents``: reading a document with the position of
every part (and refusing aliases, merge keys, repeated keys and deep nests), and writing one.

A module of its own so that PyYAML is imported only when a document is read or written, never
by a daemon that only serves MCP (it costs ~0.7 MB of resident memory).
"""

from __future__ import annotations

from typing import Any

import yaml

from director.playbooks.problems import ROOT, DocumentInvalid, Locator, child_path

MAX_DEPTH = 32

_Loader: Any = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
_STR_TAG = "tag:yaml.org,2002:str"


def _position(mark: Any) -> tuple[int, int]:
    return int(mark.line) + 1, int(mark.column) + 1


def _walk(node: yaml.Node, path: str, locator: Locator, problems: dict[str, str],
          seen: set[int], aliases: list[str], depth: int = 0) -> None:
    """Record where everything is; refuse aliases, non-string and repeated keys, deep nests."""
    if id(node) in seen:  # the composer hands an alias back as the anchored node itself
        problems[path] = "aliases (*name) are not supported; write the value out"
        aliases.append(path)
        return
    seen.add(id(node))
    locator.values[path] = _position(node.start_mark)
    if depth > MAX_DEPTH:
        problems[path] = f"nests more than {MAX_DEPTH} levels deep"
        return
    if isinstance(node, yaml.ScalarNode) and node.tag != _STR_TAG:
        locator.typed.append((path, node))
        if not node.style:
            locator.unquoted[path] = (str(node.value), node.tag)
    if isinstance(node, yaml.MappingNode):
        keys: set[str] = set()
        for key_node, value_node in node.value:
            scalar = isinstance(key_node, yaml.ScalarNode)
            if not scalar or key_node.tag != _STR_TAG:
                where = child_path(path, str(key_node.value) if scalar else "?")
                locator.values[where] = _position(key_node.start_mark)
                problems[where] = (
                    "merge keys (<<) are not supported; write the keys out"
                    if key_node.tag == "tag:yaml.org,2002:merge" else
                    "keys must be strings: quote this one" if scalar else "keys must be strings")
                continue
            key = str(key_node.value)
            child = child_path(path, key)
            locator.keys[child] = _position(key_node.start_mark)
            if key in keys:
                locator.values[child] = _position(key_node.start_mark)
                problems[child] = "appears twice in the same mapping"
                continue
            keys.add(key)
            _walk(value_node, child, locator, problems, seen, aliases, depth + 1)
    elif isinstance(node, yaml.SequenceNode):
        for index, item in enumerate(node.value):
            _walk(item, f"{path}[{index}]", locator, problems, seen, aliases, depth + 1)


def _syntax_error(error: yaml.YAMLError, text: str) -> DocumentInvalid:
    mark = getattr(error, "problem_mark", None) or getattr(error, "context_mark", None)
    problem = getattr(error, "problem", None)
    context = getattr(error, "context", None)
    context_mark = getattr(error, "context_mark", None)
    if isinstance(error, yaml.reader.ReaderError):
        before = text[:error.position]
        line = before.count("\n") + 1
        column = error.position - (before.rfind("\n") + 1) + 1
        return DocumentInvalid({ROOT: f"character {error.character:#06x} is not allowed in "
                                      "YAML (write it escaped in a double-quoted string)"},
                               {ROOT: (line, column)})
    message = problem or str(error).split("\n")[0]
    if context and context_mark is not None and mark is not None \
            and _position(context_mark) != _position(mark):
        where = _position(context_mark)
        message += f" ({context} at line {where[0]}, column {where[1]})"
    elif context:
        message += f" ({context})"
    return DocumentInvalid({ROOT: f"invalid YAML: {message}"},
                           {ROOT: _position(mark)} if mark is not None else {})


def _unconvertible(locator: Locator) -> DocumentInvalid:
    """A scalar YAML resolves to a number or a date that cannot be one (``2024-13-01``,
    ``0x``, a 5000-digit integer): find which, and say where."""
    for path, node in locator.typed:
        try:
            yaml.constructor.SafeConstructor().construct_object(node, deep=True)
        except (ValueError, TypeError, OverflowError, yaml.YAMLError) as error:
            reason = " ".join(str(error).split())[:200]
            return locator.invalid({path: f"cannot be read ({reason}); quote it if it is text"})
    return DocumentInvalid({ROOT: "a value cannot be read"})


def load(text: str) -> tuple[Any, Locator]:
    """The document's data (plain dicts, lists and scalars) and where each part is."""
    locator = Locator()
    loader = _Loader(text)
    try:
        try:
            node = loader.get_single_node()
            if node is None:
                raise DocumentInvalid({ROOT: "the document is empty"}, {ROOT: (1, 1)})
            problems: dict[str, str] = {}
            aliases: list[str] = []
            _walk(node, ROOT, locator, problems, set(), aliases)
            if aliases:  # the node carries its anchor's marks: find the aliases' own
                marks = [event.start_mark for event in yaml.parse(text, Loader=_Loader)
                         if isinstance(event, yaml.AliasEvent)]
                for path, mark in zip(aliases, marks, strict=False):
                    locator.values[path] = _position(mark)
            if problems:
                raise locator.invalid(problems)
            try:
                return loader.construct_document(node), locator
            except (ValueError, TypeError, OverflowError):
                raise _unconvertible(locator) from None
        except yaml.YAMLError as error:
            raise _syntax_error(error, text) from None
        except RecursionError:
            raise DocumentInvalid({ROOT: "the document nests too deeply"}) from None
    finally:
        loader.dispose()


class _Dumper(yaml.SafeDumper):
    """Sequences indented under their key; multi-line text as literal blocks."""

    def increase_indent(self, flow: bool = False, indentless: bool = False) -> None:
        super().increase_indent(flow, False)


def _represent_text(dumper: yaml.SafeDumper, text: str) -> yaml.ScalarNode:
    if "\x85" in text:  # PyYAML's emitter mangles NEL in plain, quoted and block styles alike
        return dumper.represent_scalar(_STR_TAG, text, style='"')
    if "\n" in text:  # the emitter falls back to quoting when a block cannot hold it exactly
        return dumper.represent_scalar(_STR_TAG, text, style="|")
    return dumper.represent_str(text)


_Dumper.add_representer(str, _represent_text)


def dump(data: Any) -> str:
    """``data`` as block-style YAML, keys in their order (deterministic)."""
    return yaml.dump(data, Dumper=_Dumper, sort_keys=False, allow_unicode=True,
                     default_flow_style=False, width=100, indent=2)
