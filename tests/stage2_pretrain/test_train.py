"""``run_pretrain`` in process on the tiny preset: run folder, checkpoints others load, accumulation, errors."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from cocomix.core.errors import CocomixError, ConfigError
from cocomix.stage2_pretrain import train as train_mod
from cocomix.stage2_pretrain.config import PretrainConfig
from cocomix.stage2_pretrain.optim import lr_ratio
from cocomix.stage2_pretrain.plan import make_plan
from cocomix.stage2_pretrain.train import run_pretrain


def pretrain(out: Path, tokens: Path, targets: Path | None = None, **kw):
    args = dict(method="ntp" if targets is None else "cocomix", size="tiny", tokens=str(tokens),
                targets=str(targets) if targets else None, out=str(out), max_steps=4, batch_tokens=512,
                save_every=2, eval_every=2, eval_windows=2, log_every=1) | kw
    return run_pretrain(PretrainConfig(**args))


def records(out: Path, kind: str = "train") -> list[dict]:
    lines = (Path(out) / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["kind"] == kind]


def test_ntp_run_folder_and_stock_gpt2_checkpoints(tmp_path, token_store):
    from transformers import AutoTokenizer, GPT2LMHeadModel

    res = pretrain(tmp_path / "run", token_store, max_steps=5, keep_last=2)
    run = json.loads((res.out / "run.json").read_text())
    assert run["params"] == {"total": res.params_total, "active": res.params_active} and res.params_total > 0
    assert run["plan"]["micro_batch"] * run["plan"]["accum"] * run["plan"]["context"] == 512
    assert [r["step"] for r in records(res.out)] == [1, 2, 3, 4, 5]
    assert all(math.isfinite(r["loss"]) and r["grad_norm"] > 0 and r["tokens_per_s"] > 0 for r in records(res.out))
    assert [r["step"] for r in records(res.out, "eval")] == [2, 4, 5] and res.val_ppl > 1
    names = sorted(p.name for p in (res.out / "checkpoints").iterdir())
    assert names == ["step-0000004", "step-0000005"]  # keep_last=2
    for folder in (res.checkpoint, res.final):
        model = GPT2LMHeadModel.from_pretrained(folder)
        assert type(model).__name__ == "GPT2LMHeadModel" and len(AutoTokenizer.from_pretrained(folder)) == 384
    assert not (res.final / "optimizer.pt").exists() and (res.checkpoint / "complete").exists()


def test_cocomix_checkpoint_reloads_with_concept_settings(tmp_path, token_store, targets_dir):
    from cocomix.stage2_pretrain.model import CoCoMixForCausalLM

    res = pretrain(tmp_path / "run", token_store, targets_dir, max_steps=2)
    model = CoCoMixForCausalLM.from_pretrained(res.final).eval()
    cfg = model.config
    assert (cfg.n_latents, cfg.k_attr, cfg.k_concept, cfg.lam) == (96, 4, 8, 0.1)
    assert cfg.concept_provenance["sae"]["n_latents"] == 96 and cfg.concept_provenance["targets_path"] == str(targets_dir)
    again = CoCoMixForCausalLM.from_pretrained(res.checkpoint).eval()
    ids = torch.randint(0, 384, (1, 16))
    torch.testing.assert_close(model(input_ids=ids).logits, again(input_ids=ids).logits, rtol=0, atol=0)
    rec = records(res.out)
    assert all(r["loss"] == pytest.approx(r["ntp_loss"] + 0.1 * r["concept_loss"]) for r in rec)
    assert json.loads((res.out / "run.json").read_text())["targets"]["meta"]["sae"]["n_latents"] == 96


def test_accumulation_gives_the_global_batch_loss(tmp_path, token_store, targets_dir):
    """2 micro-batches of 2 == 1 micro-batch of 4: the concept term is weighted by valid slots of the whole batch."""
    a = pretrain(tmp_path / "a", token_store, targets_dir, micro_batch=2, save_every=0, eval_every=0)
    b = pretrain(tmp_path / "b", token_store, targets_dir, micro_batch=4, save_every=0, eval_every=0)
    assert json.loads((a.out / "run.json").read_text())["plan"]["accum"] == 2
    for key in ("loss", "ntp_loss", "concept_loss", "grad_norm"):
        got, want = ([r[key] for r in records(x.out)] for x in (a, b))
        torch.testing.assert_close(torch.tensor(got), torch.tensor(want), rtol=1e-5, atol=1e-6)


def test_batch_that_does_not_divide_names_the_flags():
    with pytest.raises(ConfigError, match="--batch-tokens"):
        make_plan(PretrainConfig(size="tiny", batch_tokens=1000), world=1)
    with pytest.raises(ConfigError, match="--micro-batch"):
        make_plan(PretrainConfig(size="tiny", batch_tokens=128 * 8, micro_batch=3), world=1)
    plan = make_plan(PretrainConfig(size="tiny", batch_tokens=128 * 8), world=2)
    assert (plan.micro_batch, plan.accum, plan.world) == (4, 1, 2)
    assert plan.min_lr == 1e-4 and make_plan(PretrainConfig(size="tiny", lr=3e-3), 1).min_lr == pytest.approx(3e-4)


def test_schedule_warms_up_then_decays_to_min():
    ratios = [lr_ratio(s, warmup=3, total=30, min_ratio=0.1) for s in range(31)]
    assert ratios[:3] == pytest.approx([1 / 3, 2 / 3, 1.0]) and ratios[3] == 1.0
    assert all(a >= b for a, b in zip(ratios[3:], ratios[4:])) and ratios[30] == pytest.approx(0.1)
    assert make_plan(PretrainConfig(size="69m"), 1).warmup == 40_000 // 300


def test_non_empty_out_is_refused_unless_overwrite(tmp_path, token_store):
    out = tmp_path / "run"
    (out / "checkpoints" / "step-0000001").mkdir(parents=True)
    (out / "checkpoints" / "step-0000001" / "complete").write_text("")  # a run worth keeping
    (out / "metrics.jsonl").write_text("old\n")
    with pytest.raises(CocomixError, match="--overwrite"):
        pretrain(out, token_store, max_steps=1)
    res = pretrain(out, token_store, max_steps=1, overwrite=True)
    assert len(records(res.out)) == 1


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, token_store, nan_loss_at_call):
    nan_loss_at_call(3)
    with pytest.raises(CocomixError, match="non-finite loss at step 3"):
        pretrain(tmp_path / "run", token_store, max_steps=6)
    from cocomix.stage2_pretrain.checkpoint import latest_checkpoint

    last = latest_checkpoint(tmp_path / "run")
    assert last.name == "step-0000002" and not (tmp_path / "run" / "final").exists()


def test_unknown_or_missing_tracker_names_the_flag(tmp_path, token_store):
    with pytest.raises(ConfigError, match="--tracker"):
        pretrain(tmp_path / "run", token_store, tracker="mlflowish")


def test_workspace_defaults_pick_what_extract_wrote(tmp_path, token_store, make_targets):
    """Only --size (and a workspace): targets = the workspace's only folder, tokens = their twin store."""
    import shutil

    ws = tmp_path / "ws"
    shutil.copytree(token_store, ws / "tokens" / "corpus")
    shutil.copytree(token_store, ws / "tokens" / "other")  # a second store must not confuse the choice
    make_targets(ws / "tokens" / "corpus", ws / "targets" / "corpus")
    res = run_pretrain(PretrainConfig(size="tiny", workspace=str(ws), max_steps=1, batch_tokens=512, eval_every=0))
    run = json.loads((res.out / "run.json").read_text())
    assert res.out == ws / "runs" / "cocomix-tiny" and run["plan"]["method"] == "cocomix"
    assert run["tokens"]["path"] == str(ws / "tokens" / "corpus") and run["targets"]["path"] == str(ws / "targets" / "corpus")


def test_tensorboard_tracker_writes_events(tmp_path, token_store):
    pytest.importorskip("tensorboard")
    res = pretrain(tmp_path / "run", token_store, max_steps=2, tracker="tensorboard", save_every=0)
    assert list((res.out / "trackers").rglob("events.out.tfevents.*"))


def test_ntp_with_targets_matches_the_cocomix_active_parameters(tmp_path, token_store, targets_dir):
    """--targets with --method ntp only picks the width: the multiple of n_head closest to CoCoMix's active count."""
    from cocomix.stage2_pretrain.presets import get_preset, match_ntp_width

    ntp = pretrain(tmp_path / "ntp", token_store, max_steps=1, eval_every=0, save_every=0, targets=str(targets_dir), method="ntp")
    coco = pretrain(tmp_path / "coco", token_store, targets_dir, max_steps=1, eval_every=0, save_every=0)
    match = match_ntp_width(get_preset("tiny"), 384, 96)
    assert (ntp.params_active, coco.params_active) == (match.ntp.active, match.cocomix.active)
    assert abs(ntp.params_active / coco.params_active - 1) < 0.05  # tiny widths move in steps of n_head = 4
    wide = pretrain(tmp_path / "wide", token_store, max_steps=1, eval_every=0, save_every=0, width=96)
    from transformers import GPT2Config

    assert GPT2Config.from_pretrained(wide.final).n_embd == 96
    with pytest.raises(ConfigError, match="--width"):
        pretrain(tmp_path / "odd", token_store, max_steps=1, width=90)


def test_resume_refuses_another_global_batch_and_is_a_no_op_when_done(tmp_path, token_store):
    first = pretrain(tmp_path / "run", token_store, max_steps=2, eval_every=0)
    with pytest.raises(ConfigError, match="--batch-tokens"):
        pretrain(tmp_path / "run", token_store, max_steps=2, eval_every=0, resume=True, batch_tokens=1024)
    again = pretrain(tmp_path / "run", token_store, max_steps=2, eval_every=0, resume=True)
    assert again.steps == 2 and again.checkpoint == first.checkpoint and (again.final / "model.safetensors").exists()
    assert [r["step"] for r in records(again.out)] == [1, 2]


def test_resume_refuses_flags_and_data_the_checkpoint_fixed(tmp_path, token_store, targets_dir, make_targets):
    """--lr (the restored scheduler keeps the old one), --width (the model is reloaded) and other
    tokens or targets would be silently ignored or mixed in; a moved copy of the same data is fine."""
    import shutil

    run = tmp_path / "run"
    pretrain(run, token_store, targets_dir, max_steps=2, eval_every=0, save_every=1)
    resume = dict(max_steps=3, eval_every=0, save_every=1, resume=True)
    with pytest.raises(ConfigError, match="--lr was"):
        pretrain(run, token_store, targets_dir, lr=0.5, **resume)
    with pytest.raises(ConfigError, match="--width was"):
        pretrain(run, token_store, targets_dir, width=128, **resume)
    with pytest.raises(ConfigError, match="--label-windows was aligned"):
        pretrain(run, token_store, targets_dir, label_windows="free", **resume)
    other = make_targets(token_store, tmp_path / "other-targets", seed=1)
    with pytest.raises(ConfigError, match="--targets holds other data"):
        pretrain(run, token_store, other, **resume)
    moved_tokens, moved_targets = tmp_path / "moved" / "tokens", tmp_path / "moved" / "targets"
    shutil.copytree(token_store, moved_tokens)
    shutil.copytree(targets_dir, moved_targets)
    done = pretrain(run, moved_tokens, moved_targets, **resume)
    assert done.steps == 3 and [r["step"] for r in records(run)] == [1, 2, 3]


def test_bf16_autocast_trains_with_fp32_weights(tmp_path, token_store, targets_dir, caplog):
    """``--precision bf16`` is the GPU default's code path (Accelerate's autocast) run on CPU: the
    losses move off the fp32 ones by bf16 rounding only, and checkpoints keep fp32 weights."""
    from cocomix.stage2_pretrain.model import CoCoMixForCausalLM

    fp32 = pretrain(tmp_path / "fp32", token_store, targets_dir, max_steps=3, eval_every=0, save_every=0)
    with caplog.at_level("INFO", logger="cocomix"):
        bf16 = pretrain(tmp_path / "bf16", token_store, targets_dir, max_steps=3, eval_every=0, save_every=0, precision="bf16")
    assert "mixed precision bf16" in caplog.text
    a, b = records(fp32.out), records(bf16.out)
    for key in ("loss", "ntp_loss", "concept_loss"):
        x, y = torch.tensor([r[key] for r in a]), torch.tensor([r[key] for r in b])
        assert not torch.equal(x, y), f"{key}: bf16 run is bit-identical to fp32, so autocast was off"
        torch.testing.assert_close(y, x, rtol=2e-2, atol=0, msg=key)
    model = CoCoMixForCausalLM.from_pretrained(bf16.out / "checkpoints" / "step-0000003")
    assert {p.dtype for p in model.parameters()} == {torch.float32}


def test_precision_flag_maps_to_accelerate():
    from cocomix.stage2_pretrain.run_setup import mixed_precision

    assert mixed_precision("auto", cuda=True) == "bf16" and mixed_precision("auto", cuda=False) == "no"
    assert mixed_precision("bf16", cuda=False) == "bf16" and mixed_precision("fp32", cuda=True) == "no"
    with pytest.raises(ConfigError, match="--precision"):
        PretrainConfig(precision="fp16")


def test_fused_adamw_matches_the_loop_implementation():
    """What ``make_optimizer`` builds on CUDA (fused kernels, the paper's groups) steps as plain AdamW."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from cocomix.stage2_pretrain.optim import make_optimizer

    torch.manual_seed(0)
    models = [GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=50, n_positions=16,
                                       resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)) for _ in range(2)]
    models[1].load_state_dict(models[0].state_dict())
    opts = [make_optimizer(m, 1e-2, on_cuda=fused) for m, fused in zip(models, (False, True))]
    assert opts[1].defaults["fused"] and not opts[0].defaults["fused"]
    x = torch.randint(0, 50, (2, 16))
    for _ in range(3):
        for model, opt in zip(models, opts):
            model(input_ids=x, labels=x).loss.backward()
            opt.step()
            opt.zero_grad()
    for (name, p), q in zip(models[0].named_parameters(), models[1].parameters()):
        torch.testing.assert_close(q, p, rtol=1e-4, atol=1e-4)  # 1% of one lr-sized step; order of ops only


def test_adamw_is_the_official_recipe():
    """One group, weight decay 0.1 on every parameter (biases, LayerNorm gains and the concept
    biases included) as the official trainer; the tied embedding appears once."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from cocomix.stage2_pretrain.optim import make_optimizer

    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=50, n_positions=16))
    opt = make_optimizer(model, 3e-4, on_cuda=False)
    (group,) = opt.param_groups
    assert group["weight_decay"] == 0.1 and group["betas"] == (0.9, 0.95) and group["eps"] == 1e-8 and group["lr"] == 3e-4
    assert len(group["params"]) == len(list(model.parameters())) and any(p.dim() == 1 for p in group["params"])


def test_a_tracker_that_cannot_start_is_one_line():
    from types import SimpleNamespace

    from cocomix.stage2_pretrain.run_setup import start_trackers

    class UsageError(Exception):
        pass

    def init_trackers(*_, **__):
        raise UsageError("api_key not configured (no-tty). call wandb.login(key=[your_api_key])")

    plan = make_plan(PretrainConfig(size="tiny", max_steps=2), world=1)
    with pytest.raises(ConfigError, match="--tracker wandb could not start .UsageError: api_key.*wandb login"):
        start_trackers(SimpleNamespace(init_trackers=init_trackers), "wandb", plan)


@pytest.mark.parametrize("kw, flag", [({"lam": -1.0}, "--lam"), ({"precision": "fp16"}, "--precision"),
                                      ({"keep_last": -1}, "--keep-last")])
def test_bad_numbers_name_the_flag(kw, flag):
    with pytest.raises(ConfigError, match=flag):
        PretrainConfig(**kw)


def test_targets_of_another_window_length_are_refused_naming_the_extract_fix(tmp_path, token_store, make_targets):
    from cocomix.core.errors import MismatchError

    short = make_targets(token_store, tmp_path / "w64", window=64, windows_per_shard=4)
    with pytest.raises(MismatchError, match=r"64-token windows, but --size tiny trains on 128.*cocomix extract --window 128 --offsets N"):
        pretrain(tmp_path / "run", token_store, short, max_steps=1)
    assert not (tmp_path / "run").exists()  # refused before the run folder is made


def test_free_label_windows_ablation_trains_and_records_itself(tmp_path, token_store, make_targets):
    """Aligned and free runs on a 2-offset folder both train; their first batches differ only where free shifts."""
    two = make_targets(token_store, tmp_path / "two", offsets=[0, 64])
    aligned = pretrain(tmp_path / "a", token_store, two, max_steps=2, eval_every=0, save_every=0)
    free = pretrain(tmp_path / "f", token_store, two, max_steps=2, eval_every=0, save_every=0, label_windows="free")
    assert json.loads((free.out / "run.json").read_text())["config"]["label_windows"] == "free"
    assert json.loads((aligned.out / "run.json").read_text())["config"]["label_windows"] == "aligned"


def test_the_block_check_ahead_helper_changes_nothing_a_run_computes(tmp_path, token_store, targets_dir, monkeypatch):
    """With the helper forced on (the tiny folder is below its size floor otherwise) a run reads, checks and
    trains on exactly what it does without: same losses, same weights."""
    from cocomix.storage import block_ahead
    from cocomix.storage import target_reader as reader_mod

    started = []
    real = reader_mod.TargetReader._start_ahead
    monkeypatch.setattr(reader_mod.TargetReader, "_start_ahead", lambda self, *a: started.append(real(self, *a)) or started[-1])
    monkeypatch.setattr(block_ahead, "MIN_BLOCKS", 0)
    monkeypatch.setenv("COCOMIX_CHECK_AHEAD", "1")
    a = pretrain(tmp_path / "a", token_store, targets_dir, save_every=0, eval_every=0)
    assert started and started[0] is not None and started[0].n_flags > 0  # the helper served this run
    monkeypatch.setenv("COCOMIX_CHECK_AHEAD", "0")
    b = pretrain(tmp_path / "b", token_store, targets_dir, save_every=0, eval_every=0)
    assert [r["loss"] for r in records(a.out)] == [r["loss"] for r in records(b.out)]
    from safetensors.torch import load_file

    wa, wb = (load_file(x.final / "model.safetensors") for x in (a, b))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_ctrl_c_is_noted_and_stops_the_loop_between_steps():
    """The first SIGINT only marks the run (so it cannot be swallowed mid-step); a second one interrupts at once;
    the previous handler comes back."""
    import os
    import signal

    before = signal.getsignal(signal.SIGINT)
    with train_mod.interrupts_between_steps() as interrupted:
        assert not interrupted()
        os.kill(os.getpid(), signal.SIGINT)
        assert interrupted()
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
            for _ in range(1000):  # the handler runs at the next bytecode boundary
                pass
    assert signal.getsignal(signal.SIGINT) is before


def test_ctrl_c_mid_run_stops_before_the_next_step(tmp_path, token_store, monkeypatch):
    import os
    import signal

    real, steps = train_mod.train_step, []

    def step_then_ctrl_c(run, step, batch):
        steps.append(step)
        if step == 1:
            os.kill(os.getpid(), signal.SIGINT)  # arrives inside the step
        return real(run, step, batch)

    monkeypatch.setattr(train_mod, "train_step", step_then_ctrl_c)
    with pytest.raises(KeyboardInterrupt):
        pretrain(tmp_path / "run", token_store, max_steps=6, save_every=1)
    assert steps == [0, 1]  # step 1 finished (and was checkpointed), step 2 never started
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").glob("step-*")) == ["step-0000001", "step-0000002"]
