# Both trainings run under `accelerate launch`, once per (experiment, method, training seed). Checkpoints
# live in a params directory, not in the outputs: Snakemake deletes a failed job's outputs, and a rerun
# must find them to resume. Training reads support/query (data) and dev (monitoring, selection), never test.


rule train:
    input:
        tasks=task_files(["support", "query", "dev_pool", "dev_monitor"]),
        roles=ROLES,
        base=base_model_input(),
        env=ancient("results/env/report.json"),
    output:
        model=directory(RUN_MODEL),
        metrics_jsonl=f"results/{RUN}/metrics.jsonl",
        metrics_csv=report(
            f"results/{RUN}/metrics.csv",
            caption="../report/training_metrics.rst",
            category="Training",
            subcategory="{experiment}",
        ),
        summary=f"results/{RUN}/train_summary.json",
        # select.criterion tuned: one HF folder per dev-monitoring step (step-N/), for the tuner; last/best_dev: the
        # kept step only. Hard links into the checkpoint dir's copies, which survive a rerun (see the header).
        candidates=directory(f"results/{RUN}/candidates"),
    log:
        "results/logs/train/{experiment}_{method}_seed-{seed}.log",
    benchmark:
        "results/benchmarks/train/{experiment}_{method}_seed-{seed}.tsv"
    conda:
        ENV
    threads: TRAIN_THREADS
    resources:
        gpu=TRAIN_GPUS,
    params:
        settings=train_settings,
        launch=accelerate_launch_prefix(COMPUTE),
        checkpoint_dir=f"results/checkpoints/{RUN}",
        output_dir=f"results/{RUN}",
        tasks_dir=tasks_dir,
    shell:
        on_gpus(
            "{params.launch} -m fomaml_math train-{wildcards.method} --settings {params.settings:q}"
            " --tasks-dir {params.tasks_dir} --output-dir {params.output_dir}"
            " --checkpoint-dir {params.checkpoint_dir} > {log} 2>&1"
        )
