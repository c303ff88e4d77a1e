"""In-memory stand-ins for the kernel, for unit tests: `Fake` (nf_tables), `FakeConntrack`,
and `FakePrograms` (the programs nftlb runs).

It understands exactly the statements nftlb emits (the whole-table script and the
small update transactions), keeps tables as objects with elements and rules, and
is all-or-nothing per `run()` like a kernel transaction. Errors where the kernel
would refuse: deleting what does not exist, adding an element that does.
"""

from __future__ import annotations

import copy
import json
import re
from typing import Any

from nftlb.errors import KernelError

_ABSENT = "No such file or directory"


class FakePrograms:
    """Stands in for nftlb.kernel.programs.RUNNER: records (program, argv, stdin) and answers from
    `answers`, keyed by the program's name and its first arguments; (0, "", "") otherwise."""

    def __init__(self, answers: dict[tuple[str, ...], tuple[int, str, str]] | None = None):
        self.answers = dict(answers or {})
        self.calls: list[tuple[str, list[str], str | None]] = []

    def __call__(self, path: str, argv: list[str], stdin: str | None, timeout: float):
        from nftlb.kernel.programs import Result

        assert isinstance(argv, list) and all(type(a) is str for a in argv), argv  # an argv, never a line
        name = path.rsplit("/", 1)[-1]
        self.calls.append((name, argv, stdin))
        for n in range(len(argv), -1, -1):
            if (name, *argv[:n]) in self.answers:
                return Result(*self.answers[(name, *argv[:n])])
        return Result(0, "", "")


class FakeConntrack:
    """Records what nftlb asks conntrack to delete; holds no connections."""

    name = "fake-conntrack"

    def __init__(self):
        self.deleted: list = []  # nftlb.update.Flows, in the order asked

    def delete(self, flows) -> int:
        self.deleted.append(flows)
        return 0

    def forget_replies_to(self, address: str) -> int:
        self.deleted.append(("replies to", address))
        return 0

    def open_connections(self) -> dict | None:
        return None  # unknown, like a box without the tool


class Fake:
    name = "fake"

    def __init__(self):
        self.conntrack = FakeConntrack()
        self.tables: dict[str, dict[str, dict]] = {}  # table -> "kind name" -> {"decl", "elements" | "rules"}
        self.scripts: list[tuple[str, bool]] = []
        self.reject: str | None = None  # set to make the next run() fail like the kernel would
        self.commits = 0  # the kernel's ruleset generation: +1 per committed transaction

    def run(self, script: str, *, check: bool = False) -> None:
        self.scripts.append((script, check))
        if self.reject:
            message, self.reject = self.reject, None
            raise KernelError(f"nft rejected the ruleset:\n{message}")
        tables = copy.deepcopy(self.tables)
        try:
            _Interpreter(tables).run(script)
        except _Refused as e:
            raise KernelError(f"nft rejected the ruleset:\nError: {e}") from None
        if not check:
            self.tables = tables
            self.commits += 1

    def generation(self) -> int:
        return self.commits

    def has_table(self, name: str) -> bool:
        return name in self.tables

    def list(self, what: str) -> str | None:
        if what == "tables":
            return json.dumps(
                {
                    "nftables": [{"metainfo": {}}]
                    + [{"table": {"family": "inet", "name": t, "handle": 1}} for t in self.tables]
                }
            )
        kind, _family, table, *name = what.split()
        objects = self.tables.get(table)
        if objects is None or (name and f"{kind} {name[0]}" not in objects):
            return None
        keys = [f"{kind} {name[0]}"] if name else list(objects)
        out: list[dict[str, Any]] = [{"metainfo": {"version": "fake"}}]
        if not name:
            out.append({"table": {"family": "inet", "name": table, "handle": 1}})
        for key in keys:
            k, n = key.split(" ", 1)
            obj = objects[key]
            if k == "chain":
                out.append({"chain": {"name": n, "table": table, "decl": obj["decl"], "handle": 2}})
                out += [{"rule": {"chain": n, "table": table, "text": r, "handle": 3}} for r in obj["rules"]]
            else:
                out.append({k: {"name": n, "table": table, "decl": obj["decl"], "elem": sorted(obj["elements"])}})
        return json.dumps({"nftables": out})


class _Refused(Exception):
    pass


def _key(element: str) -> str:
    """An element's key: what comes before its comment and its data."""
    return re.split(r' comment "| : ', element, maxsplit=1)[0]


class _Interpreter:
    def __init__(self, tables: dict):
        self.tables = tables

    def _table(self, name: str) -> dict:
        if name not in self.tables:
            raise _Refused(f"{_ABSENT}: table inet {name}")
        return self.tables[name]

    def _object(self, table: str, key: str) -> dict:
        objects = self._table(table)
        if key not in objects:
            raise _Refused(f"{_ABSENT}: {key}")
        return objects[key]

    def run(self, script: str) -> None:
        lines = [line for line in script.splitlines() if line.strip() and not line.strip().startswith("#")]
        i = 0
        while i < len(lines):
            line = lines[i]
            if m := re.fullmatch(r"table inet (\S+) \{\}", line):
                self.tables.setdefault(m[1], {})
            elif m := re.fullmatch(r"table inet (\S+) \{", line):
                end = lines.index("}", i)
                self._block(self.tables.setdefault(m[1], {}), lines[i + 1 : end])
                i = end
            elif m := re.fullmatch(r"delete table inet (\S+)", line):
                self._table(m[1])
                del self.tables[m[1]]
            elif m := re.fullmatch(r"(add|delete) element inet (\S+) (\S+) \{ (.*) \}", line):
                objects = self._table(m[2])
                obj = self._object(m[2], f"map {m[3]}" if f"map {m[3]}" in objects else f"set {m[3]}")
                for item in (x.strip() for x in m[4].split(",")):
                    match = [e for e in obj["elements"] if _key(e) == _key(item)]
                    if m[1] == "delete":
                        if not match:
                            raise _Refused(f"{_ABSENT}: element {item}")
                        obj["elements"].remove(match[0])
                    elif match:
                        raise _Refused(f"File exists: element {item}")
                    else:
                        obj["elements"].append(item)
            elif m := re.fullmatch(r"flush chain inet (\S+) (\S+)", line):
                self._object(m[1], f"chain {m[2]}")["rules"] = []
            elif m := re.fullmatch(r"delete (map|set|chain) inet (\S+) (\S+)", line):
                if m[1] == "chain" and self._object(m[2], f"chain {m[3]}")["rules"]:
                    raise _Refused(f"Device or resource busy: chain {m[3]} is not empty")
                self._object(m[2], f"{m[1]} {m[3]}")
                del self.tables[m[2]][f"{m[1]} {m[3]}"]
            else:
                raise _Refused(f"fake kernel does not understand: {line}")
            i += 1

    def _block(self, objects: dict, lines: list[str]) -> None:
        """Objects of a `table inet T { ... }` block: added, or merged into existing ones like nft does."""
        i = 0
        while i < len(lines):
            m = re.fullmatch(r"\t(map|set|chain) (\S+) \{", lines[i])
            if not m:
                raise _Refused(f"fake kernel does not understand: {lines[i]}")
            end = lines.index("\t}", i)
            key = f"{m[1]} {m[2]}"
            body = [line.strip() for line in lines[i + 1 : end]]
            obj = objects.setdefault(key, {"decl": [], "rules" if m[1] == "chain" else "elements": []})
            if m[1] == "chain":
                decl = [line for line in body if line.startswith("type ")]
                obj["decl"] = decl or obj["decl"]
                obj["rules"] += [line for line in body if not line.startswith("type ")]
            else:
                text = " ".join(body)
                head, _, listed = text.partition("elements = {")
                obj["decl"] = head.split() or obj["decl"]
                for item in (x.strip() for x in listed.rstrip(" }").split(",") if listed):
                    if item and _key(item) not in map(_key, obj["elements"]):
                        obj["elements"].append(item)
            i = end + 1
