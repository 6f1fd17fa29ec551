"""Training windows: the official random-offset order, seeded, resumable, rank-sharded, labels aligned."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from cocomix.core.errors import CocomixError, MismatchError
from cocomix.stage2_pretrain.data import (
    DataState,
    TargetSource,
    TokenSource,
    TrainStream,
    WindowOrder,
    rank_slices,
    val_starts,
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
    got, state = order.take(DataState(0, n0 - 3, order.offset(0)), 10)
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


def test_free_windows_read_offset_0_labels_at_the_shifted_positions(token_store, targets_dir):
    """--label-windows free: tokens equal the store's; labels equal the offset-0 set's rows at the same
    positions; int64 with ignore ids."""
    from cocomix.storage.targets import TargetReader
    from cocomix.storage.token_store import TokenStore

    store, reader = TokenStore.open(token_store), TargetReader.open(targets_dir)
    stream = _stream(TargetSource(reader, "train", aligned=False), micro=4, accum=1)
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
    a = _stream(TargetSource(reader, "train"), offsets=reader.offsets).next_step(DataState())
    b = _stream(TargetSource(reader, "train", store.split("train")), offsets=reader.offsets).next_step(DataState())
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
    stream = _stream(TargetSource(reader, "train", columns=("kd_ids", "hidden")), micro=2, accum=1, offsets=reader.offsets)
    mb = stream.next_step(DataState()).micro_batches[0]
    starts, _ = stream.order.take(DataState(), 2)
    assert mb.concept_ids is None and set(mb.extra) == {"kd_ids", "hidden"}
    assert mb.extra["kd_ids"].dtype == torch.int64 and mb.extra["kd_ids"].shape == (2, 128, 5)
    assert mb.extra["hidden"].dtype == torch.float16 and mb.extra["hidden"].shape == (2, 128, 24)
    for i, s in enumerate(starts.tolist()):
        w = reader.window("train", s, s + 128)  # 128-token windows cross the 512-token shards
        assert np.array_equal(mb.extra["kd_ids"][i].numpy(), w.extra["kd_ids"].astype(np.int64))
        assert np.array_equal(mb.extra["hidden"][i].numpy(), w.extra["hidden"])


# ---- aligned label windows: every window reads the label set of its own offset ----------------

SETS = [0, 37, 101]  # window offsets with a label set (extract --offsets 3 spreads them like this)


@pytest.fixture(scope="module")
def offset_targets(tmp_path_factory, token_store, make_targets):
    return make_targets(token_store, tmp_path_factory.mktemp("offsets") / "t", offsets=SETS, seed=3)


def test_aligned_epochs_take_a_new_offset_of_the_set_each_epoch():
    order = WindowOrder(5000, 128, seed=4, offsets=SETS)
    for cycle in range(3):
        epochs = range(cycle * 3, cycle * 3 + 3)
        assert sorted(order.offset(e) for e in epochs) == SETS  # fresh windows in every epoch of a cycle
        for e in epochs:
            r = order.offset(e)
            assert sorted(order.starts(e).tolist()) == [r + i * 128 for i in range((5000 - r) // 128)]
    assert [order.offset(e) for e in range(3)] != [order.offset(e) for e in range(3, 6)] or \
        [order.offset(e) for e in range(6, 9)] != [order.offset(e) for e in range(3)]  # the permutation is redrawn
    assert {WindowOrder(5000, 128, seed=4, offsets=[0]).offset(e) for e in range(10)} == {0}  # one set: unshifted


def test_aligned_windows_read_the_label_set_of_their_offset(token_store, offset_targets):
    """Across epochs, every window [i*T + r, (i+1)*T + r) carries set r's rows (not set 0's), tokens from the store."""
    from cocomix.storage.targets import TargetReader
    from cocomix.storage.token_store import TokenStore

    store, reader = TokenStore.open(token_store), TargetReader.open(offset_targets)
    assert reader.offsets == SETS and reader.window_length == 128
    stream = _stream(TargetSource(reader, "train"), micro=4, accum=1, offsets=reader.offsets)
    state, seen = DataState(), set()
    while state.epoch < 4:
        starts, _ = stream.order.take(state, 4)
        batch = stream.next_step(state)
        mb = batch.micro_batches[0]
        for i, s in enumerate(starts.tolist()):
            r = s % 128
            seen.add(r)
            assert r in SETS
            assert np.array_equal(mb.input_ids[i].numpy(), store.split("train").read(s, s + 128))
            want = reader.window("train", s, s + 128, offset=r).concept_ids.astype(np.int64)
            assert np.array_equal(mb.concept_ids[i].numpy(), want)
            if r:
                assert not np.array_equal(want, reader.window("train", s, s + 128).concept_ids)
        state = batch.state
    assert seen == set(SETS)


def test_aligned_resume_continues_with_the_same_windows_and_labels(offset_targets):
    from cocomix.storage.targets import TargetReader

    reader = TargetReader.open(offset_targets)
    stream = _stream(TargetSource(reader, "train"), offsets=reader.offsets)
    straight = [b for _, b in zip(range(12), stream.steps(DataState()))]
    state = DataState.from_dict(straight[5].state.to_dict())
    assert state.offset == stream.order.offset(state.epoch)
    resumed = [b for _, b in zip(range(6), stream.steps(state))]
    for a, b in zip(straight[6:], resumed):
        for ma, mb in zip(a.micro_batches, b.micro_batches):
            assert torch.equal(ma.input_ids, mb.input_ids) and torch.equal(ma.concept_ids, mb.concept_ids)
    with pytest.raises(CocomixError, match="--label-windows"):  # a state from other windows is refused
        stream.order.take(DataState(state.epoch, max(state.position, 1), state.offset + 1), 1)


def test_old_single_set_folders_read_as_offset_0(targets_dir):
    from cocomix.storage.targets import TargetReader

    reader = TargetReader.open(targets_dir)
    assert "offsets" not in reader.meta and reader.offsets == [0]
    stream = _stream(TargetSource(reader, "train"), offsets=reader.offsets)
    starts, _ = stream.order.take(DataState(), 40)  # crosses epochs
    assert (starts % 128 == 0).all()
    with pytest.raises(CocomixError, match="offset 37"):
        reader.window("train", 37, 37 + 128, offset=37)


def test_targets_on_other_windows_or_unservable_offsets_are_refused(tmp_path, token_store, make_targets, offset_targets):
    from types import SimpleNamespace

    from cocomix.stage2_pretrain.inputs import check_label_windows
    from cocomix.storage.targets import TargetReader

    short = TargetReader.open(make_targets(token_store, tmp_path / "w64", window=64, windows_per_shard=4))
    for mode in ("aligned", "free"):
        with pytest.raises(MismatchError, match=r"64-token windows.*extract --window 128 --offsets"):
            check_label_windows(short, tmp_path / "w64", 128, "tiny", mode)
    check_label_windows(TargetReader.open(offset_targets), offset_targets, 128, "tiny", "aligned")
    tiny = SimpleNamespace(window_length=128, offsets=[0, 100], split_length=lambda split: 200)
    with pytest.raises(MismatchError, match=r"offsets \[100\].*--label-windows free"):
        check_label_windows(tiny, tmp_path, 128, "tiny", "aligned")
    check_label_windows(tiny, tmp_path, 128, "tiny", "free")


class _AheadSource:
    """A source that records what the stream hands its check-ahead helper and what it reads."""

    def __init__(self, n_tokens: int):
        self.n_tokens, self.handed, self.read_starts = n_tokens, [], []

    def check_ahead(self, starts, context):
        self.handed.append(np.array(starts))
        return True

    def ahead_verified(self, start):
        return False

    def read(self, start, stop):
        self.read_starts.append(start)
        return np.zeros(stop - start, np.uint16), {}


@pytest.mark.parametrize("world,rank", [(1, 0), (3, 1)])
def test_check_ahead_is_handed_exactly_the_windows_this_rank_reads_next_and_before_it_reads_them(world, rank, monkeypatch):
    from cocomix.storage import block_ahead

    monkeypatch.setattr(block_ahead, "CHUNK_WINDOWS", 40)
    source = _AheadSource(64 * 100 + 17)
    stream = _stream(source, context=64, world=world, rank=rank)
    state = DataState()
    stream.prepare(state)
    handed_before = []
    for _ in range(60):  # several epochs
        handed_before.append(sum(len(h) for h in source.handed))
        state = stream.next_step(state).state
    handed = np.concatenate(source.handed)
    read = np.array(source.read_starts)
    assert np.array_equal(handed[:len(read)], read)  # the helper's list is this rank's reading order
    per_step = 2 * 2  # micro x accum windows of this rank per step
    assert all(before >= (i + 1) * per_step for i, before in enumerate(handed_before))  # handed before read
    assert len(handed) - len(read) <= 2 * 40  # and never far ahead
    # a jump (a resume elsewhere) starts the list over from the new state
    jump = DataState(5, 8, stream.order.offset(5))
    source.handed.clear(), source.read_starts.clear()
    stream.next_step(jump)
    assert np.array_equal(np.concatenate(source.handed)[:len(source.read_starts)], source.read_starts)


def test_check_ahead_skips_epochs_whose_label_set_is_verified_already(monkeypatch):
    from cocomix.storage import block_ahead

    monkeypatch.setattr(block_ahead, "CHUNK_WINDOWS", 40)
    source = _AheadSource(64 * 100 + 17)
    source.ahead_verified = lambda start: True  # e.g. the first epoch verified every block of the only set
    stream = _stream(source, context=64)
    state = DataState()
    for _ in range(60):
        state = stream.next_step(state).state
    assert source.handed == [] and len(source.read_starts) == 240
