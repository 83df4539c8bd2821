"""Downstream finetuning tasks for the one engine: retrieval (VTC + VTM), multiple choice, VideoQA.

`stmvl finetune RECIPE --checkpoint DIR [overrides]` (stmvl.commands.finetune) runs :func:`finetune`. The
recipe's `task` picks the task:

- ``finetune_retrieval``: train VTC + VTM on the recipe's retrieval corpora (``data.corpora``, kind retrieval; each
  text of a video is one training pair and the texts of one video are VTC positives of each other), evaluate the
  eval corpora every ``eval.every_epochs`` with per-frame ITC + ITM re-ranking (stmvl.eval.retrieval).
- ``finetune_mc``: the same training; the eval corpora of kind ``mc`` are scored by stmvl.eval.mc (MSRVTT-MC).
- ``finetune_qa``: a VideoQAModel (stmvl.models.qa) trained by answer likelihood on ``data.corpora`` of kind qa,
  evaluated by answer-list ranking (stmvl.eval.qa).

The architecture is the checkpoint's (its config.json); a finetune recipe only sets ``model.loss`` (MLM and MVM must
be 0). Initialising from a pretraining checkpoint drops its pretraining-only groups (teacher, decoders, predictor,
lam) by name, loads everything else strictly and reports what it dropped; the MLM head is kept (VideoQA uses it as
its LM head, and a finetuned retrieval model stays a complete STMModel loadable by stmvl.load_model).
"""

from __future__ import annotations

import dataclasses
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from stmvl.config import ConfigError, CorpusConfig, RunConfig
from stmvl.data.annotations import PackedRecords, id_offsets, load_annotations
from stmvl.data.datasets import MCDataset, QADataset, RetrievalDataset, VideoTextCollator
from stmvl.data.mixing import MediaSource, MixedBatchStream
from stmvl.data.quarantine import Quarantine
from stmvl.data.transforms import to_float
from stmvl.data.video import MediaLimits, video_options
from stmvl.models.config import ModelConfig
from stmvl.models.qa import QA_UNUSED_GROUPS, VideoQAModel
from stmvl.models.stm import STMModel
from stmvl.train.engine import TrainContext, Trainer, unwrap_model

from .data import (StreamTask, _concat, _require, local_eval_corpus, prefill_decoded_caches, require_full_batch,
                   tokenizer_for)
from .evaluation import evaluate_corpora

log = logging.getLogger(__name__)

__all__ = [
    "PRETRAIN_ONLY_GROUPS",
    "InitReport",
    "finetune_model_config",
    "load_pretrained",
    "RetrievalPairs",
    "CachedClips",
    "QACollator",
    "RetrievalFinetuneTask",
    "QAFinetuneTask",
    "evaluate_downstream",
    "finetune",
    "load_qa_model",
]

PRETRAIN_ONLY_GROUPS = ("teacher", "decoders", "predictor", "lam")
RETRIEVAL_TASKS = ("finetune_retrieval", "finetune_mc")


# ------------------------------------------------------------------------------------------------ initialisation


@dataclass
class InitReport:
    """What initialising from a checkpoint did: the source folder, the tensors dropped per group (by name) and why."""

    source: str
    dropped: dict[str, int] = field(default_factory=dict)  # group -> number of tensors
    reasons: dict[str, str] = field(default_factory=dict)  # group -> why it was dropped
    loaded: int = 0

    def lines(self) -> list[str]:
        head = f"initialised from {self.source}: {self.loaded} tensors loaded strictly"
        return [head] + [f"  dropped '{g}' ({n} tensors): {self.reasons[g]}" for g, n in self.dropped.items()]


def _checkpoint_config(checkpoint: str | Path) -> tuple[Path, ModelConfig]:
    """(model folder, its ModelConfig with external weight paths removed) of a model folder or run folder."""
    from stmvl.api import _config_for_loading, _read_meta, resolve_model_dir
    from stmvl.models.weights import config_from_dict

    directory = resolve_model_dir(checkpoint)
    meta = _read_meta(directory)
    return directory, _config_for_loading(config_from_dict(ModelConfig, meta["config"], str(directory / "config.json")))


def finetune_model_config(pretrained: ModelConfig, run: RunConfig) -> ModelConfig:
    """The finetuning ModelConfig: the checkpoint's architecture, the recipe's ``model.loss`` (VTC + VTM only),
    no masking (every token runs: pass2_tokens 'all', random strategies so that no teacher, predictor or lambda is
    built) and the recipe's text length (``eval.text_max_length``)."""
    loss = run.model.loss
    if loss.mlm > 0 or loss.mvm > 0:
        raise ConfigError(f"finetuning trains VTC + VTM only: set model.loss.mlm=0 and model.loss.mvm=0 "
                          f"(got mlm={loss.mlm}, mvm={loss.mvm})")
    mask = dataclasses.replace(pretrained.mask, video_strategy="random", image_strategy="random")
    text = dataclasses.replace(pretrained.text, max_length=run.eval.text_max_length)
    return dataclasses.replace(pretrained, loss=dataclasses.replace(loss), mask=mask, text=text, pass2_tokens="all")


def _split_groups(state: dict[str, torch.Tensor], groups: dict[str, str]) -> tuple[dict, dict[str, int]]:
    """(state without the named top-level groups, {group: number of dropped tensors} for groups present)."""
    kept, dropped = {}, {}
    for key, value in state.items():
        group = key.split(".", 1)[0]
        if group in groups:
            dropped[group] = dropped.get(group, 0) + 1
        else:
            kept[key] = value
    return kept, dropped


def load_pretrained(checkpoint: str | Path, cfg: ModelConfig,
                    drop: dict[str, str] | None = None) -> tuple[STMModel, InitReport]:
    """An STMModel of ``cfg`` initialised from ``checkpoint``: the groups in ``drop`` (default: the
    pretraining-only ones) are removed by name, every other tensor must match the model exactly.

    Returns:
        (model, report of what was dropped).
    """
    from stmvl.api import resolve_model_dir
    from stmvl.models.weights import load_state_dict_strict, read_state_dict
    from stmvl.train.checkpoint import MODEL_FILE

    drop = drop if drop is not None else {g: "pretraining only" for g in PRETRAIN_ONLY_GROUPS}
    directory = resolve_model_dir(checkpoint)
    # the frozen-text cache is pretraining's (its prepare hook fills it); finetuning runs the text layers
    model = STMModel(dataclasses.replace(cfg, text=dataclasses.replace(cfg.text, cache_states=False)))
    present = {key.split(".", 1)[0] for key in model.state_dict()}
    clash = sorted(set(drop) & present)
    if clash:
        raise ConfigError(f"the finetuning model still has the groups {clash} it was asked to drop: check model.loss "
                          "and the masking settings")
    state, dropped = _split_groups(read_state_dict(directory / MODEL_FILE), drop)
    load_state_dict_strict(model, state)
    report = InitReport(str(directory), dropped, {g: drop[g] for g in dropped}, loaded=len(state))
    return model, report


# ------------------------------------------------------------------------------------------------------- data


class RetrievalPairs(RetrievalDataset):
    """Retrieval training pairs: one item per text of the caption mode (single / paragraph / multi).

    ``__getitem__(i) -> {"video": uint8 [T, 3, H, W], "caption": str, "sample_id": id_offset + video index,
    "index": video index}`` (+ ``"foil"`` when the record has one). Texts of one video share its sample id, so they
    are VTC positives of each other. A broken video is replaced (quarantined) by another video and one of its texts.
    """

    def __init__(self, records, media_root, *, mode: str = "multi", id_offset: int = 0, **kwargs):
        if not isinstance(records, PackedRecords):
            records = load_annotations(records, "retrieval")
        # each text's own video (txt2vid may list other matching videos through the records' "gt"); set before
        # the base class runs, because it already asks len(self)
        self.owner, self.first_text = [], []
        for v, record in enumerate(records):
            count = len(record["caption"]) if mode == "multi" and isinstance(record["caption"], list) else 1
            self.first_text.append(len(self.owner))
            self.owner += [v] * count
        super().__init__(records, media_root, mode=mode, **kwargs)
        self.id_offset = int(id_offset)

    def __len__(self) -> int:
        return len(self.owner)

    def __getitem__(self, index: int) -> dict[str, Any]:
        video_index = self.owner[index]
        (video, record), used = self.guard.load(video_index, len(self.records), self.load_clip)
        text = self.texts[index] if used == video_index else self.texts[self.first_text[used]]
        sample = {"video": video, "caption": text, "sample_id": self.id_offset + used, "index": used}
        if "foil" in record and self.mode == "single":
            sample["foil"] = record["foil"]
        return sample


class CachedClips(torch.utils.data.Dataset):
    """Keep every item of ``dataset`` in memory after its first read (decode once, then reuse).

    For small training sets on CPU (the synthetic corpus in tests and the demo), where decoding the clips costs as
    much as the training step itself. The item is cached whole, so the random frame sampling and crop drawn at an
    item's first read are reused in every later epoch: use it only where that loss of augmentation is acceptable.
    The cache lives in the process that reads, so it only pays off with ``data.num_workers=0`` (workers are
    re-created every epoch). ``__getitem__(i)`` returns exactly what ``dataset[i]`` returned the first time.
    """

    def __init__(self, dataset) -> None:
        self.dataset = dataset
        self.cache: dict[int, Any] = {}

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> Any:
        item = self.cache.get(index)
        if item is None:
            item = self.cache[index] = self.dataset[index]
        return item


class QACollator:
    """Collate QADataset items: ``video`` float [B, T, 3, H, W] in [0, 1], ``question_ids`` / ``question_mask``
    long [B, Lq], ``answer_ids`` / ``answer_mask`` long [B, La] (the first accepted answer, [CLS] a [SEP]),
    ``index`` long [B]. Picklable for DataLoader workers."""

    def __init__(self, tokenizer: Callable, question_max_length: int, answer_max_length: int):
        self.tokenizer = tokenizer
        self.question_max_length, self.answer_max_length = question_max_length, answer_max_length

    def __call__(self, samples: list[dict]) -> dict[str, Any]:
        if not samples:
            raise ValueError("cannot collate an empty batch")
        # the Tokenizer cleans the texts (UMT caption cleaning), as for captions
        questions = self.tokenizer([s["question"] for s in samples], max_length=self.question_max_length)
        answers = self.tokenizer([s["answers"][0] for s in samples], max_length=self.answer_max_length)
        return {
            "video": to_float(torch.stack([s["video"] for s in samples])),
            "question_ids": questions["input_ids"], "question_mask": questions["attention_mask"],
            "answer_ids": answers["input_ids"], "answer_mask": answers["attention_mask"],
            "index": torch.tensor([s["index"] for s in samples], dtype=torch.long),
            "media": "video",
        }


def _train_corpora(cfg: RunConfig, kind: str) -> list[CorpusConfig]:
    corpora = [c for c in cfg.data.corpora if c.kind == kind]
    if not corpora:
        raise ConfigError(f"task {cfg.task}: data.corpora has no corpus of kind {kind!r}")
    for c in corpora:
        _require(c.annotation, f"corpus {c.name!r} annotation")
    return corpora


def _train_dataset_kwargs(cfg: RunConfig, run_dir: Path, corpus: CorpusConfig) -> dict[str, Any]:
    d = cfg.data
    return dict(num_frames=d.num_frames, img_size=d.img_size, sampling=d.sampling, train=True, hflip=d.flip,
                crop_scale=tuple(d.crop_scale), seed=cfg.runtime.seed, corpus=corpus.name,
                quarantine=Quarantine(run_dir), max_bad_fraction=d.max_bad_fraction, limits=MediaLimits.from_config(d),
                video_kwargs=video_options(d), decoded_cache_mib=d.decoded_cache_mib)


def retrieval_train_dataset(cfg: RunConfig, run_dir: Path):
    """All retrieval training corpora as one dataset of (video, text) pairs with globally unique video ids."""
    corpora = _train_corpora(cfg, "retrieval")
    records = [load_annotations(c.annotation, "retrieval") for c in corpora]
    offsets = id_offsets([len(r) for r in records])
    datasets = [RetrievalPairs(r, c.media_root, mode=c.caption_mode, id_offset=o, **_train_dataset_kwargs(cfg, run_dir, c))
                for c, r, o in zip(corpora, records, offsets)]
    return datasets[0] if len(datasets) == 1 else _concat(datasets)


def qa_train_dataset(cfg: RunConfig, run_dir: Path):
    """All QA training corpora (each with its own answer list) as one dataset."""
    datasets = []
    for c in _train_corpora(cfg, "qa"):
        if not c.answer_list:
            raise ConfigError(f"data corpus {c.name!r}: a qa corpus needs answer_list")
        datasets.append(QADataset(c.annotation, c.media_root, c.answer_list, **_train_dataset_kwargs(cfg, run_dir, c)))
    return datasets[0] if len(datasets) == 1 else _concat(datasets)


def _eval_common(cfg: RunConfig, corpus: CorpusConfig) -> dict[str, Any]:
    ev = cfg.eval
    return dict(num_frames=ev.num_frames, img_size=ev.img_size or cfg.data.img_size, sampling=ev.sampling,
                train=False, corpus=corpus.name, seed=cfg.runtime.seed, limits=MediaLimits.from_config(cfg.data),
                video_kwargs=video_options(cfg.data))


def evaluate_downstream(model: nn.Module, cfg: RunConfig, device: torch.device | str,
                        autocast: bool = False, final: bool = True) -> dict[str, Any]:
    """{corpus name: result} for every eval corpus: retrieval / probe (STMModel), mc (STMModel), qa (VideoQAModel).

    A corpus kind the model cannot answer (qa for an STMModel, retrieval for a VideoQAModel) is an error.
    ``final``: whether this is the run's last evaluation (eval.itm 'final' scores retrieval and probe with ITM only
    then).
    """
    from stmvl.eval.mc import evaluate_mc
    from stmvl.eval.qa import evaluate_qa

    ev = cfg.eval
    is_qa = isinstance(model, VideoQAModel)
    wrong = [c.name for c in ev.corpora if (c.kind == "qa") != is_qa]
    if wrong:
        raise ConfigError(f"eval corpora {wrong} do not fit a {'VideoQA' if is_qa else 'retrieval'} model")
    results = {} if is_qa else evaluate_corpora(model, cfg, device, autocast=autocast, final=final)
    common = dict(batch_size=ev.batch_size, num_workers=ev.num_workers, device=device, autocast=autocast)
    for c in ev.corpora:
        if c.kind not in ("mc", "qa"):
            continue
        c = local_eval_corpus(cfg, c)
        _require(c.annotation, f"eval corpus {c.name!r} annotation")
        if c.kind == "mc":
            dataset = MCDataset(c.annotation, c.media_root, **_eval_common(cfg, c))
            results[c.name] = evaluate_mc(model, dataset, max_text_len=ev.text_max_length, **common)
        else:
            if not c.answer_list:
                raise ConfigError(f"eval corpus {c.name!r}: a qa corpus needs answer_list")
            dataset = QADataset(c.annotation, c.media_root, c.answer_list, **_eval_common(cfg, c))
            results[c.name] = evaluate_qa(model, dataset, k=ev.qa_topk, max_question_len=ev.text_max_length,
                                          max_answer_len=cfg.finetune.answer_max_length, **common)
    return results


# ------------------------------------------------------------------------------------------------------ tasks


class _FinetuneTask(StreamTask):
    """Engine hooks shared by the finetuning tasks; subclasses give `_dataset`, `_collator` and `_model`."""

    frozen_submodules = ()

    def __init__(self, cfg: RunConfig, checkpoint: str | Path | None = None, *, cache_clips: bool = False):
        checkpoint = checkpoint or cfg.finetune.checkpoint
        if not checkpoint:
            raise ConfigError("finetuning needs a checkpoint: --checkpoint DIR (or finetune.checkpoint=DIR)")
        if cfg.runtime.init_from:
            raise ConfigError("finetuning initialises from --checkpoint; leave runtime.init_from unset")
        self.checkpoint = str(checkpoint)
        self.cache_clips = cache_clips
        cfg.finetune.checkpoint = self.checkpoint
        self.model_dir, pretrained = _checkpoint_config(self.checkpoint)
        cfg.model = finetune_model_config(pretrained, cfg)  # the run's config.yaml then records the real model
        self.cfg = cfg
        self.ctx: TrainContext | None = None
        self.stream: MixedBatchStream | None = None
        self.init_report: InitReport | None = None

    def _report(self, report: InitReport) -> None:
        self.init_report = report
        if self.ctx is None or self.ctx.is_main:
            for line in report.lines():
                log.info("%s", line)
            if self.ctx is not None:
                self.ctx.run_dir.mkdir(parents=True, exist_ok=True)
                (self.ctx.run_dir / "init_report.json").write_text(
                    json.dumps(dataclasses.asdict(report), indent=2), encoding="utf-8")

    def build_stream(self) -> MixedBatchStream:
        ctx = self.ctx
        dataset = self._dataset(ctx.run_dir)
        prefill_decoded_caches(self.cfg, [dataset])
        corpora = [str(getattr(part, "corpus", "?")) for part in getattr(dataset, "datasets", [dataset])]
        require_full_batch("video", corpora, len(dataset), self.cfg.data.video_batch_size, ctx.world_size)
        if self.cache_clips:
            dataset = CachedClips(dataset)
        source = MediaSource(dataset, self.cfg.data.video_batch_size, self._collator())
        return MixedBatchStream({"video": source}, seed=self.cfg.runtime.seed, rank=ctx.rank,
                                world_size=ctx.world_size, num_workers=self.cfg.data.num_workers)

    def evaluate(self, model: nn.Module, epoch: int) -> dict[str, Any]:
        return evaluate_downstream(unwrap_model(model), self.cfg, self.ctx.device,
                                   autocast=self.ctx.precision == "bf16", final=self.ctx.finished)


class RetrievalFinetuneTask(_FinetuneTask):
    """VTC + VTM finetuning of an STMModel (tasks finetune_retrieval and finetune_mc)."""

    def build_model(self) -> nn.Module:
        model, report = load_pretrained(self.checkpoint, self.cfg.model)
        self._report(report)
        return model

    def _dataset(self, run_dir: Path):
        return retrieval_train_dataset(self.cfg, run_dir)

    def _collator(self):
        tokenizer = tokenizer_for(self.cfg.model.text)
        return VideoTextCollator(tokenizer, media="video", max_length=self.cfg.eval.text_max_length)

    def param_groups(self, model: nn.Module) -> list[dict]:
        return unwrap_model(model).param_groups(self.cfg.optim.lr, self.cfg.optim.weight_decay)

    def train_step(self, model: nn.Module, batch: dict, step: int) -> dict[str, torch.Tensor]:
        out = model(batch, step=step)
        return {"loss": out["loss"], **{f"loss_{k}": v.detach() for k, v in out.items() if k != "loss"}}


class QAFinetuneTask(_FinetuneTask):
    """Answer-likelihood finetuning of a VideoQAModel built from the checkpoint's vision and text towers."""

    def build_model(self) -> nn.Module:
        stm, report = load_pretrained(self.checkpoint, self.cfg.model)
        # the projections and the matching head load with the STMModel (strictly), then stay out of the QA model
        for group in QA_UNUSED_GROUPS:
            part = getattr(stm, group)
            report.dropped[group] = len(part.state_dict()) if isinstance(part, nn.Module) else 1
            report.reasons[group] = "not used by answer generation"
        model = VideoQAModel.from_stm(stm)
        fresh = model.decoder.init_report
        if fresh:
            report.reasons["decoder (fresh)"] = f"not copied from the fusion layers (widths differ): {fresh}"
            report.dropped["decoder (fresh)"] = len(fresh)
        self._report(report)
        return model

    def _dataset(self, run_dir: Path):
        return qa_train_dataset(self.cfg, run_dir)

    def _collator(self):
        tokenizer = tokenizer_for(self.cfg.model.text)
        return QACollator(tokenizer, self.cfg.eval.text_max_length, self.cfg.finetune.answer_max_length)

    def train_step(self, model: nn.Module, batch: dict, step: int) -> dict[str, torch.Tensor]:
        out = model(batch)
        return {"loss": out["loss"], "loss_answer_token": out["answer_nll_per_token"]}


# ------------------------------------------------------------------------------------------------------- runs


def make_task(cfg: RunConfig, checkpoint: str | Path | None = None, *, cache_clips: bool = False) -> _FinetuneTask:
    """The finetuning task of ``cfg.task`` (``cache_clips``: decode each training item once, see CachedClips)."""
    if cfg.task in RETRIEVAL_TASKS:
        return RetrievalFinetuneTask(cfg, checkpoint, cache_clips=cache_clips)
    if cfg.task == "finetune_qa":
        return QAFinetuneTask(cfg, checkpoint, cache_clips=cache_clips)
    raise ConfigError(f"task {cfg.task!r} is not a finetuning task; use one of {RETRIEVAL_TASKS + ('finetune_qa',)}")


def _restore_best(trainer: Trainer) -> str | None:
    """Load the weights of the best checkpoint (by eval.best_key) into the trainer's model; its name or None."""
    from stmvl.train.checkpoint import MODEL_FILE, load_weights

    name = trainer.best.get("checkpoint")
    if not name:
        return None
    unwrap_model(trainer.model).load_state_dict(load_weights(trainer.run_dir / "checkpoints" / name / MODEL_FILE))
    return name


def export_finetuned(model: nn.Module, cfg: RunConfig, out_dir: Path) -> Path:
    """Write the finetuned model folder: an STMModel via save_model (loadable by stmvl.load_model), or a
    VideoQAModel's weights with config.json {stmvl_config_type: VideoQAModel, config, finetune}."""
    from stmvl.config import config_to_dict
    from stmvl.models.weights import save_state_dict

    from .pretrain import export_model

    model = unwrap_model(model)
    if not isinstance(model, VideoQAModel):
        return export_model(model, cfg, out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    save_state_dict(model.state_dict(), out_dir / "model.safetensors")
    meta = {"stmvl_config_type": "VideoQAModel", "config": dataclasses.asdict(cfg.model),
            "finetune": config_to_dict(cfg.finetune)}
    (out_dir / "config.json").write_text(json.dumps(meta, indent=2), encoding="utf-8")
    return out_dir


def load_qa_model(directory: str | Path) -> VideoQAModel:
    """A VideoQAModel from a folder written by :func:`export_finetuned` (config.json with ``stmvl_config_type``
    VideoQAModel + model.safetensors), or a run folder with such a ``model/`` inside. Every tensor is loaded
    strictly; the text vocabulary is the one the config names (no original BERT weights are read).

    Raises:
        stmvl.api.ModelDirError (a ValueError): the folder holds another kind of model (use stmvl.load_model for
            an STMModel) or its config.json is invalid (checked before anything is built).
    """
    from stmvl.api import _config_for_loading, read_model_meta, resolve_model_dir
    from stmvl.models.weights import config_from_dict, load_state_dict_strict, read_state_dict
    from stmvl.train.checkpoint import MODEL_FILE

    folder = resolve_model_dir(directory)
    meta = read_model_meta(folder, kinds=("VideoQAModel",))
    cfg = _config_for_loading(config_from_dict(ModelConfig, meta["config"], str(folder / "config.json")))
    # the QA model is built from an STMModel's towers, exactly as QAFinetuneTask built it before training
    model = VideoQAModel.from_stm(STMModel(cfg))
    load_state_dict_strict(model, read_state_dict(folder / MODEL_FILE))
    return model.eval()


def finetune(cfg: RunConfig, checkpoint: str | Path | None = None, *, cache_clips: bool = False) -> dict[str, Any]:
    """Finetune ``checkpoint`` under ``cfg``; export the best (else the last) weights to <run>/model.

    ``cache_clips``: keep the decoded training items in memory (small corpora on CPU; see CachedClips).

    Returns the engine's result plus ``model_dir``, ``best_checkpoint`` and ``init_report``.
    """
    task = make_task(cfg, checkpoint, cache_clips=cache_clips)
    trainer = Trainer(cfg, task)
    result = trainer.fit()
    best = _restore_best(trainer)
    model_dir = Path(result["run_dir"]) / "model"
    if trainer.dist.is_main:
        export_finetuned(trainer.model, cfg, model_dir)
        log.info("finetuned model (%s) written to %s", f"best: {best}" if best else "last step", model_dir)
    result.update(trainer=trainer, model_dir=str(model_dir), best_checkpoint=best, init_report=task.init_report)
    return result
