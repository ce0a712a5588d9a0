rule sft:
    input:
        data="data/{dataset}",
        index="index/{dataset}/index.json",
        model=per_seed("models/{dataset}/base"),
    output:
        directory(per_seed("models/{dataset}/sft")),
    log:
        per_seed("logs/sft/{dataset}.log"),
    benchmark:
        per_seed("benchmarks/sft/{dataset}.tsv")
    conda:
        "../envs/rere.yaml"
    threads: config["launch"]["threads"]["sft"]
    resources:
        mem_mb=8000,
        runtime=240,
        gpu=1,
    params:
        config=seed_config_args,
        index=subpath(input.index, parent=True),
        settings=config["sft"],
    shell:
        "rere sft {params.config} --data {input.data} --index {params.index}"
        " --model {input.model} --out {output} > {log} 2>&1"
