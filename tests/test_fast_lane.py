"""``make test-fast``: tests/conftest.py marks ``slow`` every test that trains or starts a process, through the
helpers and fixtures it uses; the fast lane is the rest."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def collected(*args: str) -> set[str]:
    done = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider", *args],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    return {line for line in done.stdout.splitlines() if "::" in line}


def test_the_fast_lane_holds_no_test_that_trains_or_starts_a_process():
    fast = collected("-m", "not slow")
    every = collected()
    assert 0 < len(fast) < len(every)
    trains = {"tests/engine/test_trainer.py::test_resume_refuses_data_swapped_under_the_run",  # a helper trains
              "tests/engine/test_prune.py::test_every_pruning_step_is_logged_and_evaluated",  # a fixture trains
              "tests/test_slurm_script.py::test_restarts_are_bounded",  # starts bash
              "tests/faults/test_second_round.py::test_the_run_ends_with_one_plain_sentence"}  # main(["train", ...])
    assert trains <= every and not trains & fast
    pure = {"tests/sparse/test_timm_paths.py::test_features_only_is_refused_naming_the_timm_path",
            "tests/engine/test_gpu_paths.py::test_resume_saves_and_restores_only_the_ranks_own_gpu_generator"}
    assert pure <= fast
