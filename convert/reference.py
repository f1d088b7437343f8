"""PyTorch reference implementation of HICCAP, written from SPEC §2, plus checkpoint writers/readers.

This module is the ground truth the Flax port is compared against (layer by layer and per train
step). It reproduces the original model's quirks on purpose:

- BERT sees the token ids only (no attention mask, left padding attended to, positions shifted).
- LSTMs run over the whole padded sequence (no packing); the video/audio masks only reach the
  cross attention.
- Each fusion branch applies its one `BertOutAttention` twice (shared weights), no output
  projection, extended mask `(1 - mask) * -10000`.
- `att3`'s context order depends on `config.variant` (multitask: audio then text; binary: text
  then audio).
- `sequential_image/audio` are re-applied in every branch when `config.project_per_branch`.
- Pooling is the faithful `exp` form with an all-ones mask: it overflows for scores > 88.
  `config.pooling` is ignored here; the Flax 'stable' mode is checked against this faithful
  form where the latter is finite.

Internally modules carry readable names (`bert`, `rnn_img`, `att1`, `heads.<task>`, ...).
`original_state_dict` / `unified_state_dict` rename them to the two PyTorch checkpoint formats
of SPEC §3, and the `load_*` functions invert them.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any, Mapping

import torch
import torch.nn.functional as F
from torch import nn
from transformers import BertConfig as HFBertConfig
from transformers import BertModel

from mtjax.config import BINARY_TASK, ModelConfig

__all__ = [
    "HICCAPReference",
    "hf_bert_config",
    "BertOutAttention",
    "Attention",
    "build_reference",
    "original_bce",
    "multitask_original_loss",
    "MULTITASK_ORIGINAL_WEIGHTS",
    "binary_original_l2_constant",
    "FEATURES_ORDER",
    "original_state_dict",
    "original_to_readable",
    "save_original_checkpoint",
    "load_original_checkpoint",
    "unified_state_dict",
    "unified_to_readable",
    "save_unified_checkpoint",
    "load_unified_checkpoint",
    "hf_bert_dir",
]

# Original ModuleList order (SPEC §3): index N of `features.N` -> readable module name.
FEATURES_ORDER: tuple[str, ...] = (
    "bert",                       # 0
    "rnn_img",                    # 1
    "rnn_img_drop_norm",          # 2
    "rnn_audio",                  # 3
    "rnn_audio_drop_norm",        # 4
    "sequential_audio",           # 5
    "sequential_image",           # 6
    "att1",                       # 7
    "att1_drop_norm1",            # 8
    "att1_drop_norm2",            # 9
    "att2",                       # 10
    "att2_drop_norm1",            # 11
    "att2_drop_norm2",            # 12
    "att3",                       # 13
    "att3_drop_norm1",            # 14
    "att3_drop_norm2",            # 15
    "attention",                  # 16
    "attention_drop_norm",        # 17
    "attention_audio",            # 18
    "attention_audio_drop_norm",  # 19
    "attention_image",            # 20
    "attention_image_drop_norm",  # 21
)

MULTITASK_ORIGINAL_WEIGHTS: dict[str, float] = {
    "mature": 0.1, "gory": 0.4, "slapstick": 0.2, "sarcasm": 0.2,
}

ORIGINAL_HEAD_PREFIX = "img_audio_text_linear"      # + "_<task>" except for the binary task
UNIFIED_HEAD_INFIX = "text_audio_image_linear"      # task_heads.<task>.<infix>.<i>.*


# --------------------------------------------------------------------------------------------
# Modules
# --------------------------------------------------------------------------------------------

class BertOutAttention(nn.Module):
    """Multi-head cross attention without an output projection (SPEC §2.4)."""

    def __init__(self, hidden_size: int, num_heads: int, dropout: float = 0.1):
        super().__init__()
        if hidden_size % num_heads:
            raise ValueError(f"hidden size {hidden_size} not divisible by {num_heads} heads")
        self.num_heads = num_heads
        self.head_size = hidden_size // num_heads
        self.query = nn.Linear(hidden_size, hidden_size)
        self.key = nn.Linear(hidden_size, hidden_size)
        self.value = nn.Linear(hidden_size, hidden_size)
        self.dropout = nn.Dropout(dropout)

    def _split(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        return x.view(b, n, self.num_heads, self.head_size).transpose(1, 2)  # (B, H, N, hs)

    def forward(self, hidden: torch.Tensor, context: torch.Tensor,
                context_mask: torch.Tensor) -> torch.Tensor:
        q = self._split(self.query(hidden))
        k = self._split(self.key(context))
        v = self._split(self.value(context))
        scores = q @ k.transpose(-1, -2) / math.sqrt(self.head_size)
        # Additive mask over the context (key) positions, BERT's old -10000 convention.
        ext_mask = (1.0 - context_mask.to(scores.dtype))[:, None, None, :] * -10000.0
        probs = self.dropout(torch.softmax(scores + ext_mask, dim=-1))
        out = (probs @ v).transpose(1, 2)                                       # (B, N, H, hs)
        return out.reshape(out.shape[0], out.shape[1], -1)


class Attention(nn.Module):
    """Additive attention pooling, in the original's faithful (overflowing) form (SPEC §2.6)."""

    def __init__(self, hidden_size: int):
        super().__init__()
        self.linear = nn.Linear(hidden_size, hidden_size)
        self.v = nn.Parameter(torch.rand(hidden_size))

    def forward(self, h: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        u = torch.tanh(self.linear(h))
        s = u @ self.v                                   # (B, L)
        mask = mask.to(s.dtype)
        # exp(s) overflows to inf for s > ~88.7 and inf/inf gives NaN: kept on purpose.
        a = mask * torch.exp(s) + 1e-10
        a = mask * a / a.sum(dim=1, keepdim=True)
        return (a.unsqueeze(-1) * h).sum(dim=1)          # (B, d)


def _drop_norm(p: float, d: int) -> nn.Sequential:
    # Index 1 is the LayerNorm, as in the checkpoints.
    return nn.Sequential(nn.Dropout(p), nn.LayerNorm(d))


def _head(d: int, head_dims: tuple[int, ...], p: float) -> nn.Sequential:
    h0, h1, h2 = head_dims
    # Indices 0 Linear, 1 BN, 2 Dropout, 3 Linear, 4 BN, 5 Dropout, 6 Linear, 7 Linear.
    return nn.Sequential(
        nn.Linear(3 * d, h0), nn.BatchNorm1d(h0), nn.Dropout(p),
        nn.Linear(h0, h1), nn.BatchNorm1d(h1), nn.Dropout(p),
        nn.Linear(h1, h2),
        nn.Linear(h2, 2),
    )


def hf_bert_config(config: ModelConfig, *, dropout_off: bool = False) -> HFBertConfig:
    """The HF BertConfig the original's `bert-base-uncased` encoder corresponds to."""
    b = config.bert
    return HFBertConfig(
        vocab_size=b.vocab_size,
        hidden_size=b.hidden_size,
        num_hidden_layers=b.num_hidden_layers,
        num_attention_heads=b.num_attention_heads,
        intermediate_size=b.intermediate_size,
        max_position_embeddings=b.max_position_embeddings,
        type_vocab_size=b.type_vocab_size,
        layer_norm_eps=b.layer_norm_eps,
        hidden_act="gelu",
        hidden_dropout_prob=0.0 if dropout_off else b.hidden_dropout_prob,
        attention_probs_dropout_prob=0.0 if dropout_off else b.attention_probs_dropout_prob,
        # bert-base-uncased's value: word embedding row 0 ([PAD]) then gets no gradient in PyTorch.
        pad_token_id=0,
        attn_implementation="eager",
    )


class HICCAPReference(nn.Module):
    """HICCAP with any set of task heads, PyTorch, readable module names."""

    def __init__(self, config: ModelConfig, *, dropout_off: bool = False):
        super().__init__()
        self.config = config
        self.dropout_off = dropout_off
        d = config.hidden_size
        H = config.lstm_hidden

        def p(rate: float) -> float:
            return 0.0 if dropout_off else rate

        self.bert = BertModel(hf_bert_config(config, dropout_off=dropout_off), add_pooling_layer=True)

        self.rnn_img = nn.LSTM(config.video_dim, H, num_layers=config.lstm_layers,
                               bidirectional=True, batch_first=True)
        self.rnn_img_drop_norm = _drop_norm(p(0.2), 2 * H)
        self.sequential_image = nn.Sequential(nn.Linear(2 * H, d), nn.LayerNorm(d), nn.Dropout(p(0.3)))

        self.rnn_audio = nn.LSTM(config.audio_dim, H, num_layers=config.lstm_layers,
                                 bidirectional=True, batch_first=True)
        self.rnn_audio_drop_norm = _drop_norm(p(0.2), 2 * H)
        self.sequential_audio = nn.Sequential(nn.Linear(2 * H, d), nn.LayerNorm(d), nn.Dropout(p(0.3)))

        for name in ("att1", "att2", "att3"):
            setattr(self, name, BertOutAttention(d, config.fusion_heads, dropout=p(0.1)))
            setattr(self, f"{name}_drop_norm1", _drop_norm(p(0.2), d))
            setattr(self, f"{name}_drop_norm2", _drop_norm(p(0.2), d))

        for name in ("attention", "attention_audio", "attention_image"):
            setattr(self, name, Attention(d))
            setattr(self, f"{name}_drop_norm", _drop_norm(p(0.2), d))

        self.heads = nn.ModuleDict({t: _head(d, config.head_dims, p(0.3)) for t in config.tasks})

    # ---- pieces ----------------------------------------------------------------------------

    def _branch(self, name: str, query: torch.Tensor,
                ctx1: torch.Tensor, mask1: torch.Tensor,
                ctx2: torch.Tensor, mask2: torch.Tensor,
                rec: dict[str, torch.Tensor] | None) -> torch.Tensor:
        att = getattr(self, name)
        a1 = att(query, ctx1, mask1)
        n1 = getattr(self, f"{name}_drop_norm1")(a1)
        a2 = att(n1, ctx2, mask2)          # same module: shared weights
        n2 = getattr(self, f"{name}_drop_norm2")(a2)
        out = n2 + query
        if rec is not None:
            rec.update({f"{name}.attn1": a1, f"{name}.drop_norm1": n1,
                        f"{name}.attn2": a2, f"{name}.drop_norm2": n2, f"{name}.out": out})
        return out

    def _forward(self, text, text_mask, video, video_mask, audio, audio_mask,
                 rec: dict[str, torch.Tensor] | None) -> dict[str, torch.Tensor]:
        cfg = self.config
        text_mask = text_mask.float()
        video_mask = video_mask.float()
        audio_mask = audio_mask.float()

        # Ids only: default all-ones attention mask, token types 0, positions 0..L-1.
        text_h = self.bert(input_ids=text.long()).last_hidden_state
        rnn_img = self.rnn_img(video.float())[0]
        rnn_aud = self.rnn_audio(audio.float())[0]
        r_img = self.rnn_img_drop_norm(rnn_img)
        r_aud = self.rnn_audio_drop_norm(rnn_aud)
        if rec is not None:
            rec.update({"bert": text_h, "rnn_img": rnn_img, "rnn_audio": rnn_aud,
                        "rnn_img_drop_norm": r_img, "rnn_audio_drop_norm": r_aud})

        def project() -> tuple[torch.Tensor, torch.Tensor]:
            return self.sequential_image(r_img), self.sequential_audio(r_aud)

        # Original: sequential_* re-applied in every branch (fresh dropout each time).
        # Refactored UnifiedModel: projected once per forward and shared.
        img, aud = project()
        if rec is not None:
            rec.update({"img": img, "aud": aud})
        out_text = self._branch("att1", text_h, img, video_mask, aud, audio_mask, rec)
        if cfg.project_per_branch:
            img, aud = project()
        out_aud = self._branch("att2", aud, img, video_mask, text_h, text_mask, rec)
        if cfg.project_per_branch:
            img, aud = project()
        if cfg.variant == "binary":
            out_img = self._branch("att3", img, text_h, text_mask, aud, audio_mask, rec)
        else:  # 'multitask': contexts swapped (audio first, then text)
            out_img = self._branch("att3", img, aud, audio_mask, text_h, text_mask, rec)

        # The original pools with an all-ones mask: padding positions are pooled too.
        pooled = {}
        for key, module, h in (("text", "attention", out_text),
                               ("aud", "attention_audio", out_aud),
                               ("img", "attention_image", out_img)):
            ones = torch.ones(h.shape[:2], dtype=h.dtype, device=h.device)
            raw = getattr(self, module)(h, ones)
            pooled[key] = getattr(self, f"{module}_drop_norm")(raw)
            if rec is not None:
                rec[f"pool_{key}_raw"] = raw
                rec[f"pooled_{key}"] = pooled[key]

        features = torch.cat([pooled["text"], pooled["aud"], pooled["img"]], dim=-1)  # (B, 3d)
        if rec is not None:
            rec["features"] = features

        probs = {}
        for task in cfg.tasks:
            logits = self.heads[task](features)
            probs[task] = torch.softmax(logits, dim=-1)
            if rec is not None:
                rec[f"logits.{task}"] = logits
                rec[f"probs.{task}"] = probs[task]
        return probs

    # ---- public ----------------------------------------------------------------------------

    def forward(self, text, text_mask, video, video_mask, audio, audio_mask) -> dict[str, torch.Tensor]:
        """Returns {task: softmax probabilities (B, 2)} in `config.tasks` order."""
        return self._forward(text, text_mask, video, video_mask, audio, audio_mask, None)

    def forward_blocks(self, text, text_mask, video, video_mask, audio, audio_mask) -> dict[str, torch.Tensor]:
        """Same computation as `forward`, returning every block output in a flat dict.

        Keys: bert, rnn_img, rnn_audio, rnn_img_drop_norm, rnn_audio_drop_norm, img, aud,
        att{1,2,3}.{attn1,drop_norm1,attn2,drop_norm2,out}, pool_{text,aud,img}_raw,
        pooled_{text,aud,img}, features, logits.<task>, probs.<task>.
        `img`/`aud` are the first projections computed (the ones att1 uses); with
        `project_per_branch` in eval or dropout-off mode every branch's projection equals them.
        """
        rec: dict[str, torch.Tensor] = {}
        self._forward(text, text_mask, video, video_mask, audio, audio_mask, rec)
        return rec


# --------------------------------------------------------------------------------------------
# Deterministic construction
# --------------------------------------------------------------------------------------------

def build_reference(config: ModelConfig, seed: int, dropout_off: bool = False) -> HICCAPReference:
    """A reference model with seeded weights that make parity tests meaningful.

    Default PyTorch/HF inits leave many tensors constant (LayerNorm 1/0, BERT biases 0, the
    [PAD] embedding row 0, BN running stats 0/1), which would hide mapping mistakes (e.g. two
    LayerNorms swapped). They are perturbed here, and BN running stats are made non-trivial so
    eval-mode BatchNorm is not the identity.
    """
    torch.manual_seed(seed)
    model = HICCAPReference(config, dropout_off=dropout_off)
    g = torch.Generator().manual_seed(seed + 1)

    def noise(t: torch.Tensor, scale: float) -> torch.Tensor:
        return torch.randn(t.shape, generator=g, dtype=t.dtype) * scale

    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, Attention):
                module.v.copy_(torch.rand(module.v.shape, generator=g))
            elif isinstance(module, nn.BatchNorm1d):
                module.weight.copy_(1.0 + noise(module.weight, 0.1))
                module.bias.copy_(noise(module.bias, 0.1))
                module.running_mean.copy_(noise(module.running_mean, 0.1))
                module.running_var.copy_(torch.rand(module.running_var.shape, generator=g) * 0.5 + 0.75)
                module.num_batches_tracked.fill_(7)
            elif isinstance(module, nn.LayerNorm):
                module.weight.copy_(1.0 + noise(module.weight, 0.1))
                module.bias.copy_(noise(module.bias, 0.05))
        for module in model.bert.modules():
            if isinstance(module, nn.Linear) and module.bias is not None:
                module.bias.copy_(noise(module.bias, 0.02))
        # A pretrained BERT has a non-zero [PAD] row; the left padding makes it matter.
        emb = model.bert.embeddings.word_embeddings.weight
        emb[0].copy_(noise(emb[0], 0.02))
    return model


# --------------------------------------------------------------------------------------------
# Losses (SPEC §2.8)
# --------------------------------------------------------------------------------------------

def original_bce(probs: torch.Tensor, onehot: torch.Tensor) -> torch.Tensor:
    """BCE on the softmax output, mean over B x 2 (PyTorch clamps each log at -100)."""
    return F.binary_cross_entropy(probs, onehot.to(probs.dtype))


def multitask_original_loss(probs_by_task: Mapping[str, torch.Tensor],
                            labels_by_task: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """0.1 mature + 0.4 gory + 0.2 slapstick + 0.2 sarcasm, as the original multi-task script."""
    missing = [t for t in MULTITASK_ORIGINAL_WEIGHTS if t not in probs_by_task or t not in labels_by_task]
    if missing:
        raise KeyError(f"multitask_original_loss needs probs and labels for {missing}")
    return sum(w * original_bce(probs_by_task[t], labels_by_task[t])
               for t, w in MULTITASK_ORIGINAL_WEIGHTS.items())


def binary_original_l2_constant(model: nn.Module) -> float:
    """0.1 * sum of the L2 (Frobenius) norms of every parameter, as a Python float.

    The original binary script added this with `.item()`: it inflates the reported loss and has
    no gradient. Note the original model also held an unused `sequential` block whose norms
    were part of its sum; this reference has no such block.
    """
    with torch.no_grad():
        return 0.1 * sum(torch.linalg.vector_norm(p).item() for p in model.parameters())


# --------------------------------------------------------------------------------------------
# Checkpoint formats (SPEC §3)
# --------------------------------------------------------------------------------------------

def _readable_state_dict(model: HICCAPReference) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _split_head_key(key: str) -> tuple[str, str]:
    """'heads.<task>.<rest>' -> (task, rest)."""
    _, task, rest = key.split(".", 2)
    return task, rest


def _unused_sequential(seed: int) -> dict[str, torch.Tensor]:
    """The binary checkpoint's unused `sequential` block, random values, original sizes."""
    g = torch.Generator().manual_seed(seed)
    sd: dict[str, torch.Tensor] = {}

    def linear(prefix: str, n_in: int, n_out: int) -> None:
        sd[f"{prefix}.weight"] = torch.randn(n_out, n_in, generator=g) * 0.05
        sd[f"{prefix}.bias"] = torch.randn(n_out, generator=g) * 0.05

    def bn(prefix: str, n: int) -> None:
        sd[f"{prefix}.weight"] = 1.0 + 0.1 * torch.randn(n, generator=g)
        sd[f"{prefix}.bias"] = 0.1 * torch.randn(n, generator=g)
        sd[f"{prefix}.running_mean"] = 0.1 * torch.randn(n, generator=g)
        sd[f"{prefix}.running_var"] = 0.5 + torch.rand(n, generator=g)
        sd[f"{prefix}.num_batches_tracked"] = torch.tensor(123, dtype=torch.long)

    linear("sequential.0", 512, 100)
    bn("sequential.1", 100)
    linear("sequential.2", 100, 40)
    bn("sequential.3", 40)
    linear("sequential.4", 40, 20)
    return sd


def original_state_dict(model: HICCAPReference, *, heads: bool = True,
                        include_unused_sequential: bool = False,
                        include_position_ids: bool = False) -> dict[str, torch.Tensor]:
    """The model's state in the original HICCAP key format.

    heads=False gives a pretraining-style state (base model only).
    include_unused_sequential adds the binary checkpoint's unused `sequential.*` block.
    include_position_ids adds `features.0.embeddings.position_ids` (1, max_pos) int64, which
    transformers < 4.31 saved as a persistent buffer; a reader should ignore it.
    """
    index = {name: i for i, name in enumerate(FEATURES_ORDER)}
    out: dict[str, torch.Tensor] = {}
    for key, value in _readable_state_dict(model).items():
        module, rest = key.split(".", 1)
        if module == "heads":
            if not heads:
                continue
            task, rest = _split_head_key(key)
            prefix = ORIGINAL_HEAD_PREFIX if task == BINARY_TASK else f"{ORIGINAL_HEAD_PREFIX}_{task}"
            out[f"{prefix}.{rest}"] = value
        else:
            out[f"features.{index[module]}.{rest}"] = value
    if include_position_ids:
        n = model.config.bert.max_position_embeddings
        out["features.0.embeddings.position_ids"] = torch.arange(n, dtype=torch.long)[None]
    if include_unused_sequential:
        out.update(_unused_sequential(seed=1234))
    return out


def original_to_readable(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Inverse of `original_state_dict`; drops `sequential.*` and BERT `position_ids`."""
    out: dict[str, torch.Tensor] = {}
    for key, value in sd.items():
        head, rest = key.split(".", 1)
        if head == "sequential":
            continue  # the binary checkpoint's unused block
        if head == "features":
            n, rest = rest.split(".", 1)
            if not n.isdigit() or int(n) >= len(FEATURES_ORDER):
                raise KeyError(f"unknown original module index in {key!r}")
            if n == "0" and rest == "embeddings.position_ids":
                continue
            out[f"{FEATURES_ORDER[int(n)]}.{rest}"] = value
        elif head == ORIGINAL_HEAD_PREFIX:
            out[f"heads.{BINARY_TASK}.{rest}"] = value
        elif head.startswith(ORIGINAL_HEAD_PREFIX + "_"):
            out[f"heads.{head[len(ORIGINAL_HEAD_PREFIX) + 1:]}.{rest}"] = value
        else:
            raise KeyError(f"unexpected key in original checkpoint: {key!r}")
    return out


def _adam_state(model: nn.Module, seed: int = 0) -> dict[str, Any]:
    """A real Adam state dict (after one step) for `model.parameters()`, without touching the model.

    The optimizer runs on detached clones: its state dict refers to parameters by index only,
    so it is the same structure Adam(model.parameters()) would produce.
    """
    g = torch.Generator().manual_seed(seed)
    clones = [p.detach().clone().requires_grad_(True) for p in model.parameters()]
    opt = torch.optim.Adam(clones, lr=1.5e-5)
    for c in clones:
        c.grad = torch.randn(c.shape, generator=g) * 1e-3
    opt.step()
    return opt.state_dict()


def save_original_checkpoint(model: HICCAPReference, path: str | os.PathLike, *, epoch: int = 3,
                             score: float = 0.5, optimizer: Mapping[str, Any] | None = None,
                             include_unused_sequential: bool = False, heads: bool = True,
                             include_position_ids: bool = False) -> Path:
    """Writes {'model_state', 'epoch', 'score', 'optimizer'} as the original training scripts did."""
    sd = original_state_dict(model, heads=heads, include_unused_sequential=include_unused_sequential,
                             include_position_ids=include_position_ids)
    ckpt = {"model_state": sd, "epoch": epoch, "score": score,
            "optimizer": dict(optimizer) if optimizer is not None else _adam_state(model)}
    path = Path(path)
    torch.save(ckpt, path)
    return path


def _load_readable(model: HICCAPReference, sd: dict[str, torch.Tensor], *,
                   allow_missing_heads: bool) -> list[str]:
    own = model.state_dict()
    unexpected = sorted(set(sd) - set(own))
    missing = sorted(set(own) - set(sd))
    has_heads = any(k.startswith("heads.") for k in sd)
    if allow_missing_heads and not has_heads:
        missing = [k for k in missing if not k.startswith("heads.")]
    if unexpected or missing:
        raise KeyError(f"checkpoint does not fit the model: missing {missing[:10]}"
                       f"{'...' if len(missing) > 10 else ''}, unexpected {unexpected[:10]}"
                       f"{'...' if len(unexpected) > 10 else ''}")
    for k, v in sd.items():
        if own[k].shape != v.shape:
            raise ValueError(f"{k}: checkpoint shape {tuple(v.shape)} != model {tuple(own[k].shape)}")
    model.load_state_dict(sd, strict=False)
    return sorted(set(own) - set(sd))


def load_original_checkpoint(model: HICCAPReference, path: str | os.PathLike) -> dict[str, Any]:
    """Loads an original-format checkpoint into `model` (weights_only: no code executed).

    A checkpoint with no heads at all (pretraining) leaves the model's heads as they are.
    Returns {'epoch', 'score', 'optimizer', 'not_loaded': [readable keys left untouched]}.
    """
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    sd = original_to_readable(ckpt["model_state"])
    not_loaded = _load_readable(model, sd, allow_missing_heads=True)
    return {"epoch": ckpt.get("epoch"), "score": ckpt.get("score"),
            "optimizer": ckpt.get("optimizer"), "not_loaded": not_loaded}


def unified_state_dict(model: HICCAPReference,
                       loss_weights: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """The refactored `UnifiedModel` format: base_model.*, task_heads.<task>.*, loss_weights (T,).

    The UnifiedModel itself always used the binary att3 order and one projection per forward;
    a model meant to stand for it should have variant='binary', project_per_branch=False.
    loss_weights defaults to ones (one per task in config.tasks order).
    """
    out: dict[str, torch.Tensor] = {}
    for key, value in _readable_state_dict(model).items():
        if key.startswith("heads."):
            task, rest = _split_head_key(key)
            out[f"task_heads.{task}.{UNIFIED_HEAD_INFIX}.{rest}"] = value
        else:
            out[f"base_model.{key}"] = value
    n_tasks = len(model.config.tasks)
    if loss_weights is None:
        loss_weights = torch.ones(n_tasks)
    loss_weights = torch.as_tensor(loss_weights, dtype=torch.float32).detach().clone()
    if loss_weights.shape != (n_tasks,):
        raise ValueError(f"loss_weights must have shape ({n_tasks},), got {tuple(loss_weights.shape)}")
    out["loss_weights"] = loss_weights
    return out


def unified_to_readable(sd: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], torch.Tensor | None]:
    """Inverse of `unified_state_dict`: (readable state dict, loss_weights or None)."""
    out: dict[str, torch.Tensor] = {}
    loss_weights = None
    for key, value in sd.items():
        if key == "loss_weights":
            loss_weights = value
        elif key.startswith("base_model."):
            rest = key[len("base_model."):]
            if rest == "bert.embeddings.position_ids":
                continue
            out[rest] = value
        elif key.startswith("task_heads."):
            _, task, infix, rest = key.split(".", 3)
            if infix != UNIFIED_HEAD_INFIX:
                raise KeyError(f"unexpected head key in unified checkpoint: {key!r}")
            out[f"heads.{task}.{rest}"] = value
        else:
            raise KeyError(f"unexpected key in unified checkpoint: {key!r}")
    return out, loss_weights


def save_unified_checkpoint(model: HICCAPReference, path: str | os.PathLike,
                            loss_weights: torch.Tensor | None = None) -> Path:
    """Writes the UnifiedModel format as a plain state dict."""
    path = Path(path)
    torch.save(unified_state_dict(model, loss_weights), path)
    return path


def load_unified_checkpoint(model: HICCAPReference, path: str | os.PathLike) -> dict[str, Any]:
    """Loads a UnifiedModel state dict into `model`; returns {'loss_weights', 'not_loaded'}."""
    sd, loss_weights = unified_to_readable(torch.load(path, map_location="cpu", weights_only=True))
    not_loaded = _load_readable(model, sd, allow_missing_heads=False)
    return {"loss_weights": loss_weights, "not_loaded": not_loaded}


def hf_bert_dir(model: HICCAPReference, out_dir: str | os.PathLike) -> Path:
    """Writes the BERT encoder as a plain Hugging Face directory (config.json + model.safetensors)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.bert.save_pretrained(out_dir)  # transformers 5 always writes safetensors
    return out_dir
