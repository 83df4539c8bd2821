"""stmvl.models.weights: HF BERT / CLIP parity, real MiniLM, CLIP teacher sources (OpenAI TorchScript, open_clip,
UMT's extracted tower), strict loading, save/load. UMT checkpoints: tests/test_convert_umt.py."""

import json

import pytest
import torch
from torch import nn

from stmvl.data.text import Tokenizer, minilm_folder
from stmvl.models.config import TeacherConfig, TextConfig
from stmvl.models.teacher import CLIPTeacher
from stmvl.models.text import BertEncoder
from stmvl.models.vit import VideoViT, vit_config
from stmvl.models.weights import (
    WeightLoadError,
    load_bert,
    load_clip_vision,
    load_model_dir,
    load_state_dict_strict,
    read_state_dict,
    save_model,
)

transformers = pytest.importorskip("transformers")


def _padded_batch(vocab):
    ids = torch.randint(5, vocab, (3, 7))
    mask = torch.ones_like(ids)
    mask[1, 4:] = 0
    mask[2, 2:] = 0
    ids[mask == 0] = 0
    return ids, mask


@pytest.mark.parametrize("with_mlm", [False, True])
def test_bert_parity_with_transformers(tmp_path, with_mlm):
    cfg = transformers.BertConfig(vocab_size=60, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                  intermediate_size=64, max_position_embeddings=16, attn_implementation="eager")
    ref = (transformers.BertForMaskedLM(cfg) if with_mlm else transformers.BertModel(cfg, add_pooling_layer=True)).eval()
    ref.save_pretrained(tmp_path)
    ours = load_bert(tmp_path).eval()
    ids, mask = _padded_batch(60)
    with torch.no_grad():
        out = ref(input_ids=ids, attention_mask=mask, output_hidden_states=True)
        states = ours(ids, mask)
    assert torch.allclose(states, out.hidden_states[-1], atol=1e-5)
    if with_mlm:
        assert torch.allclose(ours.mlm_logits(states), out.logits, atol=1e-5)
    else:
        assert any(k.startswith("pooler") for k in ours.load_report.ignored)
    # With fusion layers, forward() is the text-only part and the cross-attention is new (allowed missing).
    fused = load_bert(tmp_path, fusion_start=1, cross_width=24).eval()
    assert "layers" in fused.load_report.missing
    with torch.no_grad():
        assert torch.allclose(fused(ids, mask), out.hidden_states[1], atol=1e-5)


def test_load_bert_rejects_unknown_keys(tmp_path):
    cfg = transformers.BertConfig(vocab_size=30, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                  intermediate_size=32, max_position_embeddings=8)
    transformers.BertModel(cfg).save_pretrained(tmp_path)
    sd = read_state_dict(tmp_path / "model.safetensors")
    sd["encoder.layer.0.attention.self.rotary.weight"] = torch.zeros(2)
    from safetensors.torch import save_file

    save_file(sd, str(tmp_path / "model.safetensors"))
    with pytest.raises(WeightLoadError, match="rotary"):
        load_bert(tmp_path)


def test_real_minilm_paraphrases_are_closer():
    model = load_bert(minilm_folder()).eval()
    assert model.cfg.layers == 6 and model.cfg.hidden == 384
    tok = Tokenizer(minilm_folder())
    batch = tok(["a man is playing a guitar", "a person plays the guitar", "a bowl of soup on a kitchen table"])
    with torch.no_grad():
        states = model(batch["input_ids"], batch["attention_mask"])
    m = batch["attention_mask"].unsqueeze(-1).float()
    emb = torch.nn.functional.normalize((states * m).sum(1) / m.sum(1), dim=-1)
    paraphrase, unrelated = (emb[0] @ emb[1]).item(), (emb[0] @ emb[2]).item()
    assert paraphrase > unrelated + 0.3, (paraphrase, unrelated)


def _hf_clip(tmp_path):
    cfg = transformers.CLIPVisionConfig(hidden_size=64, intermediate_size=256, num_hidden_layers=3, num_attention_heads=4,
                                        image_size=32, patch_size=8, projection_dim=24, attn_implementation="eager")
    ref = transformers.CLIPVisionModelWithProjection(cfg).eval()
    ref.save_pretrained(tmp_path)
    return ref


def _openai_layout(ref):
    """The OpenAI CLIP `visual.*` state dict of a HF CLIP vision model, written out by hand."""
    sd, v = {}, ref.vision_model
    sd["visual.conv1.weight"] = v.embeddings.patch_embedding.weight
    sd["visual.class_embedding"] = v.embeddings.class_embedding
    sd["visual.positional_embedding"] = v.embeddings.position_embedding.weight
    for name, mod in (("ln_pre", v.pre_layrnorm), ("ln_post", v.post_layernorm)):
        sd[f"visual.{name}.weight"], sd[f"visual.{name}.bias"] = mod.weight, mod.bias
    for i, layer in enumerate(v.encoder.layers):
        p = f"visual.transformer.resblocks.{i}."
        a = layer.self_attn
        sd[p + "attn.in_proj_weight"] = torch.cat([a.q_proj.weight, a.k_proj.weight, a.v_proj.weight])
        sd[p + "attn.in_proj_bias"] = torch.cat([a.q_proj.bias, a.k_proj.bias, a.v_proj.bias])
        sd[p + "attn.out_proj.weight"], sd[p + "attn.out_proj.bias"] = a.out_proj.weight, a.out_proj.bias
        for ours, mod in (("ln_1", layer.layer_norm1), ("ln_2", layer.layer_norm2), ("mlp.c_fc", layer.mlp.fc1),
                          ("mlp.c_proj", layer.mlp.fc2)):
            sd[p + ours + ".weight"], sd[p + ours + ".bias"] = mod.weight, mod.bias
    sd["visual.proj"] = ref.visual_projection.weight.t()
    sd["token_embedding.weight"] = torch.zeros(10, 4)  # a text-tower key: ignored, and reported as such
    return {k: t.detach().clone() for k, t in sd.items()}


def test_clip_vision_parity_hf_folder_and_openai_file(tmp_path):
    ref = _hf_clip(tmp_path / "hf")
    pixels = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        out = ref(pixel_values=pixels, output_hidden_states=True, output_attentions=True)
        hidden = torch.stack(out.hidden_states[-2:])[:, :, 1:]
        expected = ref.visual_projection(ref.vision_model.post_layernorm(hidden))
    expected_attn = out.attentions[-1][:, :, 0, 1:].mean(1)
    torch.save(_openai_layout(ref), tmp_path / "openai.pt")
    # OpenAI files do not record the head count (CLIP's rule is width / 64), so the tiny test model names it.
    for source, extra in ((tmp_path / "hf", {}), (tmp_path / "openai.pt", {"heads": 4})):
        teacher = load_clip_vision(source, return_layers=2, input_norm="none", **extra)
        assert teacher.cfg.width == 64 and teacher.cfg.layers == 3 and teacher.cfg.embed_dim == 24
        got = teacher(pixels[:, None])  # [B, T=1, 3, H, W]
        assert torch.allclose(got.targets, expected, atol=1e-5), source
        assert torch.allclose(got.attn, expected_attn, atol=1e-5), source
        assert torch.allclose(got.tokens[:, 0], ref.vision_model.embeddings.patch_embedding(pixels).flatten(2).transpose(1, 2), atol=1e-5)
    assert "token_embedding.weight" in teacher.load_report.ignored


def test_clip_temporal_fusion_weights_load(tmp_path):
    ref = _hf_clip(tmp_path / "hf")
    sd = _openai_layout(ref)
    with pytest.raises(WeightLoadError, match="temporal"):
        load_clip_vision(tmp_path / "hf", temporal_fusion=True)
    fusion = CLIPTeacher(TeacherConfig(img_size=32, patch_size=8, width=64, layers=3, heads=4, embed_dim=64,
                                       temporal_fusion=True, temporal_fusion_layers=1, max_frames=8,
                                       return_layers=1)).temporal
    sd["visual.proj"] = torch.randn(64, 64)
    sd["fusion_model.frame_position_embeddings.weight"] = fusion.frame_position_embeddings.weight.clone()
    for k, v in fusion.blocks[0].state_dict().items():
        name = {"attn.qkv.weight": "attn.in_proj_weight", "attn.qkv.bias": "attn.in_proj_bias"}.get(k, k)
        name = name.replace("attn.proj", "attn.out_proj").replace("mlp.fc1", "mlp.c_fc").replace("mlp.fc2", "mlp.c_proj")
        sd[f"fusion_model.transformer.resblocks.0.{name}"] = v.clone()
    torch.save(sd, tmp_path / "actionclip.pt")
    teacher = load_clip_vision(tmp_path / "actionclip.pt", return_layers=1, heads=4)
    assert teacher.cfg.temporal_fusion and teacher.cfg.max_frames == 8
    assert torch.equal(teacher.temporal.blocks[0].mlp.fc2.weight, fusion.blocks[0].mlp.fc2.weight)


class _QuickGELU(nn.Module):
    def forward(self, x):
        return x * torch.sigmoid(1.702 * x)


class _ResidualAttentionBlock(nn.Module):
    """OpenAI clip/model.py ResidualAttentionBlock (nn.MultiheadAttention, mlp c_fc -> act -> c_proj)."""

    def __init__(self, width, heads, act):
        super().__init__()
        self.attn = nn.MultiheadAttention(width, heads)
        self.ln_1 = nn.LayerNorm(width)
        self.mlp = nn.Sequential()
        self.mlp.add_module("c_fc", nn.Linear(width, width * 4))
        self.mlp.add_module("gelu", act())
        self.mlp.add_module("c_proj", nn.Linear(width * 4, width))
        self.ln_2 = nn.LayerNorm(width)

    def forward(self, x):
        h = self.ln_1(x)
        x = x + self.attn(h, h, h, need_weights=False)[0]
        return x + self.mlp(self.ln_2(x))


class _Resblocks(nn.Module):
    def __init__(self, width, layers, heads, act):
        super().__init__()
        self.resblocks = nn.Sequential(*[_ResidualAttentionBlock(width, heads, act) for _ in range(layers)])

    def forward(self, x):
        return self.resblocks(x)


class _OpenAIVisual(nn.Module):
    """OpenAI clip/model.py VisionTransformer; forward returns ``ln_post(x) @ proj`` for every token (OpenAI keeps
    token 0, the image embedding; the patch tokens are the teacher's last-layer targets)."""

    def __init__(self, res=32, patch=8, width=128, layers=2, heads=2, output_dim=24, act=_QuickGELU):
        super().__init__()
        scale = width**-0.5
        self.conv1 = nn.Conv2d(3, width, kernel_size=patch, stride=patch, bias=False)
        self.class_embedding = nn.Parameter(scale * torch.randn(width))
        self.positional_embedding = nn.Parameter(scale * torch.randn((res // patch) ** 2 + 1, width))
        self.ln_pre = nn.LayerNorm(width)
        self.transformer = _Resblocks(width, layers, heads, act)
        self.ln_post = nn.LayerNorm(width)
        self.proj = nn.Parameter(scale * torch.randn(width, output_dim))

    def forward(self, x):
        x = self.conv1(x)
        x = x.reshape(x.shape[0], x.shape[1], -1).permute(0, 2, 1)
        cls = self.class_embedding.to(x.dtype) + torch.zeros(x.shape[0], 1, x.shape[-1], dtype=x.dtype)
        x = torch.cat([cls, x], dim=1) + self.positional_embedding.to(x.dtype)
        x = self.ln_pre(x).permute(1, 0, 2)
        x = self.transformer(x).permute(1, 0, 2)
        return self.ln_post(x) @ self.proj


class _OpenAICLIP(nn.Module):
    """The parts of OpenAI's CLIP the teacher import meets: ``visual.*`` plus text-tower keys to ignore."""

    def __init__(self, act=_QuickGELU):
        super().__init__()
        torch.manual_seed(0)
        self.visual = _OpenAIVisual(act=act)
        self.token_embedding = nn.Embedding(10, 16)
        self.logit_scale = nn.Parameter(torch.ones([]))

    def forward(self, image):
        return self.visual(image)


def _check_teacher_against(teacher, reference, pixels):
    with torch.no_grad():
        expected = reference(pixels)
        got = teacher(pixels[:, None])  # [B, T=1, 3, H, W]
        image = teacher.image_embedding(pixels)
    torch.testing.assert_close(got.targets[-1], expected[:, 1:], atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(image, expected[:, 0], atol=2e-5, rtol=1e-4)
    return (got.targets[-1] - expected[:, 1:]).abs().max().item()


@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning")
def test_openai_torchscript_archive_loads_as_the_teacher(tmp_path):
    """OpenAI publishes TorchScript archives; weights_only torch.load refuses them, the teacher loader reads them."""
    clip = _OpenAICLIP().eval()
    pixels = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        traced = torch.jit.trace(clip, pixels)
    torch.jit.save(traced, str(tmp_path / "ViT-tiny.pt"))
    torch.save(clip.state_dict(), tmp_path / "plain.pt")
    from stmvl.models.weights import is_torchscript_archive

    assert is_torchscript_archive(tmp_path / "ViT-tiny.pt") and not is_torchscript_archive(tmp_path / "plain.pt")
    with pytest.raises(WeightLoadError, match="TorchScript archive"):
        read_state_dict(tmp_path / "ViT-tiny.pt")  # everything but a named CLIP teacher stays weights-only
    teacher = load_clip_vision(tmp_path / "ViT-tiny.pt", return_layers=2, input_norm="none")
    assert (teacher.cfg.width, teacher.cfg.heads, teacher.cfg.layers, teacher.cfg.embed_dim) == (128, 2, 2, 24)
    assert {"token_embedding.weight", "logit_scale"} <= set(teacher.load_report.ignored)
    _check_teacher_against(teacher, clip.visual, pixels)
    # the same tensors as a weights-only state dict, and as UMT's extracted tower (keys without "visual.")
    _check_teacher_against(load_clip_vision(tmp_path / "plain.pt", input_norm="none"), clip.visual, pixels)
    bare = {k[len("visual."):]: v for k, v in clip.state_dict().items() if k.startswith("visual.")}
    torch.save(bare, tmp_path / "vit_tiny.pth")
    _check_teacher_against(load_clip_vision(tmp_path / "vit_tiny.pth", input_norm="none"), clip.visual, pixels)


def test_open_clip_folder_takes_its_activation_from_the_config(tmp_path):
    clip = _OpenAICLIP(act=nn.GELU).eval()  # open_clip's LAION models: nn.GELU unless quick_gelu
    folder = tmp_path / "open_clip"
    folder.mkdir()
    torch.save(clip.state_dict(), folder / "open_clip_pytorch_model.bin")
    (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": {"embed_dim": 24, "vision_cfg": {}}}))
    teacher = load_clip_vision(folder, input_norm="none")
    assert teacher.cfg.act == "gelu"
    _check_teacher_against(teacher, clip.visual, torch.rand(2, 3, 32, 32))


def test_clip_mlp_width_comes_from_the_tensors(tmp_path):
    cfg = transformers.CLIPVisionConfig(hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
                                        image_size=32, patch_size=8, projection_dim=24, attn_implementation="eager")
    ref = transformers.CLIPVisionModelWithProjection(cfg).eval()
    ref.save_pretrained(tmp_path)
    teacher = load_clip_vision(tmp_path, return_layers=1, input_norm="none")
    assert teacher.cfg.mlp_width == 160 and teacher.blocks[0].mlp.fc1.out_features == 160
    pixels = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        out = ref(pixel_values=pixels, output_hidden_states=True)
        expected = ref.visual_projection(ref.vision_model.post_layernorm(out.hidden_states[-1][:, 1:]))
        torch.testing.assert_close(teacher(pixels[:, None]).targets[0], expected, atol=2e-5, rtol=1e-4)


def test_missing_teacher_file_says_what_it_is(tmp_path):
    with pytest.raises(FileNotFoundError, match="CLIP teacher weights not found"):
        load_clip_vision(tmp_path / "ViT-B-16.pt")


def test_strict_loading_reports_by_group():
    model = nn.ModuleDict({"vision": nn.Linear(2, 3), "text": nn.Linear(3, 3)})
    sd = {"vision.weight": torch.zeros(3, 2), "vision.bias": torch.zeros(4), "extra.w": torch.zeros(1)}
    with pytest.raises(WeightLoadError) as error:
        load_state_dict_strict(model, sd)
    message = str(error.value)
    assert "missing [text] (2): text.weight, text.bias" in message
    assert "unexpected [extra] (1): extra.w" in message
    assert "mismatched [vision] (1): vision.bias (model [3] vs checkpoint [4])" in message
    report = load_state_dict_strict(model, {"vision.weight": torch.ones(3, 2), "vision.bias": torch.ones(3)},
                                    allow_missing=("text",))
    assert report.missing == {"text": ["text.weight", "text.bias"]}
    assert torch.equal(model["vision"].weight, torch.ones(3, 2))


def test_save_and_load_model_dir(tmp_path):
    torch.manual_seed(0)
    cfg = TextConfig(vocab_size=40, hidden=32, layers=2, heads=4, intermediate=64, max_position=16, fusion_start=1)
    text = BertEncoder(cfg, cross_width=24).eval()
    save_model(text, cfg, tmp_path / "text")
    back = load_model_dir(tmp_path / "text").eval()
    assert back.cross_width == 24 and back.cfg == cfg
    ids = torch.randint(0, 40, (2, 5))
    assert torch.equal(back(ids, torch.ones_like(ids)), text(ids, torch.ones_like(ids)))
    vcfg = vit_config("tiny", stem="diff")
    save_model(VideoViT(vcfg), vcfg, tmp_path / "vit")
    assert load_model_dir(tmp_path / "vit").cfg == vcfg and isinstance(vcfg.mean, tuple)
    tcfg = TeacherConfig(img_size=32, patch_size=8, width=64, layers=2, heads=4, embed_dim=24, return_layers=1)
    teacher = CLIPTeacher(tcfg)
    save_model(teacher, tcfg, tmp_path / "teacher")
    loaded = load_clip_vision(tmp_path / "teacher")
    assert torch.equal(loaded.proj.weight, teacher.proj.weight)
    meta = json.loads((tmp_path / "vit" / "config.json").read_text())
    meta["config"]["widht"] = 3
    (tmp_path / "vit" / "config.json").write_text(json.dumps(meta))
    with pytest.raises(WeightLoadError, match="widht"):
        load_model_dir(tmp_path / "vit")
