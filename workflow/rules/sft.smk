rule sft:
    input:
        data="data/{dataset}",
        index="index/{dataset}/index.json",
        model="models/{dataset}/base",
    output:
        directory("models/{dataset}/sft"),
    log:
        "logs/sft/{dataset}.log",
    benchmark:
        "benchmarks/sft/{dataset}.tsv"
    conda:
        "../envs/rere.yaml"
    threads: config["launch"]["threads"]["sft"]
    resources:
        mem_mb=8000,
        runtime=240,
        gpu=1,
    params:
        config=CONFIG_ARGS,
        index=subpath(input.index, parent=True),
        settings=config["sft"],
    shell:
        "rere sft {params.config} --data {input.data} --index {params.index}"
        " --model {input.model} --out {output} > {log} 2>&1"
