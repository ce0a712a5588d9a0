# Helpers the Snakefile and the rules share: how `rere` is called (config files, `--config`
# overrides, one seed of `seeds`, launcher) and the checks that fail fast on a cluster
# set-up mistake.
import json
import os
import shlex
import sys
from collections.abc import Mapping

from rere import RereError
from rere.config import load_config


def fail(message):
    """Stop with one line for the user (a mistake in the set-up, not a bug: no traceback)."""
    sys.exit(f"rere workflow: error: {message}")


def config_files():
    """`--configfile A B` replaces the default file; paths are made relative to the working
    directory where they lie inside it (so commands read the same on every machine)."""
    cwd = os.getcwd() + os.sep
    files = [
        os.path.relpath(f) if os.path.abspath(f).startswith(cwd) else str(f)
        for f in workflow.config_settings.configfiles
    ]
    return files or ["config/config.yaml"]


def _flow(value):
    """A value Snakemake parsed from `--config` as YAML flow text again, for `rere --set`.

    Snakemake reads `--config 'sft={max_steps: 10}'` with YAML's base loader (every scalar a
    string), so re-emitting the raw scalars lets `rere --set` type them exactly as it types
    its own `--set sft.max_steps=10`.
    """
    if isinstance(value, str):
        return value
    if isinstance(value, Mapping):
        return "{" + ", ".join(f"{k}: {_flow(v)}" for k, v in value.items()) + "}"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_flow(v) for v in value) + "]"
    # int, float, bool, None: as Snakemake's own parsers made them
    return json.dumps(value)


def config_overrides(overrides=None, prefix=""):
    """Snakemake's `--config key=value` (and a profile's `config:`) as `rere --set KEY=VALUE`
    items, one per leaf: `--config 'sft={max_steps: 10}'` -> `sft.max_steps=10`. Nested
    mappings merge into the config files' values, as `--set` and Snakemake both do."""
    if overrides is None:
        overrides = workflow.config_settings.config
    items = []
    for key, value in overrides.items():
        if isinstance(value, Mapping) and value:
            items += config_overrides(value, f"{prefix}{key}.")
        else:
            items.append(f"{prefix}{key}={_flow(value)}")
    return items


def workflow_config(files, overrides):
    """The config every stage will resolve (`rere.config.load_config`), or a clear error."""
    try:
        return load_config(files, overrides)
    except RereError as exc:
        given = (
            f" (with --config overrides {', '.join(overrides)})" if overrides else ""
        )
        fail(f"{exc}{given}")


def stage_overrides(overrides):
    """The overrides a stage job is given: all but `seeds`. The list shapes only the DAG (a
    branch per seed, each job with `--set seed=S`) and the report, so no stage command depends
    on it: adding a seed to `--config seeds=[...]` then runs that seed's jobs and the report,
    and Snakemake's params trigger does not run data, index and the finished seeds again.
    """
    return [item for item in overrides if not item.startswith("seeds=")]


def rere_config_args(files, overrides):
    """`--config F ... --set K=V ...`, shell-quoted (a path or value may hold spaces)."""
    args = [arg for f in files for arg in ("--config", f)]
    args += [arg for item in overrides for arg in ("--set", item)]
    return shlex.join(args)


def per_seed(path):
    """A training or evaluation stage's path, with a seed folder after the dataset when the
    config lists `seeds` (models/{dataset}/sft -> models/{dataset}/seed-{seed}/sft,
    logs/sft/{dataset}.log -> logs/sft/{dataset}/seed-{seed}.log); as given without."""
    if not config["seeds"]:
        return path
    if "{dataset}/" in path:
        return path.replace("{dataset}/", "{dataset}/seed-{seed}/", 1)
    return path.replace("{dataset}.", "{dataset}/seed-{seed}.", 1)


def each_seed(pattern, **wildcards):
    """expand() of per_seed(pattern): over the wildcards given, and every seed of `seeds`."""
    if config["seeds"]:
        wildcards["seed"] = config["seeds"]
    return expand(per_seed(pattern), **wildcards)


def seed_config_args(wildcards):
    """STAGE_ARGS, and for a job of seed S `--set seed=S` after them (the last --set of a
    key wins), so the stage trains with S and its resolved config.yaml records S."""
    seed = getattr(wildcards, "seed", None)
    if seed is None:
        return STAGE_ARGS
    return f"{STAGE_ARGS} {shlex.join(['--set', f'seed={seed}'])}"


def launcher(launch, stage):
    """The command that starts `stage` with launch.processes[stage] processes: `rere` for one;
    torchrun (CPU with gloo, or GPUs) or accelerate launch (GPUs, with your `accelerate
    config`) for several. Both pick a free port, so jobs sharing a node do not collide.
    """
    n = launch["processes"][stage]
    if n == 1:
        return "rere"
    if launch["launcher"] == "torchrun":
        return f"torchrun --standalone --nproc_per_node {n} -m rere.cli"
    return f"accelerate launch --num_processes {n} --main_process_port 0 -m rere.cli"


def check_slurm_variables():
    """workflow/profiles/slurm takes the account and partition from the environment: an unset
    variable would reach sbatch as the literal text `$SLURM_ACCOUNT`. Fail before any job.
    """
    if not workflow.is_main_process:
        # Inside a submitted job: submission is over, and the jobstep plugin's nested srun
        # drops the SLURM_* variables from the environment.
        return
    settings = workflow.resource_settings
    raw = [getattr(r, "raw", r) for r in (settings.default_resources or {}).values()]
    for overrides in (settings.overwrite_resources or {}).values():
        raw += [getattr(r, "raw", r) for r in overrides.values()]
    hints = {
        "SLURM_ACCOUNT": "your account, see `sacctmgr show associations user=$USER`",
        "SLURM_PARTITION": "a partition, see `sinfo -s`",
    }
    for name, hint in hints.items():
        if any(f"${name}" in str(v) for v in raw) and name not in os.environ:
            fail(
                f"{name} is not set, and the Slurm profile submits every job with it: "
                f"export {name}=<{hint}>, or export {name}= (empty) for the cluster's default."
            )
