"""Evaluation benchmark: lm-evaluation-harness loglikelihood throughput on a CoCoMix checkpoint vs
the same model's plain batched forward over the same tokens.

    python bench/eval.py                # CPU: 69m proportions at d 128 (vocab 12564, 8192 latents, context 256)
    python bench/eval.py --gpu-shapes   # the 69m preset's shapes on CUDA (bf16 autocast, fp32 log-softmax)

Requests look like a multiple-choice / LAMBADA task: a context of 1/4..3/4 of the model's context
and a continuation of 1..8 tokens. The text is ``w<id>`` words under a word-level tokenizer, so the
harness tokenizes real strings and both sides score exactly the same token ids. The harness side
is the public ``HFLM.loglikelihood`` (tokenizing, sorting, batching with right padding, log-softmax,
per-request gather) on the checkpoint loaded as ``cocomix eval`` loads it; the plain side is one
forward per batch of the same sequences in the same order, a log-softmax and one gather. Both
give the same log-likelihoods (checked). Variants are timed round-robin; medians are reported.
Goal (issue 10): harness / plain throughput >= 0.7.
"""
from __future__ import annotations

import argparse
import dataclasses
import platform
import statistics
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.nn.functional as F

from cocomix.stage2_pretrain.evaluate import load_checkpoint_model
from cocomix.stage2_pretrain.harness import harness_lm
from cocomix.stage2_pretrain.presets import build_model, get_preset


def shapes(gpu: bool):
    """(preset, vocab, latents): the 69m preset, or its proportions at d 128 (as bench/pretrain.py)."""
    if gpu:
        return get_preset("69m"), 50257, 32768
    d = 128
    p = dataclasses.replace(get_preset("69m"), name="bench-cpu", cocomix_d=d, n_head=d // 64, context=2 * d, dropout=0.0)
    return p, round(50257 * d / 512), 64 * d


def word_tokenizer(vocab: int):
    """``w0 .. w{vocab-2}`` plus an end-of-text token: one word, one id."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = {f"w{i}": i for i in range(vocab - 1)} | {"<|endoftext|>": vocab - 1}
    tok = Tokenizer(models.WordLevel(words, unk_token="<|endoftext|>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", bos_token="<|endoftext|>",
                                   unk_token="<|endoftext|>", pad_token="<|endoftext|>")


def make_checkpoint(folder: Path, gpu: bool):
    preset, vocab, latents = shapes(gpu)
    torch.manual_seed(0)
    build_model("cocomix", preset, vocab_size=vocab, n_latents=latents).save_pretrained(folder)
    word_tokenizer(vocab).save_pretrained(folder)
    return preset.context, vocab


def make_requests(n: int, context: int, vocab: int, seed: int = 0) -> list[tuple[str, str]]:
    g = torch.Generator().manual_seed(seed)
    pairs = []
    for _ in range(n):
        n_ctx = int(torch.randint(context // 4, 3 * context // 4, (1,), generator=g))
        n_cont = int(torch.randint(1, 9, (1,), generator=g))
        ids = torch.randint(0, vocab - 1, (n_ctx + n_cont,), generator=g).tolist()
        pairs.append((" ".join(f"w{i}" for i in ids[:n_ctx]), " " + " ".join(f"w{i}" for i in ids[n_ctx:])))
    return pairs


def harness_scores(lm, pairs) -> list[float]:
    from lm_eval.api.instance import Instance

    return [ll for ll, _ in lm.loglikelihood([Instance("loglikelihood", {}, p, i) for i, p in enumerate(pairs)], disable_tqdm=True)]


@torch.no_grad()
def plain_scores(model, batches, device, autocast) -> list[float]:
    """One forward per batch of right-padded (context + continuation[:-1]) sequences, a log-softmax, a gather."""
    out = []
    for ids_list, n_cont in batches:
        T = max(len(x) for x in ids_list)
        inp_BT = torch.zeros(len(ids_list), T - 1, dtype=torch.long)
        for b, ids in enumerate(ids_list):
            inp_BT[b, :len(ids) - 1] = torch.tensor(ids[:-1])
        with autocast():
            logits_BTV = model(inp_BT.to(device)).logits
        logp_BTV = F.log_softmax(logits_BTV.float(), dim=-1)
        for b, (ids, c) in enumerate(zip(ids_list, n_cont, strict=True)):
            pos = torch.arange(len(ids) - 1 - c, len(ids) - 1, device=device)
            out.append(logp_BTV[b, pos, torch.tensor(ids[-c:], device=device)].sum())
    return [float(x) for x in out]


def plain_batches(tok, pairs, batch_size: int):
    """The harness's order (longest first) and batch size, so both sides pad alike."""
    seqs = sorted(((tok.encode(c + x), len(tok.encode(x))) for c, x in pairs), key=lambda s: -len(s[0]))
    return [([s for s, _ in seqs[i:i + batch_size]], [n for _, n in seqs[i:i + batch_size]]) for i in range(0, len(seqs), batch_size)]


def sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gpu-shapes", action="store_true", help="The 69m preset's shapes on CUDA.")
    ap.add_argument("--requests", type=int, default=None, help="Requests per round (default 64 CPU, 2048 GPU).")
    ap.add_argument("--batch-size", type=int, default=None, help="Requests per forward (default 8 CPU, 64 GPU).")
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    device = torch.device("cuda" if args.gpu_shapes else "cpu")
    n_req, bs = args.requests or (2048 if args.gpu_shapes else 64), args.batch_size or (64 if args.gpu_shapes else 8)
    autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if device.type == "cuda" else nullcontext
    with tempfile.TemporaryDirectory() as tmp:
        context, vocab = make_checkpoint(Path(tmp), args.gpu_shapes)
        model = load_checkpoint_model(Path(tmp)).to(device).eval()
        tok = word_tokenizer(vocab)
    lm = harness_lm(model, tok, batch_size=bs)
    pairs = make_requests(n_req, context, vocab)
    batches = plain_batches(tok, pairs, bs)
    tokens = sum(len(s) - 1 for b, _ in batches for s in b)
    got = harness_scores(lm, pairs)
    want = dict(zip(sorted(range(n_req), key=lambda i: -len(tok.encode(pairs[i][0] + pairs[i][1]))), plain_scores(model, batches, device, autocast), strict=True))
    tol = dict(rtol=2e-2, atol=5e-2) if device.type == "cuda" else dict(rtol=1e-4, atol=1e-3)
    torch.testing.assert_close(torch.tensor(got), torch.tensor([want[i] for i in range(n_req)]), **tol)
    clock = time.perf_counter if device.type == "cuda" else time.process_time  # CPU: this process's time (shared cores)
    times = {"harness": [], "plain": []}
    for _ in range(args.rounds):
        for name, fn in (("harness", lambda: harness_scores(lm, pairs)), ("plain", lambda: plain_scores(model, batches, device, autocast))):
            sync(device)
            t0 = clock()
            fn()
            sync(device)
            times[name].append(clock() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"device {torch.cuda.get_device_name() if device.type == 'cuda' else platform.processor() or 'cpu'}, torch {torch.__version__}, "
          f"CoCoMix d {model.config.n_embd}, {model.config.n_layer} layers, vocab {vocab}, latents {model.config.n_latents}, context {context}")
    print(f"{n_req} requests, batch {bs}, {tokens:,} input tokens per round, {args.rounds} rounds (medians)")
    print("| path | s/round | tokens/s |\n|---|---|---|")
    for name in ("harness", "plain"):
        print(f"| {name} | {med[name]:.3f} | {tokens / med[name]:,.0f} |")
    print(f"harness / plain throughput: {med['plain'] / med['harness']:.2f} (goal >= 0.7); log-likelihoods equal (checked)")


if __name__ == "__main__":
    main()
