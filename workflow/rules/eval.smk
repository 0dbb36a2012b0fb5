# The tuner (stage `calibrate`; one job per initialisation: every trained run, and the base once per experiment)
# chooses, per tuned shot count, the kept checkpoint and the adaptation (lr, steps) on the dev data of the
# experiment's training tasks only (true few-shot: no held-out task's dev data, no test file). It is a
# checkpoint, so the evaluations read the choice once it is known. One evaluation job per (initialisation, shot
# count): adding a shot count adds jobs and reruns nothing else. Each job takes `eval_gpus_per_job` GPUs; the
# slot allocator gives concurrent jobs distinct devices (Snakemake counts GPUs but sets no CUDA_VISIBLE_DEVICES).
# A trained run's rule has the wildcards {experiment}/{method}/seed-{seed}; the base's (`*_base`) reads
# results/{experiment}/base/ (tuned) or results/base/ (untuned). `use rule` would make the base's tuner a plain
# rule, not a checkpoint (snakemake#2530), so both tuners come from one loop, each with its own name.


# Every value a loop iteration differs in goes through the directives, which are evaluated here: a name of
# the loop read in `shell:` would be read when the job runs, with the last iteration's value.
for name, run, model_input, init, models in [
    (
        "calibrate",
        RUN,
        {"train_summary": f"results/{RUN}/train_summary.json", "candidates": RUN_CANDIDATES},
        "{method}",
        trained_candidates,
    ),
    ("calibrate_base", f"{{experiment}}/{BASE}", {"model": base_model_input()}, BASE, base_candidate),
]:

    checkpoint:
        name:
            name
        input:
            **model_input,
            tasks=tuning_task_files,
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
            tasks_dir=tasks_dir,
            tuning_args=tuning_args,
            init=init,
            models=models,
        shell:
            on_gpus(
                "python -m fomaml_math calibrate --settings {params.settings:q} --init {params.init} {params.models}"
                " --tasks-dir {params.tasks_dir} {params.tuning_args} --output {output} --no-progress > {log} 2>&1"
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
        tasks=evaluated_task_files,
        model=RUN_CANDIDATES if CALIBRATED else RUN_MODEL,
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
        settings=eval_settings,
        model=eval_model,
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
        tasks=evaluated_task_files,
        model=base_model_input(),
        choice=choice_flag,
    output:
        table=f"results/{BASE_RUN}/{{kind}}/shots-{{shots}}.parquet",
        summary=f"results/{BASE_RUN}/{{kind}}/shots-{{shots}}.summary.json",
    log:
        f"results/logs/{{kind}}/{BASE_RUN}/shots-{{shots}}.log",
    benchmark:
        f"results/benchmarks/{{kind}}/{BASE_RUN}/shots-{{shots}}.tsv"
    params:
        model=eval_model,
        init=BASE,
        run_args=base_eval_args,


# The secondary row (eval.metaloop_row): a FOMAML run's chosen weights for k, the primary row's shots and test
# problems, adapted with the inner loop the run was meta-trained with (its train_summary.json); FOMAML runs only.
use rule evaluate as evaluate_metaloop with:
    input:
        tasks=evaluated_task_files,
        model=RUN_CANDIDATES if CALIBRATED else RUN_MODEL,
        choice=choice_flag,
        train_summary=f"results/{RUN}/train_summary.json",
    output:
        table=f"results/{{experiment}}/{{method,fomaml}}/seed-{{seed}}/{METALOOP_KIND}/shots-{{shots}}.parquet",
        summary=f"results/{RUN}/{METALOOP_KIND}/shots-{{shots}}.summary.json",
    log:
        f"results/logs/{METALOOP_KIND}/{RUN}/shots-{{shots}}.log",
    benchmark:
        f"results/benchmarks/{METALOOP_KIND}/{RUN}/shots-{{shots}}.tsv"
    params:
        adapt=metaloop_args,
