"""``cocomix concepts weights CKPT --plot FILE``: which concepts the student uses, from W_comp.

The compression layer mixes the active concepts' logits into one vector through the columns of
``W_comp`` (``[D, L]``; stored transposed as ``concept.compress.weight`` ``[L, D]``), so a concept
whose column has L2 norm near zero is ignored, whatever its predicted logit. The paper
(Figure 6c) finds a share of such concepts in its 386M student. "Near zero" here is a norm below
``--threshold``, by default a tenth of the median norm (a scale-free rule: the norms' absolute
size depends on width and training length). Printed: the share below the threshold, quantiles,
and the norms of ``--concepts``; ``--plot`` writes a histogram (log-spaced bins).

Shape legend: L latents, D width.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import NamedTuple

import numpy as np

from cocomix.core.errors import ConfigError
from cocomix.stage2_pretrain.concepts_config import WeightsConfig

log = logging.getLogger(__name__)

DEFAULT_RELATIVE = 0.1  #: default threshold = this x the median norm
QUANTILES = (0.0, 0.01, 0.05, 0.25, 0.5, 0.75, 0.95, 0.99, 1.0)


class WeightsResult(NamedTuple):
    """Per-concept norms of W_comp and what was printed about them."""

    norms_L: np.ndarray
    threshold: float
    threshold_rule: str
    near_zero: int  #: concepts with a norm below the threshold
    share_near_zero: float
    quantiles: dict[float, float]
    picked: dict[int, tuple[float, float]]  #: --concepts: id -> (norm, share of concepts with a smaller norm)
    plot: Path | None


def concept_norms(model) -> np.ndarray:
    """``||W_comp[:, j]||_2`` for every concept j (rows of the stored ``[L, D]`` matrix)."""
    return model.concept.compress.weight.detach().float().norm(dim=1).cpu().numpy()


def summarize(norms_L: np.ndarray, threshold: float | None, picked_ids: list[int]) -> WeightsResult:
    if threshold is None:
        threshold, rule = DEFAULT_RELATIVE * float(np.median(norms_L)), f"{DEFAULT_RELATIVE} x median norm"
    else:
        rule = "--threshold"
    bad = [i for i in picked_ids if i >= len(norms_L)]
    if bad:
        raise ConfigError(f"--concepts {bad[0]} is not a concept of this model: it has {len(norms_L)} (ids 0..{len(norms_L) - 1})")
    sorted_L = np.sort(norms_L)
    picked = {i: (float(norms_L[i]), float(np.searchsorted(sorted_L, norms_L[i]) / len(norms_L))) for i in picked_ids}
    near = int((norms_L < threshold).sum())
    quantiles = {q: float(np.quantile(norms_L, q)) for q in QUANTILES}
    return WeightsResult(norms_L, threshold, rule, near, near / len(norms_L), quantiles, picked, None)


def plot_histogram(res: WeightsResult, path: Path, bins: int, title: str) -> None:
    """Histogram of the norms on a log x axis, the threshold marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    positive = res.norms_L[res.norms_L > 0]
    lo = min(float(positive.min()) if len(positive) else res.threshold, res.threshold) / 1.5
    hi = max(float(res.norms_L.max()), res.threshold) * 1.5
    fig, ax = plt.subplots(figsize=(7, 4), dpi=120)
    ax.hist(np.clip(res.norms_L, lo, None), bins=np.geomspace(lo, hi, bins + 1), color="#2563eb")
    ax.axvline(res.threshold, color="#dc2626", linestyle="--",
               label=f"near zero: < {res.threshold:.3g} ({res.threshold_rule}): {res.share_near_zero:.1%} of concepts")
    ax.set_xscale("log")
    ax.set_xlabel("L2 norm of the concept's W_comp column")
    ax.set_ylabel("concepts")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)


def run_weights(cfg: WeightsConfig) -> WeightsResult:
    from cocomix.stage2_pretrain.concepts_show import load_concept_model

    model = load_concept_model(cfg.ckpt, need_compression=True)
    res = summarize(concept_norms(model), cfg.threshold, cfg.concept_ids())
    if cfg.plot:
        plot = Path(cfg.plot)
        plot_histogram(res, plot, cfg.bins, f"W_comp concept norms: {cfg.ckpt} ({len(res.norms_L):,} concepts)")
        res = res._replace(plot=plot)
    print_weights(res)
    return res


def print_weights(res: WeightsResult) -> None:
    from rich.table import Table

    from cocomix.core.logs import console

    head = Table(title="W_comp per-concept L2 norms", show_header=False, show_edge=False)
    head.add_row("concepts", f"{len(res.norms_L):,}")
    head.add_row("near zero", f"{res.near_zero:,} ({res.share_near_zero:.2%}) below {res.threshold:.4g} ({res.threshold_rule})")
    head.add_row("quantiles", "  ".join(f"q{int(q * 100)} {v:.4g}" for q, v in res.quantiles.items()))
    for i, (norm, rank) in res.picked.items():
        head.add_row(f"concept {i}", f"norm {norm:.4g} (larger than {rank:.1%} of concepts)")
    if res.plot is not None:
        head.add_row("histogram", str(res.plot))
    console.print(head)
