"""PyTorch / Hugging Face checkpoints → an orbax model directory.

    python -m convert.weights --source PATH --out DIR [--format auto|hiccap|unified|hf-bert]
        [--variant multitask|binary] [--bert-config CONFIG_JSON] [--tasks t1 t2 ...]

Reads the three formats of SPEC §3 without executing code (`torch.load(weights_only=True)`,
safetensors), renames them to one readable naming, maps that onto the Flax tree through a
table of rules plus a few shape rules (Linear weights transposed, LSTM directions
stacked), fills what the checkpoint lacks from a fresh init, and prints a report.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
import sys
import zipfile
from collections import defaultdict
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np

from mtjax.config import BINARY_TASK, FINE_GRAINED_TASKS, BertConfig, ConfigError, ModelConfig

FORMATS = ("hiccap", "unified", "hf-bert")

# Original format: the fusion lives in a ModuleList (SPEC §3).
ORIGINAL_FEATURES = (
    "bert", "rnn_img", "rnn_img_drop_norm", "rnn_audio", "rnn_audio_drop_norm", "sequential_audio",
    "sequential_image", "att1", "att1_drop_norm1", "att1_drop_norm2", "att2", "att2_drop_norm1",
    "att2_drop_norm2", "att3", "att3_drop_norm1", "att3_drop_norm2", "attention", "attention_drop_norm",
    "attention_audio", "attention_audio_drop_norm", "attention_image", "attention_image_drop_norm",
)
POOLINGS = ("attention", "attention_audio", "attention_image")
# Task-head Sequential indices: Linear 0, BN 1, (Dropout 2), Linear 3, BN 4, (Dropout 5), Linear 6, Linear 7.
HEAD_LINEARS = {"0": "linear0", "3": "linear1", "6": "linear2", "7": "linear3"}
HEAD_NORMS = {"1": "bn0", "4": "bn1"}


class ConversionError(ValueError):
    """A source that cannot be converted; the message says which file/key and why."""


# ---------------------------------------------------------------------------------------------
# Reading sources
# ---------------------------------------------------------------------------------------------

@dataclasses.dataclass
class Source:
    path: Path
    state: dict[str, np.ndarray]          # tensors by key, as stored
    extras: dict[str, Any]                # non-tensor entries (epoch, score, optimizer, ...)
    bert_config: dict[str, Any] | None    # an HF config.json, when the source has one


def _to_numpy(value) -> np.ndarray:
    import torch

    return value.detach().to(torch.float32 if value.is_floating_point() else value.dtype).cpu().numpy()


# Weights-only unpickler refusals that mean "this needs code to load" (a class, a function to
# call). Anything else it refuses (an unknown opcode, a truncated stream) is a damaged or
# foreign file, not a security matter.
_CODE_REFUSALS = ("GLOBAL", "reduce for unrecognized function", "Can only create new object",
                  "Can only build")


def _first_line(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    return lines[0] if lines else type(e).__name__


def _torch_load(path: Path):
    import pickle

    import torch

    with open(path, "rb") as f:
        head = f.read(2)
    if not head:
        raise ConversionError(f"{path}: not a PyTorch checkpoint (empty file)")
    # torch.save writes a zip archive; pre-1.6 files are a bare pickle (protocol opcode 0x80).
    if not zipfile.is_zipfile(path) and head[0] != 0x80:
        raise ConversionError(f"{path}: not a PyTorch checkpoint (neither a zip archive as torch.save "
                              f"writes nor a pickle; first bytes {head!r})")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        message = str(e)
        m = re.search(r"WeightsUnpickler error:\s*([^\n]+)", message)
        detail = m.group(1).strip() if m else _first_line(e)
        if any(marker in message for marker in _CODE_REFUSALS):
            raise ConversionError(
                f"{path}: refused: loading it would execute arbitrary code (it pickles objects other "
                f"than tensors and plain containers). Re-save it as a plain state dict. ({detail[:200]})"
            ) from None
        raise ConversionError(f"{path}: not a PyTorch checkpoint (unreadable pickle: {detail[:200]})") from None
    except (RuntimeError, EOFError, ValueError, zipfile.BadZipFile) as e:
        raise ConversionError(f"{path}: not a PyTorch checkpoint ({_first_line(e)})") from None


def _load_safetensors(path: Path) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    try:
        return dict(load_file(str(path)))
    except Exception as e:  # safetensors raises its own error types
        raise ConversionError(f"{path}: not a valid safetensors file ({e})") from None


def read_source(path: str | Path) -> Source:
    path = Path(path)
    if not path.exists():
        raise ConversionError(f"{path}: no such file or directory")
    if path.is_dir():
        config_file = path / "config.json"
        if not config_file.is_file():
            raise ConversionError(f"{path}: a directory source must be a Hugging Face BERT directory "
                                  f"with config.json (not found)")
        bert_config = json.loads(config_file.read_text())
        if (path / "model.safetensors").is_file():
            state = _load_safetensors(path / "model.safetensors")
        elif (path / "pytorch_model.bin").is_file():
            state = _flatten_loaded(path / "pytorch_model.bin", _torch_load(path / "pytorch_model.bin"))[0]
        else:
            raise ConversionError(f"{path}: has config.json but neither model.safetensors nor pytorch_model.bin")
        return Source(path, state, {}, bert_config)
    if path.suffix == ".safetensors":
        return Source(path, _load_safetensors(path), {}, None)
    state, extras = _flatten_loaded(path, _torch_load(path))
    return Source(path, state, extras, None)


def _flatten_loaded(path: Path, obj) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Tensor entries of a loaded pickle, plus the other top-level entries."""
    import torch

    if not isinstance(obj, Mapping):
        raise ConversionError(f"{path}: not a checkpoint: expected a dict of tensors or a dict with "
                              f"'model_state', found {type(obj).__name__}")
    extras = {}
    if "model_state" in obj:
        extras = {k: v for k, v in obj.items() if k != "model_state"}
        obj = obj["model_state"]
        if not isinstance(obj, Mapping):
            raise ConversionError(f"{path}: 'model_state' is {type(obj).__name__}, expected a state dict")
    state = {}
    for key, value in obj.items():
        if isinstance(value, torch.Tensor):
            state[str(key)] = _to_numpy(value)
        else:
            extras[str(key)] = value
    if not state:
        raise ConversionError(f"{path}: not a checkpoint: it holds no tensors")
    return state, extras


def detect_format(source: Source) -> str:
    keys = list(source.state)
    if source.bert_config is not None:
        return "hf-bert"
    if "model_state" in source.extras or any(k.startswith(("features.", "img_audio_text_linear")) for k in keys):
        return "hiccap"
    if any(k.startswith(("base_model.", "task_heads.")) for k in keys):
        return "unified"
    if any(k.startswith(("embeddings.", "bert.embeddings.", "encoder.layer.")) for k in keys):
        return "hf-bert"
    raise ConversionError(f"{source.path}: cannot tell the checkpoint format from its keys "
                          f"(first keys: {keys[:5]}); expected one of {FORMATS}")


# ---------------------------------------------------------------------------------------------
# Format → readable names (the refactored model's names; heads as `heads.<task>.<i>`)
# ---------------------------------------------------------------------------------------------

@dataclasses.dataclass
class Readable:
    tensors: dict[str, np.ndarray]
    ignored: dict[str, str]  # source key → reason


def readable_from_hiccap(state: Mapping[str, np.ndarray]) -> Readable:
    out, ignored = {}, {}
    for key, value in state.items():
        m = re.fullmatch(r"features\.(\d+)\.(.+)", key)
        if m and int(m.group(1)) < len(ORIGINAL_FEATURES):
            out[f"{ORIGINAL_FEATURES[int(m.group(1))]}.{m.group(2)}"] = value
        elif m := re.fullmatch(r"img_audio_text_linear(?:_(\w+?))?\.(\d+\..+)", key):
            out[f"heads.{m.group(1) or BINARY_TASK}.{m.group(2)}"] = value
        elif key.startswith("sequential."):
            ignored[key] = "unused `sequential` block of the binary checkpoint"
        else:
            out[key] = value  # left for the rules to reject as unknown
    return Readable(out, ignored)


def readable_from_unified(state: Mapping[str, np.ndarray]) -> Readable:
    out, ignored = {}, {}
    for key, value in state.items():
        if key.startswith("base_model."):
            out[key[len("base_model."):]] = value
        elif m := re.fullmatch(r"task_heads\.(\w+)\.text_audio_image_linear\.(\d+\..+)", key):
            out[f"heads.{m.group(1)}.{m.group(2)}"] = value
        elif key == "loss_weights":
            ignored[key] = "learned loss weights (training state, not model weights)"
        else:
            out[key] = value
    return Readable(out, ignored)


def readable_from_hf_bert(state: Mapping[str, np.ndarray]) -> Readable:
    out, ignored = {}, {}
    for key, value in state.items():
        name = key[len("bert."):] if key.startswith("bert.") else key
        if name.startswith(("embeddings.", "encoder.", "pooler.")):
            out[f"bert.{name}"] = value
        elif key.startswith(("cls.", "lm_head.")):
            ignored[key] = "pre-training head, not part of BertModel"
        else:
            out[key] = value
    return Readable(out, ignored)


READERS: dict[str, Callable[[Mapping[str, np.ndarray]], Readable]] = {
    "hiccap": readable_from_hiccap, "unified": readable_from_unified, "hf-bert": readable_from_hf_bert,
}


# ---------------------------------------------------------------------------------------------
# Readable names → Flax variables
# ---------------------------------------------------------------------------------------------

# Leaf renames per kind of PyTorch module: torch leaf → (collection, flax leaf, transform).
_T = np.transpose
DENSE = {"weight": ("params", "kernel", _T), "bias": ("params", "bias", None)}
NORM = {"weight": ("params", "scale", None), "bias": ("params", "bias", None)}
EMBED = {"weight": ("params", "embedding", None)}
BATCHNORM = {**NORM, "running_mean": ("batch_stats", "mean", None), "running_var": ("batch_stats", "var", None)}
BERT_LAYER = r"bert\.encoder\.layer\.(\d+)"

# (module regex over the readable name, Flax module path template, leaf table)
RULES: list[tuple[str, str, dict]] = [
    (r"bert\.embeddings\.(word|position|token_type)_embeddings", "bert/embeddings/{1}_embeddings", EMBED),
    (r"bert\.embeddings\.LayerNorm", "bert/embeddings/LayerNorm", NORM),
    (BERT_LAYER + r"\.attention\.self\.(query|key|value)", "bert/encoder/layer_{1}/attention/self/{2}", DENSE),
    (BERT_LAYER + r"\.attention\.output\.dense", "bert/encoder/layer_{1}/attention/output/dense", DENSE),
    (BERT_LAYER + r"\.attention\.output\.LayerNorm", "bert/encoder/layer_{1}/attention/output/LayerNorm", NORM),
    (BERT_LAYER + r"\.intermediate\.dense", "bert/encoder/layer_{1}/intermediate/dense", DENSE),
    (BERT_LAYER + r"\.output\.dense", "bert/encoder/layer_{1}/output/dense", DENSE),
    (BERT_LAYER + r"\.output\.LayerNorm", "bert/encoder/layer_{1}/output/LayerNorm", NORM),
    (r"(rnn_img|rnn_audio)_drop_norm\.1", "{1}_drop_norm/norm", NORM),
    (r"(sequential_image|sequential_audio)\.0", "{1}/linear", DENSE),
    (r"(sequential_image|sequential_audio)\.1", "{1}/norm", NORM),
    (r"(att[123])\.(query|key|value)", "{1}/attention/{2}", DENSE),
    (r"(att[123])_drop_norm([12])\.1", "{1}/drop_norm{2}/norm", NORM),
    (r"(attention|attention_audio|attention_image)_drop_norm\.1", "{1}_drop_norm/norm", NORM),
    # The pooling's one Linear: its attribute name is not fixed by the SPEC; any name maps.
    (r"(attention|attention_audio|attention_image)\.(\w+)", "{1}/linear", DENSE),
]
IGNORED_PATTERNS = [
    (r"bert\.pooler\..*", "BERT pooler (HICCAP uses the last hidden state only)"),
    (r"bert\.embeddings\.position_ids", "buffer, recomputed"),
    (r".*\.num_batches_tracked", "BatchNorm counter (only used when momentum is None)"),
]
LSTM_LEAF = re.compile(r"(rnn_img|rnn_audio)\.(weight_ih|weight_hh|bias_ih|bias_hh)_l(\d+)(_reverse)?")


def _fill(template: str, m: re.Match) -> str:
    return re.sub(r"\{(\d+)\}", lambda g: m.group(int(g.group(1))), template)


@dataclasses.dataclass
class Mapped:
    variables: dict[tuple[str, ...], np.ndarray]   # (collection, *path) → array
    sources: dict[tuple[str, ...], list[str]]      # flax key → readable keys it came from
    ignored: dict[str, str]
    unknown: list[str]


def map_readable(readable: Readable) -> Mapped:
    variables, sources, ignored, unknown = {}, defaultdict(list), dict(readable.ignored), []
    lstm_parts: dict[tuple, dict[int, np.ndarray]] = defaultdict(dict)
    for key, value in readable.tensors.items():
        if any(re.fullmatch(p, key) for p, _ in IGNORED_PATTERNS):
            ignored[key] = next(reason for p, reason in IGNORED_PATTERNS if re.fullmatch(p, key))
            continue
        if m := LSTM_LEAF.fullmatch(key):
            module, leaf, layer, reverse = m.groups()
            target = ("params", module, f"layer_{layer}", leaf)
            # PyTorch (4H, in) → ours (in, 4H); the two directions stack on a leading axis.
            lstm_parts[target][1 if reverse else 0] = value.T if value.ndim == 2 else value
            sources[target].append(key)
            continue
        if m := re.fullmatch(r"heads\.(\w+)\.(\d+)\.(\w+)", key):
            task, index, leaf = m.groups()
            if index in HEAD_LINEARS and leaf in DENSE:
                collection, flax_leaf, fn = DENSE[leaf]
                target = (collection, f"heads_{task}", HEAD_LINEARS[index], flax_leaf)
            elif index in HEAD_NORMS and leaf in BATCHNORM:
                collection, flax_leaf, fn = BATCHNORM[leaf]
                target = (collection, f"heads_{task}", HEAD_NORMS[index], flax_leaf)
            else:
                unknown.append(key)
                continue
            variables[target] = fn(value) if fn else value
            sources[target].append(key)
            continue
        if m := re.fullmatch(r"(attention|attention_audio|attention_image)\.v", key):
            target = ("params", m.group(1), "v")
            variables[target] = value
            sources[target].append(key)
            continue
        module, _, leaf = key.rpartition(".")
        for pattern, template, leaves in RULES:
            if (m := re.fullmatch(pattern, module)) and leaf in leaves:
                collection, flax_leaf, fn = leaves[leaf]
                target = (collection, *_fill(template, m).split("/"), flax_leaf)
                if target in variables:
                    raise ConversionError(f"two source keys map to {'/'.join(target)}: "
                                          f"{sources[target][0]} and {key}")
                variables[target] = fn(value) if fn else value
                sources[target].append(key)
                break
        else:
            unknown.append(key)
    for target, parts in lstm_parts.items():
        if set(parts) != {0, 1}:
            missing = "forward" if 0 not in parts else "backward (_reverse)"
            raise ConversionError(f"LSTM weights {sources[target]} lack the {missing} direction")
        variables[target] = np.stack([parts[0], parts[1]])
    return Mapped(variables, dict(sources), ignored, unknown)


# ---------------------------------------------------------------------------------------------
# Model config from the weights
# ---------------------------------------------------------------------------------------------

def infer_model_config(mapped: Mapped, *, fmt: str, variant: str | None, tasks: list[str] | None,
                       bert_config: Mapping[str, Any] | None, base: ModelConfig | None = None) -> ModelConfig:
    v = mapped.variables
    base = base or ModelConfig()

    def shape(*path):
        arr = v.get(("params", *path))
        return None if arr is None else arr.shape

    word = shape("bert", "embeddings", "word_embeddings", "embedding")
    if word is None:
        raise ConversionError("the source has no BERT word embeddings: HICCAP cannot be built without BERT")
    hidden = word[1]
    layers = sorted({int(k[3][len("layer_"):]) for k in v if k[1:3] == ("bert", "encoder")})
    bert_fields = dict(bert_config or {})
    heads = bert_fields.get("num_attention_heads")
    if heads is None:
        if hidden % 12:
            raise ConversionError(f"BERT hidden size {hidden} is not divisible by 12: give the head count "
                                  f"with --bert-config (an HF config.json)")
        heads = 12  # bert-base's; head count cannot be read from the weights
    bert = BertConfig(
        vocab_size=word[0],
        hidden_size=hidden,
        num_hidden_layers=len(layers),
        num_attention_heads=heads,
        intermediate_size=shape("bert", "encoder", "layer_0", "intermediate", "dense", "kernel")[1],
        max_position_embeddings=shape("bert", "embeddings", "position_embeddings", "embedding")[0],
        type_vocab_size=shape("bert", "embeddings", "token_type_embeddings", "embedding")[0],
        layer_norm_eps=bert_fields.get("layer_norm_eps", 1e-12),
        hidden_dropout_prob=bert_fields.get("hidden_dropout_prob", 0.1),
        attention_probs_dropout_prob=bert_fields.get("attention_probs_dropout_prob", 0.1),
        pad_token_id=bert_fields.get("pad_token_id", 0),
    )
    if bert_fields.get("hidden_act", "gelu") != "gelu":
        raise ConversionError(f"BERT hidden_act {bert_fields['hidden_act']!r} is not supported (exact 'gelu' only)")

    changes: dict[str, Any] = {"bert": bert, "text_len": min(base.text_len, bert.max_position_embeddings)}
    lstm = shape("rnn_img", "layer_0", "weight_hh")
    if lstm is not None:
        changes["lstm_hidden"] = lstm[1]
        changes["lstm_layers"] = len({k[2] for k in v if k[1] == "rnn_img"})
        changes["video_dim"] = shape("rnn_img", "layer_0", "weight_ih")[1]
    if (audio := shape("rnn_audio", "layer_0", "weight_ih")) is not None:
        changes["audio_dim"] = audio[1]

    found_tasks = sorted({k[1][len("heads_"):] for k in v if k[1].startswith("heads_")})
    if tasks:
        chosen = list(tasks)
    elif found_tasks:
        # Keep the original's task order where the names are the original's.
        order = [BINARY_TASK, *FINE_GRAINED_TASKS]
        chosen = sorted(found_tasks, key=lambda t: (order.index(t) if t in order else len(order), t))
    else:
        chosen = [BINARY_TASK] if variant == "binary" else list(FINE_GRAINED_TASKS)
    changes["tasks"] = tuple(chosen)
    if found_tasks:
        t0 = found_tasks[0]
        changes["head_dims"] = tuple(shape(f"heads_{t0}", f"linear{i}", "kernel")[1] for i in range(3))

    if variant is None:
        # The refactored UnifiedModel always uses the binary order for att3 and projects once.
        if fmt == "unified":
            variant = "binary"
        elif fmt == "hiccap" and found_tasks == [BINARY_TASK]:
            variant = "binary"
        else:
            variant = "multitask"
    changes["variant"] = variant
    changes["project_per_branch"] = fmt != "unified"
    return dataclasses.replace(base, **changes)


# ---------------------------------------------------------------------------------------------
# Conversion
# ---------------------------------------------------------------------------------------------

@dataclasses.dataclass
class Report:
    source: str
    format: str
    converted: dict[str, list[str]]   # flax module → source keys
    ignored: dict[str, str]
    fresh: list[str]                  # flax modules initialised from scratch
    config: ModelConfig

    def lines(self) -> list[str]:
        out = [f"source: {self.source}", f"format: {self.format}",
               f"model: variant={self.config.variant} tasks={list(self.config.tasks)} "
               f"d={self.config.hidden_size} bert_layers={self.config.bert.num_hidden_layers} "
               f"bert_heads={self.config.bert.num_attention_heads}",
               f"converted ({len(self.converted)} modules):"]
        out += [f"  {m}  <- {_summarise(keys)}" for m, keys in sorted(self.converted.items())]
        out.append(f"ignored ({len(self.ignored)} entries):")
        out += [f"  {k}: {reason}" for k, reason in sorted(self.ignored.items())]
        out.append(f"freshly initialised ({len(self.fresh)} modules):")
        out += [f"  {m}" for m in self.fresh]
        return out


def _summarise(keys: list[str]) -> str:
    prefixes = sorted({k.rsplit(".", 1)[0] for k in keys})
    return ", ".join(prefixes) if len(prefixes) <= 2 else f"{prefixes[0]} … ({len(keys)} tensors)"


def _module_of(key: tuple[str, ...]) -> str:
    return "/".join(key[1:-1])


def convert(source_path: str | Path, *, fmt: str = "auto", variant: str | None = None,
            tasks: list[str] | None = None, bert_config_path: str | Path | None = None,
            strict: bool = True, seed: int = 0, base: ModelConfig | None = None):
    """→ (ModelConfig, variables {'params', 'batch_stats'}, Report)."""
    bert_config = None
    if bert_config_path is not None:
        try:
            bert_config = json.loads(Path(bert_config_path).read_text())
        except FileNotFoundError:
            raise ConversionError(f"{bert_config_path}: --bert-config file not found") from None
        except json.JSONDecodeError as e:
            raise ConversionError(f"{bert_config_path}: --bert-config is not valid JSON ({e})") from None
        if not isinstance(bert_config, dict):
            raise ConversionError(f"{bert_config_path}: --bert-config must hold a JSON object "
                                  f"(an HF config.json), found {type(bert_config).__name__}")
    return convert_source(read_source(source_path), fmt=fmt, variant=variant, tasks=tasks,
                          bert_config=bert_config, strict=strict, seed=seed, base=base)


def state_source(state: Mapping[str, Any], name: str = "<in memory>") -> Source:
    """A Source from an in-memory state dict (tensors or arrays), e.g. a live PyTorch model's."""
    arrays = {k: (_to_numpy(v) if hasattr(v, "detach") else np.asarray(v)) for k, v in state.items()}
    return Source(Path(name), arrays, {}, None)


def convert_source(source: Source, *, fmt: str = "auto", variant: str | None = None,
                   tasks: list[str] | None = None, bert_config: Mapping[str, Any] | None = None,
                   strict: bool = True, seed: int = 0, base: ModelConfig | None = None):
    import jax
    from flax import traverse_util

    from mtjax.models.hiccap import init_variables

    detected = detect_format(source)
    if fmt == "auto":
        fmt = detected
    elif fmt not in FORMATS:
        raise ConversionError(f"--format must be auto or one of {FORMATS}, got {fmt!r}")
    elif fmt != detected:
        raise ConversionError(f"{source.path}: --format {fmt} was given but the file looks like the "
                              f"'{detected}' format (its keys: {list(source.state)[:3]} …)")
    if bert_config is None:
        bert_config = source.bert_config
    readable = READERS[fmt](source.state)
    mapped = map_readable(readable)
    if mapped.unknown:
        if strict:
            raise ConversionError(f"{source.path}: {len(mapped.unknown)} keys match no HICCAP module "
                                  f"(strict mode): {mapped.unknown[:8]}")
        for key in mapped.unknown:
            mapped.ignored[key] = "unknown key (not strict)"
    for key in list(mapped.variables):
        if key[1].startswith("heads_") and tasks and key[1][len("heads_"):] not in tasks:
            mapped.ignored[".".join(mapped.sources[key])] = "head of a task not asked for (--tasks)"
            del mapped.variables[key]
    for extra in sorted(source.extras):
        mapped.ignored[extra] = "training state, not model weights" if extra in (
            "optimizer", "epoch", "score") else "non-tensor entry"

    config = infer_model_config(mapped, fmt=fmt, variant=variant, tasks=tasks, bert_config=bert_config, base=base)
    rng = jax.random.PRNGKey(seed)
    # Shapes first, by tracing only: checking a checkpoint against the model needs no compiled
    # init (seconds even for the tiny model), and a checkpoint that supplies every variable
    # needs no fresh values at all.
    expected = traverse_util.flatten_dict(jax.eval_shape(lambda k: init_variables(config, k), rng))
    extraneous = sorted("/".join(k) for k in mapped.variables if k not in expected)
    if extraneous:
        raise ConversionError(f"{source.path}: weights with no place in the model {extraneous[:6]}")
    for key, value in mapped.variables.items():
        if value.shape != expected[key].shape:
            raise ConversionError(
                f"{source.path}: shape mismatch for {'/'.join(key)} (from {mapped.sources[key]}): "
                f"checkpoint {value.shape}, model expects {expected[key].shape}")
    flat = {}
    if any(k not in mapped.variables for k in expected):
        fresh_vars = init_variables(config, rng)
        flat = {k: np.asarray(x) for k, x in traverse_util.flatten_dict(jax.device_get(fresh_vars)).items()}
    for key, value in mapped.variables.items():
        flat[key] = value.astype(expected[key].dtype)
    converted = defaultdict(list)
    for key, srcs in mapped.sources.items():
        if key in mapped.variables:
            converted[_module_of(key)].extend(srcs)
    fresh = sorted({_module_of(k) for k in flat if k not in mapped.variables} - set(converted))
    variables = traverse_util.unflatten_dict(flat)
    variables.setdefault("batch_stats", {})
    report = Report(str(source.path), fmt, dict(converted), mapped.ignored, fresh, config)
    return config, variables, report


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m convert.weights", description=__doc__.split("\n\n")[0])
    p.add_argument("--source", required=True, help="a .pth/.pt/.bin/.safetensors file or an HF BERT directory")
    p.add_argument("--out", required=True, help="orbax model directory to write")
    p.add_argument("--format", default="auto", choices=("auto", *FORMATS))
    p.add_argument("--variant", choices=("multitask", "binary"),
                   help="att3 context order (default: from the format and heads)")
    p.add_argument("--bert-config", help="HF config.json giving BERT's head count and eps")
    p.add_argument("--tasks", nargs="+", help="task heads to build (default: those in the checkpoint)")
    p.add_argument("--pooling", choices=("stable", "faithful"), default="stable")
    # What the weights cannot tell: the fusion's head count and the padding lengths.
    defaults = ModelConfig()
    p.add_argument("--fusion-heads", type=int, default=defaults.fusion_heads,
                   help=f"heads of the fusion cross-attention (default {defaults.fusion_heads}, the original's)")
    p.add_argument("--text-len", type=int, default=defaults.text_len)
    p.add_argument("--video-len", type=int, default=defaults.video_len)
    p.add_argument("--audio-len", type=int, default=defaults.audio_len)
    p.add_argument("--no-strict", dest="strict", action="store_false",
                   help="report unknown keys as ignored instead of stopping")
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--seed", type=int, default=0, help="seed for freshly initialised modules")
    args = p.parse_args(argv)

    from mtjax.checkpoint import CheckpointError, save_model

    try:
        config, variables, report = convert(
            args.source, fmt=args.format, variant=args.variant, tasks=args.tasks,
            bert_config_path=args.bert_config, strict=args.strict, seed=args.seed,
            base=ModelConfig(pooling=args.pooling, fusion_heads=args.fusion_heads, text_len=args.text_len,
                             video_len=args.video_len, audio_len=args.audio_len))
        out = save_model(args.out, variables, config, overwrite=args.overwrite,
                         metadata={"converted_from": report.source, "format": report.format})
    except (ConversionError, CheckpointError, ConfigError, OSError) as e:
        print(f"convert.weights: error: {e}", file=sys.stderr)
        return 2
    print("\n".join(report.lines()))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
