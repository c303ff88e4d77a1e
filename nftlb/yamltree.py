"""YAML with line numbers: the pools file's text -> plain data, and where each part was written.

A security boundary. The file may be hostile: it is composed here, iteratively, with limits
on nesting depth and on nodes after alias and merge-key expansion, because libyaml's own
composer recurses in C (100,000 nested `[` crash the process) and aliases can multiply a
small file into billions of nodes. Only the plain YAML tags are taken.
"""

from __future__ import annotations

import re
from typing import Any

import yaml

from nftlb.errors import Problem, show

# Limits on what a pools file's YAML may be; beyond them it is refused (exit 2) before anything is built.
# A 10,000-pool YAML file (4 backends each) is about 1.9 MB and 150,000 nodes; the limits leave
# a margin of more than ten times that, and keep a hostile file from exhausting memory or the stack.
MAX_NODES = 2_000_000  # YAML nodes after alias and merge-key expansion ("billion laughs" guard)
MAX_DEPTH = 64  # nested lists and mappings; a pools file needs 6. libyaml's composer recurses in C
#                 (100,000 nested `[` crash the process), so nftlb composes the nodes itself, iteratively.

_STR, _MERGE, _VALUE = "tag:yaml.org,2002:str", "tag:yaml.org,2002:merge", "tag:yaml.org,2002:value"
_SEQ, _MAP = "tag:yaml.org,2002:seq", "tag:yaml.org,2002:map"
_SCALARS = frozenset(f"tag:yaml.org,2002:{t}" for t in ("null", "bool", "int", "float", "binary", "timestamp"))
_Loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # libyaml's parser when PyYAML has it: 20x faster


class TooBig(Exception):
    pass


class TooDeep(Exception):
    def __init__(self, line: int):
        self.line = line


def _compose(loader) -> yaml.Node | None:
    """The document's root node, like `loader.get_single_node()` but iterative, and refusing
    collections nested deeper than MAX_DEPTH: libyaml's composer recurses in C, and a file of
    100,000 `[` overflows the process's stack (a segfault, not an exception)."""
    get, check, resolve = loader.get_event, loader.check_event, loader.resolve
    Scalar, SeqStart, MapStart, Alias = (
        yaml.ScalarEvent,
        yaml.SequenceStartEvent,
        yaml.MappingStartEvent,
        yaml.AliasEvent,
    )
    ScalarNode, SequenceNode, MappingNode = yaml.ScalarNode, yaml.SequenceNode, yaml.MappingNode
    ComposerError = yaml.composer.ComposerError
    get()  # stream start
    if check(yaml.StreamEndEvent):
        get()
        return None
    get()  # document start
    anchors: dict[str, yaml.Node] = {}
    stack: list[list] = []  # [collection node, key node of a mapping's pending pair, or None]
    while True:
        event = get()
        kind = event.__class__
        if kind is Scalar:
            tag = event.tag
            if tag is None or tag == "!":
                tag = resolve(ScalarNode, event.value, event.implicit)
            node = ScalarNode(tag, event.value, event.start_mark, event.end_mark, style=event.style)
        elif kind is SeqStart or kind is MapStart:
            if len(stack) >= MAX_DEPTH:
                raise TooDeep(event.start_mark.line + 1)
            cls = SequenceNode if kind is SeqStart else MappingNode
            tag = event.tag
            if tag is None or tag == "!":
                tag = resolve(cls, None, event.implicit)
            node = cls(tag, [], event.start_mark, None, flow_style=event.flow_style)
        elif kind is Alias:
            node = anchors.get(event.anchor)
            if node is None:
                raise ComposerError(None, None, f"found undefined alias {event.anchor!r}", event.start_mark)
            loader.nftlb_aliases = True
        else:  # the end of a sequence or mapping
            node = stack.pop()[0]
            node.end_mark = event.end_mark
            kind = None
        if kind is not None and kind is not Alias:
            anchor = event.anchor
            if anchor is not None:
                if anchor in anchors:
                    raise ComposerError(
                        f"found duplicate anchor {anchor!r}; first occurrence",
                        anchors[anchor].start_mark,
                        "second occurrence",
                        event.start_mark,
                    )
                anchors[anchor] = node  # before its items, as PyYAML does: they may refer to it
            if kind is not Scalar:
                stack.append([node, None])
                continue
        if not stack:
            break
        top = stack[-1]
        if top[0].__class__ is SequenceNode:
            top[0].value.append(node)
        elif top[1] is None:
            top[1] = node
        else:
            top[0].value.append((top[1], node))
            top[1] = None
    get()  # document end
    if not check(yaml.StreamEndEvent):
        event = get()
        raise ComposerError(
            "expected a single document in the stream", node.start_mark, "but found another document", event.start_mark
        )
    get()
    return node


def _expanded(node: yaml.Node, sizes: dict[int, int], depth: int) -> int:
    """Nodes in `node` once every alias is expanded (an upper bound of merge keys' pairs too):
    in time linear in the nodes the file spells, whatever the expansion. An alias inside its
    own anchor never ends: it is refused as too deep."""
    if node.__class__ is yaml.ScalarNode:
        return 1
    size = sizes.get(id(node))
    if size is not None:
        return size
    if depth >= MAX_DEPTH:
        raise TooDeep(node.start_mark.line + 1)
    size = 1
    items = node.value if node.__class__ is yaml.SequenceNode else [x for pair in node.value for x in pair]
    for item in items:
        size += _expanded(item, sizes, depth + 1)
        if size > MAX_NODES:
            break
    sizes[id(node)] = size
    return size


class Tree:
    """Plain data from a YAML document plus the line of every key, item and value."""

    def __init__(self, text: str, file: str):
        self.file = file
        self.lines: dict[tuple, int] = {}
        self.problems: list[Problem] = []
        self._nodes = 0
        self._merged: set[tuple] = set()
        loader = _Loader(text)
        try:
            loader.nftlb_aliases = False
            node = _compose(loader)
            if loader.nftlb_aliases and _expanded(node, {}, 0) > MAX_NODES:
                raise TooBig()  # a "billion laughs": refused before any of it is built
            self.lines[()] = 1 if node is None else node.start_mark.line + 1
            self.data = None if node is None else self._build(loader, node, ())
        finally:
            loader.dispose()

    def _problem(self, node: yaml.Node, path: tuple, message: str) -> None:
        self.problems.append(Problem(self.file, node.start_mark.line + 1, field_name(path) or "(top)", message))

    def _scalar(self, loader: yaml.SafeLoader, node: yaml.Node, path: tuple) -> Any:
        tag = node.tag
        if tag == _STR:  # most of a pools file: no constructor needed
            return node.value
        if tag not in _SCALARS:  # !!python/..., !foo, or a collection's tag (!!seq) on a scalar
            if tag == _VALUE:  # a plain `=`: PyYAML reads it as the string
                return node.value
            self._problem(node, path, f"unsupported YAML tag {show(tag)}")
            return None
        try:
            return loader.yaml_constructors[tag](loader, node)
        except yaml.YAMLError:
            raise
        except Exception:  # int() of over 4300 digits, `!!bool maybe` (KeyError), `!!timestamp x` ...
            what = tag.rsplit(":", 1)[-1]
            self._problem(
                node,
                path,
                f"cannot read {show(node.value)} as {'an' if what[0] in 'aeiou' else 'a'} "
                f"{what}" + (" (too many digits)" if len(node.value) > 4000 else ""),
            )
            return None

    def _build(self, loader: yaml.SafeLoader, node: yaml.Node, path: tuple) -> Any:
        self._nodes += 1
        if self._nodes > MAX_NODES:
            raise TooBig()
        if len(path) > MAX_DEPTH:  # an alias can nest a collection in itself: `&a [*a]`
            raise TooDeep(node.start_mark.line + 1)
        kind = node.__class__
        if kind is yaml.ScalarNode:
            return self._scalar(loader, node, path)
        if kind is yaml.SequenceNode:
            if node.tag != _SEQ:
                self._problem(node, path, f"unsupported YAML tag {show(node.tag)}")
            out_list = []
            for i, item in enumerate(node.value):
                sub = path + (i,)
                self.lines[sub] = item.start_mark.line + 1
                out_list.append(
                    self._scalar(loader, item, sub)
                    if item.__class__ is yaml.ScalarNode
                    else self._build(loader, item, sub)
                )
            self._nodes += len(node.value)
            return out_list
        if node.tag != _MAP:
            self._problem(node, path, f"unsupported YAML tag {show(node.tag)}")
        pairs, merged = self._pairs(node, 0)
        out: dict = {}
        for n, (knode, vnode) in enumerate(pairs):
            key = self._scalar(loader, knode, path) if knode.__class__ is yaml.ScalarNode else None
            line = knode.start_mark.line + 1
            if key is None or isinstance(key, (list, dict)):
                self.problems.append(
                    Problem(self.file, line, field_name(path) or "(top)", "keys must be plain scalars")
                )
                continue
            sub = path + (key,)
            if key in out:
                if sub not in self._merged:
                    self.problems.append(
                        Problem(
                            self.file, line, field_name(sub), f"duplicate key (first given on line {self.lines[sub]})"
                        )
                    )
                    continue
                self._merged.discard(sub)  # an explicit key overrides a merged one
            if n < merged:
                self._merged.add(sub)
            self.lines[sub] = line
            out[key] = (
                self._scalar(loader, vnode, sub)
                if vnode.__class__ is yaml.ScalarNode
                else self._build(loader, vnode, sub)
            )
        self._nodes += len(pairs)
        return out

    def _pairs(self, node: yaml.MappingNode, depth: int) -> tuple[list, int]:
        """A mapping's (key, value) nodes with YAML merge keys (<<) expanded, merged pairs first,
        and how many were merged. PyYAML's flatten_mapping, but it leaves the node as it is (an
        alias builds the same node again), counts toward MAX_NODES (a merge of two merges of
        two ... grows exponentially) and is bounded in depth (`&a {<<: *a}` merges itself)."""
        if not any(k.tag == _MERGE for k, _ in node.value):
            return node.value, 0
        if depth >= MAX_DEPTH:
            raise TooDeep(node.start_mark.line + 1)
        merge, explicit = [], []
        for knode, vnode in node.value:
            if knode.tag != _MERGE:
                explicit.append((knode, vnode))
                continue
            subs = vnode.value if vnode.__class__ is yaml.SequenceNode else [vnode]
            for sub in subs:
                if sub.__class__ is not yaml.MappingNode:
                    raise yaml.constructor.ConstructorError(
                        "while constructing a mapping",
                        node.start_mark,
                        f"expected a mapping or list of mappings for merging, but found {sub.id}",
                        sub.start_mark,
                    )
            for sub in reversed(subs):  # earlier mappings in the list win: they go last
                merge.extend(self._pairs(sub, depth + 1)[0])
                self._nodes += len(sub.value)
                if len(merge) > MAX_NODES or self._nodes > MAX_NODES:
                    raise TooBig()
        return merge + explicit, len(merge)

    def line(self, loc: tuple) -> int:
        """Line of the deepest part of `loc` that the file spells out."""
        for n in range(len(loc), -1, -1):
            if loc[:n] in self.lines:
                return self.lines[loc[:n]]
        return 1


_PLAIN_KEY = re.compile(r"[A-Za-z0-9_-]{1,40}")


def field_name(loc: tuple) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int) and not isinstance(part, bool):
            out += f"[{part}]"
            continue
        # a key as the file spells it when it is a plain word; else quoted and escaped, so that a
        # key holding a newline or a terminal escape cannot make up lines of the report
        text = part if isinstance(part, str) and _PLAIN_KEY.fullmatch(part) else show(part, 40)
        out += f".{text}" if out else text
    return out
