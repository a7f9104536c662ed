"""Teacher and student loading, the hidden-state projection, devices and dtypes, and random-weight stand-ins."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from hdkd import caching, hub
from hdkd.config import ConfigError

logger = logging.getLogger(__name__)

RANDOM_WEIGHTS_MARKER = "hdkd_random_weights"
RANDOM_WEIGHTS_WARNING = "weights are RANDOM (hdkd stand-in): accuracy numbers from this run mean nothing"

# Published Flan-T5 architecture values, used by `standins` when no config folder is given.
FLAN_T5_ARCHITECTURES = {
    "flan-t5-small": dict(d_model=512, d_ff=1024, d_kv=64, num_heads=6, num_layers=8, num_decoder_layers=8),
    "flan-t5-base": dict(d_model=768, d_ff=2048, d_kv=64, num_heads=12, num_layers=12, num_decoder_layers=12),
}
_FLAN_T5_COMMON = dict(
    vocab_size=32128, feed_forward_proj="gated-gelu", dense_act_fn="gelu_new", is_gated_act=True,
    relative_attention_num_buckets=32, relative_attention_max_distance=128, dropout_rate=0.1,
    layer_norm_epsilon=1e-6, initializer_factor=1.0, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0,
    tie_word_embeddings=False, is_encoder_decoder=True,
)


class ModelError(ValueError):
    """A model path or pairing that cannot be used."""


@dataclass
class ModelInfo:
    """Facts about a loaded model that a run records besides the module."""

    name: str
    parameters: int
    random_weights: bool
    digest: str


def count_parameters(model: nn.Module) -> int:
    """Count unique parameters; tied tensors count once."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


# --- Checks before loading ------------------------------------------------------------------------------


def check_model_source(value: str, role: str, trust_remote_code: bool = False) -> None:
    """Fail with one clear message when ``value`` cannot be a seq2seq model, without loading weights."""
    from transformers import AutoConfig

    hub.require_model(value, role)
    try:
        config = AutoConfig.from_pretrained(value, trust_remote_code=trust_remote_code)
    except Exception as err:  # noqa: BLE001 - transformers raises OSError, ValueError, KeyError here
        if not trust_remote_code and "trust_remote_code" in str(err):
            raise ModelError(f"{role} {value!r} is not a loadable transformers model without running Python code "
                             "that comes with it, which hdkd runs only with trust_remote_code=true; set it only for "
                             "code you have read") from None
        raise ModelError(f"{role} {value!r} is not a loadable transformers model ({type(err).__name__}: "
                         f"{str(err).splitlines()[0]})") from None
    if not getattr(config, "is_encoder_decoder", False):
        raise ModelError(f"{role} {value!r} is a {config.model_type!r} model, not an encoder-decoder (seq2seq) "
                         "model such as T5")


def load_tokenizer(value: str, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(value, trust_remote_code=trust_remote_code)
    except Exception as err:  # noqa: BLE001
        raise ModelError(f"no tokenizer could be loaded from {value!r} ({type(err).__name__}: "
                         f"{str(err).splitlines()[0]})") from None


def tokenizer_digest(tokenizer) -> str:
    """Fingerprint a tokenizer by its vocabulary and special tokens."""
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda item: item[1])
    return caching.fingerprint({"vocab": vocab, "special": tokenizer.all_special_tokens,
                                "class": type(tokenizer).__name__})


def check_same_tokenizer(teacher_tokenizer, student_tokenizer, teacher: str, student: str) -> None:
    """Hidden-state distillation pairs decoder positions, so both models must share one tokenizer."""
    if tokenizer_digest(teacher_tokenizer) != tokenizer_digest(student_tokenizer):
        raise ModelError(f"teacher {teacher!r} and student {student!r} use different tokenizers; hidden-state "
                         "distillation needs the same token positions, so pick models that share a vocabulary")


def is_random_stand_in(path: str) -> bool:
    config_path = Path(path) / "config.json"
    if not config_path.is_file():
        return False
    try:
        return bool(json.loads(config_path.read_text(encoding="utf-8")).get(RANDOM_WEIGHTS_MARKER))
    except (OSError, ValueError):
        return False


def weights_digest(path: str) -> str:
    """Fingerprint a model's weights: file SHA-256 for local folders, the resolved revision for hub ids."""
    folder = Path(path)
    if folder.is_dir():
        files = sorted(p for p in folder.iterdir() if p.suffix in (".safetensors", ".bin") or p.name == "config.json")
        return caching.fingerprint({p.name: _cached_sha256(p) for p in files})
    try:
        from huggingface_hub import try_to_load_from_cache

        config_file = try_to_load_from_cache(path, "config.json")
        if isinstance(config_file, str):
            return caching.fingerprint({"hub": path, "snapshot": Path(config_file).parent.name})
    except Exception:  # noqa: BLE001
        pass
    return caching.fingerprint({"hub": path})


def _cached_sha256(path: Path) -> str:
    """SHA-256 of a weight file, remembered in a sidecar JSON keyed by size and modification time."""
    stat = path.stat()
    stamp = f"{stat.st_size}-{stat.st_mtime_ns}"
    sidecar = Path.home() / ".cache" / "hdkd" / "sha256" / (caching.fingerprint(str(path.resolve())) + ".json")
    try:
        known = json.loads(sidecar.read_text(encoding="utf-8"))
        if known.get("stamp") == stamp:
            return known["sha256"]
    except (OSError, ValueError):
        pass
    digest = caching.file_sha256(path)
    try:
        caching.write_json_atomic(sidecar, {"path": str(path), "stamp": stamp, "sha256": digest})
    except OSError:
        pass
    return digest


# --- Loading --------------------------------------------------------------------------------------------


def load_seq2seq(value: str, role: str, trust_remote_code: bool = False):
    """Load an encoder-decoder model and describe it; weights that are random stand-ins are reported."""
    from concurrent.futures import ThreadPoolExecutor

    from transformers import AutoModelForSeq2SeqLM

    # Hashing the weight files releases the GIL, so it runs on another core while transformers loads the model.
    with ThreadPoolExecutor(max_workers=1) as pool:
        digest = pool.submit(weights_digest, value)
        try:
            model = AutoModelForSeq2SeqLM.from_pretrained(value, trust_remote_code=trust_remote_code)
        except Exception as err:  # noqa: BLE001
            raise ModelError(f"{role} {value!r} could not be loaded as a seq2seq model ({type(err).__name__}: "
                             f"{str(err).splitlines()[0]})") from None
    random_weights = is_random_stand_in(value)
    if random_weights:
        logger.warning("%s %s: %s", role, value, RANDOM_WEIGHTS_WARNING)
    info = ModelInfo(value, count_parameters(model), random_weights, digest.result())
    return model, info


def hidden_size(config) -> int:
    return int(getattr(config, "d_model", None) or config.hidden_size)


def make_projection(student_config, teacher_config, direction: str) -> nn.Linear:
    """Build the learned linear map between the two last decoder hidden-state widths."""
    student_width, teacher_width = hidden_size(student_config), hidden_size(teacher_config)
    if direction == "student_to_teacher":
        return nn.Linear(student_width, teacher_width, bias=False)
    return nn.Linear(teacher_width, student_width, bias=False)


# --- Devices and dtypes ---------------------------------------------------------------------------------


def resolve_device(requested: str) -> torch.device:
    if requested == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        return torch.device("cpu")
    if requested.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ConfigError([f"training.device={requested!r} is invalid; no CUDA device is available here "
                               "(use auto or cpu)"])
        index = int(requested.split(":", 1)[1]) if ":" in requested else 0
        if index >= torch.cuda.device_count():
            raise ConfigError([f"training.device={requested!r} is invalid; only {torch.cuda.device_count()} "
                               "CUDA device(s) are present"])
    if requested == "mps" and not torch.backends.mps.is_available():
        raise ConfigError(["training.device='mps' is invalid; MPS is not available here (use auto or cpu)"])
    return torch.device(requested)


def bf16_supported(device: torch.device) -> bool:
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    return False


def resolve_bf16(requested: bool | str, device: torch.device) -> bool:
    supported = bf16_supported(device)
    if requested == "auto":
        return supported
    if requested and not supported:
        raise ConfigError([f"training.bf16=true is invalid on {device.type}: bf16 is not supported here "
                           "(use auto or false)"])
    return bool(requested)


# --- Random-weight stand-ins ----------------------------------------------------------------------------


def build_stand_in(config_values: dict, tokenizer_dir: str, out_dir: Path, seed: int) -> int:
    """Write a randomly initialised T5 with an untied lm_head, plus the tokenizer; return its parameter count.

    transformers 5 ties lm_head to the shared embeddings on load unless the checkpoint contains a different
    lm_head, so lm_head gets its own independent initialisation here (a copy would be re-tied).
    """
    from transformers import AutoModelForSeq2SeqLM, AutoTokenizer, T5Config, T5ForConditionalGeneration

    torch.manual_seed(seed)
    values = {k: v for k, v in config_values.items() if k not in ("architectures", "transformers_version",
                                                                  "torch_dtype", "dtype", "task_specific_params")}
    config = T5Config(**values)
    model = T5ForConditionalGeneration(config)
    factor = config.initializer_factor
    model.lm_head.weight = nn.Parameter(torch.randn_like(model.shared.weight) * factor)

    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(out_dir)
    config_path = out_dir / "config.json"
    saved = json.loads(config_path.read_text(encoding="utf-8"))
    saved[RANDOM_WEIGHTS_MARKER] = True
    config_path.write_text(json.dumps(saved, indent=2) + "\n", encoding="utf-8")

    reloaded = AutoModelForSeq2SeqLM.from_pretrained(out_dir)
    if reloaded.lm_head.weight.data_ptr() == reloaded.shared.weight.data_ptr():
        raise RuntimeError(f"{out_dir}: lm_head was re-tied to the embeddings on reload")
    return count_parameters(reloaded)


def write_stand_ins(tokenizer_dir: str, out: str, configs_dir: str | None = None, seed: int = 0) -> dict[str, int]:
    """Write flan-t5-small and flan-t5-base stand-ins under ``out``; return parameter counts after reload."""
    if not (Path(tokenizer_dir) / "tokenizer_config.json").is_file() and not (
            Path(tokenizer_dir) / "spiece.model").is_file():
        raise ModelError(f"tokenizer folder {tokenizer_dir!r} not found or contains no tokenizer files")
    counts = {}
    for name, architecture in FLAN_T5_ARCHITECTURES.items():
        if configs_dir:
            config_path = Path(configs_dir) / name / "config.json"
            if not config_path.is_file():
                raise ModelError(f"{config_path} not found; --configs needs flan-t5-small/config.json and "
                                 "flan-t5-base/config.json")
            values = json.loads(config_path.read_text(encoding="utf-8"))
        else:
            values = {**_FLAN_T5_COMMON, **architecture}
        counts[name] = build_stand_in(values, tokenizer_dir, Path(out) / name, seed)
        logger.info("wrote %s (%d parameters)", Path(out) / name, counts[name])
    return counts
