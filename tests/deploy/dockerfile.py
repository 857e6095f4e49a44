"""A small Dockerfile parser: enough of the reference's syntax to check our own Dockerfile.

Handles line continuations (a trailing backslash), comment lines (also inside a
continuation, which Docker drops), exec form (a JSON array) and shell form, build stages, and
the flags of HEALTHCHECK. Parser directives (`# syntax=`) are comments here; the escape
character is always the backslash.
"""

from __future__ import annotations

import json
import shlex
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Instruction:
    keyword: str  # upper case: FROM, RUN, USER, ...
    arguments: str  # as written, continuation lines joined by a space
    line: int  # 1-based line of the keyword
    stage: int  # 0 for the first FROM's stage

    def exec_form(self) -> list[str] | None:
        """The arguments as an argv list when written in exec form (a JSON array)."""
        return _json_array(self.arguments)


@dataclass(frozen=True, slots=True)
class Healthcheck:
    options: dict[str, str]  # --interval=15s -> {"interval": "15s"}
    command: list[str] | str | None  # exec form, shell form, or None for HEALTHCHECK NONE


def parse(text: str) -> list[Instruction]:
    instructions: list[Instruction] = []
    stage = -1
    pending: list[str] = []
    start = 0
    for number, raw in enumerate(text.splitlines(), start=1):
        stripped = raw.strip()
        if stripped.startswith("#"):
            continue  # a comment, also inside a continuation
        if not pending and not stripped:
            continue
        if not pending:
            start = number
        if stripped.endswith("\\"):
            pending.append(stripped[:-1].strip())
            continue
        pending.append(stripped)
        keyword, _, arguments = " ".join(part for part in pending if part).partition(" ")
        pending = []
        keyword = keyword.upper()
        if keyword == "FROM":
            stage += 1
        instructions.append(Instruction(keyword, arguments.strip(), start, stage))
    if pending:
        raise ValueError(f"line {start}: continuation at the end of the file")
    return instructions


def final_stage(instructions: list[Instruction]) -> list[Instruction]:
    last = max(i.stage for i in instructions)
    return [i for i in instructions if i.stage == last]


def from_image(instruction: Instruction) -> str:
    """FROM [--platform=...] image [AS name] -> image."""
    words = [w for w in instruction.arguments.split() if not w.startswith("--")]
    return words[0]


def env_values(instructions: list[Instruction]) -> dict[str, str]:
    """Every ENV of these instructions, later ones winning (`ENV a=1 b=2` and `ENV a 1`)."""
    values: dict[str, str] = {}
    for instruction in instructions:
        if instruction.keyword != "ENV":
            continue
        words = shlex.split(instruction.arguments)
        if "=" not in words[0]:
            values[words[0]] = " ".join(words[1:])
            continue
        for word in words:
            name, _, value = word.partition("=")
            values[name] = value
    return values


def healthcheck(instruction: Instruction) -> Healthcheck:
    options: dict[str, str] = {}
    rest = instruction.arguments
    while rest.startswith("--"):
        option, _, rest = rest.partition(" ")
        name, _, value = option[2:].partition("=")
        options[name] = value
        rest = rest.lstrip()
    kind, _, command = rest.partition(" ")
    if kind.upper() == "NONE":
        return Healthcheck(options, None)
    if kind.upper() != "CMD":
        raise ValueError(f"line {instruction.line}: HEALTHCHECK wants CMD or NONE, not {kind!r}")
    command = command.strip()
    return Healthcheck(options, _json_array(command) or command)


def _json_array(text: str) -> list[str] | None:
    if not text.startswith("["):
        return None
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        return None  # Docker runs a malformed array in shell form
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return value
    return None
