"""Speed benchmark: JAX train/eval/predict vs the PyTorch reference, one table.

    python -m mtjax.bench [--batch-sizes 8,16,32] [--modes jax-train-bf16,torch-train-fp32,...]
                          [--steps N] [--warmup N] [--out FILE.md] [--json FILE.jsonl]
    python -m mtjax.bench --cpu-smoke          # tiny config on CPU (about a minute, mostly XLA compiles)
    python -m mtjax.bench --merge a.jsonl,b.jsonl --out FILE.md   # table from saved records

With no --modes/--batch-sizes it runs DEFAULT_PLAN (21 configs, ~20 min on an H200, mostly
compilation); on a machine that limits one command's time, run it in groups with --modes
and --json, then --merge. Other switches: --model KEY=VALUE (ModelConfig overrides, e.g.
bert.attention_impl=cudnn or =flash), --set MODULE.ATTR=VALUE (A/B switches in mtjax.models, e.g.
lstm.SCAN_UNROLL=1), --profile DIR (GPU kernel summary of 3 extra steps), --prng IMPL,
--devices N (data parallel train steps over N GPUs; batch sizes are global), --cache-dir DIR
(persistent compilation cache across the fresh processes).

Full size = bert-base shapes, random weights, text 500, video 36x1024, audio 63x128, the
four fine-grained heads and the original multi-task loss (0.1/0.4/0.2/0.2). A train step
is forward + backward + Adam with dropout on (training as the original runs it).

Modes (`impl-kind-precision`):
  jax-train-{fp32,tf32,bf16}   `make_train_step` (single weighted loss). fp32 = f32 compute
                               under `jax.default_matmul_precision("highest")`; tf32 = f32
                               under "tensorfloat32"; bf16 = `ModelConfig(dtype='bfloat16')`
                               (bf16 compute, fp32 params/Adam/loss/softmax/LN statistics).
  jax-pcgrad-{...}             per-task gradients (one forward + vmapped VJP, T=4) + PCGrad.
  jax-pcgradfeat-{...}         PCGrad on the per-task gradients of the shared features
                               (`aggregate_on='features'`: one trunk backward).
  jax-eval-{...}               `make_eval_step` on a batch already on the device.
  jax-predict-{...}            `mtjax.predict.predict_dataset` over an in-memory dataset of
                               PREDICT_STREAM_BATCHES batches (host batch assembly, pipelined
                               transfer/compute/fetch, as `predict` runs); ms = stream time / batches.
  torch-train-{fp32,tf32,bf16} the reference `HICCAPReference`, eager; bf16 = autocast
                               (loss in fp32 outside autocast: BCE refuses autocast).
  torch-train-compile          `torch.compile(model)` + bf16 autocast.
  torch-eval-{fp32,tf32,bf16}  reference in eval mode under `torch.no_grad()`.
  jax-lstm-{...}               component timing: both BiLSTMs alone, forward + backward.

Timing: each config runs in a FRESH process (so the JAX peak-memory counter, which cannot be
reset, belongs to that config alone); `warmup` steps first (compilation is excluded), then
`steps` samples, each `--steps-per-sample` steps (default 5) dispatched back to back and ended
by one `block_until_ready` / `torch.cuda.synchronize`, as a training loop that keeps the next
step queued runs them; ms/step = sample time / steps, median over samples. With
`--steps-per-sample 1` every step waits for the previous one (the host's dispatch time then
adds to every step: ~5 ms for the full-size JAX train step). JAX steps are called through
`jax.jit` (its C++ dispatch path, as the Trainer calls them); compile_s is the first call.
Peak memory: JAX `device.memory_stats()['peak_bytes_in_use']` (whole process:
params, optimizer state, batch, activations); PyTorch `torch.cuda.max_memory_allocated`
after `reset_peak_memory_stats` (model and optimizer already on the device, so counted too).

MFU = analytic model FLOPs / time / peak. Model FLOPs count the matrix products only
(`model_flops_per_clip`, forward); a train step counts 3x forward (backward = 2x). The
per-task-gradient step is charged the same useful FLOPs as the single-loss step. Peaks
(H100 SXM, dense; the H200 has the same compute peaks): bf16 989 TFLOP/s, TF32 494, fp32 67.
XLA's own count (`cost_analysis()['flops']`, which counts a scan body once) is kept in the
JSON records where the backend reports it (the GPU runs so far did not: `xla_flops_error`).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

PEAK_FLOPS = {"fp32": 67e12, "tf32": 494.7e12, "bf16": 989.4e12}
# Kinds that run a train step; the two per-task-gradient kinds differ in what PCGrad sees.
TRAIN_KINDS = ("train", "pcgrad", "pcgradfeat")
PER_TASK_KINDS = {"pcgrad": "parameters", "pcgradfeat": "features"}
MULTITASK_WEIGHTS = (0.1, 0.4, 0.2, 0.2)
# Predict mode: batches in one timed stream (the pipeline's fill and drain are in the time).
PREDICT_STREAM_BATCHES = 8

# What `python -m mtjax.bench` runs with no --modes/--batch-sizes: the comparisons of
# docs/benchmarks.md (~20 min on an H200, mostly compilation).
_CUDNN = {"bert": {"attention_impl": "cudnn"}}
_CUDNN_NO_ATTN_DROPOUT = {"bert": {"attention_impl": "cudnn", "attention_probs_dropout_prob": 0.0}}
# Our fused kernels with dropout in training; cuDNN's where no dropout is active.
_FLASH = {"bert": {"attention_impl": "flash"}}
DEFAULT_PLAN: list[tuple[str, int, dict]] = [
    ("torch-train-fp32", 8, {}), ("torch-train-fp32", 16, {}), ("jax-train-fp32", 16, {}),
    ("torch-train-tf32", 16, {}), ("jax-train-tf32", 16, {}),
    ("torch-train-bf16", 16, {}), ("torch-train-bf16", 32, {}), ("torch-train-compile", 32, {}),
    ("jax-train-bf16", 16, {}), ("jax-pcgrad-bf16", 16, {}), ("jax-train-bf16", 32, {}),
    ("jax-train-bf16", 16, _FLASH), ("jax-train-bf16", 32, _FLASH),
    # Not the original recipe (no dropout on BERT's attention probabilities): cuDNN's kernel
    # in training, the bound for 'flash' (which keeps the dropout).
    ("jax-train-bf16", 32, _CUDNN_NO_ATTN_DROPOUT),
    ("torch-eval-bf16", 128, {}), ("jax-eval-bf16", 128, _CUDNN), ("jax-predict-bf16", 128, _CUDNN),
    ("jax-predict-bf16", 256, _CUDNN),
    ("jax-eval-bf16", 128, {}),
    ("torch-eval-fp32", 32, {}), ("jax-eval-fp32", 32, {}),
]
# Every kind of row once (each JAX row is an XLA compile, the slow part on a CPU).
SMOKE_MODES = ["jax-train-fp32", "jax-pcgrad-fp32", "jax-eval-fp32", "jax-predict-fp32",
               "torch-train-fp32", "torch-eval-fp32"]
SMOKE_BATCHES = [2]


# ----------------------------------------------------------------------------- FLOPs

def model_flops_per_clip(config) -> float:
    """Matrix-product FLOPs (2·m·n·k) of one eval-mode forward for one clip.

    BERT (QKV/out projections, FFN, the two attention products), both BiLSTMs (input
    projection + recurrence, both directions), the projections, the three hierarchical
    branches (each attends twice), the three poolings and the heads. Elementwise work
    (softmax, LayerNorm, gates) is not counted, as usual for MFU."""
    c = config
    d, L = c.hidden_size, c.text_len
    b = c.bert
    bert_layer = L * (4 * 2 * d * d + 2 * 2 * d * b.intermediate_size) + 2 * 2 * L * L * d
    flops = b.num_hidden_layers * bert_layer

    def lstm(t, in_dim):
        h, g = c.lstm_hidden, 4 * c.lstm_hidden
        total, dim = 0, in_dim
        for _ in range(c.lstm_layers):
            total += 2 * t * (2 * dim * g + 2 * h * g)  # 2 directions
            dim = 2 * h
        return total

    tv, ta = c.video_len, c.audio_len
    flops += lstm(tv, c.video_dim) + lstm(ta, c.audio_dim)
    proj = 2 * (2 * c.lstm_hidden) * d
    # sequential_* applied once per branch when project_per_branch (3x), as the original.
    uses = 3 if c.project_per_branch else 1
    flops += uses * (tv + ta) * proj

    def attend(lq, lk):  # q from the query, k and v from the context, two attention products
        return 2 * lq * d * d + 2 * 2 * lk * d * d + 2 * 2 * lq * lk * d

    first, second = (ta, L) if c.variant == "multitask" else (L, ta)
    flops += attend(L, tv) + attend(L, ta)            # att1: text <- img, <- aud
    flops += attend(ta, tv) + attend(ta, L)           # att2: aud <- img, <- text
    flops += attend(tv, first) + attend(tv, second)   # att3
    flops += (L + ta + tv) * 2 * d * d                # pooling Linear_u
    h0, h1, h2 = c.head_dims
    flops += len(c.tasks) * 2 * (3 * d * h0 + h0 * h1 + h1 * h2 + h2 * 2)
    return float(flops)


def step_flops(config, kind: str, batch: int) -> float | None:
    if kind == "lstm":  # a component timing: no MFU
        return None
    fwd = model_flops_per_clip(config) * batch
    return 3 * fwd if kind in TRAIN_KINDS else fwd


# ----------------------------------------------------------------------------- specs

def parse_mode(mode: str) -> tuple[str, str, str]:
    """'jax-train-bf16' -> ('jax', 'train', 'bf16'); 'torch-train-compile' -> (torch, train, compile)."""
    parts = mode.split("-")
    if len(parts) != 3 or parts[0] not in ("jax", "torch"):
        raise ValueError(f"mode {mode!r}: expected impl-kind-precision, e.g. jax-train-bf16")
    impl, kind, prec = parts
    kinds = {"jax": ("train", "pcgrad", "pcgradfeat", "eval", "predict", "lstm"), "torch": ("train", "eval")}[impl]
    precs = ("fp32", "tf32", "bf16") + (("compile",) if impl == "torch" else ())
    if kind not in kinds or prec not in precs:
        raise ValueError(f"mode {mode!r}: {impl} kinds {kinds}, precisions {precs}")
    return impl, kind, prec


def compute_precision(prec: str) -> str:
    """The arithmetic the MFU peak is taken for."""
    return "bf16" if prec in ("bf16", "compile") else prec


def model_config(smoke: bool, prec: str, overrides: dict[str, Any] | None = None):
    from mtjax.config import ModelConfig, tiny_model_config

    dtype = "bfloat16" if prec == "bf16" else "float32"
    overrides = dict(overrides or {})
    if smoke:  # smaller still than the test config: the smoke run is about the harness
        cfg = tiny_model_config(dtype=dtype, lstm_layers=1)
        cfg = cfg.replace(bert=dataclasses.replace(cfg.bert, num_hidden_layers=1))
    else:
        cfg = ModelConfig(dtype=dtype)
    if "bert" in overrides:
        overrides["bert"] = dataclasses.replace(cfg.bert, **overrides["bert"])
    return cfg.replace(**overrides)


def random_batch(config, batch: int, seed: int):
    """Numpy batch in the ARCHITECTURE layout: left-padded text, right-padded features,
    random labels, every clip counted for every task."""
    import numpy as np

    c = config
    rng = np.random.default_rng(seed)
    text = np.zeros((batch, c.text_len), np.int32)
    text_mask = np.zeros((batch, c.text_len), np.float32)
    video_mask = np.zeros((batch, c.video_len), np.float32)
    audio_mask = np.zeros((batch, c.audio_len), np.float32)
    for i in range(batch):
        n = int(rng.integers(2, c.text_len + 1))
        text[i, -n:] = rng.integers(1, c.bert.vocab_size, n)
        text_mask[i, -n:] = 1
        video_mask[i, :int(rng.integers(1, c.video_len + 1))] = 1
        audio_mask[i, :int(rng.integers(1, c.audio_len + 1))] = 1
    video = (rng.standard_normal((batch, c.video_len, c.video_dim)) * video_mask[..., None]).astype(np.float32)
    audio = (rng.standard_normal((batch, c.audio_len, c.audio_dim)) * audio_mask[..., None]).astype(np.float32)
    cls = rng.integers(0, 2, size=(len(c.tasks), batch))
    return dict(text=text, text_mask=text_mask, video=video, video_mask=video_mask, audio=audio,
                audio_mask=audio_mask,
                labels={t: np.eye(2, dtype=np.float32)[cls[k]] for k, t in enumerate(c.tasks)},
                label_mask={t: np.ones(batch, np.float32) for t in c.tasks},
                example_mask=np.ones(batch, np.float32))


def random_dataset(config, clips: int, seed: int):
    """An in-memory `ClipDataset` of `random_batch` clips, for `mtjax.predict.predict_dataset`."""
    import numpy as np

    from mtjax.data import ClipDataset

    no = np.zeros(clips, bool)
    return ClipDataset(clips=[f"clip{i}" for i in range(clips)], imdb_ids=[f"tt{i:07d}_1" for i in range(clips)],
                       ids=np.arange(clips), arrays=random_batch(config, clips, seed), tasks=config.tasks,
                       video_missing=no, audio_missing=no, rgb_flow_mismatch=no, empty_features=no)


# Steps dispatched back to back per timed sample (`--steps-per-sample`).
STEPS_PER_SAMPLE = 5


def median_time(dispatch, sync, warmup: int, samples: int, per_sample: int = 1) -> tuple[float, list[float]]:
    """Median seconds per step. `dispatch()` queues one step, `sync()` waits for the last one;
    a sample is `per_sample` dispatches then one sync."""
    for _ in range(warmup):
        dispatch()
        sync()
    times = []
    for _ in range(samples):
        t0 = time.perf_counter()
        for _ in range(per_sample):
            dispatch()
        sync()
        times.append((time.perf_counter() - t0) / per_sample)
    return statistics.median(times), times


def time_forward_and_grad(fn, make_args, argnums, samples: int) -> tuple[float, float]:
    """(ms forward, ms forward + backward) of the jitted `fn(*make_args())` (a kernel bench:
    `make_args` may give fresh arguments per call, e.g. a new dropout key), each call waited for."""
    import jax

    fwd = jax.jit(fn)
    grad = _jitted_grad_of_sum(fn, argnums)
    ms_fwd, _ = median_time(lambda: jax.block_until_ready(fwd(*make_args())), lambda: None, 3, samples)
    ms_bwd, _ = median_time(lambda: jax.block_until_ready(grad(*make_args())), lambda: None, 3, samples)
    return ms_fwd * 1e3, ms_bwd * 1e3


def _jitted_grad_of_sum(fn, argnums):
    """jit(grad of fn's float32 sum): a kernel bench's forward + backward."""
    import jax
    import jax.numpy as jnp

    return jax.jit(jax.grad(lambda *a: fn(*a).astype(jnp.float32).sum(), argnums=argnums))


def profiled_kernel_ms(fn, args, argnums, calls: int) -> dict[str, float]:
    """GPU time per call (ms) of each kernel of `fn`'s jitted forward + backward, by name, from
    a profile of `calls` calls (`profile_steps`): a kernel's own time, without the launch and
    dispatch that a call's wall time carries."""
    import tempfile

    import jax

    grad = _jitted_grad_of_sum(fn, argnums)
    last = {"out": jax.block_until_ready(grad(*args))}

    def one():
        last["out"] = grad(*args)

    profile = profile_steps(one, lambda: jax.block_until_ready(last["out"]), tempfile.mkdtemp(), calls)
    return {name: ms for name, ms, _ in profile.get("top", [])}


def kernel_row(name: str, setting: str, timed) -> tuple[str, str, float, float]:
    """(name, setting, ms forward, ms forward + backward) of `timed()`; a setting the kernel
    compiler rejects (e.g. too much shared memory) becomes a NaN row that says so."""
    try:
        return (name, setting, *timed())
    except Exception as e:
        return (name, f"{setting} failed: {type(e).__name__}", math.nan, math.nan)


def kernel_bench_parser(module: str, doc: str):
    """The argument parser of a kernel bench (`python -m mtjax.<module>`), with its `--steps`."""
    p = argparse.ArgumentParser(prog=f"python -m mtjax.{module}", description=doc.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=20, help="timed calls per setting")
    return p


def on_gpu(module: str) -> bool:
    """Whether a kernel bench can run here; says why not (the kernels are Triton: GPUs only)."""
    import jax

    if jax.default_backend() == "gpu":
        return True
    print(f"mtjax.{module}: needs a GPU (the kernels are Triton)", file=sys.stderr)
    return False


def print_kernel_table(setting_header: str, rows) -> None:
    print(f"\n| path | {setting_header} | ms fwd | ms fwd+bwd |\n|---|---|---|---|")
    for name, setting, f_ms, b_ms in rows:
        print(f"| {name} | {setting} | {f_ms:.3f} | {b_ms:.3f} |")


def steps_per_sample(spec: dict[str, Any]) -> int:
    return spec.get("steps_per_sample") or STEPS_PER_SAMPLE


def timed_first_call(fn, *args):
    """(result, seconds) of the first call: tracing, compilation and one run."""
    import jax

    t0 = time.perf_counter()
    out = jax.block_until_ready(fn(*args))
    return out, time.perf_counter() - t0


# ----------------------------------------------------------------------------- JAX worker

def run_jax(spec: dict[str, Any]) -> dict[str, Any]:
    import jax
    import jax.numpy as jnp
    import numpy as np

    if spec.get("prng"):
        jax.config.update("jax_default_prng_impl", spec["prng"])
    from mtjax.models.hiccap import MODEL_INPUTS
    from mtjax.mtl.registry import make_aggregator, make_weighting
    from mtjax.train_step import init_train_state, make_eval_step, make_optimizer, make_train_step

    _, kind, prec = parse_mode(spec["mode"])
    cfg = model_config(spec["smoke"], prec, spec.get("model"))
    B = spec["batch"]
    matmul_prec = {"fp32": "highest", "tf32": "tensorfloat32", "bf16": None}[prec]
    device = jax.devices()[0]
    phases: dict[str, float] = {}
    batches_per_call = 1  # batches one timed call runs (predict times a stream)
    per_sample = steps_per_sample(spec)
    t_phase = time.perf_counter()
    extra: dict[str, Any] = {"phases_s": phases}

    import contextlib
    ctx = jax.default_matmul_precision(matmul_prec) if matmul_prec else contextlib.nullcontext()

    if kind == "lstm":
        return run_jax_lstm(spec, cfg, ctx, device)
    variables = random_variables(cfg, seed=0)
    host_batch = random_batch(cfg, B, seed=1)
    phases["init"] = time.perf_counter() - t_phase

    if kind in TRAIN_KINDS:
        opt = make_optimizer("adam", lr=1.5e-5, mu_dtype=spec.get("mu_dtype"))
        weighting = make_weighting("predefined", weights=MULTITASK_WEIGHTS)
        aggregator = make_aggregator("pcgrad", num_tasks=len(cfg.tasks)) if kind in PER_TASK_KINDS else None
        # One compiled program instead of hundreds of eager ops (each a small compile on a GPU).
        pack = bool(spec.get("pack_small_arrays"))
        state = jax.jit(lambda v, k: init_train_state(v, opt, weighting, aggregator, num_tasks=len(cfg.tasks),
                                                      rng=k, pack_small_arrays=pack))(variables, jax.random.PRNGKey(1))
        del variables
        phases["state"] = time.perf_counter() - t_phase
        step_fn = make_train_step(cfg, opt, weighting, aggregator,
                                  aggregate_on=PER_TASK_KINDS.get(kind, "parameters"), pack_small_arrays=pack)
        mask = jnp.ones(len(cfg.tasks), jnp.float32)
        n_devices = spec.get("devices") or 1
        if n_devices > 1:
            step, state, batch, extra["parallel"] = data_parallel_setup(step_fn, state, host_batch, mask, n_devices)
        else:
            step = jax.jit(step_fn, donate_argnums=0)
            batch = jax.device_put(host_batch)
        with ctx:
            lowered = step.lower(state, batch, mask)
            (state, metrics), compile_s = timed_first_call(step, state, batch, mask)
        holder = {"state": state, "loss": metrics["loss"]}

        def one():
            with ctx:
                holder["state"], metrics = step(holder["state"], batch, mask)
            holder["loss"] = metrics["loss"]

        def sync():
            holder["loss"].block_until_ready()

        med, times = median_time(one, sync, spec["warmup"], spec["steps"], per_sample)
        extra["loss"] = float(holder["loss"])
        if not math.isfinite(extra["loss"]):
            raise FloatingPointError(f"non-finite loss {extra['loss']}")
    elif kind == "eval":
        step = jax.jit(make_eval_step(cfg))
        batch = jax.device_put({k: host_batch[k] for k in MODEL_INPUTS})
        params, stats = variables["params"], variables["batch_stats"]
        with ctx:
            lowered = step.lower(params, stats, batch)
            out, compile_s = timed_first_call(step, params, stats, batch)
        holder = {"out": out}

        def one():
            with ctx:
                holder["out"] = step(params, stats, batch)

        def sync():
            jax.block_until_ready(holder["out"])

        med, times = median_time(one, sync, spec["warmup"], spec["steps"], per_sample)
    else:  # predict: `predict_dataset` itself over a stream of host batches, as mtjax.predict runs
        from mtjax.predict import host_batches, make_eval_fn, predict_dataset

        dataset = random_dataset(cfg, PREDICT_STREAM_BATCHES * B, seed=1)
        _, first_inputs = next(host_batches(cfg, dataset, B))  # what the compiled forward is fed
        eval_fn = make_eval_fn(cfg)
        with ctx:
            lowered = eval_fn.lower(variables, first_inputs)
            compile_s = timed_first_call(eval_fn, variables, first_inputs)[1]
        batches_per_call = PREDICT_STREAM_BATCHES

        def one():
            with ctx:
                for _, probs in predict_dataset(cfg, variables, dataset, B, eval_fn=eval_fn):
                    assert np.all(np.isfinite(probs[cfg.tasks[0]]))

        def sync():  # the stream has fetched every result: nothing left to wait for
            pass

        med, times = median_time(one, sync, spec["warmup"], spec["steps"])
        # Pipelined batches overlap: the time per batch is the stream's time over its length.
        med, times = med / batches_per_call, [t / batches_per_call for t in times]

    if spec.get("profile"):
        extra["profile"] = profile_steps(one, sync, spec["profile"], steps=3, batches_per_call=batches_per_call)
    try:  # not every backend/version reports it
        extra["xla_flops"] = float(lowered.cost_analysis()["flops"])
    except Exception as e:
        extra["xla_flops_error"] = f"{type(e).__name__}: {str(e)[:200]}"
    phases["total"] = time.perf_counter() - t_phase
    # The busiest device's peak (several only in data-parallel runs).
    peaks = [(d.memory_stats() or {}).get("peak_bytes_in_use") for d in jax.local_devices()]
    stats = {"peak_bytes_in_use": max(peaks)} if all(p is not None for p in peaks) else {}
    return dict(device=f"{device.platform}:{device.device_kind}", ms=med * 1e3,
                times_ms=[t * 1e3 for t in times], compile_s=compile_s,
                peak_bytes=stats.get("peak_bytes_in_use"), config=cfg.to_dict(), **extra)


def data_parallel_setup(step_fn, state, host_batch, mask, n_devices: int):
    """The train step over `n_devices` (mtjax.parallel: batch split, state replicated), and
    a check that one step on the mesh equals one step on a single device on the same global
    batch (losses and parameters), before the timed steps start.

    Returns (jitted step, sharded state, sharded batch, check record)."""
    import jax
    import numpy as np

    from mtjax.parallel import ParallelConfig, make_mesh, parallel_train_step, shard_batch, state_shardings

    if jax.device_count() < n_devices:
        raise RuntimeError(f"--devices {n_devices}: only {jax.device_count()} device(s) visible")
    batch_size = len(host_batch["text"])
    if batch_size % n_devices:
        raise ValueError(f"batch {batch_size} is not divisible by {n_devices} devices")
    # The single-device reference step runs first, on a copy (the steps donate their state).
    single = jax.jit(step_fn)
    ref_state, ref_metrics = single(jax.tree_util.tree_map(lambda x: x.copy(), state),
                                    jax.device_put(host_batch), mask)
    ref_params = jax.device_get(ref_state.params)
    ref_loss, ref_norm = float(ref_metrics["loss"]), float(ref_metrics["grad_norm"])
    del ref_state, single

    pcfg = ParallelConfig(enabled=True)
    mesh = make_mesh(pcfg, jax.devices()[:n_devices])
    shardings = state_shardings(state, mesh, pcfg)
    state = jax.device_put(state, shardings)
    step = parallel_train_step(step_fn, mesh, shardings, pcfg)
    batch = shard_batch(host_batch, mesh, pcfg)
    state, metrics = step(state, batch, mask)
    got = jax.device_get(state.params)
    diffs = jax.tree_util.tree_leaves(jax.tree_util.tree_map(
        lambda a, b: float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64)))), got, ref_params))
    check = {"devices": n_devices, "per_device_batch": batch_size // n_devices,
             "single_device_loss": ref_loss, "mesh_loss": float(metrics["loss"]),
             "single_device_grad_norm": ref_norm, "mesh_grad_norm": float(metrics["grad_norm"]),
             # Adam moves even a parameter whose gradient is round-off by ~lr: this bounds
             # the update difference, the gradient norms show the gradients agree.
             "max_abs_param_diff": max(diffs)}
    return step, state, batch, check


def random_variables(config, seed: int):
    """Random weights of the model's shapes, drawn on the host with numpy.

    `init_variables` compiles the whole forward pass only to learn the shapes (and a
    jitted per-leaf initialiser still took ~40 s to compile on the GPU machine); here
    `eval_shape` gives them and numpy draws every leaf: Dense kernels N(0, 1/fan_in),
    embeddings N(0, 0.02²), LayerNorm/BatchNorm scale 1 and bias 0, LSTM weights U(±1/√H)
    as PyTorch, pooling `v` U[0, 1), BatchNorm running stats 0/1."""
    import jax
    import numpy as np

    from mtjax.models.hiccap import HICCAP, dummy_batch

    shapes = jax.eval_shape(lambda k: HICCAP(config).init(k, dummy_batch(config), train=False),
                            jax.random.PRNGKey(0))
    bound = 1.0 / math.sqrt(config.lstm_hidden)
    rng = np.random.default_rng(seed)

    def make(path, sds):
        name = str(getattr(path[-1], "key", path[-1]))
        shape = sds.shape
        if name in ("scale", "var"):
            x = np.ones(shape)
        elif name in ("bias", "mean"):
            x = np.zeros(shape)
        elif name == "v":
            x = rng.random(shape)
        elif name == "embedding":
            x = 0.02 * rng.standard_normal(shape, np.float32)
        elif name.startswith(("weight_", "bias_")):
            x = rng.uniform(-bound, bound, shape)
        else:
            x = rng.standard_normal(shape, np.float32) / math.sqrt(shape[-2])
        return jax.device_put(np.asarray(x, sds.dtype))

    return jax.tree_util.tree_map_with_path(make, shapes)


def run_jax_lstm(spec, cfg, ctx, device) -> dict[str, Any]:
    """Both BiLSTMs alone, forward + backward at the model's shapes (a component timing)."""
    import jax
    import jax.numpy as jnp

    from mtjax.models.lstm import BiLSTM

    dt = jnp.dtype(cfg.dtype)
    B = spec["batch"]
    vid, aud = (BiLSTM(cfg.lstm_hidden, cfg.lstm_layers, dt, cfg.lstm_impl) for _ in range(2))
    xv = jax.random.normal(jax.random.PRNGKey(1), (B, cfg.video_len, cfg.video_dim))
    xa = jax.random.normal(jax.random.PRNGKey(2), (B, cfg.audio_len, cfg.audio_dim))
    params = (vid.init(jax.random.PRNGKey(3), xv), aud.init(jax.random.PRNGKey(4), xa))

    def loss(p):
        return (jnp.mean(jnp.square(vid.apply(p[0], xv).astype(jnp.float32)))
                + jnp.mean(jnp.square(aud.apply(p[1], xa).astype(jnp.float32))))

    step = jax.jit(jax.value_and_grad(loss))
    with ctx:
        out, compile_s = timed_first_call(step, params)
    holder = {"out": out}

    def one():
        with ctx:
            holder["out"] = step(params)

    def sync():
        jax.block_until_ready(holder["out"])

    med, times = median_time(one, sync, spec["warmup"], spec["steps"], steps_per_sample(spec))
    extra = {}
    if spec.get("profile"):
        extra["profile"] = profile_steps(one, sync, spec["profile"], steps=3)
    stats = device.memory_stats() or {}
    return dict(device=f"{device.platform}:{device.device_kind}", ms=med * 1e3,
                times_ms=[t * 1e3 for t in times], compile_s=compile_s,
                peak_bytes=stats.get("peak_bytes_in_use"), **extra)


def profile_steps(one, sync, log_dir: str, steps: int, batches_per_call: int = 1) -> dict[str, Any]:
    """Runs `steps` more calls of `one`, back to back, then `sync`, under the JAX profiler and
    summarises the GPU kernels per batch (a call runs `batches_per_call` batches)."""
    import glob

    import jax

    with jax.profiler.trace(log_dir, create_perfetto_trace=True):
        for _ in range(steps):
            one()
        sync()
    traces = sorted(glob.glob(os.path.join(log_dir, "**", "perfetto_trace.json.gz"), recursive=True))
    return summarize_trace(traces[-1], steps * batches_per_call) if traces else {"error": "no perfetto trace written"}


def kernel_category(name: str) -> str:
    n = name.lower()
    if any(k in n for k in ("fmha", "flash", "cudnn", "sdpa")):
        return "fused attention"
    if any(k in n for k in ("gemm", "xmma", "cutlass", "nvjet", "cublas", "gemv", "sm90_")):
        return "matmul"
    if "memcpy" in n or "memset" in n:
        return "copy"
    if any(k in n for k in ("rng", "threefry", "random")):
        return "rng"
    return "other (fusions)"


def summarize_trace(path: str, steps: int) -> dict[str, Any]:
    """Per-step GPU time by kernel name and category from a perfetto trace (µs → ms)."""
    import gzip
    from collections import defaultdict

    with gzip.open(path, "rt") as fh:
        events = json.load(fh)
    events = events.get("traceEvents", events) if isinstance(events, dict) else events
    gpu_pids = {e["pid"] for e in events if e.get("ph") == "M" and e.get("name") == "process_name"
                and "gpu" in str(e.get("args", {}).get("name", "")).lower()}
    # The device process also carries derived lines ("XLA Ops", "XLA Modules") over the same
    # time: count the CUDA stream lines only, where the profiler names them.
    threads = {(e["pid"], e.get("tid")): str(e.get("args", {}).get("name", "")) for e in events
               if e.get("ph") == "M" and e.get("name") == "thread_name" and e.get("pid") in gpu_pids}
    streams = {k for k, v in threads.items() if "stream" in v.lower()}
    by_name: dict[str, list[float]] = defaultdict(lambda: [0.0, 0])
    by_cat: dict[str, float] = defaultdict(float)
    start, end = math.inf, -math.inf
    for e in events:
        if e.get("ph") != "X" or e.get("pid") not in gpu_pids:
            continue
        if streams and (e["pid"], e.get("tid")) not in streams:
            continue
        dur = float(e.get("dur", 0.0))
        by_name[e["name"]][0] += dur
        by_name[e["name"]][1] += 1
        by_cat[kernel_category(e["name"])] += dur
        start, end = min(start, float(e["ts"])), max(end, float(e["ts"]) + dur)
    busy = sum(v[0] for v in by_name.values())
    top = sorted(by_name.items(), key=lambda kv: -kv[1][0])[:25]
    return {"busy_ms_per_step": busy / 1e3 / steps,
            "span_ms_per_step": (end - start) / 1e3 / steps if busy else 0.0,
            "kernels_per_step": sum(v[1] for v in by_name.values()) / steps,
            "by_category_ms": {k: v / 1e3 / steps for k, v in sorted(by_cat.items(), key=lambda kv: -kv[1])},
            "top": [(name[:90], t / 1e3 / steps, n / steps) for name, (t, n) in top],
            "lines": sorted(set(threads.values()))[:20]}


def format_profile(rec: dict[str, Any]) -> str:
    prof = rec.get("profile") or {}
    if "top" not in prof:
        return f"profile: {prof.get('error', 'none')}"
    lines = [f"profile {rec['mode']} b{rec['batch']}: GPU busy {prof['busy_ms_per_step']:.1f} ms/step over a "
             f"{prof['span_ms_per_step']:.1f} ms span, {prof['kernels_per_step']:.0f} kernels/step; "
             + ", ".join(f"{k} {v:.1f}" for k, v in prof["by_category_ms"].items())]
    lines += [f"  {t:7.2f} ms {n:6.0f}x  {name}" for name, t, n in prof["top"]]
    return "\n".join(lines)


# ----------------------------------------------------------------------------- torch worker

def run_torch(spec: dict[str, Any]) -> dict[str, Any]:
    import contextlib

    import torch

    from convert.reference import build_reference, multitask_original_loss

    _, kind, prec = parse_mode(spec["mode"])
    cfg = model_config(spec["smoke"], "fp32", spec.get("model"))
    B = spec["batch"]
    cuda = torch.cuda.is_available()
    dev = torch.device("cuda" if cuda else "cpu")
    tf32 = prec in ("tf32",)
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = tf32
        torch.backends.cudnn.allow_tf32 = tf32
    use_autocast = prec in ("bf16", "compile")
    autocast = (lambda: torch.autocast(device_type=dev.type, dtype=torch.bfloat16)) if use_autocast \
        else contextlib.nullcontext

    model = build_reference(cfg, seed=0).to(dev)
    model.train(kind == "train")
    fwd = torch.compile(model) if prec == "compile" else model
    hb = random_batch(cfg, B, seed=1)
    inputs = [torch.from_numpy(hb[k]).to(dev) for k in
              ("text", "text_mask", "video", "video_mask", "audio", "audio_mask")]
    labels = {t: torch.from_numpy(hb["labels"][t]).to(dev) for t in cfg.tasks}
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    holder = {}

    if kind == "train":
        opt = torch.optim.Adam(model.parameters(), lr=1.5e-5)

        def one():
            opt.zero_grad(set_to_none=True)
            with autocast():
                probs = fwd(*inputs)
            # F.binary_cross_entropy refuses autocast: the loss runs in fp32 outside it.
            loss = multitask_original_loss({t: p.float() for t, p in probs.items()}, labels)
            loss.backward()
            opt.step()
            holder["loss"] = loss.detach()
    else:
        def one():
            with torch.no_grad(), autocast():
                probs = fwd(*inputs)
            holder["probs"] = probs

    warmup = spec["warmup"] + (3 if prec == "compile" else 0)  # compile happens in the first calls
    t0 = time.perf_counter()
    one()
    sync()
    compile_s = time.perf_counter() - t0
    med, times = median_time(one, sync, max(warmup - 1, 0), spec["steps"], steps_per_sample(spec))
    extra = {}
    if "loss" in holder:
        extra["loss"] = float(holder["loss"])
        if not math.isfinite(extra["loss"]):
            raise FloatingPointError(f"non-finite loss {extra['loss']}")
    name = torch.cuda.get_device_name() if cuda else "cpu"
    return dict(device=f"{dev.type}:{name}", ms=med * 1e3, times_ms=[t * 1e3 for t in times],
                compile_s=compile_s, peak_bytes=torch.cuda.max_memory_allocated() if cuda else None,
                **extra)


def apply_module_settings(settings: dict[str, Any]) -> None:
    """`{"lstm.SCAN_UNROLL": 4}` sets `mtjax.models.lstm.SCAN_UNROLL = 4` (A/B switches); a
    key starting with `mtjax.` names its module in full (`mtjax.train_step.ATTR`)."""
    import importlib

    for key, value in (settings or {}).items():
        mod, _, attr = key.rpartition(".")
        mod = mod if mod.startswith("mtjax.") else f"mtjax.models.{mod}"
        module = importlib.import_module(mod)
        if not hasattr(module, attr):
            raise AttributeError(f"--set {key}: {mod} has no {attr}")
        setattr(module, attr, value)


def run_spec(spec: dict[str, Any]) -> dict[str, Any]:
    impl, kind, prec = parse_mode(spec["mode"])
    apply_module_settings(spec.get("set"))
    record = {"mode": spec["mode"], "impl": impl, "kind": kind, "precision": prec, "batch": spec["batch"],
              "smoke": spec["smoke"], "model": {**(spec.get("model") or {}), **(spec.get("set") or {})},
              "prng": spec.get("prng"), "devices": spec.get("devices"),
              "xla_flags": os.environ.get("XLA_FLAGS"),
              "steps_per_sample": steps_per_sample(spec), "pack_small_arrays": bool(spec.get("pack_small_arrays")),
              "mu_dtype": spec.get("mu_dtype") or "float32"}
    try:
        out = run_jax(spec) if impl == "jax" else run_torch(spec)
    except Exception as e:  # one failed config (OOM, torch.compile) must not sink the table
        record["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"
        return record
    record.update(out)
    cfg = model_config(spec["smoke"], prec, spec.get("model"))
    flops = step_flops(cfg, kind, spec["batch"])
    record["model_flops"] = flops
    record["clips_per_s"] = spec["batch"] / (record["ms"] / 1e3)
    # The peaks are the H100's: on a CPU the figure would mean nothing.
    on_gpu = not str(record.get("device", "")).startswith("cpu")
    n_devices = spec.get("devices") or 1  # the peak of every device the step ran on
    record["mfu"] = (flops / (record["ms"] / 1e3) / (n_devices * PEAK_FLOPS[compute_precision(prec)])
                     if on_gpu and flops else None)
    return record


# ----------------------------------------------------------------------------- table

def _find(records, **match):
    for r in records:
        if "error" not in r and all(r.get(k) == v for k, v in match.items()):
            return r
    return None


def table_rows(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per record, with the JAX/PyTorch ratio (same kind, precision and batch;
    eager PyTorch; predict is compared with PyTorch eval) and the per-task-gradient
    step's cost relative to the single-loss JAX step."""
    rows = []
    for r in records:
        row = {"impl": r["impl"], "mode": r["mode"], "batch": r["batch"], "ms": r.get("ms"),
               "clips_per_s": r.get("clips_per_s"), "peak_gb": (r["peak_bytes"] / 1e9 if r.get("peak_bytes")
                                                                else None),
               "mfu": r.get("mfu"), "ratio": None, "note": r.get("error", "")}
        if r["impl"] == "jax" and "error" not in r:
            kind = {"pcgrad": "train", "pcgradfeat": "train", "predict": "eval"}.get(r["kind"], r["kind"])
            n = r.get("devices") or 1
            ref = _find(records, impl="torch", kind=kind, precision=r["precision"], batch=r["batch"])
            # The PyTorch research code's per-task step is not benchmarked; PyTorch runs on one GPU.
            if ref and r["kind"] not in PER_TASK_KINDS and n == 1:
                row["ratio"] = r["clips_per_s"] / ref["clips_per_s"]
            notes = []
            if r["kind"] in PER_TASK_KINDS:
                single = _find(records, impl="jax", kind="train", precision=r["precision"],
                               batch=r["batch"], model=r["model"], run=r.get("run"), devices=r.get("devices"))
                notes.append(f"PCGrad on {PER_TASK_KINDS[r['kind']]}")
                if single:
                    notes.append(f"{r['ms'] / single['ms']:.2f}x the single-loss step's time")
            if n > 1:
                notes.append(f"{n} devices, {r['batch'] // n} per device")
                one = _find(records, impl="jax", kind=r["kind"], precision=r["precision"], batch=r["batch"] // n,
                            model=r["model"], run=r.get("run"), devices=None)
                if one:
                    notes.append(f"{r['clips_per_s'] / one['clips_per_s']:.2f}x one device's clips/s")
                check = r.get("parallel") or {}
                if check:
                    norm_rel = abs(check["mesh_grad_norm"] / check["single_device_grad_norm"] - 1)
                    notes.append(f"vs one device on the same batch: loss {check['mesh_loss']:.6f} / "
                                 f"{check['single_device_loss']:.6f}, grad norm rel. diff {norm_rel:.1e}, "
                                 f"params after one step max |diff| {check['max_abs_param_diff']:.1e}")
            if r["kind"] == "train" and r["precision"] == "bf16":
                compiled = _find(records, impl="torch", kind="train", precision="compile", batch=r["batch"])
                if compiled:
                    notes.append(f"{r['clips_per_s'] / compiled['clips_per_s']:.2f}x torch.compile")
            notes += [f"{k}={v}" for k, v in _flat(r.get("model") or {}).items()]
            if r.get("pack_small_arrays"):
                notes.append("optim.pack_small_arrays")
            if r.get("mu_dtype", "float32") != "float32":
                notes.append(f"optim.mu_dtype={r['mu_dtype']}")
            row["note"] = "; ".join(notes)
        if r.get("run"):  # merged tables: which device call the row came from
            row["note"] = "; ".join(x for x in (f"run {r['run']}", row["note"]) if x)
        rows.append(row)
    return rows


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        out.update(_flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


def format_table(records: list[dict[str, Any]]) -> str:
    def f(x, fmt):
        return "-" if x is None else format(x, fmt)

    lines = ["| impl | mode | batch | ms/step | clips/s | peak GB | MFU | JAX/PyTorch | note |",
             "|---|---|---:|---:|---:|---:|---:|---:|---|"]
    for row in table_rows(records):
        lines.append(f"| {row['impl']} | {row['mode']} | {row['batch']} | {f(row['ms'], '.1f')} | "
                     f"{f(row['clips_per_s'], '.0f')} | {f(row['peak_gb'], '.2f')} | "
                     f"{f(None if row['mfu'] is None else 100 * row['mfu'], '.1f')}{'%' if row['mfu'] else ''} | "
                     f"{f(row['ratio'], '.2f')} | {row['note']} |")
    devices = sorted({r["device"] for r in records if r.get("device")})
    return "\n".join(lines) + f"\n\ndevice(s): {', '.join(devices) or 'none'}"


# ----------------------------------------------------------------------------- driver

def _worker_cmd(spec):
    return [sys.executable, "-m", "mtjax.bench", "--worker", json.dumps(spec)]


def run_fresh(spec: dict[str, Any], timeout: float) -> dict[str, Any]:
    """Runs one config in its own process; its last output line is the JSON record."""
    try:
        proc = subprocess.run(_worker_cmd(spec), capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {**_stub(spec), "error": f"timed out after {timeout:.0f}s"}
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith("BENCH_RESULT "):
            return json.loads(line[len("BENCH_RESULT "):])
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
    return {**_stub(spec), "error": f"worker exit {proc.returncode}: {tail[0][:300]}"}


def _stub(spec):
    impl, kind, prec = parse_mode(spec["mode"])
    return {"mode": spec["mode"], "impl": impl, "kind": kind, "precision": prec, "batch": spec["batch"],
            "smoke": spec["smoke"], "model": spec.get("model") or {}}


def build_plan(modes: list[str] | None, batch_sizes: list[int] | None,
               smoke: bool) -> list[tuple[str, int, dict]]:
    """(mode, batch, model overrides) triples: the default plan, or modes x batch sizes."""
    if smoke:
        return [(m, b, {}) for m in (modes or SMOKE_MODES) for b in (batch_sizes or SMOKE_BATCHES)]
    if modes is None and batch_sizes is None:
        return list(DEFAULT_PLAN)
    if modes is None:
        modes = list(dict.fromkeys(m for m, _, _ in DEFAULT_PLAN))
    if batch_sizes is None:
        return [p for p in DEFAULT_PLAN if p[0] in modes] or [(m, 16, {}) for m in modes]
    return [(m, b, {}) for m in modes for b in batch_sizes]


def _merge(base: dict, extra: dict) -> dict:
    out = {**base}
    for k, v in extra.items():
        out[k] = {**out.get(k, {}), **v} if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _parse_overrides(items: list[str], nest_bert: bool = True) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for item in items:
        key, _, value = item.partition("=")
        try:
            parsed = json.loads(value)
        except json.JSONDecodeError:
            parsed = value
        if nest_bert and key.startswith("bert."):
            out.setdefault("bert", {})[key[5:]] = parsed
        else:
            out[key] = parsed
    return out


def main(argv: list[str] | None = None) -> int:
    from mtjax.experiment import OptimSection

    p = argparse.ArgumentParser(prog="python -m mtjax.bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--batch-sizes", help="comma-separated; with --modes, every mode at every size")
    p.add_argument("--modes", help="comma-separated modes (see the module docstring)")
    p.add_argument("--steps", type=int, default=None, help="timed samples per config (median reported)")
    p.add_argument("--steps-per-sample", type=int, default=STEPS_PER_SAMPLE,
                   help="steps dispatched back to back per timed sample (1: wait for every step)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--out", help="write the Markdown table here")
    p.add_argument("--json", help="append the raw records (JSON lines) here")
    p.add_argument("--cpu-smoke", action="store_true", help="tiny config on the CPU, in-process, seconds")
    p.add_argument("--in-process", action="store_true",
                   help="run every config in this process (JAX peak memory then accumulates)")
    p.add_argument("--model", action="append", default=[], metavar="KEY=VALUE",
                   help="ModelConfig override for every config (e.g. attention_impl=cudnn, bert.attention_probs_dropout_prob=0)")
    p.add_argument("--prng", help="jax_default_prng_impl for the JAX configs (e.g. rbg)")
    p.add_argument("--set", action="append", default=[], metavar="MODULE.ATTR=VALUE",
                   help="module switch in mtjax.models (or a full mtjax.* module path) for every config (e.g. lstm.SCAN_UNROLL=4)")
    p.add_argument("--pack-small-arrays", action=argparse.BooleanOptionalAction, default=OptimSection().pack_small_arrays,
                   help="JAX train configs: the optimizer over packed small arrays (optim.pack_small_arrays; "
                        "on by default, as in the Trainer)")
    p.add_argument("--optim-mu-dtype", choices=["float32", "bfloat16"], default="float32",
                   help="JAX train configs: the dtype Adam stores its first moment in (optim.mu_dtype)")
    p.add_argument("--timeout", type=float, default=420, help="seconds per fresh-process config")
    p.add_argument("--merge", help="comma-separated JSONL files: print their table, run nothing")
    p.add_argument("--profile", metavar="DIR",
                   help="JAX configs: profile 3 extra steps into DIR and print a GPU kernel summary")
    p.add_argument("--devices", type=int, default=1,
                   help="JAX train configs: data parallel over this many devices (mtjax.parallel); "
                        "--batch-sizes are then GLOBAL batches; one step is first checked against one device")
    p.add_argument("--cache-dir", help="JAX persistent compilation cache (and XLA autotuning cache) shared by "
                                       "the fresh processes: repeated or similar configs compile faster")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    if args.worker:
        print("BENCH_RESULT " + json.dumps(run_spec(json.loads(args.worker))), flush=True)
        return 0
    if args.merge:
        records = [json.loads(line) for path in args.merge.split(",") for line in Path(path).read_text().splitlines()
                   if line.strip()]
        text = format_table(records)
        print(text)
        if args.out:
            Path(args.out).write_text(text + "\n")
        return 0

    smoke = args.cpu_smoke
    if smoke:
        os.environ.setdefault("JAX_PLATFORMS", "cpu")
        # Cheaper CPU compiles (jax is not imported yet in this process): timings of a tiny
        # model on a CPU only check the harness.
        os.environ.setdefault("XLA_FLAGS", "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true")
    elif not os.environ.get("MTJAX_BENCH_ASSUME_GPU") and not _has_gpu():
        print("mtjax.bench: no GPU visible; use --cpu-smoke for the tiny CPU run", file=sys.stderr)
        return 2
    if args.cache_dir:  # read by JAX in every worker (jax_compilation_cache_dir)
        os.environ["JAX_COMPILATION_CACHE_DIR"] = os.path.abspath(args.cache_dir)
    modes = args.modes.split(",") if args.modes else None
    sizes = [int(x) for x in args.batch_sizes.split(",")] if args.batch_sizes else None
    try:
        plan = build_plan(modes, sizes, smoke)
        for m, _, _ in plan:
            parse_mode(m)
    except ValueError as e:
        p.error(str(e))
    steps = args.steps or (2 if smoke else 20)
    warmup = min(args.warmup, 1) if smoke else args.warmup
    overrides = _parse_overrides(args.model)
    records = []
    for mode, batch, plan_overrides in plan:
        spec = {"mode": mode, "batch": batch, "steps": steps, "warmup": warmup, "smoke": smoke,
                "steps_per_sample": args.steps_per_sample, "pack_small_arrays": args.pack_small_arrays,
                "mu_dtype": args.optim_mu_dtype,
                "devices": args.devices if args.devices > 1 and parse_mode(mode)[1] in TRAIN_KINDS else None,
                "model": _merge(plan_overrides, overrides), "prng": args.prng, "set": _parse_overrides(args.set, nest_bert=False),
                "profile": os.path.join(args.profile, f"{mode}-b{batch}") if args.profile else None}
        t0 = time.perf_counter()
        rec = run_spec(spec) if (smoke or args.in_process) else run_fresh(spec, args.timeout)
        rec["wall_s"] = time.perf_counter() - t0
        records.append(rec)
        status = rec.get("error") or (f"{rec['ms']:.1f} ms/step, {rec['clips_per_s']:.0f} clips/s, "
                                      f"compile {rec.get('compile_s', 0):.0f}s, phases "
                                      + " ".join(f"{k} {v:.0f}s" for k, v in rec.get("phases_s", {}).items()))
        print(f"[bench] {mode} batch {batch}: {status} ({rec['wall_s']:.0f}s)", file=sys.stderr, flush=True)
        if rec.get("profile"):
            print(format_profile(rec), file=sys.stderr, flush=True)
        if args.json:
            with open(args.json, "a") as fh:
                fh.write(json.dumps(rec) + "\n")
    text = format_table(records)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    return 0


def _has_gpu() -> bool:
    """Asks a child process, so this (driver) process never claims GPU memory."""
    code = "import jax,sys; sys.exit(0 if jax.devices()[0].platform=='gpu' else 1)"
    try:
        return subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=120).returncode == 0
    except (subprocess.TimeoutExpired, OSError):
        return False


if __name__ == "__main__":
    sys.exit(main())
