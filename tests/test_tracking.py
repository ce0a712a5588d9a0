"""MLflow tracking against a real sqlite store, queried back with MlflowClient; failures never raise."""

import doctest
import json
import logging
import subprocess
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

import rere.tracking
from rere.config import flatten, load_config
from rere.tracking import NullRun, metric_name, stage_run, tracking_uri


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """One sqlite store for the module (creating its tables takes seconds)."""
    folder = tmp_path_factory.mktemp("mlflow")
    return f"sqlite:///{folder}/mlflow.db", folder


def _config(uri, experiment):
    return load_config(overrides=[f"tracking.tracking_uri={uri}", f"tracking.experiment={experiment}"])


def _only_run(uri, experiment):
    client = MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name(experiment).experiment_id])
    assert len(runs) == 1
    return client, runs[0]


def test_doctests_pass():
    failures, tried = doctest.testmod(rere.tracking)
    assert tried > 0 and failures == 0


def test_metric_name_makes_mlflow_safe_keys():
    assert metric_name("valid_ndcg@10") == "valid_ndcg_at_10"
    assert metric_name("a..b/../c") == "a..b/c"
    assert metric_name("x" * 300) == "x" * 250
    assert metric_name("") == "_"


def test_tracking_uri_precedence(monkeypatch):
    config = load_config()
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert tracking_uri(config) == "sqlite:///mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:///env.db")
    assert tracking_uri(config) == "sqlite:///env.db"
    config["tracking"]["tracking_uri"] = "sqlite:///cfg.db"
    assert tracking_uri(config) == "sqlite:///cfg.db"


def test_params_metrics_tags_callback_and_artifact_reach_the_store(store, monkeypatch):
    uri, folder = store
    monkeypatch.chdir(folder)  # artifacts of a new local store go to ./mlruns
    config = _config(uri, "full")
    from transformers import TrainerState

    with stage_run(config, stage="sft", dataset="toy", method="sft", index_kind="title") as run:
        run.log_metrics({"hr@10": 0.25, "rows": 4, "note": "text", "done": True}, step=None)
        callback = run.callback()
        for step, loss in [(5, 2.0), (10, 1.5)]:
            state = TrainerState(global_step=step)
            callback.on_log(None, state, None, logs={"loss": loss, "learning_rate": 1e-3, "eval_ndcg@5": 0.1 * step})
        metrics_file = Path(folder) / "metrics.json"
        metrics_file.write_text(json.dumps({"hr@10": 0.25}))
        run.log_artifact(metrics_file)
        run_id = run.run_id

    client, logged = _only_run(uri, "full")
    assert logged.info.run_id == run_id
    assert logged.info.run_name == "toy/sft/sft"
    assert logged.info.status == "FINISHED"
    # every flattened config key is a param, lists as JSON
    assert logged.data.params == {k: str(v) for k, v in flatten(config).items()}
    assert logged.data.params["evaluate.ks"] == "[1, 3, 5, 10, 20]"
    assert logged.data.params["tracking.experiment"] == "full"
    # numbers logged (strings and bools skipped), names sanitised
    assert logged.data.metrics["hr_at_10"] == 0.25 and logged.data.metrics["rows"] == 4
    assert "note" not in logged.data.metrics and "done" not in logged.data.metrics
    loss = sorted((m.step, m.value) for m in client.get_metric_history(run_id, "loss"))
    assert loss == [(5, 2.0), (10, 1.5)]
    assert sorted((m.step, m.value) for m in client.get_metric_history(run_id, "eval_ndcg_at_5")) == [
        (5, 0.5),
        (10, 1.0),
    ]
    tags = logged.data.tags
    head = subprocess.run(
        ["git", "rev-parse", "HEAD"], cwd=Path(rere.tracking.__file__).parent, capture_output=True, text=True
    )
    assert (
        tags["dataset"] == "toy"
        and tags["method"] == "sft"
        and tags["stage"] == "sft"
        and tags["index_kind"] == "title"
    )
    assert tags["git_commit"] == (head.stdout.strip() if head.returncode == 0 else "unknown")
    from rere.machine import describe

    assert {k: v for k, v in tags.items() if k.startswith("machine.")} == {
        f"machine.{k}": v for k, v in describe().items()
    }
    assert [a.path for a in client.list_artifacts(run_id)] == ["metrics.json"]
    local = client.download_artifacts(run_id, "metrics.json", str(folder / "dl"))
    assert json.loads(Path(local).read_text()) == {"hr@10": 0.25}


def test_many_and_long_params_are_batched_and_truncated(store, monkeypatch):
    uri, folder = store
    monkeypatch.chdir(folder)
    config = _config(uri, "many")
    config["extra"] = {f"k{i:03d}": "v" * 7000 for i in range(150)}  # > 100 per batch, > 6000 chars
    with stage_run(config, stage="baseline", dataset="toy", method="pop"):
        pass
    _, logged = _only_run(uri, "many")
    assert len(logged.data.params) == len(flatten(config))
    assert logged.data.params["extra.k149"] == "v" * 6000


def test_failed_stage_is_marked_failed_and_its_error_propagates(store, monkeypatch):
    uri, folder = store
    monkeypatch.chdir(folder)
    with (
        pytest.raises(ValueError, match="boom"),
        stage_run(_config(uri, "crash"), stage="sft", dataset="toy", method="sft"),
    ):
        raise ValueError("boom")
    _, logged = _only_run(uri, "crash")
    assert logged.info.status == "FAILED"


@pytest.mark.parametrize("uri", ["bogus-scheme://nowhere", "http://127.0.0.1:9", "sqlite:///{tmp}/a-file/mlflow.db"])
def test_unusable_store_does_not_crash_the_stage(uri, tmp_path, caplog):
    from transformers import TrainerState

    (tmp_path / "a-file").write_text("not a folder")  # even root cannot create a db under a file
    config = _config(uri.format(tmp=tmp_path), "x")
    ran = False
    with (
        caplog.at_level(logging.WARNING, logger="rere.tracking"),
        stage_run(config, stage="sft", dataset="d", method="m") as run,
    ):
        assert isinstance(run, NullRun) and run.run_id is None
        run.log_metrics({"loss": 1.0}, step=1)
        run.log_artifact("does-not-matter.json")
        run.callback().on_log(None, TrainerState(global_step=1), None, logs={"loss": 1.0})
        ran = True
    assert ran
    assert any("not tracked" in r.getMessage() for r in caplog.records)


def test_failure_during_the_run_is_logged_once_and_switches_tracking_off(store, monkeypatch, caplog):
    uri, folder = store
    monkeypatch.chdir(folder)
    calls = []

    def broken(*args, **kwargs):
        calls.append(1)
        raise RuntimeError("database is locked")

    with caplog.at_level(logging.WARNING, logger="rere.tracking"):
        with stage_run(_config(uri, "flaky"), stage="rl", dataset="toy", method="rere") as run:
            monkeypatch.setattr(run.client, "log_batch", broken)
            run.log_metrics({"loss": 1.0}, step=1)
            run.log_metrics({"loss": 0.5}, step=2)
            monkeypatch.undo()
    assert len(calls) == 1  # off after the first failure
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "database is locked" in warnings[0]
    _, logged = _only_run(uri, "flaky")
    assert logged.info.status == "FINISHED"  # ending is retried even after a failure


def test_tracking_off_gives_a_no_op_run_and_touches_nothing(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = load_config(overrides=["tracking.mlflow=false"])
    with stage_run(config, stage="sft", dataset="d", method="m") as run:
        assert isinstance(run, NullRun)
        run.log_metrics({"loss": 1.0})
        assert hasattr(run.callback(), "on_log")
    assert list(tmp_path.iterdir()) == []
