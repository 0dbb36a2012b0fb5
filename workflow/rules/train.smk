# Both trainings run under `accelerate launch`. Checkpoints live in a params directory, not in
# the outputs: Snakemake deletes a failed job's outputs, and a rerun must find them to resume.


rule train:
    input:
        tasks=task_files(),  # test: held-out monitoring
        base=base_model_input(),
        env=ancient("results/env/report.json"),
    output:
        model=directory("results/models/{method}/model"),
        metrics_jsonl="results/models/{method}/metrics.jsonl",
        metrics_csv=report(
            "results/models/{method}/metrics.csv",
            caption="../report/training_metrics.rst",
            category="Training",
        ),
        summary="results/models/{method}/train_summary.json",
    log:
        "results/logs/train_{method}.log",
    benchmark:
        "results/benchmarks/train_{method}.tsv"
    conda:
        ENV
    threads: workflow.cores
    resources:
        gpu=TRAIN_GPUS,
    params:
        settings=lambda wildcards: settings(f"train_{wildcards.method}"),
        launch=accelerate_launch_prefix(COMPUTE),
        checkpoint_dir="results/checkpoints/{method}",
        output_dir="results/models/{method}",
        tasks_dir=tasks_dir,
    shell:
        "python -m fomaml_math.devices run --per-job {resources.gpu}"
        " --lock-dir results/.gpu-locks -- {params.launch} -m fomaml_math train-{wildcards.method} --settings {params.settings:q}"
        " --tasks-dir {params.tasks_dir} --output-dir {params.output_dir}"
        " --checkpoint-dir {params.checkpoint_dir} > {log} 2>&1"
