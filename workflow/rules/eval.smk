# Calibration (one job per initialisation: the shared base, and every trained run) picks the evaluation's
# adaptation learning rate on dev; it is a checkpoint, so the evaluations read the chosen value when it is
# known. One evaluation job per (initialisation, shot count): adding a shot count adds jobs and reruns
# nothing else. Each job takes `eval_gpus_per_job` GPUs; the slot allocator gives concurrent jobs distinct
# devices (Snakemake counts GPUs but sets no CUDA_VISIBLE_DEVICES per job).
# A trained run's rule has the wildcards {experiment}/{method}/seed-{seed}; the base's (`*_base`) reads the
# literal results/base/. `use rule` would make the base's calibration a plain rule, not a checkpoint
# (snakemake#2530), so both calibrations come from one loop, each with its own name.


for name, run, model_input, model, init, args in [
    ("calibrate", RUN, RUN_MODEL, run_model, "{method}", run_args),
    ("calibrate_base", BASE, base_model_input(), base_model, BASE, ""),
]:

    checkpoint:
        name:
            name
        input:
            tasks=task_files(["dev_pool", "dev_monitor"]),
            model=model_input,
        output:
            f"results/{run}/calibration.json",
        log:
            f"results/logs/calibrate/{run}.log",
        benchmark:
            f"results/benchmarks/calibrate/{run}.tsv"
        conda:
            ENV
        threads: 1
        resources:
            gpu=COMPUTE["eval_gpus_per_job"],
        params:
            settings=settings("calibrate"),
            model=model,
            tasks_dir=tasks_dir,
            init=init,
            run_args=args,
        shell:
            on_gpus(
                "python -m fomaml_math calibrate --settings {params.settings:q} --init {params.init} --model {params.model}"
                " --tasks-dir {params.tasks_dir} {params.run_args} --output {output} --no-progress > {log} 2>&1"
            )


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
        model=RUN_MODEL,
        choice=choice_flag,
    output:
        table=f"results/{RUN}/{{kind}}/shots-{{shots}}.parquet",
        summary=f"results/{RUN}/{{kind}}/shots-{{shots}}.summary.json",
    log:
        f"results/logs/{{kind}}/{RUN}/shots-{{shots}}.log",
    benchmark:
        f"results/benchmarks/{{kind}}/{RUN}/shots-{{shots}}.tsv"
    conda:
        ENV_EVAL
    threads: 1
    resources:
        gpu=COMPUTE["eval_gpus_per_job"],
    params:
        settings=settings("evaluate"),
        model=run_model,
        tasks_dir=tasks_dir,
        init="{method}",
        adapt=adapt_args,
        run_args=eval_args,
        python=EVAL_PYTHON,
    shell:
        on_gpus(
            "{params.python:q} -m fomaml_math evaluate --settings {params.settings:q} --init {params.init} --model {params.model}"
            " --tasks-dir {params.tasks_dir} --shots {wildcards.shots} {params.adapt} {params.run_args}"
            " --output {output.table} > {log} 2>&1"
        )


use rule evaluate as evaluate_base with:
    input:
        tasks=task_files(["dev_pool", "test"]),
        model=base_model_input(),
        choice=choice_flag,
    output:
        table=f"results/{BASE}/{{kind}}/shots-{{shots}}.parquet",
        summary=f"results/{BASE}/{{kind}}/shots-{{shots}}.summary.json",
    log:
        f"results/logs/{{kind}}/{BASE}/shots-{{shots}}.log",
    benchmark:
        f"results/benchmarks/{{kind}}/{BASE}/shots-{{shots}}.tsv"
    params:
        model=base_model,
        init=BASE,
        run_args=base_eval_args,
