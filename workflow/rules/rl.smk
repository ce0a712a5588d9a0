rule rl:
    input:
        data="data/{dataset}",
        index="index/{dataset}/index.json",
        model=per_seed(f"models/{{dataset}}/{config['rl']['init_from']}"),
        # reward `collaborative` scores items with the dataset's trained SASRec baseline
        sasrec=branch(
            lambda wildcards: config["rl"]["variants"][wildcards.variant]["reward"]
            == "collaborative",
            then=per_seed("results/{dataset}/sasrec/metrics.json"),
        ),
    output:
        directory(per_seed("models/{dataset}/{variant}")),
    log:
        per_seed("logs/rl/{dataset}/{variant}.log"),
    benchmark:
        per_seed("benchmarks/rl/{dataset}/{variant}.tsv")
    conda:
        "../envs/rere.yaml"
    threads: max(config["launch"]["threads"]["rl"], config["launch"]["processes"]["rl"])
    resources:
        mem_mb=8000,
        runtime=480,
        gpu=config["launch"]["processes"]["rl"],  # one GPU per process
    params:
        launch=launcher(config["launch"], "rl"),
        config=seed_config_args,
        index=subpath(input.index, parent=True),
        sasrec=lambda wildcards, input: (
            f"--sasrec {os.path.dirname(input.sasrec)}" if input.sasrec else ""
        ),
        settings=lambda wildcards: [
            config["rl"],
            config["launch"],
            config["rl"]["variants"][wildcards.variant],
        ],
    shell:
        "{params.launch} rl {params.config} --variant {wildcards.variant} --data {input.data}"
        " --index {params.index} --model {input.model} {params.sasrec} --out {output} > {log} 2>&1"
