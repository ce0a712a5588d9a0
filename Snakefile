# rere: data -> index -> base model -> SFT -> RL variants -> evaluation -> report, plus the
# classic baselines, for every dataset and method in the config. Each rule is one `rere`
# subcommand (the same command dvc.yaml and the tests run).
import os
import re

from snakemake.utils import min_version, validate

from rere.config import load_config

min_version("9.0")


configfile: "config/config.yaml"


# `--configfile A B` replaces the default file (later files override earlier ones; keys a
# file leaves out take the schema's defaults). The rules hand `rere` the same files in the
# same order, and the DAG is built from what `rere` reads, so the two cannot disagree.
CONFIG_FILES = [
    (
        os.path.relpath(f)
        if os.path.abspath(f).startswith(os.getcwd() + os.sep)
        else str(f)
    )
    for f in workflow.config_settings.configfiles
] or ["config/config.yaml"]
CONFIG_ARGS = " ".join(f"--config {f}" for f in CONFIG_FILES)
config.clear()
config.update(load_config(CONFIG_FILES))
validate(config, "workflow/schemas/config.schema.yaml")

DATASETS = list(config["datasets"])
VARIANTS = list(config["rl"]["variants"])
LLM_METHODS = ["sft", *VARIANTS]
BASELINES = config["baselines"]["methods"]
# Wildcards match only configured names, so models/D/sft is never read as an RL variant.
ONE_OF = {
    name: "|".join(map(re.escape, values))
    for name, values in [
        ("dataset", DATASETS),
        ("variant", VARIANTS),
        ("llm", LLM_METHODS),
        ("baseline", BASELINES),
    ]
}


wildcard_constraints:
    dataset=ONE_OF["dataset"],
    variant=ONE_OF["variant"],


include: "workflow/rules/data.smk"
include: "workflow/rules/index.smk"
include: "workflow/rules/model.smk"
include: "workflow/rules/sft.smk"
include: "workflow/rules/rl.smk"
include: "workflow/rules/evaluate.smk"
include: "workflow/rules/baseline.smk"
include: "workflow/rules/report.smk"


rule all:
    input:
        "results/table.csv",
        "results/report.md",
