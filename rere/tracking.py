"""MLflow tracking for every stage run; tracking never breaks a stage.

    with stage_run(config, stage="sft", dataset="ml100k", method="sft", index_kind="title") as run:
        trainer = Trainer(..., callbacks=[run.callback()])   # per-step loss, lr, grad norm, eval_*
        run.log_metrics({"hr@10": 0.1})                       # stored as hr_at_10
        run.log_artifact(out / "metrics.json")

Each stage run is one MLflow run named "{dataset}/{method}/{stage}" in experiment
`tracking.experiment`, with the flattened resolved config as params and tags dataset, method,
stage, index_kind and git_commit. The store is `tracking.tracking_uri`, else
$MLFLOW_TRACKING_URI, else `sqlite:///mlflow.db` in the working directory (MLflow 3's own
default; `mlflow ui --backend-store-uri sqlite:///mlflow.db` shows the runs). Artifacts go
where the experiment says (for a new local sqlite store: ./mlruns).

Every MLflow error is logged as a warning and then tracking is switched off for the rest of
the run, so an unreachable server costs one warning rather than one per step. The client API
(`MlflowClient`) is used instead of mlflow's global "active run", so nested or parallel
stage runs in one process cannot log into each other. Tags `machine.*` name the CPU, torch
build and CPU kernel level the run computed with (rere.machine).
"""

from __future__ import annotations

import contextlib
import logging
import numbers
import os
import posixpath
import re
import ssl
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from rere.config import flatten
from rere.machine import describe

log = logging.getLogger(__name__)

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"
# MLflow's limits (mlflow/utils/validation.py): 100 params per batch, values <= 6000 chars,
# keys <= 250 chars, 1000 metrics per batch.
MAX_PARAMS_PER_BATCH = 100
MAX_METRICS_PER_BATCH = 1000
MAX_PARAM_VALUE_LENGTH = 6000
MAX_KEY_LENGTH = 250
_BAD_NAME_CHARS = re.compile(r"[^/\w.\- :]")


def tracking_uri(config: dict) -> str:
    """tracking.tracking_uri, else $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db (cwd)."""
    return config["tracking"].get("tracking_uri") or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI


def metric_name(name: str) -> str:
    """A name MLflow accepts: '@' -> '_at_', other characters outside [/\\w.\\- :] -> '_',
    no empty, '.', '..' or duplicate-slash path segments, at most 250 characters.

    >>> metric_name("hr@10"), metric_name("eval_ndcg@5"), metric_name("rewards/ranking/mean")
    ('hr_at_10', 'eval_ndcg_at_5', 'rewards/ranking/mean')
    >>> metric_name("/a//b/"), metric_name("loss (x)")
    ('a/b', 'loss _x_')
    """
    name = _BAD_NAME_CHARS.sub("_", str(name).replace("@", "_at_"))
    parts = [p for p in name.split("/") if p not in ("", ".", "..")]
    name = "/".join(parts) or "_"
    if posixpath.normpath(name) != name:  # e.g. a segment that normpath would still rewrite
        name = name.replace("/", "_")
    return name[:MAX_KEY_LENGTH]


def git_commit() -> str:
    """HEAD of the repository holding this code, or "unknown" (no git, not a checkout)."""
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=Path(__file__).resolve().parent,
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        )
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def _reachable(uri: str, timeout: float = 5.0) -> bool:
    """For http(s) stores only: does anything answer? (MLflow itself retries ~4 minutes.)"""
    if not uri.startswith(("http://", "https://")):
        return True
    try:
        urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout).close()
    except urllib.error.HTTPError:
        return True  # the server answered, even if not with 200
    except urllib.error.URLError as exc:
        # A TLS complaint means something answered; MLflow has its own TLS settings for that.
        return isinstance(exc.reason, ssl.SSLError)
    except (OSError, ValueError):
        return False
    return True


class NullRun:
    """The run used when tracking is off or failed: same methods, does nothing."""

    run_id: str | None = None

    def log_metrics(self, metrics: dict[str, Any], step: int | None = None) -> None:
        pass

    def log_artifact(self, path: str | Path) -> None:
        pass

    def callback(self):
        return _make_callback(self)


class MlflowRun(NullRun):
    """One open MLflow run; every method swallows (and logs) MLflow failures."""

    def __init__(self, client, run_id: str):
        self.client = client
        self.run_id = run_id
        self.enabled = True

    def _guard(self, what: str, fn, *args, **kwargs) -> None:
        if not self.enabled:
            return
        try:
            fn(*args, **kwargs)
        except Exception as exc:  # noqa: BLE001 - tracking must never break training
            self.enabled = False
            log.warning(
                "MLflow %s failed (%s: %s); tracking is off for the rest of this run.", what, type(exc).__name__, exc
            )

    def log_params(self, params: dict[str, Any]) -> None:
        from mlflow.entities import Param

        items = [Param(metric_name(k), str(v)[:MAX_PARAM_VALUE_LENGTH]) for k, v in sorted(params.items())]
        for start in range(0, len(items), MAX_PARAMS_PER_BATCH):
            self._guard(
                "log params", self.client.log_batch, self.run_id, params=items[start : start + MAX_PARAMS_PER_BATCH]
            )

    def log_metrics(self, metrics: dict[str, Any], step: int | None = None) -> None:
        """Real numbers only (bools, strings, None skipped; NaN kept); names sanitised by `metric_name`."""
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [
            Metric(metric_name(k), float(v), now, int(step or 0))
            for k, v in metrics.items()
            if isinstance(v, numbers.Real) and not isinstance(v, bool)
        ]
        for start in range(0, len(items), MAX_METRICS_PER_BATCH):
            self._guard(
                "log metrics", self.client.log_batch, self.run_id, metrics=items[start : start + MAX_METRICS_PER_BATCH]
            )

    def log_artifact(self, path: str | Path) -> None:
        path = Path(path)
        if path.is_dir():
            self._guard(f"log artifacts {path}", self.client.log_artifacts, self.run_id, str(path))
        elif path.is_file():
            self._guard(f"log artifact {path}", self.client.log_artifact, self.run_id, str(path))
        else:
            log.warning("MLflow: artifact %s does not exist; not logged.", path)

    def end(self, status: str) -> None:
        # Tried even after an earlier failure, so a transient error does not leave it RUNNING.
        self.enabled = True
        self._guard("end run", self.client.set_terminated, self.run_id, status)


def _make_callback(run: NullRun):
    """A transformers TrainerCallback that sends every `on_log` dict to `run` at the global step.

    transformers is imported here, not at module level, so stages without a Trainer stay light.
    """
    from transformers import TrainerCallback

    class MlflowStepCallback(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and state.is_world_process_zero:
                run.log_metrics(logs, step=state.global_step)

    return MlflowStepCallback()


def _open_run(config: dict, stage: str, dataset: str, method: str, index_kind: str | None) -> MlflowRun | None:
    uri = tracking_uri(config)
    if not _reachable(uri):
        log.warning("MLflow tracking server %s does not answer; this %s run is not tracked.", uri, stage)
        return None
    try:
        from mlflow.tracking import MlflowClient

        client = MlflowClient(tracking_uri=uri)
        name = config["tracking"]["experiment"]
        experiment = client.get_experiment_by_name(name)
        experiment_id = experiment.experiment_id if experiment else client.create_experiment(name)
        commit = git_commit()
        tags = {
            "dataset": dataset,
            "method": method,
            "stage": stage,
            "index_kind": index_kind or "none",
            "git_commit": commit,
            "mlflow.source.git.commit": commit,
            # float results depend on the CPU kernels torch picked (rere.machine)
            **{f"machine.{k}": v for k, v in describe().items()},
        }
        run = client.create_run(experiment_id, tags=tags, run_name=f"{dataset}/{method}/{stage}")
    except Exception as exc:  # noqa: BLE001 - tracking must never break training
        log.warning(
            "MLflow tracking at %s is unavailable (%s: %s); this %s run is not tracked.",
            uri,
            type(exc).__name__,
            exc,
            stage,
        )
        return None
    log.info("MLflow run %s (%s/%s/%s) at %s", run.info.run_id, dataset, method, stage, uri)
    return MlflowRun(client, run.info.run_id)


@contextlib.contextmanager
def stage_run(config: dict, stage: str, dataset: str, method: str, index_kind: str | None = None) -> Iterator[NullRun]:
    """An MLflow run around one stage; yields an object with log_metrics / log_artifact / callback.

    `tracking.mlflow: false`, or any MLflow failure, yields a no-op run. The run ends FINISHED,
    FAILED (the stage raised) or KILLED (interrupted); the stage's own exception propagates.
    """
    run = _open_run(config, stage, dataset, method, index_kind) if config["tracking"]["mlflow"] else None
    if run is None:
        yield NullRun()
        return
    run.log_params(flatten(config))
    try:
        yield run
    except KeyboardInterrupt:
        run.end("KILLED")
        raise
    except BaseException:
        run.end("FAILED")
        raise
    run.end("FINISHED")
