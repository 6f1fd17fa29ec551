"""Window offsets of a target folder: which label sets it holds, and the rule that chose them.

Stage 1 labels a split cut into windows ``[r + i*T, r + (i+1)*T)`` for each offset ``r`` of
the folder's set; stage 2 trains on exactly those windows and reads the labels of their
offset, so every label it sees was computed on the window the student is trained on.

``r_0 = 0`` always. With ``N`` offsets, offset ``j >= 1`` is drawn (seeded) from the j-th of
``N`` equal strata of ``[0, T)``: spread over the window, distinct, reproducible. A folder
with one offset (and every folder written before offsets existed) records nothing: its
single set is offset 0, stored where shards always were (``<split>/shard-NNNNN.arrow``);
set ``r > 0`` lives in ``offset-<r>/<split>/shard-NNNNN.arrow``.

What a set ``r > 0`` covers of a split of ``n`` tokens: rows ``[r, n)`` (the first ``r``
tokens belong to no window of that offset; set 0 labels them), cut into full windows and,
as for offset 0, a shorter last window of the remaining ``(n - r) % T`` tokens, labelled on
its own. Stage 2 trains only on full windows.
"""
from __future__ import annotations

import numpy as np

from cocomix.core.errors import ConfigError

RULE = "stratified"


def spread_offsets(n: int, window: int, seed: int) -> list[int]:
    """``[0, r_1, ..., r_{n-1}]``: r_j uniform (seeded) in ``[j*T // n, (j+1)*T // n)``, so all distinct."""
    if n < 1:
        raise ConfigError(f"--offsets must be >= 1, got {n}")
    if n > window:
        raise ConfigError(f"--offsets {n} exceeds --window {window}: a window has only {window} distinct offsets")
    rng = np.random.default_rng([seed, n, window])
    offsets = [0]
    for j in range(1, n):
        lo, hi = j * window // n, (j + 1) * window // n
        offsets.append(int(rng.integers(lo, hi)))
    return offsets


def offsets_record(n: int, window: int, seed: int) -> dict | None:
    """What the folder's meta records (None for the single offset-0 set, as before offsets existed)."""
    if n == 1:
        return None
    return {"rule": RULE, "seed": seed, "count": n, "values": spread_offsets(n, window, seed)}


def folder_offsets(meta: dict) -> list[int]:
    """The offsets a target folder's meta lists; ``[0]`` when it lists none (one offset-0 set)."""
    record = meta.get("offsets") if isinstance(meta, dict) else None
    if not record:
        return [0]
    return [int(r) for r in record["values"]]


def shard_relpath(split: str, index: int, offset: int) -> str:
    """Where shard ``index`` of ``split`` in the set of ``offset`` lives inside the folder."""
    name = f"{split}/shard-{index:05d}.arrow"
    return name if offset == 0 else f"offset-{offset}/{name}"
