"""``run_extract`` end to end on the tiny teacher: fidelity, resume, bad inputs, concurrency."""
from __future__ import annotations

import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from cocomix.core.errors import CocomixError, ConfigError, MismatchError
from cocomix.pipeline.chain import run_extract_chain
from cocomix.stage1_extract.config import ExtractConfig
from cocomix.stage1_extract.extract import run_extract
from cocomix.stage1_extract.teacher import load_teacher
from cocomix.storage.targets import TargetReader, TargetWriter
from cocomix.storage.token_store import TokenStore

WINDOW = 32
LAYER = 1


def config(token_store, teacher_dir, sae, out, **kw) -> ExtractConfig:
    base = dict(tokens=str(token_store), teacher=str(teacher_dir), sae=str(sae), layer=LAYER, out=str(out),
                window=WINDOW, windows_per_shard=4, batch_size=3, device="cpu")
    return ExtractConfig(**{**base, **kw})


def shard_bytes(out: Path) -> dict[str, bytes]:
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.glob("*/shard-*.arrow"))}


@pytest.fixture(scope="module")
def val_targets(tmp_path_factory, token_store, teacher_dir, openai_sae_file):
    """The val split labelled once (shared by the read-only tests)."""
    out = tmp_path_factory.mktemp("targets") / "val"
    result = run_extract(config(token_store, teacher_dir, openai_sae_file, out, splits="val"))
    return out, result


def test_extract_labels_equal_official_formula(val_targets, teacher_dir, openai_sae_state, token_store):
    """Every window of the shards: positive-score slots equal the official formula on that window; others ignore_id."""
    from test_attribution import official_encode, official_grad  # the plain reference lives there

    out, result = val_targets
    reader = TargetReader.open(out, verify=True)
    assert result.shards_total == result.shards_computed == len(reader.manifest["shards"])
    model = load_teacher(str(teacher_dir)).model
    split = TokenStore.open(token_store).split("val")
    n = reader.split_length("val")
    assert n == len(split)
    starts = list(range(0, n, WINDOW))
    for start in starts[:3] + starts[-1:]:  # the last window is shorter
        stop = min(start + WINDOW, n)
        got = reader.window("val", start, stop)
        ids = torch.from_numpy(split.read(start, stop).astype(np.int64))[None]
        assert np.array_equal(got.tokens, ids[0].numpy())
        x, g = official_grad(model, ids, LAYER)
        latents, _ = official_encode(openai_sae_state, x)
        vals, idx = torch.topk((g @ openai_sae_state["decoder.weight"]) * latents, 4, dim=-1)
        valid = (vals[0] > 0).numpy()
        assert np.array_equal(got.concept_ids[valid], idx[0].numpy()[valid])
        assert (got.concept_ids[~valid] == reader.ignore_id).all()
        np.testing.assert_allclose(got.concept_scores[valid], vals[0].numpy()[valid], rtol=1e-4, atol=1e-7)


def test_manifest_records_provenance_and_stats(val_targets, teacher_dir):
    out, result = val_targets
    reader = TargetReader.open(out)
    meta = reader.meta
    assert meta["teacher"]["sha256"] and meta["sae"]["n_latents"] == 256 and meta["sae"]["layer"] == LAYER
    assert meta["selection"] == "attribution" and meta["k_attr"] == 4 and meta["window"] == WINDOW
    assert meta["tokens"]["tokenizer_sha256"] == meta["tokenizer_sha256"]
    extra = reader.manifest["extra"]
    assert extra["coverage"]["tokens"] == reader.split_length("val")
    assert 0.5 < extra["coverage"]["tokens_with_label"] <= 1.0
    assert extra["tokens_per_s"] > 0 and extra["peak_memory_bytes"] > 0
    assert result.stats["coverage"] == extra["coverage"]


def test_rerun_is_a_verified_no_op(val_targets, token_store, teacher_dir, openai_sae_file):
    out, _ = val_targets
    before = shard_bytes(out)
    result = run_extract(config(token_store, teacher_dir, openai_sae_file, out, splits="val"))
    assert result.shards_computed == 0 and shard_bytes(out) == before


def test_tampered_shard_is_recomputed_identically(tmp_path, val_targets, token_store, teacher_dir, openai_sae_file):
    import shutil

    src, _ = val_targets
    out = tmp_path / "copy"
    shutil.copytree(src, out)
    victim = out / "val" / "shard-00001.arrow"
    good = victim.read_bytes()
    victim.write_bytes(good[:-7] + b"garbage")
    result = run_extract(config(token_store, teacher_dir, openai_sae_file, out, splits="val"))
    assert result.shards_computed == 1 and victim.read_bytes() == good
    # coverage counts the recomputed shard and reads the verified ones: same as the uninterrupted run
    assert result.stats["coverage"] == TargetReader.open(src).manifest["extra"]["coverage"]


@pytest.mark.parametrize("flags", [dict(selection="activation"), dict(attribution_input="pre")])
def test_ablation_modes_match_attribution_module(tmp_path, token_store, teacher_dir, openai_sae_file, flags):
    """The flags reach the labeller: shards equal ``label_batch`` with the same spec on each window."""
    from cocomix.stage1_extract.attribution import AttributionSpec, label_batch
    from cocomix.stage1_extract.sae.io import load_sae

    out = tmp_path / "t"
    run_extract(config(token_store, teacher_dir, openai_sae_file, out, splits="val", **flags))
    reader = TargetReader.open(out)
    teacher, (sae, _) = load_teacher(str(teacher_dir)), load_sae(str(openai_sae_file))
    spec = AttributionSpec(layer=LAYER, ignore_id=reader.ignore_id, **flags)
    got = reader.window("val", WINDOW, 2 * WINDOW)
    ref = label_batch(teacher, sae, torch.from_numpy(got.tokens.astype(np.int64))[None], spec)
    assert np.array_equal(got.concept_ids, ref.ids_BTK[0].numpy())


def test_other_layer_refused_unless_overwrite(tmp_path, token_store, teacher_dir, openai_sae_file):
    out = tmp_path / "t"
    run_extract(config(token_store, teacher_dir, openai_sae_file, out, splits="val"))
    with pytest.raises(MismatchError, match="--overwrite"):
        run_extract(config(token_store, teacher_dir, openai_sae_file, out, splits="val", layer=0))
    result = run_extract(config(token_store, teacher_dir, openai_sae_file, out, splits="val", layer=0, overwrite=True))
    assert TargetReader.open(out).meta["sae"]["layer"] == 0 and result.shards_computed == result.shards_total


def test_layer_out_of_range(tmp_path, token_store, teacher_dir, openai_sae_file):
    with pytest.raises(ConfigError, match=r"0\.\.2"):
        run_extract(config(token_store, teacher_dir, openai_sae_file, tmp_path / "t", layer=3))


def test_more_labels_than_active_latents_is_refused(tmp_path, token_store, teacher_dir, openai_sae_file, openai_sae_state):
    k = openai_sae_state["activation_state_dict"]["k"]
    with pytest.raises(ConfigError, match=f"--k-attr {k + 1} exceeds the {k} latents"):
        run_extract(config(token_store, teacher_dir, openai_sae_file, tmp_path / "t", k_attr=k + 1))
    assert not (tmp_path / "t").exists()


def test_sae_width_mismatch(tmp_path, token_store, teacher_dir, sae_factories):
    sae = sae_factories.write_openai(sae_factories.make_state(16, 64, 4), tmp_path / "narrow.pt")
    with pytest.raises(MismatchError, match="16"):
        run_extract(config(token_store, teacher_dir, sae, tmp_path / "t"))


def test_tokenizer_mismatch(tmp_path, token_store, tokenizer_dir, corpus_dir, openai_sae_file):
    """A teacher with another tokenizer than the store's is refused, naming both."""
    top = _top_conftest()
    other_tok = top.train_tokenizer(top.make_docs(seed=5)[::-1], 300, tmp_path / "tok")
    other_teacher = top.make_gpt2(other_tok, tmp_path / "teacher")
    with pytest.raises(MismatchError, match="tokenizer"):
        run_extract(config(token_store, other_teacher, openai_sae_file, tmp_path / "t"))


def _top_conftest():
    """tests/conftest.py as a module (its helpers; the name ``conftest`` is taken by this folder's)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("cocomix_tests_conftest", Path(__file__).parents[1] / "conftest.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_non_finite_stops_naming_window_and_keeps_shards(tmp_path, token_store, teacher_dir, openai_sae_file):
    """A teacher that goes NaN on one token: the run stops naming the split and window; earlier shards stay."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    split = TokenStore.open(token_store).split("val")
    toks = split.read(0, len(split))
    first_shard = set(toks[: 4 * WINDOW].tolist())
    bad_token = [t for t in toks[8 * WINDOW:].tolist() if t not in first_shard][0]
    bad_window = toks.tolist().index(bad_token) // WINDOW  # its first window, after shard 0
    model = AutoModelForCausalLM.from_pretrained(teacher_dir)
    model.config.tie_word_embeddings = False
    model.lm_head.weight = torch.nn.Parameter(model.lm_head.weight.detach().clone())
    with torch.no_grad():
        model.transformer.wte.weight[bad_token] = float("nan")
    bad_dir = tmp_path / "bad_teacher"
    model.save_pretrained(bad_dir)
    AutoTokenizer.from_pretrained(teacher_dir).save_pretrained(bad_dir)
    out = tmp_path / "t"
    with pytest.raises(CocomixError, match=rf"split 'val', window {bad_window}\b"):
        run_extract(config(token_store, bad_dir, openai_sae_file, out, splits="val", batch_size=1))
    reader_plan = _plan(__import__("json").loads((out / "plan.json").read_text()))
    done = [s for s in reader_plan if (out / s.relpath).is_file()]
    assert [s.index for s in done] == list(range(bad_window // 4))  # every shard before the bad one is kept
    assert not (out / "manifest.json").exists()


def test_second_writer_never_takes_a_claimed_shard(tmp_path, val_targets, token_store, teacher_dir, openai_sae_file):
    """While another process holds shard 2, extract writes every other shard, waits, then takes it over when freed."""
    import json

    ref_out, _ = val_targets
    out = tmp_path / "t"
    cfg = config(token_store, teacher_dir, openai_sae_file, out, splits="val")
    result: dict = {}
    thread = threading.Thread(target=lambda: result.update(r=run_extract(cfg)))
    # create the folder the way extract will, then hold shard 2 like a second process would
    record = json.loads((ref_out / "plan.json").read_text())
    other = TargetWriter(out, meta=record["meta"], plan=_plan(record), k_attr=4, id_dtype=np.uint16,
                         score_dtype=np.float32, token_dtype=record["dtypes"]["token"])
    held = [s for s in other.plan if s.index == 2][0]
    assert other.claim(held)
    thread.start()
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not all(other.is_done(s) for s in other.plan if s != held):
        time.sleep(0.05)
    assert all(other.is_done(s) for s in other.plan if s != held)
    time.sleep(0.5)
    assert not (out / held.relpath).exists() and "r" not in result  # waiting, not writing our shard
    other._release(held)
    thread.join(120)
    assert result["r"].shards_computed == result["r"].shards_total
    assert shard_bytes(out) == shard_bytes(ref_out)


def _plan(record: dict):
    from cocomix.storage.targets import ShardSpec

    return [ShardSpec(s["split"], s["index"], s["start"], s["end"]) for s in record["shards"]]


def test_corpus_without_tokens_tokenizes_with_teacher_tokenizer(tmp_path, corpus_dir, teacher_dir, openai_sae_file):
    ws = tmp_path / "ws"
    cfg = ExtractConfig(corpus=str(corpus_dir), teacher=str(teacher_dir), sae=str(openai_sae_file), layer=LAYER,
                        window=128, windows_per_shard=64, batch_size=8, workspace=str(ws), device="cpu")
    with pytest.raises(ConfigError, match="--tokens"):
        run_extract(cfg)  # the chain (tokenize, then extract) is the CLI's, in pipeline/
    result = run_extract_chain(cfg)
    assert result.tokens.parent == ws / "tokens" and result.out.parent == ws / "targets"
    store = TokenStore.open(result.tokens)
    reader = TargetReader.open(result.out, verify=True)
    reader.check_tokens(store.provenance())
    assert reader.split_length("train") == len(store.split("train")) > 0  # (60 docs: the default val share is empty)


def test_sae_from_another_hook_is_refused(tmp_path, token_store, teacher_dir, sae_factories):
    """An SAE whose file names another layer or another hook point is refused, saying what to pass."""
    state = sae_factories.make_state(32, 64, 4)
    other_layer = sae_factories.write_openai(state, tmp_path / "resid_post_mlp_v5_32k" / "autoencoders" / "2.pt")
    with pytest.raises(MismatchError, match="--layer 2"):
        run_extract(config(token_store, teacher_dir, other_layer, tmp_path / "t"))
    attn = sae_factories.write_openai(state, tmp_path / "resid_delta_attn_v5_32k" / "autoencoders" / "1.pt")
    with pytest.raises(MismatchError, match="resid_delta_attn"):
        run_extract(config(token_store, teacher_dir, attn, tmp_path / "t"))


def test_window_longer_than_teacher_context(tmp_path, token_store, teacher_dir, openai_sae_file):
    with pytest.raises(ConfigError, match="--window 512 exceeds .*256 positions"):
        run_extract(config(token_store, teacher_dir, openai_sae_file, tmp_path / "t", window=512))
    assert not (tmp_path / "t").exists()  # refused before anything is written


@pytest.mark.parametrize("flags, name", [(dict(dtype="fp8"), "--dtype"), (dict(batch_size=0), "--batch-size"),
                                         (dict(device="tpu"), "--device"), (dict(splits=" , "), "--splits"),
                                         (dict(offsets=0), "--offsets"), (dict(offsets=33, window=32), "--offsets")])
def test_bad_flags_name_the_flag(tmp_path, flags, name):
    with pytest.raises(ConfigError, match=name):
        ExtractConfig(tokens="x", **flags)


def test_float16_scores(tmp_path, val_targets, token_store, teacher_dir, openai_sae_file):
    """--score-dtype float16 stores half-precision scores; the labels are the float32 run's."""
    out = tmp_path / "t"
    run_extract(config(token_store, teacher_dir, openai_sae_file, out, splits="val", score_dtype="float16"))
    half, full = TargetReader.open(out).window("val", 0, 64), TargetReader.open(val_targets[0]).window("val", 0, 64)
    assert half.concept_scores.dtype == np.float16
    assert np.array_equal(half.concept_ids, full.concept_ids)
    np.testing.assert_allclose(half.concept_scores, full.concept_scores, rtol=1e-2, atol=1e-4)


def test_another_offset_count_is_refused_unless_overwrite(tmp_path, val_targets, token_store, teacher_dir, openai_sae_file):
    """A finished one-set folder (as every folder made before offsets existed) reads as offset 0; asking it for
    more offsets is another set of labels: refused naming the difference, unless --overwrite."""
    import shutil

    out = tmp_path / "t"
    shutil.copytree(val_targets[0], out)
    assert TargetReader.open(out).offsets == [0] and "offsets" not in TargetReader.open(out).meta
    with pytest.raises(MismatchError, match="offsets"):
        run_extract(config(token_store, teacher_dir, openai_sae_file, out, splits="val", offsets=2))
