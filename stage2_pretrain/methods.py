"""The students ``pretrain`` can train, from one token store and one target folder (paper §3, §4.3).

==========  ==========================================  ===============================  ==================
method      model                                       loss                             target columns
==========  ==========================================  ===============================  ==================
cocomix     CoCoMix (``--mix``, ``--concept-target``)   CE + lam * concept loss          concept_ids/hidden
ntp         stock GPT-2                                 CE                               (none)
kd          stock GPT-2                                 (1-a) CE + a * sampled KD        kd_ids
pause       GPT-2 + a learned vector interleaved        CE                               (none)
pause-kd    the same                                    (1-a) CE + a * sampled KD        kd_ids
==========  ==========================================  ===============================  ==================

Every student is matched in *active* parameters to the reference: the default CoCoMix
student (preset width, ``k_concept``, concept targets, interleaving) on the same targets.
:func:`match_width` finds the width (a multiple of the head count) whose active count is
closest; with the paper's vocabulary and SAE, NTP and KD keep the paper's table widths.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import nn

from cocomix.core.errors import ConfigError
from cocomix.stage2_pretrain.kd import kd_combine, ntp_and_kd
from cocomix.stage2_pretrain.model import next_token_loss
from cocomix.stage2_pretrain.presets import PAPER_LATENTS, PAPER_VOCAB, ParamCount, Preset, build_model, count_params

METHODS = ("cocomix", "ntp", "kd", "pause", "pause-kd")
MIX_CHOICES = ("interleave", "add", "none")
CONCEPT_TARGETS = ("concepts", "hidden")
HIDDEN_LOSS_CHOICES = ("l1", "l2", "cosine")
TINY_LATENTS = 1024  #: the reference SAE width of ``tiny`` runs without --targets (the quickstart's)


@dataclass(frozen=True)
class MethodSpec:
    """What a run trains: the method and its flags (the ``pretrain`` flags of the same names)."""

    method: str = "cocomix"
    mix: str = "interleave"
    concept_target: str = "concepts"
    hidden_loss: str = "cosine"
    k_concept: int | None = None  #: None: the preset's
    insert_layer: int | None = None  #: None: the preset's
    kd_alpha: float = 0.5
    lam: float = 0.1

    @property
    def uses_kd(self) -> bool:
        return self.method in ("kd", "pause-kd")

    @property
    def arch(self) -> str:
        """``cocomix``, ``gpt2`` (ntp, kd) or ``pause`` (pause, pause-kd)."""
        return {"cocomix": "cocomix", "ntp": "gpt2", "kd": "gpt2"}.get(self.method, "pause")

    @property
    def columns(self) -> tuple[str, ...]:
        """Target columns a micro-batch needs (empty: the run reads tokens only)."""
        if self.arch == "cocomix":
            return ("concept_ids",) if self.concept_target == "concepts" else ("hidden",)
        return ("kd_ids",) if self.uses_kd else ()

    @property
    def is_reference(self) -> bool:
        """The default CoCoMix student, the one every other student is matched to (``--lam`` and
        ``--insert-layer`` change no parameter)."""
        return (self.method, self.mix, self.concept_target, self.k_concept) == ("cocomix", "interleave", "concepts", None)

    def combine(self, parts: dict):
        """The training loss from its parts (tensors or floats): see the module table."""
        if self.uses_kd:
            return kd_combine(parts["ntp_loss"], parts["kd_loss"], self.kd_alpha)
        if self.arch == "cocomix":
            return parts["ntp_loss"] + self.lam * parts["concept_loss"]
        return parts["ntp_loss"]

    def describe(self) -> dict:
        """The flags that shape this method (for run.json and the log)."""
        keys = {"cocomix": ("mix", "concept_target", "k_concept", "insert_layer", "lam") + (
                    ("hidden_loss",) if self.concept_target == "hidden" else ()),
                "gpt2": (), "pause": ("insert_layer",)}[self.arch]
        return {"method": self.method, **{k: getattr(self, k) for k in keys},
                **({"kd_alpha": self.kd_alpha} if self.uses_kd else {}), "columns": list(self.columns)}


def spec_from_config(cfg) -> MethodSpec:
    """The :class:`MethodSpec` of a :class:`~.config.PretrainConfig`."""
    return MethodSpec(cfg.method, cfg.mix, cfg.concept_target, cfg.hidden_loss, cfg.k_concept, cfg.insert_layer,
                      cfg.kd_alpha, cfg.lam)


class StudentShape(NamedTuple):
    """What the data fixes about a student: vocabulary, SAE and label settings, teacher width."""

    vocab_size: int
    n_latents: int = 0
    k_attr: int = 4
    ignore_id: int = 65535
    eos_id: int | None = None
    d_teacher: int = 0


def apply_spec(spec: MethodSpec, preset: Preset) -> Preset:
    """The preset with the method's ``k_concept`` and ``insert_layer`` (checked against its blocks)."""
    insert = preset.insert_layer if spec.insert_layer is None else spec.insert_layer
    if not 0 <= insert < preset.n_layer:
        raise ConfigError(f"--insert-layer {insert} is not a block of --size {preset.name} (0..{preset.n_layer - 1})")
    k = preset.k_concept if spec.k_concept is None else spec.k_concept
    return dataclasses.replace(preset, insert_layer=insert, k_concept=k)


def build_student(spec: MethodSpec, preset: Preset, width: int, shape: StudentShape) -> nn.Module:
    """A freshly initialised student of ``width`` (the caller seeds torch)."""
    preset = apply_spec(spec, preset)
    if spec.arch == "gpt2":
        return build_model("ntp", dataclasses.replace(preset, ntp_d=width), vocab_size=shape.vocab_size, eos_id=shape.eos_id)
    if spec.arch == "pause":
        from cocomix.stage2_pretrain.model_pause import PauseConfig, PauseForCausalLM

        return PauseForCausalLM(PauseConfig(
            vocab_size=shape.vocab_size, n_positions=preset.context, n_embd=width, n_layer=preset.n_layer,
            n_head=preset.n_head, dropout=preset.dropout, insert_layer=preset.insert_layer,
            bos_token_id=shape.eos_id, eos_token_id=shape.eos_id))
    model = build_model("cocomix", dataclasses.replace(preset, cocomix_d=width), vocab_size=shape.vocab_size,
                        n_latents=shape.n_latents, k_attr=shape.k_attr, ignore_id=shape.ignore_id, eos_id=shape.eos_id,
                        mix=spec.mix, concept_target=spec.concept_target, hidden_loss=spec.hidden_loss,
                        d_teacher=shape.d_teacher)
    model.config.lam = spec.lam
    return model


def active_on_meta(spec: MethodSpec, preset: Preset, width: int, shape: StudentShape) -> ParamCount:
    with torch.device("meta"):
        return count_params(build_student(spec, preset, width, shape))


class WidthMatch(NamedTuple):
    """The width a method trains at and the counts that chose it."""

    width: int
    reference: ParamCount  #: the default CoCoMix student on the same targets
    count: ParamCount  #: this method's at ``width``

    @property
    def ratio(self) -> float:
        """Active parameters of this method / of the reference."""
        return self.count.active / self.reference.active

    def as_record(self) -> dict:
        return {"reference": "cocomix", "reference_active": self.reference.active, "width": self.width,
                "active": self.count.active, "ratio": round(self.ratio, 4)}


def reference_shape(preset: Preset, shape: StudentShape) -> StudentShape:
    """Without targets (ntp, pause) the reference CoCoMix uses the paper's SAE width (``tiny``: the quickstart's)."""
    if shape.n_latents:
        return shape
    return shape._replace(n_latents=TINY_LATENTS if preset.name == "tiny" else PAPER_LATENTS)


def match_width(spec: MethodSpec, preset: Preset, shape: StudentShape) -> WidthMatch:
    """The width of ``spec`` whose active count is closest to the reference CoCoMix student's."""
    no_targets = not shape.n_latents
    shape = reference_shape(preset, shape)
    reference = active_on_meta(MethodSpec(), preset, preset.cocomix_d, shape)
    if spec.is_reference:
        return WidthMatch(preset.cocomix_d, reference, active_on_meta(spec, preset, preset.cocomix_d, shape))
    paper = (shape.vocab_size, shape.n_latents) == (PAPER_VOCAB, PAPER_LATENTS) and preset.name != "tiny"
    if spec.arch == "gpt2" and (paper or no_targets):
        width = preset.ntp_d  # the paper's table (tiny: matched for the quickstart's vocabulary and SAE)
    else:
        width = closest_width(lambda d: active_on_meta(spec, preset, d, shape).active, reference.active,
                              step=preset.n_head, hi=8 * preset.cocomix_d)
    return WidthMatch(width, reference, active_on_meta(spec, preset, width, shape))


def closest_width(active_at, target: int, *, step: int, hi: int) -> int:
    """The multiple of ``step`` in ``[step, hi]`` whose ``active_at(width)`` is closest to ``target``
    (``active_at`` grows with the width: a bisection, then the better of the two neighbours)."""
    lo, top = 1, max(1, hi // step)
    while lo < top:
        mid = (lo + top) // 2
        if active_at(mid * step) < target:
            lo = mid + 1
        else:
            top = mid
    candidates = [w * step for w in (lo - 1, lo) if w >= 1]
    return min(candidates, key=lambda d: abs(active_at(d) - target))


# ----------------------------------------------------------------------------- one micro-batch
class MicroLoss(NamedTuple):
    """The loss to back-propagate and its parts (``ntp_loss``, ``concept_loss``, ``kd_loss``; unweighted)."""

    loss: torch.Tensor
    parts: dict


def model_inputs(spec: MethodSpec, mb, device) -> dict:
    """The target columns the model itself consumes (CoCoMix: labels or teacher states)."""
    if spec.arch != "cocomix":
        return {}
    if spec.concept_target == "concepts":
        return {"concept_ids": mb.concept_ids.to(device)}
    return {"teacher_hidden": mb.extra["hidden"].to(device)}


def micro_loss(spec: MethodSpec, model, mb, device, concept_share: torch.Tensor | float = 1.0) -> MicroLoss:
    """Forward one micro-batch and combine its losses. ``concept_share`` rescales the concept term
    to the micro-batch's share of the global batch's label slots (see :mod:`.train`)."""
    ids_BT = mb.input_ids.to(device)
    out = model(input_ids=ids_BT, **model_inputs(spec, mb, device))
    if spec.uses_kd:
        ntp, kd = ntp_and_kd(out.logits, ids_BT, mb.extra["kd_ids"].to(device))
        parts = {"ntp_loss": ntp, "kd_loss": kd}
    else:
        parts = {"ntp_loss": next_token_loss(out.logits, ids_BT)}
    if spec.arch == "cocomix":
        parts["concept_loss"] = out.concept_loss * concept_share
    return MicroLoss(spec.combine(parts), parts)
