"""BERT text encoder whose top layers cross-attend to video tokens, plus a tied MLM head (docs/method.md, Text side).

Layers ``[0, F)`` are text-only; layers ``[F, L)`` insert cross-attention (keys/values from the video tokens,
width ``cross_width``) between self-attention and the feed-forward, as in UMT/ALBEF. BERT is post-norm:
``x = norm(x + dropout(sublayer(x)))``.

Names (mapped from Hugging Face BERT in ``weights.py``): ``embeddings.{word, position, token_type, norm}``,
``layers.i.{self_attn.{q, k, v, out}, self_norm, cross_attn.{q, k, v, out}, cross_norm, ffn.{fc1, fc2},
ffn_norm}``, ``mlm.{dense, norm, bias}`` (the decoder weight is ``embeddings.word.weight``).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from stmvl.models.config import TextConfig
from stmvl.models.layers import CrossAttention, Mlp, check_heads, init_linear_trunc_normal, layer_norm


class BertEmbeddings(nn.Module):
    """Word + absolute position + token type embeddings, LayerNorm, dropout: ``[B, L] -> [B, L, H]``."""

    def __init__(self, cfg: TextConfig) -> None:
        super().__init__()
        self.word = nn.Embedding(cfg.vocab_size, cfg.hidden)
        self.position = nn.Embedding(cfg.max_position, cfg.hidden)
        self.token_type = nn.Embedding(cfg.type_vocab, cfg.hidden)
        self.norm = layer_norm(cfg.hidden, cfg.layer_norm_eps)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, input_ids: torch.Tensor, token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
        L = input_ids.shape[1]
        if L > self.position.num_embeddings:
            raise ValueError(f"text length {L} exceeds the {self.position.num_embeddings} BERT positions")
        positions = torch.arange(L, device=input_ids.device)
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(input_ids)
        x = self.word(input_ids) + self.position(positions)[None] + self.token_type(token_type_ids)
        return self.dropout(self.norm(x))


class BertLayer(nn.Module):
    """Self-attention (+ cross-attention to video when ``cross_width`` is given) + feed-forward, post-norm."""

    def __init__(self, cfg: TextConfig, cross_width: int | None) -> None:
        super().__init__()
        h, eps = cfg.hidden, cfg.layer_norm_eps
        self.self_attn = CrossAttention(h, cfg.heads, dropout=cfg.dropout)
        self.self_norm = layer_norm(h, eps)
        self.has_cross = cross_width is not None
        if self.has_cross:
            self.cross_attn = CrossAttention(h, cfg.heads, context_dim=cross_width, dropout=cfg.dropout)
            self.cross_norm = layer_norm(h, eps)
        self.ffn = Mlp(h, cfg.intermediate, act="gelu")
        self.ffn_norm = layer_norm(h, eps)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(
        self,
        x: torch.Tensor,
        attn_mask: torch.Tensor | None,
        video: torch.Tensor | None = None,
        video_mask: torch.Tensor | None = None,
        video_index: torch.Tensor | None = None,
        first_token_only: bool = False,
    ) -> torch.Tensor:
        """``x [B, L, H]`` -> ``[B, L, H]``, or ``[B, 1, H]`` (position 0 only) with ``first_token_only``: every
        position is still a key and value of the self-attention, but only the first one is a query and goes through
        the cross-attention and feed-forward; its output is the same as position 0 of the full layer."""
        query = x[:, :1] if first_token_only else x
        x = self.self_norm(query + self.dropout(self.self_attn(query, x, attn_mask=attn_mask)))
        if self.has_cross:
            if video is None:
                raise ValueError("a fusion layer needs video tokens")
            x = self.cross_norm(x + self.dropout(self.cross_attn(x, video, attn_mask=video_mask,
                                                                 context_index=video_index)))
        return self.ffn_norm(x + self.dropout(self.ffn(x)))


class MlmHead(nn.Module):
    """BERT's ``cls.predictions``: dense + GELU + LayerNorm, then the tied word-embedding decoder + bias."""

    def __init__(self, cfg: TextConfig) -> None:
        super().__init__()
        self.dense = nn.Linear(cfg.hidden, cfg.hidden)
        self.norm = layer_norm(cfg.hidden, cfg.layer_norm_eps)
        self.bias = nn.Parameter(torch.zeros(cfg.vocab_size))

    def forward(self, states: torch.Tensor, word_embeddings: torch.Tensor) -> torch.Tensor:
        return F.linear(self.norm(F.gelu(self.dense(states))), word_embeddings, self.bias)


def _key_padding_mask(mask: torch.Tensor | None, what: str, expected: tuple[int, int]) -> torch.Tensor | None:
    """``[B, n]`` (1/True = real token) -> SDPA bool mask ``[B, 1, 1, n]``."""
    if mask is None:
        return None
    if tuple(mask.shape) != expected:
        raise ValueError(f"{what} must be [B, n] = {list(expected)}, got {list(mask.shape)}")
    return mask.bool()[:, None, None, :]


class BertEncoder(nn.Module):
    """BERT with fusion layers. ``cross_width`` = width of the video tokens (default: the text width).

    ``forward(input_ids [B, L], attention_mask [B, L]) -> [B, L, H]``: the text-only layers, or every layer when
    the model has no fusion layers (``fusion_start == layers``). Passing ``video_tokens`` runs both stages.
    ``fuse(text_states, attention_mask, video_tokens [B, n, Dv], video_mask [B, n] | None) -> [B, L, H]``.
    ``mlm_logits(states [B, L, H]) -> [B, L, V]``.
    """

    def __init__(self, cfg: TextConfig, cross_width: int | None = None) -> None:
        super().__init__()
        if not 0 <= cfg.fusion_start <= cfg.layers:
            raise ValueError(f"text.fusion_start must be in [0, {cfg.layers}], got {cfg.fusion_start}")
        check_heads(cfg.hidden, cfg.heads, "text")
        self.cfg = cfg
        self.cross_width = cfg.hidden if cross_width is None else cross_width
        self.embeddings = BertEmbeddings(cfg)
        self.layers = nn.ModuleList(
            BertLayer(cfg, self.cross_width if i >= cfg.fusion_start else None) for i in range(cfg.layers)
        )
        self.mlm = MlmHead(cfg)
        init_linear_trunc_normal(self, std=0.02)

    @property
    def hidden(self) -> int:
        return self.cfg.hidden

    @property
    def has_fusion(self) -> bool:
        return self.cfg.fusion_start < self.cfg.layers

    def encode_text(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, token_type_ids: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Text-only layers ``[0, F)``: ``[B, L] -> [B, L, H]``."""
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be [B, L], got shape {list(input_ids.shape)}")
        mask = _key_padding_mask(attention_mask, "attention_mask", tuple(input_ids.shape))
        x = self.embeddings(input_ids, token_type_ids)
        for layer in self.layers[: self.cfg.fusion_start]:
            x = layer(x, mask)
        return x

    def fuse(
        self,
        text_states: torch.Tensor,
        attention_mask: torch.Tensor,
        video_tokens: torch.Tensor,
        video_mask: torch.Tensor | None = None,
        video_index: torch.Tensor | None = None,
        first_token_only: bool = False,
    ) -> torch.Tensor:
        """Fusion layers ``[F, L)`` on text states ``[B, L, H]`` attending to ``video_tokens [B, n, Dv]``.

        ``video_mask [B, n]``: True/1 = a real video token (None = all real). ``video_index`` (long ``[B]``):
        ``video_tokens`` (and ``video_mask``) hold ``U`` distinct videos ``[U, n, Dv]`` and text ``i`` attends to
        video ``video_index[i]``; each fusion layer projects a video's keys and values once, not once per text.
        ``first_token_only``: return ``[B, 1, H]``, the class position only (what VTM/ITM reads). The last layer
        then runs its queries, cross-attention and feed-forward on that position alone (with two fusion layers
        the pairs cost about 0.6x the FLOPs); the value equals ``[:, :1]`` of the full output.
        """
        if not self.has_fusion:
            raise ValueError("this text encoder has no fusion layers (fusion_start == layers)")
        if video_tokens.dim() != 3 or video_tokens.shape[-1] != self.cross_width:
            raise ValueError(f"video_tokens must be [B, n, {self.cross_width}], got {list(video_tokens.shape)}")
        if video_index is not None and tuple(video_index.shape) != tuple(text_states.shape[:1]):
            raise ValueError(f"video_index must be [B] = [{text_states.shape[0]}], got {list(video_index.shape)}")
        mask = _key_padding_mask(attention_mask, "attention_mask", tuple(text_states.shape[:2]))
        vmask = _key_padding_mask(video_mask, "video_mask", tuple(video_tokens.shape[:2]))
        if vmask is not None and video_index is not None:
            vmask = vmask[video_index]
        x = text_states
        fusion_layers = self.layers[self.cfg.fusion_start :]
        last = len(fusion_layers) - 1
        for i, layer in enumerate(fusion_layers):
            x = layer(x, mask, video_tokens, vmask, video_index, first_token_only=first_token_only and i == last)
        return x

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        video_tokens: torch.Tensor | None = None,
        video_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Text-only states ``[B, L, H]``; with ``video_tokens`` the fused states after all layers."""
        states = self.encode_text(input_ids, attention_mask, token_type_ids)
        if video_tokens is None:
            return states
        return self.fuse(states, attention_mask, video_tokens, video_mask)

    def mlm_logits(self, states: torch.Tensor) -> torch.Tensor:
        """Masked-language-model logits ``[B, L, V]`` of states ``[B, L, H]`` (decoder tied to word embeddings)."""
        return self.mlm(states, self.embeddings.word.weight)


def token_keys(ids: torch.Tensor, mask: torch.Tensor) -> list[bytes]:
    """One hashable key per caption: the bytes of its int64 token ids under the mask (ids, mask: [B, L]).

    Computed in numpy: per-row torch ops cost more than the encoding itself when the engine counts the FLOPs of a
    cache fill (FlopCounterMode intercepts every torch call)."""
    ids_np, keep = ids.cpu().numpy().astype(np.int64, copy=False), mask.cpu().numpy().astype(bool)
    return [row[row_keep].tobytes() for row, row_keep in zip(ids_np, keep)]


class FrozenStateCache:
    """The text-only states of captions the frozen layers ``[0, F)`` have already encoded, keyed by token ids.

    When every text-only layer (and the embeddings) is frozen and dropout is off, a caption's text-only states
    ``[len, H]`` never change during training, so each distinct caption needs one forward, not one per step.
    ``states(encoder, input_ids [B, L], attention_mask [B, L]) -> [B, L, H]`` returns them, encoding the captions
    it has not seen yet (without a graph) and keeping them; positions past a caption's length are zeros (every
    consumer masks padding). Memory: ``real tokens x H x 4`` bytes (the demo's 7,756 captions and foils: 148 MiB).
    """

    def __init__(self) -> None:
        self._states: dict[bytes, torch.Tensor] = {}

    def __len__(self) -> int:
        return len(self._states)

    def clear(self) -> None:
        self._states.clear()

    @property
    def nbytes(self) -> int:
        """Memory held by the cached states."""
        return sum(t.numel() * t.element_size() for t in self._states.values())

    def states(self, encoder: BertEncoder, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Text-only states ``[B, L, H]`` of the batch, from the cache where present (see the class docstring)."""
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be [B, L], got shape {list(input_ids.shape)}")
        rows = [self._states[key] for key in self._encode_missing(encoder, input_ids, attention_mask)]
        out = rows[0].new_zeros(len(rows), input_ids.shape[1], rows[0].shape[-1])
        for i, row in enumerate(rows):
            out[i, : row.shape[0]] = row
        return out

    @torch.no_grad()
    def _encode_missing(self, encoder: BertEncoder, ids: torch.Tensor, mask: torch.Tensor) -> list[bytes]:
        """The key of every row; each distinct caption not cached yet is encoded (once) and kept."""
        keys = token_keys(ids, mask)
        first_row: dict[bytes, int] = {}
        for i, key in enumerate(keys):
            if key not in self._states:
                first_row.setdefault(key, i)
        if first_row:
            rows = list(first_row.values())
            new_mask = mask[rows]
            states = encoder.encode_text(ids[rows], new_mask).float()
            # the real tokens of every new row in one gather (right padding: each row's first `length` positions),
            # split into [length, H] views of that one compact tensor
            kept = states[new_mask.bool()].split(new_mask.sum(1).tolist())
            self._states.update(zip(first_row, kept))
        return keys

    def fill(self, encoder: BertEncoder, tokenizer, texts, batch_size: int = 256) -> int:
        """Encode every text of ``texts`` not cached yet, in batches of similar length; returns how many were new.

        ``tokenizer(list[str]) -> {"input_ids", "attention_mask"}`` (stmvl.data.text.Tokenizer)."""
        device = next(encoder.parameters()).device
        before = len(self)
        todo = sorted(dict.fromkeys(texts), key=len)  # similar lengths pad little
        for start in range(0, len(todo), batch_size):
            tokens = tokenizer(todo[start : start + batch_size])
            self._encode_missing(encoder, tokens["input_ids"].to(device), tokens["attention_mask"].to(device))
        return len(self) - before
