"""The pipeline language: ``name{key=value,...},name,...``.

``parse_pipeline`` keeps each option exactly as written, so ``str(parse_pipeline(s)) == s`` for every
valid ``s`` (no spaces). Errors point at the offending character and list what is valid there.
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from dataclasses import dataclass
from typing import Any

from qcompile.passes.base import PASSES, Pass, QCompileError

_NAME = re.compile(r"[a-z][a-z0-9]*(-[a-z0-9]+)*")
_KEY = re.compile(r"[a-z_][a-z0-9_]*")
_VALUE = re.compile(r"[^,{}=\s]+")


class PipelineSyntaxError(QCompileError):
    def __init__(self, text: str, pos: int, message: str) -> None:
        self.text, self.pos = text, pos
        super().__init__(f"{message} at character {pos + 1}: {text[:pos]}>>>{text[pos:]}")


@dataclass(frozen=True)
class PassSpec:
    name: str
    options: tuple[tuple[str, str], ...] = ()

    def __str__(self) -> str:
        if not self.options:
            return self.name
        return self.name + "{" + ",".join(f"{k}={v}" for k, v in self.options) + "}"

    def build(self) -> Pass:
        cls = PASSES[self.name]
        kwargs = {key: _convert(cls, key, raw) for key, raw in self.options}
        return cls(**kwargs)


@dataclass(frozen=True)
class Pipeline:
    specs: tuple[PassSpec, ...]

    def __str__(self) -> str:
        return ",".join(str(s) for s in self.specs)

    def build(self) -> list[Pass]:
        return [s.build() for s in self.specs]


def _convert(cls: type[Pass], key: str, raw: str) -> Any:
    hint = typing.get_type_hints(cls)[key]
    kinds = [a for a in typing.get_args(hint) if a is not type(None)] if isinstance(hint, types.UnionType) else [hint]
    if raw == "none" and type(None) in typing.get_args(hint):
        return None
    for kind in kinds:
        try:
            if kind is bool:
                if raw not in ("true", "false"):
                    raise ValueError
                return raw == "true"
            return kind(raw)
        except ValueError:
            continue
    names = "/".join(getattr(k, "__name__", str(k)) for k in kinds)
    raise ValueError(f"option {key}={raw} of '{cls.name}' must be {names}")


class _Parser:
    def __init__(self, text: str) -> None:
        self.text, self.pos = text, 0

    def fail(self, message: str) -> PipelineSyntaxError:
        return PipelineSyntaxError(self.text, self.pos, message)

    def take(self, pattern: re.Pattern[str], what: str) -> str:
        m = pattern.match(self.text, self.pos)
        if not m:
            raise self.fail(f"expected {what}")
        self.pos = m.end()
        return m.group()

    def peek(self, char: str) -> bool:
        return self.text.startswith(char, self.pos)

    def pipeline(self) -> Pipeline:
        specs = [self.spec()]
        while self.peek(","):
            self.pos += 1
            specs.append(self.spec())
        if self.pos != len(self.text):
            raise self.fail("expected ',' between passes")
        return Pipeline(tuple(specs))

    def spec(self) -> PassSpec:
        start = self.pos
        name = self.take(_NAME, "a pass name")
        if name not in PASSES:
            self.pos = start
            raise self.fail(f"unknown pass '{name}' (known: {', '.join(sorted(PASSES))})")
        options: list[tuple[str, str]] = []
        if self.peek("{"):
            self.pos += 1
            options.append(self.option(name))
            while self.peek(","):
                self.pos += 1
                options.append(self.option(name))
            if not self.peek("}"):
                raise self.fail("expected ',' or '}'")
            self.pos += 1
        return PassSpec(name, tuple(options))

    def option(self, pass_name: str) -> tuple[str, str]:
        start = self.pos
        key = self.take(_KEY, "an option name")
        valid = [f.name for f in dataclasses.fields(PASSES[pass_name])]
        if key not in valid:
            self.pos = start
            raise self.fail(f"'{pass_name}' has no option '{key}' (options: {', '.join(valid) or 'none'})")
        if not self.peek("="):
            raise self.fail("expected '='")
        self.pos += 1
        value_at = self.pos
        raw = self.take(_VALUE, "a value")
        try:
            _convert(PASSES[pass_name], key, raw)
        except ValueError as exc:
            self.pos = value_at
            raise self.fail(str(exc)) from None
        return key, raw


def parse_pipeline(text: str) -> Pipeline:
    """Parse pipeline text; raise PipelineSyntaxError pointing at the first bad character."""
    return _Parser(text.strip()).pipeline()
