"""One wording for "what differs" in every resume/refusal message."""
from __future__ import annotations

from cocomix.storage.identity import ABSENT, Difference, describe_diff, differences


def test_equal_records_have_no_difference():
    record = {"flags": {"lr": 1e-3, "k": 32}, "teacher": {"sha256": "ab" * 32}}
    assert differences(record, dict(record)) == []
    assert describe_diff(record, {"teacher": {"sha256": "ab" * 32}, "flags": {"k": 32, "lr": 1e-3}}) == ""


def test_nested_leaves_are_named_by_their_path_with_both_values():
    old = {"meta": {"sae": {"k": 8, "d_in": 64}, "layer": 2}}
    new = {"meta": {"sae": {"k": 16, "d_in": 64}, "layer": 3}}
    assert differences(old, new) == [Difference("meta.layer", 2, 3), Difference("meta.sae.k", 8, 16)]
    assert describe_diff(old, new) == "meta.layer was 2, now 3; meta.sae.k was 8, now 16"


def test_a_key_on_one_side_only_is_shown_as_absent():
    assert describe_diff({"a": 1}, {"a": 1, "b": 2}) == f"b was {ABSENT}, now 2"
    assert describe_diff({"a": 1, "b": {"c": 1}}, {"a": 1}) == f"b was {{'c': 1}}, now {ABSENT}"


def test_json_types_compare_equal_after_a_round_trip():
    # a saved record has lists where the live one has tuples, string keys where it has ints
    assert describe_diff({"shape": [2, 3], "by": {"1": "x"}}, {"shape": (2, 3), "by": {1: "x"}}) == ""


def test_names_show_paths_as_the_user_knows_them():
    old, new = {"flags": {"lr": 0.003, "k": 32}}, {"flags": {"lr": 0.001, "k": 32}}
    by_map = describe_diff(old, new, names={"flags.lr": "--lr"})
    by_fn = describe_diff(old, new, names=lambda path: "--" + path.split(".")[-1] if path.startswith("flags.") else None)
    assert by_map == by_fn == "--lr was 0.003, now 0.001"


def test_special_parts_are_described_in_their_own_words():
    def plan(old, new):
        return [Difference("windows per shard", len(old), len(new))]

    old = {"shards": [{"start": 0}, {"start": 5}], "k": 4}
    new = {"shards": [{"start": 0}, {"start": 3}, {"start": 6}], "k": 4}
    message = describe_diff(old, new, special={"shards": plan})
    assert message == "windows per shard was 2, now 3" and "start" not in message
    assert describe_diff(old, dict(old), special={"shards": plan}) == ""


def test_long_values_are_cut_and_extra_differences_counted():
    old = {f"k{i}": i for i in range(9)} | {"text": "x" * 200}
    new = {f"k{i}": i + 1 for i in range(9)} | {"text": "y" * 200}
    message = describe_diff(old, new, limit=3)
    assert message.endswith("; and 7 more") and message.count(" was ") == 3
    assert len(describe_diff({"t": "x" * 200}, {"t": "y"})) < 100
