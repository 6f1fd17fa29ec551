"""Reading files someone else may have written: no code runs, and what loads is what the files say.

Every loader of the tool goes through here:

- :func:`torch_load` reads ``.pt`` files with ``weights_only=True`` (tensors, numbers, strings,
  lists, tuples and dicts only; a pickle that names any other callable is refused, never run).
- :func:`load_model` / :func:`load_tokenizer` read Hugging Face folders with
  ``trust_remote_code=False`` after refusing a folder whose config names custom code
  (``auto_map``), so transformers never imports a file from the folder and never asks on stdin.
- :func:`load_model` refuses weights that do not cover the config exactly: a tensor missing
  from the files (the model would get random weights there), one the model has no place for,
  or one of another shape.

Every refusal is one line naming the folder or file.
"""
from __future__ import annotations

import contextlib
import json
import logging
from pathlib import Path
from typing import Any

from cocomix.core.errors import IntegrityError

log = logging.getLogger(__name__)

CUSTOM_CODE_KEYS = ("auto_map",)
_CONFIG_FILES = ("config.json", "tokenizer_config.json")


def first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0][:300] if text else type(err).__name__


# ---------------------------------------------------------------------------- torch files
def torch_load(path: Path, what: str, *, map_location: Any = "cpu", legacy_numpy: bool = False) -> Any:
    """``torch.load(path, weights_only=True)``, every failure one line naming ``what`` and the file.

    ``legacy_numpy`` also admits plain numpy arrays (the RNG files of older checkpoints held
    numpy's state as an array); numpy's array rebuilder is data only, it runs no code.
    """
    import torch

    path = Path(path)
    if not path.is_file():
        raise IntegrityError(f"{what} {path} is missing; the folder is incomplete")
    allowed = _numpy_globals() if legacy_numpy else []
    try:
        with torch.serialization.safe_globals(allowed):
            return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # noqa: BLE001 - truncated zip, forbidden global (a planted pickle), bad storage...: all "not a valid file"
        raise IntegrityError(f"cannot read {what} {path}: not a plain tensor file, truncated or tampered "
                             f"({type(err).__name__}: {first_line(err)}); nothing in it was run") from None


def _numpy_globals() -> list:
    import numpy as np

    found = [np.ndarray, np.dtype, type(np.dtype("uint32"))]
    for mod in ("numpy._core.multiarray", "numpy.core.multiarray"):
        with contextlib.suppress(ImportError, AttributeError):
            found.append(__import__(mod, fromlist=["_reconstruct"])._reconstruct)
            break
    return found


# ---------------------------------------------------------------------------- HF folders
def read_config(folder: Path, what: str) -> dict:
    """``<folder>/config.json`` as a dict (one line when missing or not JSON)."""
    file = Path(folder) / "config.json"
    if not file.is_file():
        raise IntegrityError(f"{what} {folder} is not a model folder (no config.json)")
    try:
        config = json.loads(file.read_text())
    except (ValueError, UnicodeDecodeError) as err:
        raise IntegrityError(f"{what} {folder}: config.json is not valid JSON ({first_line(err)})") from None
    if not isinstance(config, dict):
        raise IntegrityError(f"{what} {folder}: config.json holds a {type(config).__name__}, not an object")
    return config


def refuse_custom_code(folder: Path, what: str) -> None:
    """A folder whose config or tokenizer config names custom code is refused (it is never imported)."""
    for name in _CONFIG_FILES:
        file = Path(folder) / name
        if not file.is_file():
            continue
        try:
            config = json.loads(file.read_text())
        except (ValueError, UnicodeDecodeError) as err:
            raise IntegrityError(f"{what} {folder}: {name} is not valid JSON ({first_line(err)})") from None
        if isinstance(config, dict) and any(config.get(key) for key in CUSTOM_CODE_KEYS):
            raise IntegrityError(f"{what} {folder}: {name} names custom code (auto_map); cocomix never runs code from "
                                 "model folders: use a folder of a built-in architecture (e.g. GPT-2)")


@contextlib.contextmanager
def _quiet_transformers():
    """No load report or progress bar on stderr: a refusal is our one line."""
    from transformers.utils import logging as hf_logging

    before = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(before)


def coverage_problem(info: dict) -> str | None:
    """What the load report says is wrong (missing, unexpected, mismatched tensors), None when exact."""
    parts = []
    for key, word in (("missing_keys", "missing"), ("unexpected_keys", "unexpected"), ("mismatched_keys", "of another shape")):
        names = sorted(str(k if isinstance(k, str) else k[0]) for k in (info.get(key) or ()))
        if names:
            more = f" and {len(names) - 3} more" if len(names) > 3 else ""
            parts.append(f"{len(names)} tensor(s) {word} ({', '.join(names[:3])}{more})")
    errors = [e for e in (info.get("error_msgs") or []) if e]
    if errors:
        parts.append(first_line(Exception(errors[0])))
    return "; ".join(parts) or None


def load_model(cls: Any, folder: Path | str, what: str, **kwargs: Any) -> Any:
    """``cls.from_pretrained(folder)`` with no remote code, refusing weights that do not cover the
    config exactly (missing / unexpected / mismatched tensors) and any unreadable file, in one line.

    ``folder`` may be a hub id (then only the remote-code rule applies before the download).
    Future commands that load checkpoints (generate, lm-eval, ...) call this too.
    """
    local = Path(str(folder)).expanduser()
    if local.exists():
        read_config(local, what)
        refuse_custom_code(local, what)
    try:
        with _quiet_transformers():
            model, info = cls.from_pretrained(str(folder), trust_remote_code=False, output_loading_info=True, **kwargs)
    except Exception as err:  # safetensors/JSON/shape/torch errors: all mean "these files do not load"
        if not local.exists():
            raise
        if "mismatched_sizes" in str(err):
            raise IntegrityError(f"{what} {folder}: its weights do not match its config.json: tensors of another shape; "
                                 "refusing a partly random model (re-copy or re-save the folder)") from None
        raise IntegrityError(f"{what} {folder} does not load ({type(err).__name__}: {first_line(err)}); "
                             "its files are truncated, tampered or do not match its config.json") from None
    problem = coverage_problem(info)
    if problem:
        raise IntegrityError(f"{what} {folder}: its weights do not match its config.json: {problem}; "
                             "refusing a partly random model (re-copy or re-save the folder)")
    return model


def load_tokenizer(folder: Path | str, what: str, **kwargs: Any) -> Any:
    """``AutoTokenizer.from_pretrained(folder)`` with no remote code (one line when unreadable)."""
    from transformers import AutoTokenizer

    local = Path(str(folder)).expanduser()
    if local.exists():
        refuse_custom_code(local, what)
    try:
        with _quiet_transformers():
            return AutoTokenizer.from_pretrained(str(folder), trust_remote_code=False, **kwargs)
    except Exception as err:  # tokenizer files of any kind
        if not local.exists():
            raise
        raise IntegrityError(f"{what} {folder}: its tokenizer does not load ({type(err).__name__}: {first_line(err)})") from None
