"""Configs of ``cocomix generate`` and ``cocomix steer`` (fields = flags)."""
from __future__ import annotations

from dataclasses import dataclass

from cocomix.core.configs import arg, flag, flag_name
from cocomix.core.errors import ConfigError


@dataclass
class GenerateConfig:
    """Continue a prompt with a student checkpoint (CoCoMix or NTP), KV-cached."""

    ckpt: str = arg(help="Checkpoint folder: a CoCoMix or NTP run's `final/` or `checkpoints/step-N/`, or a stock HF GPT-2 folder.")
    prompt: str = flag(help="Text to continue.")
    max_new_tokens: int = flag(64, help="Tokens to generate (fewer when the end-of-text token comes first, see --stop-at-eos). "
                               "Prompt + new tokens must fit the model's context: a longer prompt is cropped from the left "
                               "(its last tokens are kept, with a warning); a value of at least the context is refused.")
    temperature: float = flag(1.0, help="Softmax temperature; 0 = greedy (always the most likely token).")
    top_k: int = flag(50, help="Sample among the k most likely tokens only; 0 = no limit.")
    top_p: float = flag(1.0, help="Nucleus sampling: among the fewest tokens whose probabilities sum to p; 1 = no limit.")
    seed: int = flag(0, help="Seed of the sampler: the same seed, prompt and checkpoint give the same text.")
    device: str = flag("auto", help="`auto` (cuda when available), `cpu`, `cuda` or `cuda:N`.")
    cache: bool = flag(True, help="Reuse past keys and values (CoCoMix: per new token one position in the lower blocks, "
                       "two in the upper ones). --no-cache recomputes the whole sequence for every token: the slow reference.")
    stop_at_eos: bool = flag(True, help="Stop at the end-of-text token.")
    tokenizer: str | None = flag(None, help="Tokenizer folder. Default: the checkpoint's own, else the one saved in the token store its run was trained on.")

    def __post_init__(self) -> None:
        if not self.prompt:
            raise ConfigError("--prompt is empty; pass the text to continue")
        if self.max_new_tokens < 1:
            raise ConfigError(f"--max-new-tokens must be >= 1, got {self.max_new_tokens}")
        if not self.temperature >= 0:
            raise ConfigError(f"--temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if self.top_k < 0:
            raise ConfigError(f"--top-k must be >= 0 (0 = no limit), got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise ConfigError(f"--top-p must be in (0, 1], got {self.top_p}")


@dataclass(kw_only=True)
class SteerConfig(GenerateConfig):
    """Generate once per scale of a concept's predicted logit (the student's), optionally beside the teacher steered along the same SAE latent."""

    concept: str = flag(help="SAE latent id(s) to steer, comma-separated (`17` or `17,301`); below the student's n_latents.")
    scales: str = flag("-10,-5,0,5,10", help="Comma-separated factors on the latent's predicted logit, one generation each (same seed). "
                       "The latent is kept in the active top-k_concept set whatever its value; 1 leaves the model as trained (the plain generation).")
    teacher: str | None = flag(None, help="Also steer this teacher (hub id or local folder) along the same latent: the SAE code of its "
                               "hooked residual gets the latent at scale x its pre-activation. Needs --sae.")
    sae: str | None = flag(None, help="The teacher's SAE (`openai:...`, an OpenAI .pt, a SAELens or cocomix folder); its latent count must be the student's.")
    layer: int | None = flag(None, help="Teacher block whose output the SAE reads. Default: the layer recorded in the student's targets.")

    def __post_init__(self) -> None:
        super().__post_init__()
        if any(i < 0 for i in self.concept_ids):
            raise ConfigError(f"--concept ids must be >= 0, got {self.concept}")
        if len(set(self.concept_ids)) != len(self.concept_ids):
            raise ConfigError(f"--concept names a latent twice: {self.concept}")
        self.scale_values  # noqa: B018 (parsed now: a bad --scales fails before any model is loaded)
        if (self.teacher is None) != (self.sae is None):
            raise ConfigError("--teacher and --sae go together: pass both to steer the teacher too, or neither")
        if self.layer is not None and self.teacher is None:
            raise ConfigError("--layer is the teacher's hooked block; pass it with --teacher and --sae")

    @property
    def concept_ids(self) -> list[int]:
        """--concept as a list of latent ids."""
        return _parse_list(self.concept, int, "concept")

    @property
    def scale_values(self) -> list[float]:
        """--scales as a list of factors."""
        return _parse_list(self.scales, float, "scales")


def _parse_list(text: str, kind: type, name: str) -> list:
    try:
        values = [kind(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise ConfigError(f"{flag_name(name)} must be comma-separated {'integers' if kind is int else 'numbers'}, got {text!r}") from None
    if not values:
        raise ConfigError(f"{flag_name(name)} is empty; pass at least one value")
    return values
