"""Windows and labels agree: every training window stage 2 feeds carries the labels a fresh
extraction of exactly that window gives (tiny teacher + SAE, several epochs and offsets).

The labels of a token depend on its whole window (the gradient is of the window's mean loss and
the teacher's context starts at the window start), so this fails if stage 2 shifted a window
without reading the label set extracted for that shift, or if stage 1 cut a set's windows anywhere
else than at ``r + i*T``.
"""
from __future__ import annotations

import numpy as np
import pytest

from cocomix.stage1_extract.attribution import AttributionSpec
from cocomix.stage1_extract.config import ExtractConfig
from cocomix.stage1_extract.extract import run_extract
from cocomix.stage1_extract.sae.io import load_sae
from cocomix.stage1_extract.shard_labels import label_shard
from cocomix.stage1_extract.teacher import load_teacher
from cocomix.stage2_pretrain.data import DataState, TargetSource, TrainStream
from cocomix.storage.targets import TargetReader

T, LAYER, K_ATTR = 64, 1, 4
SPLIT = "val"  # the small split keeps the test fast; stage 2 reads it exactly as it reads `train`


@pytest.fixture(scope="module")
def three_sets(tmp_path_factory, token_store, teacher_dir, openai_sae_file):
    out = tmp_path_factory.mktemp("sets") / "t"
    run_extract(ExtractConfig(tokens=str(token_store), teacher=str(teacher_dir), sae=str(openai_sae_file), layer=LAYER,
                              out=str(out), window=T, offsets=3, windows_per_shard=3, batch_size=1, splits=SPLIT,
                              device="cpu"))
    return TargetReader.open(out, verify=True)


@pytest.fixture(scope="module")
def fresh(teacher_dir, openai_sae_file):
    """Labels of one window, extracted on its own."""
    teacher = load_teacher(str(teacher_dir), "cpu")
    sae, _ = load_sae(str(openai_sae_file))
    spec = AttributionSpec(layer=LAYER, k_attr=K_ATTR, ignore_id=np.iinfo(np.uint16).max)

    def labels(tokens: np.ndarray) -> np.ndarray:
        return label_shard(teacher, sae.eval().requires_grad_(False), tokens, split=SPLIT, start=0, window=len(tokens),
                           batch_size=1, spec=spec, id_dtype=np.uint16, score_dtype=np.float32).ids_NK
    return labels


def test_extract_offsets_records_a_spread_seeded_set(three_sets):
    record = three_sets.meta["offsets"]
    assert record["rule"] == "stratified" and record["seed"] == 0 and record["count"] == 3
    r = three_sets.offsets
    assert r[0] == 0 and T // 3 <= r[1] < 2 * T // 3 <= r[2] < T
    paths = {e["path"].split("/")[0] for e in three_sets.manifest["shards"]}
    assert paths == {SPLIT, f"offset-{r[1]}", f"offset-{r[2]}"}  # offset 0 where shards always were


def test_every_training_window_carries_the_labels_of_its_own_extraction(three_sets, fresh):
    stream = TrainStream(TargetSource(three_sets, SPLIT), context=T, micro=4, accum=1, world=1, rank=0, seed=7,
                         offsets=three_sets.offsets)
    state, checked = DataState(), {}
    while state.epoch < 4:  # epochs 0-2 take the three offsets, epoch 3 starts a new cycle
        starts, _ = stream.order.take(state, 4)
        batch = stream.next_step(state)
        mb = batch.micro_batches[0]
        for i, s in enumerate(starts.tolist()):
            want = fresh(mb.input_ids[i].numpy().astype(np.uint16))
            np.testing.assert_array_equal(mb.concept_ids[i].numpy(), want.astype(np.int64), err_msg=f"window at {s}")
            checked[s % T] = checked.get(s % T, 0) + 1
        state = batch.state
    assert sorted(checked) == three_sets.offsets and min(checked.values()) >= 8


def test_free_windows_read_labels_of_other_windows(three_sets, fresh):
    """The ablation --label-windows free: shifted windows read offset-0 labels, which differ from their own."""
    stream = TrainStream(TargetSource(three_sets, SPLIT, aligned=False), context=T, micro=4, accum=1, world=1, rank=0,
                         seed=1)
    epoch = next(e for e in range(10) if stream.order.offset(e) % T)
    starts = stream.order.starts(epoch)[:8]
    state = DataState(epoch, 0, stream.order.offset(epoch))
    differ = 0
    for j in range(2):
        batch = stream.next_step(state)
        for i in range(4):
            got = batch.micro_batches[0].concept_ids[i].numpy()
            differ += int((got != fresh(batch.micro_batches[0].input_ids[i].numpy().astype(np.uint16))).any())
        state = batch.state
    assert len(starts) == 8 and differ > 0
