rule rl:
    input:
        data="data/{dataset}",
        index="index/{dataset}/index.json",
        model=f"models/{{dataset}}/{config['rl']['init_from']}",
        # reward `collaborative` scores items with the dataset's trained SASRec baseline
        sasrec=branch(
            lambda wildcards: config["rl"]["variants"][wildcards.variant]["reward"]
            == "collaborative",
            then="results/{dataset}/sasrec/metrics.json",
        ),
    output:
        directory("models/{dataset}/{variant}"),
    log:
        "logs/rl/{dataset}/{variant}.log",
    benchmark:
        "benchmarks/rl/{dataset}/{variant}.tsv"
    conda:
        "../envs/rere.yaml"
    threads: 2
    resources:
        mem_mb=8000,
        runtime=480,
        gpu=1,
    params:
        config=CONFIG_ARGS,
        index=subpath(input.index, parent=True),
        sasrec=lambda wildcards, input: (
            f"--sasrec {os.path.dirname(input.sasrec)}" if input.sasrec else ""
        ),
        settings=lambda wildcards: [
            config["rl"],
            config["rl"]["variants"][wildcards.variant],
        ],
    shell:
        "rere rl {params.config} --variant {wildcards.variant} --data {input.data}"
        " --index {params.index} --model {input.model} {params.sasrec} --out {output} > {log} 2>&1"
