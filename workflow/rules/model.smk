# Offline configs only (model.tiny set): build a tiny Qwen3 and its tokenizer, then (model.pretrain set) pretrain
# it briefly on rule-free synthetic problems (never a dev or test problem) into model.name_or_path, the base.
if TINY:

    rule build_tiny_model:
        input:
            tasks=task_files(["support", "query"]),
        output:
            directory(TINY_INIT),
        log:
            "results/logs/build_tiny_model.log",
        benchmark:
            "results/benchmarks/build_tiny_model.tsv"
        conda:
            ENV
        params:
            settings=settings("build_tiny_model"),
            tasks_dir=tasks_dir,
        shell:
            "python -m fomaml_math build-tiny-model --settings {params.settings:q} --tasks-dir {params.tasks_dir} --output {output}"
            " > {log} 2>&1"


if PRETRAIN:

    rule pretrain_tiny_base:
        input:
            init=TINY_INIT,
            tasks=task_files(["dev_pool", "dev_monitor", "test"]),
        output:
            directory(BASE_MODEL),
        log:
            "results/logs/pretrain_tiny_base.log",
        benchmark:
            "results/benchmarks/pretrain_tiny_base.tsv"
        conda:
            ENV
        threads: workflow.cores
        params:
            settings=settings("pretrain_tiny_base"),
            tasks_dir=tasks_dir,
        shell:
            "python -m fomaml_math pretrain-tiny-base --settings {params.settings:q} --init-model {input.init}"
            " --tasks-dir {params.tasks_dir} --output {output} > {log} 2>&1"
