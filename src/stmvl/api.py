"""Using a trained model from Python and the shell: load a model folder, embed videos and texts, search a folder.

A **model folder** holds ``model.safetensors`` + ``config.json`` as written by
:func:`stmvl.models.weights.save_model` (a ``ModelConfig`` with ``stmvl_config_type: "ModelConfig"``). Optional
top-level ``config.json`` entries read here:

* ``"inference": {"num_frames": 4, "img_size": 224, "sampling": "middle"}``: how clips are sampled for this model
  (defaults: 4 frames, the student's ``vision.img_size``, ``middle`` sampling, i.e. the zero-shot protocol);
* ``"missing_groups": {"decoders": "why"}``: weight groups the writer knew were absent (the UMT converter writes
  this), accepted missing on load and reported.

A training run folder is accepted too: its ``model/`` sub-folder is used.

Search (:func:`search`) ranks every video of a folder by ITC (cosine of the query with each frame embedding, averaged
over frames, the evaluator's similarity) and re-ranks the best ones by the VTM head's match probability. Video
features are cached under ``<model folder>/search_cache/<hash of the folder and sampling>/``: ``index.pt`` holds, per
file, its key (size, mtime_ns, ctime_ns, inode), the frame embeddings ``[T', E]`` (fp32) or the decode failure, and
each video's tokens ``[n, D]`` (fp16, needed by VTM) sit in their own file (size recorded in the index) so that only
the re-ranked videos' tokens are read. A token file that is missing, of another size or unreadable is re-embedded; an
index entry whose token file name is not one the cache writes is dropped.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import re
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import torch

from stmvl.data.transforms import EvalTransform, to_float
from stmvl.data.video import MediaError, read_video
from stmvl.errors import UserError
from stmvl.models.weights.core import WeightLoadError

VIDEO_EXTENSIONS = (".mp4", ".m4v", ".mov", ".avi", ".mkv", ".webm", ".mpg", ".mpeg", ".ogv", ".flv", ".wmv", ".3gp")
DEFAULT_NUM_FRAMES = 4  # the zero-shot protocol of the recipes (README.md, Evaluation protocol)
DEFAULT_SAMPLING = "middle"
CACHE_VERSION = 2  # 2: file key with ctime and inode, token file sizes
EMBED_BATCH = 8  # clips per forward pass while filling the cache
TEACHER_GROUP = "teacher"
INFERENCE_SAMPLINGS = ("middle", "rand", "fps")
MAX_INFERENCE_FRAMES = 1024

log = logging.getLogger(__name__)


class ModelDirError(UserError, RuntimeError):
    """A model folder is missing files or does not describe the model asked for; the message names the file."""


# Weight groups a model folder may declare absent ("missing_groups"): the ones inference never uses. Any other
# group (the vision or text tower, the projections, the matching head) would be left at random weights.
MISSING_GROUPS_ALLOWED = (TEACHER_GROUP, "decoders")


# --------------------------------------------------------------------------------------------------- loading


def resolve_model_dir(directory: str | os.PathLike) -> Path:
    """The folder holding ``config.json`` + ``model.safetensors``: ``directory`` itself or its ``model/``."""
    directory = Path(directory)
    for candidate in (directory, directory / "model"):
        if (candidate / "config.json").is_file() and (candidate / "model.safetensors").is_file():
            return candidate
    raise ModelDirError(
        f"{directory}: no model.safetensors + config.json here or in {directory / 'model'} "
        "(write one with stmvl.models.weights.save_model or `stmvl convert`)"
    )


def read_model_meta(directory: Path, kinds: Sequence[str] = ("ModelConfig",)) -> dict:
    """The checked top level of ``directory/config.json``: readable UTF-8 JSON, ``stmvl_config_type`` one of
    ``kinds``, a ``config`` mapping and a ``missing_groups`` that names only MISSING_GROUPS_ALLOWED. The ``config``
    itself is checked when it is turned into a ModelConfig (stmvl.models.weights.config_from_dict).

    Raises:
        ModelDirError: naming the file and the entry.
    """
    from stmvl.models.weights.core import _read_json

    path = directory / "config.json"
    try:
        meta = _read_json(path)
    except WeightLoadError as error:
        raise ModelDirError(str(error)) from None
    kind = meta.get("stmvl_config_type")
    if kind not in kinds:
        need = " or ".join(repr(k) for k in kinds)
        raise ModelDirError(f"{path}: stmvl_config_type is {kind!r}; this needs a full model ({need})")
    if not isinstance(meta.get("config"), dict):
        raise ModelDirError(f"{path}: no 'config' mapping")
    _check_missing_groups(meta.get("missing_groups"), path)
    return meta


def _read_meta(directory: Path) -> dict:
    return read_model_meta(directory)


def _check_missing_groups(declared, path: Path) -> None:
    if declared is None:
        return
    if not isinstance(declared, dict) or not all(isinstance(v, str) for v in declared.values()):
        raise ModelDirError(f"{path}: missing_groups must map group names to the reason they are absent, got "
                            f"{declared!r}")
    refused = sorted(set(declared) - set(MISSING_GROUPS_ALLOWED))
    if refused:
        raise ModelDirError(f"{path}: missing_groups may only name {', '.join(MISSING_GROUPS_ALLOWED)} (groups "
                            f"inference does not use); {refused} would be left at random weights")


def _config_for_loading(cfg):
    """The saved config with external weight paths (and the student's warm start) removed: every tensor comes from
    model.safetensors, so building the model must not read (possibly absent) original BERT/CLIP files. The text
    vocabulary stays where it was."""
    from stmvl.models.stm import text_weights_folder

    text = cfg.text
    if text.vocab is None and text.weights is not None:
        folder = text_weights_folder(text)
        if folder is not None and (folder / "vocab.txt").is_file():
            text = dataclasses.replace(text, vocab=str(folder))
    # a warm start copies the teacher's weights into the student: here the student's own come from the file
    return dataclasses.replace(cfg, text=dataclasses.replace(text, weights=None),
                               teacher=dataclasses.replace(cfg.teacher, weights=None),
                               vision=dataclasses.replace(cfg.vision, warm_start="none"))


@dataclass
class InferenceSettings:
    """How a model samples clips: ``num_frames`` frames by ``sampling`` (``middle``), resized to ``img_size``."""

    num_frames: int
    img_size: int
    sampling: str = DEFAULT_SAMPLING


def _inference_settings(meta: dict, cfg, where: Path) -> InferenceSettings:
    raw = meta.get("inference") or {}
    if not isinstance(raw, dict):
        raise ModelDirError(f"{where}: 'inference' must be a mapping, got {type(raw).__name__}")
    unknown = sorted(set(raw) - {"num_frames", "img_size", "sampling"})
    if unknown:
        raise ModelDirError(f"{where}: unknown 'inference' keys {unknown}")
    num_frames = raw.get("num_frames", DEFAULT_NUM_FRAMES)
    img_size = raw.get("img_size", cfg.vision.img_size)
    sampling = raw.get("sampling", DEFAULT_SAMPLING)
    for key, value, top in (("num_frames", num_frames, MAX_INFERENCE_FRAMES), ("img_size", img_size, 4096)):
        if type(value) is not int or not 1 <= value <= top:
            raise ModelDirError(f"{where}: inference.{key} must be an integer in [1, {top}], got {value!r}")
    if img_size % cfg.vision.patch_size:
        raise ModelDirError(f"{where}: inference.img_size ({img_size}) must be a multiple of the patch size "
                            f"{cfg.vision.patch_size}")
    if sampling not in INFERENCE_SAMPLINGS:
        raise ModelDirError(f"{where}: inference.sampling must be one of {', '.join(INFERENCE_SAMPLINGS)}, got "
                            f"{sampling!r}")
    return InferenceSettings(num_frames, img_size, sampling)


def load_model(directory: str | os.PathLike, device: str | torch.device = "cpu"):
    """Load an :class:`~stmvl.models.stm.STMModel` from a model folder (or a run folder's ``model/``), in eval mode.

    Loading is strict: every saved tensor must fit and every model tensor must be saved, except the ``teacher``
    group (inference does not need it; a model saved without it gets a random teacher, ``model.teacher_loaded`` is
    False and a note is logged) and the groups the folder's ``missing_groups`` names (only ``teacher`` and
    ``decoders`` may be named: MISSING_GROUPS_ALLOWED).

    Raises:
        ModelDirError, ConfigError, WeightLoadError, CorruptWeightsError (all stmvl.errors.UserError): the folder is
        incomplete, its config.json is invalid (checked before anything is allocated), or its weights are
        unreadable or do not fit; each message names the file.

    Attributes set on the model: ``model_dir`` (Path), ``inference`` (InferenceSettings), ``teacher_loaded`` (bool),
    ``load_report`` (LoadReport).
    """
    from stmvl.models.config import ModelConfig
    from stmvl.models.stm import STMModel
    from stmvl.models.weights import config_from_dict, load_state_dict_strict, read_state_dict

    directory = resolve_model_dir(directory)
    meta = read_model_meta(directory)
    # every entry of config.json is checked before the model is built or the weights are read
    cfg = _config_for_loading(config_from_dict(ModelConfig, meta["config"], str(directory / "config.json")))
    inference = _inference_settings(meta, cfg, directory / "config.json")
    declared = dict(meta.get("missing_groups") or {})
    model = STMModel(cfg)
    state = read_state_dict(directory / "model.safetensors")
    report = load_state_dict_strict(model, state, allow_missing=(TEACHER_GROUP, *declared))
    for group, keys in sorted(report.missing.items()):
        why = declared.get(group, "not needed for inference; randomly initialised")
        log.info("%s: %d '%s' tensors not in the checkpoint (%s)", directory, len(keys), group, why)
    model.load_report = report
    model.teacher_loaded = model.teacher is not None and TEACHER_GROUP not in report.missing
    model.model_dir = directory
    model.inference = inference
    return model.to(device).eval()


# --------------------------------------------------------------------------------------------------- encoding


def _model_device(model) -> torch.device:
    return model.temp.device


def read_clip(model, path: str | os.PathLike, num_frames: int | None = None) -> torch.Tensor:
    """Decode a clip the way the model expects it: uint8 [T, 3, S, S] (S = the model's inference img_size).

    Raises :class:`stmvl.data.video.MediaError` for missing/empty/undecodable files.
    """
    settings = model.inference
    frames, _ = read_video(path, num_frames or settings.num_frames, settings.sampling)
    return EvalTransform(settings.img_size)(frames)


def _as_video_batch(model, path_or_tensor, num_frames: int | None) -> torch.Tensor:
    """A path or a tensor ([T,3,H,W] or [B,T,3,H,W], uint8 or float in [0, 1]) -> float [B, T, 3, H, W]."""
    if isinstance(path_or_tensor, (str, os.PathLike)):
        video = read_clip(model, path_or_tensor, num_frames)
    elif isinstance(path_or_tensor, torch.Tensor):
        video = path_or_tensor
    else:
        raise TypeError(f"expected a video path or tensor, got {type(path_or_tensor).__name__}")
    if video.dim() == 4:
        video = video.unsqueeze(0)
    if video.dim() != 5 or video.shape[2] != 3:
        raise ValueError(f"video tensor must be [T, 3, H, W] or [B, T, 3, H, W], got {tuple(video.shape)}")
    video = to_float(video) if video.dtype == torch.uint8 else video.float()
    return video.to(_model_device(model))


@torch.no_grad()
def video_features(model, path_or_tensor, num_frames: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(tokens [B, T'*N, D], L2-normalised frame embeddings [B, T', E]) of a video path or tensor."""
    return model.video_features(_as_video_batch(model, path_or_tensor, num_frames))


@torch.no_grad()
def encode_video(model, path_or_tensor, num_frames: int | None = None) -> torch.Tensor:
    """Embedding [E] of one video (path, or tensor [T, 3, H, W]; a batch [B, T, 3, H, W] gives [B, E]).

    It is the mean of the L2-normalised frame embeddings, so ``encode_text(m, [q]) @ encode_video(m, v)`` is the
    frame-averaged cosine the evaluator and :func:`search` rank by (its norm is <= 1, equal to 1 for a static clip).
    """
    embeds = video_features(model, path_or_tensor, num_frames)[1].mean(1)
    return embeds[0] if embeds.shape[0] == 1 and not _is_batch(path_or_tensor) else embeds


def _is_batch(path_or_tensor) -> bool:
    return isinstance(path_or_tensor, torch.Tensor) and path_or_tensor.dim() == 5


@torch.no_grad()
def encode_text(model, texts: str | Sequence[str]) -> torch.Tensor:
    """L2-normalised text embeddings [B, E] (a single string gives B = 1)."""
    return model.encode_text([texts] if isinstance(texts, str) else list(texts))


# --------------------------------------------------------------------------------------------------- cache


@dataclass
class Skipped:
    """A file that could not be embedded and why (``reason`` is MediaError's reason or the exception type)."""

    path: str
    reason: str
    detail: str = ""


FileKey = tuple[int, int, int, int]
_TOKENS_NAME = re.compile(r"^[0-9a-f]{20}\.pt$")  # the only names put() writes: a tampered index cannot name others


@dataclass
class _Entry:
    key: FileKey
    frames: torch.Tensor | None = None  # [T', E] fp32, L2-normalised frame embeddings
    tokens_file: str | None = None  # file name under the cache's tokens/ folder
    tokens_size: int = -1  # its size in bytes when written
    failure: tuple[str, str] | None = None  # (reason, detail) of a file that did not decode


def _file_key(path: Path) -> FileKey:
    """(size, mtime_ns, ctime_ns, inode): free with the stat a listing makes anyway. Size and mtime alone miss a
    file replaced by one of the same size whose mtime was set back (`cp -p`, `touch -r`, `os.utime`); ctime cannot
    be set from user space and changes on every write, rename or utime, and a replacement file has a new inode. A
    content hash would also catch these but reads every video on every search. The price: a chmod or a copy of the
    folder re-embeds its videos (never a stale result)."""
    stat = path.stat()
    return stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns, stat.st_ino


def _weights_key(model_dir: Path) -> str:
    """Changes whenever the weights are rewritten, so a cache never outlives the model that filled it."""
    return ":".join(map(str, _file_key(model_dir / "model.safetensors")))


def _tokens_name(rel: str) -> str:
    return hashlib.sha1(rel.encode()).hexdigest()[:20] + ".pt"


class SearchCache:
    """Per-folder video features next to the model: ``<model_dir>/search_cache/<digest>/{index.pt, tokens/*.pt}``.

    The digest covers the folder's absolute path and the sampling settings; the index records the weights' key and
    is discarded when they change. Entries are keyed by the path relative to the folder and are valid while the
    file's key (see `_file_key`) is unchanged and its token file is present with the size it was written with.

    ``root`` puts the cache elsewhere without reading an existing index (``search(cache=False)`` uses a temporary
    folder, so that nothing under the real cache's names is written or deleted).
    """

    def __init__(self, model, folder: Path, root: Path | None = None):
        settings = model.inference
        ident = f"{folder.resolve()}|{settings.num_frames}|{settings.img_size}|{settings.sampling}|v{CACHE_VERSION}"
        self.weights = _weights_key(Path(model.model_dir))
        if root is not None:
            self.root, self.entries = Path(root), {}
        else:
            self.root = Path(model.model_dir) / "search_cache" / hashlib.sha1(ident.encode()).hexdigest()[:16]
            self.entries: dict[str, _Entry] = self._read_index()

    def _read_index(self) -> dict[str, _Entry]:
        path = self.root / "index.pt"
        if not path.is_file():
            return {}
        try:
            data = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as error:  # noqa: BLE001 - a damaged cache is rebuilt, and the user is told
            log.warning("stmvl search: cache %s unreadable (%s: %s); rebuilding it", path, type(error).__name__,
                        " ".join(str(error).split())[:200])
            return {}
        if not isinstance(data, dict) or data.get("version") != CACHE_VERSION or data.get("weights") != self.weights:
            return {}
        entries, dropped = {}, []
        for rel, raw in (data.get("entries") or {}).items():
            entry = _parse_entry(raw)
            if entry is None:
                dropped.append(str(rel))
            else:
                entries[rel] = entry
        if dropped:
            log.warning("stmvl search: cache %s: %d malformed entr%s dropped and re-embedded (first: %s)", path,
                        len(dropped), "y" if len(dropped) == 1 else "ies", dropped[0][:200])
        return entries

    def _tokens_path(self, entry: _Entry) -> Path:
        return self.root / "tokens" / entry.tokens_file

    def valid(self, rel: str, key: FileKey) -> bool:
        entry = self.entries.get(rel)
        if entry is None or entry.key != key:
            return False
        if entry.failure is not None:
            return True
        path = self._tokens_path(entry)
        return path.is_file() and path.stat().st_size == entry.tokens_size  # a truncated file is re-embedded

    def put(self, rel: str, key: FileKey, frames: torch.Tensor | None = None, tokens: torch.Tensor | None = None,
            failure: tuple[str, str] | None = None) -> None:
        """Record a video's frame embeddings [T', E] and tokens [n, D] (stored fp16), or its decode failure."""
        self._drop_tokens(rel)
        name, size = None, -1
        if tokens is not None:
            name = _tokens_name(rel)
            (self.root / "tokens").mkdir(parents=True, exist_ok=True)
            target = self.root / "tokens" / name
            _atomic_save(tokens.detach().to("cpu", torch.float16).contiguous(), target)
            size = target.stat().st_size
        self.entries[rel] = _Entry(key, None if frames is None else frames.detach().float().cpu(), name, size, failure)

    def forget_except(self, keep: Iterable[str]) -> None:
        """Drop entries (and token files) of files that left the folder."""
        keep = set(keep)
        for rel in [r for r in self.entries if r not in keep]:
            self._drop_tokens(rel)
            del self.entries[rel]

    def _drop_tokens(self, rel: str) -> None:
        entry = self.entries.get(rel)
        if entry is not None and entry.tokens_file:  # a plain name under tokens/ (checked when the index was read)
            self._tokens_path(entry).unlink(missing_ok=True)

    def tokens(self, rel: str) -> torch.Tensor | None:
        """Cached tokens [n, D] (fp16) of a video, or None (with a warning) when the file does not load."""
        path = self._tokens_path(self.entries[rel])
        try:
            tokens = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as error:  # noqa: BLE001 - a damaged cache file is re-embedded, never a crash
            log.warning("stmvl search: cached tokens %s unreadable (%s); re-embedding %s", path,
                        type(error).__name__, rel)
            return None
        if not isinstance(tokens, torch.Tensor) or tokens.dim() != 2:
            log.warning("stmvl search: cached tokens %s hold no [n, D] tensor; re-embedding %s", path, rel)
            return None
        return tokens

    def save(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        entries = {rel: {"key": list(e.key), "frames": e.frames, "tokens_file": e.tokens_file,
                         "tokens_size": e.tokens_size, "failure": list(e.failure) if e.failure else None}
                   for rel, e in self.entries.items()}
        _atomic_save({"version": CACHE_VERSION, "weights": self.weights, "entries": entries}, self.root / "index.pt")


def _parse_entry(raw) -> _Entry | None:
    """An index entry, or None when it is malformed: wrong types, or a token file name that is not a plain name
    put() could have written (no separators, no '..'), so that no later unlink can reach outside tokens/."""
    try:
        key = tuple(int(v) for v in raw["key"])
        frames, name, size, failure = raw.get("frames"), raw.get("tokens_file"), int(raw["tokens_size"]), raw["failure"]
    except (TypeError, KeyError, ValueError):
        return None
    if len(key) != 4:
        return None
    if failure is not None:
        if not (isinstance(failure, (list, tuple)) and len(failure) == 2 and all(isinstance(f, str) for f in failure)):
            return None
        return _Entry(key, None, None, -1, (failure[0], failure[1]))
    if not (isinstance(name, str) and _TOKENS_NAME.match(name)):
        return None
    if not (isinstance(frames, torch.Tensor) and frames.dim() == 2 and frames.is_floating_point()):
        return None
    return _Entry(key, frames.float(), name, size, None)


def _atomic_save(obj, path: Path) -> None:
    # A search killed mid-write must not leave a truncated cache that the next search trusts.
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    torch.save(obj, tmp)
    os.replace(tmp, path)


# --------------------------------------------------------------------------------------------------- search


@dataclass
class SearchHit:
    """One ranked video. ``score``: the VTM match probability for re-ranked hits, else the ITC score; ``itc``: the
    frame-averaged cosine with the query; ``vtm``: the match probability (None when not re-ranked)."""

    path: str
    score: float
    itc: float
    vtm: float | None = None


class SearchResults(list):
    """The ranked :class:`SearchHit` list, plus what happened: ``skipped`` (list of :class:`Skipped`), ``embedded``
    (videos decoded and embedded by this call), ``cached`` (videos served from the cache), ``seconds``."""

    def __init__(self, hits: Iterable[SearchHit], skipped: list[Skipped], embedded: int, cached: int, seconds: float):
        super().__init__(hits)
        self.skipped, self.embedded, self.cached, self.seconds = skipped, embedded, cached, seconds

    def to_json(self, query: str) -> dict:
        return {"query": query, "hits": [dict(rank=i + 1, **dataclasses.asdict(h)) for i, h in enumerate(self)],
                "skipped": [dataclasses.asdict(s) for s in self.skipped], "embedded": self.embedded,
                "cached": self.cached, "seconds": round(self.seconds, 4)}


def list_videos(folder: Path) -> list[Path]:
    """Video files under ``folder`` (recursive, by extension), sorted for a stable order."""
    if not folder.is_dir():
        raise FileNotFoundError(f"videos folder not found: {folder}")
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in VIDEO_EXTENSIONS)


def _decode_errors() -> tuple[type[BaseException], ...]:
    errors: list[type[BaseException]] = [MediaError, OSError, ValueError, EOFError]
    try:
        import av

        errors.append(av.FFmpegError)
    except (ImportError, AttributeError):
        pass
    return tuple(errors)


def _try_read(model, path: Path) -> tuple[torch.Tensor | None, tuple[str, str] | None]:
    """(uint8 clip, None) or (None, (reason, detail)) for a file that cannot be decoded."""
    try:
        return read_clip(model, path), None
    except _decode_errors() as error:
        if isinstance(error, MediaError):
            return None, (error.reason, error.detail)
        return None, ("undecodable", f"{type(error).__name__}: {error}")


@torch.no_grad()
def _embed_into_cache(model, cache: SearchCache, todo: list[tuple[str, Path, FileKey]]) -> None:
    """Decode and embed the ``todo`` files in batches of EMBED_BATCH; failures are cached as failures."""
    pending: list[tuple[str, FileKey, torch.Tensor]] = []

    def flush() -> None:
        if not pending:
            return
        video = torch.stack([clip for _, _, clip in pending])
        tokens, frames = video_features(model, video)
        for i, (rel, key, _) in enumerate(pending):
            cache.put(rel, key, frames=frames[i], tokens=tokens[i])
        pending.clear()

    for rel, path, key in todo:
        clip, failure = _try_read(model, path)
        if failure is not None:
            cache.put(rel, key, failure=failure)
            continue
        pending.append((rel, key, clip))
        if len(pending) == EMBED_BATCH:
            flush()
    flush()


@torch.no_grad()
def _vtm_probabilities(model, cache: SearchCache, rels: list[str], query: str,
                       files: dict[str, tuple[Path, FileKey]]) -> list[float]:
    """Match probability of the query with each video (cached tokens, one fusion pass per video). Tokens that no
    longer load (a cache file damaged after the validity check) are embedded again from the video in ``files``."""
    batch = model.tokenize([query])
    states = model.text(batch["input_ids"], batch["attention_mask"])
    device = _model_device(model)
    probs = []
    for rel in rels:
        tokens = cache.tokens(rel)
        if tokens is None:
            path, key = files[rel]
            _embed_into_cache(model, cache, [(rel, path, key)])
            tokens = cache.tokens(rel) if cache.entries[rel].failure is None else None
            if tokens is None:  # the video itself stopped decoding since it was embedded: no match probability
                probs.append(0.0)
                continue
        tokens = tokens.to(device=device, dtype=torch.float32).unsqueeze(0)
        probs.append(float(model.itm_logits(tokens, states, batch["attention_mask"]).softmax(-1)[0, 1]))
    return probs


def search(model, videos_folder: str | os.PathLike, query: str, top: int = 10, rerank: bool = True,
           cache: bool = True, rerank_top: int | None = None) -> SearchResults:
    """Rank the videos of ``videos_folder`` for a text ``query``.

    Args:
        model: an STMModel from :func:`load_model` (needs ``model_dir`` and ``inference``).
        top: number of hits returned.
        rerank: re-rank the ``rerank_top`` best ITC hits (default ``max(top, 16)``) by VTM match probability; the
            re-ranked hits come first, ordered by that probability, then the rest by ITC.
        cache: read/write the feature cache next to the model; False embeds everything in a temporary folder and
            neither reads nor writes the cache.

    Returns:
        :class:`SearchResults` (a list of :class:`SearchHit`, best first) with ``skipped`` files and their reasons,
        also logged as warnings.
    """
    if not query.strip():
        raise ValueError("the search query is empty")
    if top < 1:
        raise ValueError(f"top must be >= 1, got {top}")
    started = time.perf_counter()
    folder = Path(videos_folder)
    files = list_videos(folder)
    keys = {p.relative_to(folder).as_posix(): (p, _file_key(p)) for p in files}
    if cache:
        results = _search_with(SearchCache(model, folder), model, folder, keys, query, top, rerank, rerank_top)
    else:
        # VTM needs the tokens during the call; they live in a folder of their own, removed afterwards
        with tempfile.TemporaryDirectory(prefix="stmvl-search-") as scratch:
            store = SearchCache(model, folder, root=Path(scratch))
            results = _search_with(store, model, folder, keys, query, top, rerank, rerank_top, save=False)
    for item in results.skipped:
        log.warning("stmvl search: skipped %s: %s%s", item.path, item.reason, f" ({item.detail})" if item.detail else "")
    results.seconds = time.perf_counter() - started
    return results


def _search_with(store: SearchCache, model, folder: Path, keys: dict, query: str, top: int, rerank: bool,
                 rerank_top: int | None, save: bool = True) -> SearchResults:
    todo = [(rel, path, key) for rel, (path, key) in keys.items() if not store.valid(rel, key)]
    _embed_into_cache(model, store, todo)
    store.forget_except(keys)
    hits, skipped = _rank(model, store, folder, keys, query, top, rerank, rerank_top)
    if save:
        store.save()
    return SearchResults(hits, skipped, embedded=len(todo), cached=len(keys) - len(todo), seconds=0.0)


def _rank(model, store: SearchCache, folder: Path, keys: dict, query: str, top: int, rerank: bool,
          rerank_top: int | None) -> tuple[list[SearchHit], list[Skipped]]:
    good = [rel for rel in keys if store.entries[rel].failure is None]
    skipped = [Skipped(str(folder / rel), *store.entries[rel].failure) for rel in keys if rel not in good]
    if not good:
        return [], skipped
    text = encode_text(model, query).cpu()  # [1, E]
    frames = torch.stack([store.entries[rel].frames for rel in good])  # [V, T', E]
    itc = torch.einsum("e,vfe->vf", text[0], frames).mean(-1)  # frame-averaged cosine, the evaluator's ITC
    order = itc.argsort(descending=True).tolist()
    hits = [SearchHit(str(folder / good[i]), float(itc[i]), float(itc[i])) for i in order]
    if rerank:
        count = min(len(hits), rerank_top or max(top, 16))
        probs = _vtm_probabilities(model, store, [good[i] for i in order[:count]], query, keys)
        for hit, prob in zip(hits[:count], probs):
            hit.vtm = hit.score = prob
        hits[:count] = sorted(hits[:count], key=lambda h: -h.score)
    return hits[:top], skipped


# --------------------------------------------------------------------------------------------------- output


def format_table(results: SearchResults) -> str:
    """Ranked table: rank, score, itc, path."""
    lines = [f"{'rank':>4}  {'score':>7}  {'itc':>7}  path"]
    lines += [f"{i:>4}  {h.score:7.4f}  {h.itc:7.4f}  {h.path}" for i, h in enumerate(results, 1)]
    return "\n".join(lines)
