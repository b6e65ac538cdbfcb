"""``trivit shards`` into a folder that already holds shards, as a user would meet it: killed midway,
interrupted, or run twice at once. The folder is always one whole shard set: the old one or the new one."""
from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.conftest import default_sigint
from trivit.datasets.shards import INDEX_NAME, read_index
from trivit.locks import exclusive_or_fail

KILL_AFTER = """
import os, signal, sys
from trivit.datasets import shards, imagefolder
from trivit.cli import main
written = [0]
write = imagefolder.write_shard
def write_then_die(path, samples):
    count = write(path, samples)
    written[0] += 1
    if written[0] == {shards}:  # in a pool worker: the counter is per process, one worker writes here
        os.killpg(0, signal.{signal})  # the command's whole process group, as Ctrl-C or a scheduler would
    return count
imagefolder.write_shard = write_then_die
replace = os.replace
def replace_then_die(src, dst):
    replace(src, dst)
    if {die_in_swap} and str(dst).endswith(".old"):
        os.killpg(0, signal.SIGKILL)
os.replace = replace_then_die
sys.exit(main(sys.argv[1:]))
"""


def tree(root: Path, per_class: int, value: int) -> Path:
    for split in ("train", "val"):
        for label, name in enumerate(("a", "b")):
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                pixels = np.full((8, 8), (value + 10 * label + i) % 256, dtype=np.uint8)
                Image.fromarray(pixels, mode="L").save(folder / f"{i}.png")
    return root


def digest(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}


def run(*argv: str, program: str | None = None) -> subprocess.CompletedProcess:
    command = [sys.executable, "-c", program, *argv] if program else [sys.executable, "-m", "trivit", *argv]
    return subprocess.run(command, capture_output=True, text=True, timeout=120, start_new_session=True,
                          preexec_fn=default_sigint)


@pytest.fixture
def written(tmp_path) -> tuple[Path, dict[str, str]]:
    """A shard folder from a first tree (2 samples per shard), and its files' digests."""
    dest = tmp_path / "shards"
    done = run("shards", str(tree(tmp_path / "old", 4, 0)), str(dest), "--samples-per-shard", "2", "--quiet")
    assert done.returncode == 0, done.stderr
    return dest, digest(dest)


@pytest.mark.parametrize("how", ["SIGKILL", "SIGINT"])
def test_a_writer_stopped_midway_leaves_the_old_shard_set(tmp_path, written, how):
    dest, before = written
    program = KILL_AFTER.format(shards=3, signal=how, die_in_swap=False)
    stopped = run("shards", str(tree(tmp_path / "new", 6, 100)), str(dest), "--samples-per-shard", "2", "--quiet",
                  program=program)
    assert stopped.returncode == (-signal.SIGKILL if how == "SIGKILL" else 130), stopped.stderr
    assert digest(dest) == before, "the old index over the old shards, byte for byte"
    if how == "SIGINT":
        assert "trivit: interrupted (the output folder is as it was before; nothing was replaced)" in stopped.stderr
        assert "checkpoint" not in stopped.stderr
    again = run("shards", str(tmp_path / "new"), str(dest), "--samples-per-shard", "2", "--quiet")
    assert again.returncode == 0, again.stderr
    assert read_index(dest / INDEX_NAME)["splits"]["train"]["total"] == 12
    assert sorted(p.name for p in dest.parent.iterdir()) == [".shards.lock", "new", "old", "shards"]


def test_a_writer_killed_between_its_renames_is_finished_by_the_next(tmp_path, written):
    dest, _ = written
    killed = run("shards", str(tree(tmp_path / "new", 6, 100)), str(dest), "--samples-per-shard", "2", "--quiet",
                 program=KILL_AFTER.format(shards=0, signal="SIGKILL", die_in_swap=True))
    assert killed.returncode == -signal.SIGKILL and not dest.exists()
    again = run("shards", str(tmp_path / "old"), str(dest), "--samples-per-shard", "2", "--quiet")
    assert again.returncode == 0, again.stderr
    assert "its complete new shards are now in place" in again.stderr
    assert read_index(dest / INDEX_NAME)["splits"]["train"]["total"] == 8


def test_two_writers_into_one_folder_the_second_is_refused(tmp_path, written):
    dest, before = written
    with exclusive_or_fail(dest.with_name(f".{dest.name}.lock"), "held by this test"):
        second = run("shards", str(tree(tmp_path / "new", 6, 100)), str(dest), "--quiet")
    assert second.returncode == 2
    assert f"shard folder '{dest}' is in use by another process (pid {os.getpid()}" in second.stderr
    assert digest(dest) == before


def test_a_destination_that_is_a_file_or_holds_other_files_is_refused(tmp_path):
    source = tree(tmp_path / "tree", 2, 0)
    (tmp_path / "file").write_text("x")
    done = run("shards", str(source), str(tmp_path / "file"), "--quiet")
    assert done.returncode == 2 and "is a file; trivit shards writes a folder of shards" in done.stderr
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    (mixed / "notes.txt").write_text("mine")
    done = run("shards", str(source), str(mixed), "--quiet")
    assert done.returncode == 2 and "holds files that are not trivit shards (notes.txt)" in done.stderr
    assert [p.name for p in mixed.iterdir()] == ["notes.txt"]
