rule evaluate:
    input:
        data="data/{dataset}",
        index="index/{dataset}/index.json",
        model=per_seed("models/{dataset}/{method}"),
    output:
        metrics=per_seed("results/{dataset}/{method}/metrics.json"),
        predictions=per_seed("results/{dataset}/{method}/predictions.jsonl"),
    log:
        per_seed("logs/evaluate/{dataset}/{method}.log"),
    benchmark:
        per_seed("benchmarks/evaluate/{dataset}/{method}.tsv")
    wildcard_constraints:
        method=ONE_OF["llm"],
    conda:
        "../envs/rere.yaml"
    threads: config["launch"]["threads"]["evaluate"]
    resources:
        mem_mb=8000,
        runtime=120,
        gpu=1,
    params:
        config=seed_config_args,
        index=subpath(input.index, parent=True),
        out=subpath(output.metrics, parent=True),
        settings=config["evaluate"],
    shell:
        "rere evaluate {params.config} --data {input.data} --index {params.index}"
        " --model {input.model} --out {params.out} > {log} 2>&1"
