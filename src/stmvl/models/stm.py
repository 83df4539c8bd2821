"""The assembled STM model (docs/method.md) and the UMT baseline preset.

One pretraining step on a video batch:
    teacher (frozen)            -> targets [K, B, T*N, C], spatial scores s_sp [B*T, N], patch tokens [B, T, N, W]
    temporal point predictor    -> temporal maps s_tp [B, T, N]                     (stm masking, T >= 2)
    masking                     -> mask bool [B, T*N] (True = masked) + straight-through float copy
    student pass 1 (visible)    -> last K layers -> decoders -> MVM (ST decoder) or UTA (linear decoder)
    student pass 2 (pass2_tokens: masked | visible | all) -> pooled embedding -> VTC; tokens -> VTM, MLM
    (with mask.straight_through 'encoder' the float mask multiplies each pass's input tokens, so every loss trains
    the predictor and lambda; 'decoder' leaves that to MVM through the ST decoder's fill)
    text encoder                -> class token -> VTC; fusion layers over pass-2 tokens -> VTM head, MLM head
Image batches (T = 1) take the same path with the image mask rule and no temporal map.

Submodule names (vision, teacher, text, vision_proj, text_proj, itm_head, temp, predictor, lam, decoders) are the
contract with the UMT weight importer (docs/internals.md).
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from stmvl.config import ConfigError
from stmvl.models.config import ModelConfig, TeacherConfig, TextConfig
from stmvl.models.decoder import LinearDecoder, STDecoder
from stmvl.models.losses import (
    IGNORE_INDEX,
    frame_similarity,
    mlm_loss,
    mlm_mask,
    mvm_loss,
    select_tokens,
    uta_loss,
    vtc_loss,
    vtm_loss,
)
from stmvl.models.masking import make_mask, num_masked
from stmvl.models.randomness import MLM, VTM_NEGATIVES, hash_gumbel, hash_uniform
from stmvl.models.predictor import HEATMAP_FORMS, LAST_FRAME_POINTS, TemporalPointPredictor
from stmvl.models.teacher import CLIPTeacher, TeacherOutput
from stmvl.models.text import BertEncoder, FrozenStateCache
from stmvl.models.vit import VideoViT
from stmvl.models.warm_start import WARM_START_CHOICES, warm_start_from_teacher

log = logging.getLogger(__name__)
# like the teacher's, the text tower's sizes come from its weights file when it has one; the config's values are
# then only compared, to warn when they disagree (dropout, a training setting, is always the config's)
TEXT_SIZE_FIELDS = ("vocab_size", "hidden", "layers", "heads", "intermediate", "max_position", "type_vocab")

LOSS_NAMES = ("vtc", "vtm", "mlm", "mvm")
PASS2_CHOICES = ("masked", "visible", "all")
STRAIGHT_THROUGH_CHOICES = ("encoder", "decoder", "both")
VTM_NEGATIVE_CHOICES = ("temperature", "cosine")

# Method settings of the two presets (docs/method.md, "Presets"): dotted key -> value.
PRESETS: dict[str, dict[str, object]] = {
    "stm": {
        "mask.video_strategy": "stm",
        "mask.video_ratio": 0.7,
        "mask.image_strategy": "attention_inverse",
        "mask.image_ratio": 0.5,
        "pass2_tokens": "masked",
        "decoder": "st",
        "mvm_tokens": "all",
    },
    "umt": {
        "mask.video_strategy": "attention",
        "mask.video_ratio": 0.8,
        "mask.image_strategy": "attention",
        "mask.image_ratio": 0.5,
        "pass2_tokens": "visible",
        "decoder": "linear",
        "mvm_tokens": "visible",
    },
}


def _replace_dotted(cfg, key: str, value):
    head, _, rest = key.partition(".")
    if not rest:
        return dataclasses.replace(cfg, **{head: value})
    return dataclasses.replace(cfg, **{head: _replace_dotted(getattr(cfg, head), rest, value)})


def apply_preset(cfg: ModelConfig, preset: str, explicit: Sequence[str] = ()) -> ModelConfig:
    """A copy of `cfg` with the method settings of preset "stm" (the paper) or "umt" (the baseline).

    Args:
        explicit: dotted keys (e.g. "mask.video_ratio") the user set explicitly; those keep their value.
    """
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose from {sorted(PRESETS)}")
    cfg = dataclasses.replace(cfg, preset=preset)
    for key, value in PRESETS[preset].items():
        if key not in explicit:
            cfg = _replace_dotted(cfg, key, value)
    return cfg


def validate_config(cfg: ModelConfig) -> None:
    """Reject method combinations that cannot run."""
    if cfg.pass2_tokens not in PASS2_CHOICES:
        raise ValueError(f"pass2_tokens must be one of {PASS2_CHOICES}, got {cfg.pass2_tokens!r}")
    if cfg.decoder not in ("st", "linear"):
        raise ValueError(f"decoder must be 'st' or 'linear', got {cfg.decoder!r}")
    if cfg.mvm_tokens not in ("all", "visible"):
        raise ValueError(f"mvm_tokens must be 'all' or 'visible', got {cfg.mvm_tokens!r}")
    if cfg.decoder == "linear" and cfg.mvm_tokens == "all":
        raise ValueError("the linear decoder only predicts visible tokens: use mvm_tokens 'visible' or decoder 'st'")
    for key, scale in (("text.lr_scale", cfg.text.lr_scale), ("vision.lr_scale", cfg.vision.lr_scale)):
        if scale < 0:
            raise ValueError(f"{key} must be >= 0, got {scale}")
    if cfg.text.cache_states and cfg.text.freeze_below < cfg.text.fusion_start:
        raise ValueError(f"text.cache_states needs every text-only layer frozen: text.freeze_below "
                         f"({cfg.text.freeze_below}) must be >= text.fusion_start ({cfg.text.fusion_start})")
    if cfg.text.cache_states and cfg.text.dropout > 0:
        raise ValueError(f"text.cache_states needs text.dropout 0 (got {cfg.text.dropout}): with dropout the "
                         "frozen layers' states change at every step")
    if cfg.mask.logits not in ("log", "reference"):
        raise ValueError(f"mask.logits must be 'log' or 'reference', got {cfg.mask.logits!r}")
    for key, value, allowed in (
        ("mask.straight_through", cfg.mask.straight_through, STRAIGHT_THROUGH_CHOICES),
        ("loss.vtm_negatives", cfg.loss.vtm_negatives, VTM_NEGATIVE_CHOICES),
        ("predictor.heatmap", cfg.predictor.heatmap, HEATMAP_FORMS),
        ("predictor.last_frame_point", cfg.predictor.last_frame_point, LAST_FRAME_POINTS),
        ("vision.warm_start", cfg.vision.warm_start, WARM_START_CHOICES),
    ):
        if value not in allowed:
            raise ValueError(f"{key} must be one of {allowed}, got {value!r}")


def needs_teacher(cfg: ModelConfig) -> bool:
    """The teacher gives MVM targets and the spatial scores of the attention-based masks."""
    score_masks = {"attention", "attention_inverse", "stm"}
    return cfg.loss.mvm > 0 or cfg.mask.video_strategy in score_masks or cfg.mask.image_strategy in score_masks


def build_teacher(cfg: TeacherConfig) -> CLIPTeacher:
    """The frozen teacher: from cfg.weights or random init.

    cfg.weights: OpenAI's TorchScript .pt, an OpenAI/open_clip state dict, an ActionCLIP checkpoint, a HF CLIP or
    open_clip folder, or an stmvl teacher dir. Sizes come from the weights (a warning names any that differ from
    cfg); cfg gives the run options. Only folders record the activation, so files take cfg.act.
    """
    if cfg.weights is None:
        return CLIPTeacher(cfg)
    from stmvl.models.weights import load_clip_vision

    run_options = {"return_layers": cfg.return_layers, "input_norm": cfg.input_norm,
                   "temporal_fusion": cfg.temporal_fusion}
    if cfg.temporal_fusion_norm_eps is not None:
        run_options["temporal_fusion_norm_eps"] = cfg.temporal_fusion_norm_eps
    if not Path(cfg.weights).is_dir():
        run_options["act"] = cfg.act
    teacher = load_clip_vision(cfg.weights, **run_options)
    # img_size is left out: the position table is interpolated to whatever grid the frames give
    sizes = ("patch_size", "width", "layers", "heads", "embed_dim")
    _warn_sizes_from_file("teacher", cfg.weights, cfg, teacher.cfg, sizes)
    return teacher


def _warn_sizes_from_file(what: str, source, wanted, loaded, fields: Sequence[str]) -> None:
    """Log one warning naming every size in `fields` where the loaded weights' config differs from the run's."""
    differ = [f"{k} {getattr(wanted, k)} -> {getattr(loaded, k)}" for k in fields
              if getattr(wanted, k) != getattr(loaded, k)]
    if differ:
        log.warning("%s sizes follow the weights in %s, not the config: %s", what, source, ", ".join(differ))


def text_weights_folder(cfg: TextConfig) -> Path | None:
    """Folder of the text encoder weights ('minilm' = the packaged MiniLM-L6), or None for random init."""
    if cfg.weights is None:
        return None
    if cfg.weights == "minilm":
        from stmvl.data.text import minilm_folder

        return minilm_folder()
    return Path(cfg.weights)


def build_text(cfg: TextConfig, cross_width: int) -> BertEncoder:
    """BERT with fusion layers cross-attending to video tokens of width `cross_width`."""
    folder = text_weights_folder(cfg)
    if folder is None:
        return BertEncoder(cfg, cross_width=cross_width)
    from stmvl.models.weights import load_bert

    text = load_bert(folder, fusion_start=cfg.fusion_start, cross_width=cross_width, dropout=cfg.dropout)
    _warn_sizes_from_file("model.text", folder, cfg, text.cfg, TEXT_SIZE_FIELDS)
    return text


def merge_tubelets(teacher_out: TeacherOutput, tubelet: int) -> TeacherOutput:
    """Average the teacher's per-frame outputs over the frames of each student tubelet (stem 'tubelet2')."""
    if tubelet == 1:
        return teacher_out
    k, b, tn, c = teacher_out.targets.shape
    _, t, n, w = teacher_out.tokens.shape
    targets = teacher_out.targets.view(k, b, t // tubelet, tubelet, n, c).mean(3).reshape(k, b, -1, c)
    attn = teacher_out.attn.view(b, t // tubelet, tubelet, n).mean(2).reshape(-1, n)
    tokens = teacher_out.tokens.view(b, t // tubelet, tubelet, n, w).mean(2)
    return TeacherOutput(targets, attn, tokens)


def is_no_decay(name: str, param: nn.Parameter) -> bool:
    """Biases, norm (LayerNorm/BatchNorm) weights, position tables, the temperature and lambda get no weight decay."""
    return param.ndim <= 1 or name.endswith(".bias") or ".position." in name or name in ("temp", "lam")


def is_pretrained_text(name: str) -> bool:
    """The text encoder's own parameters: all of ``text.*`` but the fusion layers' cross-attention (new layers)."""
    return name.startswith("text.") and ".cross_" not in name


def is_vision_encoder(name: str) -> bool:
    """The student encoder's parameters but its pooling head (``vision.pool_norm``), which only the new
    projections read."""
    return name.startswith("vision.") and not name.startswith("vision.pool_norm.")


class STMModel(nn.Module):
    """STM (or UMT, by preset) video-language model. See the module docstring for the data flow.

    Args:
        cfg: ModelConfig; apply a preset with `apply_preset` first if needed.
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        validate_config(cfg)
        self.cfg = cfg
        self.vision = VideoViT(cfg.vision)
        width = self.vision.width
        self.teacher = build_teacher(cfg.teacher) if needs_teacher(cfg) else None
        self.text = build_text(cfg.text, cross_width=width)
        if (cfg.loss.vtm > 0 or cfg.loss.mlm > 0) and not self.text.has_fusion:
            raise ValueError("VTM and MLM need fusion layers: set text.fusion_start below text.layers")
        self._freeze_text_below(cfg.text.freeze_below)
        self.text_cache = FrozenStateCache() if cfg.text.cache_states else None
        text_width = self.text.hidden
        self.vision_proj = nn.Linear(width, cfg.embed_dim)
        self.text_proj = nn.Linear(text_width, cfg.embed_dim)
        self.itm_head = nn.Linear(text_width, 2)
        self.temp = nn.Parameter(torch.tensor(float(cfg.temp_init)))
        uses_stm = "stm" in (cfg.mask.video_strategy, cfg.mask.image_strategy)
        self.predictor = (
            TemporalPointPredictor(self.teacher.cfg.width, cfg.predictor) if uses_stm and self.teacher else None
        )
        self.lam = nn.Parameter(torch.tensor(float(cfg.mask.lam_init))) if uses_stm else None
        self.decoders = self._build_decoders(width, text_width) if self.teacher is not None else nn.ModuleList()
        self._tokenizer = None
        if cfg.vision.warm_start == "teacher":
            if self.teacher is None or cfg.teacher.weights is None:
                raise ConfigError("model.vision.warm_start=teacher needs trained teacher weights "
                                  "(model.teacher.weights) and a run that builds the teacher")
            warm_start_from_teacher(self.vision, self.teacher)
        if cfg.vision.init:
            from stmvl.models.weights import init_student

            self.student_init = init_student(self, cfg.vision.init)  # strict; logs what loaded

    # ------------------------------------------------------------------------------------------------ building

    def _build_decoders(self, width: int, text_width: int) -> nn.ModuleList:
        k, c = self.teacher.cfg.return_layers, self.teacher.cfg.embed_dim
        if k > len(self.vision.blocks):
            raise ValueError(f"teacher.return_layers={k} exceeds the student depth {len(self.vision.blocks)}")
        if self.cfg.decoder == "st":
            return nn.ModuleList(STDecoder(width, text_width, c, self.cfg.predictor) for _ in range(k))
        return nn.ModuleList(LinearDecoder(width, c) for _ in range(k))

    def _freeze_text_below(self, layers: int) -> None:
        if layers <= 0:
            return
        self.text.embeddings.requires_grad_(False)
        for layer in self.text.layers[:layers]:
            layer.requires_grad_(False)

    @property
    def tokenizer(self):
        """stmvl.data.text.Tokenizer for this text encoder's vocabulary (built on first use)."""
        if self._tokenizer is None:
            from stmvl.data.text import Tokenizer

            vocab = self.cfg.text.vocab
            folder = text_weights_folder(self.cfg.text)
            if vocab is None and folder is not None and (folder / "vocab.txt").is_file():
                vocab = str(folder)
            self._tokenizer = Tokenizer(vocab, self.cfg.text.max_length, expected_vocab_size=self.text.cfg.vocab_size)
        return self._tokenizer

    def train(self, mode: bool = True) -> "STMModel":
        super().train(mode)
        if self.teacher is not None:
            self.teacher.eval()  # frozen: BN-free, but its mode must never follow the student's
        return self

    # --------------------------------------------------------------------------------------------- parameters

    def pretrain_parameters(self) -> list[tuple[str, nn.Parameter]]:
        """Trainable (name, parameter) pairs; the teacher is never among them."""
        return [
            (name, p)
            for name, p in self.named_parameters()
            if p.requires_grad and not name.startswith("teacher.")
        ]

    def param_groups(self, base_lr: float, weight_decay: float) -> list[dict]:
        """AdamW parameter groups: decay / no decay (biases, norms, temp, lam); lam at cfg.mask.lam_lr; the
        predictor (masking and decoder copies) at cfg.mask.predictor_lr when set; the text encoder's own parameters
        at cfg.text.lr_scale x the base lr; the student encoder's at cfg.vision.lr_scale x the base lr. Empty groups
        are dropped."""
        predictor_lr = self.cfg.mask.predictor_lr
        text_scale, vision_scale = self.cfg.text.lr_scale, self.cfg.vision.lr_scale
        groups: dict[str, dict] = {}

        def add(key: str, lr: float, wd: float, p: nn.Parameter) -> None:
            groups.setdefault(key, {"name": key, "params": [], "lr": lr, "weight_decay": wd})["params"].append(p)

        for name, p in self.pretrain_parameters():
            decay = 0.0 if is_no_decay(name, p) else weight_decay
            if name == "lam":
                add("lam", self.cfg.mask.lam_lr, 0.0, p)
            elif predictor_lr is not None and ("predictor." in name or name.startswith("predictor")):
                add(f"predictor_{'decay' if decay else 'no_decay'}", predictor_lr, decay, p)
            elif text_scale != 1.0 and is_pretrained_text(name):
                add(f"text_{'decay' if decay else 'no_decay'}", base_lr * text_scale, decay, p)
            elif vision_scale != 1.0 and is_vision_encoder(name):
                add(f"vision_{'decay' if decay else 'no_decay'}", base_lr * vision_scale, decay, p)
            else:
                add("decay" if decay else "no_decay", base_lr, decay, p)
        return list(groups.values())

    # ------------------------------------------------------------------------------------------------ helpers

    def clamped_lam(self) -> Tensor | None:
        """lambda kept in [0, 1] (its own high learning rate would otherwise carry it out of the mixture range,
        where the clamped mixture gives it no gradient to come back)."""
        if self.lam is None:
            return None
        with torch.no_grad():
            self.lam.clamp_(0.0, 1.0)
        return self.lam

    def clamped_temp(self) -> Tensor:
        with torch.no_grad():
            self.temp.clamp_(self.cfg.temp_min, self.cfg.temp_max)
        return self.temp

    def negative_temperature(self) -> Tensor | float:
        """Temperature of the VTM negative draw: the contrastive temperature (UMT/STM), or 1 with
        loss.vtm_negatives 'cosine'. Clamped out of place: VTC may already hold self.temp in its graph."""
        if self.cfg.loss.vtm_negatives == "cosine":
            return 1.0
        return self.temp.detach().clamp(self.cfg.temp_min, self.cfg.temp_max)

    def grid(self, video: Tensor) -> tuple[int, int, int, int]:
        """(T', N, gh, gw) of the student's token grid for video [B, T, 3, H, W]."""
        _, t, _, h, w = video.shape
        frames, n = self.vision.grid(t, h, w)
        p = self.cfg.vision.patch_size
        return frames, n, h // p, w // p

    def embed_video(self, tokens: Tensor) -> Tensor:
        """Student tokens [B, n, D] -> projected (not normalised) pooled embedding [B, E]."""
        return self.vision_proj(self.vision.pool(tokens))

    def pooled_text(self, states: Tensor, mask: Tensor) -> Tensor:
        """Text states [B, L, H] -> one vector per caption [B, H]: the class token (BERT/UMT), or the mean over
        real tokens (`text.pooling: mean`, for sentence encoders trained that way, such as MiniLM)."""
        if self.cfg.text.pooling == "cls":
            return states[:, 0]
        m = mask.unsqueeze(-1).to(states.dtype)
        return (states * m).sum(1) / m.sum(1).clamp_min(1.0)

    def text_class(self, states: Tensor, mask: Tensor) -> Tensor:
        """Text states [B, L, H] and mask [B, L] -> projected (not normalised) caption embedding [B, E]."""
        return self.text_proj(self.pooled_text(states, mask))

    # ------------------------------------------------------------------------------------------------ forward

    def forward(self, batch: dict, step: int = 0, progress: float | None = None) -> dict[str, Tensor]:
        """Pretraining losses of one batch (docs/internals.md batch dict).

        Args:
            step: global optimisation step (seeds the masks with the sample ids).
            progress: fraction of training done, for the predictor's jitter schedule (None = first phase).

        Returns:
            {"loss": weighted total, "vtc", "vtm", "mlm", "mvm" (those with a non-zero weight)}; stm masking adds
            "mask_lambda" (detached, for logging).
        """
        video, ids, mask_ids = batch["video"], batch["input_ids"], batch["attention_mask"]
        b = video.shape[0]
        sample_ids = batch.get("sample_id")
        if sample_ids is None:
            sample_ids = torch.arange(b, device=video.device)
        weights = {name: float(getattr(self.cfg.loss, name)) for name in LOSS_NAMES}
        frames, n, gh, gw = self.grid(video)
        halve = self.cfg.predictor.jitter_halve_at is not None and progress is not None and (
            progress >= self.cfg.predictor.jitter_halve_at
        )

        teacher_out = None
        if self.teacher is not None:
            teacher_out = merge_tubelets(self.teacher(video, grid=(gh, gw)), self.vision.tubelet)
        mask, mask_st = self.make_batch_mask(teacher_out, b, frames, n, gh, gw, sample_ids, step, halve, video.device)
        keep = ~mask
        # token counts known from the ratio, so the passes gather their tokens without reading the mask back
        n_masked = frames * num_masked(n, self.media_ratio(frames))
        counts = {"visible": frames * n - n_masked, "masked": n_masked}
        pass_weights = self.encoder_mask_weights(mask_st)

        text_states = self.caption_states(ids, mask_ids)
        losses: dict[str, Tensor] = {}
        visible_tokens = None
        if weights["mvm"] > 0:
            losses["mvm"], visible_tokens = self.masked_video_loss(
                video, keep, mask_st, teacher_out, frames, gh, gw, text_states, mask_ids, halve, counts["visible"],
                None if pass_weights is None else pass_weights[0],
            )

        reuse_pass1 = self.cfg.pass2_tokens == "visible" and visible_tokens is not None
        tokens2 = visible_tokens if reuse_pass1 else self.contrastive_tokens(video, keep, pass_weights, counts)
        needs_reversed = self.cfg.loss.temporal_negatives and frames > 1
        reversed_tokens = None
        if needs_reversed:
            reversed_weights = None if pass_weights is None else tuple(
                self.reverse_frames(w, frames) for w in pass_weights
            )
            reversed_tokens = self.contrastive_tokens(
                video.flip(1), self.reverse_frames(keep, frames), reversed_weights, counts
            )
        foil = self.foil_states(batch)

        video_embed, text_embed = self.embed_video(tokens2), self.text_class(text_states, mask_ids)
        if weights["vtc"] > 0:
            losses["vtc"] = vtc_loss(
                video_embed,
                text_embed,
                sample_ids,
                self.clamped_temp(),
                reversed_video=None if reversed_tokens is None else self.embed_video(reversed_tokens),
                foil_text=None if foil is None else self.text_class(*foil),
                pair_weight=self.cfg.loss.temporal_pair_weight,
            )
        if weights["vtm"] > 0:
            sim = frame_similarity(text_embed.detach(), video_embed.detach())
            losses["vtm"] = vtm_loss(
                self.text.fuse,
                self.itm_head,
                tokens2,
                text_states,
                mask_ids,
                sim,
                sample_ids,
                gumbel=hash_gumbel(self.cfg.mask.seed, step, sample_ids, (2, b), VTM_NEGATIVES).transpose(0, 1),
                reversed_tokens=reversed_tokens,
                foil_states=None if foil is None else foil[0],
                foil_mask=None if foil is None else foil[1],
                temp=self.negative_temperature(),
                rows=self.cfg.loss.fusion_samples or None,
            )
        if weights["mlm"] > 0:
            n = self.cfg.loss.fusion_samples or b
            losses["mlm"] = self.masked_language_loss(ids[:n], mask_ids[:n], tokens2[:n], step, sample_ids[:n])

        total = sum(weights[name] * value for name, value in losses.items())
        out = {"loss": total, **losses}
        if self.lam is not None:
            out["mask_lambda"] = self.lam.detach().clone()
        return out

    def media_ratio(self, frames: int) -> float:
        """The mask ratio of a clip (T' > 1) or an image (T' = 1)."""
        return self.cfg.mask.video_ratio if frames > 1 else self.cfg.mask.image_ratio

    def make_batch_mask(
        self, teacher_out, b, frames, n, gh, gw, sample_ids, step, halve, device
    ) -> tuple[Tensor, Tensor]:
        """Mask (bool [B, T'*N]) and its straight-through float copy for this batch's media type."""
        cfg = self.cfg.mask
        strategy = cfg.video_strategy if frames > 1 else cfg.image_strategy
        ratio = self.media_ratio(frames)
        spatial = temporal = None
        if teacher_out is not None:
            if teacher_out.attn.shape[-1] != n:
                raise ValueError(f"teacher grid has {teacher_out.attn.shape[-1]} tokens per frame, student {n}")
            spatial = teacher_out.attn
        if strategy == "stm" and frames > 1:
            predicted = self.predictor(teacher_out.tokens, gh, gw, halve)
            temporal = predicted.frame_map
        return make_mask(
            strategy, ratio, b, frames, n,
            spatial=spatial, temporal=temporal, lam=self.clamped_lam(), seed=cfg.seed, step=step, sample_ids=sample_ids,
            logits=cfg.logits, tau=cfg.tau, device=device, return_st=True,
        )  # fmt: skip

    def masked_video_loss(
        self, video, keep, mask_st, teacher_out, frames, gh, gw, text_states, text_mask, halve, n_visible=None,
        visible_weight=None,
    ) -> tuple[Tensor, Tensor]:
        """Pass 1 on the visible tokens -> decoders -> MVM (all tokens, ST decoder) or UTA (visible tokens).

        n_visible: kept tokens per sample (known from the ratio; see VideoViT.select_kept). visible_weight: the
        straight-through weight of pass 1's input tokens (`encoder_mask_weights(mask_st)[0]`), or None.

        Returns (loss, pass-1 final tokens [B, n_vis, D], reused as the pass-2 tokens when pass2_tokens='visible').
        """
        k = len(self.decoders)
        out = self.vision(video, keep=keep, return_layers=k, keep_weight=visible_weight,
                          keep_count=n_visible)  # layers [K, B, n_vis, D]
        targets = teacher_out.targets
        if self.cfg.decoder == "linear":
            prediction = torch.stack([dec(out.layers[i], keep) for i, dec in enumerate(self.decoders)])
            return uta_loss(prediction, targets, keep), out.tokens
        text_cls = self.pooled_text(text_states, text_mask)
        if self.cfg.mask.straight_through == "encoder":
            mask_st = None  # the decoder fills with the hard mask; the gradient reaches the mask through pass 1
        prediction = torch.stack(
            [dec(out.layers[i], keep, frames, gh, gw, text_cls, mask_st, halve) for i, dec in enumerate(self.decoders)]
        )
        if self.cfg.mvm_tokens == "visible":
            n_vis = out.tokens.shape[1]
            return mvm_loss(select_tokens(prediction, keep, n_vis), select_tokens(targets, keep, n_vis)), out.tokens
        return mvm_loss(prediction, targets), out.tokens

    def contrastive_tokens(
        self, video: Tensor, keep: Tensor, weights: tuple[Tensor, Tensor] | None = None,
        counts: dict[str, int] | None = None,
    ) -> Tensor:
        """Pass 2: student tokens [B, n2, D] of cfg.pass2_tokens (masked / visible / all).

        weights: (visible weight, masked weight) from `encoder_mask_weights`, or None; the matching one multiplies
        the pass's input tokens ('all' runs every token and takes no weight).
        """
        choice = self.cfg.pass2_tokens
        run = {"masked": ~keep, "visible": keep, "all": None}[choice]
        weight = None
        if weights is not None and choice != "all":
            weight = weights[0] if choice == "visible" else weights[1]
        count = None if counts is None or choice == "all" else counts[choice]
        return self.vision(video, keep=run, keep_weight=weight, keep_count=count).tokens

    def encoder_mask_weights(self, mask_st: Tensor) -> tuple[Tensor, Tensor] | None:
        """(1 - mask, mask) as float [B, T'*N] weights of the student's input tokens in pass 1 and pass 2.

        The reference code multiplies the student's embedded tokens by the straight-through mask before gathering
        the kept ones, in both passes; the values stay 1 on every kept token, so this changes gradients only: VTC,
        VTM and MLM train the predictor and lambda as well as MVM. None when mask.straight_through is 'decoder' or
        the mask carries no gradient (masks other than stm, or evaluation under no_grad).
        """
        if self.cfg.mask.straight_through == "decoder" or not mask_st.requires_grad:
            return None
        return 1.0 - mask_st, mask_st

    @staticmethod
    def reverse_frames(tokens_mask: Tensor, frames: int) -> Tensor:
        """A per-token mask [B, T'*N] for the time-reversed clip (frame t -> T'-1-t)."""
        b = tokens_mask.shape[0]
        return tokens_mask.view(b, frames, -1).flip(1).reshape(b, -1)

    def foil_states(self, batch: dict) -> tuple[Tensor, Tensor] | None:
        """Text states and mask of the batch's foil captions when foil negatives are on and present."""
        if not self.cfg.loss.foil_negatives or "foil_input_ids" not in batch:
            return None
        ids, mask = batch["foil_input_ids"], batch["foil_attention_mask"]
        return self.caption_states(ids, mask), mask

    def caption_states(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """Text-only states [B, L, H] of training captions: from the frozen-state cache when text.cache_states is
        on (zeros past each caption's length), else a forward of the text-only layers."""
        if self.text_cache is None:
            return self.text(input_ids, attention_mask)
        return self.text_cache.states(self.text, input_ids, attention_mask)

    def cache_captions(self, texts: Sequence[str], tokenizer=None, batch_size: int = 256) -> int:
        """Encode ``texts`` into the frozen-state cache (text.cache_states); returns how many were new.

        ``tokenizer``: the one that tokenizes the training batches (the cache is keyed by token ids); default
        ``self.tokenizer``."""
        if self.text_cache is None:
            raise ValueError("cache_captions needs model.text.cache_states: true")
        return self.text_cache.fill(self.text, tokenizer or self.tokenizer, texts, batch_size)

    def masked_language_loss(self, ids, mask_ids, video_tokens, step, sample_ids) -> Tensor:
        """MLM: BERT masking of the caption, text layers, fusion layers over the video tokens, CE on masked tokens."""
        tok = self.tokenizer
        masked_ids, labels = mlm_mask(
            ids, mask_ids, vocab_size=self.text.cfg.vocab_size, mask_token_id=tok.mask_token_id,
            special_ids=tok.special_ids, prob=self.cfg.loss.mlm_prob,
            uniforms=hash_uniform(self.cfg.mask.seed, step, sample_ids, (3, ids.shape[1]), MLM),
        )  # fmt: skip
        fused = self.text.fuse(self.text(masked_ids, mask_ids), mask_ids, video_tokens)
        # the vocabulary projection is the costliest matmul of the step: run it on the masked positions only
        # (the loss ignores every other position anyway). The boolean selection reads the count back from the
        # device: the one synchronisation a GPU step keeps, far cheaper than projecting every position.
        positions = (labels != IGNORE_INDEX).nonzero(as_tuple=True)
        return mlm_loss(self.text.mlm_logits(fused[positions]).unsqueeze(0), labels[positions].unsqueeze(0))

    # -------------------------------------------------------------------------------------------- inference

    def tokenize(self, texts: Sequence[str] | dict) -> dict[str, Tensor]:
        """Captions (or an already tokenized dict) -> {"input_ids", "attention_mask"} on the model's device."""
        batch = self.tokenizer(list(texts)) if not isinstance(texts, dict) else texts
        device = self.temp.device
        return {"input_ids": batch["input_ids"].to(device), "attention_mask": batch["attention_mask"].to(device)}

    def video_features(self, video: Tensor) -> tuple[Tensor, Tensor]:
        """All student tokens [B, T'*N, D] and per-frame L2-normalised projections [B, T', E]."""
        tokens = self.vision(video).tokens
        frames = self.grid(video)[0]
        return tokens, F.normalize(self.vision_proj(self.vision.pool_frames(tokens, frames)), dim=-1)

    def encode_video(self, video: Tensor) -> Tensor:
        """Video [B, T, 3, H, W] in [0, 1] -> L2-normalised pooled projection [B, E]."""
        return F.normalize(self.embed_video(self.vision(video).tokens), dim=-1)

    def text_features(self, input_ids: Tensor, attention_mask: Tensor) -> tuple[Tensor, Tensor]:
        """Text-only states [B, L, H] and the L2-normalised class-token projection [B, E]."""
        states = self.text(input_ids, attention_mask)
        return states, F.normalize(self.text_class(states, attention_mask), dim=-1)

    def encode_text(self, texts: Sequence[str] | dict) -> Tensor:
        """Captions or a token dict -> L2-normalised text embeddings [B, E]."""
        batch = self.tokenize(texts)
        return self.text_features(batch["input_ids"], batch["attention_mask"])[1]

    def itm_logits(
        self, video_tokens: Tensor, text_states: Tensor, text_mask: Tensor, video_index: Tensor | None = None
    ) -> Tensor:
        """Video-text matching logits [B, 2] (class 1 = match) of paired video tokens and text states.

        With ``video_index`` (long [B]), ``video_tokens`` [U, n, D] holds the distinct videos and text ``i`` is
        paired with video ``video_index[i]`` (the fusion layers then project each video once)."""
        fused = self.text.fuse(text_states, text_mask, video_tokens, video_index=video_index, first_token_only=True)
        return self.itm_head(fused[:, 0])

    def itm_score(self, video_tokens: Tensor, texts: Sequence[str] | dict) -> Tensor:
        """Match probability [B] of each video with its text."""
        batch = self.tokenize(texts)
        states = self.text(batch["input_ids"], batch["attention_mask"])
        return self.itm_logits(video_tokens, states, batch["attention_mask"]).softmax(-1)[:, 1]
