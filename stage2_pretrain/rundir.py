"""The run folder: refuse to mix two runs in one ``--out``, record ``run.json``, export ``final/``.

::

    <out>/run.json          config, resolved plan, parameter counts, targets' provenance
    <out>/metrics.jsonl     see :mod:`.metrics`
    <out>/checkpoints/      see :mod:`.checkpoint`
    <out>/final/            the last model as a plain HF folder (model + config + tokenizer)
"""
from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

from cocomix.core.errors import CocomixError, ConfigError
from cocomix.stage2_pretrain.checkpoint import CKPT_DIR
from cocomix.storage.files import atomic_write_json, fsync_dir
from cocomix.storage.identity import content_identity, describe_diff, differences

log = logging.getLogger(__name__)

RUN_JSON = "run.json"
FINAL = "final"
OWNED = (RUN_JSON, "metrics.jsonl", CKPT_DIR, FINAL, "trackers")  # what --overwrite deletes
TRAINING_FILES = ("optimizer.pt", "optimizer", "scheduler.pt", "rng", "trainer_state.json", "complete", "eval.json")
#: a resumed run must agree with the run.json on these (flag, key in run.json's plan)
MUST_MATCH = (("--method", "method"), ("--size", "size"), ("--batch-tokens", "batch_tokens"), ("--seed", "seed"),
              ("--lr", "lr"))


def prepare_out(out: Path, *, resume: bool, overwrite: bool) -> None:
    """Refuse a non-empty ``--out`` unless resuming or overwriting (rank 0 only)."""
    out.mkdir(parents=True, exist_ok=True)
    if resume or not any(out.iterdir()):
        return
    if not overwrite and only_leftovers(out):
        log.info("%s holds only what a failed start left (no checkpoint): starting over there", out)
        overwrite = True
    if not overwrite:
        raise CocomixError(f"--out {out} is not empty; pass --resume to continue the run there, --overwrite to start over, or another --out")
    for name in OWNED:
        target = out / name
        if target.is_dir():
            shutil.rmtree(target)
        elif target.exists():
            target.unlink()


def only_leftovers(out: Path) -> bool:
    """``out`` holds nothing but this tool's files and no complete checkpoint: a run that failed
    before its first checkpoint (a plain retry may start over there)."""
    from cocomix.stage2_pretrain.checkpoint import complete_checkpoints

    names = {p.name for p in out.iterdir()}
    return names <= set(OWNED) - {FINAL} and not complete_checkpoints(out)


def record_lr_change(out: Path, record: dict, step: int) -> None:
    """``--override-lr``: keep the earlier changes of run.json and add this one (step, old and new peak lr)."""
    path = out / RUN_JSON
    before = json.loads(path.read_text()) if path.exists() else {}
    changes = list(before.get("lr_changes") or [])
    old, new = (before.get("plan") or {}).get("lr"), record["plan"]["lr"]
    if old is not None and old != new:
        changes.append({"step": step, "from": old, "to": new})
        log.warning("--override-lr: peak learning rate %s -> %s from step %d on", old, new, step)
    record["lr_changes"] = changes


def check_resume_matches(out: Path, record: dict) -> None:
    """A resumed run keeps what its checkpoint fixed: method, size, global batch, seed, peak lr
    (the restored scheduler keeps the old one), width (the model is reloaded), and the data:
    the same tokens (by fingerprint, wherever the store now lives) and the same target shards
    (by their sha256s). ``--max-steps`` may change; the cosine then ends at the new step."""
    path = out / RUN_JSON
    if not path.exists():
        return
    before = json.loads(path.read_text())
    override_lr = bool(record["config"].get("override_lr"))  # asked for explicitly; record_lr_change keeps the history
    was = {flag: before["plan"].get(key) for flag, key in MUST_MATCH
           if before["plan"].get(key) is not None and not (key == "lr" and override_lr)}
    now = {flag: record["plan"].get(key) for flag, key in MUST_MATCH if flag in was}
    if record["config"].get("width") is not None:
        was["--width"] = before["config"].get("width") or "the preset width"
        now["--width"] = record["config"]["width"]
    was["--label-windows"] = before["config"].get("label_windows", "free")  # runs from before the flag read labels as `free`
    now["--label-windows"] = record["config"].get("label_windows")
    found = differences(was, now)
    if found:
        first = found[0]
        advice = ("drop --width (the checkpoint fixes the model)" if first.where == "--width"
                  else f"pass {first.where} {first.old}" + (" (or --override-lr to change it)" if first.where == "--lr" else ""))
        raise ConfigError(f"--resume: {describe_diff(was, now)} (in {out}); {advice} or start another --out")
    old_method, new_method = _method_flags(before), _method_flags(record)
    if old_method is not None and old_method != new_method:
        raise ConfigError(f"--resume: the method flags were {old_method} in {out} but are {new_method} now; "
                          "pass the same flags (the checkpoint fixes the model) or start another --out")
    for what, flag in (("tokens", "--tokens"), ("targets", "--targets")):
        if what == "targets" and not (record.get("method") or {}).get("columns", record["plan"]["method"] != "ntp"):
            continue  # an NTP or pause run reads no targets (they only chose its width, now fixed by the checkpoint)
        old, new = data_identity(before, what), data_identity(record, what)
        if old is not None and old != new:
            was = (before.get(what) or {}).get("path")
            raise ConfigError(f"--resume: {flag} holds other data than the run in {out} was trained on ({was}); "
                              f"pass {flag} {was} (or a copy of it) or start another --out")
    if before["plan"].get("max_steps") != record["plan"].get("max_steps"):
        log.warning("--resume: --max-steps %s -> %s; the learning-rate schedule now ends at step %s",
                    before["plan"].get("max_steps"), record["plan"].get("max_steps"), record["plan"].get("max_steps"))


def _method_flags(record: dict) -> dict | None:
    """The method's flags that a checkpoint fixes (``--lam`` may change on resume); None in older run.json files."""
    method = record.get("method")
    return None if method is None else {k: v for k, v in method.items() if k != "lam"}


def previous_match(out: Path) -> dict | None:
    """The width match recorded when the run started (a resumed run's model comes from its checkpoint)."""
    path = out / RUN_JSON
    return json.loads(path.read_text()).get("matched") if path.exists() else None


def data_identity(record: dict, what: str):
    """Location-free identity of a run's tokens (store provenance without its path) or targets
    (the shards' sha256s); None when the record has none (an NTP run's targets)."""
    entry = record.get(what)
    if not entry:
        return None
    if what == "tokens":
        return content_identity(entry["provenance"])
    return entry.get("shards_sha256")


def write_run_json(out: Path, record: dict) -> None:
    atomic_write_json(out / RUN_JSON, record)


def export_final(ckpt: Path, out: Path) -> Path:
    """Copy the model and tokenizer of checkpoint ``ckpt`` to ``<out>/final/`` (temp folder, then rename)."""
    final, tmp = out / FINAL, out / f".{FINAL}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(ckpt, tmp, ignore=shutil.ignore_patterns(*TRAINING_FILES))
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)
    fsync_dir(out)
    return final
