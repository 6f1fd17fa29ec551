"""Stage-2 benchmark: CoCoMix vs NTP training-step time at matched active parameters (one process),
the official dense compress for comparison, and the data loader's rate vs what a step consumes.

    python bench/pretrain.py               # CPU: 69m proportions at d 128 (vocab 12564, 8192 latents, context 256)
    python bench/pretrain.py --full        # CPU: the same at d 256
    python bench/pretrain.py --gpu-shapes  # the 69m preset's shapes on CUDA, bf16 autocast, fused AdamW, MFU
    python bench/pretrain.py --methods     # every method (kd, pause, ablations) vs NTP beside its FLOP ratio

A step = forward + backward + AdamW step (+ zero_grad). The variants are timed round-robin (a
round of each, repeated) so that load drift on a shared machine hits them alike; medians are
reported. Goals (cost model in docs/ARCHITECTURE.md): CoCoMix/NTP step-time ratio <= 1.35, loader >= 10x
the step's token consumption; with ``--methods``, each method's step time / NTP's within 1.10x of its
FLOP ratio (:func:`method_flops_per_token`), every method at the width matched to the CoCoMix student.
"""
from __future__ import annotations

import argparse
import dataclasses
import platform
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from cocomix.core.layernorm import layernorm_unbiased
from cocomix.stage2_pretrain.data import MicroBatch
from cocomix.stage2_pretrain.methods import MethodSpec, StudentShape, build_student, match_width, micro_loss
from cocomix.stage2_pretrain.model import ConceptBottleneck, ConceptStep, concept_ce
from cocomix.stage2_pretrain.presets import Preset, build_model, count_params, get_preset, match_ntp_width

EST_69M_TOK_S = 0.4 * 989e12 / 645.2e6  #: 40% MFU on an H200 / 69m CoCoMix training FLOPs per token
PEAK_BF16_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10": 125.0}


@dataclass
class Shapes:
    preset: Preset
    vocab: int
    n_latents: int
    k_attr: int = 4
    match: bool = True  #: search the NTP width (False: the preset's own, e.g. the paper's 624 at 69m)


def cpu_shapes(full: bool) -> Shapes:
    """The 69m preset's proportions scaled down: vocab ~98 d, latents 64 d, context 2 d, 8 layers, insert 3.

    With these ratios every FLOP term scales as d^2, so the CoCoMix/NTP FLOP ratio equals the 69m one.
    """
    d = 256 if full else 128
    p = dataclasses.replace(get_preset("69m"), name="bench-cpu", cocomix_d=d, n_head=d // 64, micro_batch=4,
                            context=2 * d, dropout=0.0)
    return Shapes(p, vocab=round(50257 * d / 512), n_latents=64 * d)


def gpu_shapes() -> Shapes:
    return Shapes(get_preset("69m"), vocab=50257, n_latents=32768, match=False)


class DenseBottleneck(ConceptBottleneck):
    """The official compress ``compress_layer(mask * z)``: a [.., L] @ [L, D] product (comparison only)."""

    def compress_sparse(self, idx_BTC, val_BTC, norm):
        z_BTL = torch.zeros(*idx_BTC.shape[:2], self.predictor.out_features, dtype=val_BTC.dtype,
                            device=val_BTC.device).scatter(-1, idx_BTC, val_BTC)  # = mask * z
        return self._denormalize(z_BTL.to(self.compress.weight.dtype) @ self.compress.weight, norm)


class UnfusedBottleneck(ConceptBottleneck):
    """Plain autograd ``topk`` + :func:`concept_ce` instead of the fused :class:`SelectAndScore`."""

    def forward(self, h_BTD: torch.Tensor, concept_ids: torch.Tensor | None = None, **_) -> ConceptStep:
        ids_BTK = concept_ids
        norm = layernorm_unbiased(h_BTD)
        z_BTL = self.predictor(norm.x - self.pre_bias)
        top = z_BTL.topk(self.k_concept, dim=-1)
        loss = None if ids_BTK is None else concept_ce(z_BTL, ids_BTK, self.ignore_id)
        return ConceptStep(z_BTL, top.indices, top.values, self.compress_sparse(top.indices, top.values, norm), loss)


VARIANTS = {"cocomix-dense-compress": DenseBottleneck, "cocomix-unfused-loss": UnfusedBottleneck}


def build_variants(shapes: Shapes, device: str) -> dict[str, torch.nn.Module]:
    """NTP at the matched width, CoCoMix as shipped, and CoCoMix with one optimisation undone each."""
    if shapes.match:
        shapes.preset = match_ntp_width(shapes.preset, shapes.vocab, shapes.n_latents, shapes.k_attr).preset
    p, kw = shapes.preset, dict(vocab_size=shapes.vocab, n_latents=shapes.n_latents, k_attr=shapes.k_attr)
    torch.manual_seed(0)
    models = {"ntp": build_model("ntp", p, **kw), "cocomix": build_model("cocomix", p, **kw)}
    for name, cls in VARIANTS.items():
        models[name] = build_model("cocomix", p, **kw)
        models[name].concept.__class__ = cls
    return {name: m.to(device).train() for name, m in models.items()}


def make_batch(shapes: Shapes, device: str) -> dict[str, torch.Tensor]:
    p, g = shapes.preset, torch.Generator().manual_seed(0)
    ids = torch.randint(0, shapes.vocab, (p.micro_batch, p.context), generator=g)
    cids = torch.randint(0, shapes.n_latents, (p.micro_batch, p.context, shapes.k_attr), generator=g)
    cids[:, -1] = 65535  # a window's last position has no labels
    return {"input_ids": ids.to(device), "concept_ids": cids.to(device)}


def train_step(model, opt, batch, device: str) -> None:
    inputs = dict(input_ids=batch["input_ids"], labels=batch["input_ids"])
    if hasattr(model, "concept"):
        inputs["concept_ids"] = batch["concept_ids"]
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.startswith("cuda")):
        loss = model(**inputs).loss
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


def time_variants(models, batch, device: str, rounds: int, steps: int) -> dict[str, float]:
    """Median seconds per step of each model, measured round-robin.

    On CPU the clock is this process's CPU time (``time.process_time``): the benchmark machine's
    cores are shared, and wall time there measures the neighbours as much as the model.
    """
    clock = time.perf_counter if device.startswith("cuda") else time.process_time
    opts = {n: torch.optim.AdamW(m.parameters(), lr=1e-4, weight_decay=0.1, fused=device.startswith("cuda"))
            for n, m in models.items()}
    times: dict[str, list[float]] = {n: [] for n in models}
    for n in models:  # warm-up (allocator, kernels, optimizer state)
        for _ in range(2):
            train_step(models[n], opts[n], batch, device)
    for _ in range(rounds):
        for n, m in models.items():
            sync(device)
            t0 = clock()
            for _ in range(steps):
                train_step(m, opts[n], batch, device)
            sync(device)
            times[n].append((clock() - t0) / steps)
    return {n: statistics.median(t) for n, t in times.items()}


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def train_flops_per_token(name: str, shapes: Shapes) -> float:
    """PaLM-style count: 6 x matmul params per position + 12 x layers x d x context for attention."""
    p, V, L = shapes.preset, shapes.vocab, shapes.n_latents
    T = p.context
    if name == "ntp":
        d = p.ntp_d
        return 6 * (12 * d * d * p.n_layer + d * V) + 12 * p.n_layer * d * T
    d, low = p.cocomix_d, p.insert_layer
    up = p.n_layer - low
    compress = L if name == "cocomix-dense-compress" else p.k_concept
    lower = 6 * 12 * d * d * low + 12 * low * d * T
    upper = 2 * (6 * 12 * d * d * up + 12 * up * d * 2 * T)  # two positions per token, 2T context
    return lower + upper + 6 * (d * L + compress * d + d * V)


def peak_flops(device: str) -> float | None:
    if not device.startswith("cuda"):
        return None
    name = torch.cuda.get_device_name()
    return next((tf * 1e12 for key, tf in PEAK_BF16_TFLOPS.items() if key in name), None)


def bench_models(shapes: Shapes, device: str, rounds: int, steps: int) -> list[dict]:
    models = build_variants(shapes, device)
    batch = make_batch(shapes, device)
    secs = time_variants(models, batch, device, rounds, steps)
    tokens = shapes.preset.micro_batch * shapes.preset.context
    peak, rows = peak_flops(device), []
    for name, model in models.items():
        count = count_params(model)
        tps = tokens / secs[name]
        mfu = None if peak is None else train_flops_per_token(name, shapes) * tps / peak
        rows.append(dict(name=name, total=count.total, active=count.active, step_s=secs[name], tok_s=tps, mfu=mfu,
                         ratio=secs[name] / secs["ntp"]))
    return rows


# ----------------------------------------------------------------------------- --methods
METHOD_SPECS = {  # every `pretrain` method and CoCoMix ablation whose cost differs
    "ntp": MethodSpec("ntp"), "kd": MethodSpec("kd"), "pause": MethodSpec("pause"), "pause-kd": MethodSpec("pause-kd"),
    "cocomix": MethodSpec(), "mix-add": MethodSpec(mix="add"), "mix-none": MethodSpec(mix="none"),
    "hidden": MethodSpec(concept_target="hidden"), "hidden-add": MethodSpec(concept_target="hidden", mix="add"),
}
KD_SAMPLES = 32


def method_flops_per_token(spec: MethodSpec, shapes: Shapes, width: int, d_teacher: int) -> float:
    """Training FLOPs per token (6 x matmul params per position + 12 x layers x d x context for attention).

    Interleaving students (pause, CoCoMix ``interleave``) run the upper blocks on two positions per
    token over a 2T context; the head reads T positions. KD's gathers and the concept-loss passes
    over z are not matmuls and do not count (they are what the measurement adds to the model).
    """
    p, V, L, d, T = shapes.preset, shapes.vocab, shapes.n_latents, width, shapes.preset.context
    up = p.n_layer - p.insert_layer
    doubled = spec.arch == "pause" or (spec.arch == "cocomix" and spec.mix == "interleave")
    blocks = 6 * 12 * d * d * p.n_layer + 12 * p.n_layer * d * T
    if doubled:  # the upper blocks again on the second position, attention over 2T: 2 x (1x -> 4x)
        blocks += 6 * 12 * d * d * up + 12 * up * d * T * 3
    head = 6 * d * V
    if spec.arch != "cocomix":
        return blocks + head
    if spec.concept_target == "hidden":
        concept = 6 * (d * d_teacher + d_teacher * d_teacher) + (6 * d_teacher * d if spec.mix != "none" else 0)
    else:
        concept = 6 * d * L + (6 * p.k_concept * d if spec.mix != "none" else 0)
    return blocks + head + concept


def method_batch(shapes: Shapes, d_teacher: int) -> MicroBatch:
    p, g = shapes.preset, torch.Generator().manual_seed(0)
    ids = torch.randint(0, shapes.vocab, (p.micro_batch, p.context), generator=g)
    cids = torch.randint(0, shapes.n_latents, (p.micro_batch, p.context, shapes.k_attr), generator=g)
    kd = torch.randint(0, shapes.vocab, (p.micro_batch, p.context, KD_SAMPLES), generator=g)
    hidden = torch.randn(p.micro_batch, p.context, d_teacher, generator=g).half()
    return MicroBatch(ids, cids, {"kd_ids": kd, "hidden": hidden})


def bench_methods(shapes: Shapes, device: str, rounds: int, steps: int) -> list[dict]:
    """Every method at its matched width: step time / NTP's beside FLOPs / NTP's."""
    d_teacher = round(1.5 * shapes.preset.cocomix_d)  # GPT-2 small (768) over the 69m student (512)
    shape = StudentShape(shapes.vocab, shapes.n_latents, shapes.k_attr, 65535, None, d_teacher)
    preset = shapes.preset if not shapes.match else dataclasses.replace(shapes.preset, name="bench")
    widths = {n: match_width(spec, preset, shape).width for n, spec in METHOD_SPECS.items()}
    if not shapes.match:  # paper shapes: the table's NTP width for NTP and KD (match_width keeps it too)
        widths.update(ntp=preset.ntp_d, kd=preset.ntp_d)
    torch.manual_seed(0)
    models = {n: build_student(spec, preset, widths[n], shape).to(device).train() for n, spec in METHOD_SPECS.items()}
    batch = method_batch(shapes, d_teacher)
    step = lambda name: method_step(METHOD_SPECS[name], models[name], batch, device)  # noqa: E731
    secs = time_steps({n: (lambda n=n: step(n)) for n in models}, models, device, rounds, steps)
    flops = {n: method_flops_per_token(METHOD_SPECS[n], shapes, widths[n], d_teacher) for n in models}
    return [dict(name=n, width=widths[n], active=count_params(models[n]).active, step_s=secs[n],
                 ratio=secs[n] / secs["ntp"], flop_ratio=flops[n] / flops["ntp"]) for n in models]


_OPTS: dict = {}


def method_step(spec: MethodSpec, model, batch: MicroBatch, device: str) -> None:
    opt = _OPTS.setdefault(id(model), torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.1,
                                                        fused=device.startswith("cuda")))
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.startswith("cuda")):
        out = micro_loss(spec, model, batch, device)
    out.loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


def time_steps(fns: dict, models: dict, device: str, rounds: int, steps: int) -> dict[str, float]:
    """Median seconds per step, round-robin (CPU: process time, as :func:`time_variants`)."""
    clock = time.perf_counter if device.startswith("cuda") else time.process_time
    times: dict[str, list[float]] = {n: [] for n in fns}
    for fn in fns.values():
        for _ in range(2):
            fn()
    for _ in range(rounds):
        for n, fn in fns.items():
            sync(device)
            t0 = clock()
            for _ in range(steps):
                fn()
            sync(device)
            times[n].append((clock() - t0) / steps)
    return {n: statistics.median(t) for n, t in times.items()}


def report_methods(rows: list[dict], shapes: Shapes, device: str) -> None:
    p = shapes.preset
    print(f"\nmethods at matched active params ({p.n_layer} layers, insert {p.insert_layer}, vocab {shapes.vocab}, "
          f"latents {shapes.n_latents}, {KD_SAMPLES} KD samples, micro-batch {p.micro_batch} x context {p.context}, {device})")
    print("| method | width | active params | step (ms) | step / NTP | FLOPs / NTP | step ratio / FLOP ratio |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['name']} | {r['width']} | {r['active'] / 1e6:.2f}M | {1e3 * r['step_s']:.1f} | {r['ratio']:.3f} | "
              f"{r['flop_ratio']:.3f} | {r['ratio'] / r['flop_ratio']:.3f} |")
    worst = max(rows, key=lambda r: r["ratio"] / r["flop_ratio"])
    print(f"worst step ratio / FLOP ratio: {worst['ratio'] / worst['flop_ratio']:.3f} ({worst['name']}; goal <= 1.10)")


def bench_loader(shapes: Shapes, n_steps: int) -> dict:
    """Tokens/s of the real training stream (target shards -> int64 micro-batches) at the shapes' batch."""
    try:
        from cocomix.stage2_pretrain.data import DataState, TargetSource, TrainStream
        from cocomix.storage.targets import TargetReader
    except ImportError as e:
        return {"missing": str(e)}
    p = shapes.preset
    with tempfile.TemporaryDirectory() as tmp:
        reader = TargetReader.open(write_synthetic_targets(Path(tmp), shapes))
        aligned = reader.window_length == p.context  # else (--context override) read as the free ablation does
        stream = TrainStream(TargetSource(reader, "train", aligned=aligned), context=p.context, micro=p.micro_batch,
                             accum=1, world=1, rank=0, seed=0, offsets=reader.offsets if aligned else None)
        state = stream.next_step(DataState()).state  # first touch of the memory map
        t0 = time.perf_counter()
        for _ in range(n_steps):
            state = stream.next_step(state).state
        secs = time.perf_counter() - t0
    return {"tok_s": n_steps * p.micro_batch * p.context / secs}


def write_synthetic_targets(out: Path, shapes: Shapes, n_tokens: int = 1 << 21) -> Path:
    """Random tokens and labels written through the real :class:`TargetWriter`."""
    from cocomix.storage.targets import TargetWriter, id_dtype, plan_shards
    rng, K, window = np.random.default_rng(0), shapes.k_attr, 1024
    plan = plan_shards({"train": n_tokens}, window=window, windows_per_shard=512)
    ids_dtype = id_dtype(shapes.n_latents)
    meta = {"sae": {"n_latents": shapes.n_latents}, "k_attr": K, "window": window, "bench": True}
    with TargetWriter(out, meta=meta, plan=plan, k_attr=K, id_dtype=ids_dtype, score_dtype=np.float16,
                      token_dtype=np.uint16) as writer:
        for spec in writer.pending():
            n = spec.end - spec.start
            assert writer.claim(spec)
            writer.write_shard(spec, rng.integers(0, shapes.vocab, n, dtype=np.uint16),
                               rng.integers(0, shapes.n_latents, (n, K)).astype(ids_dtype),
                               rng.random((n, K), dtype=np.float32).astype(np.float16))
        writer.finalize()
    return out


def report(rows: list[dict], loader: dict | None, shapes: Shapes, device: str) -> None:
    p = shapes.preset
    print(f"\nshapes: cocomix d {p.cocomix_d} / ntp d {p.ntp_d} ({'matched' if shapes.match else 'preset'}), {p.n_layer} layers, {p.n_head} heads, "
          f"insert {p.insert_layer}, vocab {shapes.vocab}, latents {shapes.n_latents}, k_concept {p.k_concept}, "
          f"micro-batch {p.micro_batch} x context {p.context}, device {device}")
    print("| variant | total params | active params | step (ms) | tokens/s | MFU | step / NTP |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        mfu = "-" if r["mfu"] is None else f"{100 * r['mfu']:.1f}%"
        print(f"| {r['name']} | {r['total'] / 1e6:.2f}M | {r['active'] / 1e6:.2f}M | {1e3 * r['step_s']:.1f} | "
              f"{r['tok_s']:,.0f} | {mfu} | {r['ratio']:.3f} |")
    by = {r["name"]: r for r in rows}
    ours = by["cocomix"]["step_s"]
    print(f"\nCoCoMix/NTP step-time ratio: {by['cocomix']['ratio']:.3f} (goal <= 1.35); "
          f"sparse/dense compress: {ours / by['cocomix-dense-compress']['step_s']:.3f}; "
          f"fused/unfused concept loss: {ours / by['cocomix-unfused-loss']['step_s']:.3f}")
    if loader is None or "missing" in loader:
        print(f"data loader: not measured ({(loader or {}).get('missing', 'skipped')})")
        return
    need = by["cocomix"]["tok_s"]
    print(f"data loader (target shards -> int64 batches of 16 x 1024, one thread): {loader['tok_s']:,.0f} tokens/s = "
          f"{loader['tok_s'] / need:,.1f}x this CoCoMix step's consumption ({need:,.0f} tokens/s) (goal >= 10x)")
    print(f"  vs a 69m CoCoMix step at 40% MFU of an H200 ({EST_69M_TOK_S:,.0f} tokens/s per GPU, estimated): "
          f"{loader['tok_s'] / EST_69M_TOK_S:.1f}x")


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--full", action="store_true", help="bigger CPU shapes, more rounds")
    ap.add_argument("--gpu-shapes", action="store_true", help="69m preset shapes on CUDA (bf16, MFU)")
    ap.add_argument("--device", default=None, help="override the device (e.g. a CPU smoke run of --gpu-shapes)")
    ap.add_argument("--micro-batch", type=int, default=None, help="override the windows per step")
    ap.add_argument("--context", type=int, default=None, help="override the window length")
    ap.add_argument("--rounds", type=int, default=None, help="round-robin rounds (default 5 CPU, 10 GPU)")
    ap.add_argument("--steps", type=int, default=None, help="steps per variant per round (default 1 CPU, 5 GPU)")
    ap.add_argument("--threads", type=int, default=1, help="CPU threads (default 1: stable CPU-time figures)")
    ap.add_argument("--no-loader", action="store_true", help="skip the data-loader measurement")
    ap.add_argument("--methods", action="store_true", help="time every pretrain method vs NTP beside its FLOP ratio (only)")
    return ap.parse_args()


def main() -> None:
    args = parse_args()
    device = args.device or ("cuda" if args.gpu_shapes else "cpu")
    if device == "cpu":
        torch.set_num_threads(args.threads)
    elif not torch.cuda.is_available():
        raise SystemExit(f"--device {device} needs CUDA; none is available here")
    else:
        torch.backends.cuda.matmul.allow_tf32 = True
    shapes = gpu_shapes() if args.gpu_shapes else cpu_shapes(args.full)
    shapes.preset = dataclasses.replace(shapes.preset, micro_batch=args.micro_batch or shapes.preset.micro_batch,
                                        context=args.context or shapes.preset.context)
    rounds = args.rounds or (10 if device.startswith("cuda") else (7 if args.full else 5))
    steps = args.steps or (5 if device.startswith("cuda") else 1)
    gpu = torch.cuda.get_device_name() if device.startswith("cuda") else "no GPU"
    print(f"torch {torch.__version__}, {platform.machine()}, CPU threads {torch.get_num_threads()}, {gpu}")
    if args.methods:
        report_methods(bench_methods(shapes, device, rounds, steps), shapes, device)
        return
    rows = bench_models(shapes, device, rounds, steps)
    loader = None if args.no_loader else bench_loader(gpu_shapes(), n_steps=50)  # the 69m batch: 16 x 1024
    report(rows, loader, shapes, device)


if __name__ == "__main__":
    main()
