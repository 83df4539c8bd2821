"""A small but real 'pretrained' checkpoint for the downstream tests (finetuned retrieval, MC, VideoQA).

Finetuning starts from a pretraining checkpoint, so the tests make one the way a user would: the synthetic corpus
(64 px, 8 frames) and a short run of the real pretraining task on the engine (VTC + VTM + MLM on the train clips;
no MVM, so no teacher is needed). The text tower is the packaged MiniLM-L6 with fusion layers 4-5, as in the demo.
A random checkpoint is not a fair start: the fresh cross-attention of the fusion layers carries too little of the
video for VTM to learn in a test-sized budget, and MLM during pretraining is what teaches it to read the video.
"""

from __future__ import annotations

import time
from pathlib import Path

from stmvl.data.synth import generate_corpus

SIZE, TRAIN_CLIPS, TEST_CLIPS, TEXT_LEN = 64, 300, 60, 24  # two-object captions have up to 21 tokens

PRETRAIN_RECIPE = """
task: pretrain
model:
  preset: stm
  vision: {{size: tiny, img_size: {size}, patch_size: 8, width: 64, depth: 2, heads: 2, drop_path: 0.0, stem: diff}}
  text: {{weights: minilm, hidden: 384, layers: 6, heads: 12, intermediate: 1536, fusion_start: 4, freeze_below: 4,
         pooling: mean, max_length: {text_len}, dropout: 0.0}}
  mask: {{video_strategy: random, video_ratio: 0.5, image_strategy: random, image_ratio: 0.5}}
  # VTM negatives from softmax(cosine) (the documented non-reference option): at this budget the reference's
  # softmax(sim / 0.07) picks near-duplicate captions (same colour and shape, other motion) that the tiny model cannot
  # separate yet, and VTM stays at its constant-prediction loss; see docs/method.md
  loss: {{vtc: 1.0, vtm: 1.0, mlm: 1.0, mvm: 0.0, temporal_negatives: false, foil_negatives: false,
         vtm_negatives: cosine}}
  embed_dim: 64
data:
  corpora:
    - {{name: synth_video, media_type: video, annotation: "{data}/annotations/train_video.json", media_root: "{data}"}}
  num_frames: 4
  img_size: {size}
  flip: false
  video_batch_size: 16
  num_workers: 0
optim: {{lr: 1.0e-3, max_steps: {steps}, warmup_steps: 10, precision: fp32, clip_grad: 1.0}}
eval: {{corpora: []}}
runtime: {{seed: 0, log_every: 10, ckpt_every_steps: 0, tensorboard: false, progress: false, threads: 2,
          device: cpu, out_dir: "{out}"}}
"""


def make_pretrained_corpus(root: Path, steps: int = 150) -> Path:
    """Write root/synthetic (the corpus) and root/pretrain (a pretraining run whose model/ finetuning starts from)."""
    from stmvl.tasks.pretrain import load_run_config
    from stmvl.tasks.runs import pretrain

    started = time.perf_counter()
    data = root / "synthetic"
    generate_corpus(data, seed=0, train=TRAIN_CLIPS, test=TEST_CLIPS, probe=4, size=SIZE, frames=8, workers=2)
    recipe = root / "pretrain.yaml"
    recipe.write_text(PRETRAIN_RECIPE.format(size=SIZE, text_len=TEXT_LEN, data=data, steps=steps,
                                             out=root / "pretrain"), encoding="utf-8")
    pretrain(load_run_config(str(recipe)))
    print(f"[downstream] corpus + {steps} pretraining steps in {time.perf_counter() - started:.1f}s")
    return root
