# Calibration (one job per initialisation: the shared base, and every trained run) picks the evaluation's
# adaptation learning rate on dev; it is a checkpoint, so the evaluations read the chosen value when it is
# known. One evaluation job per (initialisation, shot count): adding a shot count adds jobs and reruns
# nothing else. Each job takes `eval_gpus_per_job` GPUs; the slot allocator gives concurrent jobs distinct
# devices (Snakemake counts GPUs but sets no CUDA_VISIBLE_DEVICES per job).


checkpoint calibrate:
    input:
        tasks=task_files(["dev_pool", "dev_monitor"]),
        model=run_model_input,
    output:
        "results/{run}/calibration.json",
    log:
        "results/logs/calibrate/{run}.log",
    benchmark:
        "results/benchmarks/calibrate/{run}.tsv"
    conda:
        ENV
    threads: 1
    resources:
        gpu=COMPUTE["eval_gpus_per_job"],
    params:
        settings=settings("calibrate"),
        model=run_model,
        tasks_dir=tasks_dir,
        init=lambda wildcards: parse_run(wildcards.run)[1],
        run_args=calibrate_args,
    shell:
        "python -m fomaml_math.devices run --per-job {resources.gpu} --lock-dir results/.gpu-locks --"
        " python -m fomaml_math calibrate --settings {params.settings:q} --init {params.init} --model {params.model}"
        " --tasks-dir {params.tasks_dir} {params.run_args} --output {output} --no-progress > {log} 2>&1"


rule calibration_choice:
    output:
        "results/calibration-choices/{choice}.flag",
    log:
        "results/logs/calibration-choices/{choice}.log",
    conda:
        ENV
    shell:
        "echo 'an evaluation adapts with {wildcards.choice}' > {output} 2> {log}"


rule evaluate:
    input:
        tasks=task_files(["dev_pool", "test"]),
        model=run_model_input,
        choice=choice_flag,
    output:
        table="results/{run}/{kind}/shots-{shots}.parquet",
        summary="results/{run}/{kind}/shots-{shots}.summary.json",
    log:
        "results/logs/{kind}/{run}/shots-{shots}.log",
    benchmark:
        "results/benchmarks/{kind}/{run}/shots-{shots}.tsv"
    conda:
        ENV_EVAL
    threads: 1
    resources:
        gpu=COMPUTE["eval_gpus_per_job"],
    params:
        settings=settings("eval"),
        model=run_model,
        tasks_dir=tasks_dir,
        init=lambda wildcards: parse_run(wildcards.run)[1],
        adapt=lambda wildcards: "--adapt-lr {!r} --adapt-steps {}".format(*chosen_adaptation(wildcards)),
        run_args=eval_args,
        python=EVAL_PYTHON,
    shell:
        "python -m fomaml_math.devices run --per-job {resources.gpu}"
        " --lock-dir results/.gpu-locks --"
        " {params.python:q} -m fomaml_math evaluate --settings {params.settings:q} --init {params.init} --model {params.model}"
        " --tasks-dir {params.tasks_dir} --shots {wildcards.shots} {params.adapt} {params.run_args}"
        " --output {output.table} > {log} 2>&1"
