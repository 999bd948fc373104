"""Where each entry of a config file is: the path of every entry -> its 1-based line.

Paths are the tuples pydantic reports (``("steps", 1, "prune", "ratio")``), so a problem
can be shown as ``pipeline.toml:7: steps[1].prune.ratio``. YAML positions come from
PyYAML's node tree; Python's ``tomllib`` keeps none, so `toml_lines` reads the TOML text
again, structurally (tables, arrays of tables, dotted keys, inline tables, arrays,
strings and comments), after ``tomllib`` has accepted it.
"""

from __future__ import annotations

import re
from typing import Any

__all__ = ["toml_lines", "yaml_lines"]


def yaml_lines(text: str) -> dict[tuple, int]:
    """Path of every YAML entry -> its 1-based line (from the composed node tree)."""
    import yaml

    lines: dict[tuple, int] = {}

    def walk(node: Any, path: tuple) -> None:
        lines.setdefault(path, node.start_mark.line + 1)
        if isinstance(node, yaml.MappingNode):
            for k, v in node.value:
                key = k.value
                lines[path + (key,)] = k.start_mark.line + 1
                walk(v, path + (key,))
                lines[path + (key,)] = k.start_mark.line + 1
        elif isinstance(node, yaml.SequenceNode):
            for i, v in enumerate(node.value):
                walk(v, path + (i,))
                if isinstance(v, yaml.MappingNode) and len(v.value) == 1:
                    # `- prune: {...}`: the step's kind is part of the path, not a level
                    k, _inner = v.value[0]
                    lines[path + (i, k.value)] = k.start_mark.line + 1

    try:
        node = yaml.compose(text)
    except yaml.YAMLError:
        return lines
    if node is not None:
        walk(node, ())
    return lines


_BARE = re.compile(r"[A-Za-z0-9_-]+")


class _Toml:
    """A scanner over valid TOML text that records the line of every key and array element."""

    def __init__(self, text: str):
        self.s, self.i, self.line = text, 0, 1
        self.lines: dict[tuple, int] = {}
        self.arrays: dict[tuple, int] = {}  # array of tables -> how many tables so far

    def peek(self, n: int = 1) -> str:
        return self.s[self.i:self.i + n]

    def advance(self, n: int = 1) -> None:
        self.line += self.s.count("\n", self.i, self.i + n)
        self.i += n

    def blank(self, newlines: bool) -> None:
        """Skip spaces and comments (and newlines, where the grammar allows them)."""
        while self.i < len(self.s):
            c = self.s[self.i]
            if c in " \t\r" or (newlines and c == "\n"):
                self.advance()
            elif c == "#":
                while self.i < len(self.s) and self.s[self.i] != "\n":
                    self.advance()
            else:
                return

    def string(self) -> str:
        for quote in ('"""', "'''", '"', "'"):
            if self.peek(len(quote)) == quote:
                break
        self.advance(len(quote))
        start = self.i
        while self.peek(len(quote)) != quote:
            self.advance(2 if quote[0] == '"' and self.peek() == "\\" else 1)
        text = self.s[start:self.i]
        self.advance(len(quote))
        return text

    def key(self) -> tuple:
        parts = []
        while True:
            self.blank(False)
            if self.peek() in ('"', "'"):
                parts.append(self.string())
            else:
                m = _BARE.match(self.s, self.i)
                parts.append(m.group())
                self.advance(m.end() - self.i)
            self.blank(False)
            if self.peek() != ".":
                return tuple(parts)
            self.advance()

    def value(self, path: tuple) -> None:
        c = self.peek()
        if c in ('"', "'"):
            self.string()
        elif c == "[":
            self.advance()
            index = 0
            while True:
                self.blank(True)
                if self.peek() == "]":
                    break
                self.lines.setdefault(path + (index,), self.line)
                self.value(path + (index,))
                index += 1
                self.blank(True)
                if self.peek() == ",":
                    self.advance()
            self.advance()
        elif c == "{":
            self.advance()
            while True:
                self.blank(False)
                if self.peek() == "}":
                    break
                self.pair(path)
                self.blank(False)
                if self.peek() == ",":
                    self.advance()
            self.advance()
        else:  # number, bool, date: up to the next delimiter
            while self.i < len(self.s) and self.s[self.i] not in ",]}#\n":
                self.advance()

    def pair(self, table: tuple) -> None:
        line, keys = self.line, self.key()
        for cut in range(1, len(keys)):  # `report.title = ...` also places `report`
            self.lines.setdefault(table + keys[:cut], line)
        path = table + keys
        self.lines[path] = line
        self.advance()  # "="
        self.blank(False)
        self.value(path)

    def resolve(self, keys: tuple) -> tuple:
        """A header's key with the index of the current table of every array of tables in it."""
        path: tuple = ()
        for k in keys:
            path += (k,)
            if path in self.arrays:
                path += (self.arrays[path] - 1,)
        return path

    def scan(self) -> dict[tuple, int]:
        table: tuple = ()
        while True:
            self.blank(True)
            if self.i >= len(self.s):
                return self.lines
            if self.peek(2) == "[[":
                self.advance(2)
                keys, line = self.key(), self.line
                self.advance(2)
                parent = self.resolve(keys[:-1]) + keys[-1:]
                self.arrays[parent] = self.arrays.get(parent, 0) + 1
                table = parent + (self.arrays[parent] - 1,)
                self.lines.setdefault(parent, line)
                self.lines[table] = line
            elif self.peek() == "[":
                self.advance()
                keys, line = self.key(), self.line
                self.advance()
                table = self.resolve(keys)
                self.lines.setdefault(table, line)
            else:
                self.pair(table)


def toml_lines(text: str) -> dict[tuple, int]:
    """Path of every TOML entry -> its 1-based line (`text` must be valid TOML)."""
    try:
        return _Toml(text).scan()
    except (AttributeError, IndexError):  # never expected on valid TOML: lines are a courtesy
        return {}
