"""Read XLA's optimized HLO text: which entry parameters reach a ``transpose`` or ``copy``.

Used by tests to check that Linears read their weights in place (no per-call transposes).
Follows a parameter through ``bitcast`` (free) and into fusion/call computations."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

_HEADER = re.compile(r"^(ENTRY\s+)?%?([\w.\-]+)\s*\(.*\)\s*->\s*.*\{\s*$")
_INSTR = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(.*)$")
_CALLS = re.compile(r"(?:calls|to_apply)=%?([\w.\-]+)")
_NAME = re.compile(r"%([\w.\-]+)")
_FOLLOW = frozenset({"bitcast", "get-tuple-element"})
_MOVES = frozenset({"transpose", "copy"})


@dataclass
class Instruction:
    name: str
    op: str
    operands: list[str]
    calls: list[str]
    parameter: int | None


@dataclass
class Computation:
    name: str
    entry: bool
    instructions: dict[str, Instruction] = field(default_factory=dict)

    def users(self, name: str) -> list[Instruction]:
        return [i for i in self.instructions.values() if name in i.operands]

    def parameter(self, index: int) -> Instruction:
        for instr in self.instructions.values():
            if instr.op == "parameter" and instr.parameter == index:
                return instr
        raise KeyError(f"{self.name} has no parameter {index}")


def _split_type(rest: str) -> str:
    """The text after the result type of ``rest`` (``type op(operands), attrs``)."""
    if rest.startswith("("):
        depth = 0
        for pos, char in enumerate(rest):
            depth += char == "("
            depth -= char == ")"
            if depth == 0:
                return rest[pos + 1 :].lstrip()
    return rest.split(" ", 1)[1]


def _instruction(line: str) -> Instruction | None:
    match = _INSTR.match(line)
    if match is None:
        return None
    name, rest = match.groups()
    body = _split_type(rest)
    op, _, tail = body.partition("(")
    depth, pos = 1, 0
    while pos < len(tail) and depth:
        depth += tail[pos] == "("
        depth -= tail[pos] == ")"
        pos += 1
    operand_text, attrs = tail[: pos - 1], tail[pos:]
    parameter = int(operand_text) if op == "parameter" else None
    return Instruction(name, op, _NAME.findall(operand_text), _CALLS.findall(attrs), parameter)


def parse(text: str) -> dict[str, Computation]:
    computations: dict[str, Computation] = {}
    current: Computation | None = None
    for line in text.splitlines():
        header = _HEADER.match(line)
        if header is not None:
            current = Computation(header.group(2), bool(header.group(1)))
            computations[current.name] = current
            continue
        if line.strip() == "}":
            current = None
            continue
        if current is not None:
            instr = _instruction(line)
            if instr is not None:
                current.instructions[instr.name] = instr
    return computations


def moved_parameters(text: str, indices: list[int]) -> dict[int, list[str]]:
    """Entry parameter index -> the transpose/copy instructions it reaches (empty: none)."""
    computations = parse(text)
    entry = next(c for c in computations.values() if c.entry)
    found: dict[int, list[str]] = {}
    for index in indices:
        hits: list[str] = []
        todo = [(entry, entry.parameter(index).name)]
        seen = set()
        while todo:
            comp, name = todo.pop()
            if (comp.name, name) in seen:
                continue
            seen.add((comp.name, name))
            for user in comp.users(name):
                if user.op in _MOVES:
                    hits.append(f"{comp.name}/{user.name} = {user.op}")
                elif user.op in _FOLLOW:
                    todo.append((comp, user.name))
                elif user.calls and user.op in ("fusion", "call"):
                    callee = computations[user.calls[0]]
                    for position, operand in enumerate(user.operands):
                        if operand == name:
                            todo.append((callee, callee.parameter(position).name))
        found[index] = hits
    return found
