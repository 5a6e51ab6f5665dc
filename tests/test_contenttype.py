"""Tests for llamaswap.core.contenttype: the hot path's Content-Type parser."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from llamaswap.core.contenttype import ContentType, media_type, parse_content_type


class ParseTests(SynchronousTestCase):
    def test_json(self) -> None:
        self.assertEqual(
            parse_content_type(b"application/json"), ContentType(b"application/json", {})
        )

    def test_json_with_charset(self) -> None:
        parsed = parse_content_type(b"application/json; charset=utf-8")
        self.assertEqual(parsed.media_type, b"application/json")
        self.assertEqual(parsed.param(b"charset"), b"utf-8")

    def test_case_insensitive_type_and_names_values_kept(self) -> None:
        parsed = parse_content_type(b"Application/JSON;CHARSET=UTF-8")
        self.assertEqual(parsed.media_type, b"application/json")
        self.assertEqual(parsed.param(b"Charset"), b"UTF-8")

    def test_multipart_boundary(self) -> None:
        parsed = parse_content_type(
            b"multipart/form-data; boundary=----WebKitFormBoundary7MA4YWxkTrZu0gW"
        )
        self.assertEqual(parsed.media_type, b"multipart/form-data")
        self.assertEqual(parsed.param(b"boundary"), b"----WebKitFormBoundary7MA4YWxkTrZu0gW")

    def test_quoted_boundary_with_separators_and_escapes(self) -> None:
        parsed = parse_content_type(b'multipart/form-data; boundary="a;b=c \\"d\\""; charset=x')
        self.assertEqual(parsed.param(b"boundary"), b'a;b=c "d"')
        self.assertEqual(parsed.param(b"charset"), b"x")

    def test_urlencoded(self) -> None:
        self.assertEqual(
            parse_content_type(b"application/x-www-form-urlencoded").media_type,
            b"application/x-www-form-urlencoded",
        )

    def test_whitespace_around_parts(self) -> None:
        parsed = parse_content_type(b" text/plain ;\tcharset = utf-8 ; ")
        self.assertEqual(parsed.media_type, b"text/plain")
        self.assertEqual(parsed.param(b"charset"), b"utf-8")

    def test_missing(self) -> None:
        self.assertEqual(parse_content_type(None), ContentType(b"", {}))
        self.assertEqual(parse_content_type(b""), ContentType(b"", {}))

    def test_malformed_media_type(self) -> None:
        for value in (b"json", b"/json", b"application/", b"app lication/json", b";a=b", b"a/b/c"):
            self.assertEqual(parse_content_type(value).media_type, b"", value)
            self.assertEqual(media_type(value), b"", value)

    def test_malformed_parameters_are_skipped(self) -> None:
        parsed = parse_content_type(b"text/plain; novalue; a b=c; ok=1; bad=x y; last=2")
        self.assertEqual(parsed.params, {b"ok": b"1", b"last": b"2"})

    def test_unterminated_quote_ends_parameters(self) -> None:
        parsed = parse_content_type(b'multipart/form-data; a=1; boundary="abc; c=3')
        self.assertEqual(parsed.media_type, b"multipart/form-data")
        self.assertEqual(parsed.params, {b"a": b"1"})

    def test_first_parameter_wins(self) -> None:
        self.assertEqual(parse_content_type(b"a/b; x=1; X=2").param(b"x"), b"1")

    def test_media_type_shortcut_agrees(self) -> None:
        for value in (b"application/json; charset=utf-8", b"Multipart/Form-Data; boundary=x"):
            self.assertEqual(media_type(value), parse_content_type(value).media_type)

    @given(st.binary(max_size=80))
    def test_never_raises(self, value: bytes) -> None:
        parsed = parse_content_type(value)
        self.assertEqual(parsed.media_type, parsed.media_type.lower())
        self.assertEqual(media_type(value), parsed.media_type)
