"""Reader for HICCAP's original on-disk layout (SPEC §1) -> padded numpy arrays.

Produces the batch format of docs/ARCHITECTURE.md with the original's padding
conventions: text LEFT-padded (tokens at the right end, mask a suffix of ones),
video/audio RIGHT-padded (mask a prefix of ones). Malformed input raises
`DataError` naming the file, the clip (JSON key) and the key at fault.
"""

from __future__ import annotations

import dataclasses
import json
import os
import warnings
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import chex
import numpy as np

from mtjax.config import BINARY_TASK, ModelConfig

MISSING_VIDEO_MODES = ("zeros", "skip")
ARRAY_KEYS = ("text", "text_mask", "video", "video_mask", "audio", "audio_mask")


class DataError(ValueError):
    """Input data that does not follow the original layout or the batch contract."""


class DataWarning(UserWarning):
    """Recoverable data problems (missing feature files, rgb/flow length mismatch)."""


def split_paths(root: str | os.PathLike, split: str) -> tuple[Path, Path, Path]:
    """(split JSON, I3D dir, VGGish dir) in the original repository's layout."""
    root = Path(root)
    return (root / "processed_data" / f"{split}_features_lrec_camera.json",
            root / "i3d_vecs_extended_merged",
            root / "vgg_vecs_extended_merged")


# ----------------------------------------------------------------------------- dataset


@dataclasses.dataclass
class ClipDataset:
    """One split in memory. `arrays` is a batch (ARCHITECTURE.md) with leading axis N.

    Per-clip flags (`video_missing`, ...) travel with `subset`; `skipped_clips` and
    `dropped_negatives` describe what the load dropped and stay as loaded.
    """

    clips: list[str]
    imdb_ids: list[str]
    ids: np.ndarray  # (N,) int64; -1 where the JSON had no `id`
    arrays: dict[str, Any]
    tasks: tuple[str, ...]
    video_missing: np.ndarray  # (N,) bool: no rgb or no flow file -> zeros, mask 0
    audio_missing: np.ndarray  # (N,) bool: no VGGish file -> one zero row
    rgb_flow_mismatch: np.ndarray  # (N,) bool: rgb/flow lengths differed
    empty_features: np.ndarray  # (N,) bool: a feature file with 0 rows
    skipped_clips: list[str] = dataclasses.field(default_factory=list)
    dropped_negatives: int = 0
    source: str | None = None

    def __len__(self) -> int:
        return len(self.clips)

    @property
    def has_labels(self) -> bool:
        return "labels" in self.arrays

    @property
    def missing_counts(self) -> dict[str, int]:
        return {
            "vggish": int(self.audio_missing.sum()),
            "i3d": int(self.video_missing.sum()),
            "i3d_skipped": len(self.skipped_clips),
            "rgb_flow_mismatch": int(self.rgb_flow_mismatch.sum()),
            "empty": int(self.empty_features.sum()),
        }

    def batch(self, indices) -> dict[str, Any]:
        """Numpy batch for the given clip indices (copies; the dataset is not aliased)."""
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        return _index_batch(self.arrays, idx)

    def subset(self, indices) -> "ClipDataset":
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        return dataclasses.replace(
            self,
            clips=[self.clips[i] for i in idx],
            imdb_ids=[self.imdb_ids[i] for i in idx],
            ids=self.ids[idx],
            arrays=_index_batch(self.arrays, idx),
            video_missing=self.video_missing[idx],
            audio_missing=self.audio_missing[idx],
            rgb_flow_mismatch=self.rgb_flow_mismatch[idx],
            empty_features=self.empty_features[idx],
            skipped_clips=list(self.skipped_clips),
        )

    def iter_batches(self, batch_size: int, *, shuffle: bool = False,
                     seed: int | np.random.Generator | None = None,
                     drop_last: bool = False) -> Iterator[tuple[list[str], dict[str, Any]]]:
        """Yields (clip_names, batch). The last partial batch is yielded as is
        (unless drop_last); padding it to a fixed shape is the caller's job.

        An int seed gives the same order on every call; pass a Generator (or a
        per-epoch seed) for a new order each epoch.
        """
        if batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        n = len(self)
        if shuffle:
            if seed is None:
                raise ValueError("iter_batches(shuffle=True) needs a seed (int or np.random.Generator)")
            rng = seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)
            order = rng.permutation(n)
        else:
            order = np.arange(n)
        stop = (n // batch_size) * batch_size if drop_last else n
        for start in range(0, stop, batch_size):
            idx = order[start:start + batch_size]
            yield [self.clips[i] for i in idx], self.batch(idx)


def _index_batch(tree: Mapping[str, Any], idx: np.ndarray) -> dict[str, Any]:
    return {k: (_index_batch(v, idx) if isinstance(v, Mapping) else v[idx]) for k, v in tree.items()}


# ----------------------------------------------------------------------------- JSON side


def _no_duplicate_keys(path: Path):
    def hook(pairs):
        seen = {}
        for k, v in pairs:
            if k in seen:
                raise DataError(f"{path}: duplicate key {k!r} in a JSON object")
            seen[k] = v
        return seen
    return hook


def _read_split_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise FileNotFoundError(f"{path}: split JSON not found")
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f, object_pairs_hook=_no_duplicate_keys(path))
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: not valid JSON ({e})") from None
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text ({e})") from None
    if not isinstance(data, dict):
        raise DataError(f"{path}: expected one JSON object keyed by clip name, "
                        f"got a JSON {type(data).__name__}")
    return data


def _is_int(v) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, bool)


def _is_01(v) -> bool:
    # JSON may carry 0/1 as ints or floats (0.0/1.0); booleans are not labels.
    return isinstance(v, (int, float)) and not isinstance(v, bool) and v in (0, 1)


def _parse_onehot(where: str, key: str, value) -> np.ndarray:
    ok = (isinstance(value, (list, tuple)) and len(value) == 2 and all(_is_01(x) for x in value)
          and value[0] + value[1] == 1)
    if not ok:
        raise DataError(f"{where}: key {key!r} is {value!r}, expected a one-hot pair [1, 0] or [0, 1]")
    return np.asarray(value, dtype=np.float32)


def _binary_label(where: str, rec: Mapping[str, Any]) -> np.ndarray | None:
    """The binary one-hot from `y` and/or `label` (checked to agree), or None if neither."""
    y = _parse_onehot(where, "y", rec["y"]) if "y" in rec else None
    lab = None
    if "label" in rec:
        v = rec["label"]
        if not _is_01(v):
            raise DataError(f"{where}: key 'label' is {v!r}, expected 0 or 1")
        lab = int(v)
    if y is not None and lab is not None and int(y[1]) != lab:
        raise DataError(f"{where}: key 'y' is {rec['y']!r} but key 'label' is {lab!r}; they must agree "
                        f"(y = [1, 0] for label 0, [0, 1] for label 1)")
    if y is not None:
        return y
    if lab is not None:
        return np.asarray([1 - lab, lab], dtype=np.float32)
    return None


def _parse_tokens(where: str, value, vocab_size: int) -> np.ndarray:
    if not isinstance(value, list):
        raise DataError(f"{where}: key 'indexes' is a {type(value).__name__}, expected a list of token ids")
    bad = next((i for i, t in enumerate(value) if not _is_int(t)), None)
    if bad is not None:
        raise DataError(f"{where}: key 'indexes' has {value[bad]!r} at position {bad}, "
                        f"expected integer token ids")
    try:
        ids = np.asarray(value, dtype=np.int64)
    except OverflowError:
        ids = None
    if ids is None or (ids.size and (ids.min() < 0 or ids.max() >= vocab_size)):
        pos = next(i for i, t in enumerate(value) if not 0 <= t < vocab_size)
        raise DataError(f"{where}: key 'indexes' has token id {value[pos]} at position {pos}, "
                        f"expected ids in [0, {vocab_size}) (vocab_size)")
    return ids


def _check_imdb_id(where: str, value) -> str:
    if not isinstance(value, str) or not value:
        raise DataError(f"{where}: key 'IMDBid' is {value!r}, expected a non-empty string")
    # It becomes part of a file path: refuse anything that could leave the feature dir.
    if "/" in value or "\\" in value or value in (".", "..") or "\x00" in value:
        raise DataError(f"{where}: key 'IMDBid' is {value!r}, expected a plain file-name stem")
    return value


# ----------------------------------------------------------------------------- .npy side


def _load_features(clip: str, path: Path, width: int) -> np.ndarray | None:
    """(S, width) float32, or None when the file does not exist."""
    if not path.exists():
        return None
    try:
        arr = np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:
        raise DataError(f"clip {clip!r}: {path} is not a valid .npy file ({e})") from None
    if not isinstance(arr, np.ndarray):  # e.g. an .npz archive under a .npy name
        if hasattr(arr, "close"):
            arr.close()
        raise DataError(f"clip {clip!r}: {path} is not a valid .npy file (got {type(arr).__name__})")
    if arr.ndim != 2 or arr.shape[1] != width:
        raise DataError(f"clip {clip!r}: {path} has shape {arr.shape}, expected (S, {width})")
    if arr.dtype.kind not in "fiu":
        raise DataError(f"clip {clip!r}: {path} has dtype {arr.dtype}, expected a real number dtype")
    with np.errstate(over="ignore"):  # overflow shows up as inf, reported just below
        arr = arr.astype(np.float32, copy=False)
    finite = np.isfinite(arr)
    if not finite.all():
        row = int(np.argwhere(~finite)[0, 0])
        raise DataError(f"clip {clip!r}: {path} has {int((~finite).sum())} non-finite values "
                        f"(NaN/inf as float32), first in row {row}")
    return arr


# ----------------------------------------------------------------------------- main entry


def load_split(data_json: str | os.PathLike, i3d_dir: str | os.PathLike | None,
               vggish_dir: str | os.PathLike | None, *,
               model_config: ModelConfig | None = None, tasks: Sequence[str] | None = None,
               text_len: int | None = None, video_len: int | None = None,
               audio_len: int | None = None, video_dim: int | None = None,
               audio_dim: int | None = None, vocab_size: int | None = None,
               require_labels: bool = True, fine_grained_on_positives: bool = False,
               positives_only: bool = False, missing_video: str = "zeros",
               warn: bool = True) -> ClipDataset:
    """Reads one split of the original layout into a `ClipDataset`.

    Sizes default to `model_config` (ModelConfig() when None); explicit arguments
    override it. `tasks` defaults to `model_config.tasks`. `i3d_dir`/`vggish_dir`
    may be None (every clip then counts as missing that modality).

    missing_video: 'zeros' (zero video, all-zero mask; later training code) or
      'skip' (drop the clip; the original evaluation).
    fine_grained_on_positives: label_mask of non-binary tasks = (label == 1).
    positives_only: drop clips with label 0 (the original multi-task recipe).
    require_labels: False makes label fields optional (predict); a task's labels
      appear if any clip has its field, with label_mask 0 on clips without it.
    """
    cfg = model_config if model_config is not None else ModelConfig()
    text_len = cfg.text_len if text_len is None else int(text_len)
    video_len = cfg.video_len if video_len is None else int(video_len)
    audio_len = cfg.audio_len if audio_len is None else int(audio_len)
    video_dim = cfg.video_dim if video_dim is None else int(video_dim)
    audio_dim = cfg.audio_dim if audio_dim is None else int(audio_dim)
    vocab_size = cfg.bert.vocab_size if vocab_size is None else int(vocab_size)
    tasks = tuple(cfg.tasks if tasks is None else tasks)
    for name, v in (("text_len", text_len), ("video_len", video_len), ("audio_len", audio_len),
                    ("video_dim", video_dim), ("audio_dim", audio_dim), ("vocab_size", vocab_size)):
        if v <= 0:
            raise ValueError(f"{name} must be positive, got {v}")
    if not tasks or len(set(tasks)) != len(tasks):
        raise ValueError(f"tasks must be non-empty and unique, got {list(tasks)}")
    if missing_video not in MISSING_VIDEO_MODES:
        raise ValueError(f"missing_video must be one of {MISSING_VIDEO_MODES}, got {missing_video!r}")

    path = Path(data_json)
    dirs = {}
    for name, d in (("i3d_dir", i3d_dir), ("vggish_dir", vggish_dir)):
        if d is not None and not Path(d).is_dir():
            raise FileNotFoundError(f"{name} {d} is not a directory (pass None if there are no features)")
        dirs[name] = None if d is None else Path(d)
    data = _read_split_json(path)

    # Pass 1: parse and validate the JSON records (cheap), filter label-0 clips.
    records = []  # (clip, imdb, id, tokens, binary_onehot|None, {task: onehot|None})
    dropped_negatives = 0
    for clip, rec in data.items():
        where = f"{path}: clip {clip!r}"
        if not isinstance(rec, dict):
            raise DataError(f"{where}: value is a JSON {type(rec).__name__}, expected an object")
        for key in ("IMDBid", "indexes"):
            if key not in rec:
                raise DataError(f"{where}: missing key {key!r}")
        imdb = _check_imdb_id(where, rec["IMDBid"])
        tokens = _parse_tokens(where, rec["indexes"], vocab_size)
        cid = rec.get("id", -1)
        if not _is_int(cid):
            raise DataError(f"{where}: key 'id' is {cid!r}, expected an integer")
        binary = _binary_label(where, rec)
        task_labels = {}
        for t in tasks:
            if t == BINARY_TASK:
                onehot = binary
                if onehot is None and require_labels:
                    raise DataError(f"{where}: missing label field 'y' (or 'label') for task 'binary'")
            elif t in rec:
                onehot = _parse_onehot(where, t, rec[t])
            elif require_labels:
                raise DataError(f"{where}: missing label field {t!r} for task {t!r}")
            else:
                onehot = None
            task_labels[t] = onehot
        needs_binary = positives_only or (fine_grained_on_positives and require_labels
                                          and any(t != BINARY_TASK for t in tasks))
        if binary is None and needs_binary:
            raise DataError(f"{where}: missing label field 'label' (or 'y'), needed to tell "
                            f"positive clips (positives_only / fine_grained_on_positives)")
        if positives_only and binary[1] != 1:
            dropped_negatives += 1
            continue
        records.append((clip, imdb, int(cid), tokens, binary, task_labels))

    # Pass 2: features. Clips without I3D are dropped here in 'skip' mode.
    kept, videos, audios, skipped = [], [], [], []
    flags = {"video_missing": [], "audio_missing": [], "rgb_flow_mismatch": [], "empty": []}
    for rec in records:
        clip, imdb = rec[0], rec[1]
        rgb = flow = None
        if dirs["i3d_dir"] is not None:
            rgb = _load_features(clip, dirs["i3d_dir"] / f"{imdb}_rgb.npy", video_dim)
            flow = _load_features(clip, dirs["i3d_dir"] / f"{imdb}_flow.npy", video_dim)
        video_missing = rgb is None or flow is None
        if video_missing and missing_video == "skip":
            skipped.append(clip)
            continue
        mismatch = False
        if video_missing:
            video = np.zeros((0, video_dim), np.float32)
        else:
            if rgb.shape[0] != flow.shape[0]:
                mismatch = True
            s = min(rgb.shape[0], flow.shape[0])
            video = rgb[:s] + flow[:s]
        audio = None
        if dirs["vggish_dir"] is not None:
            audio = _load_features(clip, dirs["vggish_dir"] / f"{imdb}_vggish.npy", audio_dim)
        audio_missing = audio is None
        if audio_missing:
            audio = np.zeros((1, audio_dim), np.float32)  # the original's fallback: one zero row
        kept.append(rec)
        videos.append(video)
        audios.append(audio)
        flags["video_missing"].append(video_missing)
        flags["audio_missing"].append(audio_missing)
        flags["rgb_flow_mismatch"].append(mismatch)
        flags["empty"].append((not video_missing and video.shape[0] == 0) or audio.shape[0] == 0)

    n = len(kept)
    text = np.zeros((n, text_len), np.int32)
    text_mask = np.zeros((n, text_len), np.float32)
    for i, rec in enumerate(kept):
        ids = rec[3][:text_len]  # the original keeps the FIRST text_len tokens
        if len(ids):
            text[i, text_len - len(ids):] = ids
            text_mask[i, text_len - len(ids):] = 1.0
    video, video_mask = _pad_right(videos, video_len, video_dim)
    audio, audio_mask = _pad_right(audios, audio_len, audio_dim)
    arrays: dict[str, Any] = {"text": text, "text_mask": text_mask, "video": video,
                              "video_mask": video_mask, "audio": audio, "audio_mask": audio_mask}

    labels, label_mask, partial = {}, {}, {}
    for t in tasks:
        present = [rec[5][t] is not None for rec in kept]
        if not any(present) and not (require_labels and n == 0):
            continue  # only reachable with require_labels=False: no key for this task
        lab = np.zeros((n, 2), np.float32)
        lab[:, 0] = 1.0  # placeholder [1, 0] where the label is unknown (mask 0 there)
        mask = np.zeros((n,), np.float32)
        for i, rec in enumerate(kept):
            onehot = rec[5][t]
            if onehot is None:
                continue
            lab[i] = onehot
            if t == BINARY_TASK or not fine_grained_on_positives:
                mask[i] = 1.0
            else:
                mask[i] = float(rec[4] is not None and rec[4][1] == 1)
        if not all(present):
            partial[t] = n - sum(present)
        labels[t], label_mask[t] = lab, mask
    if labels:
        arrays["labels"], arrays["label_mask"] = labels, label_mask

    ds = ClipDataset(
        clips=[r[0] for r in kept], imdb_ids=[r[1] for r in kept],
        ids=np.asarray([r[2] for r in kept], dtype=np.int64), arrays=arrays, tasks=tasks,
        video_missing=np.asarray(flags["video_missing"], bool).reshape(n),
        audio_missing=np.asarray(flags["audio_missing"], bool).reshape(n),
        rgb_flow_mismatch=np.asarray(flags["rgb_flow_mismatch"], bool).reshape(n),
        empty_features=np.asarray(flags["empty"], bool).reshape(n),
        skipped_clips=skipped, dropped_negatives=dropped_negatives, source=str(path),
    )
    if warn:
        _warn_summary(ds, len(data), partial)
    return ds


def _pad_right(seqs: list[np.ndarray], length: int, dim: int) -> tuple[np.ndarray, np.ndarray]:
    out = np.zeros((len(seqs), length, dim), np.float32)
    mask = np.zeros((len(seqs), length), np.float32)
    for i, s in enumerate(seqs):
        k = min(s.shape[0], length)  # longer clips keep their first `length` rows
        out[i, :k] = s[:k]
        mask[i, :k] = 1.0
    return out, mask


def _warn_summary(ds: ClipDataset, n_json: int, partial: Mapping[str, int]) -> None:
    c = ds.missing_counts
    parts = []
    if c["vggish"]:
        parts.append(f"{c['vggish']} without a VGGish file (one zero row, audio_mask[0] = 1)")
    if c["i3d"]:
        parts.append(f"{c['i3d']} without I3D rgb/flow files (zero video, video_mask all 0)")
    if c["i3d_skipped"]:
        parts.append(f"{c['i3d_skipped']} dropped for missing I3D rgb/flow files (missing_video='skip')")
    if c["rgb_flow_mismatch"]:
        parts.append(f"{c['rgb_flow_mismatch']} with rgb/flow of different lengths (common prefix used)")
    if c["empty"]:
        parts.append(f"{c['empty']} with a feature file of 0 rows (mask all 0 for it)")
    for t, k in partial.items():
        parts.append(f"{k} without a {t!r} label (label_mask 0 there)")
    if parts:
        warnings.warn(f"{ds.source}: of {n_json} clips, " + "; ".join(parts), DataWarning, stacklevel=3)


# ----------------------------------------------------------------------------- batch guard


def _lengths(config_or_lengths) -> dict[str, Any]:
    if isinstance(config_or_lengths, ModelConfig):
        c = config_or_lengths
        return dict(text_len=c.text_len, video_len=c.video_len, audio_len=c.audio_len,
                    video_dim=c.video_dim, audio_dim=c.audio_dim, vocab_size=c.bert.vocab_size,
                    tasks=c.tasks)
    if isinstance(config_or_lengths, Mapping):
        need = ("text_len", "video_len", "audio_len", "video_dim", "audio_dim")
        miss = [k for k in need if k not in config_or_lengths]
        if miss:
            raise ValueError(f"check_batch: lengths mapping lacks {miss}")
        return {"vocab_size": None, "tasks": None, **dict(config_or_lengths)}
    raise TypeError(f"check_batch: expected a ModelConfig or a mapping of lengths, "
                    f"got {type(config_or_lengths).__name__}")


def _shape(key: str, arr: np.ndarray, expected: tuple, shown: str) -> None:
    try:
        chex.assert_shape(arr, expected)
    except AssertionError:
        raise DataError(f"batch[{key}] has shape {arr.shape}, expected {shown}") from None


def _dtype(key: str, arr: np.ndarray, dtype) -> None:
    try:
        chex.assert_type(arr, dtype)
    except AssertionError:
        raise DataError(f"batch[{key}] has dtype {arr.dtype}, expected {np.dtype(dtype)}") from None


def _first_row(bad_rows: np.ndarray) -> int:
    return int(np.flatnonzero(bad_rows)[0])


def check_batch(batch: Mapping[str, Any], config_or_lengths, *, require_labels: bool = False,
                tasks: Sequence[str] | None = None) -> None:
    """Host-side guard at the model boundary; raises DataError with a readable message.

    `config_or_lengths`: a ModelConfig, or a mapping with text_len, video_len,
    audio_len, video_dim, audio_dim (optional vocab_size). With require_labels,
    `labels`/`label_mask` must hold every task of `tasks` (default: the config's).
    Extra keys are allowed and not checked.
    """
    L = _lengths(config_or_lengths)
    if not isinstance(batch, Mapping):
        raise DataError(f"batch is a {type(batch).__name__}, expected a dict of arrays")
    missing = [k for k in ARRAY_KEYS if k not in batch]
    if missing:
        raise DataError(f"batch lacks keys {missing}; a batch needs {list(ARRAY_KEYS)}")
    a = {k: np.asarray(batch[k]) for k in ARRAY_KEYS}
    if a["text"].ndim < 1:
        raise DataError(f"batch[text] has shape {a['text'].shape}, expected (B, {L['text_len']})")
    b = a["text"].shape[0]
    tl, vl, al, vd, ad = (L[k] for k in ("text_len", "video_len", "audio_len", "video_dim", "audio_dim"))
    expect = {"text": ((b, tl), f"(B={b}, text_len={tl})"),
              "text_mask": ((b, tl), f"(B={b}, text_len={tl})"),
              "video": ((b, vl, vd), f"(B={b}, video_len={vl}, video_dim={vd})"),
              "video_mask": ((b, vl), f"(B={b}, video_len={vl})"),
              "audio": ((b, al, ad), f"(B={b}, audio_len={al}, audio_dim={ad})"),
              "audio_mask": ((b, al), f"(B={b}, audio_len={al})")}
    for k in ARRAY_KEYS:
        _shape(k, a[k], *expect[k])
        _dtype(k, a[k], np.int32 if k == "text" else np.float32)

    for k in ("video", "audio"):
        finite = np.isfinite(a[k]).reshape(b, -1).all(axis=1)
        if not finite.all():
            raise DataError(f"batch[{k}] has non-finite values (NaN/inf), first in batch row "
                            f"{_first_row(~finite)}")
    for k in ("text_mask", "video_mask", "audio_mask"):
        ok = ((a[k] == 0) | (a[k] == 1)).all(axis=1)
        if not ok.all():
            raise DataError(f"batch[{k}] has values other than 0 and 1 in batch row {_first_row(~ok)}")

    # Text: left padding, so each mask row must be zeros then ones.
    tm = a["text_mask"]
    step = np.diff(tm, axis=1)
    bad = (step < 0).any(axis=1)
    if bad.any():
        r = _first_row(bad)
        reversed_ = bool((step[r] <= 0).all())
        what = "reversed (ones then zeros)" if reversed_ else "misaligned (not zeros then ones)"
        raise DataError(f"batch[text_mask] is {what} in batch row {r}: the text is LEFT-padded, so "
                        f"the mask must be 0 on the padding at the start and 1 on the tokens at the "
                        f"right end")
    pad_ids = ((tm == 0) & (a["text"] != 0)).any(axis=1)
    if pad_ids.any():
        raise DataError(f"batch[text] has non-zero token ids where text_mask is 0 in batch row "
                        f"{_first_row(pad_ids)}: text padding and text_mask are misaligned "
                        f"(expected zeros first, tokens at the right end under the mask)")
    if L.get("vocab_size") is not None:
        out = ((a["text"] < 0) | (a["text"] >= L["vocab_size"])).any(axis=1)
        if out.any():
            raise DataError(f"batch[text] has token ids outside [0, {L['vocab_size']}) in batch row "
                            f"{_first_row(out)}")

    # Video/audio: right padding, so each mask row is ones then zeros, zero rows under mask 0.
    for k in ("video", "audio"):
        m = a[f"{k}_mask"]
        bad = (np.diff(m, axis=1) > 0).any(axis=1)
        if bad.any():
            raise DataError(f"batch[{k}_mask] is not ones then zeros in batch row {_first_row(bad)} "
                            f"({k} is RIGHT-padded: 1 on the first min(S, len) rows)")
        leak = ((m == 0) & (a[k] != 0).any(axis=2)).any(axis=1)
        if leak.any():
            raise DataError(f"batch[{k}] has non-zero rows where {k}_mask is 0 in batch row "
                            f"{_first_row(leak)} (padding rows must be zero)")

    _check_labels(batch, b, require_labels, tasks if tasks is not None else L.get("tasks"))


def _check_labels(batch: Mapping[str, Any], b: int, require: bool, tasks) -> None:
    has_l, has_m = "labels" in batch, "label_mask" in batch
    if has_l != has_m:
        raise DataError("batch has 'labels' without 'label_mask' or the reverse; they go together")
    if not has_l:
        if require:
            raise DataError("batch lacks 'labels'/'label_mask' (required here)")
        return
    labels, masks = batch["labels"], batch["label_mask"]
    if not isinstance(labels, Mapping) or not isinstance(masks, Mapping):
        raise DataError("batch['labels'] and batch['label_mask'] must be dicts keyed by task")
    if set(labels) != set(masks):
        raise DataError(f"batch['labels'] tasks {sorted(labels)} differ from batch['label_mask'] "
                        f"tasks {sorted(masks)}")
    if require and tasks is not None:
        lack = [t for t in tasks if t not in labels]
        if lack:
            raise DataError(f"batch['labels'] lacks tasks {lack}")
    for t in labels:
        lab, m = np.asarray(labels[t]), np.asarray(masks[t])
        _shape(f"labels][{t!r}", lab, (b, 2), f"(B={b}, 2)")
        _dtype(f"labels][{t!r}", lab, np.float32)
        _shape(f"label_mask][{t!r}", m, (b,), f"(B={b},)")
        _dtype(f"label_mask][{t!r}", m, np.float32)
        if not ((m == 0) | (m == 1)).all():
            raise DataError(f"batch[label_mask][{t!r}] has values other than 0 and 1")
        onehot = ((lab == 0) | (lab == 1)).all(axis=1) & (lab.sum(axis=1) == 1)
        bad = (m == 1) & ~onehot
        if bad.any():
            r = _first_row(bad)
            raise DataError(f"batch[labels][{t!r}] row {r} is {lab[r].tolist()}, expected a one-hot "
                            f"pair [1, 0] or [0, 1] where label_mask is 1")
