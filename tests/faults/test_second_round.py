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


def shard_folder(folder: Path, samples: int = 128, classes: int = 4, rgb: bool = False, label_shift: int = 0,
                 counts_factor: int = 1) -> Path:
    """Shards of ``synthetic_samples`` written as a user's tools might leave them."""
    import io

    import numpy as np
    from PIL import Image

    from tests.conftest import synthetic_samples
    from trivit.datasets.shards import write_index, write_split

    def tweak(sample):
        if rgb:
            gray = np.asarray(Image.open(io.BytesIO(sample["png"])))
            buffer = io.BytesIO()
            Image.fromarray(np.stack([gray] * 3, axis=-1)).resize((32, 32)).save(buffer, format="PNG")
            sample = {**sample, "png": buffer.getvalue()}
        return {**sample, "cls": sample["cls"] + label_shift}

    splits = {"train": write_split(map(tweak, synthetic_samples(samples)), folder, "train", 32),
              "val": write_split(map(tweak, synthetic_samples(64, seed=1)), folder, "val", 32)}
    splits["train"]["counts"] = [n * counts_factor for n in splits["train"]["counts"]]
    splits["train"]["total"] *= counts_factor
    write_index(folder, splits, [f"class{i}" for i in range(classes)])
    return folder


def data_overrides(folder: Path, run_dir: Path, **extra: str) -> list[str]:
    return short(folder, run_dir, **{"data.train_urls": str(folder), "data.val_urls": str(folder), **extra})


def test_an_index_that_does_not_describe_its_shards_is_refused(tmp_path, capsys):
    folder = shard_folder(tmp_path / "tenfold", counts_factor=10)
    code, _, err = cli("train", "--dry-run", *data_overrides(folder, tmp_path / "run"), capsys=capsys)
    assert code == 2 and "the index says" in err and "holds 320 samples; it holds 32" in err


def test_an_empty_listed_shard_is_refused(tmp_path, capsys):
    folder = shard_folder(tmp_path / "cut")
    import tarfile
    with tarfile.open(folder / "train-000002.tar", "w"):
        pass
    code, _, err = cli("train", "--dry-run", *data_overrides(folder, tmp_path / "run"), capsys=capsys)
    assert code == 2 and "1 training shards hold no sample although the index lists samples in them" in err
    assert "train-000002.tar, 32 listed" in err


def test_validation_shards_of_another_class_list_are_refused(tiny_shards, tmp_path, capsys):
    other = shard_folder(tmp_path / "other", classes=5)
    code, _, err = cli("train", "--dry-run", *short(tiny_shards, tmp_path / "run", **{"data.val_urls": str(other)}),
                       capsys=capsys)
    assert code == 2 and "lists other classes than the training shards'" in err


def test_rgb_shards_into_a_grayscale_model_are_said(tmp_path, capsys, caplog):
    import logging
    folder = shard_folder(tmp_path / "rgb", rgb=True)
    with caplog.at_level(logging.INFO):
        code, _, err = cli("train", "--dry-run", *data_overrides(folder, tmp_path / "run"), capsys=capsys)
    assert code == 0, err
    assert "the shards hold RGB images of 3 channel(s) (train-000000.tar, 32x32); the model takes 1 channel(s)" in caplog.text
    assert "the shards' images are 32x32 (train-000000.tar); the model takes 16x16" in caplog.text


def test_labels_beyond_the_models_classes_are_bad_data_never_a_traceback(tmp_path, capsys):
    """Every label shifted past the 4 classes: each sample is skipped as bad data, and a stream that can use
    none of its shards stops with one line (it would otherwise read them forever without a batch)."""
    folder = shard_folder(tmp_path / "shifted", label_shift=4, classes=4)
    code, _, err = cli("train", *data_overrides(folder, tmp_path / "run"), capsys=capsys)
    assert code == 2 and "could be used, in a whole pass over them; the last: sample" in err
    assert "is outside the model's 4 classes (0 .. 3)" in err and "Traceback" not in err
    good = shard_folder(tmp_path / "good")
    assert cli("train", *data_overrides(good, tmp_path / "ok"), capsys=capsys)[0] == 0
    code, _, err = cli("eval", str(tmp_path / "ok"), "--data", str(folder), "--keep-rates", "1.0", capsys=capsys)
    assert code == 2 and "no readable validation sample" in err and "labels outside the model's classes" in err


def test_an_image_folder_given_as_shards_says_to_write_shards_first(tmp_path, capsys):
    images = tmp_path / "images"
    (images / "cat").mkdir(parents=True)
    code, _, err = cli("train", "--dry-run", *short(images, tmp_path / "run", **{"data.train_urls": str(images)}),
                       capsys=capsys)
    assert code == 2 and f"run 'trivit shards {images} DEST' first" in err


def test_init_from_a_file_that_is_not_what_its_name_says(tiny_shards, tmp_path, capsys, tiny_teacher_file):
    text = tmp_path / "notes.safetensors"
    text.write_text("not weights")
    code, _, err = cli("train", "--dry-run", *short(tiny_shards, tmp_path / "a", **{"model.init_from": str(text)}),
                       capsys=capsys)
    assert code == 2 and f"model.init_from: {text} cannot be read as weights" in err
    misnamed = tmp_path / "teacher.pt"
    misnamed.write_bytes(tiny_teacher_file.read_bytes())
    code, _, err = cli("train", "--dry-run", *short(tiny_shards, tmp_path / "b", **{"model.init_from": str(misnamed)}),
                       capsys=capsys)
    assert code == 2 and "its bytes are safetensors: name it *.safetensors" in err


def test_weights_narrower_than_the_model_point_to_their_arch_file(tiny_shards, tmp_path, capsys, tiny_teacher_file):
    from safetensors.torch import load_file, save_file

    state = load_file(tiny_teacher_file)
    state["blocks.0.mlp.fc1.weight"] = state["blocks.0.mlp.fc1.weight"][:64]
    state["blocks.0.mlp.fc1.bias"] = state["blocks.0.mlp.fc1.bias"][:64]
    state["blocks.0.mlp.fc2.weight"] = state["blocks.0.mlp.fc2.weight"][:, :64].contiguous()
    save_file(state, str(tmp_path / "pruned.safetensors"))
    code, _, err = cli("train", "--dry-run", *short(tiny_shards, tmp_path / "run", **{
        "model.init_from": str(tmp_path / "pruned.safetensors"), "model.timm_kwargs": "{embed_dim: 32, depth: 2, "
        "num_heads: 2, mlp_ratio: 4}"}), capsys=capsys)
    assert code == 2 and "They look pruned" in err and "model.arch=PATH" in err


def test_a_teacher_of_another_image_size_is_refused_at_start_up(tiny_shards, tmp_path, capsys):
    """A teacher trained at 32 px for a 16 px student failed at the first step; now at start-up."""
    import timm
    from safetensors.torch import save_file

    teacher = timm.create_model("deit_tiny_patch16_224", img_size=32, patch_size=4, in_chans=1, embed_dim=32, depth=2,
                                num_heads=2, num_classes=4)
    save_file(teacher.state_dict(), str(tmp_path / "teacher32.safetensors"))
    code, _, err = cli("train", "--dry-run", *short(tiny_shards, tmp_path / "run", **{
        "distill.loss": "soft", "distill.teacher": "deit_tiny_patch16_224",
        "distill.teacher_weights": str(tmp_path / "teacher32.safetensors"),
        "distill.teacher_kwargs": "{img_size: 32, patch_size: 4, in_chans: 1, embed_dim: 32, depth: 2, num_heads: 2}"}),
        capsys=capsys)
    assert code == 2 and "distill.teacher takes 32x32 images of 1 channel(s), the student 16x16 of 1" in err


def test_a_config_file_without_its_flag_is_named(tmp_path, capsys):
    code, _, err = cli("train", "configs/demo.yaml", "run_dir=x", capsys=capsys)
    assert code == 2 and "configs/demo.yaml looks like a config file; pass it as --config configs/demo.yaml" in err


def test_trivit_eval_names_the_real_mistake(tiny_shards, tmp_path, capsys):
    code, _, err = cli("eval", str(tmp_path / "nowhere"), capsys=capsys)
    assert code == 2 and "trivit eval:" in err and "does not exist" in err and "--model" not in err
    run = tmp_path / "run"
    assert cli("train", *short(tiny_shards, run), capsys=capsys)[0] == 0
    code, _, err = cli("eval", str(run), "--model", "vit_small_patch16_224", capsys=capsys)
    assert code == 2 and "is a trivit run of deit_tiny_patch16_224" in err and "drop it" in err


def test_trivit_eval_of_a_semantic_token_model_takes_no_keep_rate(tiny_shards, tmp_path, capsys):
    run = tmp_path / "run"
    semantic = {"sparsity.semantic.num_tokens": "4", "sparsity.semantic.after_block": "0",
                "model.timm_kwargs": "{embed_dim: 32, depth: 3, num_heads: 2}"}
    code, _, err = cli("train", *short(tiny_shards, run, **semantic), capsys=capsys)
    assert code == 0, err
    code, _, err = cli("eval", str(run), "--keep-rates", "1.0", "0.7", capsys=capsys)
    assert code == 2 and "has semantic tokens (sparsity.semantic), a fixed number of tokens" in err
    code, out, err = cli("eval", str(run), capsys=capsys)
    assert code == 0, err
    assert [line.split("|")[1].strip() for line in out.splitlines() if line.startswith("| 1.0")] == ["1.0"]


def test_sigterm_while_a_pipe_shard_stalls_ends_the_run_with_its_checkpoint(tiny_shards, tmp_path):
    """The loader waits on a `pipe:` command that never delivers: SIGTERM still ends the run within seconds,
    with a checkpoint, where before it hung until the collective timeout (and a worker started the next shard)."""
    import signal
    import time

    urls = "::".join([f"pipe:sleep 300; cat {tiny_shards}/train-{{000000..000007}}.tar"])
    process = subprocess.Popen([sys.executable, "-m", "trivit", "train", *tiny_overrides(tiny_shards, tmp_path, **{
        "data.train_urls": urls, "data.index": str(tiny_shards / "index.json"), "engine.timeout_s": "600"})],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    time.sleep(8)
    started = time.monotonic()
    os.killpg(process.pid, signal.SIGTERM)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 143, stderr[-2000:]
    assert time.monotonic() - started < 30
    assert "SIGTERM while waiting" in stderr and "pipe:sleep 300; cat" in stderr
    assert "checkpoint written at step 0" in stderr


def test_a_deepspeed_option_typo_names_the_closest_option(tiny_shards, tmp_path):
    env = {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29581"}
    done = trivit("train", "--dry-run", *short(tiny_shards, tmp_path / "run", **{
        "engine.backend": "deepspeed", "optim.ema_decay": "null",
        "engine.deepspeed_options": "{zero_optimization: {overlap_com: true}}"}), env=env, timeout=120)
    assert done.returncode == 2, done.stderr[-2000:]
    assert ("engine.deepspeed_options sets 'zero_optimization.overlap_com', which DeepSpeed does not know (did you "
            "mean 'zero_optimization.overlap_comm'?)") in done.stderr


def test_a_learning_rate_given_both_ways_says_which_one_acts(tiny_shards, tmp_path, capsys, caplog):
    import logging
    with caplog.at_level(logging.INFO):
        code, _, _ = cli("train", "--dry-run", *short(tiny_shards, tmp_path / "run", **{"optim.base_lr": "1e-2"}),
                         capsys=capsys)
    assert code == 0 and "optim.lr=0.001 is the peak learning rate as given; optim.base_lr=0.01" in caplog.text


def test_a_gpu_accelerate_config_on_a_machine_without_gpus_is_said(tiny_shards, tmp_path, monkeypatch, caplog):
    """The README's 8-GPU ddp.yaml on a CPU machine: accelerate starts the processes; trivit says they share
    the CPU (resolve_run under the environment accelerate gives rank 0)."""
    import logging

    from trivit.config import load
    from trivit.engine.config import TrainConfig
    from trivit.engine.startup import resolve_run

    for key, value in {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "8", "MASTER_ADDR": "127.0.0.1",
                       "MASTER_PORT": "29500", "ACCELERATE_MIXED_PRECISION": "bf16"}.items():
        monkeypatch.setenv(key, value)
    with caplog.at_level(logging.WARNING):
        resolve_run(load(TrainConfig, None, short(tiny_shards, tmp_path, **{"data.num_workers": "1"})))
    assert "an accelerate config for GPUs started 8 processes, and no GPU is visible" in caplog.text


def test_a_semantic_token_run_pruned_without_its_setting_names_it(tiny_shards, tmp_path, capsys):
    source = tmp_path / "semantic"
    semantic = {"sparsity.semantic.num_tokens": "4", "sparsity.semantic.after_block": "0",
                "model.timm_kwargs": "{embed_dim: 32, depth: 3, num_heads: 2}"}
    assert cli("train", *short(tiny_shards, source, **semantic), capsys=capsys)[0] == 0
    code, _, err = cli("train", "--dry-run", *short(tiny_shards, tmp_path / "run", **{
        "model.init_from": str(source), "model.timm_kwargs": "{embed_dim: 32, depth: 3, num_heads: 2}"}),
        capsys=capsys)
    assert code == 2 and "the weights are of a semantic-token model" in err and "sparsity.semantic" in err


def test_disk_full_while_writing_the_final_model_is_one_line_and_a_rerun_writes_it(tiny_shards, tmp_path, capsys,
                                                                                    monkeypatch):
    import errno

    from trivit.engine.model import export

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    run = tmp_path / "run"
    with monkeypatch.context() as patched:
        patched.setattr(export, "save_file", full)
        code, _, err = cli("train", *short(tiny_shards, run), capsys=capsys)
    assert code == 2 and "could not write" in err and "No space left on device" in err and "Traceback" not in err
    assert not (run / "model.safetensors").exists() and not list(run.glob("*.tmp"))
    code, out, _ = cli("train", *short(tiny_shards, run), capsys=capsys)
    assert code == 0 and "nothing to train" in out and (run / "model.safetensors").is_file()


def test_a_failing_pipe_command_is_one_line(tiny_shards, tmp_path, capsys):
    code, _, err = cli("train", *short(tiny_shards, tmp_path / "run", **{
        "data.train_urls": "pipe:cat /no/such/train-{000000..000007}.tar", "data.index": str(tiny_shards / "index.json")}),
        capsys=capsys)
    assert code == 2 and "hold no (active) samples for this stream" in err and "pipe:cat /no/such/train-" in err
    assert "Traceback" not in err


def test_a_run_dir_name_too_long_for_the_filesystem_is_named(tiny_shards, tmp_path, capsys):
    code, _, err = cli("train", "--dry-run", *short(tiny_shards, tmp_path / ("r" * 240)), capsys=capsys)
    assert code == 2 and "a folder name under 200 bytes" in err


def test_a_data_index_of_another_dataset_is_refused(tiny_shards, tmp_path, capsys):
    other = shard_folder(tmp_path / "other", samples=192)
    code, _, err = cli("train", "--dry-run", *short(tiny_shards, tmp_path / "run", **{
        "data.index": str(other / "index.json")}), capsys=capsys)
    assert code == 2 and "training shards are not in the index" in err
    same_names = shard_folder(tmp_path / "same", samples=256, counts_factor=2)
    code, _, err = cli("train", "--dry-run", *short(tiny_shards, tmp_path / "run", **{
        "data.index": str(same_names / "index.json")}), capsys=capsys)
    assert code == 2 and "holds 64 samples; it holds 32" in err
