"""Generation benchmark: CoCoMix tokens/s with its KV cache vs without, and cached NTP at matched parameters.

    python bench/generate.py                       # tiny and 69m shapes, 256 new tokens after a 16-token prompt
    python bench/generate.py --shapes 69m --tokens 64 --reps 1

Random weights (the speed does not depend on them), greedy decoding, batch 1, fp32, no stop at
end-of-text, so every variant generates exactly ``--tokens`` tokens. Variants:

* ``cocomix cached``: :class:`InterleavedDecoder` (per new token one position in each lower
  block, two in each upper block, against cached keys and values);
* ``cocomix uncached``: the model's forward over the whole sequence at every step;
* ``ntp cached``: the matched NTP baseline (stock HF GPT-2 at the preset's NTP width) with HF's cache.

Shapes: the presets' widths, layers, heads, insert layer and k_concept; the context is 1024 for
both (the tiny preset's own 128 positions cannot hold 256 new tokens); vocabulary / latents are
the quickstart's (4096 / 1024) for tiny and the paper's (50257 / 32768) for 69m. Goal: cached /
uncached >= 5 at 256 tokens. The FLOP column is the matmul + attention FLOPs per generated
token with the cache, averaged over the run; CoCoMix's two upper positions per token and its
concept head make it dearer than NTP per token.
"""
from __future__ import annotations

import argparse
import dataclasses
import platform
import statistics

import torch

from cocomix.stage2_pretrain.generate import Sampling, generate, make_decoder
from cocomix.stage2_pretrain.presets import build_model, count_params, get_preset

PROMPT = 16
CONTEXT = 1024
VOCAB_LATENTS = {"tiny": (4096, 1024), "69m": (50257, 32768)}


def models(shape: str):
    """(cocomix, ntp) with random weights at ``shape``'s sizes, context 1024, eval mode."""
    vocab, n_latents = VOCAB_LATENTS[shape]
    preset = dataclasses.replace(get_preset(shape), context=CONTEXT, dropout=0.0)
    torch.manual_seed(0)
    cocomix = build_model("cocomix", preset, vocab_size=vocab, n_latents=n_latents).eval()
    ntp = build_model("ntp", preset, vocab_size=vocab).eval()
    return cocomix, ntp


def flops_per_token(model, n_new: int) -> float:
    """Matmul FLOPs (2 per multiply-add) per cached generated token, attention over the mean context included."""
    cfg = model.config
    D, n, V, S = cfg.n_embd, cfg.n_layer, cfg.vocab_size, PROMPT + n_new / 2  # mean tokens in context
    block = 12 * D * D  # qkv 3D^2 + proj D^2 + MLP 8D^2 multiply-adds per position
    if getattr(cfg, "model_type", "") != "cocomix":
        return 2 * (n * block + D * V) + n * 4 * D * S
    lo, up = cfg.insert_layer, n - cfg.insert_layer
    head = D * cfg.n_latents + cfg.k_concept * D  # W_pred over every latent, C rows of W_comp
    return 2 * (lo * block + 2 * up * block + head + D * V) + lo * 4 * D * S + up * 2 * 4 * D * (2 * S)


def timed_runs(variants: dict, n_new: int, reps: int) -> dict[str, float]:
    """Median tokens/s of each ``(model, cache)`` variant: one warm-up run of 8 tokens each, then
    ``reps`` rounds of one run per variant (round-robin: load drift on a shared machine hits all alike)."""
    rates: dict[str, list[float]] = {name: [] for name in variants}
    for n, rounds in ((8, 1), (n_new, reps)):
        for _ in range(rounds):
            for name, (model, cache) in variants.items():
                ids = torch.randint(0, model.config.vocab_size, (1, PROMPT), generator=torch.Generator().manual_seed(0))
                out = generate(make_decoder(model, cache=cache), ids, max_new_tokens=n, sampling=Sampling(temperature=0))
                if n == n_new:
                    rates[name].append(n_new / out.seconds)
    return {name: statistics.median(r) for name, r in rates.items()}


def bench_shape(shape: str, n_new: int, reps: int) -> list[dict]:
    cocomix, ntp = models(shape)
    variants = {"cocomix cached": (cocomix, True), "cocomix uncached": (cocomix, False), "ntp cached": (ntp, True)}
    rates = timed_runs(variants, n_new, reps)
    return [dict(shape=shape, name=name, d=model.config.n_embd, active=count_params(model).active, tok_s=rates[name],
                 gflop=flops_per_token(model, n_new) / 1e9 if cache else None) for name, (model, cache) in variants.items()]


def report(rows: list[dict], n_new: int) -> None:
    print(f"\n{n_new} new tokens after a {PROMPT}-token prompt, batch 1, greedy, fp32\n")
    print("| shape | variant | width | active params | tokens/s | GFLOP / token (cached) |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        gflop = f"{r['gflop']:.3f}" if r["gflop"] is not None else "—"
        print(f"| {r['shape']} | {r['name']} | {r['d']} | {r['active'] / 1e6:.2f}M | {r['tok_s']:,.1f} | {gflop} |")
    print()
    for shape in dict.fromkeys(r["shape"] for r in rows):
        by = {r["name"]: r for r in rows if r["shape"] == shape}
        cached, full, ntp = by["cocomix cached"], by["cocomix uncached"], by["ntp cached"]
        print(f"{shape}: cocomix cached / uncached = {cached['tok_s'] / full['tok_s']:.1f}x (goal >= 5x at 256 tokens); "
              f"cocomix / ntp time per token = {ntp['tok_s'] / cached['tok_s']:.2f} (FLOP ratio {cached['gflop'] / ntp['gflop']:.2f})")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", default="tiny,69m", help="Comma-separated: tiny, 69m.")
    ap.add_argument("--tokens", type=int, default=256, help="New tokens per generation.")
    ap.add_argument("--reps", type=int, default=3, help="Timed runs per variant (median).")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads.")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {platform.machine()}, CPU threads {torch.get_num_threads()}, python {platform.python_version()}")
    rows = [r for shape in args.shapes.split(",") for r in bench_shape(shape, args.tokens, args.reps)]
    report(rows, args.tokens)


if __name__ == "__main__":
    main()
