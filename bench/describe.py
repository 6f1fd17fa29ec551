"""`cocomix concepts describe` benchmark: the streaming pass over target shards, one core.

    python bench/describe.py            # 8M tokens, 32768 latents, top 8 (~1 min on 2 cores)
    python bench/describe.py --full     # 32M tokens

Synthetic target folder in the paper's shapes (k_attr = 4, uint16 ids, float32 scores, 32768
latents, 1M-token shards); label ids skewed towards few latents like real labels (a power law),
about 10% of slots ignored. Measured, process pinned to one core, page cache warm (wall and
CPU time: on a shared machine the CPU-time rate is what the core delivers):

- the pass itself (``scan_targets``: counts + vectorised top-N merge), tokens/s; goal >= 1M tok/s;
- the baseline it replaces: a heap per latent fed slot by slot (``heapq``), on a slice, tokens/s;
- decoding the kept contexts (L x N windows, ``batch_decode``) with a byte-level BPE, seconds.
"""
from __future__ import annotations

import argparse
import heapq
import os
import tempfile
import time
from pathlib import Path

import numpy as np

K, L, WINDOW, VOCAB = 4, 32768, 1024, 4096


def pin_one_core() -> None:
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})


def write_targets(folder: Path, n_tokens: int, shard_tokens: int) -> Path:
    from cocomix.storage.targets import TargetWriter, id_dtype, plan_shards

    plan = plan_shards({"train": n_tokens}, WINDOW, shard_tokens // WINDOW)
    with TargetWriter(folder, meta={"sae": {"n_latents": L}}, plan=plan, k_attr=K, id_dtype=id_dtype(L),
                      score_dtype="float32", token_dtype=np.uint16) as w:
        for spec in plan:
            rng = np.random.default_rng(spec.index)
            ids = (L * rng.random((spec.rows, K)) ** 3).astype(np.uint16)
            ids[rng.random(spec.rows) < 0.1, 2:] = np.iinfo(np.uint16).max
            tokens = rng.integers(0, VOCAB, spec.rows).astype(np.uint16)
            w.claim(spec)
            w.write_shard(spec, tokens, ids, rng.random((spec.rows, K), dtype=np.float32))
        w.finalize()
    return folder


def heap_baseline(reader, top_n: int, rows: int) -> float:
    """Seconds for a heap per latent over the first ``rows`` rows, slot by slot."""
    w = reader.window("train", 0, rows)
    heaps: list[list] = [[] for _ in range(L)]
    t0 = time.perf_counter()
    for pos, (ids, scores) in enumerate(zip(w.concept_ids.tolist(), w.concept_scores.tolist())):
        for i, s in zip(ids, scores):
            if i < L:
                h = heaps[i]
                if len(h) < top_n:
                    heapq.heappush(h, (s, -pos))
                elif s > h[0][0]:
                    heapq.heapreplace(h, (s, -pos))
    return time.perf_counter() - t0


def bpe():
    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast

    words = "the of and to in is that for it as with was on be by this are from at or an which".split()
    rng = np.random.default_rng(0)
    texts = [" ".join(rng.choice(words, 200)) + f" {i} x{i * 7}" for i in range(2000)]
    tok = ByteLevelBPETokenizer()
    tok.train_from_iterator(texts, vocab_size=VOCAB, min_frequency=1)
    return PreTrainedTokenizerFast(tokenizer_object=tok._tokenizer)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--full", action="store_true")
    ap.add_argument("--top-n", type=int, default=8)
    args = ap.parse_args()
    pin_one_core()
    from cocomix.stage2_pretrain.concepts_describe import decode_examples, scan_targets
    from cocomix.storage.target_reader import TargetReader

    n_tokens = (32 if args.full else 8) << 20
    with tempfile.TemporaryDirectory() as tmp:
        folder = write_targets(Path(tmp) / "t", n_tokens, 1 << 20)
        reader = TargetReader.open(folder)
        scan_targets(reader, args.top_n, chunk_rows=1 << 16)  # warm: page cache, sha256 checks at first map
        t0, c0 = time.perf_counter(), time.process_time()
        stats = scan_targets(reader, args.top_n)
        scan_s, scan_cpu = time.perf_counter() - t0, time.process_time() - c0
        base_rows = 1 << 18
        base_s = heap_baseline(reader, args.top_n, base_rows)
        tok = bpe()
        t0, c0 = time.perf_counter(), time.process_time()
        decode_examples(reader, tok, stats, 8)
        decode_s, decode_cpu = time.perf_counter() - t0, time.process_time() - c0
    print(f"tokens {n_tokens:,}  latents {L:,}  top-n {args.top_n}  k_attr {K}")
    print(f"scan_targets (vectorised top-N): {scan_s:.2f} s wall, {scan_cpu:.2f} s CPU  "
          f"{n_tokens / scan_s / 1e6:.2f} M tok/s wall, {n_tokens / scan_cpu / 1e6:.2f} M tok/s CPU  (goal >= 1 M tok/s)")
    print(f"heap per latent, slot by slot:   {base_rows / base_s / 1e6:.3f} M tok/s on the first {base_rows:,} rows  "
          f"(x{(n_tokens / scan_s) / (base_rows / base_s):.0f})")
    print(f"decode {int((stats.key_LN >= 0).sum()):,} contexts of 2x8+1 tokens: {decode_s:.2f} s wall, {decode_cpu:.2f} s CPU")


if __name__ == "__main__":
    main()
