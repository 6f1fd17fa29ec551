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
                           student_steps=4, sae_latents=64, sae_k=8, sae_tokens=4096)
    result = run_quickstart(cfg)
    root = tmp_path / "quickstart"
    assert (root / "targets" / "manifest.json").exists()
    assert (root / "sae" / "cfg.json").exists()
    assert (root / "teacher" / "final" / "config.json").exists()
    for method in ("cocomix", "ntp"):
        assert math.isfinite(result.val_ppl[method]) and result.val_ppl[method] > 1
        assert json.loads((result.paths[method] / "final" / "eval.json").read_text())["val_ppl"] == result.val_ppl[method]
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
