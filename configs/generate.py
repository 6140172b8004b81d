"""Write the experiment configs of the paper's tables: ``configs/voc/*.yaml`` and ``configs/ade/*.yaml``.

One file per (method, backbone, task, protocol), a few lines over ``_base_``, named
``{method}_{backbone}_{dataset}-{task}[_disjoint].yaml`` with ``name`` equal to the file stem,
so a run lands in ``runs/<stem>``. Methods use ``-`` inside their token (``lwf-mc``) so that
``_`` only separates fields. Backbone tokens: ``mit-b2`` (SegFormer, MiT-B2) and ``r101``
(DeepLabV3, ResNet-101).

    .venv/bin/python configs/generate.py           # (re)write the files generated here
    .venv/bin/python configs/generate.py --check   # exit 1 if one is missing or differs

The SSUL and memory ("-M") files in the same folders are written by hand, not here, except DKD-M and
STAR-M. Rows: docs/methods.md §5.1 (VOC overlapped 15-1, 15-5, 5-3, 10-1), the extra baselines of §3 on
15-5 / 15-1, disjoint variants of 15-5 / 15-1, the ADE20K scripts of §5.2, and DKD / STAR (and their
memory variants) on every task of their schedule tables (§3.14, §3.15), with the official DeepLab
(``r101``: the torchvision flavour of §2.6) and with SegFormer MiT-B2 (the official SegFormer head), and RCIL
(§3.16) on VOC 15-5 / 15-1 / 10-1 / 5-3 / 19-1 (disjoint 15-5 / 15-1 / 10-1) and ADE 100-50 / 100-10 / 100-5 / 50-50
(DeepLab as its paper; MiT-B2 our proposal).
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Tuple

from sats.data.tasks import get_task
from sats.methods import build_method
from sats.report.paper_results import find_paper_result

HERE = Path(__file__).resolve().parent

BACKBONES: Dict[str, Tuple[str, str, str]] = {
    # token: (model base file, model.backbone, description)
    "mit-b2": ("segformer_mit-b2.yaml", "mit_b2", "SegFormer with an MiT-B2 encoder"),
    "r101": ("deeplabv3_r101.yaml", "resnet101", "DeepLabV3, ResNet-101"),
}
VOC_TASKS = ("15-1", "15-5", "5-3", "10-1")
ADE_LAMBDA_SAT_30 = ("25-25", "50-10")  # the reference scripts' λ_sat for these ADE tasks
NOTES = {
    "sats_ade-30.yaml": "λ_sat = 30, as the reference's scripts for ADE 25-25 and 50-10.",
    "sats_deeplab.yaml": "The CNN-feature variant of SATS for DeepLab (not in the paper's VOC table).",
    "plop_ade_deeplab.yaml": "POD factors 0.001 / 0.00001, as PLOP's ADE DeepLab scripts.",
}


#: the sigmoid-head methods of docs/methods.md §3.14-§3.15: their own model, schedule and memory base files
SIGMOID_METHODS = ("dkd", "star")
SIGMOID_MODELS = {"r101": "deeplabv3_r101_tv.yaml", "mit-b2": "segformer_mit-b2_bnrelu.yaml"}
SIGMOID_MEMORY = {("dkd", "voc"): "dkd_voc.yaml", ("dkd", "ade"): "dkd_ade.yaml", ("star", "voc"): "star_voc.yaml"}
SIGMOID_VOC_TASKS = ("19-1", "15-5", "15-1", "10-1", "5-3")
SIGMOID_VOC_DISJOINT = ("19-1", "15-5", "15-1")
SIGMOID_ADE_TASKS = ("100-50", "100-10", "50-50")

#: RCIL (docs/methods.md §3.16): its tasks, its VOC schedule (lr 0.02 at step 0), the ADE PCKD factors; on MiT-B2
#: our proposal (RCIL was published on DeepLab only)
RCIL_VOC_TASKS = ("15-5", "15-1", "10-1", "5-3", "19-1")
RCIL_VOC_DISJOINT = ("15-5", "15-1", "10-1")
RCIL_ADE_TASKS = ("100-50", "100-10", "100-5", "50-50")
BACKBONE_NOTES = {("rcil", "mit-b2"): "RCIL on MiT-B2 is our proposal (docs/methods.md §3.16): twin Mix-FFN depth-wise "
                                      "and fuse convs; factors tuned on DeepLab."}

#: add-on combinations (docs/methods.md §3.17-§3.18), named ``base+addon``: base file ``base_addon[_ade].yaml``
#: (the ``_ade`` one when it exists); their rows: the tasks of the add-on's tables
ADDON_VOC_TASKS = ("15-1", "10-1", "19-1", "5-3", "15-5")
ADDON_ROWS = {
    "mib+ewf": {"voc": ADDON_VOC_TASKS, "ade": ("100-50", "100-10", "100-5")},
    "plop+ewf": {"voc": ADDON_VOC_TASKS},
    "sats+ewf": {"voc": ("15-1", "15-5", "10-1", "5-3")},  # SATS + EWF: not published (our row)
    "mib+nest": {"voc": ("15-5", "15-1", "10-1", "19-1"), "ade": ("100-50", "100-10", "100-5", "50-50")},
    "plop+nest": {"voc": ("15-5", "15-1", "10-1", "19-1"), "ade": ("100-50", "100-10", "100-5", "50-50")},
    "sats+nest": {"voc": ("15-5", "15-1", "10-1", "19-1")},  # SATS + NeST: not published (our row)
}
ADDON_BASES = {("mib+ewf", "ade", "100-50"): "mib_ewf.yaml"}  # EWF's ADE 100-50 script keeps λ_kd = 10
#: ``train`` keys of single rows: NeST's VOC 10-1 scripts train 10 epochs per incremental step (docs/methods.md §3.18)
ROW_TRAIN = {(method, "voc", "10-1"): {"epochs_incremental": 10} for method in ("mib+nest", "plop+nest")}


@dataclass(frozen=True)
class Row:
    method: str  # sats method name
    backbone: str  # token of BACKBONES
    dataset: str  # voc | ade
    task: str
    overlap: bool = True
    memory: bool = False  # the "-M" variant (generated for DKD and STAR only)

    @property
    def stem(self) -> str:
        protocol = "" if self.overlap else "_disjoint"
        token = self.method.replace('_', '-') + ("-m" if self.memory else "")
        return f"{token}_{self.backbone}_{self.dataset}-{self.task}{protocol}"

    def model_base(self) -> str:
        if self.method in SIGMOID_METHODS:
            return SIGMOID_MODELS[self.backbone]
        return BACKBONES[self.backbone][0]

    def schedule_base(self) -> str:
        if self.method == "rcil" and self.dataset == "voc":
            return "rcil_voc.yaml"
        return f"{self.method}_{self.dataset}.yaml" if self.method in SIGMOID_METHODS else f"{self.dataset}.yaml"

    def memory_base(self) -> Optional[str]:
        return SIGMOID_MEMORY[(self.method, self.dataset)] if self.memory else None

    def method_base(self) -> Optional[str]:
        """The ``_base_/methods`` file, or None for methods without hyper-parameters (ft, joint)."""
        if self.method in ("ft", "joint"):
            return None
        if "+" in self.method:
            stem = self.method.replace("+", "_")
            if (self.method, self.dataset, self.task) in ADDON_BASES:
                return ADDON_BASES[(self.method, self.dataset, self.task)]
            ade = HERE / "_base_" / "methods" / f"{stem}_ade.yaml"
            return ade.name if self.dataset == "ade" and ade.is_file() else f"{stem}.yaml"
        if self.method in SIGMOID_METHODS:
            return f"{self.method}_ade.yaml" if self.dataset == "ade" else f"{self.method}.yaml"
        if self.method == "sats":
            if self.backbone == "r101":
                return "sats_deeplab.yaml"
            return "sats_ade-30.yaml" if self.dataset == "ade" and self.task in ADE_LAMBDA_SAT_30 else "sats.yaml"
        if self.method == "rcil" and self.dataset == "ade":
            return "rcil_ade.yaml"
        if self.method == "plop" and self.dataset == "ade" and self.backbone == "r101":
            return "plop_ade_deeplab.yaml"
        return f"{self.method}.yaml"


def voc_rows() -> List[Row]:
    rows: List[Row] = []
    table = {"mit-b2": ("joint", "ft", "ilt", "mib", "plop", "sats"),
             "r101": ("joint", "ft", "lwf_mc", "ilt", "mib", "plop", "sats")}
    extra = {"mit-b2": ("lwf", "lwf_mc", "ewc", "rw", "pi"), "r101": ("lwf", "ewc", "rw", "pi")}
    disjoint = {"mit-b2": ("ft", "ilt", "mib", "plop", "sats"), "r101": ("ft", "lwf_mc", "ilt", "mib", "plop", "sats")}
    for backbone in BACKBONES:
        rows += [Row(m, backbone, "voc", t) for m in table[backbone] for t in VOC_TASKS]
        rows += [Row(m, backbone, "voc", t) for m in extra[backbone] for t in ("15-5", "15-1")]
        rows += [Row(m, backbone, "voc", t, overlap=False) for m in disjoint[backbone] for t in ("15-5", "15-1")]
    for method in SIGMOID_METHODS:
        for backbone in BACKBONES:
            for memory in (False, True):
                rows += [Row(method, backbone, "voc", t, memory=memory) for t in SIGMOID_VOC_TASKS]
                rows += [Row(method, backbone, "voc", t, overlap=False, memory=memory) for t in SIGMOID_VOC_DISJOINT]
    rows += [Row("rcil", b, "voc", t) for b in BACKBONES for t in RCIL_VOC_TASKS]
    rows += [Row("rcil", b, "voc", t, overlap=False) for b in BACKBONES for t in RCIL_VOC_DISJOINT]
    return rows


def ade_rows() -> List[Row]:
    rows = [Row("sats", "mit-b2", "ade", t) for t in ("100-50", "100-10", "100-5", "50-50", "50-10", "25-25", "10-10")]
    rows += [Row("mib", "mit-b2", "ade", t) for t in ("100-10", "100-5", "25-25")]
    rows += [Row("ilt", "mit-b2", "ade", "100-10")]
    rows += [Row("plop", b, "ade", t) for b in BACKBONES for t in ("100-10", "100-50")]
    rows += [Row(m, "mit-b2", "ade", t) for m in ("joint", "ft") for t in ("100-10", "25-25")]
    rows += [Row("dkd", b, "ade", t, memory=memory) for b in BACKBONES for memory in (False, True)
             for t in SIGMOID_ADE_TASKS]
    rows += [Row("star", b, "ade", t) for b in BACKBONES for t in SIGMOID_ADE_TASKS]  # no STAR-M on ADE
    rows += [Row("rcil", b, "ade", t) for b in BACKBONES for t in RCIL_ADE_TASKS]
    return rows


def addon_rows() -> List[Row]:
    """Add-on combinations on DeepLabV3-R101 (the add-ons' papers) and SegFormer MiT-B2."""
    return [Row(method, backbone, dataset, task) for method, tables in ADDON_ROWS.items()
            for dataset, tasks in tables.items() for backbone in BACKBONES for task in tasks
            if not (method.startswith("sats+") and backbone == "r101")]


def all_rows() -> List[Row]:
    return voc_rows() + ade_rows() + addon_rows()


def _published(row: Row) -> str:
    key = row.method + ("-m" if row.memory else "")
    paper = find_paper_result(key, BACKBONES[row.backbone][1], row.task, row.dataset, row.overlap)
    if paper is None:
        return ""
    star = ", quoted from its original paper" if paper.quoted else ""
    where = paper.section
    values = " / ".join(f"{name} {value}" for name, value in (("old", paper.old), ("new", paper.new),
                                                               ("all", paper.all)) if value is not None)
    return f"\n# Published ({where}, row \"{paper.label}\" {paper.network}{star}): {values}."


def render(row: Row) -> str:
    """The YAML text of one config file."""
    _, _, model_desc = BACKBONES[row.backbone]
    if row.method in SIGMOID_METHODS:
        model_desc += " (torchvision flavour, docs/methods.md §2.6)" if row.backbone == "r101" else " and the official head"
    protocol = "overlapped" if row.overlap else "disjoint"
    steps = get_task(row.dataset, row.task).num_steps
    what = ("every class in one step, reported with the task's old/new groups" if row.method == "joint"
            else f"{steps} steps")
    label = build_method({"name": row.method}).label + ("-M" if row.memory else "")
    lines = [f"# {label}, {model_desc}, {row.dataset.upper()} {row.task} ({protocol}; {what})." + _published(row),
             "# Generated by configs/generate.py: edit the generator, then run it.",
             "_base_:",
             f"  - ../_base_/datasets/{row.dataset}.yaml",
             f"  - ../_base_/models/{row.model_base()}",
             f"  - ../_base_/schedules/{row.schedule_base()}"]
    base = row.method_base()
    if base in NOTES:
        lines.insert(1, f"# {NOTES[base]}")
    if (row.method, row.backbone) in BACKBONE_NOTES:
        lines.insert(1, f"# {BACKBONE_NOTES[(row.method, row.backbone)]}")
    if base is not None:
        lines.append(f"  - ../_base_/methods/{base}")
    if row.memory_base() is not None:
        lines.append(f"  - ../_base_/memory/{row.memory_base()}")
    lines += [f"name: {row.stem}", "data:", f"  task: \"{row.task}\""]
    if not row.overlap:
        lines.append("  overlap: false")
    train = ROW_TRAIN.get((row.method, row.dataset, row.task), {})
    if train:
        lines += ["train:", *(f"  {key}: {value}" for key, value in train.items())]
    if base is None:
        lines += ["method:", f"  name: {row.method}"]
    return "\n".join(lines) + "\n"


def path_of(row: Row) -> Path:
    return HERE / row.dataset / f"{row.stem}.yaml"


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="only compare; exit 1 on a missing or stale file")
    args = parser.parse_args(argv)
    rows = all_rows()
    stems = [r.stem for r in rows]
    duplicates = sorted({s for s in stems if stems.count(s) > 1})
    if duplicates:
        raise SystemExit(f"generate.py: duplicate config names {duplicates}")
    stale = []
    for row in rows:
        path, text = path_of(row), render(row)
        if path.is_file() and path.read_text() == text:
            continue
        if args.check:
            stale.append(str(path.relative_to(HERE)))
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
    if args.check and stale:
        print(f"{len(stale)} config file(s) missing or stale (run python configs/generate.py):\n  " + "\n  ".join(stale))
        return 1
    print(f"{len(rows)} config files {'checked' if args.check else 'written'} in {HERE / 'voc'} and {HERE / 'ade'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
