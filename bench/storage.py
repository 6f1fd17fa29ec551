"""Storage benchmark: target-shard write/read rates and size, token-store random reads per chunk layout.

    python bench/storage.py            # fast (~1 min on 2 cores)
    python bench/storage.py --full     # bigger files
    python bench/storage.py --record /tmp/storage.md   (then merge into BENCHMARKS.md)

Every figure is measured on one core (the process is pinned), page cache warm. The
optimised path and its baseline run side by side:

- target shards, write: TargetWriter (Arrow IPC file, fsync, sha256, sidecar) vs ``np.save`` of the raw columns;
- target shards, restart check: ``TargetWriter.pending()`` over a finished folder with the sha256 stamps
  (unchanged files are not hashed again) vs the same with the stamps deleted (every shard re-hashed);
- target shards, read: TargetReader.window (mmap, cached zero-copy views) vs opening the shard per window
  with ``pyarrow.ipc.open_file(...).read_all()`` (no mmap, no cache);
- target shards, block checksums: the stage-2 loader (``TrainStream`` over ``TargetSource``, batches of
  16 x 1024, int64) over one epoch with a fresh reader, so every block is CRC32C-checked on its first
  read, vs the same with the checks switched off (goal: at most 5 % off); runs alternate, medians;
- token store, read: TokenSplit.read (direct chunk files) vs zarr-python slicing, for several chunk/shard sizes;
  the decoded-chunk cache is off, so every window pays for decoding its chunk (random windows over a
  9B-token split almost never hit a cache).

Token ids are Zipf-distributed (a > 1) over a GPT-2-sized vocabulary, roughly like text.
"""
from __future__ import annotations

import argparse
import datetime
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

K = 4
WINDOW = 1024
VOCAB = 50257


def pin_one_core() -> None:
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})


def zipf_tokens(n: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (np.minimum(rng.zipf(1.2, n), VOCAB) - 1).astype(np.uint16)


def labels(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, 32768, (n, K)).astype(np.uint16)
    ids[rng.random(n) < 0.1, 2:] = np.iinfo(np.uint16).max
    return ids, rng.random((n, K), dtype=np.float32)


def write_targets(folder: Path, n_tokens: int, shard_tokens: int) -> dict:
    import pyarrow as pa

    from cocomix.storage.targets import TargetWriter, id_dtype, plan_shards

    pa.array(np.zeros(4, np.uint16))  # warm pyarrow's lazy imports outside the timing
    tokens = zipf_tokens(n_tokens)
    plan = plan_shards({"train": n_tokens}, WINDOW, shard_tokens // WINDOW)
    cols = {s: (tokens[s.start:s.end], *labels(s.rows, s.index)) for s in plan}
    def writer():
        return TargetWriter(folder / "t", meta={"sae": {"n_latents": 32768}, "window": WINDOW}, plan=plan, k_attr=K, id_dtype=id_dtype(32768),
                            score_dtype="float32", token_dtype=np.uint16)

    def restart_check() -> float:
        t0 = time.perf_counter()
        with writer() as again:
            assert not again.pending()
        return time.perf_counter() - t0

    t0 = time.perf_counter()
    with writer() as w:
        for spec in plan:
            w.claim(spec)
            w.write_shard(spec, *cols[spec])
        w.finalize()
    ours = time.perf_counter() - t0
    stamped = restart_check()
    for stamp in (folder / "t" / ".locks").glob("*.stamp"):
        stamp.unlink()
    rehash = restart_check()
    t0 = time.perf_counter()
    for spec in plan:
        for j, col in enumerate(cols[spec]):
            np.save(folder / f"raw-{spec.index}-{j}.npy", col)
    raw = time.perf_counter() - t0
    disk = sum(p.stat().st_size for p in (folder / "t" / "train").glob("*.arrow"))
    return {"n": n_tokens, "shards": len(plan), "ours_s": ours, "raw_s": raw, "disk": disk, "raw_bytes": n_tokens * (2 + K * 2 + K * 4),
            "stamped_s": stamped, "rehash_s": rehash}


def read_targets(folder: Path, n_tokens: int, n_windows: int) -> dict:
    import pyarrow as pa

    from cocomix.storage.targets import TargetReader

    reader = TargetReader.open(folder / "t")
    starts = np.random.default_rng(1).integers(0, n_tokens - WINDOW, n_windows)
    tok = np.empty(WINDOW, np.int64)
    ids = np.empty((WINDOW, K), np.int64)
    reader.window("train", 0, WINDOW)
    t0 = time.perf_counter()
    for s in starts:
        w = reader.window("train", int(s), int(s) + WINDOW)
        np.copyto(tok, w.tokens), np.copyto(ids, w.concept_ids)
    ours = time.perf_counter() - t0
    entries = reader.manifest["shards"]
    n_base = max(n_windows // 20, 5)
    t0 = time.perf_counter()
    for s in starts[:n_base]:
        e = next(e for e in entries if e["start"] <= s < e["end"])
        table = pa.ipc.open_file(pa.OSFile(str(folder / "t" / e["path"]))).read_all().slice(int(s) - e["start"], WINDOW)
        np.copyto(tok[: table.num_rows], table.column("token").to_numpy())
        np.copyto(ids[: table.num_rows], table.column("concept_ids").combine_chunks().flatten().to_numpy().reshape(-1, K))
    base = (time.perf_counter() - t0) * n_windows / n_base
    return {"ours_tok_s": n_windows * WINDOW / ours, "base_tok_s": n_windows * WINDOW / base}


def loader_checksum_cost(folder: Path, n_tokens: int, rounds: int = 7) -> dict:
    """The stage-2 loader over one first epoch with a fresh reader (every block checked before its
    first rows are handed on), block checks on vs off, on the pinned core, runs alternating, medians:
    wall-clock tokens/s, tokens per CPU-second of the process (other jobs on the core count less),
    the spread of each round's on/off ratio, and the share of the epoch inside the checks."""
    from cocomix.stage2_pretrain.data import DataState, TargetSource, TrainStream
    from cocomix.storage import block_check
    from cocomix.storage.targets import TargetReader

    steps = n_tokens // (16 * WINDOW)
    real, spent = block_check.BlockChecker.check, [0.0]

    def timed(self, lo, hi, columns=None):
        t0 = time.perf_counter()
        real(self, lo, hi, columns)
        spent[0] += time.perf_counter() - t0

    def epoch(check: bool) -> tuple[float, float, float]:
        block_check.BlockChecker.check = timed if check else (lambda self, lo, hi, columns=None: None)
        spent[0] = 0.0
        try:
            reader = TargetReader.open(folder / "t")
            stream = TrainStream(TargetSource(reader, "train"), context=WINDOW, micro=16,
                                 accum=1, world=1, rank=0, seed=0, offsets=reader.offsets)
            t0, c0, state = time.perf_counter(), time.process_time(), DataState()
            for _ in range(steps):
                state = stream.next_step(state).state
            seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
            return steps * 16 * WINDOW / seconds, steps * 16 * WINDOW / cpu, spent[0] / seconds
        finally:
            block_check.BlockChecker.check = real

    epoch(True)  # warm the page cache and imports
    on, off = [], []
    for i in range(rounds):
        for check in ((False, True) if i % 2 else (True, False)):
            (on if check else off).append(epoch(check))
    ratios = [a[0] / b[0] for a, b in zip(on, off)]  # each round's pair

    def med(runs: list, k: int) -> float:
        return float(np.median([r[k] for r in runs]))

    return {"on_tok_s": med(on, 0), "off_tok_s": med(off, 0), "on_cpu": med(on, 1), "off_cpu": med(off, 1),
            "spread": (float(min(ratios)), float(max(ratios))), "share": med(on, 2), "rounds": rounds, "steps": steps,
            "crc": "crc32c (hardware)" if block_check._crc32c_pkg is not None else "google-crc32c"}


def token_store_layouts(folder: Path, n_tokens: int, n_windows: int, layouts: list[tuple[int, int]]) -> list[dict]:
    import zarr

    from cocomix.storage import chunk_reader
    from cocomix.storage.store_writer import _compressors

    chunk_reader.CACHE_CHUNKS = 0  # each window decodes its chunk, as for random windows over a 9B-token split
    from cocomix.storage.token_store import TokenSplit

    tokens = zipf_tokens(n_tokens, seed=2)
    starts = np.random.default_rng(3).integers(0, n_tokens - WINDOW - 1, n_windows)
    rows = []
    for chunk, shard in layouts:
        path = folder / f"z-{chunk}-{shard}"
        group = zarr.open_group(str(path), mode="w")
        sub = group.create_group("train")
        extra = {"shards": (shard,)} if shard else {}
        arr = sub.create_array("tokens", shape=(n_tokens,), chunks=(chunk,), dtype=np.uint16, compressors=_compressors(), **extra)
        sub.create_array("doc_offsets", shape=(2,), chunks=(2,), dtype=np.int64)[:] = [0, n_tokens]
        t0 = time.perf_counter()
        block = shard or chunk * 64
        for lo in range(0, n_tokens, block):
            arr[lo:lo + block] = tokens[lo:lo + block]
        write = time.perf_counter() - t0
        split = TokenSplit("train", zarr.open_group(str(path), mode="r")["train"], path / "train")
        t0 = time.perf_counter()
        for s in starts:
            split.read(int(s), int(s) + WINDOW + 1)
        fast = time.perf_counter() - t0
        n_z = max(n_windows // 10, 20)
        t0 = time.perf_counter()
        for s in starts[:n_z]:
            split.tokens_array[int(s):int(s) + WINDOW + 1]
        slow = (time.perf_counter() - t0) * n_windows / n_z
        disk = sum(p.stat().st_size for p in (path / "train" / "tokens").rglob("*") if p.is_file())
        files = sum(1 for p in (path / "train" / "tokens").rglob("*") if p.is_file())
        rows.append({"chunk": chunk, "shard": shard, "write_tok_s": n_tokens / write, "fast_tok_s": n_windows * WINDOW / fast,
                     "zarr_tok_s": n_windows * WINDOW / slow, "bytes_per_token": disk / n_tokens, "files": files})
        shutil.rmtree(path)
    return rows


def report(args, w: dict, r: dict, z: list[dict]) -> str:
    lines = [
        "# Storage benchmark", "",
        f"Command: `python bench/storage.py{' --full' if args.full else ''}` · machine: 2-core CPU, no GPU (shared; one core pinned) · "
        f"{datetime.date.today()} · {platform.python_version()}", "",
        "## Target shards (Arrow IPC file, k_attr = 4, uint16 ids, float32 scores)", "",
        "| measure | cocomix | baseline | ratio |", "|---|---|---|---|",
        f"| write, tokens/s ({w['shards']} shards, {w['n']:,} tokens; baseline `np.save` of raw columns) | {w['n'] / w['ours_s']:,.0f} | {w['n'] / w['raw_s']:,.0f} | {w['raw_s'] / w['ours_s']:.2f} |",
        f"| restart check of the finished folder (`pending()`), tokens/s (baseline: re-hash every shard) | {w['n'] / w['stamped_s']:,.0f} | {w['n'] / w['rehash_s']:,.0f} | {w['rehash_s'] / w['stamped_s']:.0f} |",
        f"| same, seconds at 9B tokens (extrapolated) | {9e9 * w['stamped_s'] / w['n']:,.1f} | {9e9 * w['rehash_s'] / w['n']:,.0f} | |",
        f"| random {WINDOW}-token windows with labels, tokens/s, one core (baseline: open + read_all per window) | {r['ours_tok_s']:,.0f} | {r['base_tok_s']:,.0f} | {r['ours_tok_s'] / r['base_tok_s']:.1f} |",
        f"| stage-2 loader, first epoch, tokens/s: block CRC32C checks on (cocomix) vs off, {r['loader']['crc']}, medians of {r['loader']['rounds']} alternating runs (per-round ratios {r['loader']['spread'][0]:.3f}–{r['loader']['spread'][1]:.3f}) | {r['loader']['on_tok_s']:,.0f} | {r['loader']['off_tok_s']:,.0f} | {r['loader']['on_tok_s'] / r['loader']['off_tok_s']:.3f} |",
        f"| same, tokens per CPU-second of the process | {r['loader']['on_cpu']:,.0f} | {r['loader']['off_cpu']:,.0f} | {r['loader']['on_cpu'] / r['loader']['off_cpu']:.3f} |",
        f"| same, share of the epoch spent inside the block checks (timed directly) | {100 * r['loader']['share']:.1f}% | | |",
        f"| bytes/token on disk (raw columns: {w['raw_bytes'] / w['n']:.0f}) | {w['disk'] / w['n']:.4f} | {w['raw_bytes'] / w['n']:.4f} | +{100 * (w['disk'] / w['raw_bytes'] - 1):.3f}% |",
        "", "Goals: reads >= 2M tokens/s per core; shards <= raw column bytes + 1%; block checks cost <= 5% of the loader.", "",
        "## Token store (Zarr v3, zstd level 3 + checksum): random 1025-token reads, one core", "",
        "| chunk | shard | files | write tok/s | read tok/s: direct chunk files (cocomix) | read tok/s: zarr slicing | ratio | bytes/token |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in z:
        lines.append(f"| {row['chunk']:,} | {row['shard'] or '-'} | {row['files']} | {row['write_tok_s']:,.0f} | {row['fast_tok_s']:,.0f} | "
                     f"{row['zarr_tok_s']:,.0f} | {row['fast_tok_s'] / row['zarr_tok_s']:.1f} | {row['bytes_per_token']:.3f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--full", action="store_true", help="bigger files and more windows")
    parser.add_argument("--record", type=Path, help="also write the markdown report here")
    args = parser.parse_args()
    pin_one_core()
    n_targets, shard, n_windows = (1 << 24, 1 << 20, 20000) if args.full else (1 << 21, 1 << 18, 4000)
    n_store = 1 << 25 if args.full else 1 << 23
    layouts = [(1 << 12, 1 << 22), (1 << 14, 1 << 22), (1 << 16, 1 << 22), (1 << 14, 0), (1 << 16, 0), (1 << 20, 0)]
    with tempfile.TemporaryDirectory() as tmp:
        w = write_targets(Path(tmp), n_targets, shard)
        r = read_targets(Path(tmp), n_targets, n_windows)
        r["loader"] = loader_checksum_cost(Path(tmp), n_targets)
        z = token_store_layouts(Path(tmp), n_store, n_windows, layouts)
    text = report(args, w, r, z)
    print(text)
    if args.record:
        args.record.parent.mkdir(parents=True, exist_ok=True)
        args.record.write_text(text)


if __name__ == "__main__":
    main()
