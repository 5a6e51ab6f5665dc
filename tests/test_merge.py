"""Tests for merging --config and --config-dir sources (reference §1.2)."""

from __future__ import annotations

import os
from typing import Any

from twisted.trial.unittest import SynchronousTestCase

from llamaswap.config.merge import config_dir_files, config_sources, merge_documents


def merge(*documents: Any) -> Any:
    return merge_documents([(f"f{i}.yaml", doc) for i, doc in enumerate(documents)])


class MergeTests(SynchronousTestCase):
    def assertMergeError(self, message: str, *documents: Any) -> None:
        with self.assertRaises(ValueError) as raised:
            merge(*documents)
        self.assertEqual(str(raised.exception), message)

    def test_mappings_merge_recursively(self) -> None:
        """Disjoint keys are unioned at every level, first source's order first."""
        merged = merge(
            {"macros": {"a": 1}, "healthCheckTimeout": 60},
            {"macros": {"b": 2}, "logLevel": "debug"},
        )
        self.assertEqual(
            merged, {"macros": {"a": 1, "b": 2}, "healthCheckTimeout": 60, "logLevel": "debug"}
        )
        self.assertEqual(list(merged), ["macros", "healthCheckTimeout", "logLevel"])

    def test_sequences_concatenate(self) -> None:
        """Sequences are concatenated in source order (apiKeys, preload)."""
        merged = merge({"apiKeys": ["a"]}, {"apiKeys": ["b", "c"]}, {"apiKeys": ["a"]})
        self.assertEqual(merged, {"apiKeys": ["a", "b", "c", "a"]})
        merged = merge(
            {"hooks": {"on_startup": {"preload": ["m1"]}}},
            {"hooks": {"on_startup": {"preload": ["m2"]}}},
        )
        self.assertEqual(merged["hooks"]["on_startup"]["preload"], ["m1", "m2"])

    def test_identical_scalars_agree(self) -> None:
        """The same scalar in two sources is no conflict."""
        self.assertEqual(merge({"startPort": 5800}, {"startPort": 5800}), {"startPort": 5800})
        self.assertEqual(
            merge({"macros": {"x": "y"}}, {"macros": {"x": "y"}}), {"macros": {"x": "y"}}
        )

    def test_scalar_conflict(self) -> None:
        """Different scalars (also different types of equal value) conflict at their path."""
        self.assertMergeError(
            'conflict at "macros.x": f1.yaml sets a different value than a previous source',
            {"macros": {"x": "y"}},
            {"macros": {"x": "z"}},
        )
        for a, b in ((1, True), (1, 1.0), ("1", 1)):
            with self.subTest(a=a, b=b):
                self.assertMergeError(
                    'conflict at "v": f1.yaml sets a different value than a previous source',
                    {"v": a},
                    {"v": b},
                )

    def test_null_yields(self) -> None:
        """null on either side yields to the other value, whatever its kind."""
        self.assertEqual(merge({"a": None}, {"a": [1]}), {"a": [1]})
        self.assertEqual(merge({"a": {"b": 1}}, {"a": None}), {"a": {"b": 1}})
        self.assertEqual(merge({"a": 3}, {"a": None}), {"a": 3})
        self.assertEqual(merge({"models": None}, {"models": {"m": {}}}), {"models": {"m": {}}})

    def test_kind_mismatch(self) -> None:
        """A mapping, sequence and scalar under the same key conflict."""
        self.assertMergeError(
            'conflict at "a.b": incompatible YAML node kinds (mapping vs sequence)'
            " introduced by f1.yaml",
            {"a": {"b": {}}},
            {"a": {"b": []}},
        )
        self.assertMergeError(
            'conflict at "a": incompatible YAML node kinds (scalar vs mapping)'
            " introduced by f1.yaml",
            {"a": 1},
            {"a": {"x": 1}},
        )

    def test_identity_maps_reject_duplicates(self) -> None:
        """A model, group, profile, ... defined by two sources is an error."""
        for path in (
            "models",
            "groups",
            "profiles",
            "selectors",
            "peers",
            "matrix",
            "routing.router.settings.groups",
            "routing.router.settings.matrix",
        ):
            *parents, name = path.split(".")

            def nest(value: Any, parents: list[str] = parents, name: str = name) -> Any:
                doc: Any = {name: value}
                for parent in reversed(parents):
                    doc = {parent: doc}
                return doc

            with self.subTest(path=path):
                # identical definitions still collide: each key is one entity
                self.assertMergeError(
                    f'duplicate {name} "x" found in f1.yaml'
                    " (already defined in another config source)",
                    nest({"x": {"cmd": "a"}}),
                    nest({"x": {"cmd": "a"}}),
                )
                self.assertEqual(
                    merge(nest({"x": {"cmd": "a"}}), nest({"y": {"cmd": "b"}})),
                    nest({"x": {"cmd": "a"}, "y": {"cmd": "b"}}),
                )

    def test_identity_map_children_not_merged(self) -> None:
        """Non-identity maps elsewhere (e.g. a model's own keys) merge normally."""
        merged = merge(
            {"routing": {"router": {"use": "group"}}},
            {"routing": {"router": {"settings": {"groups": {"g": {}}}}}},
        )
        self.assertEqual(
            merged["routing"]["router"], {"use": "group", "settings": {"groups": {"g": {}}}}
        )

    def test_identity_map_not_a_mapping(self) -> None:
        """An identity map given as a non-mapping conflicts."""
        self.assertMergeError(
            'conflict at "models": expected a mapping, introduced by f1.yaml',
            {"models": {"a": {}}},
            {"models": ["b"]},
        )

    def test_empty_sources(self) -> None:
        """Empty documents are skipped; all empty gives {}."""
        self.assertEqual(merge(), {})
        self.assertEqual(merge(None, None), {})
        self.assertEqual(merge(None, {"a": 1}, None), {"a": 1})

    def test_top_level_must_be_mapping(self) -> None:
        """A source whose top level is not a mapping is named in the error."""
        self.assertMergeError("config f1.yaml: top-level YAML must be a mapping", {"a": 1}, [1])

    def test_inputs_not_modified(self) -> None:
        """Merging leaves the source documents untouched."""
        first = {"a": {"b": [1]}, "models": {"m": {}}}
        second = {"a": {"b": [2], "c": 1}, "models": {"n": {}}}
        merged = merge(first, second)
        self.assertEqual(first, {"a": {"b": [1]}, "models": {"m": {}}})
        self.assertEqual(second, {"a": {"b": [2], "c": 1}, "models": {"n": {}}})
        merged["a"]["b"].append(3)
        self.assertEqual(first["a"]["b"], [1])

    def test_single_document_is_copied(self) -> None:
        """Even a single source comes back as a fresh plain dict."""
        only = {"a": [1]}
        merged = merge(only)
        self.assertEqual(merged, only)
        self.assertIsNot(merged["a"], only["a"])


class ConfigDirTests(SynchronousTestCase):
    def make_dir(self, names: list[str]) -> str:
        directory = self.mktemp()
        os.makedirs(directory)
        for name in names:
            with open(os.path.join(directory, name), "w") as stream:
                stream.write("{}\n")
        return directory

    def test_sorted_yaml_only(self) -> None:
        """Only top-level .yml/.yaml files, sorted by name."""
        directory = self.make_dir(["b.yaml", "a.yml", "c.txt", "10.yaml", "2.yaml", "x.YAML"])
        os.makedirs(os.path.join(directory, "sub.yaml"))
        os.makedirs(os.path.join(directory, "nested"))
        with open(os.path.join(directory, "nested", "n.yaml"), "w") as stream:
            stream.write("{}\n")
        self.assertEqual(
            config_dir_files(directory),
            [os.path.join(directory, name) for name in ("10.yaml", "2.yaml", "a.yml", "b.yaml")],
        )

    def test_empty_dir(self) -> None:
        """An empty directory gives no files."""
        self.assertEqual(config_dir_files(self.make_dir([])), [])

    def test_missing_dir(self) -> None:
        """A missing directory raises OSError."""
        self.assertRaises(OSError, config_dir_files, self.mktemp())

    def test_sources_order(self) -> None:
        """--config comes first, then the directory's files."""
        directory = self.make_dir(["b.yaml", "a.yaml"])
        self.assertEqual(
            config_sources("main.yaml", directory),
            ["main.yaml", os.path.join(directory, "a.yaml"), os.path.join(directory, "b.yaml")],
        )
        self.assertEqual(config_sources("main.yaml", None), ["main.yaml"])

    def test_config_inside_dir_rejected(self) -> None:
        """The --config file may not also be in --config-dir."""
        directory = self.make_dir(["a.yaml"])
        self.assertRaises(ValueError, config_sources, os.path.join(directory, "a.yaml"), directory)
        self.assertRaises(ValueError, config_sources, None, None)
