"""Concept-target shards (docs/ARCHITECTURE.md, formats): the public API of the format.

The pieces live in :mod:`.target_schema` (schema, dtypes, plan), :mod:`.target_writer`
and :mod:`.target_reader`; this module gathers them under one name.
"""
from __future__ import annotations

from cocomix.storage.target_reader import TargetReader, TargetWindow, check_ranges, load_manifest
from cocomix.storage.target_schema import (
    MANIFEST, PLAN, TARGETS_SCHEMA_VERSION, ShardSpec, arrow_schema, id_dtype, ignore_id, plan_shards, safe_path,
)
from cocomix.storage.target_writer import TargetWriter

__all__ = [
    "MANIFEST", "PLAN", "TARGETS_SCHEMA_VERSION", "ShardSpec", "TargetReader", "TargetWindow", "TargetWriter",
    "arrow_schema", "check_ranges", "id_dtype", "ignore_id", "load_manifest", "plan_shards", "safe_path",
]
