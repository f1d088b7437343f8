"""Experiment configs: typed, validated YAML with `section.key=value` command-line overrides.

An experiment file is a nested mapping whose sections map onto the frozen dataclasses
below. The loader is strict: unknown keys, wrong types and bad choices are rejected
with a one-line `ConfigError` naming the dotted key, so a CLI can print it as is.

    exp = load_experiment("configs/demo.yaml", ["optim.lr=3e-5", "train.epochs=2"])
    model_config = resolve_model_config(exp)   # fresh, or from model.init_checkpoint
    check_paths(exp)                           # data root and split JSONs exist

Relative paths (`data.root`, `model.init_checkpoint`, `output_dir`) are relative to the
working directory, not to the YAML file: the shipped configs assume the repository root.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import types
import typing
from pathlib import Path
from typing import Any, Literal, Mapping, Optional, Sequence

import yaml

from mtjax.config import (BERT_RUNTIME_FIELDS, BINARY_TASK, DROPOUT_IMPLS, LSTM_IMPLS, POOLING_MODES, VARIANTS,
                          BertConfig, ConfigError, ModelConfig)

# Names the MTL registry knows (mtjax/mtl/registry.py); a plain list here keeps config
# loading free of jax/optax imports. tests/test_experiment_config.py checks they agree.
WEIGHTINGS = ("unweighted", "predefined", "naive_learnable", "uncertainty", "gradnorm", "dwa",
              "rlw", "famo")
AGGREGATORS = ("sum", "mean", "pcgrad", "mgda", "cagrad", "imtl_g", "gradvac", "aligned_mtl",
               "nash_mtl", "upgrad", "graddrop")
SCHEDULES = ("all_at_once", "round_robin", "one_at_a_time", "dynamic_difficulty_sampling", "dsg",
             "curriculum")
# Schedules that step on one task at a time: there is no set of per-task gradients to aggregate.
SINGLE_TASK_SCHEDULES = ("round_robin", "one_at_a_time")
# Model-selection metrics (mtjax.metrics.compute_metrics); all are "higher is better",
# which is what the plateau schedule (mode max) and best-checkpoint selection assume.
SELECT_METRICS = ("average_f1", "average_macro_f1", "hamming_score", "exact_match")
MISSING_VIDEO_MODES = ("zeros", "skip")  # mtjax.data.reader.MISSING_VIDEO_MODES
MODEL_DTYPES = ("float32", "bfloat16")
# ModelConfig fields that change parameter shapes: a checkpoint's weights fix them.
SHAPE_FIELDS = ("bert", "video_dim", "audio_dim", "lstm_hidden", "lstm_layers", "head_dims")


# ----------------------------------------------------------------------------- schema


@dataclasses.dataclass(frozen=True, kw_only=True)
class ModelSection:
    # An orbax model dir (python -m convert.weights, or a trained run's model); None = fresh init.
    init_checkpoint: Optional[str] = None
    # Any ModelConfig field; nested `bert` only for a fresh model (a checkpoint fixes its shapes).
    overrides: dict = dataclasses.field(default_factory=dict)

    def __post_init__(self):
        # Checked (and converted: lists -> tuples, ints -> floats) against ModelConfig's fields.
        object.__setattr__(self, "overrides", _check_model_overrides(self))


@dataclasses.dataclass(frozen=True, kw_only=True)
class DataSection:
    root: str  # the original layout's root: mtjax.data.reader.split_paths(root, split)
    train_split: str = "train"
    val_split: str = "val"
    test_split: str = "test"
    positives_only: bool = False  # the original multi-task recipe keeps only label == 1 clips
    fine_grained_on_positives: bool = False  # fine-grained tasks counted on label == 1 clips only
    missing_video: Literal[MISSING_VIDEO_MODES] = "zeros"
    batch_size: int = 16
    eval_batch_size: int = 32


@dataclasses.dataclass(frozen=True, kw_only=True)
class OptimSection:
    name: Literal["adam", "adamw"] = "adam"
    lr: float = 1.5e-5
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    weight_decay: float = 0.0
    clip_norm: Optional[float] = None  # global gradient-norm clip
    # 'plateau' = ReduceLROnPlateau, mode max on the validation `train.select_metric`.
    schedule: Literal["constant", "plateau"] = "constant"
    plateau_factor: float = 0.5
    plateau_patience: int = 2
    plateau_min_lr: float = 1e-8
    plateau_rtol: float = 1e-4
    # Update the small parameter arrays (biases, norms: 218 of HICCAP's 318) as one packed
    # vector (mtjax.packed_params): the same parameters, ~0.4 ms less per H100 step. The
    # optimizer state is then packed too, so a run resumes only with the setting it began
    # with (runs saved before the setting existed resume per array: load_run_experiment).
    pack_small_arrays: bool = True
    # The dtype Adam keeps its first moment in. 'bfloat16' halves that state (2 bytes less
    # per parameter, read and written every step); the update still uses the float32 moment
    # of the step, only what is stored for the next step is rounded (optax's `mu_dtype`).
    # A numerics change: 'float32' is PyTorch's Adam. May change on resume (the saved moment
    # is cast).
    mu_dtype: Literal["float32", "bfloat16"] = "float32"


@dataclasses.dataclass(frozen=True, kw_only=True)
class LossSection:
    weighting: Literal[WEIGHTINGS] = "unweighted"
    weights: Optional[dict[str, float]] = None  # per-task weights for 'predefined'
    weighting_options: dict = dataclasses.field(default_factory=dict)
    # SPEC §2.8: 'reported_constant' adds l2_coef·Σ‖w‖₂ to the reported loss with no gradient
    # (the binary original's `.item()`); 'real' adds it as a differentiable term.
    l2: Literal["none", "reported_constant", "real"] = "none"
    l2_coef: float = 0.1


@dataclasses.dataclass(frozen=True, kw_only=True)
class StrategySection:
    schedule: Literal[SCHEDULES] = "all_at_once"
    aggregator: Optional[Literal[AGGREGATORS]] = None  # None = plain sum of weighted losses
    # What the aggregator combines: per-task gradients of the shared parameters (exact, a
    # backward per task) or of the shared features the heads read (one trunk backward).
    aggregate_on: Literal["parameters", "features"] = "parameters"
    options: dict = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True, kw_only=True)
class TrainSection:
    epochs: int = 3
    max_steps_per_epoch: Optional[int] = None
    log_every: int = 10
    keep_checkpoints: int = 3
    async_checkpoints: bool = True
    max_consecutive_skips: int = 5  # non-finite steps in a row before the run stops with a report
    select_metric: Literal[SELECT_METRICS] = "average_f1"
    progress_bar: bool = True


@dataclasses.dataclass(frozen=True, kw_only=True)
class ExperimentConfig:
    name: str
    seed: int = 0
    output_dir: str = ""  # "" -> runs/<name>, filled in by __post_init__
    model: ModelSection = dataclasses.field(default_factory=ModelSection)
    data: DataSection
    optim: OptimSection = dataclasses.field(default_factory=OptimSection)
    loss: LossSection = dataclasses.field(default_factory=LossSection)
    strategy: StrategySection = dataclasses.field(default_factory=StrategySection)
    train: TrainSection = dataclasses.field(default_factory=TrainSection)

    def __post_init__(self):
        if not self.output_dir:
            object.__setattr__(self, "output_dir", f"runs/{self.name}")
        validate(self)  # every construction is checked: from_dict, dataclasses.replace, ...

    @property
    def tasks_if_known(self) -> tuple[str, ...] | None:
        """The model's tasks when the config alone fixes them (else the checkpoint does)."""
        if "tasks" in self.model.overrides:
            return tuple(self.model.overrides["tasks"])
        if self.model.init_checkpoint is None:
            return ModelConfig().tasks
        return None

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON/YAML types only (tuples become lists)."""
        return _plain(dataclasses.asdict(self))

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "ExperimentConfig":
        """Strict build + every check of `load_experiment` (but none that touch the disk)."""
        return _build(cls, data, "")

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "ExperimentConfig":
        return cls.from_dict(json.loads(text))

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


def _plain(x: Any) -> Any:
    if isinstance(x, Mapping):
        return {k: _plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_plain(v) for v in x]
    return x


# ----------------------------------------------------------------------------- strict builder


def _err(message: str) -> ConfigError:
    # One line, always: the CLI prints it after "error:" with no traceback.
    return ConfigError(" ".join(str(message).split("\n")))


def _join(prefix: str, key: Any) -> str:
    return f"{prefix}.{key}" if prefix else str(key)


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return " or ".join(_type_name(a) for a in args) + " or null"
    if origin is tuple:
        return f"a list of {_type_name(typing.get_args(tp)[0])}"
    if origin is dict or tp is dict:
        args = typing.get_args(tp)
        return f"a mapping of {_type_name(args[1])}" if args else "a mapping"
    if dataclasses.is_dataclass(tp):
        return "a mapping"
    return getattr(tp, "__name__", str(tp))


def _hints(cls) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _wrong(key: str, tp: Any, value: Any) -> ConfigError:
    return _err(f"{key}: expected {_type_name(tp)}, got {type(value).__name__} {_show(value)}")


def _coerce(tp: Any, value: Any, key: str, *, nested_as_dict: bool = False) -> Any:
    """`value` checked against the annotation `tp` (and converted: int->float, list->tuple)."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None:
            if type(None) in args:
                return None
            raise _wrong(key, tp, value)
        rest = [a for a in args if a is not type(None)]
        if len(rest) != 1:
            raise TypeError(f"unsupported annotation {tp} for {key}")  # a schema bug, not user input
        try:
            return _coerce(rest[0], value, key, nested_as_dict=nested_as_dict)
        except ConfigError:
            if rest[0] in (bool, int, float, str):
                raise _wrong(key, tp, value) from None  # say "or null"
            raise  # containers/choices: the inner message names the precise key
    if value is None:
        raise _wrong(key, tp, value)
    if origin is Literal:
        allowed = typing.get_args(tp)
        if not isinstance(value, str) or value not in allowed:
            raise _err(f"{key}: must be one of {', '.join(allowed)}; got {_show(value)}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise _wrong(key, tp, value)
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise _wrong(key, tp, value)
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise _wrong(key, tp, value)
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise _wrong(key, tp, value)
        return value
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise _wrong(key, tp, value)
        (elem, *_) = typing.get_args(tp)
        return tuple(_coerce(elem, v, f"{key}[{i}]") for i, v in enumerate(value))
    if tp is dict or origin is dict:
        if not isinstance(value, Mapping):
            raise _wrong(key, tp, value)
        args = typing.get_args(tp)
        out = {}
        for k, v in value.items():
            if not isinstance(k, str):
                raise _err(f"{key}: keys must be strings, got {type(k).__name__} {_show(k)}")
            out[k] = _coerce(args[1], v, _join(key, k)) if args else _plain_copy(v)
        return out
    if dataclasses.is_dataclass(tp):
        if nested_as_dict:
            return _check_fields(tp, value, key, partial=True)
        return _build(tp, value, key)
    raise TypeError(f"unsupported annotation {tp} for {key}")


def _plain_copy(v: Any) -> Any:
    # Free-form option values stay as given (copied so the config never aliases caller data).
    if isinstance(v, Mapping):
        return {k: _plain_copy(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_plain_copy(x) for x in v]
    return v


def _check_fields(cls, data: Any, prefix: str, *, partial: bool = False,
                  nested_as_dict: bool = False) -> dict[str, Any]:
    """Checked keyword arguments for `cls` from the mapping `data` (keys named from `prefix`)."""
    if not isinstance(data, Mapping):
        where = prefix or "the config"
        raise _err(f"{where}: expected a mapping of keys, got {type(data).__name__} {_show(data)}")
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    for k in data:
        if k not in fields:
            under = f"under '{prefix}'" if prefix else "at the top level"
            raise _err(f"unknown key '{_join(prefix, k)}'; valid keys {under}: {', '.join(fields)}")
    if not partial:
        required = [n for n, f in fields.items() if f.default is dataclasses.MISSING
                    and f.default_factory is dataclasses.MISSING]
        for n in required:
            if n not in data:
                raise _err(f"missing required key '{_join(prefix, n)}'")
    hints = _hints(cls)
    return {k: _coerce(hints[k], v, _join(prefix, k), nested_as_dict=nested_as_dict)
            for k, v in data.items()}


def _build(cls, data: Any, prefix: str):
    return cls(**_check_fields(cls, data, prefix))


# ----------------------------------------------------------------------------- validation


def _check_model_overrides(m: ModelSection) -> dict[str, Any]:
    ov = _check_fields(ModelConfig, m.overrides, "model.overrides", partial=True, nested_as_dict=True)
    choices = {"variant": VARIANTS, "pooling": POOLING_MODES, "dtype": MODEL_DTYPES, "lstm_impl": LSTM_IMPLS,
               "dropout_impl": DROPOUT_IMPLS}
    for name, allowed in choices.items():
        if name in ov and ov[name] not in allowed:
            raise _err(f"model.overrides.{name}: must be one of {', '.join(allowed)}; "
                       f"got {_show(ov[name])}")
    if m.init_checkpoint is not None:
        fixed = [k for k in SHAPE_FIELDS if k in ov and not (k == "bert" and _bert_runtime_only(ov[k]))]
        if fixed:
            raise _err(f"model.overrides.{fixed[0]}: cannot be changed when loading "
                       f"model.init_checkpoint={m.init_checkpoint!r} (its weights fix the shapes "
                       f"of {', '.join(SHAPE_FIELDS)}; of bert, only {', '.join(BERT_RUNTIME_FIELDS)} "
                       f"may change); drop it or start fresh")
        # The rest is checked against the checkpoint's config in resolve_model_config.
        if "tasks" in ov:
            _model_error(lambda: ModelConfig(tasks=ov["tasks"]))
        if "bert" in ov:
            _model_error(lambda: BertConfig(**ov["bert"]))
    else:
        _model_error(lambda: ModelConfig.from_dict(ov))
    return ov


def _bert_runtime_only(bert_overrides: Mapping[str, Any]) -> bool:
    """Whether `model.overrides.bert` only chooses how BERT runs (attention kernel, remat, dropout masks),
    which a checkpoint's weights do not fix."""
    return set(bert_overrides) <= set(BERT_RUNTIME_FIELDS)


def _model_error(make):
    try:
        return make()
    except (ConfigError, TypeError, ValueError) as e:
        raise _err(f"model.overrides: {e}") from None


def check_tasks(exp: ExperimentConfig, tasks: Sequence[str]) -> None:
    """Checks that depend on the model's task list."""
    tasks = tuple(tasks)
    loss = exp.loss
    if loss.weighting == "predefined":
        if loss.weights is None:
            raise _err(f"loss.weighting 'predefined' needs loss.weights, one per task: "
                       f"{', '.join(tasks)}")
        missing = [t for t in tasks if t not in loss.weights]
        extra = [t for t in loss.weights if t not in tasks]
        if missing or extra:
            parts = ([f"lacks {', '.join(missing)}"] if missing else []) + (
                [f"has {', '.join(extra)} which the model does not"] if extra else [])
            raise _err(f"loss.weights must cover exactly the model's tasks ({', '.join(tasks)}): "
                       f"it {' and '.join(parts)}")
    if exp.data.positives_only and BINARY_TASK in tasks:
        raise _err(f"data.positives_only keeps only label == 1 clips, so task '{BINARY_TASK}' would "
                   f"see one class; use data.fine_grained_on_positives instead")


def validate(exp: ExperimentConfig) -> None:
    """Cross-field checks that need no disk access; raises a one-line ConfigError."""
    if not exp.name.strip():
        raise _err("name: must be a non-empty string")
    if exp.seed < 0:
        raise _err(f"seed: must be >= 0, got {exp.seed}")
    d, o, l, t = exp.data, exp.optim, exp.loss, exp.train
    if not d.root:
        raise _err("data.root: must be a non-empty path")
    positive = {"data.batch_size": d.batch_size, "data.eval_batch_size": d.eval_batch_size,
                "optim.lr": o.lr, "optim.eps": o.eps, "train.epochs": t.epochs,
                "train.log_every": t.log_every, "train.keep_checkpoints": t.keep_checkpoints,
                "train.max_consecutive_skips": t.max_consecutive_skips}
    if o.clip_norm is not None:
        positive["optim.clip_norm"] = o.clip_norm
    if t.max_steps_per_epoch is not None:
        positive["train.max_steps_per_epoch"] = t.max_steps_per_epoch
    for key, v in positive.items():
        if not (v > 0 and math.isfinite(v)):
            raise _err(f"{key}: must be positive, got {v}")
    non_negative = {"optim.weight_decay": o.weight_decay, "optim.plateau_patience": o.plateau_patience,
                    "optim.plateau_min_lr": o.plateau_min_lr, "optim.plateau_rtol": o.plateau_rtol,
                    "loss.l2_coef": l.l2_coef}
    for key, v in non_negative.items():
        if not (v >= 0 and math.isfinite(v)):
            raise _err(f"{key}: must be >= 0, got {v}")
    for key, v in (("optim.b1", o.b1), ("optim.b2", o.b2)):
        if not 0 <= v < 1:
            raise _err(f"{key}: must be in [0, 1), got {v}")
    if not 0 < o.plateau_factor < 1:
        raise _err(f"optim.plateau_factor: must be in (0, 1), got {o.plateau_factor}")
    if o.name == "adam" and o.weight_decay > 0:
        # Torch Adam's weight_decay is an L2 term coupled to the adaptive scaling; we do not
        # emulate it. Decoupled decay is what the later experiments used.
        raise _err(f"optim.weight_decay={o.weight_decay} with optim.name 'adam' is not supported: "
                   f"use optim.name=adamw (decoupled weight decay) or loss.l2=real")
    if l.weights is not None:
        for task, w in l.weights.items():
            if not (w >= 0 and math.isfinite(w)):
                raise _err(f"loss.weights.{task}: must be >= 0, got {w}")
        if not any(w > 0 for w in l.weights.values()):
            raise _err("loss.weights: at least one weight must be positive")
    if exp.strategy.aggregate_on != "parameters" and exp.strategy.aggregator is None:
        raise _err(f"strategy.aggregate_on '{exp.strategy.aggregate_on}' says what a gradient aggregator "
                   f"combines, but strategy.aggregator is not set")
    if exp.strategy.aggregator is not None and exp.strategy.schedule in SINGLE_TASK_SCHEDULES:
        raise _err(f"strategy.aggregator '{exp.strategy.aggregator}' needs per-task gradients of one "
                   f"step, but schedule '{exp.strategy.schedule}' steps on one task at a time")
    tasks = exp.tasks_if_known
    if tasks is not None:
        check_tasks(exp, tasks)


# ----------------------------------------------------------------------------- YAML + overrides


class _Loader(yaml.SafeLoader):
    """SafeLoader that reads `1e-5` as a float (YAML 1.1 wants `1.0e-5`; 1.2 and people don't)
    and rejects duplicate keys (PyYAML keeps the last one silently)."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            try:
                duplicate = key in seen
            except TypeError:  # unhashable: the base class reports it
                continue
            if duplicate:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r}", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


_FLOAT = "tag:yaml.org,2002:float"
_Loader.yaml_implicit_resolvers = {
    ch: [r for r in resolvers if r[0] != _FLOAT]
    for ch, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Loader.add_implicit_resolver(
    _FLOAT,
    re.compile(r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
                   |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
                   |\.[0-9_]+(?:[eE][-+]?[0-9]+)?
                   |[-+]?\.(?:inf|Inf|INF)
                   |\.(?:nan|NaN|NAN))$""", re.X),
    list("-+0123456789."),
)


def _yaml_load(text: str) -> Any:
    return yaml.load(text, Loader=_Loader)  # noqa: S506 (a SafeLoader subclass)


def _yaml_error(where: str, e: yaml.YAMLError) -> ConfigError:
    mark = getattr(e, "problem_mark", None)
    problem = getattr(e, "problem", None) or str(e)
    if mark is not None:
        return _err(f"{where}:{mark.line + 1}:{mark.column + 1}: YAML syntax error: {problem}")
    return _err(f"{where}: YAML syntax error: {problem}")


def _field_type(cls, name: str) -> Any:
    return _hints(cls)[name]


def _schema_type(path: list[str]) -> Any:
    """Annotation at a dotted path inside ExperimentConfig, or None where the path enters a
    free-form mapping (model.overrides, loss.weights, ...). Unknown keys raise."""
    tp: Any = ExperimentConfig
    for i, part in enumerate(path):
        tp = _unwrap_optional(tp)
        if tp is dict or typing.get_origin(tp) is dict:
            return None
        if not dataclasses.is_dataclass(tp):
            raise _err(f"'{'.'.join(path[:i])}' is a single value ({_type_name(tp)}), "
                       f"not a section: '{'.'.join(path)}' does not exist")
        names = [f.name for f in dataclasses.fields(tp)]
        if part not in names:
            prefix = ".".join(path[:i])
            under = f"under '{prefix}'" if prefix else "at the top level"
            raise _err(f"unknown key '{'.'.join(path[:i + 1])}'; valid keys {under}: {', '.join(names)}")
        tp = _field_type(tp, part)
    return tp


def _unwrap_optional(tp: Any) -> Any:
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        rest = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(rest) == 1:
            return rest[0]
    return tp


def apply_overrides(data: Mapping[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """A deep copy of `data` with each `dotted.key=value` applied (value read as YAML)."""
    out = _plain_copy(data)
    for item in overrides:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise _err(f"override {item!r}: expected dotted.key=value, e.g. optim.lr=3e-5")
        path = key.split(".")
        if any(not p for p in path):
            raise _err(f"override {item!r}: empty part in key {key!r}")
        try:
            tp = _schema_type(path)
        except ConfigError as e:
            raise _err(f"override {item!r}: {e}") from None
        try:
            value = _yaml_load(raw)
        except yaml.YAMLError as e:
            raise _err(f"override {item!r}: value is not valid YAML ({getattr(e, 'problem', e)})") from None
        # A string field takes the text as typed (name=2024, data.root=123) unless it is null.
        if _unwrap_optional(tp) is str and value is not None and not isinstance(value, str):
            value = raw.strip()
        node = out
        for i, part in enumerate(path[:-1]):
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            elif not isinstance(child, dict):
                raise _err(f"override {item!r}: '{'.'.join(path[:i + 1])}' is {_show(child)}, "
                           f"not a mapping")
            node = child
        node[path[-1]] = value
    return out


def load_experiment(path: str | Path, overrides: Sequence[str] = ()) -> ExperimentConfig:
    """YAML file + `dotted.key=value` overrides -> a validated ExperimentConfig.

    Does not touch the data or the checkpoint: see `check_paths` and `resolve_model_config`.
    """
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise _err(f"{path}: experiment config file not found") from None
    except (IsADirectoryError, PermissionError, UnicodeDecodeError) as e:
        raise _err(f"{path}: cannot read the experiment config ({type(e).__name__})") from None
    try:
        data = _yaml_load(text)
    except yaml.YAMLError as e:
        raise _yaml_error(str(path), e) from None
    if data is None:
        raise _err(f"{path}: the experiment config is empty")
    if not isinstance(data, dict):
        raise _err(f"{path}: expected a mapping of sections at the top level, "
                   f"got {type(data).__name__}")
    data = apply_overrides(data, list(overrides))
    try:
        return ExperimentConfig.from_dict(data)
    except ConfigError as e:
        raise _err(f"{path}: {e}") from None


def load_run_experiment(run_dir: str | Path, overrides: Sequence[str] = ()) -> ExperimentConfig:
    """A run directory's own experiment (`experiment.json`) + overrides, for `--resume`.

    Runs written before `optim.pack_small_arrays` existed saved their optimizer state per
    array: their experiment resumes with it off. The setting itself cannot change on resume
    (the saved optimizer state has its layout)."""
    exp_file = Path(run_dir) / "experiment.json"
    if not exp_file.is_file():
        raise _err(f"--resume {run_dir}: no experiment.json (not a run directory)")
    try:
        data = json.loads(exp_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise _err(f"{exp_file}: not readable as JSON ({e})") from None
    if isinstance(data, dict) and isinstance(data.get("optim", {}), dict):
        data.setdefault("optim", {}).setdefault("pack_small_arrays", False)
    try:
        saved = ExperimentConfig.from_dict(data)
    except ConfigError as e:
        raise _err(f"{exp_file}: {e}") from None
    exp = ExperimentConfig.from_dict(apply_overrides(saved.to_dict(), list(overrides))) if overrides else saved
    if exp.optim.pack_small_arrays != saved.optim.pack_small_arrays:
        layout = "packed" if saved.optim.pack_small_arrays else "per array"
        raise _err(f"--resume {run_dir}: optim.pack_small_arrays cannot change on resume "
                   f"(the run's optimizer state is saved {layout})")
    return exp


# ----------------------------------------------------------------------------- model + paths


def resolve_model_config(exp: ExperimentConfig) -> ModelConfig:
    """The run's ModelConfig: fresh (`ModelConfig.from_dict(model.overrides)`) or the
    checkpoint's config with `model.overrides` applied."""
    m = exp.model
    ov = dict(m.overrides)
    if m.init_checkpoint is None:
        config = _model_error(lambda: ModelConfig.from_dict(ov))
    else:
        from mtjax.checkpoint import CheckpointError, load_model_config  # orbax: import lazily

        ckpt = Path(m.init_checkpoint)
        if not ckpt.is_dir():
            raise _err(f"model.init_checkpoint: {ckpt}: checkpoint directory not found "
                       f"(write one with `python -m convert.weights` or use a trained run's model)")
        try:
            base = load_model_config(ckpt)
        except (CheckpointError, ConfigError) as e:
            raise _err(f"model.init_checkpoint: {e}") from None
        if "tasks" in ov:
            lacking = [t for t in ov["tasks"] if t not in base.tasks]
            if lacking:
                raise _err(f"model.overrides.tasks: checkpoint {ckpt} has no head for "
                           f"{', '.join(lacking)}; it has heads for {', '.join(base.tasks)}")
        if "bert" in ov:  # runtime fields only (checked above): merge into the checkpoint's BERT
            ov["bert"] = dataclasses.replace(base.bert, **ov["bert"])
        config = _model_error(lambda: base.replace(**ov))
    check_tasks(exp, config.tasks)
    return config


def check_paths(exp: ExperimentConfig) -> None:
    """The data root and the train/val/test split JSONs exist (one-line error otherwise)."""
    from mtjax.data.reader import split_paths  # numpy/chex: import lazily

    root = Path(exp.data.root)
    if not root.is_dir():
        raise _err(f"data.root: {root}: directory not found")
    for key in ("train_split", "val_split", "test_split"):
        split = getattr(exp.data, key)
        json_path = split_paths(root, split)[0]
        if not json_path.is_file():
            raise _err(f"data.{key} {split!r}: {json_path}: split file not found")


__all__ = [
    "ExperimentConfig", "ModelSection", "DataSection", "OptimSection", "LossSection",
    "StrategySection", "TrainSection", "ConfigError", "load_experiment", "apply_overrides",
    "validate", "check_tasks", "resolve_model_config", "check_paths", "WEIGHTINGS",
    "AGGREGATORS", "SCHEDULES", "SELECT_METRICS",
]
