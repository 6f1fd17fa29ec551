"""Configs of the storage commands: ``tokenize``, ``inspect``, ``verify``.

Each field is one CLI flag (see :mod:`cocomix.core.configs`); validation lives in
``__post_init__`` and raises :class:`ConfigError` naming the flag.
"""
from __future__ import annotations

from dataclasses import dataclass

from cocomix.core.configs import arg, flag
from cocomix.core.errors import ConfigError

NANOGPT_SEED = 2357  #: nanoGPT's data/openwebtext/prepare.py: train_test_split(test_size=0.0005, seed=2357, shuffle=True)


@dataclass
class TokenizeConfig:
    """Tokenize a corpus into a Zarr token store (train/val splits, EOS after each document)."""

    RESUME = "re-run the same command to continue after the last saved document"  #: printed after Ctrl-C (no annotation: not a flag)

    corpus: str = flag(help="Hub dataset name (`openwebtext` = the hub's OpenWebText) or a local .txt/.jsonl/.json/.parquet file or folder.")
    out: str | None = flag(None, help="Output token-store folder. Default: <workspace>/tokens/<corpus>.")
    tokenizer: str | None = flag(None, help="Hub id or local folder of a fast tokenizer. Default: openai-community/gpt2 (unless --train-tokenizer).")
    train_tokenizer: int | None = flag(None, help="Train a byte-level BPE with this vocabulary size on the corpus instead of loading --tokenizer; saved into the store.")
    text_field: str = flag("text", help="Field holding the document text in .jsonl/.json/.parquet records and hub datasets.")
    val_fraction: float = flag(0.0005, help="Share of documents sent to the `val` split.")
    split_rule: str = flag("auto", help="How documents go to `val`: `hash` (a seeded hash of each document's index: streams, no count needed), `nanogpt` (nanoGPT's prepare.py, the official pipeline's: `datasets` train_test_split(test_size=--val-fraction, seed=--seed, shuffle=True), so val holds the same documents; needs the document count, counted first when the corpus does not say), or `auto` = nanogpt for --corpus openwebtext, hash otherwise.")
    seed: int | None = flag(None, help="Seed of the train/val split. Default: 2357 with the nanogpt rule (nanoGPT's), else 0.")
    num_proc: int = flag(1, help="Worker processes for tokenization.")
    batch_size: int = flag(1000, help="Documents per tokenizer batch.")
    chunk_tokens: int = flag(1 << 14, help="Zarr chunk length in tokens (zstd-compressed; the unit of a random read, see bench/storage.py).")
    shard_tokens: int = flag(1 << 22, help="Zarr shard length in tokens (chunks are stored inside shard files, keeping the file count low); 0 = one file per chunk. A multiple of --chunk-tokens.")
    max_docs: int | None = flag(None, help="Stop after this many documents (for trials).")
    workspace: str | None = flag(None, help="Workspace folder for default paths. Default: $COCOMIX_WORKSPACE or ./cocomix-workspace.")
    overwrite: bool = flag(False, help="Replace an existing store built from a different corpus or tokenizer.")

    def __post_init__(self) -> None:
        if not 0.0 <= self.val_fraction < 1.0:
            raise ConfigError(f"--val-fraction must be in [0, 1), got {self.val_fraction}")
        if self.split_rule not in ("auto", "hash", "nanogpt"):
            raise ConfigError(f"--split-rule must be auto, hash or nanogpt, got {self.split_rule!r}")
        if self.split_rule == "auto":
            self.split_rule = "nanogpt" if self.corpus == "openwebtext" else "hash"
        if self.seed is None:
            self.seed = NANOGPT_SEED if self.split_rule == "nanogpt" else 0
        for name in ("num_proc", "batch_size", "max_docs"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be >= 1, got {value}")
        if self.train_tokenizer is not None and self.tokenizer is not None:
            raise ConfigError("pass either --tokenizer or --train-tokenizer, not both")
        if self.chunk_tokens < 1:
            raise ConfigError(f"--chunk-tokens must be >= 1, got {self.chunk_tokens}")
        if self.shard_tokens < 0 or (self.shard_tokens and self.shard_tokens % self.chunk_tokens):
            raise ConfigError(f"--shard-tokens must be 0 or a multiple of --chunk-tokens ({self.chunk_tokens}), got {self.shard_tokens}")
        if self.train_tokenizer is not None and self.train_tokenizer < 257:
            raise ConfigError(f"--train-tokenizer must be >= 257 (the byte alphabet plus EOS), got {self.train_tokenizer}")


@dataclass
class InspectConfig:
    """Summarise a token store or a target folder (counts, splits, shards, provenance, label statistics)."""

    path: str = arg(help="A token-store folder or a target-shard folder.")
    json: bool = flag(False, help="Print one JSON object instead of tables.")
    samples: int = flag(8, help="Decoded tokens with their labels to show for a target folder.")
    tokens: str | None = flag(None, help="Token store whose tokenizer decodes the sample tokens of a target folder (default: the teacher folder when local).")

    def __post_init__(self) -> None:
        if self.samples < 0:
            raise ConfigError(f"--samples must be >= 0, got {self.samples}")


@dataclass
class VerifyConfig:
    """Check a token store or target folder: checksums, schema, contiguous ranges, full coverage."""

    path: str = arg(help="A token-store folder or a target-shard folder.")
    tokens: str | None = flag(None, help="Token store to compare each shard's `token` column against.")
    upgrade: bool = flag(False, help="Target folders written before block checksums: after verifying every shard by sha256, record a CRC32C per block of rows in each sidecar and the manifest, so readers catch bit rot where they read.")
