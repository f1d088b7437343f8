"""The converter CLI (`python -m convert.weights`): its report, the model config it writes,
and every rejection, each with the message a user would see.

Sources are written by the PyTorch reference (`convert/reference.py`) at the tiny config's
sizes. The BERT head count cannot be read from weights, so it comes with `--bert-config`.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from convert import weights as cw
from convert.reference import (build_reference, hf_bert_dir, save_original_checkpoint,
                               save_unified_checkpoint, unified_state_dict)
from mtjax.checkpoint import load_model
from mtjax.config import FINE_GRAINED_TASKS, tiny_model_config

REPO = Path(__file__).resolve().parents[1]
HEAD_MODULES = ("linear0", "bn0", "linear1", "bn1", "linear2", "linear3")


# ----------------------------------------------------------------------------- sources


@pytest.fixture(scope="module")
def src(tmp_path_factory):
    """Every source file once per module (the reference builds in milliseconds)."""
    d = tmp_path_factory.mktemp("sources")
    tiny = tiny_model_config()
    bert_json = d / "bert_config.json"
    bert_json.write_text(json.dumps(tiny.bert.to_hf_dict()))

    binary = build_reference(tiny_model_config(tasks=("binary",), variant="binary"), seed=0)
    multi = build_reference(tiny, seed=1)
    unified = build_reference(tiny_model_config(variant="binary", project_per_branch=False), seed=2)
    paths = {
        "bert_json": bert_json,
        "binary": save_original_checkpoint(binary, d / "binary.pth", include_unused_sequential=True),
        "multi": save_original_checkpoint(multi, d / "multi.pth"),
        "pretrain": save_original_checkpoint(multi, d / "pretrain.pth", heads=False),
        "unified": save_unified_checkpoint(unified, d / "unified.pth"),
        "hf": hf_bert_dir(multi, d / "hf_bert"),
    }
    return d, paths, {"binary": binary, "multi": multi, "unified": unified}


def run_cli(capsys, *args) -> tuple[int, str, str]:
    code = cw.main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def report_sections(stdout: str) -> dict[str, list[str]]:
    """'converted'/'ignored'/'freshly initialised' → their indented lines, stripped."""
    sections, current = {}, None
    for line in stdout.splitlines():
        if m := re.fullmatch(r"(converted|ignored|freshly initialised) \((\d+) \w+\):", line):
            current = m.group(1)
            sections[current] = []
            count = int(m.group(2))
            sections[f"{current}#"] = count
        elif line.startswith("  ") and current:
            sections[current].append(line.strip())
        else:
            current = None
    for name in ("converted", "ignored", "freshly initialised"):
        assert len(sections[name]) == sections.pop(f"{name}#"), f"{name}: count line disagrees"
    return sections


def ignored_keys(sections) -> dict[str, str]:
    return dict(line.split(": ", 1) for line in sections["ignored"])


# ----------------------------------------------------------------------------- reports


def test_original_binary_checkpoint(src, tmp_path, capsys):
    d, paths, refs = src
    out = tmp_path / "binary_model"
    code, stdout, err = run_cli(capsys, "--source", paths["binary"], "--out", out,
                                "--bert-config", paths["bert_json"])
    assert code == 0, err
    assert "format: hiccap" in stdout and "variant=binary tasks=['binary']" in stdout
    sec = report_sections(stdout)
    ignored = ignored_keys(sec)
    sequential = [k for k in ignored if k.startswith("sequential.")]
    # Linear 512→100, BN 100, Linear 100→40, BN 40, Linear 40→20 = 3·2 + 2·5 tensors
    assert len(sequential) == 16
    assert all("unused `sequential` block" in ignored[k] for k in sequential)
    for extra in ("optimizer", "epoch", "score"):
        assert ignored[extra] == "training state, not model weights"
    assert sec["freshly initialised"] == []
    assert f"wrote {out.absolute()}" in stdout

    config, variables, meta = load_model(out)  # no flags: everything from the saved config
    assert config.variant == "binary" and config.tasks == ("binary",)
    assert config.project_per_branch  # the original re-projects per branch
    # Not in the weights: the converter assumes the original's 12 fusion heads (SPEC §2.4).
    assert config.fusion_heads == 12
    tiny = tiny_model_config()
    assert config.bert == tiny.bert
    assert (config.hidden_size, config.lstm_hidden, config.lstm_layers, config.video_dim,
            config.audio_dim, config.head_dims) == (48, 16, 2, 20, 12, (20, 8, 6))
    assert meta == {"converted_from": str(paths["binary"]), "format": "hiccap"}
    # A value, not only a shape: the head's first Linear, transposed.
    expected = refs["binary"].heads["binary"][0].weight.detach().numpy().T
    np.testing.assert_array_equal(np.asarray(variables["params"]["heads_binary"]["linear0"]["kernel"]),
                                  expected)


def test_original_multitask_checkpoint_infers_multitask(src, tmp_path, capsys):
    _, paths, refs = src
    out = tmp_path / "multi_model"
    code, stdout, err = run_cli(capsys, "--source", paths["multi"], "--out", out,
                                "--bert-config", paths["bert_json"])
    assert code == 0, err
    config, variables, _ = load_model(out)
    assert config.variant == "multitask" and config.tasks == FINE_GRAINED_TASKS
    assert config.project_per_branch
    np.testing.assert_array_equal(
        np.asarray(variables["batch_stats"]["heads_gory"]["bn1"]["var"]),
        refs["multi"].heads["gory"][4].running_var.numpy())


def test_pretraining_checkpoint_without_heads(src, tmp_path, capsys):
    _, paths, _ = src
    out = tmp_path / "pretrain_model"
    code, stdout, err = run_cli(capsys, "--source", paths["pretrain"], "--out", out,
                                "--bert-config", paths["bert_json"])
    assert code == 0, err
    sec = report_sections(stdout)
    expected_fresh = sorted(f"heads_{t}/{m}" for t in FINE_GRAINED_TASKS for m in HEAD_MODULES)
    assert sorted(sec["freshly initialised"]) == expected_fresh  # the heads, and nothing else
    assert not any(line.startswith("heads_") for line in sec["converted"])
    config, _, _ = load_model(out)
    assert config.tasks == FINE_GRAINED_TASKS and config.variant == "multitask"


def test_hf_bert_directory(src, tmp_path, capsys):
    _, paths, _ = src
    out = tmp_path / "hf_model"
    # No --bert-config: the directory's config.json gives the head count.
    code, stdout, err = run_cli(capsys, "--source", paths["hf"], "--out", out)
    assert code == 0, err
    assert "format: hf-bert" in stdout and "bert_heads=4" in stdout
    sec = report_sections(stdout)
    ignored = ignored_keys(sec)
    assert {"bert.pooler.dense.weight", "bert.pooler.dense.bias"} <= set(ignored)
    assert all("BERT pooler" in ignored[k] for k in ("bert.pooler.dense.weight", "bert.pooler.dense.bias"))
    assert all(line.startswith("bert/") for line in sec["converted"])
    fresh = set(sec["freshly initialised"])
    for module in ("rnn_img/layer_0", "rnn_audio/layer_1", "sequential_image/linear", "att1/attention/query",
                   "att3/drop_norm2/norm", "attention", "attention_image/linear", "attention_drop_norm/norm",
                   *(f"heads_{t}/{m}" for t in FINE_GRAINED_TASKS for m in HEAD_MODULES)):
        assert module in fresh, module
    assert not any(m.startswith("bert/") for m in fresh)
    config, _, _ = load_model(out)
    assert config.bert == tiny_model_config().bert


def test_unified_checkpoint(src, tmp_path, capsys):
    _, paths, _ = src
    out = tmp_path / "unified_model"
    code, stdout, err = run_cli(capsys, "--source", paths["unified"], "--out", out,
                                "--bert-config", paths["bert_json"])
    assert code == 0, err
    ignored = ignored_keys(report_sections(stdout))
    assert "learned loss weights" in ignored["loss_weights"]
    config, _, _ = load_model(out)
    assert config.variant == "binary" and config.project_per_branch is False
    assert config.tasks == FINE_GRAINED_TASKS


def test_tasks_flag_drops_other_heads(src, tmp_path, capsys):
    _, paths, _ = src
    code, stdout, err = run_cli(capsys, "--source", paths["multi"], "--out", tmp_path / "m",
                                "--bert-config", paths["bert_json"], "--tasks", "gory", "sarcasm")
    assert code == 0, err
    ignored = ignored_keys(report_sections(stdout))
    assert any("heads.mature.0.weight" in k and v == "head of a task not asked for (--tasks)"
               for k, v in ignored.items())
    assert load_model(tmp_path / "m")[0].tasks == ("gory", "sarcasm")


def test_cli_in_a_real_subprocess(src, tmp_path):
    _, paths, _ = src
    out = tmp_path / "sub_model"
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    run = lambda *args: subprocess.run([sys.executable, "-m", "convert.weights", *map(str, args)],
                                       cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    ok = run("--source", paths["unified"], "--out", out, "--bert-config", paths["bert_json"])
    assert ok.returncode == 0, ok.stderr
    assert "format: unified" in ok.stdout and f"wrote {out}" in ok.stdout
    assert load_model(out)[0].variant == "binary"
    # Errors exit with 2 and one line on stderr, no traceback.
    bad = run("--source", tmp_path / "absent.pth", "--out", tmp_path / "x")
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    assert bad.stderr.strip() == f"convert.weights: error: {tmp_path / 'absent.pth'}: no such file or directory"


def test_existing_output_needs_overwrite(src, tmp_path, capsys):
    _, paths, _ = src
    out = tmp_path / "model"
    args = ("--source", paths["unified"], "--out", out, "--bert-config", paths["bert_json"])
    assert run_cli(capsys, *args)[0] == 0
    err = expect_error(capsys, *args)
    assert f"{out} already exists (pass overwrite to replace it)" in err
    code, stdout, err = run_cli(capsys, *args, "--overwrite")
    assert code == 0, err
    assert load_model(out)[0].variant == "binary"


# ----------------------------------------------------------------------------- rejections


def expect_error(capsys, *args) -> str:
    code, stdout, err = run_cli(capsys, *args)
    assert code == 2, (stdout, err)
    assert err.startswith("convert.weights: error: ")
    assert "wrote" not in stdout
    return err


def _splice(state: dict, donor: dict, prefix: str) -> dict:
    out = {k: v for k, v in state.items() if not k.startswith(prefix)}
    out.update({k: v for k, v in donor.items() if k.startswith(prefix)})
    return out


def test_shape_mismatch_head_width(tmp_path, capsys):
    """One head 30 wide, the others 20: the model is built from one head's sizes, so the
    narrower head cannot fit."""
    tasks = ("mature", "gory")
    narrow = build_reference(tiny_model_config(tasks=tasks, variant="binary", project_per_branch=False), 0)
    wide = build_reference(tiny_model_config(tasks=tasks, head_dims=(30, 8, 6), variant="binary",
                                             project_per_branch=False), 0)
    state = _splice(unified_state_dict(narrow), unified_state_dict(wide), "task_heads.gory.")
    path = tmp_path / "mixed_heads.pth"
    torch.save(state, path)
    bert = tmp_path / "bert.json"
    bert.write_text(json.dumps(tiny_model_config().bert.to_hf_dict()))
    err = expect_error(capsys, "--source", path, "--out", tmp_path / "out", "--bert-config", bert)
    assert f"{path}: shape mismatch for params/heads_mature/linear0/kernel" in err
    assert "heads.mature.0.weight" in err
    assert "checkpoint (144, 20), model expects (144, 30)" in err
    assert not (tmp_path / "out").exists()


def test_shape_mismatch_lstm_sizes(tmp_path, capsys):
    """Audio LSTM with hidden 10 beside a video LSTM with hidden 16 (sizes come from rnn_img)."""
    a = build_reference(tiny_model_config(), 0)
    b = build_reference(tiny_model_config(lstm_hidden=10), 0)
    state = _splice(unified_state_dict(a), unified_state_dict(b), "base_model.rnn_audio.")
    path = tmp_path / "mixed_lstm.pth"
    torch.save(state, path)
    err = expect_error(capsys, "--source", path, "--out", tmp_path / "out")
    assert re.search(r"shape mismatch for params/rnn_audio/layer_\d/(weight|bias)_(ih|hh)", err)
    assert re.search(r"checkpoint \(2, \d+, 40\), model expects \(2, \d+, 64\)|"
                     r"checkpoint \(2, 40\), model expects \(2, 64\)", err)


def test_unknown_keys_strict_and_not_strict(src, tmp_path, capsys):
    _, paths, refs = src
    state = unified_state_dict(refs["unified"])
    state["base_model.mystery_block.weight"] = torch.zeros(3)
    path = tmp_path / "extra.pth"
    torch.save(state, path)
    err = expect_error(capsys, "--source", path, "--out", tmp_path / "strict", "--bert-config", paths["bert_json"])
    assert "1 keys match no HICCAP module (strict mode): ['mystery_block.weight']" in err

    code, stdout, err = run_cli(capsys, "--source", path, "--out", tmp_path / "lax", "--no-strict",
                                "--bert-config", paths["bert_json"])
    assert code == 0, err
    assert ignored_keys(report_sections(stdout))["mystery_block.weight"] == "unknown key (not strict)"


def test_wrong_format_flag(src, tmp_path, capsys):
    _, paths, _ = src
    err = expect_error(capsys, "--source", paths["unified"], "--out", tmp_path / "a", "--format", "hiccap")
    assert "--format hiccap was given but the file looks like the 'unified' format" in err
    err = expect_error(capsys, "--source", paths["binary"], "--out", tmp_path / "b", "--format", "unified")
    assert "--format unified was given but the file looks like the 'hiccap' format" in err
    err = expect_error(capsys, "--source", paths["hf"], "--out", tmp_path / "c", "--format", "hiccap")
    assert "looks like the 'hf-bert' format" in err


@pytest.mark.parametrize("name, content, message", [
    ("random.pth", np.random.default_rng(0).bytes(4096),
     "not a PyTorch checkpoint (neither a zip archive as torch.save writes nor a pickle"),
    ("config.json", json.dumps({"hidden_size": 48}).encode(),
     "not a PyTorch checkpoint (neither a zip archive as torch.save writes nor a pickle"),
    ("empty.pth", b"", "not a PyTorch checkpoint (empty file)"),
    ("empty.safetensors", b"", "not a valid safetensors file"),
])
def test_not_a_checkpoint(tmp_path, capsys, name, content, message):
    path = tmp_path / name
    path.write_bytes(content)
    err = expect_error(capsys, "--source", path, "--out", tmp_path / "out")
    assert f"{path}: {message}" in err
    assert "arbitrary code" not in err


def test_zip_that_is_not_a_torch_file(tmp_path, capsys):
    path = tmp_path / "archive.pth"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("notes.txt", "hello")
    err = expect_error(capsys, "--source", path, "--out", tmp_path / "out")
    assert f"{path}: not a PyTorch checkpoint" in err


def test_pickle_without_tensors_or_not_a_dict(tmp_path, capsys):
    torch.save({"epoch": 3, "score": 0.5}, tmp_path / "no_tensors.pth")
    err = expect_error(capsys, "--source", tmp_path / "no_tensors.pth", "--out", tmp_path / "o1")
    assert "not a checkpoint: it holds no tensors" in err
    torch.save([torch.zeros(2)], tmp_path / "list.pth")
    err = expect_error(capsys, "--source", tmp_path / "list.pth", "--out", tmp_path / "o2")
    assert "expected a dict of tensors or a dict with 'model_state', found list" in err


class Payload:
    """A custom class: unpickling it needs this module's code."""

    def __init__(self):
        self.value = 1


def _leave_marker(path):
    Path(path).write_text("code ran")
    return {}


class Trap:
    """Unpickling runs `_leave_marker`: the file must never appear."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (_leave_marker, (str(self.marker),))


@pytest.mark.parametrize("kind", ["class_instance", "reduce_call"])
def test_pickle_that_needs_code_is_refused(tmp_path, capsys, kind):
    marker = tmp_path / "marker.txt"
    obj = Payload() if kind == "class_instance" else Trap(marker)
    path = tmp_path / f"{kind}.pth"
    torch.save({"model_state": {"features.0.embeddings.word_embeddings.weight": torch.zeros(4, 2)},
                "extra": obj}, path)
    err = expect_error(capsys, "--source", path, "--out", tmp_path / "out")
    assert f"{path}: refused: loading it would execute arbitrary code" in err
    assert ("Payload" if kind == "class_instance" else "_leave_marker") in err
    assert not marker.exists()


def test_missing_source_and_bad_bert_config(src, tmp_path, capsys):
    _, paths, _ = src
    missing = tmp_path / "nowhere" / "model.pth"
    err = expect_error(capsys, "--source", missing, "--out", tmp_path / "out")
    assert f"{missing}: no such file or directory" in err

    bad = tmp_path / "bert_config.json"
    bad.write_text("{not json")
    err = expect_error(capsys, "--source", paths["unified"], "--out", tmp_path / "out", "--bert-config", bad)
    assert f"{bad}: --bert-config is not valid JSON" in err
    err = expect_error(capsys, "--source", paths["unified"], "--out", tmp_path / "out",
                       "--bert-config", tmp_path / "absent.json")
    assert f"{tmp_path / 'absent.json'}: --bert-config file not found" in err


def test_directory_that_is_not_an_hf_bert_dir(tmp_path, capsys):
    (tmp_path / "empty_dir").mkdir()
    err = expect_error(capsys, "--source", tmp_path / "empty_dir", "--out", tmp_path / "out")
    assert "a directory source must be a Hugging Face BERT directory with config.json" in err
