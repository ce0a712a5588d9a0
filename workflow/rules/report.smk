rule report:
    input:
        metrics=each_seed(
            "results/{dataset}/{method}/metrics.json",
            dataset=DATASETS,
            method=LLM_METHODS + BASELINES,
        ),
        rl_runs=each_seed(
            "models/{dataset}/{variant}", dataset=DATASETS, variant=VARIANTS
        ),
        data=expand("data/{dataset}", dataset=DATASETS),
    # with `seeds`, also results/seeds.csv: each metric's mean and spread across seeds
    output:
        **({"seeds": "results/seeds.csv"} if config["seeds"] else {}),
        table="results/table.csv",
        comparisons="results/comparisons.csv",
        markdown="results/report.md",
        html="results/report.html",
        figures=directory("results/figures"),
    log:
        "logs/report.log",
    benchmark:
        "benchmarks/report.tsv"
    conda:
        "../envs/rere.yaml"
    threads: 1
    resources:
        mem_mb=2000,
        runtime=15,
    params:
        config=CONFIG_ARGS,
    shell:
        "rere report {params.config} --results results --models models --data data"
        " --benchmarks benchmarks --out results > {log} 2>&1"
