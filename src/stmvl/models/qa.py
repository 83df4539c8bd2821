"""VideoQA model (README.md): question encoder over video + a causal answer decoder; answer-list ranking.

Data flow for a batch of B clips and questions:
    video [B, T, 3, H, W] -> student ViT -> video tokens [B, n, Dv]
    question ids [B, Lq] -> text-only layers -> fusion layers (cross-attention to the video tokens) = question
        states [B, Lq, H]
    answer ids [B, La] ([CLS] answer [SEP]) -> answer decoder: a copy of the fusion layers used causally (causal
        self-attention over the answer tokens, cross-attention to the question states) -> LM head (a copy of the
        MLM head, tied to the decoder's own copy of the word embeddings) -> logits [B, La, V]

Training maximises the answer likelihood (teacher forcing). Inference ranks an answer list: every candidate's first
answer token is scored from the [CLS] step, the top k candidates are re-scored by their full sequence log-likelihood
(all answer tokens and the final [SEP]), and the best one is the prediction, so predictions are always list entries.
"""

from __future__ import annotations

import copy
from typing import Sequence

import torch
from torch import Tensor, nn

from stmvl.models.layers import init_linear_trunc_normal
from stmvl.models.text import BertEncoder, BertLayer
from stmvl.models.vit import VideoViT

__all__ = ["AnswerDecoder", "VideoQAModel", "QA_UNUSED_GROUPS", "answer_log_likelihood"]

# STMModel parts that answer generation does not use (the contrastive projections and the matching head)
QA_UNUSED_GROUPS = ("vision_proj", "text_proj", "itm_head", "temp")


def _causal_mask(answer_mask: Tensor) -> Tensor:
    """``[B, La]`` (1 = real token) -> bool ``[B, 1, La, La]``: position i attends to real positions j <= i."""
    length = answer_mask.shape[1]
    causal = torch.ones(length, length, dtype=torch.bool, device=answer_mask.device).tril()
    return causal[None, None] & answer_mask.bool()[:, None, None, :]


class AnswerDecoder(nn.Module):
    """Causal BERT decoder initialised from the fusion layers of ``text`` (README.md, Evaluation protocol).

    The fusion layers cross-attend to video tokens of width ``text.cross_width``; here the keys are question states
    of width ``H`` (text hidden). Cross-attention key/value weights are copied when the widths agree and freshly
    initialised otherwise; ``init_report`` lists the tensors that were not copied.

    ``forward(answer_ids [B, La], answer_mask [B, La], question_states [B, Lq, H], question_mask [B, Lq])``
    -> logits ``[B, La, V]`` (position i predicts token i + 1).
    """

    def __init__(self, text: BertEncoder) -> None:
        super().__init__()
        cfg = text.cfg
        if not text.has_fusion:
            raise ValueError("the answer decoder copies the fusion layers: the text encoder has none "
                             "(text.fusion_start == text.layers)")
        self.cfg = cfg
        self.embeddings = copy.deepcopy(text.embeddings)
        fusion = text.layers[cfg.fusion_start:]
        self.layers = nn.ModuleList(BertLayer(cfg, cross_width=cfg.hidden) for _ in fusion)
        init_linear_trunc_normal(self.layers, std=0.02)
        self.init_report = self._copy_layers(fusion)
        self.lm = copy.deepcopy(text.mlm)

    def _copy_layers(self, fusion: Sequence[nn.Module]) -> list[str]:
        """Copy every same-shaped tensor of the fusion layers; return the names left at their fresh init."""
        fresh = []
        for i, (target, source) in enumerate(zip(self.layers, fusion)):
            src = source.state_dict()
            own = target.state_dict()
            usable = {k: v for k, v in src.items() if k in own and own[k].shape == v.shape}
            fresh += [f"layers.{i}.{k}" for k in own if k not in usable]
            target.load_state_dict(usable, strict=False)  # the rest is listed in `fresh` (init_report)
        return fresh

    def forward(self, answer_ids: Tensor, answer_mask: Tensor, question_states: Tensor,
                question_mask: Tensor) -> Tensor:
        x = self.embeddings(answer_ids)
        self_mask = _causal_mask(answer_mask)
        cross_mask = question_mask.bool()[:, None, None, :]
        for layer in self.layers:
            x = layer(x, self_mask, question_states, cross_mask)
        return self.lm(x, self.embeddings.word.weight)


def answer_log_likelihood(logits: Tensor, answer_ids: Tensor, answer_mask: Tensor) -> Tensor:
    """Sum of log p(token_{i+1} | tokens_<=i) over the real answer tokens after [CLS].

    Args:
        logits: ``[B, La, V]`` decoder outputs; answer_ids / answer_mask: ``[B, La]``.

    Returns:
        ``[B]`` float32 log-likelihoods (the [SEP] that ends the answer is included, as BERT-style decoders do).
    """
    log_probs = logits[:, :-1].float().log_softmax(-1)
    targets = answer_ids[:, 1:]
    token_ll = log_probs.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    return (token_ll * answer_mask[:, 1:].float()).sum(-1)


class VideoQAModel(nn.Module):
    """Generative VideoQA on STMModel parts: ``vision`` (VideoViT), ``text`` (BertEncoder with fusion layers) and
    ``decoder`` (AnswerDecoder initialised from ``text``'s fusion layers). ``tokenizer``: the WordPiece tokenizer.
    """

    def __init__(self, vision: VideoViT, text: BertEncoder, tokenizer) -> None:
        super().__init__()
        self.vision = vision
        self.text = text
        self.decoder = AnswerDecoder(text)
        self.tokenizer = tokenizer

    @classmethod
    def from_stm(cls, stm: nn.Module) -> "VideoQAModel":
        """Build from an STMModel's (already loaded) vision and text towers; the other parts are not used."""
        return cls(stm.vision, stm.text, stm.tokenizer)

    def question_states(self, video: Tensor, question_ids: Tensor, question_mask: Tensor) -> Tensor:
        """video ``[B, T, 3, H, W]`` in [0, 1], question ids / mask ``[B, Lq]`` -> fused states ``[B, Lq, H]``."""
        tokens = self.vision(video).tokens
        return self.text.fuse(self.text(question_ids, question_mask), question_mask, tokens)

    def forward(self, batch: dict) -> dict[str, Tensor]:
        """Teacher-forced answer likelihood. ``batch``: ``video``, ``question_ids`` / ``question_mask`` [B, Lq],
        ``answer_ids`` / ``answer_mask`` [B, La]. Returns ``{"loss": mean negative log-likelihood per answer,
        "answer_nll_per_token": the same per answer token (for logging)}``."""
        q_mask, a_ids, a_mask = batch["question_mask"], batch["answer_ids"], batch["answer_mask"]
        states = self.question_states(batch["video"], batch["question_ids"], q_mask)
        ll = answer_log_likelihood(self.decoder(a_ids, a_mask, states, q_mask), a_ids, a_mask)
        tokens = a_mask[:, 1:].sum().clamp(min=1)
        return {"loss": -ll.mean(), "answer_nll_per_token": (-ll.sum() / tokens).detach()}

    @torch.no_grad()
    def rank_answers(self, video: Tensor, question_ids: Tensor, question_mask: Tensor, answer_ids: Tensor,
                     answer_mask: Tensor, k: int) -> tuple[Tensor, Tensor, Tensor]:
        """Answer-list ranking.

        Args:
            video: ``[B, T, 3, H, W]``; question_ids / question_mask: ``[B, Lq]``.
            answer_ids / answer_mask: the tokenized answer list ``[A, La]`` ([CLS] answer [SEP], padded).
            k: candidates kept by first-token probability (clipped to A).

        Returns:
            ``best [B]`` indices into the answer list, ``candidates [B, k]`` (first-token top k, best first) and
            ``scores [B, k]`` (full log-likelihood of each candidate).
        """
        b, num_answers = video.shape[0], answer_ids.shape[0]
        k = min(k, num_answers)
        states = self.question_states(video, question_ids, question_mask)
        start = answer_ids[:1, :1].expand(b, 1)  # the [CLS] every answer starts with
        first_logits = self.decoder(start, torch.ones_like(start), states, question_mask)[:, 0].float()
        first = first_logits.log_softmax(-1)[:, answer_ids[:, 1]]  # [B, A]
        candidates = first.topk(k, dim=-1).indices  # [B, k]
        flat = candidates.flatten()
        rep_states = states.repeat_interleave(k, dim=0)
        rep_mask = question_mask.repeat_interleave(k, dim=0)
        logits = self.decoder(answer_ids[flat], answer_mask[flat], rep_states, rep_mask)
        scores = answer_log_likelihood(logits, answer_ids[flat], answer_mask[flat]).view(b, k)
        best = candidates.gather(1, scores.argmax(-1, keepdim=True)).squeeze(1)
        return best, candidates, scores

