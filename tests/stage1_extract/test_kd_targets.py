"""KD targets (``extract --kd-samples``) and teacher hidden states (``extract --store-hidden``).

The sampled ids must be draws from the teacher's own next-token softmax, so that
``-(1/N) sum_n log q(id_n)`` has, in expectation, the gradient of the full KL(p_T || q); they
must not change a single label, and they must be a pure function of the position.
"""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from cocomix.core.errors import ConfigError
from cocomix.stage1_extract.attribution import AttributionSpec, label_batch
from cocomix.stage1_extract.config import ExtractConfig
from cocomix.stage1_extract.extract import run_extract
from cocomix.stage1_extract.kd_samples import batch_uniforms, sample_from_probs, window_uniforms
from cocomix.stage1_extract.teacher import load_teacher
from cocomix.storage.inspect import inspect_targets
from cocomix.storage.targets import TargetReader
from cocomix.storage.verify import verify_targets

WINDOW, LAYER, KD = 32, 1, 6


def config(token_store, teacher_dir, sae, out, **kw) -> ExtractConfig:
    base = dict(tokens=str(token_store), teacher=str(teacher_dir), sae=str(sae), layer=LAYER, out=str(out),
                window=WINDOW, windows_per_shard=4, batch_size=3, device="cpu", splits="val")
    return ExtractConfig(**{**base, **kw})


def shard_bytes(out) -> dict:
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.glob("*/shard-*.arrow"))}


@pytest.fixture(scope="module")
def plain(tmp_path_factory, token_store, teacher_dir, openai_sae_file):
    out = tmp_path_factory.mktemp("plain") / "t"
    run_extract(config(token_store, teacher_dir, openai_sae_file, out))
    return out


@pytest.fixture(scope="module")
def with_kd(tmp_path_factory, token_store, teacher_dir, openai_sae_file):
    out = tmp_path_factory.mktemp("kd") / "t"
    run_extract(config(token_store, teacher_dir, openai_sae_file, out, kd_samples=KD, store_hidden=True))
    return out


def test_sampled_gradient_is_unbiased_for_the_full_kl(teacher_dir, openai_sae_state):
    """Many draws of the real extract path (the teacher's head chunk) against the exact KL gradient.

    Per logit v the sampled gradient is ``q_v - f_v`` with ``f_v`` the share of the S draws that
    are v, and the KL gradient is ``q_v - p_v``; ``f_v`` is a mean of S Bernoulli(p_v) draws, so
    the difference has standard deviation ``sqrt(p_v (1 - p_v) / S)``. Tolerance: 6 of those
    (a false failure has probability below 1e-8 per logit, 1e-4 over the 12k logits checked),
    plus 1e-6 for float rounding.
    """
    from test_attribution import sae_from_state

    teacher, sae = load_teacher(str(teacher_dir)), sae_from_state(openai_sae_state)
    S = 4096
    ids_BT = torch.randint(0, teacher.model.config.vocab_size, (1, WINDOW), generator=torch.Generator().manual_seed(3))
    u_BTS = batch_uniforms("val", 0, 1, WINDOW, S)
    out = label_batch(teacher, sae, ids_BT, AttributionSpec(layer=LAYER, kd_samples=S), u_BTS)
    with torch.no_grad():
        p_TV = torch.softmax(teacher.model(ids_BT).logits[0].float(), -1)
    T, V = p_TV.shape
    z_TV = torch.randn(T, V, generator=torch.Generator().manual_seed(4), requires_grad=True)  # the student's logits
    log_q = torch.log_softmax(z_TV, -1)
    sampled = -log_q.gather(-1, out.kd_ids_BTS[0]).mean(-1).sum()
    (g_sampled,) = torch.autograd.grad(sampled, z_TV)
    kl = (p_TV * (p_TV.clamp_min(1e-30).log() - torch.log_softmax(z_TV, -1))).sum()
    (g_kl,) = torch.autograd.grad(kl, z_TV)
    sigma = (p_TV * (1 - p_TV) / S).sqrt()
    assert ((g_sampled - g_kl).abs() <= 6 * sigma + 1e-6).all()
    assert (out.kd_ids_BTS[0, -1] != out.kd_ids_BTS[0, -1, 0]).any()  # the last position is sampled too


def test_inverse_cdf_picks_the_id_whose_interval_holds_u():
    probs = torch.tensor([[0.125, 0.0, 0.625, 0.25]])  # sums exact in binary floating point
    u = torch.tensor([[0.0, 0.124, 0.125, 0.74, 0.75, 0.9999]])
    assert sample_from_probs(probs, u).tolist() == [[0, 0, 2, 2, 3, 3]]  # id 1 has no mass: never drawn
    assert sample_from_probs(probs * 3, u).tolist() == [[0, 0, 2, 2, 3, 3]]  # unnormalised rows: same ids


def test_uniforms_depend_only_on_split_and_position():
    a = batch_uniforms("train", 64, 3, 32, 5)
    assert torch.equal(a[1], torch.from_numpy(window_uniforms("train", 96, 32, 5)))
    assert not np.array_equal(window_uniforms("train", 96, 32, 5), window_uniforms("val", 96, 32, 5))
    assert not np.array_equal(window_uniforms("train", 96, 32, 5), window_uniforms("train", 128, 32, 5))


def test_kd_columns_leave_the_labels_identical(plain, with_kd):
    a, b = TargetReader.open(plain), TargetReader.open(with_kd, verify=True)
    n = a.split_length("val")
    wa, wb = a.window("val", 0, n), b.window("val", 0, n)
    assert np.array_equal(wa.concept_ids, wb.concept_ids) and np.array_equal(wa.concept_scores, wb.concept_scores)
    assert wa.extra == {} and a.extra_columns == {}  # a folder without the columns reads as before
    kd = wb.extra["kd_ids"]
    assert kd.shape == (n, KD) and kd.dtype == wb.tokens.dtype
    assert int(kd.max()) < b.meta["vocab_size"]
    # the next token is usually among the teacher's draws only by chance (random teacher), but the
    # draws must vary across positions and within a position
    assert len(np.unique(kd)) > 20 and (kd != kd[:, :1]).any(axis=1).mean() > 0.5


def test_manifest_records_the_sampling_rule_and_the_hidden_size(with_kd):
    manifest = json.loads((with_kd / "manifest.json").read_text())
    kd, hidden = manifest["extra_columns"]["kd_ids"], manifest["extra_columns"]["hidden"]
    assert kd["samples"] == kd["width"] == KD and "inverse CDF" in kd["rule"] and "crc32" in kd["rule"]
    assert hidden["dtype"] == "float16" and hidden["width"] == 32 and hidden["bytes_per_token"] == 64
    assert "bytes per token" in hidden["warning"]


def test_same_bytes_on_rerun_and_after_a_lost_shard(tmp_path, with_kd, token_store, teacher_dir, openai_sae_file):
    out = tmp_path / "copy"
    shutil.copytree(with_kd, out)
    before = shard_bytes(out)
    (out / "val" / "shard-00001.arrow").unlink()
    cfg = config(token_store, teacher_dir, openai_sae_file, out, kd_samples=KD, store_hidden=True)
    assert run_extract(cfg).shards_computed == 1 and shard_bytes(out) == before
    fresh = tmp_path / "fresh"
    run_extract(config(token_store, teacher_dir, openai_sae_file, fresh, kd_samples=KD, store_hidden=True, batch_size=1))
    assert shard_bytes(fresh) == before  # one window per batch: the same draws (seeded by position, not batch)


def test_hidden_is_the_teacher_state_at_the_sae_layer(with_kd, teacher_dir, token_store):
    reader = TargetReader.open(with_kd)
    w = reader.window("val", WINDOW, 2 * WINDOW)
    model = load_teacher(str(teacher_dir)).model
    with torch.no_grad():
        hs = model(torch.from_numpy(w.tokens.astype(np.int64))[None], output_hidden_states=True).hidden_states
    want = hs[LAYER + 1][0].to(torch.float16)
    torch.testing.assert_close(torch.from_numpy(w.extra["hidden"].copy()), want, rtol=1e-3, atol=1e-3)


def test_inspect_and_verify_know_the_columns(with_kd, plain):
    info = inspect_targets(with_kd, samples=2)
    assert set(info["extra_columns"]) == {"kd_ids", "hidden"}
    assert info["raw_bytes_per_token"] == inspect_targets(plain, samples=0)["raw_bytes_per_token"] + 2 * KD + 2 * 32
    assert all("kd_next" in s for s in info["samples"])
    assert verify_targets(with_kd).items == len(TargetReader.open(with_kd).manifest["shards"])


def test_kd_ids_outside_the_vocabulary_fail_verify(tmp_path, with_kd):
    import pyarrow as pa

    from cocomix.core.errors import IntegrityError
    from cocomix.storage.files import sha256_file

    out = tmp_path / "bad"
    shutil.copytree(with_kd, out)
    shard = out / "val" / "shard-00000.arrow"
    table = pa.ipc.open_file(str(shard)).read_all()
    kd = table.column("kd_ids").combine_chunks()
    values = kd.flatten().to_numpy().copy()
    values[0] = 60000
    col = pa.FixedSizeListArray.from_arrays(pa.array(values), type=table.schema.field("kd_ids").type)
    table = table.set_column(table.schema.get_field_index("kd_ids"), table.schema.field("kd_ids"), col)
    with pa.OSFile(str(shard), "wb") as sink, pa.ipc.new_file(sink, table.schema) as writer:
        writer.write_table(table)
    manifest = json.loads((out / "manifest.json").read_text())
    entry = next(e for e in manifest["shards"] if e["path"] == "val/shard-00000.arrow")
    entry["sha256"], entry["bytes"] = sha256_file(shard), shard.stat().st_size
    (out / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(IntegrityError, match="kd_ids"):
        verify_targets(out)


def test_negative_kd_samples_is_one_line():
    with pytest.raises(ConfigError, match="--kd-samples"):
        ExtractConfig(tokens="x", kd_samples=-1)


def test_activation_selection_samples_the_same_distribution(teacher_dir, openai_sae_state):
    """Without an attribution pass the draws come from a separate no-grad head pass: same ids."""
    from test_attribution import sae_from_state

    teacher, sae = load_teacher(str(teacher_dir)), sae_from_state(openai_sae_state)
    ids_BT = torch.randint(0, teacher.model.config.vocab_size, (2, WINDOW), generator=torch.Generator().manual_seed(5))
    u = batch_uniforms("train", 0, 2, WINDOW, KD)
    a = label_batch(teacher, sae, ids_BT, AttributionSpec(layer=LAYER, kd_samples=KD), u)
    b = label_batch(teacher, sae, ids_BT, AttributionSpec(layer=LAYER, kd_samples=KD, selection="activation"), u)
    assert (a.kd_ids_BTS == b.kd_ids_BTS).float().mean() > 0.999
    F.one_hot(a.kd_ids_BTS, teacher.model.config.vocab_size)  # valid ids


@pytest.mark.slow
def test_a_kd_student_trains_on_what_extract_wrote(tmp_path, token_store, teacher_dir, openai_sae_file):
    """The whole path: ``extract --kd-samples`` on the tiny teacher, then ``pretrain --method pause-kd`` on it."""
    from cocomix.stage2_pretrain.config import PretrainConfig
    from cocomix.stage2_pretrain.train import run_pretrain

    targets = tmp_path / "targets"
    run_extract(config(token_store, teacher_dir, openai_sae_file, targets, splits="train", window=64, windows_per_shard=8,
                       batch_size=8, kd_samples=4))
    res = run_pretrain(PretrainConfig(method="pause-kd", size="tiny", tokens=str(token_store), targets=str(targets),
                                      out=str(tmp_path / "run"), max_steps=2, batch_tokens=256, save_every=0,
                                      eval_every=0, log_every=1))
    rec = [json.loads(line) for line in (res.out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rec if r["kind"] == "train"] == [1, 2]
    assert all(r["kd_loss"] > 0 for r in rec if r["kind"] == "train")
