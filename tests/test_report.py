"""Report figures (PNG pixel sizes read back with PIL), tables and report.md / report.json contents."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from stmvl.report import (
    LABEL_WIDTH_PX,
    Section,
    comparison_table,
    draw_masks,
    loss_series,
    plot_loss_curves,
    plot_recalls,
    shade_masked,
    write_report,
)

TABLES = {
    "itc": {"t2v_r1": 41.5, "t2v_r5": 70.0, "t2v_r10": 80.0, "v2t_r1": 39.25, "v2t_r5": 66.0, "v2t_r10": 77.0},
    "itm": {"t2v_r1": 52.0, "t2v_r5": 75.0, "t2v_r10": 85.0, "v2t_r1": 48.0, "v2t_r5": 71.0, "v2t_r10": 82.0},
    "protocol": {"k_test": 128},
}


def png_size(path):
    with Image.open(path) as image:
        assert image.format == "PNG"
        return image.size


def test_loss_curves_one_panel_per_loss(tmp_path):
    jsonl = tmp_path / "metrics.jsonl"
    records = [{"step": s, "loss": 3.0 - s, "loss_vtc": 1.0 / (s + 1), "lr": 1e-4} for s in range(5)]
    records.append({"step": 5, "loss_mvm": 0.5, "eval/itm_r1": 3.0})
    jsonl.write_text("\n".join(json.dumps(r) for r in records) + "\n\n")
    series = loss_series(records)
    assert sorted(series) == ["loss", "loss_mvm", "loss_vtc"]
    assert series["loss"] == ([0, 1, 2, 3, 4], [3.0, 2.0, 1.0, 0.0, -1.0])
    # 3 losses in 2 columns of 200x150 panels -> 400 x 300 pixels.
    path = plot_loss_curves(jsonl, tmp_path / "loss.png", panel_px=(200, 150), columns=2)
    assert png_size(path) == (400, 300)
    with pytest.raises(ValueError, match="no loss"):
        plot_loss_curves([{"step": 0, "lr": 1.0}], tmp_path / "none.png")


def test_recall_plot_size(tmp_path):
    path = plot_recalls(TABLES, tmp_path / "recall.png", title="synthetic", size_px=(500, 250))
    assert png_size(path) == (500, 250)


def test_shade_masked_darkens_only_masked_patches():
    frame = np.full((4, 4, 3), 200, dtype=np.uint8)
    out = shade_masked(frame, np.array([True, False, False, True]), (2, 2))
    # 0.3 * 200 + 0.7 * 40 = 88 on masked patches (top-left and bottom-right 2x2 blocks)
    assert out[0, 0].tolist() == [88, 88, 88] and out[3, 3].tolist() == [88, 88, 88]
    assert out[0, 3].tolist() == [200, 200, 200] and out[3, 0].tolist() == [200, 200, 200]


def test_draw_masks_png_size_per_strategy(tmp_path):
    frames = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8)
    grid, n = (4, 4), 16
    masks = {name: torch.rand(4 * n) < 0.5 for name in ("random", "tube", "attention", "stm")}
    masks["tube2"] = torch.rand(2 * n) < 0.5  # coarser time grid (tubelet stem)
    heat = torch.rand(4, n)
    path = draw_masks(frames, masks, grid, tmp_path / "masks.png", heatmap=heat, cell_px=64)
    assert png_size(path) == (LABEL_WIDTH_PX + 4 * 64, 6 * 64)
    plain = draw_masks(frames, {"random": masks["random"]}, grid, tmp_path / "one.png", cell_px=50)
    assert png_size(plain) == (LABEL_WIDTH_PX + 200, 50)
    with pytest.raises(ValueError, match="multiple of N"):
        draw_masks(frames, {"bad": torch.ones(15, dtype=torch.bool)}, grid, tmp_path / "bad.png")


def test_comparison_table_lists_runs_side_by_side():
    runs = {"stm": {"retrieval": TABLES, "probe": {"itc_acc": 0.91}}, "umt": {"retrieval": TABLES}}
    table = comparison_table(runs, ["retrieval.itm.t2v_r1", "probe.itc_acc"])
    lines = table.splitlines()
    assert lines[0] == "| | retrieval.itm.t2v_r1 | probe.itc_acc |"
    assert lines[2] == "| stm | 52.00 | 0.91 |"
    assert lines[3] == "| umt | 52.00 | - |"


def test_write_report_puts_protocol_next_to_numbers(tmp_path):
    image = plot_recalls(TABLES, tmp_path / "recall.png")
    probe = {"itc_acc": 0.875, "itm_acc": 0.5, "n": 8, "protocol": {"split": "probe", "shuffle_frames": "none"}}
    md_path, json_path = write_report(
        tmp_path,
        Section.from_result("Retrieval", TABLES, images=[image]),
        Section.from_result("Temporal probe", probe, text="Chance is 0.5."),
        title="demo",
    )
    md = md_path.read_text()
    assert "| itm | 52.00 | 75.00 | 85.00 | 48.00 | 71.00 | 82.00 |" in md
    assert "| itc | 41.50 | 70.00 | 80.00 | 39.25 | 66.00 | 77.00 |" in md
    assert "| value | 0.88 | 0.50 | 8 |" in md
    assert "Protocol: k_test=128" in md and "Protocol: split=probe, shuffle_frames=none" in md
    assert "![recall](recall.png)" in md
    data = json.loads(json_path.read_text())
    retrieval, probe_section = data["sections"]
    assert retrieval["numbers"]["itm"]["t2v_r1"] == 52.0 and retrieval["protocol"] == {"k_test": 128}
    assert probe_section["numbers"]["itc_acc"] == 0.875 and probe_section["protocol"]["split"] == "probe"
    assert retrieval["images"] == ["recall.png"]
