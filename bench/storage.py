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
  16 x 1024, int64) over one epoch with a fresh reader, so every block is CRC32C-checked before its first
  rows are handed on -- by the loader itself (one CPU), or ahead by the check-ahead helper process on a
  second core (the default with 2+ CPUs) -- vs the same with the checks switched off (goal: at most 5 %
  off); runs rotate, medians;
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
#: seconds per step of 16 x 1024 tokens that the paced loader rows leave to "training" (8.2M tokens/s: about
#: 6x what bench/pretrain.py estimates a 69m step on one H200 consumes, so the loader is still pressed)
PACE = 0.002
SETUP = 0.1  #: seconds between handing the helper the first windows and the first step (building a model takes longer)


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
    first rows are handed on), three ways, on the pinned core, runs rotating, medians:

    - ``off``: block checks switched off (the baseline);
    - ``inproc``: the loader checks each block itself on first read (one CPU, or ``COCOMIX_CHECK_AHEAD=0``);
    - ``ahead``: the check-ahead helper process, pinned to another core, verifies the blocks in the
      loader's order and the loader checks only what it reaches first (the default with two or more CPUs).

    Per variant: wall-clock tokens/s, tokens per CPU-second of the loader's process, the share of the
    epoch inside the loader's own checks; for ``ahead`` also the helper's CPU time per epoch (the cost
    moved to the other core) and how many blocks the loader still checked itself."""
    from cocomix.stage2_pretrain.data import DataState, TargetSource, TrainStream
    from cocomix.storage import block_ahead, block_check
    from cocomix.storage.targets import TargetReader

    steps = n_tokens // (16 * WINDOW)
    real, spent, own = block_check.BlockChecker.check, [0.0], [0]
    real_block = block_check.BlockChecker._check_block

    def timed(self, lo, hi, columns=None):
        t0 = time.perf_counter()
        real(self, lo, hi, columns)
        spent[0] += time.perf_counter() - t0

    def counted(self, b, names):
        own[0] += 1
        real_block(self, b, names)

    def helper_cpu() -> float:
        h = block_ahead._helper
        if h is None or not h.alive():
            return 0.0
        fields = Path(f"/proc/{h.process.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def epoch(variant: str, pace: float, instrument: bool = False) -> tuple[float, float, float, float, int]:
        """One first epoch; ``pace`` seconds between steps stand for the training step the loader feeds
        (the prefetch thread then waits): throughput is tokens per second spent inside ``next_step``.
        Paced epochs also start as ``pretrain`` does: ``stream.prepare`` hands the helper the first
        windows, then SETUP seconds (building the model) pass before the first step."""
        os.environ["COCOMIX_CHECK_AHEAD"] = "1" if variant == "ahead" else "0"
        if variant == "off":
            block_check.BlockChecker.check = lambda self, lo, hi, columns=None: None
        elif instrument:  # separate rounds: the wrappers cost about as much as a flag lookup
            block_check.BlockChecker.check, block_check.BlockChecker._check_block = timed, counted
        spent[0], own[0] = 0.0, 0
        try:
            reader = TargetReader.open(folder / "t")
            stream = TrainStream(TargetSource(reader, "train"), context=WINDOW, micro=16,
                                 accum=1, world=1, rank=0, seed=0, offsets=reader.offsets)
            h0, busy, cpu, state = helper_cpu(), 0.0, 0.0, DataState()
            if pace:
                stream.prepare(state)
                time.sleep(SETUP)
            for _ in range(steps):
                t0, c0 = time.perf_counter(), time.process_time()
                state = stream.next_step(state).state
                busy, cpu = busy + time.perf_counter() - t0, cpu + time.process_time() - c0
                if pace:
                    time.sleep(pace)
            if variant == "ahead":
                time.sleep(0.05)  # the helper's clock ticks are coarse: let it finish its list before reading them
            return steps * 16 * WINDOW / busy, steps * 16 * WINDOW / cpu, spent[0] / busy, helper_cpu() - h0, own[0]
        finally:
            block_check.BlockChecker.check, block_check.BlockChecker._check_block = real, real_block
            os.environ.pop("COCOMIX_CHECK_AHEAD", None)

    epoch("ahead", 0.0)  # start the helper, warm the page cache and imports
    helper = block_ahead._helper
    cores = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
    others = sorted(set(range(os.cpu_count() or 1)) - set(cores))
    if helper is not None and others:
        os.sched_setaffinity(helper.process.pid, {others[0]})  # the loader's core stays the loader's
    variants = [(v, p) for p in (0.0, PACE) for v in ("off", "inproc", "ahead")]
    runs: dict[tuple, list] = {v: [] for v in variants}
    for i in range(rounds):
        for v in variants[i % len(variants):] + variants[:i % len(variants)]:
            runs[v].append(epoch(*v))
    counts = {v: [epoch(*v, instrument=True) for _ in range(3)] for v in variants if v[0] != "off"}

    def med(v: tuple, k: int) -> float:
        return float(np.median([r[k] for r in runs[v]]))

    def spread(v: tuple) -> tuple[float, float]:
        ratios = [a[0] / b[0] for a, b in zip(runs[v], runs[("off", v[1])])]
        return float(min(ratios)), float(max(ratios))

    out = {"rounds": rounds, "steps": steps, "helper": helper is not None and bool(others), "pace": PACE,
           "crc": "crc32c (hardware)" if block_check._crc32c_pkg is not None else "google-crc32c"}
    for v, p in variants:
        inside = counts.get((v, p), [(0, 0, 0.0, 0.0, 0)])
        out[v + ("_paced" if p else "")] = {"tok_s": med((v, p), 0), "cpu": med((v, p), 1), "helper_cpu": med((v, p), 3),
                                            "share": float(np.median([r[2] for r in inside])),
                                            "own_blocks": float(np.median([r[4] for r in inside])), "spread": spread((v, p))}
    return out


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


def loader_rows(lo: dict) -> list[str]:
    def row(what: str, v: str, base: str) -> str:
        x, o = lo[v], lo[base]
        return (f"| {what} (per-round ratios {x['spread'][0]:.3f}–{x['spread'][1]:.3f}) | {x['tok_s']:,.0f} | {o['tok_s']:,.0f} | "
                f"{x['tok_s'] / o['tok_s']:.3f} |")

    core = "on a second core" if lo["helper"] else "(NO second core: it shares the loader's)"
    blocks = lo["steps"] * 16 * WINDOW // 16384
    return [
        row(f"stage-2 loader, first epoch, tokens/s: block CRC32C checks by the loader itself (`COCOMIX_CHECK_AHEAD=0`, one CPU) vs off, "
            f"{lo['crc']}, medians of {lo['rounds']} rotating runs", "inproc", "off"),
        row(f"same, checks ahead by the helper process {core} (the default with 2+ CPUs) vs off", "ahead", "off"),
        row(f"same, the loader as in `pretrain`: paced ({1000 * lo['pace']:.0f} ms per step of {16 * WINDOW:,} tokens left to the step; "
            f"tokens per second inside the loader), windows handed to the helper {1000 * SETUP:.0f} ms before the first step: "
            "checks by the loader itself vs off", "inproc_paced", "off_paced"),
        row(f"same, as in `pretrain`: checks ahead by the helper {core} vs off", "ahead_paced", "off_paced"),
        f"| same, blocks (of {blocks}) the loader still checked itself with the helper, unpaced / paced; the helper's CPU per epoch "
        f"| {lo['ahead']['own_blocks']:.0f} / {lo['ahead_paced']['own_blocks']:.0f}; {1000 * lo['ahead']['helper_cpu']:.0f} ms | | |",
        f"| same, share of the epoch inside the loader's own checks (3 instrumented runs each): by itself / with the helper, unpaced | "
        f"{100 * lo['inproc']['share']:.1f}% / {100 * lo['ahead']['share']:.1f}% | | |",
    ]


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
        *loader_rows(r["loader"]),
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
        r["loader"] = loader_checksum_cost(Path(tmp), n_targets, rounds=15)
        z = token_store_layouts(Path(tmp), n_store, n_windows, layouts)
    text = report(args, w, r, z)
    print(text)
    if args.record:
        args.record.parent.mkdir(parents=True, exist_ok=True)
        args.record.write_text(text)


if __name__ == "__main__":
    main()
