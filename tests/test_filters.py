"""Tests for byte-preserving JSON edits and model filters (reference §4.6, §12.11)."""

from __future__ import annotations

import json
from types import MappingProxyType

from twisted.trial.unittest import SynchronousTestCase

from llamaswap.config.filters import ModelFilters, parse_filters
from llamaswap.core.jsonedit import (
    delete_path,
    get_path,
    set_path,
    split_path,
    top_level_members,
)
from llamaswap.upstream.filters import apply_filters

#: A body whose formatting a json round trip would change.
BODY = (
    b'{\n  "model": "llama",\n  "temperature": 1.50,\n  "max_tokens": 1e3,\n'
    b'  "name": "caf\\u00e9",\n  "messages": [ {"role": "user", "content": "hi"} ],\n'
    b'  "opts": {"a": 1,   "b": [1, 2 ,3]}\n}'
)


class SplitPathTests(SynchronousTestCase):
    def test_dots_and_escapes(self) -> None:
        """Dots separate segments; a backslash makes the next character literal."""
        self.assertEqual(split_path("a.b.c"), ("a", "b", "c"))
        self.assertEqual(split_path("a\\.b.c"), ("a.b", "c"))
        self.assertEqual(split_path("a\\\\.b"), ("a\\", "b"))

    def test_empty_segments_rejected(self) -> None:
        """An empty path or an empty segment is a ValueError."""
        for path in ("", ".a", "a.", "a..b"):
            with self.subTest(path=path):
                self.assertRaises(ValueError, split_path, path)


class SetPathTests(SynchronousTestCase):
    def test_replace_keeps_other_bytes(self) -> None:
        """Replacing a value changes only its span: numbers, escapes, whitespace stay."""
        result = set_path(BODY, "temperature", 0.2)
        self.assertEqual(result, BODY.replace(b"1.50", b"0.2"))

    def test_replace_string_and_unicode(self) -> None:
        """A replaced string value is written as UTF-8; other escapes are untouched."""
        result = set_path(BODY, "model", "ll\u00e9")
        self.assertEqual(result, BODY.replace(b'"llama"', '"ll\u00e9"'.encode()))
        self.assertIn(b"caf\\u00e9", result)

    def test_replace_with_structure(self) -> None:
        """Any JSON value can be written, compactly encoded."""
        result = set_path(BODY, "max_tokens", {"x": [1, None, True]})
        self.assertEqual(result, BODY.replace(b"1e3", b'{"x":[1,null,true]}'))

    def test_insert_after_last_member(self) -> None:
        """A new member goes after the last member as ,"key":<json>."""
        result = set_path(BODY, "seed", 42)
        self.assertEqual(result, BODY[:-2] + b',"seed":42\n}')
        self.assertEqual(json.loads(result)["seed"], 42)

    def test_insert_into_empty_object(self) -> None:
        """In an empty object the member goes right after the brace."""
        self.assertEqual(set_path(b"{}", "a", 1), b'{"a":1}')
        self.assertEqual(set_path(b" { } ", "a", "x"), b' {"a":"x" } ')

    def test_nested_set_existing(self) -> None:
        """A dot path replaces a nested value in place."""
        result = set_path(BODY, "opts.a", 7)
        self.assertEqual(result, BODY.replace(b'"a": 1,', b'"a": 7,'))

    def test_nested_insert_into_existing_object(self) -> None:
        """A missing leaf under an existing object is inserted into that object."""
        result = set_path(BODY, "opts.c", "x")
        self.assertEqual(result, BODY.replace(b"2 ,3]}", b'2 ,3],"c":"x"}'))

    def test_nested_creates_intermediate_objects(self) -> None:
        """Missing intermediate objects are created."""
        result = set_path(BODY, "chat_template_kwargs.reasoning.effort", "high")
        self.assertEqual(
            result,
            BODY[:-2] + b',"chat_template_kwargs":{"reasoning":{"effort":"high"}}\n}',
        )

    def test_non_object_intermediate_replaced(self) -> None:
        """An intermediate that is null or a scalar is replaced by an object."""
        self.assertEqual(set_path(b'{"k": null, "z": 1}', "k.a", 1), b'{"k": {"a":1}, "z": 1}')
        self.assertEqual(set_path(b'{"k": "s"}', "k.a.b", 1), b'{"k": {"a":{"b":1}}}')

    def test_array_index(self) -> None:
        """A decimal segment indexes an existing array."""
        result = set_path(BODY, "messages.0.content", "yo")
        self.assertEqual(result, BODY.replace(b'"hi"', b'"yo"'))
        result = set_path(BODY, "opts.b.2", 9)
        self.assertEqual(result, BODY.replace(b"2 ,3]", b"2 ,9]"))

    def test_array_index_out_of_range(self) -> None:
        """Setting past the end of an array, or by name in one, is a ValueError."""
        self.assertRaises(ValueError, set_path, BODY, "opts.b.3", 1)
        self.assertRaises(ValueError, set_path, BODY, "opts.b.x", 1)
        self.assertRaises(ValueError, set_path, BODY, "messages.x.y", 1)

    def test_duplicates_all_replaced(self) -> None:
        """Every duplicate of the leaf member gets the new value."""
        self.assertEqual(set_path(b'{"a":1,"b":2,"a":3}', "a", 0), b'{"a":0,"b":2,"a":0}')

    def test_escaped_key_matches(self) -> None:
        """Member names are compared decoded, so an escaped key matches."""
        self.assertEqual(set_path(b'{"caf\\u00e9": 1}', "caf\u00e9", 2), b'{"caf\\u00e9": 2}')

    def test_not_an_object(self) -> None:
        """Bodies that are not one JSON object raise ValueError."""
        for body in (b"", b"[1]", b'"s"', b'{"a":1} {}', b'{"a":', b"\xff{}", b'{"a" 1}'):
            with self.subTest(body=body):
                self.assertRaises(ValueError, set_path, body, "a", 1)

    def test_unencodable_value(self) -> None:
        """A value with no JSON text (NaN, objects) raises ValueError."""
        self.assertRaises(ValueError, set_path, b"{}", "a", float("nan"))
        self.assertRaises(ValueError, set_path, b"{}", "a", object())


class DeletePathTests(SynchronousTestCase):
    def test_delete_middle_member(self) -> None:
        """A member followed by another is removed up to that member's key."""
        result = delete_path(BODY, "temperature")
        self.assertEqual(result, BODY.replace(b'"temperature": 1.50,\n  ', b""))

    def test_delete_last_member(self) -> None:
        """The last member is removed back to the end of the previous value."""
        result = delete_path(BODY, "opts")
        self.assertEqual(result, BODY.replace(b',\n  "opts": {"a": 1,   "b": [1, 2 ,3]}', b""))
        self.assertEqual(delete_path(b'{"a": 1, "b": 2}', "b"), b'{"a": 1}')

    def test_delete_first_member(self) -> None:
        """The first member takes the comma after it."""
        self.assertEqual(delete_path(b'{ "a": 1, "b": 2 }', "a"), b'{ "b": 2 }')

    def test_delete_only_member(self) -> None:
        """The only member leaves an empty object, its surrounding blanks kept."""
        self.assertEqual(delete_path(b'{"a":1}', "a"), b"{}")
        self.assertEqual(delete_path(b'{ "a": 1 }', "a"), b"{  }")

    def test_delete_nested(self) -> None:
        """Dot paths delete nested members and array elements, once."""
        self.assertEqual(delete_path(BODY, "opts.a"), BODY.replace(b'"a": 1,   "b"', b'"b"'))
        self.assertEqual(delete_path(BODY, "opts.b.1"), BODY.replace(b"[1, 2 ,3]", b"[1, 3]"))

    def test_delete_duplicates(self) -> None:
        """Every duplicate of the member is removed."""
        self.assertEqual(delete_path(b'{"a":1,"b":2,"a":3}', "a"), b'{"b":2}')

    def test_delete_missing_is_noop(self) -> None:
        """A missing path returns the very same body."""
        for path in ("nope", "opts.nope", "model.x", "opts.b.7", "opts.b.x"):
            with self.subTest(path=path):
                self.assertIs(delete_path(BODY, path), BODY)

    def test_result_is_valid_json(self) -> None:
        """Deleting each member of a body leaves JSON equal to the decoded edit."""
        decoded = json.loads(BODY)
        for key in decoded:
            with self.subTest(key=key):
                expected = {k: v for k, v in decoded.items() if k != key}
                self.assertEqual(json.loads(delete_path(BODY, key)), expected)


class GetPathTests(SynchronousTestCase):
    def test_get(self) -> None:
        """Values are decoded; missing paths give the default or KeyError."""
        self.assertEqual(get_path(BODY, "opts.b.1"), 2)
        self.assertEqual(get_path(BODY, "name"), "caf\u00e9")
        self.assertIsNone(get_path(BODY, "missing", None))
        self.assertRaises(KeyError, get_path, BODY, "opts.zz")
        self.assertEqual(get_path(b'{"a":1,"a":2}', "a"), 2)


class TopLevelMembersTests(SynchronousTestCase):
    def test_members_and_spans(self) -> None:
        """Each top-level member's decoded value and the span of its text;
        nested members are not listed, later duplicates win."""
        text = ' { "m" : "x\\u00e9",\n"n": [1.50, {"m": 2}], "m": 1e3 } '
        members = top_level_members(text)
        self.assertEqual(set(members), {"m", "n"})
        value, start, end = members["m"]
        self.assertEqual((value, text[start:end]), (1000.0, "1e3"))
        value, start, end = members["n"]
        self.assertEqual((value, text[start:end]), ([1.5, {"m": 2}], '[1.50, {"m": 2}]'))

    def test_not_one_object(self) -> None:
        """Anything but exactly one JSON object raises ValueError."""
        for text in ["", "[1]", '{"a":1} x', '{"a":', '{"a" 1}', "{'a':1}"]:
            self.assertRaises(ValueError, top_level_members, text)


def filters(**raw: object) -> ModelFilters:
    parsed, problems = parse_filters(raw, "models.m.filters")
    assert problems == [], problems
    return parsed


class ParseFiltersTests(SynchronousTestCase):
    def test_strip_params_sanitised(self) -> None:
        """stripParams is trimmed, de-duplicated, sorted, without empties or model."""
        parsed = filters(stripParams=" top_k, model ,temperature,,top_k, ")
        self.assertEqual(parsed.strip_params, ("temperature", "top_k"))

    def test_legacy_strip_params(self) -> None:
        """strip_params is read only when stripParams is empty."""
        self.assertEqual(filters(strip_params="a").strip_params, ("a",))
        self.assertEqual(filters(stripParams="", strip_params="a").strip_params, ("a",))
        self.assertEqual(filters(stripParams="b", strip_params="a").strip_params, ("b",))

    def test_set_params(self) -> None:
        """setParams and setParamsByID become read-only mappings of plain values."""
        parsed = filters(
            setParams=MappingProxyType({"x": {"y": [1]}}),
            setParamsByID={"alias": {"t": 1}, "other": None},
        )
        self.assertEqual(dict(parsed.set_params), {"x": {"y": [1]}})
        self.assertEqual(dict(parsed.set_params_by_id["alias"]), {"t": 1})
        self.assertNotIn("other", parsed.set_params_by_id)

    def test_none_and_empty(self) -> None:
        """No filters parse to empty filters."""
        parsed, problems = parse_filters(None, "models.m.filters")
        self.assertEqual((parsed, problems), (ModelFilters(), []))
        self.assertTrue(parsed.is_empty)
        self.assertTrue(filters().is_empty)

    def test_problems_name_key_path(self) -> None:
        """Each problem is one line naming its key path."""
        raw = {
            "stripParams": ["a"],
            "setParams": "x",
            "setParamsByID": {"alias": 3, "ok": {"a..b": 1, "n": float("nan")}},
        }
        _, problems = parse_filters(raw, "models.m.filters")
        self.assertEqual(
            problems[:4],
            [
                "models.m.filters.stripParams: must be a comma-separated string, got a list",
                "models.m.filters.setParams: must be a mapping, got 'x'",
                "models.m.filters.setParamsByID.alias: must be a mapping, got 3",
                "models.m.filters.setParamsByID.ok.a..b: invalid parameter path 'a..b'",
            ],
        )
        # the reason's wording is Python's own and varies between versions
        self.assertEqual(len(problems), 5)
        self.assertTrue(
            problems[4].startswith("models.m.filters.setParamsByID.ok.n: not a JSON value ("),
            problems[4],
        )
        _, problems = parse_filters([1], "peers.p.filters")
        self.assertEqual(problems, ["peers.p.filters: must be a mapping, got a list"])


class ApplyFiltersTests(SynchronousTestCase):
    def test_no_filters_returns_body(self) -> None:
        """With nothing to do the body is returned as is, even if not JSON."""
        self.assertIs(apply_filters(b"not json", ModelFilters(), "m", ""), b"not json")
        by_other = filters(setParamsByID={"other": {"a": 1}})
        self.assertIs(apply_filters(b"[]", by_other, "m", ""), b"[]")

    def test_order(self) -> None:
        """useModelName, then strip, then setParams, then setParamsByID (which wins)."""
        body = b'{"model": "alias", "temperature": 0.5, "top_k": 40, "keep": 1.50}'
        f = filters(
            stripParams="temperature, top_k",
            setParams={"top_k": 10, "b": 2, "a": 1},
            setParamsByID={"alias": {"b": 3, "c.d": True}},
        )
        result = apply_filters(body, f, "alias", "served-name")
        # stripped top_k comes back from setParams; keys are set in sorted order
        self.assertEqual(
            result,
            b'{"model": "served-name", "keep": 1.50,"a":1,"b":3,"top_k":10,"c":{"d":true}}',
        )

    def test_strip_then_set_same_key(self) -> None:
        """A stripped key that setParams names is re-added with the configured value."""
        f = filters(stripParams="t", setParams={"t": 1})
        self.assertEqual(apply_filters(b'{"model":"m","t":9}', f, "m"), b'{"model":"m","t":1}')

    def test_model_protected(self) -> None:
        """No filter strips or sets model (or a path under it)."""
        f = filters(
            stripParams="model, model.x",
            setParams={"model": "evil", "model.x": 1, "mo\\del": "escaped"},
            setParamsByID={"m": {"model": "evil2"}},
        )
        body = b'{"model":"m","x":1}'
        self.assertEqual(apply_filters(body, f, "m"), body)

    def test_use_model_name_is_not_protected(self) -> None:
        """useModelName (step 1) does set model."""
        self.assertEqual(
            apply_filters(b'{"model" : "a"}', ModelFilters(), "a", "real"), b'{"model" : "real"}'
        )

    def test_set_params_by_requested_name(self) -> None:
        """setParamsByID uses the entry for the requested name only."""
        f = filters(
            setParams={"effort": "low"},
            setParamsByID={"gpt:high": {"effort": "high"}, "gpt": {"effort": "mid"}},
        )
        body = b'{"model":"x"}'
        self.assertEqual(apply_filters(body, f, "gpt:high"), b'{"model":"x","effort":"high"}')
        self.assertEqual(apply_filters(body, f, "gpt"), b'{"model":"x","effort":"mid"}')
        self.assertEqual(apply_filters(body, f, "other"), b'{"model":"x","effort":"low"}')

    def test_nested_set_params(self) -> None:
        """Dot-path keys write nested fields, keeping the client's siblings."""
        f = filters(setParams={"chat_template_kwargs.reasoning_effort": "high"})
        body = b'{"model":"m","chat_template_kwargs":{"enable_thinking": true}}'
        self.assertEqual(
            apply_filters(body, f, "m"),
            b'{"model":"m","chat_template_kwargs":{"enable_thinking": true,'
            b'"reasoning_effort":"high"}}',
        )

    def test_preserves_untouched_bytes(self) -> None:
        """Filters leave numbers, escapes and whitespace they do not touch alone."""
        f = filters(stripParams="temperature", setParams={"opts.a": 2})
        result = apply_filters(BODY, f, "llama")
        expected = BODY.replace(b'"temperature": 1.50,\n  ', b"").replace(b'"a": 1,', b'"a": 2,')
        self.assertEqual(result, expected)

    def test_failure_message(self) -> None:
        """A body that cannot be edited gives a one-line ValueError."""
        f = filters(setParams={"a": 1})
        with self.assertRaises(ValueError) as raised:
            apply_filters(b"[1]", f, "m")
        self.assertEqual(
            str(raised.exception), "error setting parameter a in request: body is not a JSON object"
        )
