# One job per (initialisation, shot count): adding a shot count adds jobs and reruns nothing else.
# Each job takes `eval_gpus_per_job` GPUs; the slot allocator gives concurrent jobs distinct devices
# (Snakemake counts GPUs but sets no CUDA_VISIBLE_DEVICES per job).


rule evaluate:
    input:
        tasks=task_files(["support", "test"]),
        model=init_model_input,
    output:
        table="results/eval/{init}/shots-{shots}.parquet",
        summary="results/eval/{init}/shots-{shots}.summary.json",
    log:
        "results/logs/eval/{init}_shots-{shots}.log",
    benchmark:
        "results/benchmarks/eval/{init}_shots-{shots}.tsv"
    conda:
        ENV
    threads: 1
    resources:
        gpu=COMPUTE["eval_gpus_per_job"],
    params:
        settings=settings("eval"),
        model=init_model,
        tasks_dir=tasks_dir,
    shell:
        "python -m fomaml_math.devices run --per-job {resources.gpu}"
        " --lock-dir results/.gpu-locks --"
        " python -m fomaml_math evaluate --settings {params.settings:q} --init {wildcards.init} --model {params.model}"
        " --tasks-dir {params.tasks_dir} --shots {wildcards.shots} --output {output.table} > {log} 2>&1"
