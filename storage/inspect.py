"""``cocomix inspect PATH [--json]``: what a token store or target folder holds.

Both kinds become one JSON-able dict (printed as one object with ``--json``, else as rich
tables on stdout). Label statistics of big target folders are computed on evenly spaced
shards up to ``STATS_ROWS`` rows, and say so.
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.table import Table

from cocomix.storage.config import InspectConfig
from cocomix.storage.target_reader import TargetReader
from cocomix.storage.token_store import TokenStore
from cocomix.storage.verify import detect_kind

log = logging.getLogger(__name__)

STATS_ROWS = 1 << 25
TOP_CONCEPTS = 10


@dataclass
class InspectResult:
    """The summary that was printed."""

    path: Path
    kind: str
    info: dict


def run_inspect(cfg: InspectConfig) -> InspectResult:
    path = Path(cfg.path)
    kind = detect_kind(path)
    info = inspect_token_store(path) if kind == "tokens" else inspect_targets(path, cfg.samples, cfg.tokens)
    if cfg.json:
        print(json.dumps(info, indent=2, default=str))
    else:
        _print_tables(info)
    return InspectResult(path, kind, info)


def folder_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def inspect_token_store(path: Path) -> dict:
    store = TokenStore.open(path)
    splits = {}
    for name in store.splits:
        split = store.split(name)
        disk = folder_bytes(path / name)
        splits[name] = {"documents": split.n_docs, "tokens": split.n_tokens, "bytes_on_disk": disk,
                        "bytes_per_token": disk / max(split.n_tokens, 1)}
    return {"kind": "tokens", "path": str(path), "provenance": store.provenance(), "splits": splits,
            "chunk_tokens": store.attrs.get("chunk_tokens"), "total_bytes": folder_bytes(path)}


def inspect_targets(path: Path, samples: int = 8, tokens: str | None = None) -> dict:
    reader = TargetReader.open(path)
    m = reader.manifest
    disk = sum(e["bytes"] for e in m["shards"])
    n_rows = sum(e["rows"] for e in m["shards"])  # N label sets hold N rows per token
    raw = _raw_bytes_per_token(m)
    splits = {s: {"tokens": n, "shards": sum(e["split"] == s for e in m["shards"])} for s, n in m["splits"].items()}
    info = {
        "kind": "targets", "path": str(path), "schema_version": m["schema_version"], "splits": splits,
        "shards": len(m["shards"]), "bytes_on_disk": disk, "bytes_per_token": disk / max(n_rows, 1),
        "raw_bytes_per_token": raw, "k_attr": reader.k_attr, "n_latents": reader.n_latents,
        "ignore_id": reader.ignore_id, "dtypes": m["dtypes"], "window_offsets": _offsets(reader),
        "provenance": _target_provenance(reader.meta),
        "extra_columns": {name: {k: v for k, v in col.items() if k != "rule"} for name, col in reader.extra_columns.items()},
        "labels": label_stats(reader),
    }
    info["samples"] = _samples(reader, samples, _decoder(reader, tokens))
    return info


def _offsets(reader: TargetReader) -> dict:
    """The label sets: one per window offset, with the rule that placed them."""
    record = reader.meta.get("offsets") or {"rule": "single set"}
    return {"values": ", ".join(map(str, reader.offsets)), "rule": record["rule"], "seed": record.get("seed"),
            "window": reader.window_length}


def _raw_bytes_per_token(manifest: dict) -> int:
    d, k = manifest["dtypes"], manifest["k_attr"]
    extra = sum(np.dtype(c["dtype"]).itemsize * int(c["width"]) for c in (manifest.get("extra_columns") or {}).values())
    return np.dtype(d["token"]).itemsize + k * (np.dtype(d["id"]).itemsize + np.dtype(d["score"]).itemsize) + extra


def _target_provenance(meta: dict) -> dict:
    keys = ("teacher", "sae", "selection", "attribution_input", "k_attr", "window", "tokenizer_sha256", "vocab_size")
    out = {k: meta[k] for k in keys if k in meta}
    if "tokens" in meta:
        out["corpus"] = (meta["tokens"].get("corpus") or {}).get("source")
    return out


def label_stats(reader: TargetReader) -> dict:
    """Coverage (share of slots that are not ignore_id), distinct and most frequent concepts."""
    entries = _stat_shards(reader.manifest["shards"])
    counts = np.zeros(max(reader.n_latents, 1), dtype=np.int64)
    slots = filled = rows = 0
    for entry in entries:
        ids = reader.shard_views(entry).ids_NK
        valid = ids[ids != reader.ignore_id].astype(np.int64)
        counts += np.bincount(valid, minlength=len(counts))[: len(counts)]
        slots, filled, rows = slots + ids.size, filled + valid.size, rows + len(ids)
    top = np.argsort(-counts, kind="stable")[:TOP_CONCEPTS]
    return {
        "rows_examined": rows, "sampled": len(entries) < len(reader.manifest["shards"]),
        "coverage": filled / max(slots, 1), "distinct_concepts": int((counts > 0).sum()),
        "top_concepts": [{"id": int(i), "count": int(counts[i]), "share": counts[i] / max(filled, 1)} for i in top if counts[i]],
    }


def _stat_shards(shards: list[dict]) -> list[dict]:
    """All shards, or evenly spaced ones totalling about STATS_ROWS rows."""
    total = sum(e["rows"] for e in shards)
    if total <= STATS_ROWS:
        return shards
    n = max(1, round(len(shards) * STATS_ROWS / total))
    return [shards[i] for i in np.linspace(0, len(shards) - 1, n).astype(int)]


def _decoder(reader: TargetReader, tokens: str | None) -> object | None:
    """A tokenizer to show token text: --tokens store, else the recorded store, else the teacher folder if local."""
    try:
        recorded = (reader.meta.get("tokens") or {}).get("path")
        tokens = tokens or (recorded if recorded and Path(recorded).is_dir() else None)
        if tokens:
            return TokenStore.open(tokens).load_tokenizer()
        teacher = str((reader.meta.get("teacher") or {}).get("id", ""))
        if teacher and Path(teacher).is_dir():
            from cocomix.storage.safe_load import load_tokenizer

            return load_tokenizer(teacher, "teacher")
    except Exception as err:  # noqa: BLE001 - decoding is a convenience; ids are shown anyway
        log.warning("cannot decode tokens (%s); showing ids", err)
    return None


def _samples(reader: TargetReader, n: int, tok) -> list[dict]:
    if n <= 0 or not reader.splits:
        return []
    split = reader.splits[0]
    w = reader.window(split, 0, min(n * 8, reader.split_length(split)))
    labelled = [i for i in range(len(w.tokens)) if (w.concept_ids[i] != reader.ignore_id).any()][:n]
    return [{
        "split": split, "position": i, "token": int(w.tokens[i]),
        "text": tok.decode([int(w.tokens[i])]) if tok is not None else None,
        "concept_ids": [int(c) for c in w.concept_ids[i] if c != reader.ignore_id],
        "concept_scores": [round(float(s), 4) for c, s in zip(w.concept_ids[i], w.concept_scores[i]) if c != reader.ignore_id],
        **_kd_sample(w, i, tok),
    } for i in labelled]


def _kd_sample(w, i: int, tok) -> dict:
    """The most frequent KD ids sampled at position ``i`` (with their share), when the folder has them."""
    kd = w.extra.get("kd_ids")
    if kd is None:
        return {}
    ids, counts = np.unique(kd[i], return_counts=True)
    order = np.argsort(-counts, kind="stable")[:3]
    shown = [f"{tok.decode([int(ids[j])]) if tok is not None else int(ids[j])!r}:{counts[j] / len(kd[i]):.2f}" for j in order]
    return {"kd_next": " ".join(shown)}


def _print_tables(info: dict) -> None:
    out = Console()
    head = Table(title=f"{info['kind']} {info['path']}", show_header=False, show_edge=False)
    for key, value in _flatten({k: v for k, v in info.items() if k not in ("splits", "samples", "labels", "path", "kind")}):
        head.add_row(key, _fmt(value))
    out.print(head)
    out.print(_dict_table("splits", info["splits"]))
    if "labels" in info:
        labels = {k: v for k, v in info["labels"].items() if k != "top_concepts"}
        out.print(_dict_table("labels", {"all": labels}))
        top = {f"latent {c['id']}": {k: v for k, v in c.items() if k != "id"} for c in info["labels"]["top_concepts"]}
        out.print(_dict_table("top concepts", top))
        out.print(_dict_table("samples", {str(s["position"]): s for s in info["samples"]}))


def _dict_table(title: str, rows: dict) -> Table:
    table = Table(title=title, show_edge=False)
    cols = list(dict.fromkeys(k for row in rows.values() for k in row))
    table.add_column("")
    for col in cols:
        table.add_column(col, justify="right")
    for name, row in rows.items():
        table.add_row(name, *(_fmt(row.get(c)) for c in cols))
    return table


def _flatten(obj: dict, prefix: str = "") -> list[tuple[str, object]]:
    """Nested dicts as ``a.b.c`` rows."""
    rows = []
    for key, value in obj.items():
        if isinstance(value, dict) and value:
            rows += _flatten(value, f"{prefix}{key}.")
        else:
            rows.append((f"{prefix}{key}", value))
    return rows


def _fmt(value) -> str:
    if isinstance(value, bool) or value is None:
        return str(value)
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)
