"""``cocomix quickstart``: the whole chain offline, on a corpus every Python install carries.

No model or data set can be downloaded on a fresh offline machine, so the quickstart builds its
own chain (docs/ARCHITECTURE.md, quickstart)::

    stdlib sources ─▶ tokenize (+ train BPE) ─▶ NTP teacher (pretrain --method ntp)
                   ─▶ sae train ─▶ extract ─▶ CoCoMix + NTP students ─▶ eval ─▶ results table

Every step is a call of the same run function the CLI uses, with outputs under
``<workspace>/quickstart/``. Each step is resumable or skipped when its output is complete, so an
interrupted quickstart continues where it stopped.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import shutil
import sysconfig
import time
from dataclasses import dataclass
from pathlib import Path

from rich.table import Table

from cocomix.core.configs import flag
from cocomix.core.errors import ConfigError
from cocomix.core.logs import console
from cocomix.core.workspace import workspace_root

log = logging.getLogger(__name__)

SKIP_PARTS = {"site-packages", "test", "tests", "idlelib", "turtledemo", "__pycache__"}


@dataclass
class QuickstartConfig:
    """Run the whole chain offline on a slice of the Python standard library's sources."""

    RESUME = "re-run the same command: finished stages are kept"  #: printed after Ctrl-C (no annotation: not a flag)

    workspace: str | None = flag(None, help="Workspace folder; outputs go to <workspace>/quickstart. Default: $COCOMIX_WORKSPACE or ./cocomix-workspace.")
    corpus_mb: float = flag(3.0, help="Megabytes of standard-library source used as the corpus (one file = one document).")
    vocab_size: int = flag(4096, help="Vocabulary of the byte-level BPE trained on the corpus.")
    size: str = flag("tiny", help="Model preset of the teacher and both students.")
    teacher_width: int = flag(128, help="Width of the NTP teacher (the students': about 64-72). A teacher stronger than the students is what makes its concept labels worth predicting.")
    teacher_steps: int = flag(3000, help="Optimizer steps of the NTP teacher.")
    student_steps: int = flag(3000, help="Optimizer steps of each student (CoCoMix and NTP).")
    batch_tokens: int | None = flag(None, help="Tokens per optimizer step of every run. Default: the preset's.")
    layer: int = flag(1, help="Teacher block whose output the SAE reads (0-based).")
    sae_latents: int = flag(1024, help="Latents of the teacher's SAE.")
    sae_k: int = flag(16, help="Active latents per token of the SAE.")
    sae_tokens: int = flag(1_000_000, help="Activations the SAE trains on.")
    k_attr: int = flag(4, help="Concept labels per token.")
    offsets: int = flag(4, help="Window offsets labelled by extract (one label set each, N x the extraction time): the default students train about 4 epochs, so every epoch gets windows of its own, each with labels computed on exactly those windows.")
    seed: int = flag(0, help="Seed of the split, the SAE and the students (the teacher uses seed + 1).")
    fresh: bool = flag(False, help="Delete <workspace>/quickstart first instead of resuming it.")

    def __post_init__(self) -> None:
        if self.corpus_mb <= 0:
            raise ConfigError(f"--corpus-mb must be > 0, got {self.corpus_mb}")
        for name in ("teacher_width", "teacher_steps", "student_steps", "sae_latents", "sae_k", "sae_tokens", "offsets"):
            if getattr(self, name) < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")


@dataclass
class QuickstartResult:
    """Where everything went, and the students' validation perplexities."""

    root: Path  #: <workspace>/quickstart
    paths: dict[str, Path]  #: artifact name -> folder
    val_ppl: dict[str, float]  #: "cocomix" / "ntp" / "teacher" -> validation perplexity
    active_params: dict[str, int]  #: "cocomix" / "ntp" / "teacher" -> active parameter count
    seconds: float  #: wall time of this invocation


def stdlib_corpus(out: Path, max_bytes: int) -> Path:
    """Copy standard-library ``.py`` files (sorted, deterministic) into ``out`` as ``.txt`` documents."""
    marker = out / ".complete"
    if marker.exists():
        return out
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    total = 0
    for i, path in enumerate(sorted(stdlib.rglob("*.py"))):
        if SKIP_PARTS & set(path.relative_to(stdlib).parts) or total >= max_bytes:
            continue
        text = path.read_text(encoding="utf-8", errors="replace")
        (out / f"{i:05d}-{path.stem}.txt").write_text(text, encoding="utf-8")
        total += len(text.encode())
    marker.write_text(json.dumps({"bytes": total, "stdlib": str(stdlib)}))
    log.info("corpus: %.1f MB of standard-library sources from %s", total / 1e6, stdlib)
    return out


def quickstart_paths(workspace: str | None) -> dict[str, Path]:
    """Artifact name -> folder of the quickstart in ``workspace`` (see ``--workspace``)."""
    return _paths(workspace_root(workspace) / "quickstart")


def _paths(root: Path) -> dict[str, Path]:
    names = ("corpus", "tokens", "teacher", "sae", "targets", "cocomix", "ntp")
    return {name: root / name for name in names}


def _pretrain(method: str, out: Path, cfg: QuickstartConfig, *, tokens: Path, targets: Path | None, steps: int,
              seed: int, width: int | None = None):
    """A stage-2 run; resumed when a previous quickstart left checkpoints, skipped when finished."""
    from cocomix.stage2_pretrain.config import PretrainConfig
    from cocomix.stage2_pretrain.train import run_pretrain

    resume = (out / "checkpoints").exists() and any((out / "checkpoints").iterdir())
    restart = out.exists() and not resume  # interrupted before its first checkpoint: start that run over
    pcfg = PretrainConfig(
        method=method, size=cfg.size, tokens=str(tokens), targets=str(targets) if targets else None,
        out=str(out), max_steps=steps, batch_tokens=cfg.batch_tokens, seed=seed, resume=resume, width=width,
        overwrite=restart, eval_every=max(steps // 3, 1), save_every=max(steps // 3, 1), keep_last=1,
        log_every=max(steps // 15, 1),
    )
    return run_pretrain(pcfg)


def _teacher_and_sae(paths: dict[str, Path], cfg: QuickstartConfig):
    from cocomix.stage1_extract.config import SaeTrainConfig
    from cocomix.stage1_extract.sae.train import run_sae_train

    # Wider than the students, and another seed than theirs (never a copy of the NTP student).
    teacher = _pretrain("ntp", paths["teacher"], cfg, tokens=paths["tokens"], targets=None, steps=cfg.teacher_steps,
                        seed=cfg.seed + 1, width=cfg.teacher_width)
    sae_cfg = SaeTrainConfig(
        teacher=str(teacher.final), tokens=str(paths["tokens"]), layer=cfg.layer, out=str(paths["sae"]),
        latents=cfg.sae_latents, k=cfg.sae_k, train_tokens=cfg.sae_tokens, dead_tokens=cfg.sae_tokens // 4,
        window=_context(cfg), seed=cfg.seed, lr=1e-3, overwrite=True,
    )
    if not (paths["sae"] / "cfg.json").exists():
        run_sae_train(sae_cfg)
    return teacher


def _context(cfg: QuickstartConfig) -> int:
    from cocomix.stage2_pretrain.presets import get_preset

    return get_preset(cfg.size).context


def build_teacher_chain(paths: dict[str, Path], cfg: QuickstartConfig):
    """Corpus -> tokens -> NTP teacher -> SAE (each reused when finished); the teacher's run result.
    ``cocomix study mini`` labels these same artifacts with its own ``extract``."""
    from cocomix.storage.config import TokenizeConfig
    from cocomix.storage.tokenize import run_tokenize

    stdlib_corpus(paths["corpus"], int(cfg.corpus_mb * 1e6))
    run_tokenize(TokenizeConfig(corpus=str(paths["corpus"]), out=str(paths["tokens"]), train_tokenizer=cfg.vocab_size,
                                val_fraction=0.05, seed=cfg.seed))
    return _teacher_and_sae(paths, cfg)


def _val_ppl(final: Path, tokens: Path) -> float:
    from cocomix.stage2_pretrain.config import EvalConfig
    from cocomix.stage2_pretrain.evaluate import run_eval

    return run_eval(EvalConfig(ckpt=str(final), tokens=str(tokens), split="val")).val_ppl


def _run_chain(paths: dict[str, Path], cfg: QuickstartConfig) -> tuple[dict, dict]:
    from cocomix.stage1_extract.config import ExtractConfig
    from cocomix.stage1_extract.extract import run_extract

    teacher = build_teacher_chain(paths, cfg)
    run_extract(ExtractConfig(tokens=str(paths["tokens"]), teacher=str(teacher.final), sae=str(paths["sae"]),
                              layer=cfg.layer, out=str(paths["targets"]), k_attr=cfg.k_attr, window=_context(cfg),
                              offsets=cfg.offsets, batch_size=16, device="cpu"))
    ppl, active = {}, {}
    for method in ("cocomix", "ntp"):
        run = _pretrain(method, paths[method], cfg, tokens=paths["tokens"], targets=paths["targets"],
                        steps=cfg.student_steps, seed=cfg.seed)
        ppl[method], active[method] = _val_ppl(run.final, paths["tokens"]), run.params_active
    ppl["teacher"], active["teacher"] = _val_ppl(teacher.final, paths["tokens"]), teacher.params_active
    return ppl, active


def _report(result: QuickstartResult) -> None:
    table = Table(title="cocomix quickstart: validation perplexity (same tokens; students at matched active parameters)")
    for col in ("model", "active params", "val ppl"):
        table.add_column(col, justify="right" if col != "model" else "left")
    for name, ppl in result.val_ppl.items():
        label = "teacher (NTP, labels the students)" if name == "teacher" else f"{name} student"
        table.add_row(label, f"{result.active_params[name]:,}", f"{ppl:.2f}")
    console.print(table)
    where = Table(title="artifacts", show_header=False)
    for name, path in result.paths.items():
        where.add_row(name, str(path))
    console.print(where)
    console.print(f"done in {result.seconds / 60:.1f} min; inspect the labels with `cocomix inspect {result.paths['targets']}`")


def run_quickstart(cfg: QuickstartConfig) -> QuickstartResult:
    """Tokenize → teacher → SAE → extract → two students → eval, offline, resumable."""
    start = time.time()
    root = workspace_root(cfg.workspace) / "quickstart"
    if cfg.fresh:
        shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True, exist_ok=True)
    (root / "quickstart.json").write_text(json.dumps(dataclasses.asdict(cfg), indent=2))
    paths = _paths(root)
    ppl, active = _run_chain(paths, cfg)
    result = QuickstartResult(root, paths, ppl, active, time.time() - start)
    (root / "results.json").write_text(json.dumps({"val_ppl": ppl, "active_params": active}, indent=2))
    _report(result)
    return result
