"""The data-loader benchmark runs the real training pipeline on VOC-sized files and writes its table."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def test_dataloader_benchmark_on_voc_sized_files(tmp_path):
    from benchmarks.dataloader import main, make_voc_like

    root = make_voc_like(tmp_path / "voc", 3)
    image, mask = Image.open(root / "JPEGImages/000000.jpg"), Image.open(root / "SegmentationClassAug/000000.png")
    assert image.size == (500, 375) and mask.mode == "P" and mask.size == (500, 375)
    out = tmp_path / "dl.json"
    assert main(["--root", str(root), "--workers", "0", "--crop", "64", "--batch", "2", "--out", str(out)]) == 0
    [row] = json.loads(out.read_text())["rows"]
    assert row["workers"] == 0 and row["images_per_s"] > 0
    assert "| workers | images/s |" in out.with_suffix(".md").read_text()
