"""Image generation for the dataset with a tiny random Stable Diffusion pipeline built here (no downloads):
build_dataset.sh end to end, a 2-process torchrun equal to a 1-process run, resume without redoing work."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from kaggle_i2p import dataset
from kaggle_i2p.dataset.generate import generate, image_jobs, prompt_seed, rank_and_world, shard

ROOT = Path(__file__).resolve().parents[1]
# One thread per process in both layouts (torchrun sets it for its workers anyway): float sums then run in the same
# order, so the shard layout is the only difference and the images must be identical to the byte.
SETTINGS = {"IMAGES_PER_PROMPT": "2", "STEPS": "2", "IMAGE_SIZE": "24", "RENDER_SIZE": "32", "BATCH_SIZE": "1",
            "FOLDS": "3", "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="session")
def tiny_sd(tmp_path_factory) -> Path:
    """A randomly initialised SD-style pipeline (UNet, VAE, CLIP text encoder, a tiny tokenizer), saved by diffusers."""
    from diffusers import AutoencoderKL, DPMSolverMultistepScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    folder = tmp_path_factory.mktemp("tiny_sd")
    torch.manual_seed(0)
    unet = UNet2DConditionModel(block_out_channels=(8, 16), layers_per_block=1, sample_size=8, in_channels=4,
                                out_channels=4, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=16,
                                attention_head_dim=2, norm_num_groups=4)
    vae = AutoencoderKL(block_out_channels=(8,), in_channels=3, out_channels=3, latent_channels=4, norm_num_groups=4,
                        down_block_types=("DownEncoderBlock2D",), up_block_types=("UpDecoderBlock2D",), sample_size=8)
    text = CLIPTextModel(CLIPTextConfig(bos_token_id=0, eos_token_id=1, pad_token_id=1, hidden_size=16,
                                        intermediate_size=32, num_attention_heads=2, num_hidden_layers=1,
                                        vocab_size=64, max_position_embeddings=77))
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for letter in "abcdefghijklmnopqrstuvwxyz":
        vocab[letter], vocab[letter + "</w>"] = len(vocab), len(vocab) + 1
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    tokenizer = CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=77)
    pipe = StableDiffusionPipeline(unet=unet, vae=vae, text_encoder=text, tokenizer=tokenizer,
                                   scheduler=DPMSolverMultistepScheduler(), safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(folder / "pipeline")
    return folder / "pipeline"


def _free_port() -> int:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _build(work: Path, model: Path, sources: list[str], **settings: str) -> subprocess.Popen:
    env = {**os.environ, **SETTINGS, "PYTHON": sys.executable, "HF_HUB_OFFLINE": "1", **settings}
    return subprocess.Popen(["bash", str(ROOT / "build_dataset.sh"), str(work), str(model), *sources],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def _finish(process: subprocess.Popen) -> str:
    out, err = process.communicate(timeout=600)
    assert process.returncode == 0, out + err[-4000:]
    return out + err


def test_build_dataset_on_two_nodes_equals_one_process(tmp_path, tiny_sd, sample_dir):
    """build_dataset.sh on two "nodes" (two scripts on localhost with NNODES=2, one GPU each): node 1 waits for node
    0's text steps, each node makes its half, and the rank that finishes last writes the index; the result is the
    bytes of one process."""
    sources = [f"{sample_dir / 'prompts.csv'}:prompt"]
    port = str(_free_port())
    nodes = [_build(tmp_path / "two", tiny_sd, sources, NNODES="2", NODE_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                    MASTER_PORT=port) for rank in (1, 0)]
    logs = [_finish(node) for node in nodes]
    assert "node 1 waits for node 0's text steps" in logs[0]
    assert any("every image is made: wrote" in log for log in logs)  # whichever finished last (both, if at once)
    _finish(_build(tmp_path / "one", tiny_sd, sources))

    names_two = sorted(p.name for p in (tmp_path / "two" / "images").iterdir())
    names_one = sorted(p.name for p in (tmp_path / "one" / "images").iterdir())
    assert names_two == names_one and len(names_one) == 7 * 2  # no duplicates, no gaps
    for name in [*(f"images/{n}" for n in names_one), "index.parquet", "targets.npy"]:
        assert (tmp_path / "two" / name).read_bytes() == (tmp_path / "one" / name).read_bytes()
    first, second = (np.asarray(Image.open(tmp_path / "one" / "images" / n), dtype=int) for n in names_one[:2])
    assert np.abs(first - second).mean() > 5  # other seeds give other images: the comparison above means something

    index = pd.read_parquet(tmp_path / "one" / "index.parquet")
    assert list(index.columns) == ["imgId", "prompt", "source", "path", "seed", "group", "fold"]
    assert index["imgId"].tolist() == sorted(index["imgId"]) and len(index) == 14
    first = index.iloc[0]
    assert first["seed"] == zlib.adler32(f"0\x00{first['prompt']}".encode())
    assert index.groupby("group")["fold"].nunique().max() == 1
    assert Image.open(tmp_path / "one" / first["path"]).size == (24, 24)
    targets = np.load(tmp_path / "one" / "targets.npy")
    prompt_targets = np.load(tmp_path / "one" / "prompt_targets.npy")
    prompts = pd.read_parquet(tmp_path / "one" / "prompt_index.parquet")
    for i, row in index.iterrows():
        np.testing.assert_array_equal(targets[i], prompt_targets[prompts["prompt"].tolist().index(row["prompt"])])
    assert len(set(index["seed"])) == 14  # never one fixed seed


def test_resume_makes_only_missing_images(tmp_path, tiny_sd, sample_dir):
    work = tmp_path / "work"
    dataset.run_text_steps([f"{sample_dir / 'prompts.csv'}:prompt"], work, n_folds=3)
    options = {"images_per_prompt": 1, "steps": 2, "image_size": 24, "render_size": 32, "batch_size": 2,
               "device": "cpu"}
    assert len(generate(work, tiny_sd, **options)) == 7
    for name in ("p00000002_0.png", "p00000005_0.png"):
        (work / "images" / name).unlink()
    assert sorted(p.name for p in generate(work, tiny_sd, **options)) == ["p00000002_0.png", "p00000005_0.png"]
    assert generate(work, tiny_sd, **options) == []  # nothing left: the pipeline is not even loaded



def test_shards_are_disjoint_and_complete(monkeypatch, sample_dir, tmp_path):
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "3")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert rank_and_world() == (1, 3, 1)
    prompts = pd.DataFrame({"promptId": [f"p{i:08d}" for i in range(7)], "prompt": [f"prompt {i}" for i in range(7)]})
    jobs = list(image_jobs(prompts, 2))
    shares = [shard(jobs, rank, 3) for rank in range(3)]
    assert [j.image_id for j in shares[1]] == ["p00000000_1", "p00000002_0", "p00000003_1", "p00000005_0",
                                               "p00000006_1"]
    ids = [j.image_id for share in shares for j in share]
    assert sorted(ids) == sorted(j.image_id for j in jobs) and len(set(ids)) == len(jobs) == 14
    assert jobs[0].seed == prompt_seed("prompt 0", 0) != prompt_seed("prompt 0", 1)


def test_a_job_array_makes_the_images_of_one_process_and_its_last_task_writes_the_index(tmp_path, tiny_sd,
                                                                                         sample_dir):
    """Two tasks of a SLURM job array (plain processes, no torch.distributed) run the generate step at once: each
    makes its half, the one that finds every image made writes the index, and the bytes are those of one process."""
    import shutil

    work = tmp_path / "array"
    dataset.run_text_steps([f"{sample_dir / 'prompts.csv'}:prompt"], work, n_folds=3)
    shutil.copytree(work, tmp_path / "one")
    step = [sys.executable, "-m", "kaggle_i2p.dataset", "generate", "--model", str(tiny_sd), "--images-per-prompt",
            "2", "--steps", "2", "--image-size", "24", "--render-size", "32", "--batch-size", "1", "--device", "cpu"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "SLURM_ARRAY_TASK_COUNT": "2",
           "SLURM_ARRAY_TASK_MIN": "10"}
    tasks = [subprocess.Popen([*step, "--work", str(work)], env={**env, "SLURM_ARRAY_TASK_ID": str(10 + task)},
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for task in (0, 1)]
    logs = [_finish(task) for task in tasks]
    for rank, log in enumerate(logs):
        assert f"rank {rank}/2: 7 images, 0 already made" in log  # each task made its own half
    assert any("every image is made: wrote" in log for log in logs)  # whichever finished last (both, if at once)
    _finish(subprocess.Popen([*step, "--work", str(tmp_path / "one")], env={**os.environ, "OMP_NUM_THREADS": "1"},
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    names = sorted(p.name for p in (work / "images").iterdir())
    assert names == sorted(p.name for p in (tmp_path / "one" / "images").iterdir()) and len(names) == 14
    for name in [*(f"images/{n}" for n in names), "index.parquet", "targets.npy"]:
        assert (work / name).read_bytes() == (tmp_path / "one" / name).read_bytes()


def test_a_slurm_job_array_shards_like_ranks(monkeypatch):
    from kaggle_i2p.core.errors import OptionError

    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    assert rank_and_world() == (0, 1, 0)
    monkeypatch.setenv("SLURM_ARRAY_TASK_COUNT", "4")
    monkeypatch.setenv("SLURM_ARRAY_TASK_MIN", "10")
    monkeypatch.setenv("SLURM_ARRAY_TASK_STEP", "2")  # sbatch --array=10-16:2: tasks 10, 12, 14, 16
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "14")
    assert rank_and_world() == (2, 4, 0)
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "18")  # outside the array the count describes
    with pytest.raises(OptionError, match=r"rank 4 of a world of 4 \(from SLURM_ARRAY_TASK_ID"):
        rank_and_world()
    monkeypatch.setenv("RANK", "1")  # torchrun inside an array job: its global rank wins
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert rank_and_world() == (1, 2, 0)


def test_fp16_pipeline_gets_the_sd2_attention_upcast_and_dpm_solver(tiny_sd):
    """The GPU path's set-up, checked on CPU (no fp16 inference here): fp16 weights, upcast attention, DPMSolver++."""
    from diffusers import DPMSolverMultistepScheduler

    from kaggle_i2p.dataset.generate import load_pipeline

    half = load_pipeline(tiny_sd, torch.device("cpu"), fp16=True)
    assert half.unet.config.upcast_attention is True and half.unet.dtype == torch.float16
    assert isinstance(half.scheduler, DPMSolverMultistepScheduler) and half.safety_checker is None
    full = load_pipeline(tiny_sd, torch.device("cpu"), fp16=False)
    assert full.unet.config.upcast_attention is False and full.unet.dtype == torch.float32
