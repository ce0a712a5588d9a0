rule model:
    input:
        data="data/{dataset}",
        index="index/{dataset}/index.json",
    output:
        directory(per_seed("models/{dataset}/base")),
    log:
        per_seed("logs/model/{dataset}.log"),
    benchmark:
        per_seed("benchmarks/model/{dataset}.tsv")
    conda:
        "../envs/rere.yaml"
    threads: 1
    resources:
        mem_mb=4000,
        runtime=60,
        gpu=1,
    params:
        config=seed_config_args,
        index=subpath(input.index, parent=True),
        settings=config["model"],
    shell:
        "rere model {params.config} --data {input.data} --index {params.index}"
        " --out {output} > {log} 2>&1"
