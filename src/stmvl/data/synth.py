"""The synthetic temporal video-text corpus (docs/synthetic_corpus.md): ``stmvl synth --out DIR``.

Each clip shows 1 or 2 coloured shapes on a static, per-clip random texture; each object has one motion (moves
left/right/up/down, grows, shrinks, stays). With two objects, the first moves during the first half of the clip and
the second during the second half. Everything is a function of integer frame indices, so **reversing the motion
attributes renders exactly the reversed frames** (``render_clip(reverse_attributes(a)) == render_clip(a)[::-1]``):
the foil caption of a clip (its reversed attributes, same wording) describes the time-reversed clip, and a model
blind to frame order scores exactly chance on the probe. No clip is 'stays'-only, so a foil always differs from its
caption. See docs/synthetic_corpus.md for the vocabulary and templates.
"""

from __future__ import annotations

import functools
import json
import math
import multiprocessing
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

SHAPES = ("circle", "square", "triangle", "star", "diamond", "cross")
COLORS = {
    "red": (225, 35, 35), "green": (40, 195, 60), "blue": (45, 85, 235), "yellow": (245, 225, 40),
    "purple": (155, 55, 205), "orange": (250, 140, 25), "white": (248, 248, 248), "cyan": (40, 215, 225),
}
SIZES = ("small", "large")
MOTIONS = ("left", "right", "up", "down", "grows", "shrinks", "stays")
REVERSED_MOTION = {"left": "right", "right": "left", "up": "down", "down": "up", "grows": "shrinks",
                   "shrinks": "grows", "stays": "stays"}
# synonyms: index i of a motion's list and of its reverse's list are the same wording style, so a foil keeps the
# caption's style and differs only in the motion itself
MOTION_PHRASES = {
    "left": ("moves to the left", "slides to the left", "travels leftward", "goes left"),
    "right": ("moves to the right", "slides to the right", "travels rightward", "goes right"),
    "up": ("moves up", "slides upward", "rises", "goes up"),
    "down": ("moves down", "slides downward", "sinks", "goes down"),
    "grows": ("grows", "gets bigger", "expands", "grows larger"),
    "shrinks": ("shrinks", "gets smaller", "contracts", "shrinks in size"),
    "stays": ("stays still", "does not move", "remains in place", "stays put"),
}
SHAPE_WORDS = {"circle": ("circle", "disk"), "square": ("square", "box"), "triangle": ("triangle",),
               "star": ("star",), "diamond": ("diamond", "rhombus"), "cross": ("cross", "plus sign")}
SINGLE_TEMPLATES = ("{a} {m}", "{the} {m}", "there is {a} that {m}", "in this video {a} {m}", "we see {a} that {m}")
PAIR_TEMPLATES = ("first {a1} {m1}, then {a2} {m2}", "{a1} {m1} first, and then {a2} {m2}",
                  "{a1} {m1} before {a2} {m2}", "{the1} {m1}, after that {the2} {m2}")
STATIC_TEMPLATES = ("{a}", "a picture of {a}", "{a} on a textured background", "an image showing {a}")
QA_ANSWERS = tuple(sorted(set(COLORS) | set(SHAPES) | set(MOTIONS)))

SMALL_RADIUS, LARGE_RADIUS = 0.11, 0.19  # fractions of the frame side
FPS = 8
SPLIT_CODES = {"train": 1, "test": 2, "probe": 3}


# ----------------------------------------------------------------------------------------------------------- attributes
def _place(rng: np.random.Generator, motion: str, radius_px: float, size: int) -> tuple[list, list]:
    """Start and end (x, y, r) in pixels for one object and motion, kept inside the frame."""
    small, large = SMALL_RADIUS * size, LARGE_RADIUS * size
    r0, r1 = {"grows": (small, large), "shrinks": (large, small)}.get(motion, (radius_px, radius_px))
    margin = max(r0, r1) + 1.0
    lo, hi = margin, size - margin
    travel = rng.uniform(0.3, 0.45) * size
    x, y = rng.uniform(lo, hi), rng.uniform(lo, hi)
    if motion in ("left", "right"):
        x = rng.uniform(lo + travel, hi) if motion == "left" else rng.uniform(lo, hi - travel)
        end = (x - travel if motion == "left" else x + travel, y)
    elif motion in ("up", "down"):
        y = rng.uniform(lo + travel, hi) if motion == "up" else rng.uniform(lo, hi - travel)
        end = (x, y - travel if motion == "up" else y + travel)
    else:
        end = (x, y)
    return [round(x, 3), round(y, 3), round(r0, 3)], [round(end[0], 3), round(end[1], 3), round(r1, 3)]


def _paths_overlap(other: dict, start: list, end: list) -> bool:
    """Whether a new object's path (start -> end) comes within touching distance of an existing object's path."""
    steps = np.linspace(0.0, 1.0, 9)[:, None]
    path_a = np.asarray(other["start"]) * (1 - steps) + np.asarray(other["end"]) * steps
    path_b = np.asarray(start) * (1 - steps) + np.asarray(end) * steps
    gaps = np.hypot(path_a[:, None, 0] - path_b[None, :, 0], path_a[:, None, 1] - path_b[None, :, 1])
    reach = max(other["start"][2], other["end"][2]) + max(start[2], end[2]) + 1.0
    return bool(gaps.min() < reach)


def sample_attributes(rng: np.random.Generator, size: int) -> dict[str, Any]:
    """Random clip attributes: background seed, 1-2 objects (shape, colour, size, motion, start, end, z, wording)."""
    num_objects = 1 if rng.random() < 0.5 else 2
    objects: list[dict] = []
    attempts = 0
    while len(objects) < num_objects:
        shape, color = str(rng.choice(SHAPES)), str(rng.choice(list(COLORS)))
        if any(o["shape"] == shape or o["color"] == color for o in objects):
            continue  # distinct shape and colour keep "the red ..." / "the circle" unambiguous in captions and QA
        motion = str(rng.choice(MOTIONS))
        if motion == "stays" and (num_objects == 1 or any(o["motion"] == "stays" for o in objects)):
            continue  # a 'stays'-only clip is its own reversal: its foil would equal its caption
        size_word = {"grows": "small", "shrinks": "large"}.get(motion, str(rng.choice(SIZES)))
        radius = (SMALL_RADIUS if size_word == "small" else LARGE_RADIUS) * size
        start, end = _place(rng, motion, radius, size)
        if objects and _paths_overlap(objects[0], start, end) and attempts < 100:
            attempts += 1
            continue  # overlapping objects would hide each other's shape; the cap keeps tiny frames generating
        objects.append({"shape": shape, "color": color, "size": size_word, "motion": motion, "start": start,
                        "end": end, "z": len(objects), "noun": int(rng.integers(0, 2)),
                        "verb": int(rng.integers(0, 4)), "say_size": bool(rng.random() < 0.5)})
    template = int(rng.integers(0, len(SINGLE_TEMPLATES) if num_objects == 1 else len(PAIR_TEMPLATES)))
    return {"background": int(rng.integers(0, 2**31)), "objects": objects, "template": template}


def reverse_attributes(attrs: dict[str, Any]) -> dict[str, Any]:
    """Attributes of the time-reversed clip: each motion reversed (start <-> end), object order (first/then) swapped.

    Wording choices travel with their object, and ``z`` (drawing order) is kept, so the render is the exact reverse.
    """
    reversed_objects = []
    for obj in reversed(attrs["objects"]):
        new = dict(obj, motion=REVERSED_MOTION[obj["motion"]], start=list(obj["end"]), end=list(obj["start"]))
        if obj["motion"] in ("grows", "shrinks"):
            new["size"] = "large" if obj["size"] == "small" else "small"
        reversed_objects.append(new)
    return dict(attrs, objects=reversed_objects)


# ------------------------------------------------------------------------------------------------------------ captions
def _noun_phrase(obj: dict, article: str, with_size: bool) -> str:
    words = SHAPE_WORDS[obj["shape"]]
    size = f"{obj['size']} " if with_size else ""
    return _with_article(article, f"{size}{obj['color']} {words[obj['noun'] % len(words)]}")


def _with_article(article: str, phrase: str) -> str:
    if article == "a" and phrase[0] in "aeiou":
        article = "an"
    return f"{article} {phrase}"


def _mentions_size(obj: dict) -> bool:
    # a growing/shrinking object has no single size, so its captions never name one
    return obj["say_size"] and obj["motion"] not in ("grows", "shrinks")


def caption(attrs: dict[str, Any]) -> str:
    """The caption of a clip from its attributes and stored wording choices."""
    objs = attrs["objects"]
    motion = [MOTION_PHRASES[o["motion"]][o["verb"]] for o in objs]
    if len(objs) == 1:
        o = objs[0]
        return SINGLE_TEMPLATES[attrs["template"]].format(
            a=_noun_phrase(o, "a", _mentions_size(o)), the=_noun_phrase(o, "the", _mentions_size(o)), m=motion[0])
    o1, o2 = objs
    return PAIR_TEMPLATES[attrs["template"]].format(
        a1=_noun_phrase(o1, "a", _mentions_size(o1)), a2=_noun_phrase(o2, "a", _mentions_size(o2)),
        the1=_noun_phrase(o1, "the", _mentions_size(o1)), the2=_noun_phrase(o2, "the", _mentions_size(o2)),
        m1=motion[0], m2=motion[1])


def foil_caption(attrs: dict[str, Any]) -> str:
    """The caption of the time-reversed clip, in the same wording: the probe's wrong answer."""
    return caption(reverse_attributes(attrs))


def caption_key(attrs: dict[str, Any]) -> tuple:
    """What a caption asserts: per object in order (colour, shape, motion, size or None when not said)."""
    return tuple((o["color"], o["shape"], o["motion"], o["size"] if _mentions_size(o) else None)
                 for o in attrs["objects"])


def clip_matches(key: tuple, attrs: dict[str, Any]) -> bool:
    """Whether a clip with ``attrs`` satisfies the caption key ``key`` (retrieval ground truth)."""
    objs = attrs["objects"]
    if len(objs) != len(key):
        return False
    return all(o["color"] == c and o["shape"] == s and o["motion"] == m and (z is None or o["size"] == z)
               for o, (c, s, m, z) in zip(objs, key))


def _static_size(obj: dict, at_end: bool) -> str:
    """Size word of an object on the first or last frame."""
    if obj["motion"] == "grows":
        return "large" if at_end else "small"
    if obj["motion"] == "shrinks":
        return "small" if at_end else "large"
    return obj["size"]


def static_caption(attrs: dict[str, Any], at_end: bool, template: int) -> str:
    """Caption of a single frame (first or last): sizes are those of that frame, no motion words."""
    phrases = []
    for obj in attrs["objects"]:
        words = SHAPE_WORDS[obj["shape"]]
        noun = words[obj["noun"] % len(words)]
        phrases.append(_with_article("a", f"{_static_size(obj, at_end)} {obj['color']} {noun}"))
    return STATIC_TEMPLATES[template].format(a=" and ".join(phrases))


# ----------------------------------------------------------------------------------------------------------- rendering
def render_background(seed: int, size: int) -> np.ndarray:
    """A smooth random texture (sum of low-frequency waves + fine static grain), float [size, size, 3] in 0..255."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64) / size
    base = rng.uniform(70, 110) + rng.uniform(-12, 12, size=3)
    image = np.broadcast_to(base, (size, size, 3)).copy()
    for _ in range(4):
        fx, fy = rng.uniform(-3, 3, size=2)
        phase = rng.uniform(0, 2 * np.pi)
        wave = np.sin(2 * np.pi * (fx * xx + fy * yy) + phase)
        image += wave[..., None] * rng.uniform(8, 20) * rng.uniform(0.6, 1.0, size=3)
    image += rng.normal(0, 5, size=(size, size, 3))
    return np.clip(image, 0, 255)


def _shape_distance(shape: str, dx: np.ndarray, dy: np.ndarray, r: float) -> np.ndarray:
    """Approximate signed distance (pixels, < 0 inside) of a shape of radius r centred at the origin."""
    if shape == "circle":
        return np.hypot(dx, dy) - r
    if shape == "square":
        return np.maximum(np.abs(dx), np.abs(dy)) - 0.82 * r
    if shape == "diamond":
        return (np.abs(dx) + np.abs(dy) - 1.1 * r) / np.sqrt(2.0)
    if shape == "triangle":  # pointing up (image y grows downwards); edge normals at 90, 210, 330 degrees
        angles = np.deg2rad([90.0, 210.0, 330.0])
        return np.max([np.cos(a) * dx + np.sin(a) * dy for a in angles], axis=0) - 0.55 * r
    if shape == "star":
        theta = np.arctan2(dy, dx) + np.pi / 2
        return np.hypot(dx, dy) - r * (0.7 + 0.3 * np.cos(5 * theta))
    if shape == "cross":
        arm = 0.34 * r
        return np.minimum(np.maximum(np.abs(dx) - r, np.abs(dy) - arm), np.maximum(np.abs(dx) - arm, np.abs(dy) - r))
    raise ValueError(f"unknown shape {shape!r}")


def _progress(slot: int, num_objects: int, frame: int, last: int) -> int:
    """Integer progress numerator (denominator ``last``) of object ``slot`` at ``frame``.

    Integers keep reversal exact: positions are (start * (last - p) + end * p) / last, which is symmetric in floating
    point under (start, end, p) -> (end, start, last - p).
    """
    if num_objects == 1:
        return frame
    return int(np.clip(2 * frame - slot * last, 0, last))


def render_clip(attrs: dict[str, Any], size: int = 64, frames: int = 16) -> np.ndarray:
    """Render a clip: uint8 [frames, size, size, 3] (RGB)."""
    if frames < 2:
        raise ValueError(f"a clip needs at least 2 frames, got {frames}")
    background = render_background(attrs["background"], size)
    return np.stack([render_frame(attrs, size, frames, f, background) for f in range(frames)])


def render_frame(attrs: dict[str, Any], size: int, frames: int, frame: int,
                 background: np.ndarray | None = None) -> np.ndarray:
    """Frame ``frame`` of a clip as uint8 [size, size, 3]."""
    image = (render_background(attrs["background"], size) if background is None else background).copy()
    yy, xx = _pixel_centres(size)
    last = frames - 1
    slots = {id(o): i for i, o in enumerate(attrs["objects"])}
    for obj in sorted(attrs["objects"], key=lambda o: o["z"]):
        p = _progress(slots[id(obj)], len(attrs["objects"]), frame, last)
        x, y, r = ((s * (last - p) + e * p) / last for s, e in zip(obj["start"], obj["end"]))
        # blend only the object's bounding box: further than 1.1 r + 1 from the centre every shape's distance is
        # >= 0.5, so alpha is exactly 0 and the blend would leave the pixel as it is
        half = 1.1 * r + 1.5
        rows = slice(max(0, math.floor(y - half)), min(size, math.ceil(y + half) + 1))
        cols = slice(max(0, math.floor(x - half)), min(size, math.ceil(x + half) + 1))
        if rows.start >= rows.stop or cols.start >= cols.stop:
            continue
        box = image[rows, cols]
        alpha = np.clip(0.5 - _shape_distance(obj["shape"], xx[rows, cols] - x, yy[rows, cols] - y, r), 0.0, 1.0)
        alpha = alpha[..., None]
        image[rows, cols] = box * (1.0 - alpha) + np.asarray(COLORS[obj["color"]], dtype=np.float64) * alpha
    return np.clip(np.rint(image), 0, 255).astype(np.uint8)


@functools.lru_cache(maxsize=8)
def _pixel_centres(size: int) -> tuple[np.ndarray, np.ndarray]:
    """(y, x) coordinates of the pixel centres, float [size, size] each (read-only: shared between frames)."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64) + 0.5
    yy.flags.writeable = False
    xx.flags.writeable = False
    return yy, xx


def rgb_to_yuv420p(rgb: np.ndarray) -> np.ndarray:
    """uint8 [..., H, W, 3] RGB -> planar yuv420p [..., H * 3 / 2, W] (BT.601 limited range, 2x2-averaged chroma).

    Converting here instead of inside FFmpeg pins the colour matrix and the chroma filter, so the encoder input
    depends on nothing but the rendered frames. A clip's frames convert in one call (leading dimensions).
    """
    *lead, h, w, _ = rgb.shape
    if h % 2 or w % 2:
        raise ValueError(f"yuv420p needs even frame sides, got {w}x{h}")
    # contiguous colour planes: the same arithmetic as on interleaved channels, 1.6x faster
    r, g, b = np.moveaxis(rgb, -1, 0).astype(np.float64) / 255.0
    y = 16 + 65.481 * r + 128.553 * g + 24.966 * b
    cb = 128 - 37.797 * r - 74.203 * g + 112.0 * b
    cr = 128 + 112.0 * r - 93.786 * g - 18.214 * b

    def subsample(plane: np.ndarray) -> np.ndarray:  # the mean of each 2 x 2 block
        return (plane[..., 0::2, 0::2] + plane[..., 0::2, 1::2] + plane[..., 1::2, 0::2] + plane[..., 1::2, 1::2]) / 4

    def to_u8(plane: np.ndarray) -> np.ndarray:
        return np.clip(np.rint(plane), 0, 255).astype(np.uint8).reshape(*lead, -1)

    planes = np.concatenate([to_u8(y), to_u8(subsample(cb)), to_u8(subsample(cr))], axis=-1)
    return planes.reshape(*lead, h * 3 // 2, w)


def write_mp4(path: str | os.PathLike, frames: np.ndarray, fps: int = FPS, crf: int = 10) -> None:
    """Encode uint8 [F, H, W, 3] frames as H.264 (yuv420p) mp4 with reproducible bytes.

    Single-threaded, and adaptive B-frame placement and macroblock-tree rate control are off: with them x264 was
    observed to encode the same 16 frames differently from run to run.
    """
    import av

    with av.open(str(path), mode="w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=fps, options={"crf": str(crf), "preset": "veryfast",
                                                             "x264-params": "b-adapt=0:mbtree=0"})
        stream.width, stream.height = frames.shape[2], frames.shape[1]
        stream.pix_fmt = "yuv420p"
        stream.codec_context.thread_count = 1
        for planes in rgb_to_yuv420p(frames):
            frame = av.VideoFrame.from_ndarray(planes, format="yuv420p")
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


# ------------------------------------------------------------------------------------------------------------- corpus
@dataclass(frozen=True)
class _ClipJob:
    out: str
    split: str
    index: int
    seed: int
    size: int
    frames: int
    image: bool  # also write the image-text frame (train split)


def clip_rng(seed: int, split: str, index: int) -> np.random.Generator:
    """The generator of one clip: depends only on (seed, split, index), not on the worker that renders it."""
    return np.random.default_rng([seed, SPLIT_CODES[split], index])


def _make_clip(job: _ClipJob) -> dict[str, Any]:
    rng = clip_rng(job.seed, job.split, job.index)
    attrs = sample_attributes(rng, job.size)
    rel = f"videos/{job.split}/{job.split}_{job.index:05d}.mp4"
    frames = render_clip(attrs, job.size, job.frames)
    write_mp4(Path(job.out) / rel, frames)
    record: dict[str, Any] = {"video": rel, "caption": caption(attrs), "foil": foil_caption(attrs),
                              "attributes": attrs}
    if job.image:
        at_end = bool(rng.random() < 0.5)
        image_rel = f"images/{job.split}/{job.split}_{job.index:05d}.png"
        from PIL import Image

        Image.fromarray(frames[-1 if at_end else 0]).save(Path(job.out) / image_rel, optimize=False)
        record["image_record"] = {"image": image_rel,
                                  "caption": static_caption(attrs, at_end, int(rng.integers(0, 4)))}
    return record


QA_KINDS = ("color", "shape", "motion")


def _qa_records(rng: np.random.Generator, video: str, attrs: dict, first_id: int) -> list[dict[str, Any]]:
    """One question of each kind (colour, shape, motion) about a randomly chosen object of the clip, as VideoQA
    sets ask several questions per video; question ids run from ``first_id``."""
    records = []
    for offset, kind in enumerate(QA_KINDS):
        obj = attrs["objects"][int(rng.integers(0, len(attrs["objects"])))]
        if kind == "color":
            question, answer = f"what color is the {obj['shape']}", obj["color"]
        elif kind == "shape":
            question, answer = f"what shape is the {obj['color']} object", obj["shape"]
        else:
            question, answer = f"how does the {obj['color']} {obj['shape']} move", obj["motion"]
        records.append({"video": video, "question": question, "answer": answer, "question_id": first_id + offset})
    return records


def _mc_record(rng: np.random.Generator, video: str, attrs: dict, others: list[dict]) -> dict[str, Any]:
    """MSRVTT-MC style: the caption and distractors that are captions of other clips (``others``, the split's
    records), except that one distractor is the foil. Chance is 20%; a model blind to frame order cannot separate
    the caption from its foil, so it tops out near 50% even with every other distractor ruled out."""
    options = [caption(attrs), foil_caption(attrs)]
    for index in rng.permutation(len(others)):
        if len(options) == 5:
            break
        other = others[int(index)]
        text = other["caption"]
        # a distractor must not also describe this clip (repeated attribute tuples, or a size left unsaid)
        if not clip_matches(caption_key(other["attributes"]), attrs) and text not in options:
            options.append(text)
    _add_edits(rng, attrs, options)  # only a split of a few clips runs out of other captions
    return _shuffled_options(rng, video, options)


def _mc_edit_record(rng: np.random.Generator, video: str, attrs: dict) -> dict[str, Any]:
    """The hard variant: the caption, its foil and three single-attribute edits (another colour, shape or motion of
    one object), so every distractor differs from the caption in one word or in time only."""
    options = [caption(attrs), foil_caption(attrs)]
    _add_edits(rng, attrs, options)
    return _shuffled_options(rng, video, options)


def _add_edits(rng: np.random.Generator, attrs: dict, options: list[str]) -> None:
    """Append single-attribute edits of the caption to ``options`` until it has 5 distinct texts."""
    true_key = caption_key(attrs)
    for _ in range(200):
        if len(options) == 5:
            break
        edited = json.loads(json.dumps(attrs))
        obj = edited["objects"][int(rng.integers(0, len(edited["objects"])))]
        field = ("color", "shape", "motion")[int(rng.integers(0, 3))]
        pool = {"color": list(COLORS), "shape": list(SHAPES), "motion": [m for m in MOTIONS if m != "stays"]}[field]
        obj[field] = str(rng.choice(pool))
        text = caption(edited)
        if caption_key(edited) != true_key and text not in options:
            options.append(text)


def _shuffled_options(rng: np.random.Generator, video: str, options: list[str]) -> dict[str, Any]:
    """The MC record of ``options`` (the true caption first) in a random order, with the true caption's index."""
    if len(options) != 5:
        raise RuntimeError(f"could not build 5 distinct MC options for {video}")
    order = rng.permutation(5)
    return {"video": video, "caption": [options[i] for i in order], "answer": int(np.where(order == 0)[0][0])}


def _retrieval_records(records: list[dict]) -> list[dict]:
    """Test clips with per-text ground truth = every test clip whose attributes satisfy the caption."""
    out = []
    for record in records:
        key = caption_key(record["attributes"])
        gt = [j for j, other in enumerate(records) if clip_matches(key, other["attributes"])]
        out.append({"video": record["video"], "caption": record["caption"], "gt": gt})
    return out


def _dump(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, indent=None, separators=(",", ":"), sort_keys=True) + "\n", encoding="utf-8")


def generate_corpus(out: str | os.PathLike, seed: int = 0, train: int = 3000, test: int = 500, probe: int = 500,
                    size: int = 64, frames: int = 16, workers: int | None = None,
                    images: int | None = None) -> dict[str, Any]:
    """Write the corpus under ``out`` and return its manifest (counts, files, seconds taken).

    ``images``: image-text pairs to write, one frame each of the first ``images`` training clips (None: one per
    training clip).

    Layout: ``videos/{train,test,probe}/*.mp4``, ``images/train/*.png``, ``annotations/*.json``
    (train_video, train_image, test_video, retrieval_test, probe, qa_train, qa_test, qa_answers, mc_test,
    mc_edit_test) and ``manifest.json``. All media paths are relative to ``out``.
    """
    if size < 32 or frames < 2 or min(train, test, probe) < 0:
        raise ValueError(f"need size >= 32, frames >= 2, non-negative counts; got size={size} frames={frames}")
    images = train if images is None else images
    if not 0 <= images <= train:
        raise ValueError(f"images ({images}) must lie in [0, train] = [0, {train}]: each is a frame of a training clip")
    started = time.perf_counter()
    root = Path(out)
    for sub in ("videos/train", "videos/test", "videos/probe", "images/train", "annotations"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    jobs = [_ClipJob(str(root), split, i, seed, size, frames, split == "train" and i < images)
            for split, count in (("train", train), ("test", test), ("probe", probe)) for i in range(count)]
    workers = workers or os.cpu_count() or 1
    if workers > 1 and len(jobs) > 1:
        with multiprocessing.get_context("fork").Pool(workers) as pool:
            results = pool.map(_make_clip, jobs, chunksize=max(1, len(jobs) // (workers * 8)))
    else:
        results = [_make_clip(job) for job in jobs]
    by_split: dict[str, list[dict]] = {"train": [], "test": [], "probe": []}
    for job, record in zip(jobs, results):
        by_split[job.split].append(record)
    files = _write_annotations(root / "annotations", by_split, seed)
    counts = {**{k: len(v) for k, v in by_split.items()}, "images": images}
    manifest = {"seed": seed, "size": size, "frames": frames, "fps": FPS, "counts": counts, "files": files,
                "vocabulary": {"shapes": list(SHAPES), "colors": list(COLORS), "sizes": list(SIZES),
                               "motions": list(MOTIONS)}}
    _dump(root / "manifest.json", manifest)
    return dict(manifest, seconds=time.perf_counter() - started)


def _write_annotations(folder: Path, by_split: dict[str, list[dict]], seed: int) -> dict[str, str]:
    train, test, probe = by_split["train"], by_split["test"], by_split["probe"]
    qa_rng, mc_rng = np.random.default_rng([seed, 11]), np.random.default_rng([seed, 12])
    mc_edit_rng = np.random.default_rng([seed, 13])
    content = {
        "train_video": [{k: r[k] for k in ("video", "caption", "foil", "attributes")} for r in train],
        "train_image": [r["image_record"] for r in train if "image_record" in r],
        "test_video": [{k: r[k] for k in ("video", "caption", "foil", "attributes")} for r in test],
        "retrieval_test": _retrieval_records(test),
        "probe": [{k: r[k] for k in ("video", "caption", "foil", "attributes")} for r in probe],
        "qa_train": [q for i, r in enumerate(train) for q in _qa_records(qa_rng, r["video"], r["attributes"], 3 * i)],
        "qa_test": [q for i, r in enumerate(test)
                    for q in _qa_records(qa_rng, r["video"], r["attributes"], 3 * (len(train) + i))],
        "qa_answers": list(QA_ANSWERS),
        "mc_test": [_mc_record(mc_rng, r["video"], r["attributes"], test) for r in test],
        "mc_edit_test": [_mc_edit_record(mc_edit_rng, r["video"], r["attributes"]) for r in test],
    }
    files = {}
    for name, data in content.items():
        _dump(folder / f"{name}.json", data)
        files[name] = f"annotations/{name}.json"
    return files
