"""Line numbers of the keys of a TOML document, for error messages.

tomllib returns plain dicts and lists with no positions, so the config loader cannot say
on which line a bad value sits. TomlLocator scans the same text once and records, for
every key path it meets, the line where that path is written:

- table headers `[a.b]` (and the implicit parents `a`), arrays of tables `[[a.b]]`
  (element i is the line of the i-th header),
- `key = value` lines, dotted keys `a.b = 1` (and their implicit parents),
- inline tables `{ k = v }` and arrays, nested to any depth, including multi-line arrays
  of inline tables: element i of `backends = [ {...}, {...} ]` is the line of its `{`.

A path is a tuple of str (table keys) and int (array indices), the shape the config
loader walks. `line_of(path)` never fails: a path the scan did not record falls back to
its nearest recorded ancestor (usually the table header), then to line 1. The scanner
is meant for text tomllib has already accepted; on anything else it stops where it
stops understanding and keeps what it recorded so far, never raising.
"""
from __future__ import annotations

import bisect
import re
import tomllib
from typing import Union

PathPart = Union[str, int]
KeyPath = tuple[PathPart, ...]

_BARE_KEY = re.compile(r"[A-Za-z0-9_-]+")
# A scalar value (number, bool, date-time) ends at one of these; a date-time may hold a
# space ("1979-05-27 07:32:00"), so space is not a terminator.
_SCALAR_END = re.compile(r"[,\]}#\n]")


class _StopScan(Exception):
    """The text is not TOML the scanner understands: keep what has been recorded."""


class TomlLocator:
    """Map key paths of one TOML text to 1-based line numbers (see the module docstring)."""

    def __init__(self, text: str):
        self._text = text
        self._newlines = [i for i, c in enumerate(text) if c == "\n"]
        self._pos = 0
        self._lines: dict[KeyPath, int] = {}
        try:
            self._scan_document()
        except (_StopScan, IndexError, ValueError, tomllib.TOMLDecodeError, RecursionError):
            pass  # keep the paths recorded before the part the scanner did not understand

    def line_of(self, path: KeyPath) -> int:
        """The line where `path` is written, else its nearest recorded ancestor's, else 1."""
        path = tuple(path)
        while path:
            if path in self._lines:
                return self._lines[path]
            path = path[:-1]
        return 1

    def paths(self) -> dict[KeyPath, int]:
        """Every recorded path and its line (a copy; for tests and debugging)."""
        return dict(self._lines)

    # -- recording -------------------------------------------------------------------

    def _line_at(self, pos: int) -> int:
        return bisect.bisect_left(self._newlines, pos) + 1

    def _record(self, path: KeyPath, line: int) -> None:
        """Record an explicitly written path; a later explicit write does not move it."""
        self._lines[path] = line

    def _record_implicit(self, path: KeyPath, line: int) -> None:
        """Record a path that exists only as a prefix; an explicit write may replace it."""
        self._lines.setdefault(path, line)

    # -- scanning --------------------------------------------------------------------

    def _peek(self, n: int = 1) -> str:
        return self._text[self._pos:self._pos + n]

    def _skip_blank(self, newlines: bool) -> None:
        """Skip spaces, tabs and comments; also newlines when `newlines`."""
        text = self._text
        while self._pos < len(text):
            c = text[self._pos]
            if c in " \t\r" or (newlines and c == "\n"):
                self._pos += 1
            elif c == "#":
                end = text.find("\n", self._pos)
                self._pos = len(text) if end < 0 else end
            else:
                return

    def _expect(self, token: str) -> None:
        if not self._text.startswith(token, self._pos):
            raise _StopScan(f"expected {token!r} at {self._pos}")
        self._pos += len(token)

    def _scan_document(self) -> None:
        table: KeyPath = ()
        tables_arrays: dict[KeyPath, int] = {}   # path of an array of tables -> elements so far
        while True:
            self._skip_blank(newlines=True)
            if self._pos >= len(self._text):
                return
            line = self._line_at(self._pos)
            if self._peek(2) == "[[":
                self._pos += 2
                keys = self._scan_key()
                self._skip_blank(newlines=False)
                self._expect("]]")
                parent = self._resolve_header(keys[:-1], tables_arrays, line)
                array = parent + (keys[-1],)
                index = tables_arrays.get(array, 0)
                tables_arrays[array] = index + 1
                self._record_implicit(array, line)
                table = array + (index,)
                self._record(table, line)
            elif self._peek() == "[":
                self._pos += 1
                keys = self._scan_key()
                self._skip_blank(newlines=False)
                self._expect("]")
                table = self._resolve_header(keys, tables_arrays, line)
                self._record(table, line)
            else:
                self._scan_key_value(table)

    def _resolve_header(self, keys: list[str], tables_arrays: dict[KeyPath, int], line: int) -> KeyPath:
        """The full path of header keys: a part naming an array of tables means its last element."""
        path: KeyPath = ()
        for key in keys:
            path += (key,)
            if path in tables_arrays:
                path += (tables_arrays[path] - 1,)
            self._record_implicit(path, line)
        return path

    def _scan_key_value(self, table: KeyPath) -> None:
        """`key = value` (key possibly dotted) inside `table`, from the current position."""
        line = self._line_at(self._pos)
        keys = self._scan_key()
        for i in range(1, len(keys)):
            self._record_implicit(table + tuple(keys[:i]), line)
        path = table + tuple(keys)
        self._record(path, line)
        self._skip_blank(newlines=False)
        self._expect("=")
        self._skip_blank(newlines=False)
        self._scan_value(path)

    def _scan_key(self) -> list[str]:
        """A possibly dotted, possibly quoted key; the position ends after its last part."""
        keys = []
        while True:
            self._skip_blank(newlines=False)
            keys.append(self._scan_simple_key())
            self._skip_blank(newlines=False)
            if self._peek() != ".":
                return keys
            self._pos += 1

    def _scan_simple_key(self) -> str:
        c = self._peek()
        if c in ("'", '"'):
            start = self._pos
            self._scan_string()
            # Let tomllib decode the escapes of a quoted key: rare, and it is exact.
            return tomllib.loads("k = " + self._text[start:self._pos])["k"]
        match = _BARE_KEY.match(self._text, self._pos)
        if not match:
            raise _StopScan(f"no key at {self._pos}")
        self._pos = match.end()
        return match.group()

    def _scan_value(self, path: KeyPath) -> None:
        c = self._peek()
        if c in ("'", '"'):
            self._scan_string()
        elif c == "[":
            self._scan_array(path)
        elif c == "{":
            self._scan_inline_table(path)
        else:
            match = _SCALAR_END.search(self._text, self._pos)
            end = len(self._text) if match is None else match.start()
            if end == self._pos:
                raise _StopScan(f"no value at {self._pos}")
            self._pos = end

    def _scan_string(self) -> None:
        """Skip one basic, literal or multi-line string, escapes included."""
        text = self._text
        quote = text[self._pos]
        if text.startswith(quote * 3, self._pos):
            self._pos += 3
            while True:
                if quote == '"' and text[self._pos] == "\\":
                    self._pos += 2
                elif text.startswith(quote * 3, self._pos):
                    # Up to two quotes may sit just before the closing three: take the run.
                    run = 3
                    while run < 5 and self._pos + run < len(text) and text[self._pos + run] == quote:
                        run += 1
                    self._pos += run
                    return
                else:
                    self._pos += 1
                if self._pos >= len(text):
                    raise _StopScan("unterminated multi-line string")
        self._pos += 1
        while True:
            c = text[self._pos]   # IndexError on an unterminated string stops the scan
            if c == "\n":
                raise _StopScan("newline in a single-line string")
            self._pos += 2 if (c == "\\" and quote == '"') else 1
            if c == quote:
                return

    def _scan_array(self, path: KeyPath) -> None:
        self._expect("[")
        index = 0
        while True:
            self._skip_blank(newlines=True)
            if self._peek() == "]":
                self._pos += 1
                return
            element = path + (index,)
            self._record(element, self._line_at(self._pos))
            self._scan_value(element)
            self._skip_blank(newlines=True)
            if self._peek() == ",":
                self._pos += 1
            elif self._peek() != "]":
                raise _StopScan(f"expected ',' or ']' at {self._pos}")
            index += 1

    def _scan_inline_table(self, path: KeyPath) -> None:
        self._expect("{")
        while True:
            # Inline tables are one line in TOML 1.0; newlines are skipped anyway, so a
            # TOML 1.1 multi-line inline table still gets its lines.
            self._skip_blank(newlines=True)
            if self._peek() == "}":
                self._pos += 1
                return
            self._scan_key_value(path)
            self._skip_blank(newlines=True)
            if self._peek() == ",":
                self._pos += 1
            elif self._peek() != "}":
                raise _StopScan(f"expected ',' or '}}' at {self._pos}")
