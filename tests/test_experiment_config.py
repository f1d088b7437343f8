"""Experiment configs: shipped YAMLs, strict typing, overrides, one-line errors."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from mtjax.config import ConfigError, ModelConfig
from mtjax.experiment import (
    AGGREGATORS, MISSING_VIDEO_MODES, WEIGHTINGS, ExperimentConfig, check_paths, load_experiment,
    resolve_model_config,
)

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
SHIPPED = ("hiccap_multitask_original", "hiccap_binary_original", "multitask_adamw", "demo")


def minimal(**sections) -> dict:
    data = {"name": "t", "data": {"root": "nowhere"}}
    data.update(sections)
    return data


def raises(fn, *needles: str) -> str:
    """Runs fn, expects a one-line ConfigError containing every needle; returns the message."""
    with pytest.raises(ConfigError) as info:
        fn()
    msg = str(info.value)
    assert "\n" not in msg, msg
    for n in needles:
        assert n in msg, f"{n!r} not in {msg!r}"
    return msg


def write(tmp_path: Path, text: str, name: str = "exp.yaml") -> Path:
    p = tmp_path / name
    p.write_text(text)
    return p


# ----------------------------------------------------------------------------- shipped configs


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_config_loads(name):
    exp = load_experiment(CONFIGS / f"{name}.yaml")
    assert exp.name == name
    assert exp.tasks_if_known is not None  # every shipped config names its tasks
    text = (CONFIGS / f"{name}.yaml").read_text()
    assert text.startswith("#")  # the header says what it reproduces


def test_shipped_multitask_original_values():
    e = load_experiment(CONFIGS / "hiccap_multitask_original.yaml")
    assert (e.optim.name, e.optim.lr, e.optim.schedule) == ("adam", 1.5e-5, "plateau")
    assert (e.optim.plateau_factor, e.optim.plateau_patience, e.optim.plateau_min_lr) == (0.5, 2, 1e-8)
    assert e.loss.weighting == "predefined"
    assert e.loss.weights == {"mature": 0.1, "gory": 0.4, "slapstick": 0.2, "sarcasm": 0.2}
    assert e.data.positives_only and e.data.batch_size == 16 and e.train.epochs == 50
    assert e.model.overrides["pooling"] == "stable"
    assert e.train.select_metric == "average_f1"


def test_shipped_binary_original_values():
    e = load_experiment(CONFIGS / "hiccap_binary_original.yaml")
    assert (e.optim.name, e.optim.lr) == ("adam", 1.9e-5)
    assert e.model.overrides["tasks"] == ("binary",) and e.model.overrides["variant"] == "binary"
    assert (e.loss.l2, e.loss.l2_coef) == ("reported_constant", 0.1)
    assert e.optim.schedule == "plateau" and e.data.batch_size == 16 and e.train.epochs == 50


def test_shipped_adamw_values():
    o = load_experiment(CONFIGS / "multitask_adamw.yaml").optim
    assert (o.name, o.lr, o.b1, o.b2, o.eps, o.weight_decay, o.clip_norm, o.schedule) == (
        "adamw", 2e-5, 0.9, 0.999, 1e-8, 0.02, 10.0, "plateau")


def test_shipped_demo_values():
    e = load_experiment(CONFIGS / "demo.yaml")
    assert e.model.init_checkpoint == "demo_out/minilm_model" and e.data.root == "demo_out/data"
    assert e.model.overrides["text_len"] == 64
    assert e.model.overrides["tasks"] == ("binary", "mature", "gory", "slapstick", "sarcasm")
    assert (e.optim.name, e.optim.lr, e.data.batch_size, e.train.epochs) == ("adamw", 1e-4, 8, 3)
    assert (e.strategy.schedule, e.loss.weighting) == ("all_at_once", "unweighted")


def test_defaults_and_derived_output_dir():
    e = ExperimentConfig.from_dict(minimal())
    assert e.output_dir == "runs/t" and e.seed == 0 and e.optim.lr == 1.5e-5
    assert e.model.init_checkpoint is None and e.tasks_if_known == ModelConfig().tasks
    assert ExperimentConfig.from_dict(minimal(output_dir="elsewhere")).output_dir == "elsewhere"


def test_name_lists_match_the_code_they_name():
    from mtjax.data.reader import MISSING_VIDEO_MODES as reader_modes

    assert MISSING_VIDEO_MODES == reader_modes
    registry = pytest.importorskip("mtjax.mtl.registry")
    assert set(WEIGHTINGS) == set(registry.WEIGHTINGS)
    assert set(AGGREGATORS) == set(registry.AGGREGATORS)


# ----------------------------------------------------------------------------- overrides


def test_overrides_change_values_with_types():
    e = load_experiment(CONFIGS / "hiccap_multitask_original.yaml", [
        "optim.lr=3e-5", "train.epochs=2", "loss.weights.gory=0.5", "data.root=/tmp/x",
        "optim.clip_norm=1", "train.max_steps_per_epoch=null", "name=2024", "seed=7",
        "model.overrides.pooling=faithful",
    ])
    assert e.optim.lr == 3e-5 and isinstance(e.optim.lr, float)
    assert e.train.epochs == 2 and isinstance(e.train.epochs, int)
    assert e.loss.weights["gory"] == 0.5 and e.loss.weights["mature"] == 0.1
    assert e.optim.clip_norm == 1.0 and isinstance(e.optim.clip_norm, float)  # int accepted for float
    assert e.data.root == "/tmp/x" and e.name == "2024" and e.seed == 7  # str fields keep the text
    assert e.output_dir == "runs/2024"  # derived after overrides
    assert e.model.overrides["pooling"] == "faithful"


def test_override_list_becomes_tuple_and_is_checked_against_weights():
    e = load_experiment(CONFIGS / "demo.yaml", ["model.overrides.tasks=[gory,mature]"])
    assert e.model.overrides["tasks"] == ("gory", "mature")
    # The predefined weights of the original no longer cover the tasks.
    raises(lambda: load_experiment(CONFIGS / "hiccap_multitask_original.yaml",
                                   ["model.overrides.tasks=[gory,mature]"]),
           "loss.weights", "slapstick", "sarcasm")


@pytest.mark.parametrize("override, needles", [
    ("optim.lrr=1", ["optim.lrr", "valid keys under 'optim'", "lr, b1"]),
    ("foo=1", ["'foo'", "top level", "name, seed"]),
    ("model.overrides.nope=1", ["model.overrides.nope", "text_len"]),
    ("optim.lr.x=1", ["optim.lr", "not a section"]),
    ("optim.lr", ["expected dotted.key=value"]),
    ("optim.lr=fast", ["optim.lr", "expected float", "'fast'"]),
    ("train.epochs=[1", ["train.epochs=[1", "not valid YAML"]),
    ("model.overrides.lstm_impl=cudnn", ["model.overrides.lstm_impl", "scan, kernel", "'cudnn'"]),
    ("model.overrides.dropout_impl=philox", ["model.overrides.dropout_impl", "threefry, hash", "'philox'"]),
])
def test_bad_overrides(override, needles):
    raises(lambda: load_experiment(CONFIGS / "demo.yaml", [override]), *needles)


# ----------------------------------------------------------------------------- strict schema


def test_unknown_key_top_level_and_nested():
    raises(lambda: ExperimentConfig.from_dict(minimal(colour="red")),
           "unknown key 'colour'", "name, seed, output_dir, model, data")
    raises(lambda: ExperimentConfig.from_dict(minimal(optim={"learning_rate": 1e-3})),
           "unknown key 'optim.learning_rate'", "valid keys under 'optim'", "lr")
    raises(lambda: ExperimentConfig.from_dict(minimal(model={"overrides": {"bert": {"hiden": 4}}})),
           "model.overrides.bert.hiden", "hidden_size")


@pytest.mark.parametrize("section, value, needles", [
    ("optim", {"lr": "fast"}, ["optim.lr", "expected float", "str 'fast'"]),
    ("data", {"root": "x", "batch_size": 1.5}, ["data.batch_size", "expected int", "1.5"]),
    ("data", {"root": "x", "positives_only": "yes"}, ["data.positives_only", "expected bool"]),
    ("train", {"epochs": True}, ["train.epochs", "expected int", "True"]),
    ("train", {"epochs": None}, ["train.epochs", "expected int", "None"]),
    ("optim", {"clip_norm": "big"}, ["optim.clip_norm", "float or null"]),
    ("loss", {"weights": {"gory": "high"}}, ["loss.weights.gory", "expected float"]),
    ("loss", {"weights": [0.1, 0.4]}, ["loss.weights", "mapping"]),
    ("optim", "adam", ["optim", "expected a mapping"]),
    ("model", {"overrides": {"text_len": "128"}}, ["model.overrides.text_len", "expected int"]),
    ("model", {"overrides": {"tasks": "gory"}}, ["model.overrides.tasks", "list of str"]),
])
def test_wrong_types(section, value, needles):
    raises(lambda: ExperimentConfig.from_dict({**minimal(), section: value}), *needles)


@pytest.mark.parametrize("section, value, needles", [
    ("optim", {"name": "sgd"}, ["optim.name", "adam, adamw", "'sgd'"]),
    ("optim", {"schedule": "cosine"}, ["optim.schedule", "constant, plateau"]),
    ("data", {"root": "x", "missing_video": "drop"}, ["data.missing_video", "zeros, skip"]),
    ("loss", {"weighting": "magic"}, ["loss.weighting", "uncertainty", "famo"]),
    ("loss", {"l2": "yes"}, ["loss.l2", "reported_constant"]),
    ("strategy", {"schedule": "random"}, ["strategy.schedule", "round_robin", "curriculum"]),
    ("strategy", {"aggregator": "avg"}, ["strategy.aggregator", "pcgrad", "graddrop"]),
    ("train", {"select_metric": "loss"}, ["train.select_metric", "average_f1"]),
    ("model", {"overrides": {"pooling": "max"}}, ["model.overrides.pooling", "faithful"]),
])
def test_bad_choices(section, value, needles):
    raises(lambda: ExperimentConfig.from_dict({**minimal(), section: value}), *needles)


@pytest.mark.parametrize("patch, needles", [
    ({"data": {"root": "x", "batch_size": 0}}, ["data.batch_size", "positive"]),
    ({"train": {"epochs": 0}}, ["train.epochs", "positive"]),
    ({"optim": {"lr": -1e-5}}, ["optim.lr", "positive"]),
    ({"optim": {"name": "adam", "weight_decay": 0.01}}, ["optim.weight_decay", "adamw"]),
    ({"optim": {"plateau_factor": 1.5}}, ["optim.plateau_factor"]),
    ({"loss": {"weighting": "predefined"}}, ["loss.weights", "mature, gory, slapstick, sarcasm"]),
    ({"loss": {"weighting": "predefined", "weights": {"gory": 1.0}}},
     ["loss.weights", "lacks mature, slapstick, sarcasm"]),
    ({"loss": {"weighting": "predefined",
               "weights": {"mature": 1, "gory": 1, "slapstick": 1, "sarcasm": 1, "binary": 1}}},
     ["loss.weights", "has binary"]),
    ({"strategy": {"schedule": "round_robin", "aggregator": "pcgrad"}}, ["strategy.aggregator"]),
    ({"strategy": {"aggregate_on": "features"}}, ["strategy.aggregate_on", "strategy.aggregator is not set"]),
    ({"strategy": {"aggregator": "pcgrad", "aggregate_on": "outputs"}}, ["strategy.aggregate_on", "features"]),
    ({"model": {"overrides": {"text_len": 600}}}, ["model.overrides", "text_len=600"]),
    ({"model": {"overrides": {"tasks": []}}}, ["model.overrides", "tasks is empty"]),
    ({"model": {"init_checkpoint": "ck", "overrides": {"bert": {"hidden_size": 4}}}},
     ["model.overrides.bert", "cannot be changed"]),
    ({"data": {}}, ["missing required key 'data.root'"]),
])
def test_cross_field_checks(patch, needles):
    raises(lambda: ExperimentConfig.from_dict({**minimal(), **patch}), *needles)


def test_predefined_weights_from_yaml(tmp_path):
    p = write(tmp_path, "name: x\ndata: {root: r}\nloss:\n  weighting: predefined\n"
                        "  weights: {mature: 1, gory: 2}\n")
    raises(lambda: load_experiment(p), str(p), "loss.weights", "slapstick")


def test_fresh_model_overrides_with_nested_bert():
    e = ExperimentConfig.from_dict(minimal(model={"overrides": {
        "bert": {"hidden_size": 64, "num_attention_heads": 4, "layer_norm_eps": 1},
        "fusion_heads": 4, "tasks": ["binary"], "head_dims": [8, 4, 2]}}))
    mc = resolve_model_config(e)
    assert mc.bert.hidden_size == 64 and mc.bert.layer_norm_eps == 1.0 and mc.tasks == ("binary",)
    assert mc.head_dims == (8, 4, 2) and mc.bert.num_hidden_layers == 12  # rest: bert-base
    assert resolve_model_config(ExperimentConfig.from_dict(minimal())) == ModelConfig()


# ----------------------------------------------------------------------------- files and YAML


def test_missing_config_file(tmp_path):
    p = tmp_path / "nope.yaml"
    raises(lambda: load_experiment(p), str(p), "not found")


def test_yaml_syntax_error_names_the_line(tmp_path):
    p = write(tmp_path, "name: x\ndata:\n  root: r\noptim: {lr: 1e-5\n")
    msg = raises(lambda: load_experiment(p), str(p), "YAML syntax error")
    assert f"{p}:5:" in msg or f"{p}:4:" in msg


def test_yaml_duplicate_key_and_non_mapping(tmp_path):
    p = write(tmp_path, "name: x\ndata: {root: r}\nname: y\n")
    raises(lambda: load_experiment(p), f"{p}:3:", "duplicate key 'name'")
    raises(lambda: load_experiment(write(tmp_path, "- a\n- b\n", "list.yaml")), "mapping")
    raises(lambda: load_experiment(write(tmp_path, "", "empty.yaml")), "empty")


def test_yaml_exponent_floats_without_dot(tmp_path):
    # YAML 1.1 reads `1e-5` as a string; the loader reads it as a float.
    p = write(tmp_path, "name: x\ndata: {root: r}\noptim: {lr: 1e-5, eps: 1E-8}\n")
    o = load_experiment(p).optim
    assert (o.lr, o.eps) == (1e-5, 1e-8)
    p = write(tmp_path, "name: x\ndata: {root: r}\noptim: {lr: '1e-5'}\n", "quoted.yaml")
    raises(lambda: load_experiment(p), "optim.lr", "expected float")  # a quoted string stays one


# ----------------------------------------------------------------------------- round trip


@pytest.mark.parametrize("name", SHIPPED)
def test_round_trip_through_json(name):
    e = load_experiment(CONFIGS / f"{name}.yaml", ["strategy.options={k: [1, 2]}"])
    d = json.loads(json.dumps(e.to_dict()))
    assert ExperimentConfig.from_dict(d) == e
    assert ExperimentConfig.from_json(e.to_json()) == e
    assert d["model"]["overrides"]["tasks"] == list(e.model.overrides["tasks"])


def test_round_trip_through_yaml(tmp_path):
    e = load_experiment(CONFIGS / "hiccap_multitask_original.yaml")
    assert load_experiment(write(tmp_path, e.to_yaml())) == e


def test_replace_revalidates():
    e = ExperimentConfig.from_dict(minimal())
    assert dataclasses.replace(e, seed=3).seed == 3
    raises(lambda: dataclasses.replace(e, optim=dataclasses.replace(e.optim, name="adam", weight_decay=1.0)),
           "optim.weight_decay")


# ----------------------------------------------------------------------------- checkpoints and paths


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    import jax

    from mtjax.checkpoint import save_model
    from mtjax.config import tiny_model_config
    from mtjax.models import init_variables

    config = tiny_model_config()
    path = tmp_path_factory.mktemp("ckpt") / "model"
    save_model(path, init_variables(config, jax.random.PRNGKey(0)), config)
    return path, config


def test_resolve_from_checkpoint(tiny_checkpoint):
    path, config = tiny_checkpoint
    e = ExperimentConfig.from_dict(minimal(model={
        "init_checkpoint": str(path), "overrides": {"tasks": ["gory", "mature"], "text_len": 16}}))
    mc = resolve_model_config(e)
    assert mc == config.replace(tasks=("gory", "mature"), text_len=16)
    plain = ExperimentConfig.from_dict(minimal(model={"init_checkpoint": str(path)}))
    assert resolve_model_config(plain) == config


def test_checkpoint_keeps_its_bert_but_takes_runtime_choices(tiny_checkpoint):
    # The attention kernel, remat and the dropout mask generator choose how BERT runs, not its
    # weights: they may change when loading a checkpoint; its sizes may not.
    path, config = tiny_checkpoint
    e = ExperimentConfig.from_dict(minimal(model={
        "init_checkpoint": str(path),
        "overrides": {"bert": {"attention_impl": "flash", "hidden_dropout_impl": "hash"}}}))
    mc = resolve_model_config(e)
    assert mc.bert == dataclasses.replace(config.bert, attention_impl="flash", hidden_dropout_impl="hash")
    raises(lambda: ExperimentConfig.from_dict(minimal(model={
        "init_checkpoint": str(path), "overrides": {"bert": {"attention_impl": "fast"}}})),
        "model.overrides", "attention_impl")
    raises(lambda: ExperimentConfig.from_dict(minimal(model={
        "init_checkpoint": str(path), "overrides": {"bert": {"attention_impl": "flash", "num_hidden_layers": 1}}})),
        "model.overrides.bert", "cannot be changed", "attention_impl")


def test_checkpoint_without_the_heads(tiny_checkpoint):
    path, config = tiny_checkpoint
    e = ExperimentConfig.from_dict(minimal(model={
        "init_checkpoint": str(path), "overrides": {"tasks": ["binary", "gory"]}}))
    raises(lambda: resolve_model_config(e), "model.overrides.tasks", str(path), "no head for binary",
           "mature, gory, slapstick, sarcasm")


def test_checkpoint_tasks_checked_against_weights(tiny_checkpoint):
    # Tasks come from the checkpoint: the predefined weights are checked at resolve time.
    path, _ = tiny_checkpoint
    e = ExperimentConfig.from_dict(minimal(model={"init_checkpoint": str(path)}, loss={
        "weighting": "predefined", "weights": {"gory": 1.0}}))
    raises(lambda: resolve_model_config(e), "loss.weights", "lacks mature")


@pytest.mark.parametrize("field, value", [("lstm_impl", "kernel"), ("dropout_impl", "hash")])
def test_runtime_fields_may_change_on_a_checkpoint(tiny_checkpoint, field, value):
    # How the LSTMs run and how the fusion's dropout masks are drawn are not fixed by the
    # weights (as BERT's runtime fields are not).
    path, _ = tiny_checkpoint
    e = ExperimentConfig.from_dict(minimal(model={"init_checkpoint": str(path), "overrides": {field: value}}))
    assert getattr(resolve_model_config(e), field) == value


def test_checkpoint_override_invalid_for_its_config(tiny_checkpoint):
    path, _ = tiny_checkpoint  # tiny BERT has 40 positions
    e = ExperimentConfig.from_dict(minimal(model={"init_checkpoint": str(path),
                                                  "overrides": {"text_len": 64}}))
    raises(lambda: resolve_model_config(e), "model.overrides", "max_position_embeddings=40")


def test_missing_checkpoint_dir(tmp_path):
    missing = tmp_path / "no_model"
    e = ExperimentConfig.from_dict(minimal(model={"init_checkpoint": str(missing)}))
    raises(lambda: resolve_model_config(e), "model.init_checkpoint", str(missing), "not found")
    (tmp_path / "not_a_model").mkdir()
    e = ExperimentConfig.from_dict(minimal(model={"init_checkpoint": str(tmp_path / "not_a_model")}))
    raises(lambda: resolve_model_config(e), "model.init_checkpoint", "not a model checkpoint")


def test_check_paths(tmp_path):
    from mtjax.data.reader import split_paths

    missing = tmp_path / "nodata"
    e = ExperimentConfig.from_dict(minimal(data={"root": str(missing)}))
    raises(lambda: check_paths(e), "data.root", str(missing), "not found")

    root = tmp_path / "data"
    e = ExperimentConfig.from_dict(minimal(data={"root": str(root), "test_split": "heldout"}))
    for split in ("train", "val"):
        json_path = split_paths(root, split)[0]
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text("{}")
    raises(lambda: check_paths(e), "data.test_split", "heldout",
           str(split_paths(root, "heldout")[0]))
    split_paths(root, "heldout")[0].write_text("{}")
    check_paths(e)
