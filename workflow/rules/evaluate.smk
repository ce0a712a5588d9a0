rule evaluate:
    input:
        data="data/{dataset}",
        index="index/{dataset}/index.json",
        model="models/{dataset}/{method}",
    output:
        metrics="results/{dataset}/{method}/metrics.json",
        predictions="results/{dataset}/{method}/predictions.jsonl",
    log:
        "logs/evaluate/{dataset}/{method}.log",
    benchmark:
        "benchmarks/evaluate/{dataset}/{method}.tsv"
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
        config=CONFIG_ARGS,
        index=subpath(input.index, parent=True),
        out=subpath(output.metrics, parent=True),
        settings=config["evaluate"],
    shell:
        "rere evaluate {params.config} --data {input.data} --index {params.index}"
        " --model {input.model} --out {params.out} > {log} 2>&1"
