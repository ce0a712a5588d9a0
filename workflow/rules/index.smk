rule index:
    input:
        data="data/{dataset}",
    output:
        "index/{dataset}/index.json",
    log:
        "logs/index/{dataset}.log",
    benchmark:
        "benchmarks/index/{dataset}.tsv"
    conda:
        "../envs/rere.yaml"
    threads: 1
    resources:
        mem_mb=2000,
        runtime=30,
    params:
        config=STAGE_ARGS,
        out=subpath(output[0], parent=True),
        settings=config["index"],
    shell:
        "rere index {params.config} --data {input.data} --out {params.out} > {log} 2>&1"
