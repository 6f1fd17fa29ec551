"""``concepts describe``: the streaming top-N pass equals a brute-force scan; the table round-trips."""
from __future__ import annotations

import json

import numpy as np
import pytest

from cocomix.core.errors import CocomixError, MismatchError
from cocomix.stage2_pretrain.concepts_config import DescribeConfig
from cocomix.stage2_pretrain.concepts_describe import (
    SPLIT_SHIFT,
    TopContexts,
    load_describe,
    run_describe,
    scan_targets,
)
from cocomix.storage.target_reader import TargetReader


def brute_force(reader: TargetReader, top_n: int):
    """Every valid label slot of every split, sorted per latent by (-score, position)."""
    L = reader.n_latents
    freq, top1 = np.zeros(L, np.int64), np.zeros(L, np.int64)
    per_latent: list[list[tuple[float, int]]] = [[] for _ in range(L)]
    for s, split in enumerate(reader.splits):
        w = reader.window(split, 0, reader.split_length(split))
        for pos in range(len(w.tokens)):
            for slot, (i, score) in enumerate(zip(w.concept_ids[pos], w.concept_scores[pos])):
                if i == reader.ignore_id:
                    continue
                freq[i] += 1
                top1[i] += slot == 0
                per_latent[i].append((float(score), (s << SPLIT_SHIFT) + pos))
    best = [sorted(c, key=lambda sk: (-sk[0], sk[1]))[:top_n] for c in per_latent]
    return freq, top1, best


def kept(stats, latent):
    return [(float(s), int(k)) for s, k in zip(stats.score_LN[latent], stats.key_LN[latent]) if k >= 0]


@pytest.mark.parametrize("chunk_rows", [37, 1 << 18])
def test_streaming_pass_equals_brute_force(targets_dir, chunk_rows):
    reader = TargetReader.open(targets_dir)
    stats = scan_targets(reader, top_n=5, chunk_rows=chunk_rows)
    freq, top1, best = brute_force(reader, 5)
    np.testing.assert_array_equal(stats.frequency_L, freq)
    np.testing.assert_array_equal(stats.top1_L, top1)
    assert stats.rows == sum(reader.split_length(s) for s in reader.splits)
    for latent in range(reader.n_latents):
        assert kept(stats, latent) == best[latent], latent


def test_ties_go_to_the_earlier_position_across_chunks():
    """Scores from a few values, many ties: chunked merges keep exactly the brute-force winners."""
    rng = np.random.default_rng(3)
    L, N, rows, K = 7, 4, 500, 3
    ids = np.stack([rng.permutation(L + 2)[:K] for _ in range(rows)]).astype(np.uint16)
    ids[ids >= L] = np.iinfo(np.uint16).max  # some ignored slots
    scores = rng.integers(0, 5, size=(rows, K)).astype(np.float16)
    top = TopContexts(L, N)
    for a in range(0, rows, 64):
        top.update(ids[a:a + 64], scores[a:a + 64], a)
    stats = top.result()
    for latent in range(L):
        r, k = np.nonzero(ids == latent)
        want = sorted(zip(scores[r, k].astype(float), r), key=lambda sk: (-sk[0], sk[1]))[:N]
        assert kept(stats, latent) == [(s, int(p)) for s, p in want]
        assert stats.frequency_L[latent] == len(r) and stats.top1_L[latent] == (ids[:, 0] == latent).sum()


def test_describe_writes_a_table_with_decoded_contexts(tmp_path, targets_dir, token_store):
    from cocomix.storage.token_store import TokenStore

    res = run_describe(DescribeConfig(targets=str(targets_dir), tokens=str(token_store), out=str(tmp_path / "d"), top_n=3, context=2))
    d = load_describe(tmp_path / "d")
    reader = TargetReader.open(targets_dir)
    freq, top1, best = brute_force(reader, 3)
    assert d.table.column("frequency").to_pylist() == freq.tolist() and res.rows == d.info["rows"]
    assert d.table.column("top1_frequency").to_pylist() == top1.tolist()
    tok = TokenStore.open(token_store).load_tokenizer()
    latent = int(np.argmax(freq))
    row = d.rows([latent])[latent]
    assert [e["score"] for e in row["examples"]] == pytest.approx([s for s, _ in best[latent]])
    for ex, (_, key) in zip(row["examples"], best[latent]):
        pos = key & ((1 << SPLIT_SHIFT) - 1)
        assert ex["token_position"] == pos and ex["split"] == reader.splits[key >> SPLIT_SHIFT]
        window = reader.window(ex["split"], max(pos - 2, 0), pos + 3).tokens.tolist()
        assert ex["left"] + ex["token"] + ex["right"] == tok.decode(window)
        assert ex["token"] == tok.decode(window[min(pos, 2):min(pos, 2) + 1])
    info = json.loads((tmp_path / "d" / "describe.json").read_text())
    assert info["targets"]["shards_sha256"] == [s["sha256"] for s in reader.manifest["shards"]]


def test_describe_without_a_token_store_says_to_pass_one(tmp_path, make_targets, token_store):
    targets = make_targets(token_store, tmp_path / "t", meta_update={"tokens": {"path": str(tmp_path / "gone")}})
    with pytest.raises(CocomixError, match="pass --tokens"):
        run_describe(DescribeConfig(targets=str(targets), out=str(tmp_path / "d")))


def test_describe_refuses_a_token_store_of_other_tokens(tmp_path, targets_dir, make_targets, token_store):
    from cocomix.storage.config import TokenizeConfig
    from cocomix.storage.tokenize import run_tokenize

    other = tmp_path / "other"
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "a.txt").write_text("another corpus entirely " * 20)
    tok_dir = TargetReader.open(targets_dir).meta["tokens"]["path"] + "/tokenizer"
    run_tokenize(TokenizeConfig(corpus=str(tmp_path / "c"), tokenizer=tok_dir, out=str(other), val_fraction=0.0))
    with pytest.raises(MismatchError):
        run_describe(DescribeConfig(targets=str(targets_dir), tokens=str(other), out=str(tmp_path / "d")))


def test_describe_cli_reports_progress_with_rate_and_eta(tmp_path, targets_dir, token_store, monkeypatch):
    from typer.testing import CliRunner

    from cocomix.pipeline.cli import app

    monkeypatch.setenv("COCOMIX_PROGRESS_EVERY", "0")
    result = CliRunner().invoke(app, ["concepts", "describe", str(targets_dir), "--tokens", str(token_store),
                                      "--out", str(tmp_path / "d"), "--top-n", "2"], terminal_width=200)
    assert result.exit_code == 0, result.output
    n = sum(TargetReader.open(targets_dir).manifest["splits"].values())
    assert f"describe  {n:,}/{n:,} tok" in result.output and "tok/s" in result.output and "ETA" in result.output
    assert load_describe(tmp_path / "d").info["top_n"] == 2
