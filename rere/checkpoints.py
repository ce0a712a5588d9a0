"""A training stage's resumable output folder (used by `rere sft` and `rere rl` alike).

    OUT.partial/            while training: checkpoints/checkpoint-N, the JSONL logs, and
                            the input signature of the run that made the checkpoints.
    OUT/                    appears only when training is over (the stage renames it into place).

A rerun resumes from the newest complete checkpoint, but only when its signature (what the
checkpoints depend on: inputs, settings, seed) equals the new run's; the logs are cut back
to the checkpoint's step, so the steps trained again are logged once.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import shutil
from pathlib import Path

from rere import RereError

log = logging.getLogger(__name__)

CHECKPOINTS = "checkpoints"
TRAINER_LOG = "trainer_log.jsonl"
_CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")


def partial_dir(out: Path) -> Path:
    return out.parent / f"{out.name}.partial"


def last_complete_checkpoint(folder: Path) -> Path | None:
    """Newest checkpoint-N holding trainer_state.json (Trainer writes it last, so a checkpoint
    cut short by an interruption lacks it and is skipped)."""
    if not folder.is_dir():
        return None
    found = []
    for p in folder.iterdir():
        m = _CHECKPOINT_RE.match(p.name)
        if m and p.is_dir() and (p / "trainer_state.json").is_file():
            found.append((int(m.group(1)), p))
    return max(found)[1] if found else None


def step_of(checkpoint: Path) -> int:
    return int(_CHECKPOINT_RE.match(checkpoint.name).group(1))


def folder_digest(folder: Path, suffixes=(".json", ".safetensors", ".bin")) -> str:
    """A digest that tells two model folders apart: names, sizes and the first 16 MiB of each file."""
    digest = hashlib.sha256()
    for path in sorted(Path(folder).iterdir()):
        if path.is_file() and path.suffix in suffixes:
            digest.update(path.name.encode())
            with open(path, "rb") as f:
                digest.update(f.read(1 << 24))
            digest.update(str(path.stat().st_size).encode())
    return digest.hexdigest()


def file_digest(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def read_signature(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def write_signature(path: Path, signature: dict) -> None:
    path.write_text(json.dumps(signature, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def truncate_log(path: Path, step: int) -> None:
    """Drop log lines past the resumed step: those steps are trained (and logged) again. A line
    cut short by the interruption (not JSON) goes too."""
    if not path.is_file():
        return
    keep = [
        line
        for line in path.read_text(encoding="utf-8").splitlines()
        if (record := _json_or_none(line)) is not None and record.get("step", 0) <= step
    ]
    path.write_text("".join(line + "\n" for line in keep), encoding="utf-8")


def _json_or_none(line: str) -> dict | None:
    try:
        record = json.loads(line)
    except ValueError:
        return None
    return record if isinstance(record, dict) else None


def drop_incomplete(ckpt_dir: Path) -> None:
    """Checkpoints cut short while saving are unusable, and in the way of a fresh save."""
    for p in ckpt_dir.glob("checkpoint-*"):
        if not (p / "trainer_state.json").is_file():
            shutil.rmtree(p)


def mismatch(old: dict, new: dict) -> list[str]:
    """Top-level keys (and, one level down, `section.key`) whose values differ."""
    keys = []
    for k in sorted(set(old) | set(new)):
        a, b = old.get(k), new.get(k)
        if a == b:
            continue
        if isinstance(a, dict) and isinstance(b, dict):
            keys += [f"{k}.{sub}" for sub in sorted(set(a) | set(b)) if a.get(sub) != b.get(sub)]
        else:
            keys.append(k)
    return keys


def check_or_clear(work: Path, signature_file: str, signature: dict, refuse: bool, clear: bool = True) -> None:
    """A work folder made from other inputs or settings is removed (`refuse=False`, or no complete
    checkpoint in it) or refused. With several processes, all check but one clears (`clear`)."""
    if not work.exists():
        return
    old = read_signature(work / signature_file)
    if old == signature:
        return
    if refuse and last_complete_checkpoint(work / CHECKPOINTS) is not None:
        what = ", ".join(mismatch(old or {}, signature)) or "its signature file is missing or unreadable"
        raise RereError(
            f"{work} holds checkpoints of another run ({what} differ from this one's); resuming them would "
            f"train a model that this config does not describe. Delete {work} to start over, or rerun with "
            "the settings that made it."
        )
    if clear:
        log.warning("%s was made from other inputs or settings; starting over", work)
        shutil.rmtree(work)


def jsonl_log_callback(path: Path):
    """A TrainerCallback appending every log dict, with its step and epoch, to `path` (main process)."""
    from transformers import TrainerCallback

    class JsonlLog(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and state.is_world_process_zero:
                append_jsonl(path, {"step": state.global_step, "epoch": state.epoch, **logs})

    return JsonlLog()


def append_jsonl(path: Path, record: dict) -> None:
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(record, sort_keys=True) + "\n")
