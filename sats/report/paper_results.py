"""Published numbers, kept as data to compare runs with: the SATS paper's VOC table (docs/methods.md §5.1), the
DKD and STAR READMEs (§5.4) and the methods after 2022 (RCIL, NeST, §5.5).

mIoU (%) after the final step. ``old`` is the mean IoU over the step-0 classes **including background**
(columns "0-15", "0-5", "0-10"), ``new`` over every class added later, ``all`` over every class. Rows marked ★
in the SATS table (``quoted=True``) are copied there from the original publications, not run with the SATS
code. ``None`` = "N/A" in the table, or not published (STAR gives ``all`` only). Every row names its
``source``; the DKD/STAR rows cover VOC overlapped and disjoint and ADE20K overlapped (class 0 counted in old).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, List, Mapping, Optional, Tuple

SOURCE = ("SATS, Pattern Recognition 138 (2023) 109383: VOC table (images/sats_voc.png of "
          "QIU023/SATS_Continual_Semantic_Seg), transcribed in docs/methods.md §5.1")

PAPER_TASKS: Tuple[str, ...] = ("15-1", "15-5", "5-3", "10-1")
"""VOC tasks of the table, in column order (project task names equal the paper's)."""

NETWORK_BACKBONES: Dict[str, Optional[str]] = {
    "DeepLabV3": "resnet101", "SegFormer-B2": "mit_b2", "DeepLabV3+": None, "DeepLabV2": None,
}
"""The table's network column → the ``model.backbone`` that runs it here (None: not in sats)."""


@dataclass(frozen=True)
class PaperResult:
    """One cell group of the table: a method on a network and task."""

    method: str  # method key: a sats method name, ``<name>-m`` for a memory variant, or the paper's name
    label: str  # the row name printed in the paper
    network: str  # the table's network column
    task: str
    old: Optional[float]  # percent
    new: Optional[float]
    all: Optional[float]
    quoted: bool  # ★: quoted from another publication
    dataset: str = "voc"
    overlap: bool = True
    source: str = SOURCE
    section: str = "docs/methods.md §5.1"  # where docs/methods.md transcribes it

    @property
    def backbone(self) -> Optional[str]:
        return NETWORK_BACKBONES[self.network]


# (method key, label, network, quoted, {task: (old, new, all)}), rows in the paper's order.
_NA = (None, None, None)
_ROWS: List[Tuple[str, str, str, bool, Dict[str, Tuple[Optional[float], Optional[float], Optional[float]]]]] = [
    ("joint", "Joint training", "DeepLabV3", False,
     {"15-1": (79.77, 72.35, 77.43), "15-5": (79.77, 72.35, 77.43), "5-3": (76.91, 77.63, 77.43),
      "10-1": (78.41, 76.35, 77.43)}),
    ("lwf_mc", "LwF-MC", "DeepLabV3", True,
     {"15-1": (6.40, 8.90, 6.90), "15-5": (58.10, 35.00, 52.30), "5-3": (20.91, 36.67, 24.66),
      "10-1": (4.65, 5.90, 4.95)}),
    ("ilt", "ILT", "DeepLabV3", True,
     {"15-1": (8.75, 7.99, 8.56), "15-5": (67.08, 39.23, 60.45), "5-3": (22.51, 31.66, 29.04),
      "10-1": (7.15, 3.67, 5.50)}),
    ("mib", "MiB", "DeepLabV3", True,
     {"15-1": (35.1, 13.5, 29.7), "15-5": (75.5, 49.4, 69.0), "5-3": (57.1, 42.5, 46.7),
      "10-1": (12.2, 13.1, 12.6)}),
    ("plop", "PLOP", "DeepLabV3", True,
     {"15-1": (66.25, 24.86, 56.4), "15-5": (75.49, 49.66, 69.34), "5-3": (17.48, 19.16, 18.68),
      "10-1": (44.03, 15.51, 30.45)}),
    ("sdr", "SDR", "DeepLabV3+", True,
     {"15-1": (44.7, 21.8, 39.2), "15-5": (75.4, 52.6, 69.9), "5-3": _NA, "10-1": _NA}),
    ("recall", "RECALL", "DeepLabV2", True,
     {"15-1": (65.7, 47.8, 62.7), "15-5": (66.6, 50.9, 64.0), "5-3": _NA, "10-1": (59.5, 46.7, 54.8)}),
    ("st_cil", "ST-CIL", "DeepLabV3", True,
     {"15-1": (71.4, 40.0, 63.6), "15-5": (76.7, 54.3, 71.1), "5-3": _NA, "10-1": _NA}),
    ("ssul", "SSUL", "DeepLabV3", True,
     {"15-1": (78.06, 28.54, 66.27), "15-5": (77.42, 47.16, 70.21), "5-3": (71.17, 45.38, 52.75),
      "10-1": (73.78, 41.13, 58.23)}),
    ("ssul-m", "SSUL-M", "DeepLabV3", True,
     {"15-1": (78.92, 43.86, 70.58), "15-5": (79.53, 52.87, 73.19), "5-3": (72.91, 49.02, 55.85),
      "10-1": (74.79, 48.87, 62.45)}),
    ("joint", "Joint training", "SegFormer-B2", False,
     {"15-1": (80.84, 74.97, 79.44), "15-5": (80.84, 74.97, 79.44), "5-3": (78.36, 79.87, 79.44),
      "10-1": (80.46, 78.32, 79.44)}),
    ("ilt", "ILT", "SegFormer-B2", False,
     {"15-1": (17.44, 12.13, 16.18), "15-5": (49.07, 53.97, 50.24), "5-3": (13.20, 15.43, 14.79),
      "10-1": (6.67, 6.13, 6.41)}),
    ("mib", "MiB", "SegFormer-B2", False,
     {"15-1": (73.21, 37.93, 64.81), "15-5": (78.78, 60.93, 74.53), "5-3": (61.12, 58.02, 58.56),
      "10-1": (48.7, 39.58, 44.36)}),
    ("plop", "PLOP", "SegFormer-B2", False,
     {"15-1": (64.59, 37.23, 58.08), "15-5": (72.51, 48.37, 66.76), "5-3": (35.65, 32.71, 33.54),
      "10-1": (48.53, 33.71, 41.47)}),
    ("ssul", "SSUL", "SegFormer-B2", False,
     {"15-1": (79.91, 40.56, 70.54), "15-5": (79.91, 56.83, 74.41), "5-3": (74.33, 60.79, 64.66),
      "10-1": (74.06, 51.85, 63.48)}),
    ("ilt-m", "ILT-M", "SegFormer-B2", False,
     {"15-1": (15.15, 11.01, 14.16), "15-5": (49.85, 53.49, 50.72), "5-3": (12.91, 15.43, 14.71),
      "10-1": (6.75, 6.07, 6.42)}),
    ("mib-m", "MiB-M", "SegFormer-B2", False,
     {"15-1": (73.89, 58.39, 70.72), "15-5": (79.91, 63.56, 75.20), "5-3": (70.11, 65.17, 66.58),
      "10-1": (69.73, 56.28, 63.33)}),
    ("plop-m", "PLOP-M", "SegFormer-B2", False,
     {"15-1": (71.11, 52.61, 66.70), "15-5": (78.53, 65.58, 75.44), "5-3": (67.29, 62.91, 64.16),
      "10-1": (57.94, 51.64, 54.94)}),
    ("ssul-m", "SSUL-M", "SegFormer-B2", False,
     {"15-1": (79.84, 49.33, 72.58), "15-5": (79.84, 55.82, 74.12), "5-3": (76.04, 61.95, 65.98),
      "10-1": (74.23, 52.24, 63.76)}),
    ("sats", "SATS", "SegFormer-B2", False,
     {"15-1": (78.38, 62.02, 74.48), "15-5": (80.24, 61.17, 75.70), "5-3": (75.43, 64.13, 67.36),
      "10-1": (64.27, 58.66, 61.60)}),
    ("sats-m", "SATS-M", "SegFormer-B2", False,
     {"15-1": (80.37, 64.54, 76.61), "15-5": (81.44, 70.02, 78.72), "5-3": (75.58, 69.67, 71.36),
      "10-1": (76.21, 61.62, 69.27)}),
]

VOC_OVERLAPPED: Tuple[PaperResult, ...] = tuple(
    PaperResult(method=key, label=label, network=network, task=task, old=old, new=new, all=all_, quoted=quoted)
    for key, label, network, quoted, cells in _ROWS
    for task, (old, new, all_) in cells.items()
)
"""Every (row, task) cell group of the VOC table; N/A cells have old = new = all = None."""


DKD_SOURCE = ("cvlab-yonsei/DKD README (released checkpoints, commit fb4693f): mIoU_all, with old / new derived "
              "from its hIoU and mIoU_all (docs/methods.md §5.4)")
STAR_SOURCE = "jinpeng0528/STAR README (released checkpoints, commit 9e31f36): mIoU_all only (docs/methods.md §5.4)"

# (method key, label, dataset, overlap, source, {task: (old, new, all)}): DeepLabV3-ResNet-101 rows.
_README_ROWS: List[Tuple[str, str, str, bool, str, Dict[str, Tuple[Optional[float], Optional[float], float]]]] = [
    ("dkd", "DKD", "voc", True, DKD_SOURCE,
     {"19-1": (77.7, 45.0, 76.13), "15-5": (78.8, 58.6, 73.95), "15-1": (78.4, 45.4, 70.50),
      "10-1": (72.4, 47.3, 60.43), "5-3": (69.9, 54.6, 58.98)}),
    ("dkd-m", "DKD-M", "voc", True, DKD_SOURCE,
     {"19-1": (77.9, 60.6, 77.04), "15-5": (79.1, 61.1, 74.84), "15-1": (78.9, 54.0, 72.95),
      "10-1": (73.7, 58.0, 66.20), "5-3": (70.2, 60.6, 63.32)}),
    ("dkd", "DKD", "voc", False, DKD_SOURCE,
     {"19-1": (77.4, 46.4, 75.90), "15-5": (77.6, 55.0, 72.21), "15-1": (76.8, 41.9, 68.48)}),
    ("dkd-m", "DKD-M", "voc", False, DKD_SOURCE,
     {"19-1": (77.7, 59.1, 76.84), "15-5": (77.7, 55.9, 72.53), "15-1": (77.5, 49.4, 70.78)}),
    ("dkd", "DKD", "ade", True, DKD_SOURCE,
     {"100-50": (41.9, 22.7, 35.55), "100-10": (41.9, 19.7, 34.53), "50-50": (49.0, 27.0, 34.39)}),
    ("dkd-m", "DKD-M", "ade", True, DKD_SOURCE,
     {"100-50": (42.0, 22.7, 35.58), "100-10": (42.0, 20.4, 34.83), "50-50": (48.9, 27.0, 34.39)}),
    ("star", "STAR", "voc", True, STAR_SOURCE,
     {"19-1": (None, None, 76.61), "15-5": (None, None, 74.86), "15-1": (None, None, 72.90),
      "10-1": (None, None, 64.86), "5-3": (None, None, 64.54)}),
    ("star-m", "STAR-M", "voc", True, STAR_SOURCE,
     {"19-1": (None, None, 77.02), "15-5": (None, None, 75.80), "15-1": (None, None, 74.03),
      "10-1": (None, None, 66.60), "5-3": (None, None, 65.65)}),
    ("star", "STAR", "voc", False, STAR_SOURCE,
     {"19-1": (None, None, 76.38), "15-5": (None, None, 73.48), "15-1": (None, None, 70.77)}),
    ("star-m", "STAR-M", "voc", False, STAR_SOURCE,
     {"19-1": (None, None, 76.73), "15-5": (None, None, 73.79), "15-1": (None, None, 71.18)}),
    ("star", "STAR", "ade", True, STAR_SOURCE,
     {"100-50": (None, None, 36.39), "100-10": (None, None, 34.91), "50-50": (None, None, 34.44)}),
]


#: a DeepLabV3-ResNet-101 row: (method key, label, dataset, overlap, source, {task: (old, new, all)})
_DeepLabRow = tuple[str, str, str, bool, str, dict[str, tuple[float | None, float | None, float]]]


def _deeplab_results(rows: list[_DeepLabRow], section: str) -> tuple[PaperResult, ...]:
    """``PaperResult``s of DeepLabV3-ResNet-101 rows ``(key, label, dataset, overlap, source, {task: cells})``."""
    return tuple(PaperResult(method=key, label=label, network="DeepLabV3", task=task, old=old, new=new, all=all_,
                             quoted=False, dataset=dataset, overlap=overlap, source=source, section=section)
                 for key, label, dataset, overlap, source, cells in rows for task, (old, new, all_) in cells.items())


README_RESULTS: Tuple[PaperResult, ...] = _deeplab_results(_README_ROWS, "docs/methods.md §5.4")
"""The DKD and STAR README numbers (DeepLabV3-ResNet-101), VOC overlapped / disjoint and ADE20K overlapped."""

RCIL_SOURCE = ("zhangchbin/RCIL README (commit b9aad58): mIoU_all of the paper's tables (as on Papers with Code); old "
               "for VOC 15-5 / 15-1 from an aggregator page; old / new not given where unverified (docs/methods.md §5.5)")

NEST_SOURCE = ("NeST, ECCV 2024 (arXiv 2407.14142): mIoU_all of the paper's tables (through a paper note) where the "
               "authors' per-class logs (zhengyuan-xie/ECCV24_NeST results/*.csv at 83894c3) give it to ±0.1, with the "
               "logs' old / new; the other NeST cells are [verify] (docs/methods.md §5.5)")

EWF_SOURCE = ("EWF, CVPR 2023: mIoU_all as tabulated by Cs2K (ECCV 2024), through a paper note [verify]; the EWF "
              "paper's own tables could not be read; R-101 (docs/methods.md §5.5)")

# Methods after 2022, from their papers and repositories (docs/methods.md §5.5).
_POST_2022_ROWS: list[_DeepLabRow] = [
    ("rcil", "RCIL", "voc", True, RCIL_SOURCE,
     {"15-5": (78.8, None, 72.4), "15-1": (70.6, None, 59.4), "10-1": (None, None, 34.3),
      "5-3": (None, None, 42.88)}),
    ("rcil", "RCIL", "voc", False, RCIL_SOURCE,
     {"15-5": (75.0, None, 67.3), "15-1": (None, None, 54.7), "10-1": (None, None, 18.2)}),
    ("rcil", "RCIL", "ade", True, RCIL_SOURCE,
     {"100-50": (None, None, 34.5), "100-10": (None, None, 32.1), "100-5": (None, None, 29.6),
      "50-50": (None, None, 32.5)}),
    ("mib+nest", "MiB+NeST", "voc", True, NEST_SOURCE, {"15-5": (77.09, 50.14, 70.7)}),
    ("plop+nest", "PLOP+NeST", "voc", True, NEST_SOURCE, {"15-1": (72.21, 33.71, 63.1), "15-5": (77.61, 55.80, 72.4)}),
    ("mib+nest", "MiB+NeST", "ade", True, NEST_SOURCE,
     {"100-50": (40.28, 24.62, 35.1), "100-10": (40.21, 20.65, 33.7), "100-5": (39.94, 18.01, 32.7)}),
    ("plop+nest", "PLOP+NeST", "ade", True, NEST_SOURCE, {"100-50": (42.18, 24.26, 36.3), "100-5": (39.35, 17.45, 32.0)}),
]

POST_2022_RESULTS: tuple[PaperResult, ...] = _deeplab_results(_POST_2022_ROWS, "docs/methods.md §5.5")
"""Published numbers of the methods after 2022 (RCIL, EWF and NeST combinations; DeepLabV3-ResNet-101)."""

PAPER_RESULTS: Tuple[PaperResult, ...] = VOC_OVERLAPPED + README_RESULTS + POST_2022_RESULTS
"""Every published row a run can be compared with."""


def find_paper_result(method: str, backbone: str, task: str, dataset: str = "voc",
                      overlap: bool = True) -> Optional[PaperResult]:
    """The published row for a run's method key, ``model.backbone``, task, dataset and protocol, or None.

    The SATS table has VOC overlapped rows for ``mit_b2`` (SegFormer-B2) and ``resnet101`` (DeepLabV3); the
    DKD / STAR READMEs and RCIL ``resnet101`` rows on VOC (both protocols) and ADE20K. N/A cells count as no match.
    """
    for row in PAPER_RESULTS:
        if (row.method == method and row.backbone == backbone and row.task == task and row.dataset == dataset
                and row.overlap == overlap and row.all is not None):
            return row
    return None


def uses_memory(header: Mapping[str, Any]) -> bool:
    """Whether a run's ``results.json`` header records an exemplar memory (the "-M" variants).

    The runner writes ``"memory": <memory.size>`` when ``memory.enabled`` is on, else null.
    A mapping ``{"enabled": true, ...}`` (a config's ``memory`` section) is accepted too.
    """
    value = header.get("memory")
    if isinstance(value, Mapping):
        return bool(value.get("enabled", False))
    if isinstance(value, bool):
        return value
    return isinstance(value, (int, float)) and value > 0


def paper_method_key(header: Mapping[str, Any]) -> str:
    """The method key of a run's ``results.json`` header in the table's terms ("mib", "mib-m", ...).

    A run is a memory ("-M") variant when its header records a memory (:func:`uses_memory`)
    or when its name's method token is ``<method>-m`` (config files ``mib-m_mit-b2_voc-15-1.yaml``).
    """
    method = str(header.get("method", "")).lower()
    name_token = str(header.get("name", "")).split("_", 1)[0].lower()
    memory = uses_memory(header) or name_token == f"{method.replace('_', '-')}-m"
    return f"{method}-m" if memory else method
