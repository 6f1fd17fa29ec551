"""Validation perplexity: ``cocomix eval CKPT --tokens DIR`` and the evaluation inside training.

Perplexity is ``exp`` of the token-weighted mean next-token cross-entropy over
non-overlapping windows of a split (a window of n tokens makes n-1 predictions). Both
model kinds return next-token logits ``[B, T, V]`` (CoCoMix reads them at its concept
positions), so one loop serves both. Distributed: every rank runs the same number of
forward passes (FSDP needs that); a rank short of windows repeats one with weight 0.
"""
from __future__ import annotations

import json
import logging
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F

from cocomix.pipeline.errors import CocomixError, ConfigError, MismatchError
from cocomix.storage.files import atomic_write_json

from cocomix.stage2_pretrain.config import EvalConfig
from cocomix.stage2_pretrain.data import val_starts
from cocomix.stage2_pretrain.metrics import perplexity

log = logging.getLogger(__name__)


class PplResult(NamedTuple):
    """Token-weighted mean CE (``loss``), its ``exp`` (``ppl``), predicted tokens and windows."""

    loss: float
    ppl: float
    tokens: int
    windows: int


def batch_spans(spans: list[tuple[int, int]], batch_size: int) -> list[list[tuple[int, int]]]:
    """Batches of equal-length windows (full windows first, then the short tail on its own)."""
    full = [s for s in spans if s[1] - s[0] == spans[0][1] - spans[0][0]]
    rest = [s for s in spans if s not in full]
    return [full[i:i + batch_size] for i in range(0, len(full), batch_size)] + [[s] for s in rest]


def ce_sum(model, input_ids_BT: torch.Tensor) -> torch.Tensor:
    """Sum of next-token CE over the batch (fp32 softmax); ``B * (T - 1)`` predictions."""
    logits_BTV = model(input_ids=input_ids_BT).logits
    V = logits_BTV.size(-1)
    return F.cross_entropy(logits_BTV[:, :-1].float().reshape(-1, V), input_ids_BT[:, 1:].reshape(-1), reduction="sum")


@torch.no_grad()
def evaluate_split(model, split, spans, *, batch_size: int, device, rank: int = 0, world: int = 1,
                   autocast=nullcontext, reduce=None, progress=None) -> PplResult:
    """Perplexity of ``model`` over ``spans`` of ``split``; ``reduce`` sums a tensor over ranks;
    ``progress(n_windows)`` is called after each batch."""
    was_training = model.training
    model.eval()
    totals = torch.zeros(2, dtype=torch.float64, device=device)  # CE sum, predicted tokens
    for batch in batch_spans(spans, batch_size * world):
        mine = batch[rank::world] or batch[:1]
        weight = 1.0 if batch[rank::world] else 0.0
        ids_BT = torch.from_numpy(np.stack([split.read(a, b) for a, b in mine]).astype(np.int64)).to(device)
        with autocast():
            loss_sum = ce_sum(model, ids_BT)
        totals += weight * torch.stack([loss_sum.double(), torch.tensor(ids_BT.numel() - len(mine), dtype=torch.float64, device=device)])
        if progress is not None:
            progress(len(batch))
    if reduce is not None:
        totals = reduce(totals)
    model.train(was_training)
    loss = float(totals[0] / totals[1].clamp(min=1))
    return PplResult(loss, perplexity(loss), int(totals[1]), len(spans))


# ----------------------------------------------------------------------------- cocomix eval
@dataclass
class EvalResult:
    """What ``run_eval`` measured and where it wrote it."""

    ckpt: str
    split: str
    val_ppl: float
    loss: float
    tokens: int
    windows: int
    window: int
    eval_json: str


def load_checkpoint_model(ckpt: Path):
    """A CoCoMix, pause or stock GPT-2 (NTP, KD) folder, by ``model_type`` in its config.json."""
    config_file = Path(ckpt) / "config.json"
    if not config_file.exists():
        raise CocomixError(f"{ckpt} is not a model folder (no config.json); pass a checkpoint folder as CKPT")
    model_type = json.loads(config_file.read_text()).get("model_type")
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # a "Loading weights" bar per load clutters the run's log
    if model_type == "cocomix":
        from cocomix.stage2_pretrain.model import CoCoMixForCausalLM

        return CoCoMixForCausalLM.from_pretrained(ckpt)
    if model_type == "gpt2":
        from transformers import GPT2LMHeadModel

        return GPT2LMHeadModel.from_pretrained(ckpt)
    if model_type == "cocomix-pause":
        from cocomix.stage2_pretrain.model_pause import PauseForCausalLM

        return PauseForCausalLM.from_pretrained(ckpt)
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(ckpt)


def check_tokenizer(ckpt: Path, store, tokens: str, config=None) -> None:
    """The checkpoint's tokenizer (when it has one) must be the store's. ``config``: the loaded
    model's (spares AutoTokenizer re-reading config.json as a generic, unregistered config)."""
    if not (Path(ckpt) / "tokenizer.json").exists():
        return
    from transformers import AutoTokenizer

    from cocomix.storage.token_store import tokenizer_fingerprint

    if tokenizer_fingerprint(AutoTokenizer.from_pretrained(ckpt, config=config)) != store.tokenizer_sha256:
        raise MismatchError(f"--tokens {tokens} was made with another tokenizer than checkpoint {ckpt}; pass the token store it was trained on")


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"--device {name}: CUDA is not available here; pass --device cpu")
    return torch.device(name)


def run_eval(cfg: EvalConfig) -> EvalResult:
    """Perplexity of checkpoint ``cfg.ckpt`` on ``cfg.split`` of ``cfg.tokens``; writes ``<ckpt>/eval.json``."""
    from cocomix.storage.token_store import TokenStore

    ckpt, device = Path(cfg.ckpt), _device(cfg.device)
    store = TokenStore.open(cfg.tokens)
    model = load_checkpoint_model(ckpt).to(device)
    check_tokenizer(ckpt, store, cfg.tokens, config=model.config)
    window = cfg.window or model.config.n_positions
    if window > model.config.n_positions:
        raise ConfigError(f"--window {window} exceeds the model's context of {model.config.n_positions} tokens; pass --window {model.config.n_positions} or less")
    split = store.split(cfg.split)
    spans = val_starts(len(split), window, cfg.max_windows)
    if not spans:
        raise CocomixError(f"split {cfg.split!r} of --tokens {cfg.tokens} holds fewer than 2 tokens; pass another --split")
    autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if device.type == "cuda" else nullcontext
    with window_progress(len(spans)) as advance:
        res = evaluate_split(model, split, spans, batch_size=cfg.batch_size, device=device, autocast=autocast, progress=advance)
    name = "eval.json" if cfg.split == "val" else f"eval-{cfg.split}.json"  # another split never replaces val_ppl
    result = EvalResult(str(ckpt), cfg.split, res.ppl, res.loss, res.tokens, res.windows, window, str(ckpt / name))
    atomic_write_json(ckpt / name, {**asdict(result), "tokens_store": str(cfg.tokens)})
    _print_table(result)
    return result


@contextmanager
def window_progress(total: int):
    """A rich progress bar over windows (windows/s and ETA); yields its advance function."""
    import time

    from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeRemainingColumn

    from cocomix.pipeline.progress import progress_display

    columns = (TextColumn("[bold]eval"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[rate]}"),
               TextColumn("ETA"), TimeRemainingColumn())
    t0, done = time.monotonic(), [0]
    with progress_display(*columns, unit="windows", transient=True) as bar:
        task = bar.add_task("eval", total=total, rate="")

        def advance(n: int) -> None:
            done[0] += n
            rate = f"{done[0] / max(time.monotonic() - t0, 1e-9):,.1f} windows/s"
            bar.update(task, advance=n, rate=rate)

        yield advance


def _print_table(r: EvalResult) -> None:
    from rich.table import Table

    from cocomix.pipeline.logs import console

    table = Table(title=f"eval {r.ckpt}")
    for col in ("split", "windows", "window", "tokens", "loss", "ppl"):
        table.add_column(col, justify="right")
    table.add_row(r.split, str(r.windows), str(r.window), f"{r.tokens:,}", f"{r.loss:.4f}", f"{r.val_ppl:.2f}")
    console.print(table)
