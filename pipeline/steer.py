"""``cocomix steer CKPT --prompt TEXT --concept ID --scales ...``: steer a CoCoMix student through a concept.

The student predicts concept logits ``z`` over the SAE's latents and compresses its top
``k_concept`` into the vector it interleaves. Steering latent ``j`` at scale ``s`` (paper §3.2):
``z_j <- s * z_j`` before compression, and ``j`` is kept in the active set whatever its value
(it takes the place of the weakest other latent when it was not among the top ``k_concept``).
Scale 1 is the model as trained, so its row is the plain generation. Every position is steered,
the prompt's included.

With ``--teacher --sae`` the teacher is steered along the same latent, the way SAE steering is
usually done: at the hooked block's output ``h``, the SAE code's value of ``j`` becomes
``s * pre_j`` (its encoder pre-activation, the teacher-side counterpart of ``z_j``) by adding
``(s * pre_j - a_j) * W_dec[:, j] * std`` to ``h`` (``a_j``: its current value, 0 when inactive;
``std``: the SAE's input normalisation). The SAE's reconstruction error stays in ``h``.

Each row also says how often the latent is *naturally* on in the text it produced: among the
unsteered student's top ``k_concept`` (student) or the SAE's active latents (teacher).

Shape legend: B batch, T tokens, D width, L latents, C = k_concept, J steered latents, K SAE k.
"""
from __future__ import annotations

import logging
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from cocomix.core.errors import CocomixError, ConfigError, MismatchError
from cocomix.core.layernorm import layernorm_unbiased
from cocomix.stage2_pretrain.generate import (
    context_length,
    encode_prompt,
    generate,
    is_cocomix,
    load_for_generation,
    load_tokenizer,
    make_decoder,
    sampling_of,
)
from cocomix.stage2_pretrain.generate_config import SteerConfig
from cocomix.stage2_pretrain.model import ConceptBottleneck, ConceptStep

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------- the student
def steer_topk(z_BTL: torch.Tensor, latents: list[int], scale: float, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(values, indices) of the active set: ``latents`` scaled and always kept, the rest by rank of ``z``."""
    if scale == 1:
        return z_BTL.topk(k, dim=-1)
    idx_J = torch.tensor(latents, device=z_BTL.device)
    scaled_BTL = z_BTL.index_copy(-1, idx_J, z_BTL.index_select(-1, idx_J) * scale)
    rank_BTL = z_BTL.index_fill(-1, idx_J, float("inf"))  # steered latents first, then the unsteered ranking
    top_idx_BTC = rank_BTL.topk(k, dim=-1).indices
    return scaled_BTL.gather(-1, top_idx_BTC), top_idx_BTC


class SteeredBottleneck(nn.Module):
    """:class:`ConceptBottleneck` with ``latents`` scaled before compression (same parameters)."""

    def __init__(self, inner: ConceptBottleneck, latents: list[int], scale: float):
        super().__init__()
        self.inner, self.latents, self.scale = inner, latents, scale

    def forward(self, h_BTD: torch.Tensor, concept_ids: torch.Tensor | None = None, **_) -> ConceptStep:
        bottleneck = self.inner
        norm = layernorm_unbiased(h_BTD)
        z_BTL = bottleneck.predictor(norm.x - bottleneck.pre_bias)
        top_val_BTC, top_idx_BTC = steer_topk(z_BTL, self.latents, self.scale, bottleneck.k_concept)
        return ConceptStep(z_BTL, top_idx_BTC, top_val_BTC, bottleneck.compress_sparse(top_idx_BTC, top_val_BTC, norm))


@contextmanager
def steered(model, latents: list[int], scale: float):
    """The student with its bottleneck steered inside the ``with`` block (cached and uncached paths alike)."""
    inner = model.concept
    model.concept = SteeredBottleneck(inner, latents, scale)
    try:
        yield model
    finally:
        model.concept = inner


@torch.no_grad()
def student_activity(model, ids_BT: torch.Tensor, latents: list[int]) -> list[float]:
    """Share of positions where the unsteered student has each latent among its top ``k_concept``."""
    top_idx_BTC = model(input_ids=ids_BT).concept_logits.topk(model.config.k_concept, dim=-1).indices
    return [float((top_idx_BTC == j).any(-1).float().mean()) for j in latents]


# ----------------------------------------------------------------------------- the teacher
def steer_residual(sae, h_BTD: torch.Tensor, latents: list[int], scale: float) -> torch.Tensor:
    """``h`` with the SAE code's value of each latent set to ``scale * pre-activation`` (1: unchanged)."""
    if scale == 1:
        return h_BTD
    enc = sae.encode(h_BTD)
    idx_J = torch.tensor(latents, device=h_BTD.device)
    pre_BTJ = F.linear(enc.norm.x - sae.b_pre, sae.W_enc[idx_J], sae.b_enc[idx_J])
    now_BTJ = ((enc.top_idx[..., None] == idx_J) * enc.top_val[..., None]).sum(-2)  # [B, T, K, J] -> [B, T, J]
    delta_BTD = F.linear(scale * pre_BTJ - now_BTJ, sae.W_dec[:, idx_J])
    return h_BTD + delta_BTD * enc.norm.std


class SteeredTeacherDecoder:
    """The teacher's forward over the whole sequence (no cache), steered at the output of block ``layer``."""

    def __init__(self, teacher, sae, layer: int, latents: list[int], scale: float):
        self.teacher, self.sae, self.layer, self.latents, self.scale = teacher, sae, layer, latents, scale
        self.ids_BT = None

    @torch.no_grad()
    def __call__(self, ids_BN: torch.Tensor) -> torch.Tensor:
        from cocomix.stage1_extract.teacher import embed, run_blocks

        self.ids_BT = ids_BN if self.ids_BT is None else torch.cat([self.ids_BT, ids_BN], dim=1)
        t, n_layer = self.teacher, self.teacher.n_layer
        h_BTD, mask, pos = embed(t, self.ids_BT)
        h_BTD = run_blocks(t, h_BTD, mask, pos, 0, self.layer + 1)
        h_BTD = steer_residual(self.sae, h_BTD, self.latents, self.scale)
        h_BTD = run_blocks(t, h_BTD, mask, pos, self.layer + 1, n_layer)
        return t.model.lm_head(t.model.transformer.ln_f(h_BTD))[:, -ids_BN.shape[1]:]


@torch.no_grad()
def teacher_activity(teacher, sae, layer: int, ids_BT: torch.Tensor, latents: list[int]) -> list[float]:
    """Share of positions where the unsteered teacher's SAE code has each latent active (> 0)."""
    from cocomix.stage1_extract.teacher import hidden_states_at

    enc = sae.encode(hidden_states_at(teacher, ids_BT, layer))
    on_BTK = enc.top_val > 0
    return [float(((enc.top_idx == j) & on_BTK).any(-1).float().mean()) for j in latents]


# ----------------------------------------------------------------------------- checks
def check_steerable(model, cfg: SteerConfig) -> None:
    if not is_cocomix(model):
        raise CocomixError(f"checkpoint {cfg.ckpt} is a {model.config.model_type} model: it predicts no concepts, so there "
                           "is nothing to steer; pass a CoCoMix checkpoint")
    if getattr(model.config, "concept_target", "concepts") != "concepts" or getattr(model.config, "mix", "interleave") == "none":
        raise CocomixError(f"checkpoint {cfg.ckpt} mixes no SAE concepts into its stream (concept_target "
                           f"{model.config.concept_target!r}, mix {model.config.mix!r}): there is nothing to steer; pass a CoCoMix checkpoint")
    L, C = model.config.n_latents, model.config.k_concept
    for j in cfg.concept_ids:
        if j >= L:
            raise ConfigError(f"--concept {j} is out of range: the student predicts {L} latents (ids 0..{L - 1})")
    if len(cfg.concept_ids) > C:
        raise ConfigError(f"--concept names {len(cfg.concept_ids)} latents but the student keeps only {C} active; pass at most {C}")


def load_teacher_side(cfg: SteerConfig, student_config, device):
    """(teacher, SAE, layer), checked against each other and against the student's concepts."""
    from cocomix.stage1_extract.sae.io import load_sae
    from cocomix.stage1_extract.teacher import check_layer, load_teacher

    sae, info = load_sae(cfg.sae)
    if info.n_latents != student_config.n_latents:
        raise MismatchError(f"--sae {cfg.sae} has {info.n_latents} latents but the student predicts {student_config.n_latents}; "
                            "pass the SAE its targets were made with")
    made_with = (student_config.concept_provenance or {}).get("sae", {})
    if made_with.get("sha256") not in (None, info.sha256):
        log.warning("--sae %s is not the SAE the student's targets were made with (%s): latent ids may mean other concepts",
                    cfg.sae, made_with.get("source"))
    layer = cfg.layer if cfg.layer is not None else made_with.get("layer", (student_config.concept_provenance or {}).get("layer"))
    if layer is None:
        raise ConfigError("--layer: the student's targets record no layer; pass the teacher block the SAE reads")
    teacher = load_teacher(cfg.teacher, device)
    check_layer(teacher, layer)
    if sae.d_in != teacher.d_model:
        raise MismatchError(f"--sae {cfg.sae} reads width {sae.d_in} but teacher {cfg.teacher} has width {teacher.d_model}")
    return teacher, sae.to(device).eval(), layer


# ----------------------------------------------------------------------------- cocomix steer
@dataclass
class SteerRow:
    """One scale's generations and how often the latents are naturally on in them."""

    scale: float
    student: str  #: the student's continuation
    student_active: list[float]  #: per latent: share of positions (prompt + continuation) among its top k_concept
    teacher: str | None = None  #: the teacher's continuation (with --teacher)
    teacher_active: list[float] | None = None  #: per latent: share of positions where the SAE has it active


@dataclass
class SteerResult:
    """What ``cocomix steer`` printed."""

    prompt: str
    concepts: list[int]
    rows: list[SteerRow]


def run_steer(cfg: SteerConfig) -> SteerResult:
    from cocomix.core.device import resolve_device

    device = resolve_device(cfg.device)
    model = load_for_generation(cfg.ckpt, device)
    check_steerable(model, cfg)
    teacher_side = load_teacher_side(cfg, model.config, device) if cfg.teacher else None
    tokenizer = load_tokenizer(cfg.ckpt, model.config, cfg.tokenizer)
    prompt_ids, _ = encode_prompt(tokenizer, cfg.prompt, context_length(model), cfg.max_new_tokens)
    prompt_BT = torch.tensor([prompt_ids], device=device)
    rows = []
    for scale in cfg.scale_values:
        with steered(model, cfg.concept_ids, scale):
            ids_BT = _continue(make_decoder(model, cache=cfg.cache), prompt_BT, cfg, tokenizer.eos_token_id)
        row = SteerRow(scale, tokenizer.decode(ids_BT[0, len(prompt_ids):].tolist()),
                       student_activity(model, ids_BT, cfg.concept_ids))
        if teacher_side is not None:
            row.teacher, row.teacher_active = steer_teacher(teacher_side, cfg, scale)
        rows.append(row)
    result = SteerResult(tokenizer.decode(prompt_ids), cfg.concept_ids, rows)
    print_steer_table(result, k_concept=model.config.k_concept)
    return result


def steer_teacher(teacher_side, cfg: SteerConfig, scale: float) -> tuple[str, list[float]]:
    """The teacher's continuation at ``scale`` and the latents' natural activity in it."""
    teacher, sae, layer = teacher_side
    tok = teacher.tokenizer
    ids, _ = encode_prompt(tok, cfg.prompt, teacher.model.config.n_positions, cfg.max_new_tokens)
    prompt_BT = torch.tensor([ids], device=teacher.device)
    ids_BT = _continue(SteeredTeacherDecoder(teacher, sae, layer, cfg.concept_ids, scale), prompt_BT, cfg, tok.eos_token_id)
    return tok.decode(ids_BT[0, len(ids):].tolist()), teacher_activity(teacher, sae, layer, ids_BT, cfg.concept_ids)


def _continue(decoder, prompt_BT: torch.Tensor, cfg: SteerConfig, eos_id: int | None) -> torch.Tensor:
    """Prompt + continuation ids (same seed for every scale and model)."""
    out = generate(decoder, prompt_BT, max_new_tokens=cfg.max_new_tokens, sampling=sampling_of(cfg), seed=cfg.seed,
                   eos_id=eos_id if cfg.stop_at_eos else None)
    return torch.cat([prompt_BT, out.new_ids_BT], dim=1)


def print_steer_table(r: SteerResult, *, k_concept: int) -> None:
    """One row per scale: the student's continuation (and the teacher's), with the latents' natural activity."""
    from rich.console import Console
    from rich.table import Table

    names = ", ".join(str(j) for j in r.concepts)
    table = Table(title=f"steering latent{'s' if len(r.concepts) > 1 else ''} {names}", caption=f"prompt: {r.prompt!r}",
                  show_lines=True)
    table.add_column("scale", justify="right")
    table.add_column("student")
    table.add_column(f"in student's top-{k_concept}", justify="right")
    with_teacher = r.rows[0].teacher is not None
    if with_teacher:
        table.add_column("teacher")
        table.add_column("active in SAE", justify="right")
    for row in r.rows:
        cells = [f"{row.scale:g}", row.student, _shares(r.concepts, row.student_active)]
        if with_teacher:
            cells += [row.teacher, _shares(r.concepts, row.teacher_active)]
        table.add_row(*cells)
    Console(highlight=False).print(table)


def _shares(latents: list[int], shares: list[float]) -> str:
    if len(latents) == 1:
        return f"{shares[0]:.0%}"
    return "\n".join(f"{j}: {s:.0%}" for j, s in zip(latents, shares))
