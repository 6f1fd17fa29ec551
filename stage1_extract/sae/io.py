"""Load and save TopK SAEs: OpenAI ``.pt`` state dicts, SAELens folders and the cocomix format.

``load_sae(spec)`` takes ``openai:<version>/<location>/<layer>`` (downloaded once into a cache),
a path to an OpenAI ``.pt`` file, a SAELens folder (``cfg.json`` + ``sae_weights.safetensors``)
or a cocomix SAE folder (``cfg.json`` + ``sae.safetensors``, written by :func:`save_sae`).
The format is detected from the path. Every problem a user or a file can cause is one
:class:`CocomixError` line naming the file (layouts in docs/ARCHITECTURE.md).
"""
from __future__ import annotations

import dataclasses
import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from cocomix.core.errors import CocomixError, IntegrityError, MismatchError
from cocomix.stage1_extract.sae.download import fetch_openai, is_openai_spec, parse_openai_spec
from cocomix.stage1_extract.sae.model import TopKSAE
from cocomix.storage.files import atomic_replace, atomic_write_json, sha256_file

log = logging.getLogger(__name__)

COCOMIX_FORMAT = "cocomix-sae"
COCOMIX_VERSION = 1
COCOMIX_WEIGHTS = "sae.safetensors"
SAELENS_WEIGHTS = "sae_weights.safetensors"
OPENAI_KEYS = {"W_enc": "encoder.weight", "b_enc": "latent_bias", "W_dec": "decoder.weight", "b_pre": "pre_bias"}
SAELENS_KEYS = {"W_enc": "W_enc", "b_enc": "b_enc", "W_dec": "W_dec", "b_pre": "b_dec"}
ACCEPTED = (
    "`openai:v5_32k/resid_post_mlp/5`, an OpenAI .pt file, a SAELens folder (cfg.json + sae_weights.safetensors) "
    "or a cocomix SAE folder (cfg.json + sae.safetensors)"
)


@dataclass
class SaeInfo:
    """Where an SAE came from and what it is; ``as_meta()`` goes into the target manifest."""

    source: str  #: the spec as given (shorthand or path)
    format: str  #: ``openai``, ``saelens`` or ``cocomix``
    sha256: str  #: sha256 of the weights file
    n_latents: int
    k: int
    d_in: int
    normalize: bool  #: unbiased LayerNorm on the input (OpenAI TopK SAEs)
    layer: int | None  #: hooked block, when the file says
    location: str | None  #: e.g. ``resid_post_mlp`` (OpenAI) or ``resid_post``

    def as_meta(self) -> dict:
        return dataclasses.asdict(self)


def load_sae(spec: str, *, cache_dir: Path | None = None) -> tuple[TopKSAE, SaeInfo]:
    """Load an SAE from any supported source (see the module docstring); weights are float32 on CPU.

    ``cache_dir`` is the cache root for the ``openai:`` shorthand (default ``<workspace>/cache``);
    downloads land in ``<cache_dir>/sae/openai/<location>_<version>/<layer>.pt``.
    """
    spec = str(spec)
    if is_openai_spec(spec):
        _, location, layer = parse_openai_spec(spec)
        path = fetch_openai(spec, cache_dir)
        sae, info = load_openai(path)
        return sae, dataclasses.replace(info, source=spec, layer=layer, location=location)
    path = Path(spec).expanduser()
    loader = {"openai": load_openai, "saelens": load_saelens, "cocomix": load_cocomix}[detect_format(path)]
    sae, info = loader(path)
    return sae, dataclasses.replace(info, source=spec)


def detect_format(path: Path) -> str:
    """``openai`` for a file, ``saelens``/``cocomix`` for a folder by its weights file name."""
    if not path.exists():
        raise CocomixError(f"SAE {path} does not exist; pass --sae as {ACCEPTED}")
    if path.is_file():
        if path.suffix in (".pt", ".pth", ".bin"):
            return "openai"
        if path.name in (COCOMIX_WEIGHTS, SAELENS_WEIGHTS, "cfg.json"):
            raise CocomixError(f"SAE {path} is a file inside an SAE folder; pass the folder {path.parent} instead")
    elif (path / COCOMIX_WEIGHTS).exists():
        return "cocomix"
    elif (path / SAELENS_WEIGHTS).exists():
        return "saelens"
    raise CocomixError(f"unknown SAE format at {path}; pass --sae as {ACCEPTED}")


def check_sae_matches_teacher(info: SaeInfo, d_model: int) -> None:
    """The SAE reads the teacher's residual stream, so its width must be the teacher's."""
    if info.d_in != d_model:
        raise MismatchError(
            f"SAE width {info.d_in} != teacher hidden size {d_model} (SAE {info.source}); "
            "pass an SAE trained on this teacher (or train one with `cocomix sae train`)"
        )


# ---------------------------------------------------------------- OpenAI .pt


def load_openai(path: Path) -> tuple[TopKSAE, SaeInfo]:
    """An openai/sparse_autoencoder state dict; normalisation is on when the activation is TopK."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # truncated zip, bad pickle, forbidden global, ...: all mean "not a valid file"
        raise IntegrityError(f"cannot read SAE file {path}: truncated or corrupt ({type(err).__name__}: {_first_line(err)})") from None
    if not isinstance(state, dict):
        raise IntegrityError(f"SAE file {path} holds a {type(state).__name__}, not an OpenAI SAE state dict")
    activation = state.get("activation", "ReLU")  # OpenAI's own default when the key is absent
    if activation != "TopK":
        raise CocomixError(f"SAE file {path} has activation {activation!r}; only TopK SAEs are supported")
    k = (state.get("activation_state_dict") or {}).get("k")
    if not isinstance(k, int):
        raise IntegrityError(f"SAE file {path} lacks `activation_state_dict.k` (the TopK k)")
    tensors = {name: _take(state, key, path) for name, key in OPENAI_KEYS.items()}
    sae = build_sae(tensors, k=k, normalize=True, path=path)
    layer, location = _openai_hook_from_path(path)
    return sae, _info(sae, path, "openai", sha256_file(path), layer, location)


def _openai_hook_from_path(path: Path) -> tuple[int | None, str | None]:
    """``.../resid_post_mlp_v5_32k/autoencoders/5.pt`` -> (5, ``resid_post_mlp``); else unknown."""
    found = re.search(r"([a-z_]+?)_v\d+_\d+k/autoencoders/(\d+)\.pt$", path.as_posix())
    return (int(found.group(2)), found.group(1)) if found else (None, None)


# ---------------------------------------------------------------- SAELens folder


def load_saelens(folder: Path) -> tuple[TopKSAE, SaeInfo]:
    """A SAELens TopK folder; ``W_enc`` [D, L] and ``W_dec`` [L, D] are transposed to OpenAI's layout."""
    cfg = _read_cfg(folder)
    # SAELens >= 6 writes `architecture: topk`; the older folders of OpenAI's SAEs (SAELens PR #201) say
    # `architecture: standard` with `activation_fn_str: topk` (read as ReLU by SAELens 6.0-6.12.2, issue #553).
    kinds = (cfg.get("architecture"), cfg.get("activation_fn_str"), cfg.get("activation_fn"))
    if "topk" not in kinds:
        raise CocomixError(f"SAELens SAE {folder} has architecture {kinds[0]!r} and activation {kinds[1] or kinds[2]!r}; "
                           "only TopK SAEs are supported")
    k = cfg.get("k") or (cfg.get("activation_fn_kwargs") or {}).get("k")
    if not isinstance(k, int):
        raise IntegrityError(f"SAELens cfg {folder / 'cfg.json'} lacks the TopK `k`")
    norm = cfg.get("normalize_activations") or "none"
    if norm not in ("layer_norm", "none"):
        raise CocomixError(f"SAELens SAE {folder} uses normalize_activations={norm!r}; supported: layer_norm, none")
    weights = folder / SAELENS_WEIGHTS
    raw = _read_safetensors(weights)
    tensors = {name: _take(raw, key, weights) for name, key in SAELENS_KEYS.items()}
    tensors["W_enc"], tensors["W_dec"] = tensors["W_enc"].T, tensors["W_dec"].T
    if cfg.get("apply_b_dec_to_input", True) is False:  # pre = x W_enc + b_enc: fold b_dec into b_enc
        tensors["b_enc"] = tensors["b_enc"] + tensors["W_enc"] @ tensors["b_pre"]
    sae = build_sae(tensors, k=k, normalize=norm == "layer_norm", path=weights)
    hook = re.fullmatch(r"blocks\.(\d+)\.hook_(\w+)", str(cfg.get("hook_name", "")))
    layer, location = (int(hook.group(1)), hook.group(2)) if hook else (cfg.get("hook_layer"), None)
    return sae, _info(sae, folder, "saelens", sha256_file(weights), layer, location)


# ---------------------------------------------------------------- cocomix folder


def save_sae(sae: TopKSAE, folder: Path | str, meta: dict) -> Path:
    """Write ``sae.safetensors`` then ``cfg.json`` (last, with the weights' sha256), both atomically."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    weights = folder / COCOMIX_WEIGHTS
    tmp = folder / f".{COCOMIX_WEIGHTS}.tmp"
    tensors = {name: p.detach().to("cpu", torch.float32).contiguous() for name, p in sae.state_dict().items()}
    save_file(tensors, str(tmp))
    atomic_replace(tmp, weights)
    cfg = {
        **meta,
        "format": COCOMIX_FORMAT, "version": COCOMIX_VERSION, "weights": COCOMIX_WEIGHTS,
        "sha256": sha256_file(weights), "d_in": sae.d_in, "n_latents": sae.n_latents,
        "k": sae.k, "normalize": sae.normalize,
    }
    atomic_write_json(folder / "cfg.json", cfg)
    return folder


def load_cocomix(folder: Path) -> tuple[TopKSAE, SaeInfo]:
    """A folder written by :func:`save_sae`; the weights must match the sha256 in ``cfg.json``."""
    cfg = _read_cfg(folder)
    if cfg.get("format") != COCOMIX_FORMAT:
        raise IntegrityError(f"{folder / 'cfg.json'} is not a cocomix SAE config (format {cfg.get('format')!r})")
    if cfg.get("version") != COCOMIX_VERSION:
        raise CocomixError(f"cocomix SAE {folder} has format version {cfg.get('version')}; this cocomix reads {COCOMIX_VERSION}")
    weights = folder / COCOMIX_WEIGHTS
    digest = sha256_file(weights)
    if digest != cfg.get("sha256"):
        raise IntegrityError(f"SAE weights {weights} are truncated or tampered: sha256 {digest[:12]}… != {str(cfg.get('sha256'))[:12]}… in cfg.json")
    raw = _read_safetensors(weights)
    tensors = {name: _take(raw, name, weights) for name in OPENAI_KEYS}
    sae = build_sae(tensors, k=_int_field(cfg, "k", folder), normalize=bool(cfg.get("normalize", True)), path=weights)
    return sae, _info(sae, folder, "cocomix", digest, cfg.get("layer"), cfg.get("location"))


# ---------------------------------------------------------------- shared checks


def build_sae(tensors: dict[str, torch.Tensor], *, k: int, normalize: bool, path: Path) -> TopKSAE:
    """A :class:`TopKSAE` from tensors in OpenAI layout, after checking every shape against ``W_enc``."""
    if tensors["W_enc"].ndim != 2:
        raise IntegrityError(f"SAE {path}: encoder weight must be 2-D [latents, width], got {tuple(tensors['W_enc'].shape)}")
    n_latents, d_in = tensors["W_enc"].shape
    expected = {"W_enc": (n_latents, d_in), "b_enc": (n_latents,), "W_dec": (d_in, n_latents), "b_pre": (d_in,)}
    for name, shape in expected.items():
        if tuple(tensors[name].shape) != shape:
            raise IntegrityError(f"SAE {path}: {name} has shape {tuple(tensors[name].shape)}, expected {shape}")
        if not torch.isfinite(tensors[name]).all():
            raise IntegrityError(f"SAE {path}: {name} holds non-finite values")
    if not 1 <= k <= n_latents:
        raise IntegrityError(f"SAE {path}: k={k} is not in [1, {n_latents}]")
    sae = TopKSAE(d_in, n_latents, k, normalize=normalize)
    sae.load_state_dict({name: t.to(torch.float32) for name, t in tensors.items()})
    return sae.eval().requires_grad_(False)


def _info(sae: TopKSAE, path: Path, fmt: str, sha256: str, layer, location) -> SaeInfo:
    return SaeInfo(str(path), fmt, sha256, sae.n_latents, sae.k, sae.d_in, sae.normalize,
                   None if layer is None else int(layer), location)


def _take(state: dict, key: str, path: Path) -> torch.Tensor:
    if key not in state:
        raise IntegrityError(f"SAE {path} lacks the tensor `{key}`")
    value = state[key]
    if not isinstance(value, torch.Tensor):
        raise IntegrityError(f"SAE {path}: `{key}` is a {type(value).__name__}, not a tensor")
    return value


def _read_cfg(folder: Path) -> dict:
    try:
        cfg = json.loads((folder / "cfg.json").read_text())
    except FileNotFoundError:
        raise CocomixError(f"SAE folder {folder} has no cfg.json") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise IntegrityError(f"SAE config {folder / 'cfg.json'} is not valid JSON ({err})") from None
    if not isinstance(cfg, dict):
        raise IntegrityError(f"SAE config {folder / 'cfg.json'} is not a JSON object")
    return cfg


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    try:
        return load_file(str(path), device="cpu")
    except Exception as err:  # SafetensorError, OSError, ...: the file cannot be parsed
        raise IntegrityError(f"cannot read SAE weights {path}: truncated or corrupt ({_first_line(err)})") from None


def _int_field(cfg: dict, key: str, folder: Path) -> int:
    value = cfg.get(key)
    if not isinstance(value, int):
        raise IntegrityError(f"SAE config {folder / 'cfg.json'} lacks the integer `{key}`")
    return value


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0][:200] if text else ""
