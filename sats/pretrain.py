"""Pretrain the demo's tiny encoder on the synthetic *pretraining world* and write ``builtin:mit-tiny-synthetic``.

The demo's continual runs start from an encoder that has seen another world first, as the paper's
start from ImageNet: joint training (plain cross-entropy, every class at once) of the demo's tiny
SegFormer (``configs/_base_/models/mit_tiny.yaml``) on the synthetic generator's ``pretrain``
world, whose 20 classes are five other shapes with the demo's four textures
(`sats.data.synthetic`), so it shares no class with the demo. Only the encoder is kept, in
float16, with a record (SHA-256, settings, the command, versions) next to it::

    OMP_NUM_THREADS=1 .venv/bin/python -m sats.pretrain              # writes sats/weights/mit-tiny-synthetic.{pt,json}
    OMP_NUM_THREADS=1 .venv/bin/python -m sats.pretrain --check      # regenerate (in memory), compare with the record

Bit-for-bit: every random draw is seeded (model init, crops, flips, batch order) and the command
runs on the CPU with one thread, so the same machine type with the same torch, numpy and Pillow
versions writes the same bytes (``docs/demo.md``). Another torch version or CPU may round
differently; the file then differs while training as well.
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import json
import logging
import platform
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from sats.data.classes import IGNORE_INDEX
from sats.data.datasets import SegmentationFiles, build_files
from sats.data.synthetic import NUM_CLASSES, ensure_synthetic
from sats.data.transforms import eval_transform, train_transform
from sats.engine.optim import poly_lambda
from sats.io import write_bytes_atomic, write_json_atomic
from sats.models.builtin import WEIGHTS_DIR, file_sha256
from sats.models.config import ModelConfig
from sats.models.segmenter import build_segmenter

log = logging.getLogger("sats")

NAME = "mit-tiny-synthetic"
COMMAND = "OMP_NUM_THREADS=1 .venv/bin/python -m sats.pretrain"
MODEL = {"backbone": "mit_custom", "embed_dims": [16, 32, 64, 128], "depths": [2, 2, 2, 2], "num_heads": [1, 2, 4, 8],
         "sr_ratios": [4, 2, 1, 1], "head": "simple", "decoder_dim": 64, "drop_path": 0.0}
"""The demo's model (``configs/_base_/models/mit_tiny.yaml``; a test keeps the two equal)."""


@dataclass(frozen=True)
class PretrainSettings:
    """Everything that determines the weights (stored in the record)."""

    world: str = "pretrain"
    num_train: int = 1600
    num_val: int = 240
    size: tuple[int, int] = (64, 112)
    data_seed: int = 0
    crop_size: int = 64
    scale: tuple[float, float] = (0.5, 2.0)
    eval_size: int = 64
    batch_size: int = 16
    epochs: int = 16
    lr: float = 0.003
    weight_decay: float = 0.01
    warmup_iters: int = 30
    poly_power: float = 0.9
    seed: int = 0


def _batches(files: SegmentationFiles, settings: PretrainSettings, epoch: int, crops: random.Random):
    """The epoch's shuffled batches (order seeded by (seed, epoch); the last partial batch dropped)."""
    transform = train_transform(settings.crop_size, settings.scale, rng=crops)
    order = torch.randperm(len(files), generator=torch.Generator().manual_seed(settings.seed * 1000 + epoch)).tolist()
    for start in range(0, len(order) - settings.batch_size + 1, settings.batch_size):
        items = [transform(*files.read_pair(i)) for i in order[start:start + settings.batch_size]]
        yield torch.stack([image for image, _ in items]), torch.stack([mask for _, mask in items])


@torch.no_grad()
def evaluate(model: torch.nn.Module, files: SegmentationFiles, eval_size: int) -> float:
    """Mean IoU (fraction) over the 21 classes of ``files`` (background included; center crop ``eval_size``)."""
    model.eval()
    transform = eval_transform(eval_size)
    confusion = torch.zeros(NUM_CLASSES * NUM_CLASSES, dtype=torch.int64)
    for start in range(0, len(files), 32):
        items = [transform(*files.read_pair(i)) for i in range(start, min(start + 32, len(files)))]
        masks = torch.stack([mask for _, mask in items])
        predictions = model(torch.stack([image for image, _ in items])).logits.argmax(1)
        valid = masks != IGNORE_INDEX
        confusion += torch.bincount(masks[valid] * NUM_CLASSES + predictions[valid], minlength=NUM_CLASSES ** 2)
    matrix = confusion.view(NUM_CLASSES, NUM_CLASSES).double()
    union = matrix.sum(0) + matrix.sum(1) - matrix.diag()
    return float((matrix.diag()[union > 0] / union[union > 0]).mean())


def encoder_bytes(encoder: torch.nn.Module) -> bytes:
    """``torch.save`` bytes of the encoder's float16 state dict (in memory: the archive name, and so the
    bytes, do not depend on the file name)."""
    state = {key: value.detach().to(torch.float16).contiguous() for key, value in encoder.state_dict().items()}
    buffer = io.BytesIO()
    torch.save(state, buffer)
    return buffer.getvalue()


def pretrain(settings: PretrainSettings, data_root: Path) -> tuple[bytes, dict[str, Any]]:
    """Train; returns the weights file's bytes and the result figures (val mIoU with the float16 encoder, time)."""
    if torch.get_num_threads() != 1:
        log.warning("pretrain: %d threads; the shipped weights were made with 1 (OMP_NUM_THREADS=1)",
                    torch.get_num_threads())
    tic = time.perf_counter()
    common = dict(size=settings.size, seed=settings.data_seed, world=settings.world)
    root = ensure_synthetic(data_root, num_train=settings.num_train, num_val=settings.num_val, **common)
    train_files, val_files = build_files("voc", root, "train"), build_files("voc", root, "val")
    torch.manual_seed(settings.seed)
    model = build_segmenter(ModelConfig(**MODEL), [NUM_CLASSES])
    optimizer = torch.optim.AdamW(model.parameters(), lr=settings.lr, weight_decay=settings.weight_decay)
    per_epoch = len(train_files) // settings.batch_size
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, poly_lambda(per_epoch * settings.epochs, settings.poly_power, settings.warmup_iters))
    crops = random.Random(settings.seed)
    for epoch in range(settings.epochs):
        model.train()
        total = 0.0
        for images, masks in _batches(train_files, settings, epoch, crops):
            loss = F.cross_entropy(model(images).logits, masks, ignore_index=IGNORE_INDEX)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            total += float(loss.detach())
        log.info("pretrain epoch %d/%d: ce %.4f (%.0f s)", epoch + 1, settings.epochs, total / per_epoch,
                 time.perf_counter() - tic)
    data = encoder_bytes(model.encoder)
    fp16 = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    model.encoder.load_state_dict(fp16)
    miou = evaluate(model, val_files, settings.eval_size)
    seconds = time.perf_counter() - tic
    log.info("pretrain: val mIoU %.1f %% on the pretraining world (float16 encoder), %.0f s", 100 * miou, seconds)
    return data, {"val_miou": round(miou, 4), "seconds": round(seconds, 1), "parameters": sum(
        value.numel() for value in fp16.values())}


def make_record(settings: PretrainSettings, data: bytes, result: dict[str, Any]) -> dict[str, Any]:
    import hashlib

    import PIL

    return {
        "name": NAME,
        "file": f"{NAME}.pt",
        "sha256": hashlib.sha256(data).hexdigest(),
        "bytes": len(data),
        "dtype": "float16",
        "format": "mit",
        "contents": "encoder state dict (our MiT names), torch.save",
        "command": COMMAND,
        "determinism": "CPU, 1 thread, every RNG seeded: same machine type and library versions -> same bytes",
        "model": MODEL,
        "settings": dataclasses.asdict(settings),
        "result": result,
        "versions": {"torch": torch.__version__, "numpy": np.__version__, "pillow": PIL.__version__,
                     "python": platform.python_version(), "machine": platform.machine()},
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sats.pretrain", description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", default=str(WEIGHTS_DIR), help="folder for <name>.pt and <name>.json")
    parser.add_argument("--data", default="data/synthetic-pretrain", help="where the pretraining world is generated")
    parser.add_argument("--check", action="store_true",
                        help="regenerate in memory and compare with the record in --output (writes nothing)")
    parser.add_argument("--epochs", type=int, default=None, help="override (then the file differs from the shipped one)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    torch.set_num_threads(1)
    settings = PretrainSettings() if args.epochs is None else PretrainSettings(epochs=args.epochs)
    data, result = pretrain(settings, Path(args.data))
    record = make_record(settings, data, result)
    output = Path(args.output)
    if args.check:
        shipped = json.loads((output / f"{NAME}.json").read_text())
        same = shipped["sha256"] == record["sha256"] == file_sha256(output / shipped["file"])
        print(f"regenerated {record['sha256']}\nrecorded    {shipped['sha256']}\n"
              f"{'identical' if same else 'DIFFERENT'}")
        return 0 if same else 1
    output.mkdir(parents=True, exist_ok=True)
    write_bytes_atomic(output / record["file"], [data], what="weights")
    write_json_atomic(output / f"{NAME}.json", record, indent=1)
    print(f"wrote {output / record['file']} ({len(data)} bytes, sha256 {record['sha256']}) and {NAME}.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
