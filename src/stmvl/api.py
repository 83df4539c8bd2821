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
file, the key ``(size, mtime_ns)``, the frame embeddings ``[T', E]`` (fp32) or the decode failure, and each video's
tokens ``[n, D]`` (fp16, needed by VTM) sit in their own file so that only the re-ranked videos' tokens are read.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import sys
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
CACHE_VERSION = 1
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
    """The saved config with external weight paths removed: every tensor comes from model.safetensors, so building
    the model must not read (possibly absent) original BERT/CLIP files. The text vocabulary stays where it was."""
    from stmvl.models.stm import text_weights_folder

    text = cfg.text
    if text.vocab is None and text.weights is not None:
        folder = text_weights_folder(text)
        if folder is not None and (folder / "vocab.txt").is_file():
            text = dataclasses.replace(text, vocab=str(folder))
    return dataclasses.replace(cfg, text=dataclasses.replace(text, weights=None),
                               teacher=dataclasses.replace(cfg.teacher, weights=None))


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


@dataclass
class _Entry:
    size: int
    mtime_ns: int
    frames: torch.Tensor | None = None  # [T', E] fp32, L2-normalised frame embeddings
    tokens_file: str | None = None  # file name under the cache's tokens/ folder
    failure: tuple[str, str] | None = None  # (reason, detail) of a file that did not decode


def _file_key(path: Path) -> tuple[int, int]:
    stat = path.stat()
    return stat.st_size, stat.st_mtime_ns


def _weights_key(model_dir: Path) -> str:
    """Changes whenever the weights are rewritten, so a cache never outlives the model that filled it."""
    size, mtime = _file_key(model_dir / "model.safetensors")
    return f"{size}:{mtime}"


class SearchCache:
    """Per-folder video features next to the model: ``<model_dir>/search_cache/<digest>/{index.pt, tokens/*.pt}``.

    The digest covers the folder's absolute path and the sampling settings; the index records the weights' size and
    mtime and is discarded when they change. Entries are keyed by the path relative to the folder and are valid
    while the file's (size, mtime_ns) is unchanged.
    """

    def __init__(self, model, folder: Path):
        settings = model.inference
        ident = f"{folder.resolve()}|{settings.num_frames}|{settings.img_size}|{settings.sampling}|v{CACHE_VERSION}"
        self.root = Path(model.model_dir) / "search_cache" / hashlib.sha1(ident.encode()).hexdigest()[:16]
        self.weights = _weights_key(Path(model.model_dir))
        self.entries: dict[str, _Entry] = self._read_index()

    def _read_index(self) -> dict[str, _Entry]:
        path = self.root / "index.pt"
        if not path.is_file():
            return {}
        try:
            data = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as error:  # noqa: BLE001 - a damaged cache is rebuilt, and the user is told
            print(f"stmvl search: cache {path} unreadable ({error}); rebuilding it", file=sys.stderr)
            return {}
        if data.get("version") != CACHE_VERSION or data.get("weights") != self.weights:
            return {}
        return {rel: _Entry(e["size"], e["mtime_ns"], e.get("frames"), e.get("tokens_file"),
                            tuple(e["failure"]) if e.get("failure") else None) for rel, e in data["entries"].items()}

    def valid(self, rel: str, key: tuple[int, int]) -> bool:
        entry = self.entries.get(rel)
        if entry is None or (entry.size, entry.mtime_ns) != key:
            return False
        return entry.failure is not None or (self.root / "tokens" / entry.tokens_file).is_file()

    def put(self, rel: str, key: tuple[int, int], frames: torch.Tensor | None = None, tokens: torch.Tensor | None = None,
            failure: tuple[str, str] | None = None) -> None:
        """Record a video's frame embeddings [T', E] and tokens [n, D] (stored fp16), or its decode failure."""
        self._drop_tokens(rel)
        name = None
        if tokens is not None:
            name = hashlib.sha1(rel.encode()).hexdigest()[:20] + ".pt"
            (self.root / "tokens").mkdir(parents=True, exist_ok=True)
            _atomic_save(tokens.detach().to("cpu", torch.float16).contiguous(), self.root / "tokens" / name)
        self.entries[rel] = _Entry(key[0], key[1], None if frames is None else frames.detach().float().cpu(), name, failure)

    def forget_except(self, keep: Iterable[str]) -> None:
        """Drop entries (and token files) of files that left the folder."""
        keep = set(keep)
        for rel in [r for r in self.entries if r not in keep]:
            self._drop_tokens(rel)
            del self.entries[rel]

    def _drop_tokens(self, rel: str) -> None:
        entry = self.entries.get(rel)
        if entry is not None and entry.tokens_file:
            (self.root / "tokens" / entry.tokens_file).unlink(missing_ok=True)

    def tokens(self, rel: str) -> torch.Tensor:
        """Cached tokens [n, D] (fp16) of a video."""
        return torch.load(self.root / "tokens" / self.entries[rel].tokens_file, map_location="cpu", weights_only=True)

    def save(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        entries = {rel: {"size": e.size, "mtime_ns": e.mtime_ns, "frames": e.frames, "tokens_file": e.tokens_file,
                         "failure": list(e.failure) if e.failure else None} for rel, e in self.entries.items()}
        _atomic_save({"version": CACHE_VERSION, "weights": self.weights, "entries": entries}, self.root / "index.pt")


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
def _embed_into_cache(model, cache: SearchCache, todo: list[tuple[str, Path, tuple[int, int]]]) -> None:
    """Decode and embed the ``todo`` files in batches of EMBED_BATCH; failures are cached as failures."""
    pending: list[tuple[str, tuple[int, int], torch.Tensor]] = []

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
def _vtm_probabilities(model, cache: SearchCache, rels: list[str], query: str) -> list[float]:
    """Match probability of the query with each video (cached tokens, one fusion pass per video)."""
    batch = model.tokenize([query])
    states = model.text(batch["input_ids"], batch["attention_mask"])
    device = _model_device(model)
    probs = []
    for rel in rels:
        tokens = cache.tokens(rel).to(device=device, dtype=torch.float32).unsqueeze(0)
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
        cache: read/write the feature cache next to the model; False embeds everything and writes nothing.

    Returns:
        :class:`SearchResults` (a list of :class:`SearchHit`, best first) with ``skipped`` files and their reasons,
        also printed to stderr.
    """
    if not query.strip():
        raise ValueError("the search query is empty")
    if top < 1:
        raise ValueError(f"top must be >= 1, got {top}")
    started = time.perf_counter()
    folder = Path(videos_folder)
    files = list_videos(folder)
    store = SearchCache(model, folder)
    if not cache:
        store.entries = {}
    keys = {p.relative_to(folder).as_posix(): (p, _file_key(p)) for p in files}
    todo = [(rel, path, key) for rel, (path, key) in keys.items() if not store.valid(rel, key)]
    _embed_into_cache(model, store, todo)
    store.forget_except(keys)
    hits, skipped = _rank(model, store, folder, keys, query, top, rerank, rerank_top)
    if cache:
        store.save()
    else:
        _remove_tree(store.root / "tokens", {e.tokens_file for e in store.entries.values()})
    for item in skipped:
        print(f"stmvl search: skipped {item.path}: {item.reason}" + (f" ({item.detail})" if item.detail else ""),
              file=sys.stderr)
    return SearchResults(hits, skipped, embedded=len(todo), cached=len(keys) - len(todo),
                         seconds=time.perf_counter() - started)


def _remove_tree(folder: Path, names: set) -> None:
    # cache=False still needs the tokens for VTM during the call; remove the ones this call wrote afterwards.
    for name in names:
        if name:
            (folder / name).unlink(missing_ok=True)


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
        probs = _vtm_probabilities(model, store, [good[i] for i in order[:count]], query)
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
