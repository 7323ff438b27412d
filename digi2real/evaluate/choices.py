"""The names the evaluation accepts (backbones, losses, schedules, data formats, benchmarks):
plain data, importable without torch, so the command line can list them cheaply."""

from __future__ import annotations

BACKBONES = ("iresnet18", "iresnet50", "small")
LOSSES = ("arcface", "cosface")
# Published defaults: ArcFace (arXiv:1801.07698) s=64, m=0.5; CosFace (arXiv:1801.09414)
# s=64, m=0.35.
DEFAULT_MARGINS = {"arcface": 0.5, "cosface": 0.35}
DEFAULT_SCALE = 64.0
SCHEDULES = ("poly", "step", "constant")
DATA_FORMATS = ("auto", "imagefolder", "rec", "webdataset")
BENCHMARKS = {
    "lfw": "LFW",
    "cfp_fp": "CFP-FP",
    "agedb_30": "AgeDB-30",
    "calfw": "CALFW",
    "cplfw": "CPLFW",
}
DEFAULT_NAMES = tuple(BENCHMARKS)
