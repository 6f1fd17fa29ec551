"""The training recipe of ``cocomix sae train``: a TopK SAE after openai/sparse_autoencoder ``train.py``.

1. inputs: unbiased-LayerNorm'd output of block ``layer``, streamed from the token store;
2. init: ``b_pre`` = geometric median of a sample, decoder = encoderᵀ with unit-norm
   columns, encoder rescaled so random unit inputs reconstruct to norm ≈ 1;
3. loss: MSE / variance of the sample + ``auxk_coef`` · normalised MSE of the AuxK
   reconstruction of the residual ``x - recons.detach()`` from the top ``auxk``
   pre-activations among latents dead (not fired > 1e-3) for ``dead_tokens`` tokens;
   the AuxK decode leaves out ``b_pre`` (the residual has none: sparsify PR #134);
4. step: project out the gradient component parallel to each decoder column, Adam
   (eps 6.25e-10), renormalise decoder columns to unit norm.

Shape legend: ``N`` activations in a batch, ``D`` width, ``L`` latents, ``Z`` TopK k, ``A`` AuxK latents.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import torch

from cocomix.core.errors import CocomixError
from cocomix.stage1_extract.config import SaeTrainConfig
from cocomix.stage1_extract.sae.grad import gathered_pre_activations
from cocomix.stage1_extract.sae.model import TopKSAE

FIRE_THRESHOLD = 1e-3  # a latent "fires" when its activation exceeds this (OpenAI train.py)
ADAM_EPS = 6.25e-10


class StepStats(NamedTuple):
    loss: float
    fvu: float  #: this batch's FVU (batch-centred)
    auxk_loss: float
    l0: float


class EvalStats(NamedTuple):
    fvu: float
    l0: float
    tokens: int


class DeadTracker:
    """Tokens since each latent last fired (OpenAI's ``stats_last_nonzero``, counted in tokens)."""

    def __init__(self, n_latents: int, device: torch.device) -> None:
        self.since_L = torch.zeros(n_latents, dtype=torch.long, device=device)
        self.seen = 0

    def update(self, top_idx_NZ: torch.Tensor, top_val_NZ: torch.Tensor) -> None:
        fired_L = torch.zeros_like(self.since_L, dtype=torch.bool)
        fired_L[top_idx_NZ[top_val_NZ > FIRE_THRESHOLD]] = True
        self.since_L += len(top_idx_NZ)
        self.since_L[fired_L] = 0
        self.seen += len(top_idx_NZ)

    def dead(self, dead_tokens: int) -> torch.Tensor:
        return self.since_L > dead_tokens

    def dead_fraction(self, dead_tokens: int) -> float:
        """Share of latents silent for ``dead_tokens`` tokens, or for the whole run when it was shorter."""
        return (self.since_L >= min(dead_tokens, self.seen)).float().mean().item()


def geometric_median(x_ND: torch.Tensor, iters: int = 50, tol: float = 1e-6) -> torch.Tensor:
    """Weiszfeld's algorithm (OpenAI initialises ``pre_bias`` with the geometric median)."""
    x_ND = x_ND.double()
    median_D = x_ND.mean(0)
    for _ in range(iters):
        weights_N = 1.0 / (x_ND - median_D).norm(dim=-1).clamp_min(1e-8)
        new_D = (weights_N[:, None] * x_ND).sum(0) / weights_N.sum()
        if (new_D - median_D).norm() <= tol * median_D.norm().clamp_min(1.0):
            return new_D.float()
        median_D = new_D
    return median_D.float()


def init_sae(sample_ND: torch.Tensor, n_latents: int, k: int, generator: torch.Generator) -> TopKSAE:
    """Tied unit-norm init from a data sample (OpenAI ``FastAutoencoder.__init__`` + ``init_from_data_``)."""
    d_in = sample_ND.shape[1]
    sae = TopKSAE(d_in, n_latents, k, normalize=True).to(sample_ND.device)
    bound = 1.0 / math.sqrt(d_in)  # nn.Linear's default init
    with torch.no_grad():
        sae.W_enc.copy_(torch.empty(n_latents, d_in).uniform_(-bound, bound, generator=generator))
        sae.W_dec.copy_(sae.W_enc.T)
        normalize_decoder_(sae)
        sae.b_pre.copy_(geometric_median(sample_ND))
        unit_ND = torch.randn(256, d_in, generator=generator).to(sample_ND.device)
        unit_ND = unit_ND / unit_ND.norm(dim=-1, keepdim=True) + sae.b_pre
        enc = sae.encode_normalized(unit_ND)
        recons_norm = (sae.decode_normalized(enc.top_idx, enc.top_val) - sae.b_pre).norm(dim=-1).mean()
        sae.W_enc /= recons_norm.clamp_min(1e-8)
    return sae


def normalize_decoder_(sae: TopKSAE) -> None:
    with torch.no_grad():
        sae.W_dec /= sae.W_dec.norm(dim=0, keepdim=True).clamp_min(1e-12)


def project_decoder_grad_(sae: TopKSAE) -> None:
    """Remove the gradient component parallel to each (unit) decoder column: the norm stays put."""
    grad_DL, w_DL = sae.W_dec.grad, sae.W_dec.detach()
    grad_DL -= (w_DL * grad_DL).sum(0, keepdim=True) * w_DL


def normalized_mse(recons_ND: torch.Tensor, target_ND: torch.Tensor) -> torch.Tensor:
    """MSE over the variance of ``target`` around its batch mean (= FVU of the batch)."""
    return (recons_ND - target_ND).pow(2).sum() / (target_ND - target_ND.mean(0)).pow(2).sum()


class Losses(NamedTuple):
    """Output of :func:`sae_losses` (tensors keep their graph for ``backward``)."""

    loss: torch.Tensor  #: main + auxk_coef * auxk
    main: torch.Tensor  #: MSE / variance of the init sample
    auxk: torch.Tensor  #: normalised MSE of the AuxK reconstruction of the residual (0 when no latent is dead)
    recons_ND: torch.Tensor
    top_val_NZ: torch.Tensor


def auxk_indices(pre_NL: torch.Tensor, dead_L: torch.Tensor, auxk: int) -> torch.Tensor:
    """``[N, A]``: the top pre-activations among dead latents, ``A = min(auxk, dead)`` (may be 0)."""
    n_aux = min(auxk, int(dead_L.sum()))
    if n_aux == 0:
        return pre_NL.new_zeros(len(pre_NL), 0, dtype=torch.long)
    return pre_NL.masked_fill(~dead_L, -math.inf).topk(n_aux, dim=-1).indices


def sae_losses(sae: TopKSAE, x_ND: torch.Tensor, tracker: DeadTracker, cfg: SaeTrainConfig, mse_scale: float) -> Losses:
    """Forward of one step: dense ``pre`` without autograd, then gradients through the selected latents only."""
    with torch.no_grad():
        pre_NL = sae.pre_activations(x_ND)
        top_idx_NZ = pre_NL.topk(sae.k, dim=-1).indices
        tracker.update(top_idx_NZ, pre_NL.gather(-1, top_idx_NZ))  # before AuxK, as OpenAI
        aux_idx_NA = auxk_indices(pre_NL, tracker.dead(cfg.dead_tokens), cfg.auxk if cfg.auxk_coef > 0 else 0)
    vals_NZ = torch.relu(gathered_pre_activations(sae, x_ND, pre_NL, torch.cat([top_idx_NZ, aux_idx_NA], -1)))
    top_val_NZ, aux_val_NA = vals_NZ.split([sae.k, aux_idx_NA.shape[1]], dim=-1)
    recons_ND = sae.decode_normalized(top_idx_NZ, top_val_NZ)
    main = (recons_ND - x_ND).pow(2).mean() * mse_scale
    aux = auxk_loss(sae, x_ND, recons_ND, aux_idx_NA, aux_val_NA)
    return Losses(main + cfg.auxk_coef * aux, main, aux, recons_ND, top_val_NZ)


def auxk_loss(sae: TopKSAE, x_ND, recons_ND, aux_idx_NA, aux_val_NA) -> torch.Tensor:
    """Normalised MSE of the AuxK latents reconstructing the main residual; their decode has no ``b_pre``."""
    if aux_idx_NA.shape[1] == 0:
        return x_ND.new_zeros(())
    aux_recons_ND = sae.decode_normalized(aux_idx_NA, aux_val_NA) - sae.b_pre
    return normalized_mse(aux_recons_ND, x_ND - recons_ND.detach()).nan_to_num(0.0)


def train_step(sae: TopKSAE, opt, x_ND: torch.Tensor, tracker: DeadTracker, cfg: SaeTrainConfig,
               mse_scale: float) -> StepStats:
    """One Adam step on a batch of normalised activations."""
    losses = sae_losses(sae, x_ND, tracker, cfg, mse_scale)
    if not torch.isfinite(losses.loss):
        raise CocomixError(f"non-finite SAE loss after {tracker.seen:,} tokens; lower --lr (now {cfg.lr})")
    opt.zero_grad(set_to_none=True)
    losses.loss.backward()
    project_decoder_grad_(sae)
    opt.step()
    normalize_decoder_(sae)
    with torch.no_grad():
        fvu = normalized_mse(losses.recons_ND, x_ND).item()
        l0 = (losses.top_val_NZ > 0).float().sum(-1).mean().item()
    return StepStats(losses.loss.item(), fvu, losses.auxk.item(), l0)


@torch.no_grad()
def evaluate(sae: TopKSAE, x_ND: torch.Tensor, batch: int = 4096) -> EvalStats:
    """FVU (variance around the mean of all of ``x``) and L0 of the SAE on held-out activations."""
    err, l0 = 0.0, 0.0
    for chunk_ND in x_ND.split(batch):
        enc = sae.encode_normalized(chunk_ND)
        err += (sae.decode_normalized(enc.top_idx, enc.top_val) - chunk_ND).double().pow(2).sum().item()
        l0 += (enc.top_val > 0).sum().item()
    var = (x_ND.double() - x_ND.double().mean(0)).pow(2).sum().item()
    return EvalStats(err / max(var, 1e-30), l0 / len(x_ND), len(x_ND))
