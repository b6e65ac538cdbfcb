"""The command line's argument types (each turns a word into a checked value or an argparse error naming it)
and the check on an output path."""
from __future__ import annotations

import argparse
from pathlib import Path


def keep_rate(text: str) -> float:
    """An argparse type: a keep rate in (0, 1]."""
    value = float(text)
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"{value} is not a keep rate in (0, 1]")
    return value


def positive_int(text: str) -> int:
    """An argparse type: an integer >= 1."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is not a positive integer")
    return value


def non_negative_int(text: str) -> int:
    """An argparse type: an integer >= 0."""
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"{value} is negative")
    return value


def refuse_existing(path: Path, overwrite: bool, flag: str) -> None:
    """A command's output file that exists is replaced only when asked (``--overwrite``)."""
    if path.exists() and not overwrite:
        raise FileExistsError(f"{flag} {path} exists; pass --overwrite to replace it, or choose another file")
