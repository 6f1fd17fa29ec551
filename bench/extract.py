"""Stage-1 throughput: this extractor vs the official online extractor vs a bare teacher forward.

Runs in one process on the same random teacher, SAE and windows:

  (a) ours      ``attribution.label_batch``: no-grad lower blocks, input-only backward through
                the upper blocks and a chunked head, k gathered dot products per token
  (b) official  what RAM ``concept_extractor.py`` does: full forward, ``loss.backward()`` with
                gradients for every parameter, dense ``(grad @ W_dec) * latents`` over all
                latents, ``topk`` (fp32, as the official extractor runs outside autocast)
  (b_tl)        the same on the official code's own teacher, a TransformerLens HookedTransformer
                made from the same weights (einsum attention, hook points), when ``transformer-lens``
                3.x is installed; both references live in ``cocomix.stage1_extract.official``
  (c) forward   ``model(ids)`` under ``no_grad`` (fp32 as (a)): the floor
  (a_bf16)      (a) under bf16 autocast (``extract --dtype bfloat16``), on CUDA only
  (a_kd)        (a) with ``--kd-samples N`` KD targets drawn in the same head pass (uniforms made
                per window on the CPU, as ``extract`` does); printed as a_kd time / a time (goal <= 1.10)

Everything runs in fp32, with TF32 matmuls on CUDA as the official ``main.py`` sets them.

and prints tokens/s, the ratios a/b (goal >= 2 on CPU, >= 4 on GPU) and a/c (goal >= 0.5),
label agreement of (a) and (b) on slots with a positive score, and MFU on CUDA.

    python bench/extract.py                 # scaled-down GPT-2 shapes on CPU (fast)
    python bench/extract.py --full          # more windows, wider model (CPU)
    python bench/extract.py --gpu-shapes    # GPT-2 small: d 768, 12 layers, 32768 latents, window 1024
    python bench/extract.py --kd-samples 32 # + the cost of 32 KD samples per token
"""
from __future__ import annotations

import argparse
import copy
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from cocomix.stage1_extract import official
from cocomix.stage1_extract.attribution import AttributionSpec, label_batch
from cocomix.stage1_extract.kd_samples import batch_uniforms
from cocomix.stage1_extract.sae.model import TopKSAE
from cocomix.stage1_extract.teacher import Teacher

PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12}  # dense bf16 tensor-core peaks


@dataclass
class Shapes:
    d: int
    n_layer: int
    n_head: int
    vocab: int
    latents: int
    k: int
    window: int
    batch: int
    layer: int
    batches: int


CPU = Shapes(d=256, n_layer=6, n_head=4, vocab=8192, latents=4096, k=32, window=256, batch=4, layer=2, batches=5)
CPU_FULL = Shapes(d=512, n_layer=8, n_head=8, vocab=16384, latents=8192, k=32, window=512, batch=4, layer=3, batches=9)
GPU = Shapes(d=768, n_layer=12, n_head=12, vocab=50257, latents=32768, k=32, window=1024, batch=8, layer=5, batches=10)


def build(shapes: Shapes, device: torch.device) -> tuple[Teacher, TopKSAE]:
    """A random GPT-2 (stock HF module) and a random TopK SAE (unit-norm decoder, tied encoder)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=shapes.vocab, n_positions=max(1024, shapes.window), n_embd=shapes.d,
                     n_layer=shapes.n_layer, n_head=shapes.n_head)
    model = GPT2LMHeadModel(cfg).eval().requires_grad_(False).to(device)
    sae = TopKSAE(shapes.d, shapes.latents, shapes.k, normalize=True)
    with torch.no_grad():
        dec = torch.randn(shapes.d, shapes.latents)
        sae.W_dec.copy_(dec / dec.norm(dim=0, keepdim=True))
        sae.W_enc.copy_(sae.W_dec.T)
        sae.b_enc.normal_(0, 0.1)
    return Teacher(model=model, tokenizer=None, info={}), sae.requires_grad_(False).to(device)


def official_step(model, sae: TopKSAE, ids: torch.Tensor, layer: int, k_attr: int) -> torch.Tensor:
    """RAM concept_extractor on the HF teacher: forward, loss.backward() with parameter grads, dense attribution, topk."""
    x, grad = official.hf_grad(model, ids, layer, copy_model=False)
    with torch.no_grad():
        return official.official_attribution(official.sae_state(sae), x, grad, k_attr)


def build_official_tl(model):
    """The official extractor's own teacher: a TransformerLens ``HookedTransformer`` made from the same HF
    weights (``from_pretrained``'s default processing). None when ``transformer-lens`` is not installed."""
    try:
        return official.tl_teacher_from_hf(model)
    except ImportError:
        return None


def official_tl_step(model, sae: TopKSAE, ids: torch.Tensor, layer: int, k_attr: int) -> torch.Tensor:
    """RAM ``TransformerLensSAE.compute_attribute`` line by line (the reference in ``cocomix.stage1_extract.official``)."""
    x, grad = official.tl_grad(model, ids, layer)
    with torch.no_grad():
        return official.official_attribution(official.sae_state(sae), x, grad, k_attr)


def timed(methods: dict[str, Callable[[torch.Tensor], object]], batches: list[torch.Tensor],
          device: torch.device, clock=time.perf_counter) -> dict[str, float]:
    """tokens/s of each method: one warm-up call each, then the methods take turns on every batch
    (so a busy machine slows all of them alike) and each gets its median batch time (by ``clock``)."""
    for fn in methods.values():
        fn(batches[0])
    times: dict[str, list[float]] = {name: [] for name in methods}
    for ids in batches:
        for name, fn in methods.items():
            sync(device)
            t0 = clock()
            fn(ids)
            sync(device)
            times[name].append(clock() - t0)
    return {name: batches[0].numel() / statistics.median(ts) for name, ts in times.items()}


def peak_memory(fn, ids: torch.Tensor, device: torch.device) -> float:
    """Peak CUDA memory (GiB) of one call; NaN on CPU."""
    if device.type != "cuda":
        return float("nan")
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    fn(ids)
    sync(device)
    return torch.cuda.max_memory_allocated(device) / 2**30


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def flops_per_token(s: Shapes, ours: bool) -> float:
    """Model FLOPs per token: forward = 2 * (12 d^2 L + d V + causal attention); ours adds the
    input-only backward of the upper blocks and the head (~1x their forward)."""
    block = 2 * (12 * s.d * s.d + s.window * s.d)  # weights + causal attention (T/2 * 2 matmuls)
    head = 2 * s.d * s.vocab
    fwd = s.n_layer * block + head
    return fwd + ((s.n_layer - s.layer - 1) * block + head if ours else 0)


def agreement(ours, ref) -> float:
    """Share of slots with a positive official score where (a) has the same latent."""
    vals, idx = ref
    valid = vals > 0
    return float((ours.ids_BTK[valid] == idx[valid]).float().mean()) if valid.any() else float("nan")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--full", action="store_true", help="bigger CPU shapes and more windows")
    ap.add_argument("--gpu-shapes", action="store_true", help="GPT-2 small shapes (use on CUDA)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--batches", type=int, default=None, help="timed batches per method")
    ap.add_argument("--batch", type=int, default=None, help="windows per batch (e.g. 1 for --gpu-shapes on a CPU)")
    ap.add_argument("--kd-samples", type=int, default=0, help="also time (a) with this many KD samples per token (a_kd)")
    ap.add_argument("--only-kd", action="store_true", help="with --kd-samples: time only (a) and (a_kd)")
    args = ap.parse_args()
    shapes = GPU if args.gpu_shapes else CPU_FULL if args.full else CPU
    if args.batches:
        shapes.batches = args.batches
    if args.batch:
        shapes.batch = args.batch
    device = torch.device(args.device)
    if args.only_kd:
        run_kd(shapes, device, args.kd_samples or 32)
    else:
        run(shapes, device, args.kd_samples)


def kd_method(teacher, sae, shapes: Shapes, n_samples: int):
    """(a) with KD samples, the uniforms made as ``extract`` makes them (numpy, per window, on the CPU)."""
    spec = AttributionSpec(layer=shapes.layer, k_attr=4, kd_samples=n_samples)
    return lambda ids: label_batch(teacher, sae, ids, spec, batch_uniforms("train", 0, *ids.shape, n_samples))


def run_kd(shapes: Shapes, device: torch.device, n_samples: int) -> None:
    """Only (a) and (a_kd): the KD overhead, the same shapes, one run. On CPU the clock is this
    process's CPU time: on a shared machine wall time measures the neighbours (a 1-2 % effect can
    drown in 20 % of scheduling noise)."""
    teacher, sae = build(shapes, device)
    gen = torch.Generator().manual_seed(1)
    batches = [torch.randint(0, shapes.vocab, (shapes.batch, shapes.window), generator=gen).to(device)
               for _ in range(shapes.batches)]
    spec = AttributionSpec(layer=shapes.layer, k_attr=4)
    rates = timed({"a_ours": lambda ids: label_batch(teacher, sae, ids, spec),
                   "a_kd": kd_method(teacher, sae, shapes, n_samples)}, batches, device,
                  clock=time.perf_counter if device.type == "cuda" else time.process_time)
    print(f"device {device}; shapes {shapes}")
    for name, rate in rates.items():
        print(f"  {name:<11} {rate:>12,.0f} tokens/s")
    print(f"  a_kd time / a time = {rates['a_ours'] / rates['a_kd']:.3f}   ({n_samples} KD samples per token; goal <= 1.10)")


def run(shapes: Shapes, device: torch.device, kd_samples: int = 0) -> None:
    teacher, sae = build(shapes, device)
    gen = torch.Generator().manual_seed(1)
    batches = [torch.randint(0, shapes.vocab, (shapes.batch, shapes.window), generator=gen).to(device)
               for _ in range(shapes.batches)]
    if device.type == "cuda":  # as the official main.py, and `cocomix extract` on CUDA
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    spec = AttributionSpec(layer=shapes.layer, k_attr=4)  # the default `--dtype auto`: fp32 (TF32 on CUDA)
    bf16 = AttributionSpec(layer=shapes.layer, k_attr=4, autocast_dtype=torch.bfloat16)
    official_model = copy.deepcopy(teacher.model).requires_grad_(True)

    def forward_only(ids):
        with torch.no_grad():
            return teacher.model(ids).logits

    methods = {
        "a_ours": lambda ids: label_batch(teacher, sae, ids, spec),
        "b_official": lambda ids: official_step(official_model, sae, ids, shapes.layer, 4),
        "c_forward": forward_only,
    }
    if device.type == "cuda":  # `--dtype bfloat16`
        methods["a_ours_bf16"] = lambda ids: label_batch(teacher, sae, ids, bf16)
    if kd_samples:
        methods["a_kd"] = kd_method(teacher, sae, shapes, kd_samples)
    tl_model = build_official_tl(teacher.model)
    if tl_model is not None:
        tl_model = tl_model.to(device)
    if tl_model is not None:
        methods["b_official_tl"] = lambda ids: official_tl_step(tl_model, sae, ids, shapes.layer, 4)
    rates = timed(methods, batches, device)
    peaks = {name: peak_memory(fn, batches[0], device) for name, fn in methods.items()}
    ref = official_step(official_model, sae, batches[0], shapes.layer, 4)
    agree = {"a_ours": agreement(label_batch(teacher, sae, batches[0], spec), ref),
             "a_ours_bf16": agreement(label_batch(teacher, sae, batches[0], bf16), ref)}
    if tl_model is not None:
        agree["a_ours_vs_tl"] = agreement(label_batch(teacher, sae, batches[0], spec),
                                          official_tl_step(tl_model, sae, batches[0], shapes.layer, 4))
    report(shapes, device, rates, peaks, agree)


def report(shapes: Shapes, device: torch.device, rates: dict, peaks: dict, agree: dict) -> None:
    print(f"device {device} ({torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'}, "
          f"{torch.get_num_threads()} threads); shapes {shapes}")
    for name, rate in rates.items():
        line = f"  {name:<11} {rate:>12,.0f} tokens/s"
        if device.type == "cuda":
            line += f"   peak {peaks[name]:.1f} GiB"
            peak = next((v for k, v in PEAK_BF16_FLOPS.items() if k in torch.cuda.get_device_name(device)), None)
            if peak and name != "b_official":
                line += f"   MFU {rate * flops_per_token(shapes, name.startswith('a_ours')) / peak:.1%} (of the bf16 peak)"
        print(line)
    print(f"  a/b = {rates['a_ours'] / rates['b_official']:.2f}   (goal >= {4 if device.type == 'cuda' else 2}; both fp32{', TF32 matmuls' if device.type == 'cuda' else ''})")
    if "a_ours_bf16" in rates:
        print(f"  a_bf16/b = {rates['a_ours_bf16'] / rates['b_official']:.2f}   (`extract --dtype bfloat16` vs the official fp32)")
    if "b_official_tl" in rates:
        print(f"  a/b_tl = {rates['a_ours'] / rates['b_official_tl']:.2f}   (the official code's TransformerLens teacher)")
    else:
        print("  a/b_tl: not measured (pip install -e '.[bench]' for the official TransformerLens path)")
    print(f"  a/c = {rates['a_ours'] / rates['c_forward']:.2f}   (goal >= 0.5)")
    if "a_kd" in rates:
        print(f"  a_kd time / a time = {rates['a_ours'] / rates['a_kd']:.3f}   (KD samples in the same pass; goal <= 1.10)")
    print(f"  label agreement with (b) on positive-score slots: (a) {agree['a_ours']:.4f}, (a, bf16 autocast) {agree['a_ours_bf16']:.4f}")
    if "a_ours_vs_tl" in agree:
        print(f"  label agreement of (a) with (b_tl), the TransformerLens teacher of the same weights: {agree['a_ours_vs_tl']:.4f}")


if __name__ == "__main__":
    main()
