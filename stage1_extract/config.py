"""Configs of stage 1: ``extract`` and ``sae train``."""
from __future__ import annotations

from dataclasses import dataclass

from cocomix.core.configs import flag
from cocomix.core.errors import ConfigError

DEFAULT_TEACHER = "openai-community/gpt2"
DEFAULT_SAE = "openai:v5_32k/resid_post_mlp/5"


@dataclass
class ExtractConfig:
    """Run teacher + TopK SAE + attribution over a token store and write concept-target shards."""

    RESUME = "re-run the same command: finished shards are kept, the others are redone"  #: printed after Ctrl-C (no annotation: not a flag)

    tokens: str | None = flag(None, help="Token store to label. Default: <workspace>/tokens/<corpus> (tokenized first if missing).")
    corpus: str | None = flag(None, help="Corpus to tokenize with the teacher's tokenizer when --tokens is not given (e.g. openwebtext).")
    teacher: str = flag(DEFAULT_TEACHER, help="Teacher: hub id or local folder of a GPT-2-family causal LM.")
    sae: str = flag(DEFAULT_SAE, help="SAE: `openai:<version>/<location>/<layer>`, an OpenAI .pt file, a SAELens folder or a cocomix SAE folder.")
    layer: int = flag(5, help="Hook: output of this block (0-based) = hidden_states[layer + 1].")
    out: str | None = flag(None, help="Output target folder. Default: <workspace>/targets/<corpus>.")
    k_attr: int = flag(4, help="Concept labels kept per token (best first).")
    window: int = flag(1024, help="Teacher context: the split is cut into windows of this many tokens.")
    offsets: int = flag(1, help="Label sets, one per window offset r: the split is cut into windows [r + i*window, r + (i+1)*window), as stage 2 trains on them. r_0 = 0; the others are spread over [0, window) by a seeded rule (--offset-seed) recorded in the manifest. Each set costs one more pass of the teacher (N offsets = N x this stage); stage 2 draws a new offset each epoch, so give one per planned epoch for fresh windows every epoch.")
    offset_seed: int = flag(0, help="Seed of the rule that places offsets 1..N-1 (one in each N-th of the window).")
    windows_per_shard: int = flag(256, help="Windows per output shard (the unit of resume and of work between ranks).")
    batch_size: int = flag(8, help="Windows per teacher batch.")
    selection: str = flag("attribution", help="Label rule: `attribution` (gradient x activation, the paper) or `activation` (ablation).")
    attribution_input: str = flag("post", help="`post`: score the TopK activations (official code); `pre`: score pre-activations densely (paper Eq. 1).")
    score_dtype: str = flag("float32", help="dtype of stored scores: float32 or float16.")
    device: str = flag("auto", help="`auto`, `cpu`, `cuda` or `cuda:N`.")
    dtype: str = flag("auto", help="Teacher compute dtype: `auto` = `float32` (TF32 matmuls on CUDA; the official extractor's arithmetic), or `bfloat16` autocast (faster on GPUs; a few percent of label slots differ).")
    splits: str = flag("train,val", help="Comma-separated splits to label.")
    workspace: str | None = flag(None, help="Workspace folder for default paths. Default: $COCOMIX_WORKSPACE or ./cocomix-workspace.")
    overwrite: bool = flag(False, help="Replace an output folder made by another teacher, SAE, layer or token store.")
    threads: int | None = flag(None, help="CPU threads for the teacher (on CPU). Default: the count recorded in the output folder's plan.json by the run that started it, else torch's default. On CPU, shard bytes are reproducible at the same thread count (so a resumed run adopts it).")
    kd_samples: int = flag(0, help="Also store N token ids per position sampled from the teacher's next-token softmax (column `kd_ids`, for `pretrain --method kd`); an unbiased sparse stand-in for the full distribution, drawn in the same teacher pass. 0 = off.")
    store_hidden: bool = flag(False, help="Also store the teacher's hidden state at --layer (column `hidden`, float16, for `pretrain --concept-target hidden`); costs 2 x teacher width bytes per token (1.5 KB for GPT-2 small).")

    def __post_init__(self) -> None:
        if self.threads is not None and self.threads < 1:
            raise ConfigError(f"--threads must be >= 1, got {self.threads}")
        if self.kd_samples < 0:
            raise ConfigError(f"--kd-samples must be >= 0 (0 = no KD targets), got {self.kd_samples}")
        if self.selection not in ("attribution", "activation"):
            raise ConfigError(f"--selection must be `attribution` or `activation`, got {self.selection!r}")
        if self.attribution_input not in ("post", "pre"):
            raise ConfigError(f"--attribution-input must be `post` or `pre`, got {self.attribution_input!r}")
        if self.k_attr < 1:
            raise ConfigError(f"--k-attr must be >= 1, got {self.k_attr}")
        if self.window < 2:
            raise ConfigError(f"--window must be >= 2, got {self.window}")
        if self.layer < 0:
            raise ConfigError(f"--layer must be >= 0, got {self.layer}")
        if self.offsets < 1 or self.offsets > self.window:
            raise ConfigError(f"--offsets must be in [1, --window] (one label set per distinct window offset), got {self.offsets}")
        if self.score_dtype not in ("float32", "float16"):
            raise ConfigError(f"--score-dtype must be float32 or float16, got {self.score_dtype!r}")
        if self.tokens is None and self.corpus is None:
            raise ConfigError("pass --tokens DIR (a token store) or --corpus SRC (e.g. openwebtext)")
        if self.batch_size < 1 or self.windows_per_shard < 1:
            raise ConfigError(f"--batch-size and --windows-per-shard must be >= 1, got {self.batch_size} and {self.windows_per_shard}")
        if self.dtype not in ("auto", "float32", "bfloat16"):
            raise ConfigError(f"--dtype must be auto, float32 or bfloat16, got {self.dtype!r}")
        if not (self.device in ("auto", "cpu", "cuda") or self.device.startswith("cuda:")):
            raise ConfigError(f"--device must be auto, cpu, cuda or cuda:N, got {self.device!r}")
        if not [s for s in self.splits.split(",") if s.strip()]:
            raise ConfigError("--splits must name at least one split (e.g. train,val)")


@dataclass
class SaeTrainConfig:
    """Train a TopK SAE (Gao et al. recipe) on a teacher's hidden states, streamed from a token store."""

    RESUME = "re-run the same command: training continues from the last save (every --save-every steps)"  #: printed after Ctrl-C (no annotation: not a flag)

    teacher: str = flag(help="Teacher: hub id or local folder of a GPT-2-family causal LM.")
    tokens: str = flag(help="Token store whose `train` split feeds the teacher.")
    layer: int = flag(help="Hook: output of this block (0-based).")
    out: str = flag(help="Output folder (cocomix SAE format: cfg.json + sae.safetensors).")
    latents: int = flag(32768, help="Number of SAE latents.")
    k: int = flag(32, help="Active latents per token (TopK).")
    train_tokens: int = flag(10_000_000, help="Activations (tokens) to train on.")
    batch_tokens: int = flag(4096, help="Activations per optimizer step.")
    lr: float = flag(1e-4, help="Adam learning rate.")
    auxk: int = flag(256, help="AuxK: dead latents used for the auxiliary reconstruction.")
    auxk_coef: float = flag(1 / 32, help="AuxK loss coefficient.")
    dead_tokens: int = flag(10_000_000, help="A latent is dead after this many tokens without firing.")
    window: int = flag(1024, help="Teacher context length for the activations.")
    teacher_batch: int = flag(8, help="Windows per teacher forward.")
    buffer_tokens: int = flag(131072, help="Shuffle buffer (activations held at once); bounds memory, mixes tokens of different windows.")
    eval_tokens: int = flag(65536, help="Held-out activations (the `val` split, else `train`) for the final FVU and L0.")
    seed: int = flag(0, help="Seed for init and data order.")
    device: str = flag("auto", help="`auto`, `cpu`, `cuda` or `cuda:N`.")
    overwrite: bool = flag(False, help="Replace an existing SAE in --out; an unfinished run there with other flags is discarded.")
    save_every: int = flag(1000, help="Save a resumable state in <out>/.resume every this many steps (0 = never); a re-run with the same flags continues from it.")

    def __post_init__(self) -> None:
        if self.save_every < 0:
            raise ConfigError(f"--save-every must be >= 0, got {self.save_every}")
        if self.k < 1 or self.k > self.latents:
            raise ConfigError(f"--k must be in [1, --latents], got k={self.k}, latents={self.latents}")
        if self.layer < 0:
            raise ConfigError(f"--layer must be >= 0, got {self.layer}")
        for name in ("train_tokens", "batch_tokens", "dead_tokens", "teacher_batch", "buffer_tokens", "eval_tokens"):
            if getattr(self, name) < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.window < 2:
            raise ConfigError(f"--window must be >= 2, got {self.window}")
        if not self.lr > 0:
            raise ConfigError(f"--lr must be > 0, got {self.lr}")
        if self.auxk < 0 or self.auxk_coef < 0:
            raise ConfigError(f"--auxk and --auxk-coef must be >= 0, got {self.auxk} and {self.auxk_coef}")
