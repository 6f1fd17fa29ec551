"""Find and open what a pretraining run reads, and refuse inputs that do not belong together.

``cocomix pretrain --size 69m`` with no other flag must train on what
``cocomix extract --corpus openwebtext`` wrote: the workspace's only target folder,
and the token store those targets record (``meta["tokens"]["path"]``) or else the
workspace's only store. Every refusal is one line naming the flag to change.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cocomix.core.errors import CocomixError, IntegrityError, MismatchError
from cocomix.core.workspace import find_single, workspace_root

log = logging.getLogger(__name__)


@dataclass
class TrainInputs:
    """The opened token store and target shards of a run (NTP: targets only when given, for the width)."""

    store: object                # cocomix.storage.token_store.TokenStore
    tokens_path: Path
    targets: object | None       # cocomix.storage.targets.TargetReader
    targets_path: Path | None


def _recorded_store(targets_path: Path, ws: Path) -> Path | None:
    """The token store a target folder says it was made from, else its workspace twin
    (``extract --corpus X`` writes ``<ws>/targets/X`` from ``<ws>/tokens/X``), if it exists."""
    from cocomix.storage.targets import TargetReader

    recorded = (TargetReader.open(targets_path).meta.get("tokens") or {}).get("path")
    if recorded and Path(recorded).exists():
        return Path(recorded)
    twin = ws / "tokens" / targets_path.name
    return twin if targets_path.parent == ws / "targets" and (twin / "zarr.json").exists() else None


def resolve_paths(method: str, tokens: str | None, targets: str | None, workspace: str | None) -> tuple[Path, Path | None]:
    """(token store, target folder) from the flags, falling back to the workspace."""
    ws = workspace_root(workspace)
    if method in ("ntp", "pause") and targets is None:  # they read tokens only; targets only set the matched width
        return (Path(tokens) if tokens else find_single(ws, "tokens", "--tokens")), None
    targets_path = Path(targets) if targets else find_single(ws, "targets", "--targets")
    if not (targets_path / "manifest.json").exists():
        raise CocomixError(f"--targets {targets_path} is not a finished target folder (no manifest.json); run `cocomix extract` first")
    if tokens:
        return Path(tokens), targets_path
    return (_recorded_store(targets_path, ws) or find_single(ws, "tokens", "--tokens")), targets_path


def open_inputs(method: str, tokens: str | None, targets: str | None, workspace: str | None) -> TrainInputs:
    """Open the store (and targets) and check that they belong together."""
    from cocomix.storage.token_store import TokenStore

    tokens_path, targets_path = resolve_paths(method, tokens, targets, workspace)
    if not tokens_path.exists():
        raise CocomixError(f"token store {tokens_path} does not exist; pass --tokens DIR (made by `cocomix tokenize`)")
    store = TokenStore.open(tokens_path)
    reader = None
    if targets_path is not None:
        from cocomix.storage.targets import TargetReader

        reader = TargetReader.open(targets_path)
        check_targets_match_store(reader, store, targets_path, tokens_path)
    return TrainInputs(store, tokens_path, reader, targets_path)


def check_targets_match_store(reader, store, targets_path: Path, tokens_path: Path) -> None:
    """Same tokenizer and vocabulary, the train split present and of the same length."""
    try:
        reader.check_tokens(store.provenance())
    except MismatchError as err:
        raise MismatchError(f"--targets {targets_path} do not belong to --tokens {tokens_path}: {err}") from None
    meta_vocab = reader.meta.get("vocab_size")
    if meta_vocab is not None and int(meta_vocab) != store.vocab_size:
        raise MismatchError(
            f"--targets {targets_path} were made with vocabulary size {meta_vocab} but --tokens {tokens_path} has "
            f"{store.vocab_size}; pass the token store the targets were extracted from"
        )
    if "train" not in reader.splits:
        raise MismatchError(f"--targets {targets_path} hold no `train` split (only {', '.join(reader.splits)})")
    n_targets, n_store = reader.split_length("train"), len(store.split("train"))
    if n_targets != n_store:
        raise MismatchError(
            f"--targets {targets_path} cover {n_targets} train tokens but --tokens {tokens_path} holds {n_store}; "
            "pass the token store the targets were extracted from"
        )


def check_model_matches_targets(model_config, reader, targets_path: Path, source: str) -> None:
    """A model (e.g. from a checkpoint) must predict the targets' latents with their k_attr."""
    for name, want in (("n_latents", reader.n_latents), ("k_attr", reader.k_attr)):
        have = getattr(model_config, name, None)
        if have is not None and int(have) != int(want):
            raise MismatchError(
                f"{source} has {name}={have} but --targets {targets_path} have {name}={want}; "
                "pass the targets this run was started with, or start a new run with another --out"
            )


def spot_check_alignment(reader, store, *, n: int = 4, length: int = 256, seed: int = 0) -> None:
    """Compare a few random stretches of each label set's ``token`` column with the store (cheap; full check: ``cocomix verify``)."""
    split, total = store.split("train"), reader.split_length("train")
    rng = np.random.default_rng(seed)
    for r in reader.offsets:
        if r >= total:
            continue
        for start in rng.integers(r, max(r + 1, total - length), size=n).tolist():
            stop = min(start + length, total)
            if not np.array_equal(reader.window("train", start, stop, offset=r).tokens, split.read(start, stop)):
                raise IntegrityError(
                    f"target shards disagree with the token store at train tokens [{start}, {stop}) (label set of offset {r}); "
                    "pass the --tokens the targets were extracted from (check with `cocomix verify TARGETS --tokens DIR`)"
                )


def check_label_windows(reader, targets_path: Path, context: int, size: str, label_windows: str) -> None:
    """The targets were labelled on windows of the student's context and, aligned, for offsets
    that each leave a full training window; else say which extract command fixes it."""
    fix = (f"re-run `cocomix extract --window {context} --offsets N --out DIR` (same --tokens, --teacher, --sae, --layer) "
           "and pass --targets DIR")
    window = reader.window_length
    if window is not None and int(window) != context:
        raise MismatchError(f"--targets {targets_path} were labelled on {window}-token windows, but --size {size} trains "
                            f"on {context}-token windows, so no label was computed on a training window; {fix}")
    if label_windows != "aligned":
        return
    if window is None:
        raise MismatchError(f"--targets {targets_path} do not record their window length, so --label-windows aligned cannot "
                            f"serve them; {fix}, or pass --label-windows free")
    n_train = reader.split_length("train")
    unserved = [r for r in reader.offsets if r + context > n_train]
    if unserved:
        raise MismatchError(f"--targets {targets_path} hold label sets for offsets {unserved} that leave no full "
                            f"{context}-token window in the {n_train} train tokens; re-run `cocomix extract` with fewer "
                            "--offsets or a bigger corpus, or pass --label-windows free")
