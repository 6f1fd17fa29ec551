"""``cocomix eval CKPT``: perplexity on token stores and lm-evaluation-harness tasks; the evaluation inside training.

Perplexity is ``exp`` of the token-weighted mean next-token cross-entropy over
non-overlapping windows of a split (a window of n tokens makes n-1 predictions). Both
model kinds return next-token logits ``[B, T, V]`` (CoCoMix reads them at its concept
positions), so one loop serves both. Distributed: every rank runs the same number of
forward passes (FSDP needs that); a rank short of windows repeats one with weight 0.

``cocomix eval`` writes ``<ckpt>/eval.json``: the ``--tokens`` perplexity at the top level
(``val_ppl``, ``loss``, ``tokens``, ``windows``, ``window``), ``ppl`` (``--ppl-tokens`` store
name -> the same fields) and ``tasks`` (task -> harness metrics with stderr, see
:mod:`.harness`). Each part is merged in when done, so a later run of other stores or tasks
keeps the earlier ones; all input is checked before the first model forward.
"""
from __future__ import annotations

import json
import logging
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F

from cocomix.core.errors import CocomixError, ConfigError, MismatchError
from cocomix.stage2_pretrain.config import EvalConfig
from cocomix.stage2_pretrain.data import val_starts
from cocomix.stage2_pretrain.metrics import perplexity
from cocomix.storage.files import atomic_write_json

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
    """What ``run_eval`` measured and where it wrote it.

    The ``--tokens`` fields (``split`` .. ``window``) are None when no ``--tokens`` was given;
    ``eval_json`` is the file holding them (``eval-<split>.json`` for another split than ``val``),
    else ``<ckpt>/eval.json``, which always holds ``ppl`` and ``tasks``.
    """

    ckpt: str
    eval_json: str
    split: str | None = None
    val_ppl: float | None = None
    loss: float | None = None
    tokens: int | None = None
    windows: int | None = None
    window: int | None = None
    ppl: dict[str, dict] = field(default_factory=dict)  #: --ppl-tokens store name -> ppl, loss, tokens, windows, ...
    tasks: dict[str, dict] = field(default_factory=dict)  #: task -> metrics, stderr, ... (see harness.task_entry)


class StoreSpec(NamedTuple):
    """One token store to measure perplexity on, and its name in eval.json."""

    name: str
    path: str
    store: Any
    split: str


class EvalPlan(NamedTuple):
    """Everything checked before the model runs, so bad input fails before eval.json is touched."""

    val: StoreSpec | None  #: --tokens
    stores: list[StoreSpec]  #: --ppl-tokens
    tasks: list[str]
    manager: Any  #: the harness's TaskManager (None without --tasks)


def checkpoint_kind(ckpt: Path) -> str:
    """``model_type`` of a checkpoint folder that ``AutoModelForCausalLM`` can load; one line otherwise."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from cocomix.storage.safe_load import read_config

    register_students()
    if not (Path(ckpt) / "config.json").exists():
        raise CocomixError(f"{ckpt} is not a model folder (no config.json); pass a checkpoint folder as CKPT")
    model_type = read_config(ckpt, "checkpoint").get("model_type")
    try:
        known = type(AutoConfig.for_model(model_type)) in AutoModelForCausalLM._model_mapping
    except (ValueError, KeyError, TypeError):
        known = False
    if not known:
        raise CocomixError(f"{ckpt} is neither a CoCoMix checkpoint nor a Hugging Face causal LM folder "
                           f"(config.json: model_type {model_type!r}); pass a checkpoint folder written by `cocomix pretrain`")
    if not any((Path(ckpt) / name).exists() for name in WEIGHT_FILES):
        raise CocomixError(f"{ckpt} has a config.json but no weights ({' or '.join(WEIGHT_FILES)}); pass a complete checkpoint folder")
    return model_type


def register_students() -> None:
    """Import every student model module (``model.py``, ``model_*.py``): each registers its class with
    ``AutoConfig``/``AutoModelForCausalLM``, so any student checkpoint loads as a causal LM."""
    import importlib
    import pkgutil

    import cocomix.stage2_pretrain as package

    for info in pkgutil.iter_modules(package.__path__):
        if info.name == "model" or info.name.startswith("model_"):
            importlib.import_module(f"{package.__name__}.{info.name}")


WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")


def load_checkpoint_model(ckpt: Path):
    """A CoCoMix, pause or stock GPT-2 (NTP, KD) folder, as the causal LM its config.json names; loaded through
    :func:`cocomix.storage.safe_load.load_model` (no remote code, weights must cover the config exactly)."""
    checkpoint_kind(ckpt)
    from transformers import AutoModelForCausalLM

    from cocomix.storage.safe_load import load_model

    return load_model(AutoModelForCausalLM, ckpt, "checkpoint")


def check_tokenizer(ckpt: Path, store, tokens: str, config=None, flag: str = "--tokens") -> None:
    """The checkpoint's tokenizer (when it has one) must be the store's. ``config``: the loaded
    model's (spares AutoTokenizer re-reading config.json as a generic, unregistered config)."""
    if not (Path(ckpt) / "tokenizer.json").exists():
        return
    from cocomix.storage.safe_load import load_tokenizer
    from cocomix.storage.token_store import tokenizer_fingerprint

    if tokenizer_fingerprint(load_tokenizer(ckpt, "checkpoint", config=config)) != store.tokenizer_sha256:
        raise MismatchError(f"{flag} {tokens} was made with another tokenizer than checkpoint {ckpt}; pass the token store it was trained on")


def checkpoint_tokenizer(ckpt: Path, config):
    """The tokenizer saved beside the weights (``cocomix pretrain`` writes it into every checkpoint)."""
    from cocomix.storage.safe_load import load_tokenizer

    if not any((Path(ckpt) / name).exists() for name in ("tokenizer.json", "tokenizer_config.json", "vocab.json")):
        raise CocomixError(f"--tasks needs the tokenizer in {ckpt} (no tokenizer files there); "
                           "save it into the folder (tokenizer.save_pretrained) or evaluate a checkpoint written by `cocomix pretrain`")
    return load_tokenizer(ckpt, "checkpoint", config=config)


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"--device {name}: CUDA is not available here; pass --device cpu")
    return torch.device(name)


def run_eval(cfg: EvalConfig) -> EvalResult:
    """Evaluate checkpoint ``cfg.ckpt``: ``--tokens`` perplexity, ``--ppl-tokens`` perplexities and
    ``--tasks``; each part is merged into ``<ckpt>/eval.json`` as soon as it is done (atomically,
    earlier results of other stores and tasks kept)."""
    ckpt, device = Path(cfg.ckpt), _device(cfg.device)
    plan = plan_eval(cfg)
    model = load_checkpoint_model(ckpt).to(device).eval()
    window = check_model_fits(model, plan, cfg)
    tokenizer = checkpoint_tokenizer(ckpt, model.config) if plan.tasks else None
    result = EvalResult(str(ckpt), str(ckpt / EVAL_JSON))
    if plan.val is not None:
        eval_val(result, model, plan.val, cfg, window, device)
    for spec in plan.stores:
        res = store_ppl(model, spec, cfg, window, device)
        result.ppl[spec.name] = {"ppl": res.ppl, "loss": res.loss, "tokens": res.tokens, "windows": res.windows,
                                 "window": window, "split": spec.split, "tokens_store": spec.path}
        merge_eval_json(ckpt / EVAL_JSON, {"ckpt": str(ckpt), "ppl": {spec.name: result.ppl[spec.name]}})
    if plan.tasks:
        result.tasks = run_tasks(model, tokenizer, plan, cfg, ckpt)
    if plan.stores or plan.tasks:
        print_metrics(ckpt)
    return result


def check_model_fits(model, plan: EvalPlan, cfg: EvalConfig) -> int:
    """Every store's tokenizer is the checkpoint's, and the window fits the context; returns the window."""
    ckpt = Path(cfg.ckpt)
    for spec, flag in [(plan.val, "--tokens")] * bool(plan.val) + [(s, "--ppl-tokens") for s in plan.stores]:
        check_tokenizer(ckpt, spec.store, spec.path, config=model.config, flag=flag)
    window = cfg.window or model.config.n_positions
    if window > model.config.n_positions:
        raise ConfigError(f"--window {window} exceeds the model's context of {model.config.n_positions} tokens; pass --window {model.config.n_positions} or less")
    return window


def eval_val(result: EvalResult, model, spec: StoreSpec, cfg: EvalConfig, window: int, device) -> None:
    """The ``--tokens`` perplexity into ``result`` and eval.json (eval-<split>.json for another split than val)."""
    res = store_ppl(model, spec, cfg, window, device)
    ckpt = Path(result.ckpt)
    result.split, result.val_ppl, result.loss, result.tokens, result.windows, result.window = (
        spec.split, res.ppl, res.loss, res.tokens, res.windows, window)
    result.eval_json = str(ckpt / (EVAL_JSON if spec.split == "val" else f"eval-{spec.split}.json"))  # another split never replaces val_ppl
    merge_eval_json(Path(result.eval_json), {"ckpt": result.ckpt, "eval_json": result.eval_json, "split": spec.split,
                                             "val_ppl": res.ppl, "loss": res.loss, "tokens": res.tokens,
                                             "windows": res.windows, "window": window, "tokens_store": spec.path})
    _print_table(result)


EVAL_JSON = "eval.json"


def plan_eval(cfg: EvalConfig) -> EvalPlan:
    """Open every store, resolve every task name and check the checkpoint, before any model runs."""
    checkpoint_kind(Path(cfg.ckpt))
    val = _store_spec(cfg.tokens, cfg.split) if cfg.tokens else None
    stores = [_ppl_store_spec(s, cfg.split) for s in cfg.ppl_tokens or []]
    names = [s.name for s in stores]
    if len(set(names)) < len(names):
        raise ConfigError(f"--ppl-tokens: two stores share a name ({', '.join(names)}); eval.json names each by its folder, so rename one folder")
    tasks, manager = [], None
    if cfg.tasks:
        from cocomix.stage2_pretrain.harness import import_harness, parse_tasks, task_manager

        import_harness()
        tasks = parse_tasks(cfg.tasks)
        manager = task_manager(tasks, cfg.include_path)
    elif cfg.include_path:
        raise ConfigError("--include-path only adds task definitions; pass --tasks too")
    return EvalPlan(val, stores, tasks, manager)


def _store_spec(path: str, split: str) -> StoreSpec:
    from cocomix.storage.token_store import TokenStore

    store = TokenStore.open(path)
    if len(store.split(split)) < 2:  # (an unknown split is refused there, naming the known ones)
        raise CocomixError(f"split {split!r} of token store {path} holds fewer than 2 tokens; pass another split (STORE:SPLIT for --ppl-tokens)")
    name = Path(path).resolve().name + ("" if split == "val" else f":{split}")
    return StoreSpec(name, path, store, split)


def _ppl_store_spec(spec: str, default_split: str) -> StoreSpec:
    """``STORE`` (its ``--split`` split) or ``STORE:SPLIT``."""
    path, split = spec, default_split
    if not Path(spec).exists() and ":" in spec:
        path, split = spec.rsplit(":", 1)
    return _store_spec(path, split)


def store_ppl(model, spec: StoreSpec, cfg: EvalConfig, window: int, device) -> PplResult:
    """Perplexity over non-overlapping ``window``-token windows of one split of one store."""
    split = spec.store.split(spec.split)
    spans = val_starts(len(split), window, cfg.max_windows)
    autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if device.type == "cuda" else nullcontext
    with window_progress(len(spans)) as advance:
        return evaluate_split(model, split, spans, batch_size=cfg.batch_size, device=device, autocast=autocast, progress=advance)


def run_tasks(model, tokenizer, plan: EvalPlan, cfg: EvalConfig, ckpt: Path) -> dict[str, dict]:
    """Each task through the harness; its scores are merged into eval.json when it finishes."""
    from cocomix.stage2_pretrain.harness import harness_lm, run_task

    lm, scores = harness_lm(model, tokenizer, batch_size=cfg.batch_size), {}
    for name in plan.tasks:
        log.info("task %s", name)
        done = run_task(lm, name, plan.manager, limit=cfg.limit, num_fewshot=cfg.num_fewshot, bootstrap_iters=cfg.bootstrap_iters)
        merge_eval_json(ckpt / EVAL_JSON, {"ckpt": str(ckpt), "tasks": done})
        scores.update(done)
    return scores


def merge_eval_json(path: Path, update: dict) -> dict:
    """Write ``update`` into the JSON file at ``path`` atomically: top-level keys replaced, the
    ``ppl`` and ``tasks`` maps merged entry by entry (a re-run of other tasks keeps earlier ones)."""
    before = read_eval_json(path) if path.exists() else {}
    merged = {**before, **update}
    for key in ("ppl", "tasks"):
        if key in update:
            merged[key] = {**before.get(key, {}), **update[key]}
    atomic_write_json(path, merged)
    return merged


def read_eval_json(path: Path) -> dict:
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError) as err:
        raise CocomixError(f"{path} is not readable JSON ({err}); move it away and evaluate again") from None
    if not isinstance(data, dict):
        raise CocomixError(f"{path} holds no eval results (a JSON {type(data).__name__}, not an object)")
    return data


@contextmanager
def window_progress(total: int):
    """A rich progress bar over windows (windows/s and ETA); yields its advance function."""
    import time

    from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeRemainingColumn

    from cocomix.core.progress import progress_display

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


def print_metrics(ckpt: Path) -> None:
    """Every metric now in the checkpoint's eval.json, as ``cocomix compare`` shows it."""
    from cocomix.stage2_pretrain.compare import metric_table, print_table, run_name

    print_table(metric_table([(run_name(Path(ckpt)), read_eval_json(Path(ckpt) / EVAL_JSON))]), title=f"eval {ckpt}")


def _print_table(r: EvalResult) -> None:
    from rich.table import Table

    from cocomix.core.logs import console

    table = Table(title=f"eval {r.ckpt}")
    for col in ("split", "windows", "window", "tokens", "loss", "ppl"):
        table.add_column(col, justify="right")
    table.add_row(r.split, str(r.windows), str(r.window), f"{r.tokens:,}", f"{r.loss:.4f}", f"{r.val_ppl:.2f}")
    console.print(table)
