"""Model configuration: plain frozen dataclasses that round-trip through JSON.

The model config travels inside every checkpoint so a converted or trained model
restores without flags.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, Mapping

# The original's label fields, in the order the multi-task scripts use them.
FINE_GRAINED_TASKS = ("mature", "gory", "slapstick", "sarcasm")
BINARY_TASK = "binary"
VARIANTS = ("multitask", "binary")
POOLING_MODES = ("faithful", "stable")
ATTENTION_IMPLS = ("xla", "cudnn", "flash")
DROPOUT_IMPLS = ("threefry", "hash")
ADD_NORM_IMPLS = ("xla", "fused")
LSTM_IMPLS = ("scan", "kernel")
# BertConfig fields that choose how BERT runs, not its weights (kept out of HF configs;
# may change when loading a checkpoint).
BERT_RUNTIME_FIELDS = ("attention_impl", "remat_attention_probs", "hidden_dropout_impl", "add_norm_impl")


class ConfigError(ValueError):
    """A configuration that cannot describe a valid model or run."""


def reject_unknown_keys(cls, data: Mapping[str, Any], what: str) -> None:
    """A dataclass-backed config section must not carry keys its class does not define."""
    unknown = sorted(set(data) - {f.name for f in dataclasses.fields(cls)})
    if unknown:
        raise ConfigError(f"unknown {what} keys: {unknown}")


@dataclasses.dataclass(frozen=True)
class BertConfig:
    """The subset of a Hugging Face `BertConfig` that shapes a BERT encoder."""

    vocab_size: int = 30522
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    hidden_dropout_prob: float = 0.1
    attention_probs_dropout_prob: float = 0.1
    # HF builds the word embedding with `padding_idx=pad_token_id`: that row gets no gradient.
    pad_token_id: int | None = 0
    # Not an HF field (kept out of `to_hf_dict`): the self-attention kernel. 'xla' = the
    # written-out softmax(qkᵀ)v with dropout on the probabilities; 'cudnn' = cuDNN fused
    # (flash) attention via `jax.nn.dot_product_attention`, used only where it computes the
    # same function: GPU, bf16 compute, no attention dropout active (eval/predict, or
    # training with attention_probs_dropout_prob = 0); elsewhere the 'xla' path runs.
    # 'flash' = our Pallas kernels (`mtjax.models.flash_attention`) with dropout inside the
    # kernel, for training on GPUs in bf16/fp16: its dropout mask is a hash of (seed, batch,
    # head, row, column), not nn.Dropout's draw (same distribution, different bits); off GPU
    # or in float32 the same function runs written out.
    attention_impl: str = "xla"
    # 'xla' path in training: keep only the attention scores for the backward pass and
    # recompute softmax, dropout mask and dropped probabilities from them (no matmul is
    # recomputed). Saves two (B, H, L, L) tensors and the mask per layer (~2.9 GB at
    # batch 16 in float32); same function and gradients.
    remat_attention_probs: bool = False
    # Not an HF field: how the hidden-state dropout masks are drawn (`mtjax.models.dropout`).
    # 'threefry' = nn.Dropout's draw; 'hash' = an int32 counter hash of (seed, position),
    # cheaper on GPUs. Same distribution, different bits.
    hidden_dropout_impl: str = "threefry"
    # Not an HF field: 'fused' runs each add-norm (dropout → + residual → LayerNorm) as one
    # Pallas kernel pass forward and one backward on GPUs (`mtjax.models.fused_add_norm`),
    # drawing the same 'hash' mask; elsewhere the 'xla' path runs. Needs the 'hash' mask
    # whenever hidden dropout is on (threefry cannot be drawn inside a kernel).
    add_norm_impl: str = "xla"

    def __post_init__(self):
        if self.attention_impl not in ATTENTION_IMPLS:
            raise ConfigError(f"bert.attention_impl must be one of {ATTENTION_IMPLS}, got {self.attention_impl!r}")
        if self.hidden_dropout_impl not in DROPOUT_IMPLS:
            raise ConfigError(f"bert.hidden_dropout_impl must be one of {DROPOUT_IMPLS}, "
                              f"got {self.hidden_dropout_impl!r}")
        if self.add_norm_impl not in ADD_NORM_IMPLS:
            raise ConfigError(f"bert.add_norm_impl must be one of {ADD_NORM_IMPLS}, got {self.add_norm_impl!r}")
        if self.add_norm_impl == "fused" and self.hidden_dropout_prob > 0 and self.hidden_dropout_impl != "hash":
            raise ConfigError("bert.add_norm_impl='fused' draws the hidden-state dropout mask inside its kernel: "
                              "it needs bert.hidden_dropout_impl='hash'")

    @classmethod
    def from_hf_dict(cls, data: Mapping[str, Any]) -> "BertConfig":
        """Takes the fields we need from an HF `config.json`; ignores the rest."""
        act = data.get("hidden_act", "gelu")
        if act != "gelu":
            raise ConfigError(f"BERT hidden_act {act!r} is not supported (the original uses exact 'gelu')")
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})

    @classmethod
    def from_json_file(cls, path: str | Path) -> "BertConfig":
        path = Path(path)
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            raise ConfigError(f"{path}: BERT config file not found") from None
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path}: not valid JSON ({e})") from None
        return cls.from_hf_dict(data)

    def to_hf_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        for name in BERT_RUNTIME_FIELDS:
            d.pop(name)
        return {**d, "hidden_act": "gelu", "model_type": "bert"}


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Everything that fixes HICCAP's shapes and behaviour.

    variant: order of att3's contexts. 'multitask' = audio then text (original
      multi-task model); 'binary' = text then audio (original binary model and the
      refactored UnifiedModel).
    project_per_branch: the original re-applies `sequential_image/audio` at every
      fusion branch (fresh dropout per branch in training); the refactored
      UnifiedModel projects once per forward. Identical in eval mode.
    pooling: 'faithful' is the original's exp (overflows for scores > 88);
      'stable' is the same function computed in log space, finite everywhere.
    """

    bert: BertConfig = BertConfig()
    tasks: tuple[str, ...] = FINE_GRAINED_TASKS
    variant: str = "multitask"
    project_per_branch: bool = True
    pooling: str = "stable"
    text_len: int = 500
    video_len: int = 36
    audio_len: int = 63
    video_dim: int = 1024
    audio_dim: int = 128
    lstm_hidden: int = 512
    lstm_layers: int = 2
    # How the LSTM recurrences run (not the weights): 'scan' = `lax.scan`, everywhere;
    # 'kernel' = `mtjax.models.lstm_kernel`'s persistent GPU kernels where they take the
    # call (GPU, bf16/fp16, batch up to 32), the scan elsewhere. Same function. Its programs
    # need all of the GPU's multiprocessors at once: not for processes capped to a share
    # of them (CUDA MPS).
    lstm_impl: str = "scan"
    # How HICCAP's own dropout masks are drawn (fusion blocks, projections, heads; BERT's
    # are bert.hidden_dropout_impl and its attention path's): 'threefry' = flax's
    # nn.Dropout; 'hash' = mtjax.models.dropout's counter hash, the same distribution with
    # other bits and cheaper on GPUs. Not the weights: may change on a checkpoint.
    dropout_impl: str = "threefry"
    fusion_heads: int = 12
    head_dims: tuple[int, ...] = (200, 40, 20)
    # Compute dtype; parameters stay float32.
    dtype: str = "float32"

    def __post_init__(self):
        object.__setattr__(self, "tasks", tuple(self.tasks))
        object.__setattr__(self, "head_dims", tuple(self.head_dims))
        if isinstance(self.bert, Mapping):
            object.__setattr__(self, "bert", BertConfig(**self.bert))
        self.validate()

    @property
    def hidden_size(self) -> int:
        return self.bert.hidden_size

    def validate(self) -> None:
        if not self.tasks:
            raise ConfigError("model.tasks is empty: give at least one task head")
        if len(set(self.tasks)) != len(self.tasks):
            raise ConfigError(f"model.tasks has duplicates: {list(self.tasks)}")
        for t in self.tasks:
            if not t.isidentifier():
                raise ConfigError(f"task name {t!r} must be an identifier (letters, digits, _)")
        if self.variant not in VARIANTS:
            raise ConfigError(f"model.variant must be one of {VARIANTS}, got {self.variant!r}")
        if self.pooling not in POOLING_MODES:
            raise ConfigError(f"model.pooling must be one of {POOLING_MODES}, got {self.pooling!r}")
        if self.text_len > self.bert.max_position_embeddings:
            raise ConfigError(
                f"model.text_len={self.text_len} exceeds BERT's max_position_embeddings="
                f"{self.bert.max_position_embeddings}"
            )
        d = self.bert.hidden_size
        for name, heads in (("bert.num_attention_heads", self.bert.num_attention_heads),
                            ("fusion_heads", self.fusion_heads)):
            if d % heads:
                raise ConfigError(f"hidden size {d} is not divisible by {name}={heads}")
        if self.lstm_impl not in LSTM_IMPLS:
            raise ConfigError(f"model.lstm_impl must be one of {LSTM_IMPLS}, got {self.lstm_impl!r}")
        if self.dropout_impl not in DROPOUT_IMPLS:
            raise ConfigError(f"model.dropout_impl must be one of {DROPOUT_IMPLS}, got {self.dropout_impl!r}")
        if self.dtype not in ("float32", "bfloat16"):
            raise ConfigError(f"model.dtype must be 'float32' or 'bfloat16', got {self.dtype!r}")
        for name in ("text_len", "video_len", "audio_len", "video_dim", "audio_dim",
                     "lstm_hidden", "lstm_layers"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"model.{name} must be positive, got {getattr(self, name)}")

    def replace(self, **changes) -> "ModelConfig":
        return dataclasses.replace(self, **changes)

    def with_attention_impl(self, impl: str | None) -> "ModelConfig":
        """The same model with BERT's attention kernel set to `impl` (None: unchanged)."""
        return self if impl is None else self.replace(bert=dataclasses.replace(self.bert, attention_impl=impl))

    def with_add_norm_impl(self, impl: str | None) -> "ModelConfig":
        """The same model with BERT's add-norm kernel set to `impl` (None: unchanged), for eval
        and predict: 'fused' also selects the 'hash' dropout mask, which the kernel needs in
        training and which changes nothing in eval mode (no mask is drawn)."""
        if impl is None:
            return self
        extra = {"hidden_dropout_impl": "hash"} if impl == "fused" else {}
        return self.replace(bert=dataclasses.replace(self.bert, add_norm_impl=impl, **extra))

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["tasks"] = list(self.tasks)
        d["head_dims"] = list(self.head_dims)
        return d

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "ModelConfig":
        reject_unknown_keys(cls, data, "model config")
        data = dict(data)
        if "bert" in data and not isinstance(data["bert"], BertConfig):
            reject_unknown_keys(BertConfig, data["bert"], "model.bert config")
            data["bert"] = BertConfig(**data["bert"])
        return cls(**data)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "ModelConfig":
        return cls.from_dict(json.loads(text))


def tiny_model_config(**overrides) -> ModelConfig:
    """A small model for CPU tests: every shape rule intact, every size small."""
    bert = BertConfig(vocab_size=120, hidden_size=48, num_hidden_layers=2, num_attention_heads=4,
                      intermediate_size=96, max_position_embeddings=40)
    base = dict(bert=bert, text_len=24, video_len=6, audio_len=7, video_dim=20, audio_dim=12,
                lstm_hidden=16, lstm_layers=2, fusion_heads=4, head_dims=(20, 8, 6))
    base.update(overrides)
    return ModelConfig(**base)
