if TINY:

    rule build_tiny_model:
        input:
            tasks=task_files(["support", "query"]),
        output:
            directory(BASE_MODEL),
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
