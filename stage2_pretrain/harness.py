"""lm-evaluation-harness tasks for a checkpoint: the task half of ``cocomix eval CKPT --tasks ...``.

The harness scores the model with its own Hugging Face class (``lm_eval.models.huggingface.HFLM``)
and its own evaluator (``lm_eval.simple_evaluate``): nothing here re-implements a scorer. Both
model kinds are causal LMs returning next-token logits ``[B, T, V]`` from ``model(input_ids)``,
and the CoCoMix class is registered with ``AutoModelForCausalLM`` (importing
:mod:`cocomix.stage2_pretrain.model` does it), so ``HFLM`` takes either a loaded model or a
checkpoint folder. Right padding, which the harness uses to batch requests of different lengths,
is harmless for both: attention is causal, so padding after a request never reaches its scores.

A request's log-likelihood is the sum of the log-probabilities of *all* its continuation tokens
(the harness's rule). The official CoCoMix evaluation post-processes the samples into an extra
per-task NLL that comes out as 0 for lambada and winogrande; nothing here re-derives scores from
samples: eval.json holds the harness's own metrics (LAMBADA perplexity is ``exp`` of minus the
mean whole-continuation log-likelihood) with their stderr.

lm-eval is an optional dependency (``pip install -e '.[eval]'``), imported only when tasks run.
"""
from __future__ import annotations

import difflib
import logging
import math
from pathlib import Path
from typing import Any

import torch

from cocomix.core.errors import CocomixError, ConfigError

log = logging.getLogger(__name__)

PAPER_TASKS = ("lambada_openai", "wikitext", "hellaswag", "piqa", "social_iqa", "arc_easy", "winogrande")
INSTALL = "pip install -e '.[eval]'"
LIST_ALL_BELOW = 40  #: an unknown task name lists every known one when there are fewer, else the closest


def import_harness():
    """The ``lm_eval`` package, with its chatty loggers turned down (``cocomix -v`` keeps them)."""
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM  # noqa: F401 (fails early when a dependency is missing)
    except ImportError as err:
        raise CocomixError(f"--tasks needs lm-evaluation-harness, which is not installed ({err}); run {INSTALL}") from None
    if not logging.getLogger("cocomix").isEnabledFor(logging.DEBUG):
        logging.getLogger("lm_eval").setLevel(logging.ERROR)
    import lm_eval.evaluator

    # The evaluator records `git describe` of the working directory (metadata eval.json does not keep);
    # outside a git checkout git prints "fatal: not a git repository" once per task.
    lm_eval.evaluator.get_git_commit_hash = lambda: None
    return lm_eval


def parse_tasks(tasks: str) -> list[str]:
    """Comma list of task names, ``paper`` expanded to :data:`PAPER_TASKS`, duplicates dropped."""
    names = []
    for name in (t.strip() for t in tasks.split(",")):
        names += PAPER_TASKS if name == "paper" else [name] if name else []
    return list(dict.fromkeys(names))


def task_manager(names: list[str], include_path: str | None, *, with_defaults: bool = True):
    """A harness ``TaskManager`` that knows every name in ``names``; refuses unknown ones in one line.

    Indexing the harness's built-in tasks reads thousands of YAML files (seconds to tens of seconds),
    so when ``--include-path`` alone defines every requested task, only that folder is indexed.
    """
    from lm_eval.tasks import TaskManager

    if include_path is not None:
        if not Path(include_path).is_dir():
            raise ConfigError(f"--include-path {include_path} is not a folder; pass the folder holding your task YAML files")
        local = TaskManager(include_path=include_path, include_defaults=False)
        if all(name in local.all_subtasks for name in names) or not with_defaults:
            return check_known(names, local)
    return check_known(names, TaskManager(include_path=include_path))


def check_known(names: list[str], manager):
    known = manager.all_tasks
    unknown = [n for n in names if n not in known]
    if not unknown:
        return manager
    if len(known) < LIST_ALL_BELOW:
        hint = f"known tasks: {', '.join(known)}"
    else:
        close = sorted({m for n in unknown for m in difflib.get_close_matches(n, known, n=5, cutoff=0.6)})
        hint = f"closest of the {len(known):,} known: {', '.join(close)}" if close else f"none of the {len(known):,} known tasks is close"
    raise ConfigError(f"--tasks: unknown task{'s' * (len(unknown) > 1)} {', '.join(unknown)} ({hint}); "
                      "pass names the harness knows, or --include-path with your task YAML files")


def harness_lm(model, tokenizer, *, batch_size: int):
    """The harness's ``HFLM`` around a loaded model (already on its device).

    On CUDA the forward runs under bf16 autocast, as the validation perplexity does, and the
    harness takes its log-softmax in fp32 (lm-eval versions without these two arguments run
    the model in its own fp32); on CPU everything is fp32.
    """
    import inspect

    import_harness()
    from lm_eval.models.huggingface import HFLM

    kwargs = {}
    if next(model.parameters()).device.type == "cuda" and "mixed_precision_dtype" in inspect.signature(HFLM.__init__).parameters:
        kwargs = {"mixed_precision_dtype": torch.bfloat16, "softmax_dtype": torch.float32}
    return HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, **kwargs)


def run_task(lm, name: str, manager, *, limit: int | None, num_fewshot: int | None, bootstrap_iters: int) -> dict[str, dict]:
    """Scores of one task (or of a group and its subtasks), keyed by task name; see :func:`task_entry`."""
    import lm_eval

    out = lm_eval.simple_evaluate(model=lm, tasks=[name], task_manager=manager, limit=limit, num_fewshot=num_fewshot,
                                  bootstrap_iters=bootstrap_iters, log_samples=False)
    return {task: task_entry(out, task, limit) for task in out["results"]}


def task_entry(out: dict, task: str, limit: int | None) -> dict[str, Any]:
    """One task's harness result as stored in eval.json.

    ``metrics``/``stderr``: metric -> value (the harness's ``acc,none`` keys lose their ``,none``
    filter suffix; other filters keep it); ``higher_is_better`` per metric; ``output_type``
    (``multiple_choice``, ``loglikelihood``, ``loglikelihood_rolling``, ...; None for a group);
    documents scored, few-shot count, ``--limit`` and the task version.
    """
    metrics, stderr = {}, {}
    for key, value in out["results"][task].items():
        if "," not in key:  # name, alias, sample_len
            continue
        metric, _, filt = key.partition(",")
        name = metric.removesuffix("_stderr") + ("" if filt == "none" else f",{filt}")
        (stderr if metric.endswith("_stderr") else metrics)[name] = finite(value)
    config = out.get("configs", {}).get(task, {})
    return {
        "metrics": metrics,
        "stderr": stderr,
        "higher_is_better": out.get("higher_is_better", {}).get(task, {}),
        "output_type": config.get("output_type"),
        "n_samples": out.get("n-samples", {}).get(task, {}).get("effective"),
        "num_fewshot": out.get("n-shot", {}).get(task),
        "limit": limit,
        "version": out.get("versions", {}).get(task),
    }


def finite(value) -> float | None:
    """A JSON-safe number: the harness writes "N/A" (no stderr) and may give NaN or inf."""
    try:
        value = float(value)
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None
