"""``concepts show`` and ``concepts weights`` on a tiny trained student; the HTML page in a real headless chromium."""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from cocomix.core.errors import CocomixError, ConfigError, MismatchError
from cocomix.pipeline.cli import app
from cocomix.stage2_pretrain.concepts_config import DescribeConfig, ShowConfig, WeightsConfig
from cocomix.stage2_pretrain.concepts_describe import run_describe
from cocomix.stage2_pretrain.concepts_show import load_concept_model, run_show
from cocomix.stage2_pretrain.concepts_weights import run_weights, summarize

TEXT = "the model <b>token</b> & concept layer"


@pytest.fixture(scope="module")
def student(tmp_path_factory, token_store, targets_dir) -> Path:
    """A CoCoMix student trained 2 steps on the synthetic targets (its config records their provenance)."""
    from cocomix.stage2_pretrain.config import PretrainConfig
    from cocomix.stage2_pretrain.train import run_pretrain

    out = tmp_path_factory.mktemp("student") / "run"
    torch.set_num_threads(1)
    res = run_pretrain(PretrainConfig(method="cocomix", size="tiny", tokens=str(token_store), targets=str(targets_dir),
                                      out=str(out), max_steps=2, batch_tokens=256, save_every=0, eval_every=0))
    return res.final


@pytest.fixture(scope="module")
def dictionary(tmp_path_factory, targets_dir, token_store) -> Path:
    out = tmp_path_factory.mktemp("describe") / "d"
    run_describe(DescribeConfig(targets=str(targets_dir), tokens=str(token_store), out=str(out), top_n=3, context=3))
    return out


def expected_top(ckpt: Path, text: str, top: int):
    """Top concepts per token from the full forward's concept logits (the reference for predict_concepts)."""
    from transformers import AutoTokenizer

    model = load_concept_model(str(ckpt))
    ids = AutoTokenizer.from_pretrained(ckpt)(text, add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        z = model(input_ids=torch.tensor([ids])).concept_logits[0]
    return z.topk(top, dim=-1).indices.tolist(), z


def test_predict_concepts_equals_the_forward_pass_and_changes_nothing(student):
    model = load_concept_model(str(student))
    ids = torch.randint(0, model.config.vocab_size, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = model(input_ids=ids)
        step = model.predict_concepts(ids)
        after = model(input_ids=ids)
    torch.testing.assert_close(step.z_BTL, before.concept_logits, rtol=0, atol=0)
    assert torch.equal(step.top_idx_BTC, before.concept_logits.topk(model.config.k_concept, dim=-1).indices)
    assert torch.equal(before.logits, after.logits)


def test_show_lists_each_tokens_top_concepts_with_descriptions(student, dictionary, targets_dir):
    res = run_show(ShowConfig(ckpt=str(student), text=TEXT, describe=str(dictionary), top=4, examples=2))
    want, z = expected_top(student, TEXT, 4)
    assert res.concepts.concept_ids == want
    torch.testing.assert_close(torch.tensor(res.concepts.probs), torch.softmax(z, -1).gather(-1, torch.tensor(want)))
    shown = {c for per_token in want for c in per_token}
    assert set(res.descriptions) == shown
    from cocomix.stage2_pretrain.concepts_describe import load_describe

    table = load_describe(dictionary).table
    for i, d in res.descriptions.items():
        assert d["frequency"] == table.column("frequency")[i].as_py() and len(d["examples"]) <= 2


def test_show_refuses_a_dictionary_of_other_targets(tmp_path, student, make_targets, token_store):
    other = make_targets(token_store, tmp_path / "t", meta_update={"sae": {"source": "other", "sha256": "2" * 64, "n_latents": 96,
                                                                           "k": 8, "layer": 1, "location": "resid_post", "normalize": True}})
    run_describe(DescribeConfig(targets=str(other), tokens=str(token_store), out=str(tmp_path / "d"), top_n=1))
    with pytest.raises(MismatchError, match="describes targets"):
        run_show(ShowConfig(ckpt=str(student), text=TEXT, describe=str(tmp_path / "d")))
    result = CliRunner().invoke(app, ["concepts", "show", str(student), "--text", "x", "--describe", str(tmp_path / "d")])
    assert result.exit_code == 2 and "describes targets" in result.output and len(result.output.strip().splitlines()) <= 3


def test_a_checkpoint_without_targets_provenance_cannot_use_a_dictionary(tmp_path, student, dictionary):
    shutil.copytree(student, tmp_path / "ckpt")
    model = load_concept_model(str(tmp_path / "ckpt"))
    model.config.concept_provenance = {}
    model.save_pretrained(tmp_path / "ckpt")
    with pytest.raises(MismatchError, match="records no targets"):
        run_show(ShowConfig(ckpt=str(tmp_path / "ckpt"), text=TEXT, describe=str(dictionary)))
    assert run_show(ShowConfig(ckpt=str(tmp_path / "ckpt"), text=TEXT)).descriptions == {}


def test_ntp_checkpoint_and_bad_text_are_one_line_errors(tmp_path, student, tokenizer_dir):
    from transformers import AutoTokenizer

    from cocomix.stage2_pretrain.presets import build_model, get_preset

    build_model("ntp", get_preset("tiny"), vocab_size=384).save_pretrained(tmp_path / "ntp")
    AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(tmp_path / "ntp")
    for argv in (["show", str(tmp_path / "ntp"), "--text", "x"], ["weights", str(tmp_path / "ntp")]):
        result = CliRunner().invoke(app, ["concepts", *argv])
        assert result.exit_code == 2 and "NTP checkpoint" in result.output and "no concepts" in result.output, result.output
    with pytest.raises(ConfigError, match="--text is empty"):
        ShowConfig(ckpt=str(student), text="  ")
    with pytest.raises(ConfigError, match="the model reads at most 128"):
        run_show(ShowConfig(ckpt=str(student), text="the " * 300))
    with pytest.raises(CocomixError, match="not a `cocomix concepts describe` folder"):
        run_show(ShowConfig(ckpt=str(student), text="the", describe=str(tmp_path)))


def test_weights_norms_share_near_zero_and_plot(tmp_path, student):
    res = run_weights(WeightsConfig(ckpt=str(student), plot=str(tmp_path / "w.png"), concepts="0,5"))
    model = load_concept_model(str(student))
    ref = np.array([float(model.concept.compress.weight[j].detach().norm()) for j in range(model.config.n_latents)])
    np.testing.assert_allclose(res.norms_L, ref, rtol=1e-6)
    assert res.threshold == pytest.approx(0.1 * np.median(ref))
    assert res.near_zero == int((ref < res.threshold).sum()) and set(res.picked) == {0, 5}
    assert (tmp_path / "w.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ConfigError, match="--concepts 96 is not a concept"):
        run_weights(WeightsConfig(ckpt=str(student), concepts="3,96"))


def test_summarize_counts_norms_below_an_explicit_threshold():
    norms = np.array([0.0, 0.001, 0.5, 1.0, 2.0, 3.0])
    res = summarize(norms, 0.01, [2])
    assert (res.near_zero, res.share_near_zero, res.threshold_rule) == (2, 2 / 6, "--threshold")
    assert res.picked[2] == (0.5, 2 / 6) and res.quantiles[0.5] == pytest.approx(0.75)


# ----------------------------------------------------------------------------- the page in a browser
def chromium_driver():
    """A headless chromium through selenium, or a skip that says what is missing."""
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed (pip install -e '.[dev]')")
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    driver_bin = shutil.which("chromedriver")
    if not browser or not driver_bin:
        pytest.skip("chromium and chromium-driver are not installed (Debian: apt-get install chromium chromium-driver)")
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = browser
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu", "--window-size=1400,900"):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    return webdriver.Chrome(service=Service(driver_bin), options=options)


def test_html_page_shows_a_tokens_concepts_on_click_in_chromium(tmp_path, student, dictionary):
    pytest.importorskip("selenium", reason="selenium is not installed (pip install -e '.[dev]')")
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as EC
    from selenium.webdriver.support.ui import WebDriverWait

    page = tmp_path / "page.html"
    res = run_show(ShowConfig(ckpt=str(student), text=TEXT, describe=str(dictionary), html=str(page), top=3))
    text = page.read_text()
    assert "<b>" not in text and "http://" not in text and "https://" not in text  # escaped, no network resources
    driver = chromium_driver()
    try:
        driver.get(page.as_uri())
        tokens = driver.find_elements(By.CSS_SELECTOR, ".tok")
        assert [t.get_attribute("textContent") for t in tokens] == res.concepts.token_texts
        assert driver.find_elements(By.TAG_NAME, "b") == []  # the text's markup stayed text
        panel = driver.find_element(By.ID, "panel")
        i = 3
        tokens[i].click()
        WebDriverWait(driver, 10).until(EC.visibility_of(panel))
        assert panel.get_attribute("data-token") == str(i)
        shown = [int(e.get_attribute("data-concept")) for e in panel.find_elements(By.CSS_SELECTOR, ".concept")]
        assert shown == res.concepts.concept_ids[i]
        marks = panel.find_elements(By.TAG_NAME, "mark")  # example contexts with the labelled token marked
        n_examples = sum(len(res.descriptions[c]["examples"]) for c in shown)
        assert len(marks) == n_examples > 0
        driver.save_screenshot(str(tmp_path / "page.png"))
        errors = [e for e in driver.get_log("browser") if e["level"] == "SEVERE"]
        assert errors == [], errors
    finally:
        driver.quit()


@pytest.mark.parametrize("change, words", [({"concept_target": "hidden", "d_teacher": 16}, "--concept-target hidden"),
                                           ({"mix": "none"}, "--mix none")])
def test_checkpoints_without_concepts_or_w_comp_are_refused(tmp_path, student, change, words):
    """A hidden-state student predicts no SAE concepts (show and weights refuse); a prediction-only
    student has concepts but no W_comp (weights refuses, show works)."""
    from cocomix.stage2_pretrain.model import CoCoMixConfig, CoCoMixForCausalLM

    config = CoCoMixConfig.from_pretrained(student)
    for key, value in change.items():
        setattr(config, key, value)
    CoCoMixForCausalLM(config).save_pretrained(tmp_path / "ckpt")
    for f in student.glob("tokenizer*"):
        shutil.copy(f, tmp_path / "ckpt" / f.name)
    result = CliRunner().invoke(app, ["concepts", "weights", str(tmp_path / "ckpt")])
    assert result.exit_code == 2 and words in result.output and "Traceback" not in result.output, result.output
    if change.get("mix") == "none":
        assert run_show(ShowConfig(ckpt=str(tmp_path / "ckpt"), text=TEXT)).concepts
    else:
        with pytest.raises(CocomixError, match="hidden state, not SAE concepts"):
            run_show(ShowConfig(ckpt=str(tmp_path / "ckpt"), text=TEXT))
