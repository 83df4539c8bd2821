"""Weight import/export, one module per checkpoint family (docs/internals.md, stmvl.models):

* :mod:`.core` -- reading files, rename rules, strict loading with a :class:`LoadReport`;
* :mod:`.bert` -- Hugging Face BERT folders (and UMT's ``text_encoder``);
* :mod:`.clip` -- CLIP image towers as the teacher: OpenAI TorchScript / state dicts, open_clip, HF, ActionCLIP;
* :mod:`.umt` -- UMT stage-1 / stage-2 checkpoints, the folders ``stmvl convert`` writes, student initialisation;
* :mod:`.stmvl` -- stmvl's own model folders (``model.safetensors`` + ``config.json``).

Every name other modules import from ``stmvl.models.weights`` is re-exported here.
"""

from stmvl.models.weights.bert import bert_to_stmvl, load_bert, stmvl_to_bert, text_config_from_hf
from stmvl.models.weights.clip import (
    conv1_as_2d,
    hf_clip_to_stmvl,
    load_clip_vision,
    openai_clip_to_stmvl,
    read_torchscript_state_dict,
    stmvl_to_openai_clip,
    teacher_config_from_state,
)
from stmvl.models.weights.core import (
    LoadReport,
    StateDict,
    WeightLoadError,
    is_torchscript_archive,
    load_state_dict_strict,
    read_state_dict,
)
from stmvl.models.weights.stmvl import config_from_dict, load_model_dir, save_model, save_state_dict
from stmvl.models.weights.umt import (
    UMT_OPTIONAL_GROUPS,
    StudentInit,
    UmtMapping,
    _vision_config_from_state,
    check_against_model,
    init_student,
    model_config_from_umt,
    stmvl_to_umt,
    umt_folder_problems,
    umt_to_stmvl,
    write_umt_checkpoint,
    write_umt_folder,
    write_umt_stage1_folder,
)

__all__ = [
    "LoadReport", "StateDict", "StudentInit", "UMT_OPTIONAL_GROUPS", "UmtMapping", "WeightLoadError",
    "bert_to_stmvl", "check_against_model", "config_from_dict", "conv1_as_2d", "hf_clip_to_stmvl",
    "init_student", "is_torchscript_archive", "load_bert", "load_clip_vision", "load_model_dir",
    "load_state_dict_strict", "model_config_from_umt", "openai_clip_to_stmvl", "read_state_dict",
    "read_torchscript_state_dict", "save_model", "save_state_dict", "stmvl_to_bert", "stmvl_to_openai_clip",
    "stmvl_to_umt", "teacher_config_from_state", "text_config_from_hf", "umt_folder_problems", "umt_to_stmvl",
    "write_umt_checkpoint", "write_umt_folder", "write_umt_stage1_folder",
]
