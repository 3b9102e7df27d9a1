"""SNI routes (l4lb/sni.py): exact names first, then the longest wildcard, nginx-style."""
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from l4lb import _native
from l4lb.sni import SniRoutes, check_sni_pattern, normalize_server_name

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def routes():
    return SniRoutes({"api.example.com": "api", "*.example.com": "web",
                      "*.eu.example.com": "eu", "Example.COM.": "apex"})


@pytest.mark.parametrize("name, route", [
    ("api.example.com", "api"),
    ("www.example.com", "web"),
    ("a.b.c.example.com", "web"),              # any depth, as nginx
    ("x.eu.example.com", "eu"),                # the longer wildcard wins
    ("x.y.eu.example.com", "eu"),
    ("eu.example.com", "web"),                 # *.eu.example.com needs a label before eu
    ("example.com", "apex"),                   # the wildcard does not match its own suffix
    ("api.example.com.evil.test", None),
    ("notexample.com", None),
    ("com", None),
    (None, None),
    ("", None),
])
def test_exact_names_win_then_the_longest_wildcard(routes, name, route):
    assert routes.route(name) == route


def test_exact_name_beats_a_longer_wildcard():
    routes = SniRoutes({"*.a.example.com": "wild", "x.a.example.com": "exact"})
    assert routes.route("x.a.example.com") == "exact"
    assert routes.route("y.a.example.com") == "wild"


def test_patterns_are_normalized_and_matching_reports_the_normalized_pattern(routes):
    assert set(routes.routes) == {"api.example.com", "*.example.com", "*.eu.example.com",
                                  "example.com"}
    assert routes.match_pattern("q.eu.example.com") == "*.eu.example.com"
    assert routes.match_pattern("api.example.com") == "api.example.com"
    assert routes.match_pattern("nothing.test") is None


def test_a_name_with_an_empty_label_matches_no_wildcard_past_it(routes):
    assert routes.route(".example.com") is None
    assert routes.route("a..example.com") is None


def test_the_parser_output_and_the_routes_agree_on_case_and_trailing_dot(routes):
    hello_name = "WWW.Example.COM."
    assert normalize_server_name(hello_name) == "www.example.com"
    assert routes.route(normalize_server_name(hello_name)) == "web"


@pytest.mark.parametrize("pattern, normalized", [
    ("api.example.com", "api.example.com"),
    ("API.Example.com.", "api.example.com"),
    ("*.example.com", "*.example.com"),
    ("*.COM", "*.com"),
    ("a-b.c_d.example", "a-b.c_d.example"),
    ("xn--bcher-kva.example", "xn--bcher-kva.example"),
    ("localhost", "localhost"),
    ("1.2.3.4", "1.2.3.4"),
    ("a" * 63 + ".test", "a" * 63 + ".test"),
])
def test_valid_patterns_are_accepted_in_normal_form(pattern, normalized):
    assert check_sni_pattern(pattern) == normalized


@pytest.mark.parametrize("pattern, message", [
    ("", "empty"),
    ("*", "listener's own pool"),
    ("*.", "listener's own pool"),          # one trailing dot dropped: "*"
    ("foo*.example.com", "whole first label"),
    ("*.*.example.com", "whole first label"),
    ("www.*.com", "whole first label"),
    ("a..example.com", "empty label"),
    (".example.com", "empty label"),
    ("example.com..", "empty label"),
    ("-a.example.com", "may not start or end with '-'"),
    ("a-.example.com", "may not start or end with '-'"),
    ("a b.example.com", "only letters, digits"),
    ("a:b", "only letters, digits"),
    ("bücher.example", "xn--bcher-kva.example"),
    (" api.example.com", "spaces"),
    ("a" * 64 + ".test", "longer than 63"),
    (".".join(["a" * 60] * 5), "at most 253"),
    (7, "must be a string"),
])
def test_invalid_patterns_are_refused_with_a_message_saying_why(pattern, message):
    with pytest.raises(ValueError, match="sni pattern") as info:
        check_sni_pattern(pattern)
    assert message in str(info.value)


def test_routes_refuse_bad_and_duplicate_patterns_naming_each_one():
    with pytest.raises(ValueError) as info:
        SniRoutes({"a.test": "x", "A.test.": "y", "b..test": "z", "*": "w"})
    text = str(info.value)
    assert "'a.test' and 'A.test.' are the same name" in text
    assert "b..test" in text and "'*'" in text


@settings(max_examples=200, deadline=None)
@given(labels=st.lists(st.from_regex(r"[a-z0-9]{1,5}", fullmatch=True), min_size=1, max_size=5),
       patterns=st.lists(st.lists(st.from_regex(r"[a-z0-9]{1,5}", fullmatch=True),
                                  min_size=1, max_size=4), max_size=6),
       wild=st.lists(st.booleans(), min_size=6, max_size=6))
def test_match_is_the_exact_name_else_the_longest_matching_wildcard(labels, patterns, wild):
    table = {}
    for p, w in zip(patterns, wild):
        table.setdefault(("*." if w else "") + ".".join(p), len(table))
    routes = SniRoutes(table)
    name = ".".join(labels)
    # Brute force: the exact name, else among wildcards whose suffix ends the name after
    # at least one label, the longest.
    expected = name if name in table else None
    if expected is None:
        fits = [p for p in table if p.startswith("*.") and name.endswith(p[1:])]
        expected = max(fits, key=len, default=None)
    assert routes.match_pattern(name) == expected


def test_the_parser_hands_over_names_in_route_form():
    hello = (b"\x16\x03\x01\x00\x3f\x01\x00\x00\x3b\x03\x03" + bytes(32) + b"\x00\x00\x02\x13\x01"
             b"\x01\x00\x00\x10\x00\x00\x00\x0c\x00\x0a\x00\x00\x07A.TEST.")
    status, _, name, _ = _native.parse_client_hello(hello)
    assert status == _native.SNI_FOUND and name == "a.test"
    assert SniRoutes({"*.test": "t", "a.test": "a"}).route(name) == "a"


def test_lookup_takes_the_parsers_form_and_does_not_drop_a_second_trailing_dot(routes):
    # A hello naming "api.example.com.." reaches the routes as "api.example.com.": one dot
    # is ignored, as the listener promises, not two.
    assert routes.route("api.example.com.") is None
    assert routes.route(normalize_server_name("api.example.com.")) == "api"
