"""Training windows: the official random-offset order, seeded, resumable, rank-sharded, labels aligned."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from cocomix.pipeline.errors import CocomixError, MismatchError
from cocomix.stage2_pretrain.data import (
    DataState, TargetSource, TokenSource, TrainStream, WindowOrder, rank_slices, val_starts,
)

N_LATENTS, K_ATTR = 96, 4  # as in conftest.py


def test_epoch_windows_are_the_official_cut():
    """Window i of an epoch covers [i*T + r, (i+1)*T + r) with r in [0, T], visited in a permutation."""
    order = WindowOrder(n_tokens=1000, context=64, seed=3)
    for epoch in range(20):
        r, starts = order.offset(epoch), order.starts(epoch)
        assert 0 <= r <= 64
        assert sorted(starts.tolist()) == [r + i * 64 for i in range((1000 - r) // 64)]
        assert starts.max() + 64 <= 1000
    offsets = {order.offset(e) for e in range(20)}
    assert len(offsets) > 5  # the offset really moves between epochs
    assert not np.array_equal(order.starts(0), order.starts(1)[: len(order.starts(0))])


def test_order_is_a_function_of_the_seed():
    a, b, c = (WindowOrder(5000, 128, s) for s in (0, 0, 1))
    assert np.array_equal(a.starts(4), b.starts(4))
    assert not np.array_equal(a.starts(0), c.starts(0))


def test_take_crosses_epochs_and_state_continues():
    order = WindowOrder(1000, 64, seed=0)
    n0 = len(order.starts(0))
    got, state = order.take(DataState(0, n0 - 3), 10)
    assert np.array_equal(got, np.concatenate([order.starts(0)[-3:], order.starts(1)[:7]]))
    assert (state.epoch, state.position, state.offset) == (1, 7, order.offset(1))
    again, _ = order.take(DataState.from_dict(state.to_dict()), 5)
    assert np.array_equal(again, order.starts(1)[7:12])


def test_rank_shards_rebuild_the_single_process_micro_batches():
    """Rank r takes every world-th window; the ranks' j-th micro-batches together = 1-process micro-batch j."""
    g = np.arange(24) * 10
    single = rank_slices(g, micro=6, world=1, rank=0)
    ranks = [rank_slices(g, micro=3, world=2, rank=r) for r in range(2)]
    for j in range(4):
        assert sorted(np.concatenate([ranks[0][j], ranks[1][j]]).tolist()) == sorted(single[j].tolist())
    assert np.array_equal(np.concatenate(ranks[1]), g[1::2])


def _stream(source, **kw):
    args = dict(context=128, micro=2, accum=2, world=1, rank=0, seed=5) | kw
    return TrainStream(source, **args)


def test_resume_from_state_sees_the_same_batches(token_store):
    from cocomix.storage.token_store import TokenStore

    source = TokenSource(TokenStore.open(token_store), "train")
    straight = [b for _, b in zip(range(14), _stream(source).steps(DataState()))]  # crosses an epoch
    state = straight[3].state
    resumed = [b for _, b in zip(range(10), _stream(source).steps(DataState.from_dict(state.to_dict())))]
    for a, b in zip(straight[4:], resumed):
        for ma, mb in zip(a.micro_batches, b.micro_batches):
            assert torch.equal(ma.input_ids, mb.input_ids)
    assert straight[-1].state.epoch >= 1


def test_labels_are_read_at_the_window_positions(token_store, targets_dir):
    """Tokens equal the store's; labels equal the shards' rows at the same positions; int64 with ignore ids."""
    from cocomix.storage.targets import TargetReader
    from cocomix.storage.token_store import TokenStore

    store, reader = TokenStore.open(token_store), TargetReader.open(targets_dir)
    stream = _stream(TargetSource(reader, "train"), micro=4, accum=1)
    batch = stream.next_step(DataState())
    starts, _ = stream.order.take(DataState(), 4)
    mb = batch.micro_batches[0]
    assert mb.input_ids.dtype == torch.int64 and mb.concept_ids.dtype == torch.int64
    assert mb.concept_ids.shape == (4, 128, K_ATTR)
    for i, s in enumerate(starts.tolist()):
        assert np.array_equal(mb.input_ids[i].numpy(), store.split("train").read(s, s + 128))
        assert np.array_equal(mb.concept_ids[i].numpy(), reader.window("train", s, s + 128).concept_ids.astype(np.int64))
    ids = mb.concept_ids
    assert (ids == reader.ignore_id).any() and ((ids < N_LATENTS) | (ids == reader.ignore_id)).all()


def test_store_tokens_equal_shard_token_column(token_store, targets_dir):
    from cocomix.storage.targets import TargetReader
    from cocomix.storage.token_store import TokenStore

    store, reader = TokenStore.open(token_store), TargetReader.open(targets_dir)
    a = _stream(TargetSource(reader, "train")).next_step(DataState())
    b = _stream(TargetSource(reader, "train", store.split("train"))).next_step(DataState())
    assert all(torch.equal(x.input_ids, y.input_ids) for x, y in zip(a.micro_batches, b.micro_batches))


def test_targets_of_another_tokenizer_are_refused(tmp_path, token_store, make_targets):
    from cocomix.stage2_pretrain.inputs import open_inputs

    bad = make_targets(token_store, tmp_path / "t", meta_update={"tokenizer_sha256": "f" * 64})
    with pytest.raises(MismatchError, match="--targets"):
        open_inputs("cocomix", str(token_store), str(bad), None)


def test_model_of_other_latents_is_refused(targets_dir):
    from types import SimpleNamespace

    from cocomix.stage2_pretrain.inputs import check_model_matches_targets
    from cocomix.storage.targets import TargetReader

    reader = TargetReader.open(targets_dir)
    check_model_matches_targets(SimpleNamespace(n_latents=N_LATENTS, k_attr=K_ATTR), reader, targets_dir, "ckpt")
    for bad in (dict(n_latents=N_LATENTS + 1, k_attr=K_ATTR), dict(n_latents=N_LATENTS, k_attr=2)):
        with pytest.raises(MismatchError, match="--targets"):
            check_model_matches_targets(SimpleNamespace(**bad), reader, targets_dir, "ckpt")


def test_ntp_needs_only_the_store(token_store):
    from cocomix.stage2_pretrain.inputs import open_inputs

    inputs = open_inputs("ntp", str(token_store), None, None)
    assert inputs.targets is None and len(inputs.store.split("train")) > 0


def test_too_short_split_is_a_clear_error():
    with pytest.raises(CocomixError, match="--size"):
        WindowOrder(100, 128, 0)


def test_val_windows_are_non_overlapping_and_cover_the_split():
    spans = val_starts(300, 128)
    assert spans == [(0, 128), (128, 256), (256, 300)]
    assert val_starts(300, 128, max_windows=2) == [(0, 128), (128, 256)]
    assert val_starts(257, 128) == [(0, 128), (128, 256)]  # a 1-token tail predicts nothing


def test_other_target_columns_are_batched_by_name_at_the_window_positions(full_targets_dir):
    """``kd_ids`` (int64) and ``hidden`` (float16) come with the tokens, read at the same rows; a source
    asked for them only carries no ``concept_ids``."""
    from cocomix.storage.targets import TargetReader

    reader = TargetReader.open(full_targets_dir)
    stream = _stream(TargetSource(reader, "train", columns=("kd_ids", "hidden")), micro=2, accum=1)
    mb = stream.next_step(DataState()).micro_batches[0]
    starts, _ = stream.order.take(DataState(), 2)
    assert mb.concept_ids is None and set(mb.extra) == {"kd_ids", "hidden"}
    assert mb.extra["kd_ids"].dtype == torch.int64 and mb.extra["kd_ids"].shape == (2, 128, 5)
    assert mb.extra["hidden"].dtype == torch.float16 and mb.extra["hidden"].shape == (2, 128, 24)
    for i, s in enumerate(starts.tolist()):
        w = reader.window("train", s, s + 128)  # 128-token windows cross the 512-token shards
        assert np.array_equal(mb.extra["kd_ids"][i].numpy(), w.extra["kd_ids"].astype(np.int64))
        assert np.array_equal(mb.extra["hidden"][i].numpy(), w.extra["hidden"])
