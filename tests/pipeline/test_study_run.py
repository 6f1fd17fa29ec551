"""`cocomix study` end to end on tiny fixtures: the spec's extract runs first, 2 methods x 2 seeds train,
a study killed in its second run continues where it stopped, and the report is complete."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from cocomix.pipeline.study import StudyConfig, run_study

SPEC = """
[study]
name = "e2e"
seeds = [0, 1]

[inputs]
tokens = "TOKENS"

[targets.main]
path = "{study}/targets"
extract = { teacher = "TEACHER", sae = "SAE", layer = 1, window = 128, batch_size = 4, device = "cpu" }

[defaults]
size = "tiny"
max_steps = 4
batch_tokens = 256
eval_every = 2
eval_windows = 2
save_every = 2
log_every = 2

[[runs]]
name = "cocomix"
method = "cocomix"

[[runs]]
name = "ntp"
method = "ntp"
"""


@pytest.fixture
def random_sae(tmp_path, teacher_dir) -> Path:
    """A random cocomix-format TopK SAE for the 32-wide test teacher (64 latents >= tiny's k_concept of 8)."""
    import torch

    from cocomix.stage1_extract.sae.io import save_sae
    from cocomix.stage1_extract.sae.model import TopKSAE

    torch.manual_seed(0)
    sae = TopKSAE(32, 64, 8)
    with torch.no_grad():
        for p in sae.parameters():
            p.normal_(0, 0.3)
    return save_sae(sae, tmp_path / "sae", {"layer": 1, "location": "resid_post"})


@pytest.fixture(autouse=True)
def one_torch_thread():
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_study_runs_resumes_after_a_kill_and_reports(tmp_path, token_store, teacher_dir, random_sae, monkeypatch):
    import cocomix.stage2_pretrain.train as train_mod

    spec = tmp_path / "e2e.toml"
    spec.write_text(SPEC.replace("TOKENS", str(token_store)).replace("TEACHER", str(teacher_dir)).replace("SAE", str(random_sae)))
    cfg = StudyConfig(spec=str(spec), workspace=str(tmp_path / "ws"))
    out = tmp_path / "ws" / "studies" / "e2e"

    # first invocation: killed (Ctrl-C) right after the second run's step-2 checkpoint
    real_save, calls = train_mod.maybe_save, []

    def save_then_die(run, state, force):
        saved = real_save(run, state, force)
        if saved is not None and run.out.parts[-2] == "ntp" and state.step == 2:
            raise KeyboardInterrupt
        return saved

    real_pretrain = train_mod.run_pretrain

    def counting_pretrain(pcfg):
        calls.append((Path(pcfg.out).parts[-2:], pcfg.resume))
        return real_pretrain(pcfg)

    monkeypatch.setattr(train_mod, "maybe_save", save_then_die)
    monkeypatch.setattr(train_mod, "run_pretrain", counting_pretrain)
    with pytest.raises(KeyboardInterrupt):
        run_study(cfg)
    assert (out / "targets" / "manifest.json").exists()  # the spec's extract ran first
    record = json.loads((out / "study.json").read_text())
    assert {r["run"] + "/" + str(r["seed"]): r["status"] for r in record["runs"]}["ntp/0"] == "running"
    assert calls == [(("cocomix", "seed-0"), False), (("ntp", "seed-0"), False)]

    # second invocation: the finished run is skipped, the killed one resumes, the rest train
    monkeypatch.setattr(train_mod, "maybe_save", real_save)
    calls.clear()
    result = run_study(cfg)
    assert calls == [(("ntp", "seed-0"), True), (("cocomix", "seed-1"), False), (("ntp", "seed-1"), False)]
    assert result.statuses == {"cocomix/seed-0": "done", "ntp/seed-0": "trained", "cocomix/seed-1": "trained",
                               "ntp/seed-1": "trained"}

    # the report covers every run and seed, and its numbers are the run folders' own
    finals = {}
    for run in ("cocomix", "ntp"):
        for seed in (0, 1):
            metrics = [json.loads(x) for x in (out / "runs" / run / f"seed-{seed}" / "metrics.jsonl").read_text().splitlines()]
            evals = {m["step"]: m["val_ppl"] for m in metrics if m["kind"] == "eval"}
            assert sorted(evals) == [2, 4]  # the resumed run's file reads as one clean run
            finals[run, seed] = evals[4]
    record = json.loads((out / "study.json").read_text())
    assert record["seeds"] == [0, 1] and record["spec"]["study"]["name"] == "e2e"
    ntp, coco = record["results"]["ntp"], record["results"]["cocomix"]
    assert ntp["val_ppl"]["mean"] == pytest.approx((finals["ntp", 0] + finals["ntp", 1]) / 2)
    diff = coco["diff_to_baseline"]
    assert diff["n"] == 2 and diff["mean"] == pytest.approx(
        ((finals["cocomix", 0] - finals["ntp", 0]) + (finals["cocomix", 1] - finals["ntp", 1])) / 2)
    assert diff["low"] < diff["mean"] < diff["high"]
    assert [p["tokens"] for p in coco["curve"]] == [512, 1024]  # eval steps 2 and 4 x 256 tokens
    assert coco["active_params"] > 0 and coco["step_time_s"] > 0
    assert set(record["tokens_to_match"]) == {"cocomix", "ntp"}
    md = (out / "results.md").read_text()
    assert "| cocomix | cocomix | 2 |" in md and "Δ PPL vs ntp [95% CI]" in md
    assert (out / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # a third invocation trains nothing
    calls.clear()
    again = run_study(cfg)
    assert calls == [] and set(again.statuses.values()) == {"done"}


@pytest.mark.slow
def test_study_builds_on_the_quickstart_chain(tmp_path):
    """`prepare = "quickstart"` (the `mini` built-in's way to its inputs): the quickstart's tokens, teacher
    and SAE are built as a quickstart there recorded them, then the study extracts from them and trains."""
    from cocomix.pipeline.quickstart import QuickstartConfig

    ws = tmp_path / "ws"
    (ws / "quickstart").mkdir(parents=True)
    small = QuickstartConfig(workspace=str(ws), corpus_mb=0.15, vocab_size=400, teacher_width=32, teacher_steps=4,
                             sae_latents=64, sae_k=8, sae_tokens=4096)
    import dataclasses

    (ws / "quickstart" / "quickstart.json").write_text(json.dumps(dataclasses.asdict(small)))
    spec = tmp_path / "qs.toml"
    spec.write_text(SPEC.replace('tokens = "TOKENS"', 'tokens = "{quickstart}/tokens"')
                    .replace('[study]\nname = "e2e"\nseeds = [0, 1]', '[study]\nname = "e2e"\nseeds = [0]\nprepare = "quickstart"')
                    .replace('"TEACHER"', '"{quickstart}/teacher/final"').replace('"SAE"', '"{quickstart}/sae"'))
    result = run_study(StudyConfig(spec=str(spec), workspace=str(ws)))
    teacher = json.loads((ws / "quickstart" / "teacher" / "final" / "config.json").read_text())
    assert teacher["n_embd"] == 32  # the recorded quickstart settings, not the defaults
    assert set(result.statuses.values()) == {"trained"}
    assert all(s.ppl is not None for s in result.summaries)
