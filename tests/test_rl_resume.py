"""`rere rl` survives a killed job: a rerun resumes the last checkpoint only when it was made
from the same inputs and settings, and then ends with the weights, logs and rollouts of a run
that was never interrupted.

One run of 8 steps (2 epochs of 4 steps, reference sync every 3 steps, micro-batches,
sampled rollouts) is killed with SIGKILL after its step-6 log line, i.e. after checkpoint-5
and past it; foreign reruns are refused; the rerun resumes at step 5 in the second epoch,
with a reference model synced at step 3 — neither the start model nor the policy at step 5.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from test_rl import ROOT, read_jsonl, rl_args, tiny  # noqa: F401  (tiny: the module's fixture)

from rere.cli import main

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning", "ignore::DeprecationWarning")

RESUME_SETS = [
    "rl.variants.rere={sampling: sample, reward: semantic, loss: grpo}",  # dense rewards; the generator matters
    "rl.max_steps=8",
    "rl.save_steps=5",
    "rl.ref_model_sync_steps=3",
    "rl.micro_batch_prompts=1",  # 2 micro-batches per step: the resumed dataloader skips 2 per step
]


def rl_cmd(root: Path, out: str, *extra: str) -> list[str]:
    return [sys.executable, "-m", "rere.cli", *rl_args(root, "rere", out, *RESUME_SETS, *extra)]


ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}


def run_to_end(root: Path, out: str, *extra: str) -> None:
    proc = subprocess.run(rl_cmd(root, out, *extra), cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]


def logged_steps(path: Path) -> list[int]:
    return [r["step"] for r in read_jsonl(path) if "loss" in r]


def kill_after(root: Path, out: str, step: int) -> None:
    """Start the run and SIGKILL it as soon as trainer_log.jsonl has the log of `step`."""
    log_path = root / f"{out}.partial" / "trainer_log.jsonl"
    proc = subprocess.Popen(rl_cmd(root, out), cwd=ROOT, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 300
    try:
        while proc.poll() is None and time.monotonic() < deadline:
            if log_path.is_file() and step in logged_steps_tolerant(log_path):
                proc.send_signal(signal.SIGKILL)
                break
            time.sleep(0.01)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGKILL, f"the run ended before it was killed: {proc.stderr.read()[-3000:]}"


def logged_steps_tolerant(path: Path) -> list[int]:
    steps = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except ValueError:  # being written
            continue
        if "loss" in record:
            steps.append(record["step"])
    return steps


def weights(folder: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(folder / "model.safetensors")


def test_killed_run_resumes_to_the_uninterrupted_result(tiny, capsys):  # noqa: F811
    import torch

    run_to_end(tiny, "models/tiny/whole")
    whole = tiny / "models/tiny/whole"

    out = "models/tiny/killed"
    work = tiny / f"{out}.partial"
    kill_after(tiny, out, step=6)
    assert not (tiny / out).exists()
    assert (work / "checkpoints/checkpoint-5/ref_model.safetensors").is_file()
    assert 6 in logged_steps(work / "trainer_log.jsonl")  # past the checkpoint: cut back on resume
    signature = json.loads((work / "rl_inputs.json").read_text())
    assert signature["variant"] == "rere" and signature["rl"]["learning_rate"] == 0.01

    # Reruns that are not this run are refused, and leave its checkpoints alone.
    other_start = tiny / "models/tiny/base_copy"
    shutil.copytree(tiny / "models/tiny/base", other_start, dirs_exist_ok=True)
    with open(other_start / "config.json", "a") as f:
        f.write("\n")  # same weights, another file: a rebuilt start model is another input
    refusals = [
        (rl_args(tiny, "rere", out, *RESUME_SETS, "rl.learning_rate=0.02"), "rl.learning_rate"),
        (rl_args(tiny, "grpo", out, *RESUME_SETS), "variant"),
        ([*rl_args(tiny, "rere", out, *RESUME_SETS), "--model", str(other_start)], "start"),
        (rl_args(tiny, "rere", out, *RESUME_SETS, "rl.bf16=true"), "rl.bf16"),
    ]
    for args, key in refusals:
        capsys.readouterr()
        assert main(args) == 2
        err = capsys.readouterr().err
        assert "holds checkpoints of another run" in err and key in err, err
        assert (work / "checkpoints/checkpoint-5/trainer_state.json").is_file()

    run_to_end(tiny, out)
    resumed = tiny / out
    assert not work.exists()
    a, b = weights(whole), weights(resumed)
    assert a.keys() == b.keys()
    unequal = [name for name in a if not torch.equal(a[name], b[name])]
    assert not unequal, f"the resumed run differs from the uninterrupted one in {unequal}"
    assert not all(torch.equal(a[n], t) for n, t in weights(tiny / "models/tiny/base").items()), "nothing trained"

    # Each step logged once, with the uninterrupted run's values; each step's rollouts once.
    assert logged_steps(resumed / "trainer_log.jsonl") == list(range(1, 9))

    def losses(folder):  # every step's log, without times and the summary of the last process's steps
        records = [r for r in read_jsonl(folder / "trainer_log.jsonl") if "train_runtime" not in r]
        return [{k: v for k, v in r.items() if k != "step_time"} for r in records]

    assert losses(resumed) == losses(whole)
    assert read_jsonl(resumed / "rollouts.jsonl") == read_jsonl(whole / "rollouts.jsonl")
    assert [r["step"] for r in read_jsonl(resumed / "rollouts.jsonl")] == [s for s in range(8) for _ in range(2)]
