"""SAE benchmark: sparse TopK decode vs the dense reference, and one ``sae train`` step vs a plain dense step.

    python bench/sae.py          # GPT-2-small SAE shapes (d 768, 32768 latents, k 32), 1024 tokens
    python bench/sae.py --full   # 4096 tokens per batch

Variants, all on the same random weights and inputs, timed round-robin (medians):

* decode: ``TopKSAE.decode_normalized`` (``embedding_bag`` over the column-major ``W_dec``),
  the same on a row-major ``W_dec`` (what a plain ``nn.Linear``-layout decoder gives), and
  OpenAI ``model.py``'s dense decode (scatter into ``[N, L]``, ``decoder(z)``).
* train step: ``sae_train.train_step`` (encoder gradient through the selected latents only,
  sparse decode, AuxK, projected decoder gradient, Adam) vs the same recipe with dense
  latents, dense autograd and a dense decoder (OpenAI ``model.py`` arithmetic). Every latent
  is dead, so AuxK (256 latents) runs in both.
"""
from __future__ import annotations

import argparse
import datetime
import math
import platform
import statistics
import time

import torch
import torch.nn.functional as F

from cocomix.core.layernorm import layernorm_unbiased
from cocomix.stage1_extract.config import SaeTrainConfig
from cocomix.stage1_extract.sae import recipe as sae_recipe

D, L, K = 768, 32768, 32


def timed(fns: dict, reps: int) -> dict[str, float]:
    """Median seconds of each variant; one warm-up call each, then rounds of one call per variant
    (round-robin, so load drift on a shared machine hits all variants alike)."""
    for fn in fns.values():
        fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(reps):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(ts) for name, ts in times.items()}


def make_sae(x_ND: torch.Tensor) -> sae_recipe.TopKSAE:
    return sae_recipe.init_sae(x_ND, L, K, torch.Generator().manual_seed(0))


def bench_decode(sae, x_ND, reps: int) -> dict[str, float]:
    enc = sae.encode_normalized(x_ND)
    W_row_DL = sae.W_dec.detach().contiguous()  # row-major [D, L]

    def dense():
        z_NL = torch.zeros(len(x_ND), L).scatter_(-1, enc.top_idx, enc.top_val)
        return z_NL @ sae.W_dec.T + sae.b_pre

    def row_major():
        return F.embedding_bag(enc.top_idx, W_row_DL.t(), per_sample_weights=enc.top_val, mode="sum") + sae.b_pre

    torch.testing.assert_close(sae.decode_normalized(enc.top_idx, enc.top_val), dense(), atol=1e-4, rtol=1e-4)
    with torch.no_grad():
        return timed({"sparse (column-major W_dec)": lambda: sae.decode_normalized(enc.top_idx, enc.top_val),
                      "sparse (row-major W_dec)": row_major, "dense (scatter + matmul)": dense}, reps)


def dense_step(sae, opt, x_ND, cfg, mse_scale) -> None:
    """The recipe with OpenAI ``model.py`` arithmetic: dense latents [N, L], dense decoder, dense AuxK."""
    pre_NL = sae.pre_activations(x_ND)
    top = pre_NL.topk(K, dim=-1)
    z_NL = torch.zeros_like(pre_NL).scatter(-1, top.indices, F.relu(top.values))
    recons_ND = z_NL @ sae.W_dec.T + sae.b_pre
    dead_L = torch.ones(L, dtype=torch.bool)
    aux = pre_NL.masked_fill(~dead_L, -math.inf).topk(cfg.auxk, dim=-1)
    z_aux_NL = torch.zeros_like(pre_NL).scatter(-1, aux.indices, F.relu(aux.values))
    loss = (recons_ND - x_ND).pow(2).mean() * mse_scale + cfg.auxk_coef * sae_recipe.normalized_mse(z_aux_NL @ sae.W_dec.T, x_ND - recons_ND.detach())
    opt.zero_grad(set_to_none=True)
    loss.backward()
    sae_recipe.project_decoder_grad_(sae)
    opt.step()
    sae_recipe.normalize_decoder_(sae)


def bench_step(x_ND, reps: int) -> dict[str, float]:
    cfg = SaeTrainConfig(teacher="t", tokens="s", layer=0, out="o", latents=L, k=K, dead_tokens=1)
    ours, plain = make_sae(x_ND), make_sae(x_ND)
    opt_ours = torch.optim.Adam(ours.parameters(), lr=cfg.lr, eps=sae_recipe.ADAM_EPS)
    opt_plain = torch.optim.Adam(plain.parameters(), lr=cfg.lr, eps=sae_recipe.ADAM_EPS)
    tracker = sae_recipe.DeadTracker(L, torch.device("cpu"))
    tracker.since_L += 10  # every latent dead: AuxK always on, as in the dense variant
    return timed({"train_step (sparse grads, sparse decode)": lambda: sae_recipe.train_step(ours, opt_ours, x_ND, tracker, cfg, 1.0),
                  "dense step (OpenAI model.py arithmetic)": lambda: dense_step(plain, opt_plain, x_ND, cfg, 1.0)}, reps)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--full", action="store_true", help="4096 tokens per batch instead of 1024")
    parser.add_argument("--reps", type=int, default=2)
    args = parser.parse_args()
    n = 4096 if args.full else 1024
    torch.manual_seed(0)
    x_ND = layernorm_unbiased(torch.randn(n, D)).x
    print(f"# bench/sae.py  {datetime.date.today()}  {platform.processor() or platform.machine()}, "
          f"{torch.get_num_threads()} threads, torch {torch.__version__}")
    print(f"shapes: d {D}, latents {L}, k {K}, {n} tokens per batch")
    for title, results in (("decode", bench_decode(make_sae(x_ND), x_ND, args.reps)), ("train step", bench_step(x_ND, args.reps))):
        base = max(results.values())
        print(f"\n{title}:")
        for name, sec in results.items():
            print(f"  {name:42s} {sec * 1e3:9.1f} ms  {n / sec:12,.0f} tok/s  x{base / sec:5.1f} vs slowest")


if __name__ == "__main__":
    main()
