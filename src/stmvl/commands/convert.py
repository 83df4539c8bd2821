"""``stmvl convert umt SRC OUT`` and ``stmvl convert to-umt SRC_DIR OUT.pth``: UMT checkpoints <-> stmvl folders.

The mapping report (placed, ignored and unplaced keys, absent groups) goes to stdout; a checkpoint that cannot be
written faithfully is refused with one error line (exit 2) and nothing is written.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from stmvl.commands.rule import CommandParser, command
from stmvl.errors import UserError


def _parser() -> CommandParser:
    parser = CommandParser(prog="stmvl convert", description=convert_main.__doc__)
    parser.add_argument("format", choices=["umt", "to-umt"],
                        help="umt: UMT checkpoint -> stmvl folder; to-umt: stmvl folder -> UMT checkpoint")
    parser.add_argument("src", help="umt: UMT checkpoint (.pth / .bin / .safetensors; bare, {'model': ...} or "
                                    "{'module': ...}); to-umt: an stmvl model folder")
    parser.add_argument("out", help="umt: output folder (model.safetensors + config.json); to-umt: output .pth")
    parser.add_argument("--img-size", type=int, default=224, help="input size the student was trained at")
    parser.add_argument("--num-frames", type=int, default=4, help="frames per clip at inference (zero-shot: 4)")
    parser.add_argument("--stage", type=int, choices=[1, 2], default=2,
                        help="to-umt: UMT layout to write (1: encoder + clip_decoder, bare; 2: the full UMT model "
                             "under 'model')")
    parser.add_argument("--allow-unplaced", action="store_true", help="write the output even if keys are unplaced")
    return parser


@command("convert")
def convert_main(argv: Sequence[str]) -> int:
    """``stmvl convert umt SRC OUT``: map a UMT checkpoint to stmvl names and write an stmvl model folder
    (model.safetensors + config.json) that :func:`stmvl.api.load_model` loads strictly into an STMModel.
    ``stmvl convert to-umt SRC_DIR OUT.pth [--stage 1|2]``: the reverse, an stmvl model folder as a UMT checkpoint."""
    args = _parser().parse_args(argv)
    if not 1 <= args.img_size <= 4096 or not 1 <= args.num_frames <= 1024:
        raise UserError(f"--img-size must lie in [1, 4096] and --num-frames in [1, 1024], got {args.img_size} and "
                        f"{args.num_frames}")
    return _to_umt(args) if args.format == "to-umt" else _from_umt(args)


def _from_umt(args) -> int:
    from stmvl.models.weights import (
        WeightLoadError,
        model_config_from_umt,
        read_state_dict,
        umt_folder_problems,
        umt_to_stmvl,
        write_umt_folder,
        write_umt_stage1_folder,
    )

    mapping = umt_to_stmvl(read_state_dict(args.src))
    print(f"UMT stage {mapping.stage}: {len(mapping.state_dict)} tensors placed, "
          f"{len(mapping.ignored)} ignored, {len(mapping.unplaced)} unplaced")
    for key, why in mapping.ignored.items():
        print(f"  ignored {key}: {why}")
    for key in mapping.unplaced:
        print(f"  UNPLACED {key}" + (" (dropped)" if args.allow_unplaced else ""))
    if mapping.unplaced and not args.allow_unplaced:
        raise UserError(f"{args.src}: refusing to write: {len(mapping.unplaced)} keys have no place in stmvl (listed "
                        "above as UNPLACED); pass --allow-unplaced to drop them")
    if mapping.stage == 1:
        write_umt_stage1_folder(mapping, args.out, source=args.src, img_size=args.img_size)
        print(f"wrote {Path(args.out) / 'model.safetensors'} and {Path(args.out) / 'config.json'} (stage 1: video "
              "encoder only)")
        return 0
    try:
        cfg = model_config_from_umt(mapping.state_dict, args.img_size)
    except KeyError as error:  # a tensor the inference needs is absent
        raise WeightLoadError(f"{args.src}: cannot infer the model from the checkpoint: no tensor {error}") from None
    problems, absent = umt_folder_problems(cfg, mapping.state_dict)
    for line in problems:
        print(f"  {line}")
    if problems:
        raise UserError(f"{args.src}: refusing to write: the checkpoint does not fit the inferred STMModel "
                        f"({len(problems)} problems listed above, first: {problems[0]})")
    for group, why in absent.items():
        print(f"  absent group {group!r}: {why}")
    out = write_umt_folder(mapping, cfg, args.out, source=args.src, img_size=args.img_size,
                           num_frames=args.num_frames, absent=absent)
    print(f"wrote {out / 'model.safetensors'} and {out / 'config.json'} "
          f"(ViT {cfg.vision.size}, text {cfg.text.layers} layers fusion from {cfg.text.fusion_start})")
    return 0


def _to_umt(args) -> int:
    from stmvl.models.weights import read_state_dict, stmvl_to_umt, write_umt_checkpoint

    weights = Path(args.src) / "model.safetensors"
    if not weights.is_file():
        raise UserError(f"{args.src}: no model.safetensors (to-umt needs an stmvl model folder)")
    umt, unplaced = stmvl_to_umt(read_state_dict(weights), stage=args.stage)
    for key in unplaced:
        print(f"  UNPLACED {key}" + (" (dropped)" if args.allow_unplaced else ""))
    if unplaced and not args.allow_unplaced:
        raise UserError(f"{args.src}: refusing to write: {len(unplaced)} stmvl tensors have no place in UMT stage "
                        f"{args.stage} (listed above as UNPLACED); pass --allow-unplaced to drop them")
    out = write_umt_checkpoint(umt, args.out, args.stage)
    print(f"wrote {out}: UMT stage {args.stage}, {len(umt)} tensors, {len(unplaced)} dropped")
    return 0
