"""The README's main job, shrunken: the whole chain runs offline end to end and leaves every artifact."""
from __future__ import annotations

import json
import math

from cocomix.pipeline.quickstart import QuickstartConfig, run_quickstart, stdlib_corpus


def test_stdlib_corpus_is_deterministic(tmp_path):
    a = stdlib_corpus(tmp_path / "a", 50_000)
    b = stdlib_corpus(tmp_path / "b", 50_000)
    names = sorted(p.name for p in a.glob("*.txt"))
    assert names and names == sorted(p.name for p in b.glob("*.txt"))
    assert all((a / n).read_bytes() == (b / n).read_bytes() for n in names)


def test_quickstart_end_to_end(tmp_path):
    cfg = QuickstartConfig(workspace=str(tmp_path), corpus_mb=0.15, vocab_size=400, teacher_steps=4,
                           student_steps=4, sae_latents=64, sae_k=8, sae_tokens=4096, offsets=2)
    result = run_quickstart(cfg)
    root = tmp_path / "quickstart"
    assert (root / "targets" / "manifest.json").exists()
    from cocomix.storage.targets import TargetReader

    assert len(TargetReader.open(root / "targets").offsets) == cfg.offsets == 2  # one label set per window offset
    assert json.loads((result.paths["cocomix"] / "run.json").read_text())["config"]["label_windows"] == "aligned"
    assert (root / "sae" / "cfg.json").exists()
    assert (root / "teacher" / "final" / "config.json").exists()
    for method in ("cocomix", "ntp"):
        assert math.isfinite(result.val_ppl[method]) and result.val_ppl[method] > 1
        assert json.loads((result.paths[method] / "final" / "eval.json").read_text())["val_ppl"] == result.val_ppl[method]
    # the teacher is wider than both students, and its perplexity is reported beside theirs
    teacher_cfg = json.loads((root / "teacher" / "final" / "config.json").read_text())
    assert teacher_cfg["n_embd"] == cfg.teacher_width == 128
    assert math.isfinite(result.val_ppl["teacher"]) and result.active_params["teacher"] > 2 * result.active_params["ntp"]
    # matched active parameters: the NTP width is chosen for this vocabulary and SAE
    ratio = result.active_params["ntp"] / result.active_params["cocomix"]
    assert abs(ratio - 1) < 0.05, result.active_params
    # a second run finds every step finished and redoes nothing
    again = run_quickstart(cfg)
    assert again.val_ppl == result.val_ppl
    # a student interrupted before its first checkpoint (folder left, no checkpoint) is started over
    import shutil

    shutil.rmtree(result.paths["ntp"] / "checkpoints")
    shutil.rmtree(result.paths["ntp"] / "final")
    third = run_quickstart(cfg)
    assert third.val_ppl["ntp"] == result.val_ppl["ntp"]  # same seed, same data: the same model again
