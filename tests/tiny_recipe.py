"""The tiny STM pretraining recipe shared by the pretraining tests (a str.format template: braces doubled), and the
tiny model config of the inference and command tests."""

from stmvl.models.config import LossConfig, MaskConfig, ModelConfig, TeacherConfig, TextConfig
from stmvl.models.vit import vit_config


def tiny_inference_config() -> ModelConfig:
    """A model small enough to build and save in milliseconds: VTC + VTM, random masks, no MVM/MLM."""
    return ModelConfig(
        vision=vit_config("tiny", drop_path=0.0),
        teacher=TeacherConfig(img_size=32, patch_size=8, width=32, layers=1, heads=2, embed_dim=16, return_layers=1),
        text=TextConfig(hidden=32, layers=2, heads=2, intermediate=64, fusion_start=1, max_length=16, dropout=0.0),
        mask=MaskConfig(video_strategy="random", image_strategy="random"),
        loss=LossConfig(mlm=0.0, mvm=0.0),
        embed_dim=24,
    )


TEMPLATE = """
task: pretrain
model:
  preset: stm
  vision: {{size: tiny, img_size: 32, patch_size: 8, width: 32, depth: 2, heads: 2, drop_path: 0.0, stem: diff}}
  teacher: {{weights: null, img_size: 32, patch_size: 8, width: 32, layers: 2, heads: 2, embed_dim: 32,
            return_layers: 1}}
  text: {{weights: null, hidden: 32, layers: 2, heads: 2, intermediate: 64, fusion_start: 1, freeze_below: 0,
         max_length: 24, dropout: 0.0}}
  predictor: {{dim: 16, hidden: 16, head_hidden: 8}}
  mask: {{video_strategy: stm, video_ratio: 0.5, image_strategy: attention_inverse, image_ratio: 0.5}}
  loss: {{temporal_negatives: true, foil_negatives: true}}
  embed_dim: 16
data:
  corpora:
    - @CORPUS@
  num_frames: 4
  img_size: 32
  flip: false
  video_batch_size: 8
  num_workers: 0
optim: {{lr: 1.0e-3, max_steps: 4, warmup_steps: 0, precision: fp32, clip_grad: 1.0}}
eval: {{corpora: []}}
runtime: {{@RUNTIME@}}
"""


def tiny_recipe(corpus: str, runtime: str) -> str:
    """The template with one corpus (a YAML flow mapping) and the runtime section's body filled in; the result is
    still a str.format template (its other braces doubled)."""
    return TEMPLATE.replace("@CORPUS@", corpus).replace("@RUNTIME@", runtime)
