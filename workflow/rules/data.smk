rule data:
    output:
        directory("data/{dataset}"),
    log:
        "logs/data/{dataset}.log",
    benchmark:
        "benchmarks/data/{dataset}.tsv"
    conda:
        "../envs/rere.yaml"
    threads: 1
    resources:
        mem_mb=2000,
        runtime=30,
    params:
        config=STAGE_ARGS,
        settings=lambda wildcards: config["datasets"][wildcards.dataset],
    shell:
        "rere data {params.config} --dataset {wildcards.dataset} --out {output} > {log} 2>&1"
