"""``sae train``: the recipe's pieces against plain references, and a real run on the tiny teacher."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from typer.testing import CliRunner

from cocomix.core.errors import CocomixError, ConfigError, MismatchError
from cocomix.core.layernorm import layernorm_unbiased
from cocomix.stage1_extract.config import SaeTrainConfig
from cocomix.stage1_extract.sae import recipe as sae_recipe
from cocomix.stage1_extract.sae import train as st
from cocomix.stage1_extract.sae.io import load_sae
from cocomix.stage1_extract.sae.stream import shuffled_batches, window_batches

LAYER = 1
WINDOW = 64
TRAIN = dict(layer=LAYER, latents=256, k=16, train_tokens=40_000, batch_tokens=512, lr=3e-3, window=WINDOW,
             dead_tokens=2_000, auxk=64, buffer_tokens=4096, device="cpu")


def train_config(token_store, teacher_dir, out, **kw) -> SaeTrainConfig:
    return SaeTrainConfig(**{**TRAIN, "teacher": str(teacher_dir), "tokens": str(token_store), "out": str(out), **kw})


@pytest.fixture(scope="module")
def trained(tmp_path_factory, token_store, teacher_dir):
    out = tmp_path_factory.mktemp("sae_train") / "sae"
    return st.run_sae_train(train_config(token_store, teacher_dir, out))


# ---------------------------------------------------------------- end to end


def test_training_reaches_low_fvu(trained):
    assert trained.fvu < 0.2, trained  # the mean alone has FVU 1
    assert trained.l0 <= 16 and trained.l0 > 8
    assert 0.0 <= trained.dead_fraction < 0.5
    assert trained.tokens >= TRAIN["train_tokens"] and trained.steps == 79


def test_saved_sae_loads_and_reproduces_the_reported_fvu(trained, token_store, teacher_dir):
    """Recompute the held-out FVU from scratch with the loaded SAE: the weights on disk are the trained ones."""
    from cocomix.stage1_extract.teacher import hidden_states_at, load_teacher
    from cocomix.storage.token_store import TokenStore

    sae, info = load_sae(str(trained.out))
    assert (info.format, info.layer, info.location, info.n_latents, info.k, info.normalize) == ("cocomix", 1, "resid_post", 256, 16, True)
    assert info.sha256 == trained.sha256
    torch.testing.assert_close(sae.W_dec.norm(dim=0), torch.ones(256))
    val = TokenStore.open(token_store).split("val")
    n = len(val) // WINDOW * WINDOW
    ids = torch.from_numpy(val.read(0, n).astype(np.int64)).reshape(-1, WINDOW)
    h = hidden_states_at(load_teacher(str(teacher_dir)), ids, LAYER).reshape(-1, 32)
    x = layernorm_unbiased(h).x
    enc = sae.encode(h)
    recons_x = sae.decode_normalized(enc.top_idx, enc.top_val)  # FVU is measured in the normalised space
    fvu = ((recons_x - x) ** 2).sum() / ((x - x.mean(0)) ** 2).sum()
    torch.testing.assert_close(fvu.item(), trained.fvu, rtol=1e-4, atol=1e-5)


def test_cfg_records_provenance(trained, teacher_dir):
    cfg = json.loads((trained.out / "cfg.json").read_text())
    assert cfg["teacher"]["id"] == str(Path(teacher_dir).resolve())
    assert cfg["layer"] == LAYER and cfg["location"] == "resid_post" and cfg["k"] == 16 and cfg["normalize"] is True
    assert cfg["stats"]["fvu"] == pytest.approx(trained.fvu) and cfg["stats"]["eval_split"] == "val"
    assert cfg["training"]["lr"] == TRAIN["lr"] and "tokenizer_sha256" in cfg["tokens"]


def test_trained_sae_labels_pass_through_extract(trained, token_store, teacher_dir, tmp_path):
    from cocomix.stage1_extract.config import ExtractConfig
    from cocomix.stage1_extract.extract import run_extract
    from cocomix.storage.targets import TargetReader

    out = tmp_path / "targets"
    run_extract(ExtractConfig(tokens=str(token_store), teacher=str(teacher_dir), sae=str(trained.out), layer=LAYER,
                              out=str(out), window=32, windows_per_shard=4, batch_size=4, splits="val", device="cpu"))
    reader = TargetReader.open(out)
    assert reader.n_latents == 256 and reader.meta["sae"]["sha256"] == trained.sha256
    ids = reader.window("val", 0, reader.split_length("val")).concept_ids
    labelled = ids[ids != reader.ignore_id]
    assert labelled.size > 0 and labelled.max() < 256


# ---------------------------------------------------------------- bad input


def test_non_empty_out_is_refused_unless_overwrite(tmp_path, token_store, teacher_dir):
    out = tmp_path / "sae"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(CocomixError, match="--overwrite"):
        st.run_sae_train(train_config(token_store, teacher_dir, out))
    (out / "cfg.json").write_text("{}")
    st.prepare_out(train_config(token_store, teacher_dir, out, overwrite=True))
    assert (out / "notes.txt").exists() and not (out / "cfg.json").exists()  # only our own files go


def test_cli_refusal_is_one_line_exit_2(tmp_path, token_store, teacher_dir):
    from cocomix.pipeline.cli import app

    out = tmp_path / "sae"
    out.mkdir()
    (out / "x").write_text("x")
    result = CliRunner().invoke(app, ["sae", "train", "--teacher", str(teacher_dir), "--tokens", str(token_store),
                                      "--layer", "1", "--out", str(out)])
    assert result.exit_code == 2 and "--overwrite" in result.output and "Traceback" not in result.output


def test_layer_out_of_range(tmp_path, token_store, teacher_dir):
    with pytest.raises(ConfigError, match="--layer 3"):
        st.run_sae_train(train_config(token_store, teacher_dir, tmp_path / "sae", layer=3))


def test_tokenizer_mismatch(tmp_path, token_store):
    import importlib.util

    spec = importlib.util.spec_from_file_location("cocomix_top_conftest", Path(__file__).parents[1] / "conftest.py")
    top = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(top)
    tok = top.train_tokenizer(top.make_docs(seed=7)[::-1], 300, tmp_path / "tok")
    other = top.make_gpt2(tok, tmp_path / "teacher")
    with pytest.raises(MismatchError, match="tokenizer"):
        st.run_sae_train(train_config(token_store, other, tmp_path / "sae"))


@pytest.mark.parametrize("field, value", [("k", 0), ("k", 300), ("batch_tokens", 0), ("lr", 0.0), ("window", 1), ("auxk", -1)])
def test_config_validation_names_the_flag(field, value, tmp_path):
    flag = "--" + field.replace("_", "-")
    with pytest.raises(ConfigError, match=flag):
        SaeTrainConfig(**{**TRAIN, "teacher": "t", "tokens": "s", "out": str(tmp_path), field: value})


# ---------------------------------------------------------------- recipe pieces


def small_sae(seed=0, n_latents=64, d_in=16, k=4):
    gen = torch.Generator().manual_seed(seed)
    return sae_recipe.init_sae(torch.randn(512, d_in, generator=gen), n_latents, k, gen)


def test_init_is_tied_unit_norm_with_median_bias():
    gen = torch.Generator().manual_seed(0)
    sample = torch.randn(512, 16, generator=gen) + 3.0
    sae = sae_recipe.init_sae(sample, 64, 4, gen)
    torch.testing.assert_close(sae.W_dec.norm(dim=0), torch.ones(64))
    directions = sae.W_enc.T / sae.W_enc.T.norm(dim=0, keepdim=True)
    torch.testing.assert_close(directions, sae.W_dec)  # decoder = encoderᵀ up to the encoder's global rescale
    torch.testing.assert_close(sae.b_pre, sae_recipe.geometric_median(sample))


def test_geometric_median_resists_outliers():
    points = torch.cat([torch.randn(99, 4, generator=torch.Generator().manual_seed(1)) * 0.01, torch.full((1, 4), 1000.0)])
    assert sae_recipe.geometric_median(points).abs().max() < 0.1 < points.mean(0).abs().max()
    square = torch.tensor([[1.0, 1.0], [1.0, -1.0], [-1.0, 1.0], [-1.0, -1.0]]) + 5
    torch.testing.assert_close(sae_recipe.geometric_median(square), torch.tensor([5.0, 5.0]))


def test_projected_gradient_is_orthogonal_to_columns():
    sae = small_sae()
    sae.W_dec.grad = torch.randn_like(sae.W_dec)
    sae_recipe.project_decoder_grad_(sae)
    torch.testing.assert_close((sae.W_dec.grad * sae.W_dec).sum(0), torch.zeros(64), atol=1e-6, rtol=0)


def test_train_step_keeps_decoder_unit_norm_and_lowers_loss():
    sae = small_sae()
    x = layernorm_unbiased(torch.randn(256, 16, generator=torch.Generator().manual_seed(3))).x
    cfg = SaeTrainConfig(**{**TRAIN, "teacher": "t", "tokens": "s", "out": "o", "latents": 64, "k": 4, "lr": 1e-2})
    opt = torch.optim.Adam(sae.parameters(), lr=cfg.lr, eps=sae_recipe.ADAM_EPS)
    tracker = sae_recipe.DeadTracker(64, torch.device("cpu"))
    first = sae_recipe.train_step(sae, opt, x, tracker, cfg, 1.0)
    for _ in range(30):
        last = sae_recipe.train_step(sae, opt, x, tracker, cfg, 1.0)
    torch.testing.assert_close(sae.W_dec.norm(dim=0), torch.ones(64))
    assert last.fvu < first.fvu * 0.8 and tracker.seen == 31 * 256


def test_dead_tracker_counts_tokens_since_fired():
    tracker = sae_recipe.DeadTracker(5, torch.device("cpu"))
    tracker.update(torch.tensor([[0, 1], [0, 2]]), torch.tensor([[1.0, 0.0], [0.5, 2e-3]]))  # 1 is below 1e-3
    assert tracker.since_L.tolist() == [0, 2, 0, 2, 2]
    tracker.update(torch.tensor([[2, 3]]), torch.tensor([[1.0, 1.0]]))
    assert tracker.since_L.tolist() == [1, 3, 0, 0, 3]
    assert tracker.dead(2).tolist() == [False, True, False, False, True]
    assert tracker.dead_fraction(100) == pytest.approx(0.4)  # 1 and 4 were silent for the whole (3-token) run
    assert tracker.dead_fraction(1) == pytest.approx(0.6)  # ... and 0 for the last token


def dense_reference_losses(sae, x, dead, auxk, coef, mse_scale):
    """OpenAI's recipe with dense autograd: pre for all latents, topk, scatter, dense decoder, dense AuxK."""
    pre = F.linear(x - sae.b_pre, sae.W_enc, sae.b_enc)
    top = pre.topk(sae.k, dim=-1)
    z = torch.zeros_like(pre).scatter(-1, top.indices, F.relu(top.values))
    recons = z @ sae.W_dec.T + sae.b_pre
    main = ((recons - x) ** 2).mean() * mse_scale
    aux_top = pre.masked_fill(~dead, float("-inf")).topk(min(auxk, int(dead.sum())), dim=-1)
    z_aux = torch.zeros_like(pre).scatter(-1, aux_top.indices, F.relu(aux_top.values))
    residual = x - recons.detach()
    aux = ((z_aux @ sae.W_dec.T - residual) ** 2).sum() / ((residual - residual.mean(0)) ** 2).sum()
    return main + coef * aux, aux


def test_sparse_step_matches_dense_autograd():
    """Loss and every gradient of the sparse step (gathered encoder backward, sparse decode) equal dense autograd."""
    sae, ref = small_sae(seed=2).double(), small_sae(seed=2).double()
    x = layernorm_unbiased(torch.randn(48, 16, generator=torch.Generator().manual_seed(4), dtype=torch.float64)).x
    cfg = SaeTrainConfig(**{**TRAIN, "teacher": "t", "tokens": "s", "out": "o", "latents": 64, "k": 4, "auxk": 5, "dead_tokens": 40})
    tracker = sae_recipe.DeadTracker(64, torch.device("cpu"))
    tracker.since_L[::3] = 100  # 22 latents silent for long: dead unless they fire in this batch
    losses = sae_recipe.sae_losses(sae, x, tracker, cfg, 0.7)
    dead = tracker.dead(cfg.dead_tokens)
    assert cfg.auxk < int(dead.sum()) < 64  # AuxK picks among the dead, not all of them
    ref_loss, ref_aux = dense_reference_losses(ref, x, dead, cfg.auxk, cfg.auxk_coef, 0.7)
    torch.testing.assert_close(losses.loss, ref_loss)
    torch.testing.assert_close(losses.auxk, ref_aux)
    losses.loss.backward()
    ref_loss.backward()
    for (name, p), q in zip(sae.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p.grad, q.grad, msg=lambda m: f"{name}: {m}")


def test_no_dead_latents_no_auxk():
    sae = small_sae(seed=3)
    x = layernorm_unbiased(torch.randn(32, 16)).x
    cfg = SaeTrainConfig(**{**TRAIN, "teacher": "t", "tokens": "s", "out": "o", "latents": 64, "k": 4})
    losses = sae_recipe.sae_losses(sae, x, sae_recipe.DeadTracker(64, torch.device("cpu")), cfg, 1.0)
    assert losses.auxk.item() == 0.0
    torch.testing.assert_close(losses.loss, losses.main)


def test_auxk_gradient_reaches_dead_latents():
    """With every latent dead, AuxK trains encoder rows that the main TopK never selects."""
    sae = small_sae(seed=5)
    x = layernorm_unbiased(torch.randn(64, 16, generator=torch.Generator().manual_seed(6))).x
    cfg = SaeTrainConfig(**{**TRAIN, "teacher": "t", "tokens": "s", "out": "o", "latents": 64, "k": 4, "auxk": 16, "dead_tokens": 1})
    tracker = sae_recipe.DeadTracker(64, torch.device("cpu"))
    tracker.since_L += 10
    active = sae.encode_normalized(x).top_idx.unique()
    opt = torch.optim.SGD(sae.parameters(), lr=0.0)
    stats = sae_recipe.train_step(sae, opt, x, tracker, cfg, 1.0)
    unused = torch.ones(64, dtype=torch.bool)
    unused[active] = False
    assert stats.auxk_loss > 0 and unused.any()
    assert sae.W_enc.grad[unused].abs().sum() > 0


# ---------------------------------------------------------------- streaming


class ListSplit:
    def __init__(self, n):
        self.name, self.data = "train", np.arange(n, dtype=np.uint16)

    def __len__(self):
        return len(self.data)

    def read(self, start, stop):
        return self.data[start:stop]


def test_window_batches_cover_every_window_each_pass():
    gen = torch.Generator().manual_seed(0)
    batches = list(window_batches(ListSplit(100), 10, 3, gen, passes=2))
    starts = sorted(int(b[i, 0]) for b in batches for i in range(len(b)))
    assert starts == sorted(list(range(0, 100, 10)) * 2)
    assert all(b.shape[1] == 10 for b in batches)


def test_shuffled_batches_is_a_bounded_permutation():
    chunks = [torch.arange(i * 50, (i + 1) * 50, dtype=torch.float32)[:, None] for i in range(20)]  # 1000 rows
    out = list(shuffled_batches(iter(chunks), 64, 256, torch.Generator().manual_seed(0)))
    rows = torch.cat(out)[:, 0]
    assert all(len(b) == 64 for b in out) and len(rows) == 1000 // 64 * 64
    assert len(rows.unique()) == len(rows)  # no row twice
    assert not torch.equal(rows, rows.sort().values)  # mixed
    assert (rows[:64] < 256 + 50).all()  # the first batch could only come from the first buffer fill


def test_non_finite_loss_stops_with_a_clear_error():
    sae = small_sae()
    x = torch.randn(32, 16)
    x[3, 5] = float("nan")
    cfg = SaeTrainConfig(**{**TRAIN, "teacher": "t", "tokens": "s", "out": "o", "latents": 64, "k": 4})
    opt = torch.optim.Adam(sae.parameters())
    before = sae.W_enc.detach().clone()
    with pytest.raises(CocomixError, match="non-finite SAE loss"):
        sae_recipe.train_step(sae, opt, x, sae_recipe.DeadTracker(64, torch.device("cpu")), cfg, 1.0)
    assert torch.equal(sae.W_enc, before)  # no step was taken on the bad batch


def test_same_seed_same_weights(tmp_path, token_store, teacher_dir):
    """Data order and init come from --seed only: two runs write byte-identical weights (CPU)."""
    small = dict(train_tokens=2048, batch_tokens=256, buffer_tokens=1024, latents=64, k=4, eval_tokens=256)
    runs = [st.run_sae_train(train_config(token_store, teacher_dir, tmp_path / name, seed=seed, **small))
            for name, seed in (("a", 0), ("b", 0), ("c", 1))]
    assert runs[0].sha256 == runs[1].sha256 != runs[2].sha256
