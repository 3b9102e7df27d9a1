"""SNI routes: which route a TLS server name takes, and which patterns a listener accepts.

Theory of operation
-------------------
A listener's ``sni`` table maps name patterns to routes::

    sni = { "api.example.com" = "api", "*.example.com" = "web" }

A pattern is a host name (``api.example.com``) or ``*.`` followed by one
(``*.example.com``). Names and patterns are compared in lower case with one trailing dot
ignored, so ``API.Example.com.`` is ``api.example.com``. The parser
(``l4lb._native.parse_client_hello``) already hands over names in that form.

Matching follows nginx's ``server_name`` (http://nginx.org/en/docs/http/server_names.html):

1. an exact name wins;
2. otherwise the longest wildcard whose suffix ends the name: ``*.example.com`` matches
   ``a.example.com`` and ``a.b.example.com`` (any depth, as nginx and HAProxy's
   ``req.ssl_sni -m end .example.com`` do; certificate wildcards match one label only,
   RFC 6125 §6.4.3, but this is routing, not verification), and ``*.b.example.com``
   beats it for ``a.b.example.com``;
3. ``*.example.com`` does not match ``example.com`` itself: list both when both are meant;
4. no match, no SNI, or not TLS: the listener's own ``pool``/``split``. A bare ``*`` is
   refused for that reason: the default route already is the catch-all.

A lookup costs one dict probe for the exact name plus one per dot in the name: it runs
once per connection, after the hello is parsed.

Host names (RFC 1123 §2.1, RFC 1035 §2.3.4): labels of 1-63 letters, digits and hyphens,
not starting or ending with a hyphen; at most 253 characters. Underscores are accepted as
well, because clients send such names and TLS servers route them. Non-ASCII names must be
given in their IDNA form (``xn--...``), which is what clients put in the ClientHello.
SNI is chosen by the client and, with ECH, is the outer name only: route by it, never
grant access by it.
"""
from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Generic, TypeVar

T = TypeVar("T")

HOST_NAME_MAX = 253   # characters of a dotted name without its trailing dot (RFC 1035 §2.3.4)
LABEL_MAX = 63        # characters of one label (RFC 1035 §2.3.4)
WILDCARD_PREFIX = "*."
_LABEL = re.compile(r"[a-z0-9_](?:[a-z0-9_-]*[a-z0-9_])?\Z")


def normalize_server_name(name: str) -> str:
    """Lower-case `name` and drop one trailing dot: the form routes are compared in."""
    name = name.lower()
    return name[:-1] if name.endswith(".") else name


def check_sni_pattern(pattern: str) -> str:
    """The normalized form of an ``sni`` pattern; ValueError saying what is wrong with it."""
    if not isinstance(pattern, str):
        raise ValueError(f"sni pattern {pattern!r} must be a string")
    if pattern != pattern.strip():
        raise ValueError(f"sni pattern {pattern!r} has spaces around it")
    name = normalize_server_name(pattern)
    if not name:
        raise ValueError("sni pattern is empty")
    if name == "*":
        raise ValueError("sni pattern '*' matches every name: that is the listener's own "
                         "pool/split, so leave it out")
    host = name[len(WILDCARD_PREFIX):] if name.startswith(WILDCARD_PREFIX) else name
    if "*" in host:
        raise ValueError(f"sni pattern {pattern!r}: '*' may only be the whole first label, "
                         "as in '*.example.com'")
    problem = _host_name_problem(host)
    if problem:
        raise ValueError(f"sni pattern {pattern!r}: {problem}")
    return name


def _host_name_problem(host: str) -> str | None:
    """Why `host` (lower case, no trailing dot) is not a host name, or None."""
    if not host.isascii():
        try:
            hint = f"; its IDNA form is {host.encode('idna').decode('ascii')!r}"
        except UnicodeError:
            hint = ""
        return f"non-ASCII names are sent in their IDNA form (xn--...){hint}"
    if len(host) > HOST_NAME_MAX:
        return f"a host name has at most {HOST_NAME_MAX} characters, this one {len(host)}"
    for label in host.split("."):
        if not label:
            return "empty label (two dots in a row, or a leading dot)"
        if len(label) > LABEL_MAX:
            return f"label {label[:20]!r}... is longer than {LABEL_MAX} characters"
        if not _LABEL.match(label):
            return (f"label {label!r} may hold only letters, digits, '-' and '_', "
                    "and may not start or end with '-'")
    return None


class SniRoutes(Generic[T]):
    """An ``sni`` table, checked once and looked up once per connection."""

    __slots__ = ("routes", "_exact", "_wildcard")

    def __init__(self, routes: Mapping[str, T]):
        """Check every pattern; ValueError naming each bad or duplicate one."""
        problems = []
        self.routes: dict[str, T] = {}   # normalized pattern -> route
        given: dict[str, str] = {}        # normalized pattern -> as written
        for pattern, route in routes.items():
            try:
                name = check_sni_pattern(pattern)
            except ValueError as e:
                problems.append(str(e))
                continue
            if name in given:
                problems.append(f"sni patterns {given[name]!r} and {pattern!r} are the same name")
                continue
            given[name] = pattern
            self.routes[name] = route
        if problems:
            raise ValueError("; ".join(problems))
        self._exact = {p: p for p in self.routes if not p.startswith(WILDCARD_PREFIX)}
        # "*.example.com" is kept under "example.com": a name matches it when it ends in
        # "." + that suffix.
        self._wildcard = {p[len(WILDCARD_PREFIX):]: p for p in self.routes
                          if p.startswith(WILDCARD_PREFIX)}

    def match_pattern(self, server_name: str | None) -> str | None:
        """The pattern `server_name` routes by (exact, then longest wildcard), or None.

        `server_name` is in the form the parser gives (normalize_server_name applied
        once): it is not normalized again, since a second pass would drop a second dot.
        """
        if not server_name:
            return None
        pattern = self._exact.get(server_name)
        if pattern is not None or not self._wildcard:
            return pattern
        dot = server_name.find(".")
        while dot > 0 and server_name[dot - 1] != ".":   # a wildcard needs a label before it
            pattern = self._wildcard.get(server_name[dot + 1:])   # longest suffix first
            if pattern is not None:
                return pattern
            dot = server_name.find(".", dot + 1)
        return None

    def route(self, server_name: str | None) -> T | None:
        """The route for `server_name`, or None: the listener's own pool/split."""
        pattern = self.match_pattern(server_name)
        return None if pattern is None else self.routes[pattern]

    def __len__(self) -> int:
        return len(self.routes)
