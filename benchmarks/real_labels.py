"""The team's real AgeDB-DIR and STS-B-DIR label files (team machines only; a user's clone has
none): one reader each, for the tests, ``benchmarks.density_table`` and ``docs/make_plots.py``.

``DATA`` is the team's folder, ``../shared/data`` beside the checkout; the tools take another
with ``--data DIR``.  Each reader returns None when its file is absent, so that every caller
decides how to say so (a test skips, a tool exits non-zero).
"""

from __future__ import annotations

import argparse
import csv
import os

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATA = os.path.normpath(os.path.join(ROOT, "..", "shared", "data"))
_DATA_HELP = ("the folder of the team's real label files (agedb-dir-labels.csv, sts-b-dir/train_new.tsv; on "
              "team machines only; default: %(default)s)")


def parser(prog: str, what: str):
    """The argument parser of a tool that reads the team's real label files: its ``--help`` says
    so, and ``--data DIR`` says where they are (default: ``../shared/data`` beside the checkout)."""
    tool = argparse.ArgumentParser(prog=prog, description=f"{what} Needs the team's real label files (--data DIR; "
                                                           "team machines only): without them it exits with status 1.")
    tool.add_argument("--data", metavar="DIR", default=DATA, help=_DATA_HELP)
    return tool


def agedb_path(data: str = DATA) -> str:
    return os.path.join(data, "agedb-dir-labels.csv")


AGEDB = agedb_path()


def agedb_ages(split: str = "train", path: str = AGEDB):
    """The ages of ``split`` (int64) from the labels file (columns ``age,split``), or None."""
    if not os.path.isfile(path):
        return None
    with open(path, newline="") as handle:
        return np.array([int(row["age"]) for row in csv.DictReader(handle) if row["split"] == split], dtype=np.int64)


def stsb_path(split: str = "train", data: str = DATA) -> str:
    return os.path.join(data, "sts-b-dir", f"{split}_new.tsv")


def stsb_scores(split: str = "train", dtype=np.float32, data: str = DATA):
    """The scores of ``split``, or None, as the published loader reads them: skip the header,
    split on tabs, column ``score`` converted to ``dtype`` (np.float32 in the published code;
    float64 as NumPy or pandas would), rows without a score skipped."""
    path = stsb_path(split, data)
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as handle:
        column = handle.readline().rstrip("\n").split("\t").index("score")
        rows = (line.strip().split("\t") for line in handle)
        return np.array([dtype(row[column]) for row in rows if len(row) > column and row[column]], dtype=dtype)
