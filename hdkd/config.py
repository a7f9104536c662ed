"""Typed configuration: dataclasses with one help text per field, YAML loading, overrides and validation.

Every default lives here once. ``config/hyperparameters.yaml`` is rendered from these dataclasses
(``python -m hdkd config``) and a test checks that the two agree.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union, get_args, get_origin, get_type_hints

import yaml


class ConfigError(ValueError):
    """Invalid configuration or input; the message lists every problem found."""

    def __init__(self, problems: list[str]):
        self.problems = list(problems)
        super().__init__("invalid configuration: " + "; ".join(self.problems))


def _field(default: Any, help: str, choices: tuple | None = None) -> Any:
    metadata = {"help": help}
    if choices:
        metadata["choices"] = choices
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata=metadata)
    return field(default=default, metadata=metadata)


def _section(cls: type) -> Any:
    return field(default_factory=cls, metadata={"help": cls.__doc__.strip().splitlines()[0]})


@dataclass
class DataConfig:
    """Source of the AQuA-RAT problems and their conversion into model inputs."""

    dataset: str = _field("deepmind/aqua_rat", "Hub dataset id, used for a split whose local file is not set.")
    dataset_config: str = _field("raw", "Configuration name of the hub dataset.")
    train_split: str = _field("train", "Hub split used for training.")
    validation_split: str = _field("validation", "Hub split used for validation.")
    train_file: str | None = _field(None, "Local JSON-lines training file in the AQuA-RAT schema; overrides the hub split.")
    validation_file: str | None = _field(
        None, "Local JSON-lines validation file in the AQuA-RAT schema; overrides the hub split."
    )
    portion: float = _field(1.0, "Share of each split to use, in (0, 1]; a seeded random subset.")
    min_train_examples: int = _field(8, "Lower bound on the training subset size taken by `portion`.")
    min_validation_examples: int = _field(32, "Lower bound on the validation subset size taken by `portion`.")
    max_source_length: int = _field(256, "Maximum prompt length in tokens; longer prompts are truncated and counted.")
    max_target_length: int = _field(32, "Maximum label length in tokens (gold labels and teacher answers).")
    bad_rows: str = _field("skip", "What to do with a malformed row: skip it (counted and logged) or stop.", ("skip", "error"))


@dataclass
class GenerationConfig:
    """Answer generation by the teacher (labels, validation) and the student (evaluation)."""

    max_new_tokens: int = _field(32, "Maximum number of generated tokens per answer.")
    num_beams: int = _field(1, "Beam count; 1 is greedy decoding.")
    batch_size: int = _field(32, "Prompts per generation batch.")


@dataclass
class DistillConfig:
    """The distillation loss: loss = (1 - hidden_weight) * ce_loss + hidden_weight * hidden_mse."""

    hidden_weight: float = _field(
        0.5,
        "Weight of the hidden-state MSE in [0, 1]; the cross-entropy gets 1 - hidden_weight. "
        "1/3 reproduces CE + 0.5 * MSE up to a constant factor of 2/3.",
    )
    label_source: str = _field(
        "teacher", "Student labels: the teacher's generated token ids, or the gold answer letter.", ("teacher", "gold")
    )
    projection: str = _field(
        "student_to_teacher",
        "Direction of the learned linear projection between the two hidden widths.",
        ("student_to_teacher", "teacher_to_student"),
    )
    teacher_hidden: str = _field(
        "cached",
        "Teacher hidden states: computed once and stored on disk (cached), or by a teacher forward pass at every "
        "step (online).",
        ("cached", "online"),
    )
    cache_dtype: str = _field("float32", "Storage type of cached teacher hidden states.", ("float32", "bfloat16"))


@dataclass
class TrainingConfig:
    """Optimisation; the names follow transformers.TrainingArguments. A step is one optimizer update."""

    learning_rate: float = _field(3e-4, "Peak learning rate of AdamW, shared by the student and the projection.")
    num_train_epochs: int = _field(3, "Passes over the training subset.")
    per_device_train_batch_size: int = _field(8, "Examples per micro-batch.")
    per_device_eval_batch_size: int = _field(32, "Examples per batch for the validation loss.")
    gradient_accumulation_steps: int = _field(1, "Micro-batches per optimizer step.")
    weight_decay: float = _field(0.0, "AdamW weight decay.")
    warmup_steps: int = _field(0, "Linear warm-up length in steps.")
    lr_scheduler_type: str = _field("linear", "transformers learning-rate schedule name.")
    max_grad_norm: float = _field(
        1.0, "Gradient clipping norm over the student and the projection together; 0 turns clipping off.")
    logging_steps: int = _field(10, "Log train/* metrics every this many steps.")
    eval_steps: int | None = _field(None, "Evaluate every this many steps; null evaluates at the end of each epoch.")
    save_steps: int = _field(500, "Write a resumable checkpoint every this many steps.")
    save_total_limit: int = _field(2, "Number of checkpoints kept; older ones are deleted.")
    group_by_length: bool = _field(True, "Batch prompts of similar length together to cut padding.")
    bf16: Union[bool, str] = _field("auto", "bf16 autocast: true, false, or auto (on where the hardware supports it).")
    fp16: bool = _field(False, "fp16 autocast; rejected for T5, whose activations overflow in fp16.")
    device: str = _field("auto", "Device: auto, cpu, cuda, cuda:N or mps.")
    dataloader_num_workers: int = _field(0, "Background data-loading processes; 0 loads in the main process.")


@dataclass
class TrackingConfig:
    """MLflow tracking. The store is MLFLOW_TRACKING_URI, or sqlite:///mlflow.db in the working directory."""

    experiment_name: str = _field("hdkd", "Experiment for new runs; a run started by `mlflow run` keeps its own.")
    run_name: str | None = _field(None, "Run name; null lets MLflow choose.")
    log_model: bool = _field(True, "Log the student as an MLflow pyfunc model named `student`.")
    system_metrics: bool = _field(False, "Log CPU, memory and GPU use as MLflow system metrics.")


@dataclass
class SearchConfig:
    """Optuna study over the loss weighting and the learning rate."""

    n_trials: int = _field(20, "Total finished trials wanted in the study, counted across processes and restarts.")
    study_name: str = _field("hdkd", "Optuna study name; a study with this name in the storage is resumed.")
    storage: str = _field(
        "sqlite:///optuna.db", "Optuna storage: an RDB URL (sqlite, postgresql, mysql) or a journal file path (*.log)."
    )
    direction: str = _field("maximize", "Optimisation direction of `metric`.", ("maximize", "minimize"))
    metric: str = _field("eval/student_accuracy", "Objective: a final metric of each trial run.")
    pruner: str = _field("median", "Trial pruner, or none.", ("median", "none"))
    pruner_startup_trials: int = _field(5, "Finished trials the study needs before the pruner stops any trial.")
    pruner_warmup_steps: int = _field(0, "Optimizer steps a trial runs before it may be pruned.")
    hidden_weight_low: float = _field(0.0, "Lower bound of distill.hidden_weight (uniform).")
    hidden_weight_high: float = _field(1.0, "Upper bound of distill.hidden_weight (uniform).")
    learning_rate_low: float = _field(1e-5, "Lower bound of training.learning_rate (log-uniform).")
    learning_rate_high: float = _field(1e-3, "Upper bound of training.learning_rate (log-uniform).")
    log_all_models: bool = _field(False, "Log every trial's student as an MLflow model, not only the best one.")


@dataclass
class RegistryConfig:
    """MLflow Model Registry entry for the best student of a study."""

    model_name: str = _field("hdkd-student", "Registered model name.")
    alias: str = _field("champion", "Alias moved to a new version only when it beats the current holder.")


@dataclass
class Config:
    """Everything one distillation run or study needs."""

    teacher: str = _field("google/flan-t5-base", "Teacher model: a hub id or a local directory.")
    student: str = _field("google/flan-t5-small", "Student model: a hub id or a local directory.")
    seed: int = _field(42, "Seed for the data subset, initialisation and training order.")
    output_dir: str = _field("outputs", "Folder for checkpoints, the trained student and reports.")
    cache_dir: str = _field(".hdkd_cache", "Folder for preprocessed data and teacher outputs, keyed by fingerprint.")
    trust_remote_code: bool = _field(False, "Allow model repositories to run their own Python code.")
    data: DataConfig = _section(DataConfig)
    generation: GenerationConfig = _section(GenerationConfig)
    distill: DistillConfig = _section(DistillConfig)
    training: TrainingConfig = _section(TrainingConfig)
    tracking: TrackingConfig = _section(TrackingConfig)
    search: SearchConfig = _section(SearchConfig)
    registry: RegistryConfig = _section(RegistryConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def flat(self) -> dict[str, Any]:
        """Return every key as a dotted name (``training.learning_rate``) with its value."""
        return dict(_flatten(self.to_dict()))


DEFAULT_CONFIG_PATH = Path(__file__).resolve().parent.parent / "config" / "hyperparameters.yaml"


def _flatten(tree: dict, prefix: str = ""):
    for key, value in tree.items():
        if isinstance(value, dict):
            yield from _flatten(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value


def _hints(cls: type) -> dict[str, Any]:
    return get_type_hints(cls)


def all_keys(cls: type = Config, prefix: str = "") -> list[str]:
    """Return every dotted key the configuration accepts."""
    keys = []
    hints = _hints(cls)
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            keys.extend(all_keys(hints[f.name], f"{prefix}{f.name}."))
        else:
            keys.append(f"{prefix}{f.name}")
    return keys


def _field_info(key: str) -> tuple[Any, dataclasses.Field]:
    cls: type = Config
    parts = key.split(".")
    for part in parts[:-1]:
        cls = _hints(cls)[part]
    f = next(f for f in dataclasses.fields(cls) if f.name == parts[-1])
    return _hints(cls)[f.name], f


# --- Reading --------------------------------------------------------------------------------------------


def parse_override(text: str) -> tuple[str, Any]:
    """Split ``key=value``; the value is read as a YAML scalar, so ``1e-4``, ``true`` and ``null`` work."""
    if "=" not in text:
        raise ConfigError([f"--set {text!r}: expected key=value"])
    key, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key.strip(), value


def _nest(flat: dict[str, Any]) -> dict[str, Any]:
    tree: dict[str, Any] = {}
    for key, value in flat.items():
        node = tree
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                break
        else:
            node[parts[-1]] = value
    return tree


def read_yaml(path: str | os.PathLike) -> dict[str, Any]:
    """Read a config file into a mapping of dotted keys; raise ConfigError for a missing or malformed file."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError([f"config file {str(path)!r} not found"])
    try:
        tree = yaml.safe_load(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise ConfigError([f"config file {str(path)!r} is not UTF-8 text"]) from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise ConfigError([f"config file {str(path)!r} is not valid YAML{where}: {problem}"]) from None
    if tree is None:
        return {}
    if not isinstance(tree, dict):
        raise ConfigError([f"config file {str(path)!r} must be a mapping of keys to values, got {type(tree).__name__}"])
    return dict(_flatten_user(tree))


def _flatten_user(tree: dict, prefix: str = ""):
    sections = {f.name for f in dataclasses.fields(Config) if dataclasses.is_dataclass(_hints(Config)[f.name])}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and (prefix or name in sections):
            yield from _flatten_user(value, f"{name}.")
        else:
            yield name, value


# --- Checking -------------------------------------------------------------------------------------------


def _is_union(hint: Any) -> bool:
    return get_origin(hint) is Union or type(hint).__name__ == "UnionType"


def _type_name(hint: Any) -> str:
    if _is_union(hint):
        return " or ".join(_type_name(a) for a in get_args(hint))
    if hint is type(None):
        return "null"
    return getattr(hint, "__name__", str(hint))


def _coerce(value: Any, hint: Any) -> tuple[bool, Any]:
    """Return (ok, value) with ints accepted for floats and numeric strings left as type errors."""
    if _is_union(hint):
        for arg in get_args(hint):
            ok, converted = _coerce(value, arg)
            if ok:
                return True, converted
        return False, value
    if hint is type(None):
        return value is None, value
    if hint is bool:
        return isinstance(value, bool), value
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool), value
    if hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return True, float(value)
        if isinstance(value, str):
            # YAML 1.1 reads 1e-4 as a string; accept any plain float spelling.
            try:
                return True, float(value)
            except ValueError:
                return False, value
        return False, value
    if hint is str:
        return isinstance(value, str), value
    return True, value


def _range_problems(cfg: Config) -> list[str]:
    problems = []
    d, g, t, s = cfg.data, cfg.generation, cfg.training, cfg.search

    def need(ok: bool, key: str, value: Any, accepted: str):
        if not ok:
            problems.append(f"{key}={value!r} is invalid; expected {accepted}")

    need(isinstance(d.portion, float) and not math.isnan(d.portion) and 0 < d.portion <= 1,
         "data.portion", d.portion, "a number in (0, 1]")
    need(d.min_train_examples >= 1, "data.min_train_examples", d.min_train_examples, "an integer >= 1")
    need(d.min_validation_examples >= 1, "data.min_validation_examples", d.min_validation_examples, "an integer >= 1")
    need(d.max_source_length >= 8, "data.max_source_length", d.max_source_length, "an integer >= 8")
    need(d.max_target_length >= 1, "data.max_target_length", d.max_target_length, "an integer >= 1")
    need(g.max_new_tokens >= 1, "generation.max_new_tokens", g.max_new_tokens, "an integer >= 1")
    need(g.num_beams >= 1, "generation.num_beams", g.num_beams, "an integer >= 1")
    need(g.batch_size >= 1, "generation.batch_size", g.batch_size, "an integer >= 1")
    hw = cfg.distill.hidden_weight
    need(not math.isnan(hw) and 0 <= hw <= 1, "distill.hidden_weight", hw, "a number in [0, 1]")
    need(t.learning_rate > 0 and math.isfinite(t.learning_rate), "training.learning_rate", t.learning_rate,
         "a number > 0")
    need(t.num_train_epochs >= 1, "training.num_train_epochs", t.num_train_epochs, "an integer >= 1")
    need(t.per_device_train_batch_size >= 1, "training.per_device_train_batch_size", t.per_device_train_batch_size,
         "an integer >= 1")
    need(t.per_device_eval_batch_size >= 1, "training.per_device_eval_batch_size", t.per_device_eval_batch_size,
         "an integer >= 1")
    need(t.gradient_accumulation_steps >= 1, "training.gradient_accumulation_steps", t.gradient_accumulation_steps,
         "an integer >= 1")
    need(t.weight_decay >= 0, "training.weight_decay", t.weight_decay, "a number >= 0")
    need(t.warmup_steps >= 0, "training.warmup_steps", t.warmup_steps, "an integer >= 0")
    need(t.max_grad_norm >= 0, "training.max_grad_norm", t.max_grad_norm, "a number >= 0")
    need(t.logging_steps >= 1, "training.logging_steps", t.logging_steps, "an integer >= 1")
    need(t.eval_steps is None or t.eval_steps >= 1, "training.eval_steps", t.eval_steps, "null or an integer >= 1")
    need(t.save_steps >= 1, "training.save_steps", t.save_steps, "an integer >= 1")
    need(t.save_total_limit >= 1, "training.save_total_limit", t.save_total_limit, "an integer >= 1")
    need(t.dataloader_num_workers >= 0, "training.dataloader_num_workers", t.dataloader_num_workers, "an integer >= 0")
    need(t.bf16 in (True, False, "auto"), "training.bf16", t.bf16, "true, false or auto")
    need(not t.fp16, "training.fp16", t.fp16,
         "false: T5 activations overflow in fp16, so use training.bf16=true (or auto) instead")
    need(t.device == "auto" or t.device in ("cpu", "mps") or t.device == "cuda" or t.device.startswith("cuda:"),
         "training.device", t.device, "auto, cpu, cuda, cuda:N or mps")
    need(s.n_trials >= 1, "search.n_trials", s.n_trials, "an integer >= 1")
    need(s.pruner_warmup_steps >= 0, "search.pruner_warmup_steps", s.pruner_warmup_steps, "an integer >= 0")
    need(s.pruner_startup_trials >= 0, "search.pruner_startup_trials", s.pruner_startup_trials, "an integer >= 0")
    need(0 <= s.hidden_weight_low <= s.hidden_weight_high <= 1, "search.hidden_weight_low/high",
         (s.hidden_weight_low, s.hidden_weight_high), "0 <= low <= high <= 1")
    need(0 < s.learning_rate_low <= s.learning_rate_high, "search.learning_rate_low/high",
         (s.learning_rate_low, s.learning_rate_high), "0 < low <= high")
    for key in ("teacher", "student", "output_dir", "cache_dir", "tracking.experiment_name", "search.study_name",
                "search.storage", "registry.model_name", "registry.alias"):
        value = cfg.get(key)
        need(bool(value), key, value, "a non-empty string")
    return problems


def build_config(values: dict[str, Any]) -> Config:
    """Build a Config from dotted keys over the defaults; raise one ConfigError listing every problem."""
    known = all_keys()
    problems = []
    checked: dict[str, Any] = {}
    for key, value in values.items():
        if key not in known:
            close = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
            if not close:
                close = [k for k in known if k.endswith("." + key)][:1]
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            problems.append(f"unknown key {key!r}{hint}")
            continue
        hint, f = _field_info(key)
        ok, converted = _coerce(value, hint)
        if not ok:
            problems.append(f"{key}={value!r} has the wrong type; expected {_type_name(hint)}")
            continue
        choices = f.metadata.get("choices")
        if choices and converted not in choices:
            problems.append(f"{key}={converted!r} is invalid; expected one of {', '.join(choices)}")
            continue
        checked[key] = converted

    # Range checks run on the values that passed, so one message lists every problem.
    cfg = Config()
    for key, value in checked.items():
        cfg.set(key, value)
    problems += _range_problems(cfg)
    if problems:
        raise ConfigError(problems)
    return cfg


def load_config(path: str | os.PathLike | None = None, overrides: list[str] | dict[str, Any] | None = None) -> Config:
    """Read defaults, then the config file (any subset of keys), then ``key=value`` overrides, and check all.

    Relative paths are resolved against the current directory. ``teacher`` and ``student`` stay hub ids unless
    a directory of that name exists.
    """
    values: dict[str, Any] = {}
    if path is not None:
        values.update(read_yaml(path))
    if isinstance(overrides, dict):
        values.update(overrides)
    elif overrides:
        problems = []
        for text in overrides:
            try:
                key, value = parse_override(text)
            except ConfigError as err:
                problems.extend(err.problems)
                continue
            values[key] = value
        if problems:
            raise ConfigError(problems)
    cfg = build_config(values)
    resolve_paths(cfg)
    return cfg


def resolve_paths(cfg: Config) -> None:
    for key in ("data.train_file", "data.validation_file", "output_dir", "cache_dir"):
        value = cfg.get(key)
        if value:
            cfg.set(key, str(Path(value).expanduser().resolve()))
    for key in ("teacher", "student"):
        value = cfg.get(key)
        path = Path(value).expanduser()
        if path.is_dir() or value.startswith((".", "/", "~")):
            cfg.set(key, str(path.resolve()))


def _get(self: Config, key: str) -> Any:
    node: Any = self
    for part in key.split("."):
        node = getattr(node, part)
    return node


def _set(self: Config, key: str, value: Any) -> None:
    node: Any = self
    parts = key.split(".")
    for part in parts[:-1]:
        node = getattr(node, part)
    setattr(node, parts[-1], value)


Config.get = _get  # type: ignore[attr-defined]
Config.set = _set  # type: ignore[attr-defined]


# --- Rendering ------------------------------------------------------------------------------------------


def _yaml_value(value: Any) -> str:
    text = yaml.safe_dump(value, default_flow_style=True, width=1000).strip()
    return text.removesuffix("\n...").removesuffix(" ...").strip()


def render_yaml(cfg: Config | None = None) -> str:
    """Render a config as commented YAML, one help comment above each key."""
    cfg = cfg or Config()
    if cfg == Config():
        lines = [
            "# hdkd defaults. Every key is optional in a config file: keys left out take these values.",
            "# Rendered from hdkd/config.py by `python -m hdkd config`; edit the dataclasses, then re-render.",
            "",
        ]
    else:
        lines = ["# hdkd configuration: the defaults with the given config file and --set values merged in.", ""]

    def emit(obj: Any, indent: str):
        hints = _hints(type(obj))
        for f in dataclasses.fields(obj):
            value = getattr(obj, f.name)
            help_text = f.metadata.get("help", "")
            choices = f.metadata.get("choices")
            if choices:
                help_text += f" One of: {', '.join(choices)}."
            if dataclasses.is_dataclass(hints[f.name]):
                lines.append("")
                lines.append(f"{indent}# {help_text}")
                lines.append(f"{indent}{f.name}:")
                emit(value, indent + "  ")
            else:
                lines.append(f"{indent}# {help_text}")
                lines.append(f"{indent}{f.name}: {_yaml_value(value)}")

    emit(cfg, "")
    return "\n".join(lines) + "\n"


def render_markdown() -> str:
    """Render every key with its type, default and help text as the Markdown page ``docs/configuration.md``."""
    lines = [
        "# Configuration reference",
        "",
        "<!-- Rendered from hdkd/config.py by `python -m hdkd config --markdown > docs/configuration.md`;",
        "     edit the dataclasses, then re-render. A test checks that this page matches them. -->",
        "",
        "Every key is optional. A run takes the defaults below, then the YAML file given with `--config` (any",
        "subset of keys, nested by section or dotted), then each `--set KEY=VALUE` in order. Values are read as",
        "YAML scalars, so `1e-4`, `true` and `null` work on the command line. Unknown keys and invalid values are",
        "all reported in one error. `python -m hdkd config` prints the full defaults as commented YAML, the same",
        "content as `config/hyperparameters.yaml`.",
        "",
    ]

    def cell(text: str) -> str:
        return text.replace("|", "\\|").replace("\n", " ")

    def table(cls: type, prefix: str) -> list[str]:
        rows = ["| key | type | default | description |", "|---|---|---|---|"]
        hints = _hints(cls)
        instance = cls()
        for f in dataclasses.fields(cls):
            if dataclasses.is_dataclass(hints[f.name]):
                continue
            help_text = f.metadata.get("help", "")
            choices = f.metadata.get("choices")
            if choices:
                help_text += " One of: " + ", ".join(f"`{choice}`" for choice in choices) + "."
            default = _yaml_value(getattr(instance, f.name))
            rows.append(f"| `{prefix}{f.name}` | {cell(_type_name(hints[f.name]))} | `{cell(default)}` | "
                        f"{cell(help_text)} |")
        return rows

    lines += ["## Top-level keys", "", *table(Config, ""), ""]
    hints = _hints(Config)
    for f in dataclasses.fields(Config):
        section = hints[f.name]
        if not dataclasses.is_dataclass(section):
            continue
        lines += [f"## `{f.name}`", "", " ".join(section.__doc__.split()), "", *table(section, f"{f.name}."), ""]
    return "\n".join(lines)
