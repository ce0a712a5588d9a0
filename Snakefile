# rere: data -> index -> base model -> SFT -> RL variants -> evaluation -> report, plus the
# classic baselines, for every dataset and method in the config (and, with `seeds`, every
# training seed: common.smk's per_seed). Each rule is one `rere` subcommand (the same command
# dvc.yaml and the tests run).
import re

from snakemake.utils import min_version, validate

min_version("9.0")


configfile: "config/config.yaml"


include: "workflow/rules/common.smk"


# `--configfile A B` replaces the default file (later files override earlier ones; keys a
# file leaves out take the schema's defaults) and `--config key=value` overrides keys as
# `rere --set` does. The rules hand `rere` the same files and overrides, and the DAG is built
# from what `rere` reads, so the two cannot disagree.
CONFIG_FILES = config_files()
CONFIG_OVERRIDES = config_overrides()
CONFIG_ARGS = rere_config_args(CONFIG_FILES, CONFIG_OVERRIDES)
# What the stage jobs get: the same, less `seeds` (see stage_overrides).
STAGE_ARGS = rere_config_args(CONFIG_FILES, stage_overrides(CONFIG_OVERRIDES))
config.clear()
config.update(workflow_config(CONFIG_FILES, CONFIG_OVERRIDES))
validate(config, "workflow/schemas/config.schema.yaml")
check_slurm_variables()

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
        ("seed", [str(s) for s in config["seeds"] or []]),
    ]
}


wildcard_constraints:
    dataset=ONE_OF["dataset"],
    variant=ONE_OF["variant"],
    seed=ONE_OF["seed"],


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
