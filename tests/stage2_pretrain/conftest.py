"""Stage-2 fixtures: synthetic target shards over the shared ``token_store`` (no stage 1 needed).

Labels are random latent ids below ``N_LATENTS`` with about a fifth of the slots set to
``ignore_id``; the meta follows the contract stage 1 writes (teacher, tokenizer, SAE, ...).
Extraction windows of 128 tokens (the ``tiny`` preset's context) in shards of 2 windows make
shifted training windows cross shard boundaries; ``offsets`` adds label sets of shifted windows.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

N_LATENTS = 96
K_ATTR = 4


def write_targets(store_path: Path, out: Path, *, n_latents: int = N_LATENTS, k_attr: int = K_ATTR, window: int = 128,
                  windows_per_shard: int = 2, offsets: list[int] | None = None, seed: int = 0, ignore_frac: float = 0.2,
                  meta_update: dict | None = None, kd_samples: int = 0, hidden_dim: int = 0) -> Path:
    """Fill a target folder for every split of the store with seeded random labels (and, when asked,
    random ``kd_ids`` below the vocabulary and random float16 ``hidden`` states)."""
    from cocomix.storage.target_schema import extra_column
    from cocomix.storage.targets import TargetWriter, id_dtype, ignore_id, plan_shards
    from cocomix.storage.token_store import TokenStore

    store = TokenStore.open(store_path)
    ids_dt = id_dtype(n_latents)
    meta = {
        "teacher": {"id": "synthetic", "sha256": "0" * 64},
        "tokenizer_sha256": store.tokenizer_sha256,
        "vocab_size": store.vocab_size,
        "sae": {"source": "synthetic", "sha256": "1" * 64, "n_latents": n_latents, "k": 8, "layer": 1,
                "location": "resid_post", "normalize": True},
        "selection": "attribution", "attribution_input": "latents", "k_attr": k_attr, "window": window,
        "tokens": store.provenance(),
        **({"offsets": {"rule": "given", "seed": 0, "count": len(offsets), "values": offsets}} if offsets else {}),
        **(meta_update or {}),
    }
    plan = plan_shards({s: len(store.split(s)) for s in store.splits}, window, windows_per_shard, offsets or [0])
    extra = {}
    if kd_samples:
        extra["kd_ids"] = extra_column(store.dtype, kd_samples, samples=kd_samples, rule="synthetic")
    if hidden_dim:
        extra["hidden"] = extra_column(np.float16, hidden_dim, layer=1)
    rng = np.random.default_rng(seed)
    with TargetWriter(out, meta=meta, plan=plan, k_attr=k_attr, id_dtype=ids_dt, score_dtype=np.float32,
                      token_dtype=store.dtype, extra_columns=extra) as writer:
        for spec in writer.pending():
            n = spec.end - spec.start
            ids_NK = rng.integers(0, n_latents, size=(n, k_attr)).astype(ids_dt)
            ids_NK[rng.random((n, k_attr)) < ignore_frac] = ignore_id(ids_dt)
            scores_NK = rng.random((n, k_attr)).astype(np.float32)
            columns = {}
            if kd_samples:
                columns["kd_ids"] = rng.integers(0, store.vocab_size, size=(n, kd_samples))
            if hidden_dim:
                columns["hidden"] = rng.standard_normal((n, hidden_dim)).astype(np.float16)
            writer.write_shard(spec, store.split(spec.split).read(spec.start, spec.end), ids_NK, scores_NK, columns)
        writer.finalize()
    return out


@pytest.fixture(scope="session")
def targets_dir(tmp_path_factory, token_store) -> Path:
    return write_targets(token_store, tmp_path_factory.mktemp("targets") / "targets")


@pytest.fixture(scope="session")
def full_targets_dir(tmp_path_factory, token_store) -> Path:
    """Targets with every column: labels, 5 KD samples per position, 24-wide teacher hidden states."""
    return write_targets(token_store, tmp_path_factory.mktemp("targets_full") / "targets", kd_samples=5, hidden_dim=24)


@pytest.fixture(scope="session")
def make_targets():
    """``write_targets`` for tests that need a variant (test modules cannot import a conftest)."""
    return write_targets


@pytest.fixture
def nan_loss_at_call(monkeypatch):
    """``nan_loss_at_call(n)``: the n-th forward-backward of the trainer returns a NaN next-token loss."""
    from cocomix.stage2_pretrain import train as train_mod

    def install(n: int) -> None:
        real, calls = train_mod.forward_backward, []

        def poisoned(run, batch):
            parts = real(run, batch)
            calls.append(1)
            return {**parts, "ntp_loss": parts["ntp_loss"] * float("nan")} if len(calls) == n else parts

        monkeypatch.setattr(train_mod, "forward_backward", poisoned)
    return install


@pytest.fixture(autouse=True)
def one_torch_thread():
    """Tiny shapes gain nothing from threads, and on a shared 2-core machine OpenMP threads that
    spin against other processes make steps 3-4x slower; restored after each test."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
