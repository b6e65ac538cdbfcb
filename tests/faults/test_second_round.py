"""The second round of a new user's mistakes (the reliability review's 154 cases), each through the real
command: answered with one line that names the problem and the fix, never a hang, a lost or mixed run,
a traceback, or something silently other than what was asked."""
from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import tiny_overrides
from trivit.cli import main
from trivit.engine.metrics import read_metrics


def trivit(*args: str, env: dict[str, str] | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "trivit", *args], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})})


def cli(*args: str, capsys) -> tuple[int, str, str]:
    try:
        code = main(list(args))
    except SystemExit as exited:
        code = exited.code
    out, err = capsys.readouterr()
    return code, out, err


def short(shards: Path, run_dir: Path, **extra: str) -> list[str]:
    return tiny_overrides(shards, run_dir, **{"schedule.max_steps": "4", **extra})


@pytest.mark.parametrize("env, message", [
    ({"RANK": "1", "WORLD_SIZE": "1"}, "RANK=1, WORLD_SIZE=1, LOCAL_RANK=0 cannot be: ranks run from 0 to WORLD_SIZE - 1"),
    ({"WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29555"},
     "WORLD_SIZE=2 but RANK is not set: this process does not know which rank it is"),
    ({"LOCAL_RANK": "abc"}, "LOCAL_RANK='abc' is not an integer; launchers set it"),
], ids=["rank beyond the world", "no rank", "non-integer local rank"])
def test_impossible_launch_variables_stop_at_once(tiny_shards, tmp_path, env, message):
    done = trivit("train", *short(tiny_shards, tmp_path / "run"), env=env, timeout=60)
    assert done.returncode == 2 and message in done.stderr, done.stderr[-2000:]
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_a_single_process_run_says_how_it_was_launched_and_never_imports_deepspeed(tiny_shards, tmp_path):
    done = trivit("train", *short(tiny_shards, tmp_path / "run"), env={"ACCELERATE_USE_CPU": "True"})
    assert done.returncode == 0, done.stderr[-2000:]
    assert "backend single on 1 process(es), cpu, precision fp32" in done.stderr
    assert "accelerate launch --cpu started ONE process (it ignores --num_processes)" in done.stderr
    assert "Setting accelerator to CPU" not in done.stderr, "a run that never uses DeepSpeed does not import it"


@pytest.mark.parametrize("override, message", [
    ("model.timm_kwargs={img_size: 32}", "no 'img_size': it is model.img_size's to set"),
    ("model.timm_kwargs={num_classes: 7}", "no 'num_classes': it is model.num_classes's to set"),
    ("model.timm_kwargs={pretrained: true}", "no 'pretrained': trivit never downloads"),
])
def test_timm_kwargs_that_would_be_ignored_or_download_are_refused(tiny_shards, tmp_path, capsys, override, message):
    code, _, err = cli("train", "--dry-run", *short(tiny_shards, tmp_path / "run"), override, capsys=capsys)
    assert code == 2 and message in err


def test_a_tilde_run_dir_from_yaml_is_the_home_folder(tiny_shards, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    config = tmp_path / "run.yaml"
    config.write_text("run_dir: '~/runs/x'\n")
    code, _, err = cli("train", "--config", str(config), *short(tiny_shards, tmp_path)[1:], capsys=capsys)
    assert code == 0, err
    assert (tmp_path / "home" / "runs" / "x" / "model.safetensors").is_file() and not (tmp_path / "~").exists()


def test_a_run_dir_that_is_a_file_or_cannot_be_created_is_named(tiny_shards, tmp_path, capsys):
    (tmp_path / "afile").write_text("x")
    code, _, err = cli("train", *short(tiny_shards, tmp_path / "afile"), capsys=capsys)
    assert code == 2 and "'run_dir': got" in err and "a folder path, not a file" in err
    code, _, err = cli("train", *short(tiny_shards, tmp_path / "afile" / "run"), capsys=capsys)
    assert code == 2 and "cannot create" in err and "choose a folder you can write" in err


def test_a_finished_model_without_checkpoints_is_never_trained_over(tiny_shards, tmp_path, capsys):
    run = tmp_path / "run"
    assert cli("train", *short(tiny_shards, run), capsys=capsys)[0] == 0
    model = (run / "model.safetensors").read_bytes()
    for folder in (run / "checkpoints").iterdir():
        for file in folder.iterdir():
            file.unlink()
        folder.rmdir()
    code, _, err = cli("train", *short(tiny_shards, run), capsys=capsys)
    assert code == 2 and "holds an earlier run's model.safetensors and metrics.jsonl but no checkpoint" in err
    assert f"model.init_from={run / 'model.safetensors'}" in err
    assert (run / "model.safetensors").read_bytes() == model


def test_a_users_config_in_the_run_dir_is_not_overwritten(tiny_shards, tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text("data:\n  batch_size: 16\n")
    code, _, err = cli("train", *short(tiny_shards, run), capsys=capsys)
    assert code == 2 and "was not written by trivit" in err and "move your config outside the run_dir" in err
    assert (run / "config.yaml").read_text() == "data:\n  batch_size: 16\n"


def test_a_rerun_of_a_finished_run_writes_nothing_but_a_missing_final_model(tiny_shards, tmp_path, capsys):
    """Disk full during the final export: the rerun exports it, and leaves config.yaml alone."""
    run = tmp_path / "run"
    assert cli("train", *short(tiny_shards, run), capsys=capsys)[0] == 0
    (run / "model.safetensors").unlink()
    config = (run / "config.yaml").read_text()
    code, out, _ = cli("train", *short(tiny_shards, run, **{"logging.every_steps": "2"}), capsys=capsys)
    assert code == 0 and "nothing to train" in out
    assert (run / "model.safetensors").is_file() and (run / "config.yaml").read_text() == config


def test_exports_refuse_to_replace_files_and_to_misname_them(tiny_shards, tmp_path, capsys):
    run = tmp_path / "run"
    assert cli("train", *short(tiny_shards, run), capsys=capsys)[0] == 0
    mode = stat.S_IMODE((run / "model.safetensors").stat().st_mode)
    assert mode == 0o666 & ~current_umask(), "readable by colleagues as the umask allows, not 0600"
    out = tmp_path / "w.safetensors"
    out.write_text("mine")
    code, _, err = cli("export", str(run), "--out", str(out), capsys=capsys)
    assert code == 2 and "exists; pass --overwrite to replace it" in err and out.read_text() == "mine"
    assert cli("export", str(run), "--out", str(out), "--overwrite", capsys=capsys)[0] == 0
    code, _, err = cli("export", str(run), "--out", str(tmp_path / "w.pt"), capsys=capsys)
    assert code == 2 and "trivit writes safetensors; name the file *.safetensors" in err
    code, _, err = cli("bench", "latency-table", "--device", "cuda", "--out", str(tmp_path / "t.json"), capsys=capsys)
    assert code == 2 and "--device cuda: no CUDA device is visible here" in err


def current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_the_run_ends_with_one_plain_sentence(tiny_shards, tmp_path, capsys):
    run = tmp_path / "run"
    code, out, _ = cli("train", *short(tiny_shards, run), capsys=capsys)
    last = read_metrics(run)[-1]
    assert code == 0 and out.strip().splitlines()[-1].startswith(f"trained to step 4: test top-1 {last['eval_top1']:.2f}%")
