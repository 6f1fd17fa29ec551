"""The quickstart's teacher vs its students: training-step time of the `tiny` NTP model at the
teacher's width (``--teacher-width``, 128) against the NTP student's (72), and the CoCoMix student's.

    python bench/quickstart_teacher.py [--steps 30] [--teacher-width 128]

A step = forward + backward + AdamW step on one global batch of the `tiny` preset (8 windows of 128
tokens, vocabulary 4096, 1024 SAE latents: the quickstart's defaults), on random token ids. The
variants are timed round-robin (one step of each, repeated) so that load drift on a shared machine
hits them alike; medians are reported with the ratio to the NTP student. The quickstart's wall time
is about (teacher + two students) x 3000 steps plus SAE training and extraction, so the ratio says
what a wider teacher adds to it.
"""
from __future__ import annotations

import argparse
import dataclasses
import statistics
import time

import torch

from cocomix.stage2_pretrain.presets import build_model, count_params, get_preset, match_ntp_width

VOCAB, LATENTS, K_ATTR = 4096, 1024, 4


def make_variants(teacher_width: int) -> dict:
    preset = get_preset("tiny")
    ntp_preset = match_ntp_width(preset, VOCAB, LATENTS, K_ATTR).preset
    torch.manual_seed(0)
    return {
        "ntp student": build_model("ntp", ntp_preset, vocab_size=VOCAB),
        "cocomix student": build_model("cocomix", preset, vocab_size=VOCAB, n_latents=LATENTS, k_attr=K_ATTR),
        f"teacher (d {teacher_width})": build_model("ntp", dataclasses.replace(preset, ntp_d=teacher_width), vocab_size=VOCAB),
    }


def step_fn(model, preset):
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    ids_BT = torch.randint(0, VOCAB, (preset.micro_batch, preset.context))
    concepts_BTK = torch.randint(0, LATENTS, (preset.micro_batch, preset.context, K_ATTR))
    cocomix = type(model).__name__.startswith("CoCoMix")

    def step() -> float:
        t0 = time.perf_counter()
        out = model(input_ids=ids_BT, labels=ids_BT, concept_ids=concepts_BTK) if cocomix else model(input_ids=ids_BT, labels=ids_BT)
        loss = out.ntp_loss + 0.1 * out.concept_loss if cocomix else out.loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return time.perf_counter() - t0

    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--teacher-width", type=int, default=128)
    args = parser.parse_args()
    preset = get_preset("tiny")
    variants = make_variants(args.teacher_width)
    steps = {name: step_fn(model, preset) for name, model in variants.items()}
    times = {name: [] for name in variants}
    for _ in range(3):  # warm-up
        for step in steps.values():
            step()
    for _ in range(args.steps):
        for name, step in steps.items():
            times[name].append(step())
    base = statistics.median(times["ntp student"])
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.steps} rounds")
    for name, ts in times.items():
        med = statistics.median(ts)
        active = count_params(variants[name]).active
        print(f"{name:<18} {active:>10,} active params  {med * 1e3:7.1f} ms/step  "
              f"{preset.batch_tokens / med:8,.0f} tok/s  {med / base:4.2f}x the NTP student")


if __name__ == "__main__":
    main()
