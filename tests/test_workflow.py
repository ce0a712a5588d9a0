"""The workflow: Snakemake lint and DAG, DVC describing the same steps, the Slurm profile,
the configs, and one real end-to-end run of tests/config/tiny.yaml."""

import csv
import json
import os
import re
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from rere.config import load_config

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent  # snakemake, rere, dvc of this environment
# What a run needs from the repository (data folders and results are left behind).
WORKFLOW_FILES = ["Snakefile", "workflow", "config", "dvc.yaml", "tests/config", "tests/data"]


def copy_workflow(dest: Path) -> Path:
    for name in WORKFLOW_FILES:
        src = ROOT / name
        if src.is_dir():
            shutil.copytree(src, dest / name)
        else:
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(src, dest / name)
    return dest


def snakemake(*args, cwd: Path, env: dict | None = None, timeout=300) -> subprocess.CompletedProcess:
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", **(env or {})}
    return subprocess.run(
        [str(BIN / "snakemake"), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
    )


def dry_run_jobs(cwd: Path, *args, env=None) -> list[dict]:
    """Every job of a forced dry run: rule, input/output lists, resources, shell command."""
    proc = snakemake("--dry-run", "--forceall", "--printshellcmds", *args, cwd=cwd, env=env)
    assert proc.returncode == 0, proc.stderr + proc.stdout
    jobs, job = [], None
    for line in (proc.stdout + proc.stderr).splitlines():
        if m := re.match(r"^(?:local)?rule (\w+):$", line):
            job = {"rule": m.group(1), "input": [], "output": [], "resources": {}, "shell": None, "threads": 1}
            jobs.append(job)
        elif job is None:
            continue
        elif m := re.match(r"^    (input|output): (.*)$", line):
            job[m.group(1)] = [p.strip() for p in m.group(2).split(",")]
        elif m := re.match(r"^    threads: (\d+)$", line):
            job["threads"] = int(m.group(1))
        elif line.startswith("    resources: "):
            pairs = (kv.split("=", 1) for kv in line.removeprefix("    resources: ").split(", "))
            job["resources"] = dict(pairs)
        elif line.startswith("Shell command: "):
            job["shell"] = line.removeprefix("Shell command: ")
    return [j for j in jobs if j["rule"] != "all"]


def command(shell: str) -> str:
    """The `rere ...` part of a rule's shell command (without the log redirection)."""
    return " ".join(shell.split(" > ")[0].split())


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return copy_workflow(tmp_path_factory.mktemp("workflow"))


@pytest.fixture(scope="module")
def default_jobs(workdir):
    return dry_run_jobs(workdir)


def test_lint_and_format_are_clean():
    proc = snakemake("--lint", cwd=ROOT)
    assert proc.returncode == 0 and "Congratulations" in proc.stdout + proc.stderr, proc.stdout + proc.stderr
    files = ["Snakefile", *sorted(str(p.relative_to(ROOT)) for p in (ROOT / "workflow/rules").glob("*.smk"))]
    fmt = subprocess.run([str(BIN / "snakefmt"), "--check", *files], cwd=ROOT, capture_output=True, text=True)
    assert fmt.returncode == 0, fmt.stderr


def test_default_dag_has_one_job_per_dataset_and_method(default_jobs):
    config = load_config()
    variants = list(config["rl"]["variants"])  # rere, beam_rule, grpo, beam_rft
    baselines = config["baselines"]["methods"]  # pop, sasrec
    assert Counter(j["rule"] for j in default_jobs) == {
        "data": 1,
        "index": 1,
        "model": 1,
        "sft": 1,
        "rl": len(variants),
        "evaluate": 1 + len(variants),
        "baseline": len(baselines),
        "report": 1,
    }
    rl = {j["output"][0] for j in default_jobs if j["rule"] == "rl"}
    assert rl == {f"models/ml100k/{v}" for v in variants}
    sft = next(j for j in default_jobs if j["rule"] == "sft")
    assert command(sft["shell"]) == (
        "rere sft --config config/config.yaml --data data/ml100k --index index/ml100k"
        " --model models/ml100k/base --out models/ml100k/sft"
    )
    assert sft["shell"].endswith("> logs/sft/ml100k.log 2>&1")
    gpu = {j["rule"] for j in default_jobs if j["resources"].get("gpu") == "1"}
    assert gpu == {"model", "sft", "rl", "evaluate"}


def test_adding_a_dataset_or_variant_adds_exactly_its_jobs(workdir):
    tiny = yaml.safe_load((ROOT / "tests/config/tiny.yaml").read_text())
    base = {j["shell"] for j in dry_run_jobs(workdir, "--configfile", "tests/config/tiny.yaml")}
    tiny["datasets"]["tiny2"] = dict(tiny["datasets"]["tiny"])
    tiny["rl"]["variants"]["dapo"] = {"sampling": "beam", "reward": "ranking", "loss": "dapo"}
    (workdir / "more.yaml").write_text(yaml.safe_dump(tiny))
    more = dry_run_jobs(workdir, "--configfile", "more.yaml")
    new = [j for j in more if j["shell"].replace("more.yaml", "tests/config/tiny.yaml") not in base]
    # tiny2: data, index, model, sft, 3 RL variants, 4 evaluations, 2 baselines; tiny: dapo + its evaluation
    assert Counter(j["rule"] for j in new) == {
        "data": 1,
        "index": 1,
        "model": 1,
        "sft": 1,
        "rl": 3 + 1,
        "evaluate": 4 + 1,
        "baseline": 2,
    }
    (report,) = [j for j in more if j["rule"] == "report"]
    # per dataset: metrics of 6 methods, 3 RL runs, and the data folder (stats.json)
    assert len(report["input"]) == 2 * (1 + 3 + 2) + 2 * 3 + 2
    assert {j["output"][0] for j in new if j["rule"] == "rl"} == {
        "models/tiny2/rere",
        "models/tiny2/grpo",
        "models/tiny2/dapo",
        "models/tiny/dapo",
    }


def test_config_overrides_reach_every_stage_as_set(workdir):
    """`--config` becomes `--set KEY=VALUE` on every job (shell-quoted), one per leaf key."""
    jobs = dry_run_jobs(
        workdir, "results/table.csv", "--configfile", "tests/config/tiny.yaml",
        "--config", "seed=7", "sft={max_steps: 3}", "tracking={experiment: my exp}",
    )  # fmt: skip
    assert len(jobs) == 12  # the same DAG as without overrides
    overrides = "--set seed=7 --set sft.max_steps=3 --set 'tracking.experiment=my exp'"
    for job in jobs:
        assert f"--config tests/config/tiny.yaml {overrides} " in job["shell"], job["shell"]


def test_seeds_give_one_branch_per_seed_on_data_and_index_built_once(workdir):
    """`seeds: [1, 2]`: model, sft, rl, evaluate and baseline once per seed, each job with
    `--set seed=S` and under seed-S folders; data and index once, for every seed."""
    jobs = dry_run_jobs(workdir, "--configfile", "tests/config/tiny.yaml", "--config", "seeds=[1, 2]")
    # tiny.yaml: variants rere, grpo; baselines pop, sasrec
    assert Counter(j["rule"] for j in jobs) == {
        "data": 1, "index": 1, "model": 2, "sft": 2, "rl": 2 * 2, "evaluate": 2 * 3, "baseline": 2 * 2, "report": 1,
    }  # fmt: skip
    shared = {"data/tiny", "index/tiny/index.json"}
    for job in jobs:
        if job["rule"] in ("data", "index", "report"):
            assert "--set seed=" not in job["shell"] and "seed-" not in " ".join(job["output"]), job
            continue
        (seed,) = {m for path in job["output"] for m in re.findall(r"/seed-(\d+)/", path)}
        assert all(path.startswith(("models/tiny/", "results/tiny/")) for path in job["output"])
        assert all(f"/tiny/seed-{seed}/" in path for path in job["output"]), job
        assert all(p in shared or f"/tiny/seed-{seed}/" in p for p in job["input"]), job  # its own seed's model
        assert f"--config tests/config/tiny.yaml --set seed={seed} " in job["shell"], job
        assert re.search(rf"> logs/{job['rule']}/tiny/seed-{seed}[/.]", job["shell"]), job["shell"]
    sft = {j["output"][0]: j for j in jobs if j["rule"] == "sft"}
    assert command(sft["models/tiny/seed-2/sft"]["shell"]) == (
        "rere sft --config tests/config/tiny.yaml --set seed=2 --data data/tiny"
        " --index index/tiny --model models/tiny/seed-2/base --out models/tiny/seed-2/sft"
    )
    assert {j["output"][0] for j in jobs if j["rule"] == "rl"} == {
        f"models/tiny/seed-{s}/{v}" for s in (1, 2) for v in ("rere", "grpo")
    }
    (report,) = [j for j in jobs if j["rule"] == "report"]
    # the list reaches the report only: no stage's command (Snakemake's params) depends on it
    assert all("seeds=" not in j["shell"] for j in jobs if j is not report)
    assert "--set 'seeds=[1, 2]'" in report["shell"]
    methods = ["sft", "rere", "grpo", "pop", "sasrec"]
    assert set(report["input"]) == {
        *(f"results/tiny/seed-{s}/{m}/metrics.json" for s in (1, 2) for m in methods),
        *(f"models/tiny/seed-{s}/{v}" for s in (1, 2) for v in ("rere", "grpo")),
        "data/tiny",
    }
    assert "results/seeds.csv" in report["output"]
    assert "results/seeds.csv" not in next(j for j in dry_run_jobs(workdir) if j["rule"] == "report")["output"]


@pytest.mark.slow
def test_a_seeds_job_records_its_seed_and_evaluates_the_datas_rows(tmp_path):
    """data and the pop baseline of two seeds for real, on a subsample: each job's resolved
    config says its seed, the data's says `seed`, and both seeds ranked the same rows. A third
    seed added afterwards runs that seed's job only, not data and the finished seeds again."""
    work = copy_workflow(tmp_path)
    targets = [f"results/tiny/seed-{s}/pop/metrics.json" for s in (1, 2)]
    proc = snakemake(
        "--cores", "1", *targets, "--configfile", "tests/config/tiny.yaml",
        "--config", "seeds=[1, 2]", "evaluate={max_rows: 10}", cwd=work,
    )  # fmt: skip
    logs = "".join(p.read_text() for p in (work / "logs").rglob("*.log"))
    assert proc.returncode == 0, proc.stderr[-3000:] + logs
    assert yaml.safe_load((work / "data/tiny/config.yaml").read_text())["seed"] == 42  # the schema's default
    users = {}
    for s in (1, 2):
        folder = work / f"results/tiny/seed-{s}/pop"
        resolved = yaml.safe_load((folder / "config.yaml").read_text())
        assert (resolved["seed"], resolved["seeds"]) == (s, None)
        users[s] = [json.loads(line)["user_id"] for line in (folder / "predictions.jsonl").read_text().splitlines()]
    assert len(users[1]) == 10 and users[1] == users[2]
    assert (work / "logs/baseline/tiny/seed-2/pop.log").is_file()
    assert (work / "benchmarks/baseline/tiny/seed-1/pop.tsv").is_file()

    more = snakemake(
        "--dry-run", "--cores", "1", *targets, "results/tiny/seed-3/pop/metrics.json",
        "--configfile", "tests/config/tiny.yaml", "--config", "seeds=[1, 2, 3]", "evaluate={max_rows: 10}", cwd=work,
    )  # fmt: skip
    assert more.returncode == 0, more.stderr[-3000:]
    planned = re.findall(r"^    output: (.*)$", more.stdout + more.stderr, flags=re.M)
    assert planned == ["results/tiny/seed-3/pop/metrics.json, results/tiny/seed-3/pop/predictions.jsonl"], planned


def test_config_override_typo_fails_naming_the_key(workdir):
    proc = snakemake("--dry-run", "--config", "sft={max_stepz: 3}", cwd=workdir)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert "unknown key ['max_stepz'] under 'sft'" in out and "sft.max_stepz=3" in out, out
    assert "Traceback" not in out and 'File "' not in out, out


@pytest.mark.slow
def test_config_overrides_change_the_resolved_config_of_a_real_run(tmp_path):
    """data + index for real, with the config file in a folder whose name has a space: the
    overrides are in each output's resolved config and change the outputs themselves."""
    work = copy_workflow(tmp_path / "work")
    (work / "my configs").mkdir()
    shutil.copy(work / "tests/config/tiny.yaml", work / "my configs/tiny.yaml")
    proc = snakemake(
        "--cores", "1", "index/tiny/index.json", "--configfile", "my configs/tiny.yaml",
        "--config", "datasets={tiny: {max_history: 3}}", "index={kind: sid}", "tracking={experiment: my exp}",
        cwd=work,
    )  # fmt: skip
    logs = "".join(p.read_text() for p in (work / "logs").rglob("*.log"))
    assert proc.returncode == 0, proc.stderr[-3000:] + logs
    for folder in ("data/tiny", "index/tiny"):
        resolved = yaml.safe_load((work / folder / "config.yaml").read_text())
        assert resolved["datasets"]["tiny"]["max_history"] == 3, folder  # tiny.yaml says 10
        assert resolved["index"]["kind"] == "sid", folder  # tiny.yaml leaves the default, title
        assert resolved["tracking"]["experiment"] == "my exp", folder
    index = json.loads((work / "index/tiny/index.json").read_text())
    assert index["kind"] == "sid"  # the override changed the artifact, not only its record


def test_slurm_profile_fails_fast_without_account_or_partition(workdir):
    for missing in ("SLURM_ACCOUNT", "SLURM_PARTITION"):
        env = {k: v for k, v in os.environ.items() if k not in {"SLURM_ACCOUNT", "SLURM_PARTITION"}}
        env |= {"SLURM_ACCOUNT": "acct1", "SLURM_PARTITION": "part1"}
        del env[missing]
        proc = subprocess.run(
            [str(BIN / "snakemake"), "--dry-run", "--profile", "workflow/profiles/slurm"],
            cwd=workdir, env={**env, "PATH": f"{BIN}{os.pathsep}{env['PATH']}"}, capture_output=True, text=True,
        )  # fmt: skip
        out = proc.stdout + proc.stderr
        assert proc.returncode != 0
        assert f"{missing} is not set" in out and f"export {missing}=" in out, out
        assert "Traceback" not in out, out


def dvc_steps(root: Path) -> dict[str, tuple[set, set]]:
    """dvc.yaml resolved by DVC itself: command -> (deps without params, outs incl. metrics)."""
    from dvc.dependency.param import ParamsDependency
    from dvc.repo import Repo

    with Repo(str(root)) as repo:
        steps = {}
        for stage in repo.index.stages:
            deps = {d.def_path for d in stage.deps if not isinstance(d, ParamsDependency)}
            steps[" ".join(stage.cmd.split())] = (deps, {o.def_path for o in stage.outs})
    return steps


def assert_same_steps(jobs: list[dict], root: Path) -> None:
    snake = {command(j["shell"]): (set(j["input"]), set(j["output"])) for j in jobs}
    dvc = dvc_steps(root)
    assert sorted(dvc) == sorted(snake)  # same commands
    for cmd, (inputs, outputs) in snake.items():
        assert dvc[cmd] == (inputs, outputs), cmd


def test_dvc_yaml_describes_the_same_steps_as_snakemake(default_jobs):
    assert_same_steps(default_jobs, ROOT)


def test_dvc_yaml_gives_a_collaborative_variant_its_sasrec(tmp_path):
    """A `collaborative` variant added as a user would (config, then dvc.yaml's variant list
    and report inputs): DVC runs the same `rere rl ... --sasrec` after the same SASRec."""
    work = copy_workflow(tmp_path)
    shutil.copytree(ROOT / ".dvc", work / ".dvc", ignore=shutil.ignore_patterns("tmp"))
    with open(work / ".dvc/config", "a") as f:
        f.write("    no_scm = true\n")  # the copy is no git repository
    config = yaml.safe_load((work / "config/config.yaml").read_text())
    config["rl"]["variants"]["cf"] = {"sampling": "beam", "reward": "collaborative", "loss": "grpo"}
    (work / "config/config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    spec = yaml.safe_load((work / "dvc.yaml").read_text())
    spec["vars"][1]["rl_variants"]["collaborative"] = ["cf"]
    spec["stages"]["report"]["deps"] += ["results/ml100k/cf/metrics.json", "models/ml100k/cf"]
    (work / "dvc.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))

    jobs = dry_run_jobs(work)
    (cf,) = [j for j in jobs if j["rule"] == "rl" and j["output"] == ["models/ml100k/cf"]]
    assert "--sasrec results/ml100k/sasrec " in cf["shell"]
    assert "results/ml100k/sasrec/metrics.json" in cf["input"]
    assert_same_steps(jobs, work)


def test_dvc_yaml_declares_params_metrics_and_plots():
    spec = yaml.safe_load((ROOT / "dvc.yaml").read_text())
    assert spec["vars"][0] == "config/config.yaml:datasets,rl,baselines"
    variants = load_config()["rl"]["variants"]
    assert spec["vars"][1]["rl_variants"] == {
        "plain": [v for v, s in variants.items() if s["reward"] != "collaborative"],
        "collaborative": [v for v, s in variants.items() if s["reward"] == "collaborative"],
    }
    stages = ["data", "index", "model", "sft", "rl", "rl-collaborative", "evaluate", "evaluate-rl", "baseline"]
    for name in [*stages, "report"]:
        stage = spec["stages"][name].get("do", spec["stages"][name])
        assert "config/config.yaml" in stage["params"][0], name
    for name in ("evaluate", "evaluate-rl", "baseline"):
        ((path, opts),) = spec["stages"][name]["metrics"][0].items()
        assert path.endswith("metrics.json") and opts == {"cache": False}
    assert spec["plots"] == ["results/figures"]
    dvc_config = (ROOT / ".dvc" / "config").read_text()
    assert "remote" not in dvc_config  # `dvc repro` needs none


def sbatch_calls(jobs: list[dict]) -> dict[str, str]:
    """rule -> the sbatch call the Slurm plugin's own builders make for that rule's (last) job."""
    from snakemake_executor_plugin_slurm.submit_string import get_submit_command
    from snakemake_executor_plugin_slurm.utils import set_gres_string

    class Resources(dict):
        __getattr__ = dict.get

    seen = {}
    for job in jobs:
        res = Resources({k: int(v) if v.isdigit() else v for k, v in job["resources"].items()})
        fake = SimpleNamespace(resources=res, threads=res.get("cpus_per_task", 1), name=job["rule"])
        params = {"run_uuid": "u", "slurm_logfile": "l", "comment_str": "c", "workdir": None}
        params |= {"account": f" -A {res['slurm_account']}", "partition": f" -p {res['slurm_partition']}"}
        seen[job["rule"]] = get_submit_command(fake, params) + set_gres_string(fake)
    return seen


def test_slurm_profile_requests_gpus_only_for_llm_rules(workdir):
    """Dry run through the profile, then the plugin's own sbatch-string builders on each job."""
    env = {"SLURM_ACCOUNT": "acct1", "SLURM_PARTITION": "part1"}
    jobs = dry_run_jobs(workdir, "--profile", "workflow/profiles/slurm", "--configfile", "config/amazon.yaml", env=env)
    profile = yaml.safe_load((ROOT / "workflow/profiles/slurm/config.yaml").read_text())
    assert profile["executor"] == "slurm" and profile["retries"] >= 1 and profile["jobs"] >= 1

    seen = sbatch_calls(jobs)
    assert set(seen) == {"data", "index", "model", "sft", "rl", "evaluate", "baseline", "report"}
    for rule, call in seen.items():
        assert " -A acct1" in call and " -p part1" in call, call
        assert ("--gpus=1" in call) == (rule in {"model", "sft", "rl", "evaluate"}), call
    assert " -t 1440" in seen["sft"] and "--mem 64000" in seen["sft"]
    assert " -t 15" in seen["report"] and "--cpus-per-task=1" in seen["report"]


def test_slurm_cpu_layer_fits_a_small_node_without_gpus(workdir):
    """The CPU layer replaces the GPU profile's set-resources/set-threads as a whole, so it must
    size every rule itself: at most 2 CPUs and 8 GB each, no GPU, the account still set."""
    env = {"SLURM_ACCOUNT": "acct1", "SLURM_PARTITION": "part1"}
    profiles = ["--profile", "workflow/profiles/slurm", "--profile", "workflow/profiles/slurm-cpu"]
    jobs = dry_run_jobs(workdir, *profiles, "--configfile", "config/amazon.yaml", env=env)
    calls = sbatch_calls(jobs)
    assert set(calls) == {"data", "index", "model", "sft", "rl", "evaluate", "baseline", "report"}
    for call in calls.values():
        assert "--gpus" not in call and " -A acct1" in call, call
        cpus = int(re.search(r"--cpus-per-task=(\d+)", call).group(1))
        mem = int(re.search(r"--mem (\d+)", call).group(1))
        assert cpus <= 2 and mem <= 8000, call
    layer = yaml.safe_load((ROOT / "workflow/profiles/slurm-cpu/config.yaml").read_text())
    assert set(layer["set-resources"]) == set(calls) == set(layer["set-threads"])
    assert all(n <= 2 for n in layer["set-threads"].values())


def test_processes_start_rl_through_the_launcher_and_ask_slurm_for_as_many_gpus(workdir):
    env = {"SLURM_ACCOUNT": "acct1", "SLURM_PARTITION": "part1"}
    args = ["results/table.csv", "--configfile", "tests/config/tiny.yaml"]
    for launch, prefix in [
        ("torchrun", "torchrun --standalone --nproc_per_node 4 -m rere.cli rl "),
        ("accelerate", "accelerate launch --num_processes 4 --main_process_port 0 -m rere.cli rl "),
    ]:
        override = f"launch={{launcher: {launch}, processes: {{rl: 4}}}}"
        jobs = dry_run_jobs(workdir, "--profile", "workflow/profiles/slurm", *args, "--config", override, env=env)
        calls = sbatch_calls(jobs)
        for job in jobs:
            assert command(job["shell"]).startswith(prefix if job["rule"] == "rl" else f"rere {job['rule']} ")
        assert "--gpus=4" in calls["rl"] and "--gpus=1" in calls["sft"], calls


def test_launch_threads_set_each_rules_threads(workdir):
    """One thread per job by default (jobs share a 2-core machine side by side); a user's
    launch.threads reaches exactly its stage, and an RL job has at least one thread per process."""

    def threads(*args):
        out = {}
        for job in dry_run_jobs(workdir, "--cores", "8", *args):  # a dry run caps threads at --cores
            out.setdefault(job["rule"], set()).add(job["threads"])
        return out

    default = threads()
    assert [default[r] for r in ("sft", "rl", "evaluate", "baseline")] == [{1}] * 4
    changed = threads("--config", "launch={threads: {sft: 3, rl: 2, evaluate: 1, baseline: 4}, processes: {rl: 5}}")
    assert changed["sft"] == {3} and changed["baseline"] == {4} and changed["evaluate"] == {1}
    assert changed["rl"] == {5}  # max(threads.rl = 2, processes.rl = 5)


def test_configs_validate():
    amazon = load_config([ROOT / "config/amazon.yaml"])
    assert sorted(amazon["datasets"]) == ["Industrial_and_Scientific", "Office_Products", "Toys_and_Games"]
    assert all(d["source"] == "amazon" and d["split"] == "temporal" for d in amazon["datasets"].values())
    assert amazon["model"]["name_or_path"] == "Qwen/Qwen2.5-1.5B" and amazon["model"]["prompt"] == "instruction"
    assert amazon["sft"]["batch_size"] * amazon["sft"]["grad_accum"] == 128
    assert amazon["evaluate"]["num_beams"] == 50 and amazon["rl"]["num_generations"] == 16
    assert amazon["rl"]["variants"]["rere"] == {"sampling": "beam", "reward": "ranking", "loss": "grpo"}
    # the paper's recipe stays there while the laptop default trains every history item
    assert (amazon["index"]["kind"], amazon["sft"]["targets"], amazon["rl"]["filter_groups"]) == (
        "title",
        "last",
        False,
    )
    default = load_config([ROOT / "config/config.yaml"])
    assert (default["index"]["kind"], default["model"]["prompt"], default["sft"]["targets"]) == (
        "atomic",
        "sequence",
        "all",
    )
    assert (default["model"]["prompt"], default["sft"]["targets"], default["rl"]["filter_groups"]) == (
        "sequence",
        "all",
        True,
    )
    tiny = load_config([ROOT / "tests/config/tiny.yaml"])
    assert list(tiny["datasets"]) == ["tiny"] and list(tiny["rl"]["variants"]) == ["rere", "grpo"]
    assert tiny["model"]["scratch"]["hidden_size"] == 32 and tiny["model"]["scratch"]["num_layers"] == 1


@pytest.mark.slow
def test_tiny_config_runs_end_to_end(tmp_path):
    work = copy_workflow(tmp_path)
    proc = snakemake(
        # the target first: --configfile takes every argument after it
        "--cores", "2", "results/table.csv", "--configfile", "tests/config/tiny.yaml", cwd=work, timeout=1500
    )  # fmt: skip
    logs = "".join(f"\n--- {p}\n{p.read_text()[-3000:]}" for p in sorted((work / "logs").rglob("*.log")))
    assert proc.returncode == 0, proc.stderr[-5000:] + logs

    with open(work / "results/table.csv", newline="") as f:
        table = list(csv.DictReader(f))
    assert [(r["dataset"], r["method"]) for r in table] == [
        ("tiny", m) for m in ["sft", "rere", "grpo", "pop", "sasrec"]
    ]
    for row in table:
        assert int(row["rows"]) == 30  # every test row of tiny-d3 (evaluate.max_rows 30)
        for col in ("hr@1", "hr@5", "ndcg@1", "ndcg@5"):
            assert 0.0 <= float(row[col]) <= 1.0
        assert float(row["hr@1"]) <= float(row["hr@5"])
        if row["method"] in ("pop", "sasrec"):
            assert row["invalid_rate"] == "n/a"  # baselines rank catalogue ids: nothing to be invalid
        else:
            assert float(row["invalid_rate"]) == 0.0
    for method in ("sft", "rere", "grpo", "pop", "sasrec"):
        metrics = json.loads((work / f"results/tiny/{method}/metrics.json").read_text())
        assert metrics["rows"] == 30
        assert (work / f"results/tiny/{method}/predictions.jsonl").read_text().count("\n") == 30
    md = (work / "results/report.md").read_text()
    assert "Relative gain of ReRe" in md and "figures/rl_tiny.png" in md and "figures/stages.png" in md
    for png in ("ndcg_tiny.png", "rl_tiny.png", "stages.png"):
        assert (work / "results/figures" / png).stat().st_size > 1000
    benchmarks = sorted(p.relative_to(work / "benchmarks").as_posix() for p in (work / "benchmarks").rglob("*.tsv"))
    assert len(benchmarks) == 12  # data, index, model, sft, 2 rl, 3 evaluate, 2 baseline, report
    assert (work / "models/tiny/rere/trainer_log.jsonl").is_file()


@pytest.mark.slow
def test_rl_runs_as_two_processes_through_snakemake(tmp_path):
    """launch.processes.rl: 2 for real: Snakemake starts `torchrun ... rere.cli rl` (gloo on
    CPU) after data, index, model and sft; both processes trained (2 x batch_prompts rows
    per step) and one model folder was published."""
    work = copy_workflow(tmp_path)
    proc = snakemake(
        "--cores", "2", "models/tiny/rere", "--configfile", "tests/config/tiny.yaml",
        "--config", "launch={processes: {rl: 2}}", cwd=work, timeout=900,
    )  # fmt: skip
    logs = "".join(f"\n--- {p}\n{p.read_text()[-3000:]}" for p in sorted((work / "logs").rglob("*.log")))
    assert proc.returncode == 0, proc.stderr[-5000:] + logs
    out = work / "models/tiny/rere"
    assert json.loads((out / "rl_summary.json").read_text())["processes"] == 2
    tiny = load_config([ROOT / "tests/config/tiny.yaml"])["rl"]
    groups = [json.loads(line) for line in (out / "rollouts.jsonl").read_text().splitlines() if line.strip()]
    per_step = Counter(g["step"] for g in groups)
    assert sorted(per_step) == list(range(tiny["max_steps"]))
    assert set(per_step.values()) == {2 * tiny["batch_prompts"]}
    assert yaml.safe_load((out / "config.yaml").read_text())["launch"]["processes"]["rl"] == 2
