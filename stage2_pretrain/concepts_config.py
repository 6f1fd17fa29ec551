"""Configs of the ``cocomix concepts`` commands: ``describe``, ``show``, ``weights``."""
from __future__ import annotations

from dataclasses import dataclass

from cocomix.core.configs import arg, flag, flag_name
from cocomix.core.errors import ConfigError


def _at_least(cfg, names: tuple[str, ...], low: int) -> None:
    for name in names:
        value = getattr(cfg, name)
        if value is not None and value < low:
            raise ConfigError(f"{flag_name(name)} must be >= {low}, got {value}")


@dataclass
class DescribeConfig:
    """Build a concept dictionary from target shards: per latent, how often it is a label and its top-scoring contexts."""

    targets: str = arg(help="Target-shard folder (written by `cocomix extract`).")
    out: str = flag(help="Output folder: concepts.arrow (one row per latent) and describe.json (which targets it describes).")
    tokens: str | None = flag(None, help="Token store whose tokenizer decodes the contexts. Default: the store recorded in the targets' manifest, when it is still there.")
    top_n: int = flag(8, help="Highest-score contexts kept per latent.")
    context: int = flag(8, help="Tokens shown on each side of a labelled token.")

    def __post_init__(self) -> None:
        _at_least(self, ("top_n",), 1)
        _at_least(self, ("context",), 0)


@dataclass
class ShowConfig:
    """Per token of a text, the concepts a CoCoMix student predicts (terminal table, optional HTML page)."""

    ckpt: str = arg(help="CoCoMix checkpoint folder (an NTP checkpoint predicts no concepts).")
    text: str = flag(help="Text to read; it must fit the model's context.")
    describe: str | None = flag(None, help="Folder written by `cocomix concepts describe` on the targets the student was trained on: adds each concept's label frequency and example contexts.")
    html: str | None = flag(None, help="Also write a self-contained HTML page (no network resources): click or hover a token to see its concepts and their contexts.")
    top: int = flag(5, help="Concepts shown per token (highest predicted logits).")
    examples: int = flag(3, help="Example contexts shown per concept (from --describe).")

    def __post_init__(self) -> None:
        if not self.text.strip():
            raise ConfigError("--text is empty; pass some text to read")
        _at_least(self, ("top",), 1)
        _at_least(self, ("examples",), 0)


@dataclass
class WeightsConfig:
    """Per-concept L2 norms of the compression layer W_comp: which concepts the student ignores (norm near zero)."""

    ckpt: str = arg(help="CoCoMix checkpoint folder.")
    plot: str | None = flag(None, help="Write a histogram of the norms to this PNG file.")
    threshold: float | None = flag(None, help="A norm below this counts as near zero. Default: 0.1 x the median norm.")
    concepts: str | None = flag(None, help="Comma-separated concept ids whose norms (and rank among all concepts) are printed too.")
    bins: int = flag(80, help="Histogram bins (log-spaced).")

    def __post_init__(self) -> None:
        if self.threshold is not None and not self.threshold > 0:
            raise ConfigError(f"--threshold must be > 0, got {self.threshold}")
        _at_least(self, ("bins",), 2)
        self.concept_ids()

    def concept_ids(self) -> list[int]:
        """``--concepts`` as ints (range-checked against the model later)."""
        if not self.concepts:
            return []
        try:
            ids = [int(part) for part in self.concepts.split(",") if part.strip()]
        except ValueError:
            raise ConfigError(f"--concepts must be comma-separated integers, got {self.concepts!r}") from None
        if any(i < 0 for i in ids):
            raise ConfigError(f"--concepts must be >= 0, got {self.concepts!r}")
        return ids
