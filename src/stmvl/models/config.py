"""Typed model configuration: one dataclass per component, shared by every model file.

These dataclasses are the contract between the model code, the recipes (YAML) and the checkpoints
(`config.json` next to the weights). Field names are the YAML keys under `model:`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass
class VisionConfig:
    """Student video ViT (docs/method.md, "Student"). Input video is float in [0, 1], shape [B, T, 3, H, W]."""

    size: str = "b16"  # tiny | demo | b16 | l16 (sets the defaults below when built by preset)
    img_size: int = 224
    patch_size: int = 16
    width: int = 768
    depth: int = 12
    heads: int = 12
    mlp_ratio: float = 4.0
    drop_path: float = 0.1
    norm_eps: float = 1e-6
    stem: str = "rgb"  # rgb | diff (RGB + difference to previous frame) | tubelet2
    grad_checkpointing: bool = False
    # 1d (sincos over the T*N token index, UMT) | 3d (separable sincos over t, row, column) | learned (a learnt
    # img_size/patch_size square table, interpolated for other grids, plus a learnt per-frame table of max_frames
    # rows that starts at zero; the layout a CLIP teacher's table can be copied into)
    pos_embed: str = "1d"
    max_frames: int = 32  # rows of the learnt per-frame table (pos_embed learned only)
    # a LayerNorm after the patch and position embedding (CLIP's ln_pre); off in UMT/STM. With warm_start teacher
    # the teacher's ln_pre is copied into it, so the blocks see the inputs they were trained on
    pre_norm: bool = False
    # learning rate of the encoder's own parameters (patch embedding, position table, blocks, norms; not the pooling
    # head) as a multiple of the base lr; for a warm-started student, which a new head's first gradients would
    # otherwise overwrite at the full lr. 1 = one lr for all (STM/UMT)
    lr_scale: float = 1.0
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    # Student (and linear decoder) initialisation: a UMT stage-1 checkpoint (encoder.*, clip_decoder.*) or an stmvl
    # model folder; None = random init. Loaded strictly when the model is built (stmvl.models.weights.init_student).
    init: str | None = None
    # none | teacher: copy the teacher's image tower into the student when the model is built (not in STM/UMT: a
    # small-budget option, stmvl.models.warm_start); a later init/resume/load overwrites it like any initialisation
    warm_start: str = "none"


@dataclass
class TeacherConfig:
    """Frozen CLIP image ViT applied per frame (docs/method.md, "Teacher")."""

    weights: str | None = None  # OpenAI/open_clip state dict file, HF CLIP folder, or stmvl teacher dir
    img_size: int = 224
    patch_size: int = 16
    width: int = 768
    layers: int = 12
    heads: int = 12
    embed_dim: int = 512  # C, the projection width = MVM target width
    return_layers: int = 6  # K
    input_norm: str = "clip"  # clip | imagenet (UMT parity) | none
    temporal_fusion: bool = False  # ActionCLIP-style temporal transformer over T at each position
    temporal_fusion_layers: int = 1
    act: str = "quick_gelu"  # quick_gelu (OpenAI CLIP) | gelu (open_clip LAION models)
    norm_eps: float = 1e-5
    max_frames: int = 32  # size of the temporal fusion's frame position table
    mlp_width: int | None = None  # hidden width of each block's MLP; None = 4 * width (every CLIP release)
    temporal_fusion_norm_eps: float | None = None  # None = norm_eps; ActionCLIP's fusion uses 1e-12


@dataclass
class TextConfig:
    """BERT text encoder with fusion (cross-attention) layers from `fusion_start` on (docs/method.md, "Text side")."""

    weights: str | None = None  # HF BERT folder, or "minilm" for the packaged MiniLM-L6
    vocab: str | None = None  # vocab.txt or folder; None = the weights folder's, else packaged bert-base-uncased
    vocab_size: int = 30522
    hidden: int = 768
    layers: int = 12
    heads: int = 12
    intermediate: int = 3072
    max_position: int = 512
    type_vocab: int = 2
    layer_norm_eps: float = 1e-12
    fusion_start: int = 9  # F: layers [0, F) text-only, [F, layers) add cross-attention to video
    max_length: int = 32
    dropout: float = 0.1  # hidden and attention dropout (BERT's hidden_dropout_prob)
    freeze_below: int = 0  # text-only layers below this index (and embeddings if > 0) get no gradient
    pooling: str = "cls"  # caption embedding for VTC / the decoder: cls (BERT, UMT) | mean (sentence encoders)
    # multiplies the base lr for the text encoder's own (pretrained) parameters; the fusion layers' cross-attention
    # is new and keeps the base lr. 1 = one lr for all (UMT); below 1 when the vision side trains from scratch at an
    # lr that would wash out the pretrained text layers
    lr_scale: float = 1.0
    # keep the text-only states of every caption seen in training (FrozenStateCache): needs the text-only layers
    # frozen (freeze_below >= fusion_start) and dropout 0, so that they are a fixed function of the caption; the
    # pretraining task encodes the corpora's captions and foils once before the first step
    cache_states: bool = False


@dataclass
class PredictorConfig:
    """Temporal point predictor (docs/method.md, "Temporal point predictor")."""

    dim: int = 512  # d: teacher tokens are projected W -> d before the pair CNN
    hidden: int = 256
    head_hidden: int = 128
    point_scale: float = 0.75
    plateau: float = 0.25
    slope: float = 1.5
    floor: float = 1.0
    jitter: float = 0.2
    jitter_halve_at: float | None = None  # fraction of training after which the jitter offsets halve
    # product: (floor + p_x)(floor + p_y), values [1, 4] (reference) | bump: floor + p_x * p_y, values [1, 2]
    heatmap: str = field(default="product", metadata={"choices": ("product", "bump")})
    # the masking map's last frame: second = its own point of the last pair | first = the pair's first point
    # (reference masking branch); the ST decoder always uses the second (as the reference decoder does)
    last_frame_point: str = field(default="second", metadata={"choices": ("second", "first")})


@dataclass
class MaskConfig:
    """Masking strategies and ratios (docs/method.md, "Masking"). Masks: bool [B, T*N], True = masked."""

    video_strategy: str = "stm"  # random | tube | attention | attention_inverse | stm
    video_ratio: float = 0.7
    image_strategy: str = "attention_inverse"
    image_ratio: float = 0.5
    logits: str = "log"  # log (Gumbel-top-k on log s) | reference (s used as logits, as the original code)
    tau: float = 0.05
    lam_init: float = 0.5
    lam_lr: float = 5e-2
    predictor_lr: float | None = None  # None = the base lr
    seed: int = 0
    # where the straight-through float mask meets the tokens: encoder = multiplies the student's input tokens in
    # both passes, so every loss trains the mask (reference) | decoder = only the ST decoder's fill (MVM only) | both
    straight_through: str = field(default="encoder", metadata={"choices": ("encoder", "decoder", "both")})


@dataclass
class LossConfig:
    """Loss weights and options (docs/method.md, "Losses")."""

    vtc: float = 1.0
    vtm: float = 1.0
    mlm: float = 1.0
    mvm: float = 1.0
    mlm_prob: float = 0.5
    temporal_negatives: bool = False  # time-reversed clip as extra negative for its own caption
    foil_negatives: bool = False  # corpus-provided foil captions as extra text negatives
    # VTM hard negatives drawn from softmax(cos / temp) (temperature, UMT/STM) or softmax(cos) (cosine, near uniform)
    vtm_negatives: str = field(default="temperature", metadata={"choices": ("temperature", "cosine")})
    # VTM and MLM score the first N samples of each batch only (0 = all, the reference). Their fusion layers run
    # on 3-5 text-video pairs per sample (positive, hard negatives, reversed clip, foil), more than the student
    # costs; the samples are in random order, and VTM's negatives are still drawn from the whole batch.
    fusion_samples: int = 0
    # weight of VTC's two-way terms between each positive and its own temporal negative (reversed clip, foil), on
    # top of the batch-wide softmax where they are one column among B (stmvl.models.losses.vtc_loss); 0 = off
    temporal_pair_weight: float = 0.0


@dataclass
class ModelConfig:
    """The assembled STM / UMT model (docs/method.md)."""

    preset: str = "stm"  # stm | umt (fills the method defaults; explicit keys win)
    vision: VisionConfig = field(default_factory=VisionConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    text: TextConfig = field(default_factory=TextConfig)
    predictor: PredictorConfig = field(default_factory=PredictorConfig)
    mask: MaskConfig = field(default_factory=MaskConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    embed_dim: int = 512  # VTC projection width
    temp_init: float = 0.07
    temp_min: float = 0.001
    temp_max: float = 0.5
    pass2_tokens: str = "masked"  # masked (reference) | visible (reuse pass 1) | all
    decoder: str = "st"  # st (spatio-temporal decoder) | linear (UMT)
    mvm_tokens: str = "all"  # all (STM) | visible (UMT's UTA)


# A model folder or recipe asking for more than this is refused before anything is allocated (ViT-L/16 student +
# CLIP-L/14 teacher + BERT-large, the largest packaged recipe, is about 1e9 parameters).
MAX_PARAMETERS = 4_000_000_000


def estimated_parameters(cfg: ModelConfig) -> dict[str, int]:
    """Parameter counts per tower from the sizes alone (no tensor is built): the dominant matrices of each tower
    (attention and MLP weights, embedding tables), within a few percent of the built model. Used to refuse sizes
    that would exhaust memory before a config's model is allocated."""
    v, t, x = cfg.vision, cfg.teacher, cfg.text
    stem = 6 * 2 * v.patch_size ** 2 * v.width  # up to 6 input channels (diff stem) and a tubelet of 2
    vision = v.depth * v.width ** 2 * int(4 + 2 * v.mlp_ratio) + stem
    teacher_mlp = t.mlp_width or 4 * t.width
    teacher = t.layers * (4 * t.width ** 2 + 2 * t.width * teacher_mlp) + 3 * t.patch_size ** 2 * t.width
    if t.temporal_fusion:
        teacher += t.temporal_fusion_layers * 12 * t.embed_dim ** 2 + t.max_frames * t.embed_dim
    fusion_layers = max(0, x.layers - x.fusion_start)
    text = ((x.vocab_size + x.max_position + x.type_vocab) * x.hidden
            + x.layers * (4 * x.hidden ** 2 + 2 * x.hidden * x.intermediate)
            + fusion_layers * 2 * x.hidden * (x.hidden + v.width))
    p = cfg.predictor
    heads = 2 * cfg.embed_dim * (v.width + x.hidden) + p.dim * (t.width + p.hidden) + p.hidden * p.head_hidden
    return {"vision": vision, "teacher": teacher, "text": text, "heads": heads}
