rule baseline:
    input:
        data="data/{dataset}",
    output:
        metrics=per_seed("results/{dataset}/{method}/metrics.json"),
        predictions=per_seed("results/{dataset}/{method}/predictions.jsonl"),
    log:
        per_seed("logs/baseline/{dataset}/{method}.log"),
    benchmark:
        per_seed("benchmarks/baseline/{dataset}/{method}.tsv")
    wildcard_constraints:
        method=ONE_OF["baseline"],
    conda:
        "../envs/rere.yaml"
    threads: config["launch"]["threads"]["baseline"]
    resources:
        mem_mb=4000,
        runtime=120,
    params:
        config=seed_config_args,
        out=subpath(output.metrics, parent=True),
        settings=[config["baselines"], config["evaluate"]],
    shell:
        "rere baseline {params.config} --method {wildcards.method} --data {input.data}"
        " --out {params.out} > {log} 2>&1"
