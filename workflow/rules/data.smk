# The log and benchmark keep their names from when this rule was download_math.
rule ingest:
    output:
        table="results/data/math.parquet",
        report="results/data/ingest_report.json",
    log:
        "results/logs/download_math.log",
    benchmark:
        "results/benchmarks/download_math.tsv"
    conda:
        ENV
    params:
        settings=settings("ingest"),
    shell:
        "python -m fomaml_math ingest --settings {params.settings:q} --output {output.table} --report {output.report} > {log} 2>&1"


rule split_tasks:
    input:
        table="results/data/math.parquet",
    output:
        tasks=task_files(),
        roles=ROLES,
        stats="results/data/split_stats.tsv",
    log:
        "results/logs/split_tasks.log",
    benchmark:
        "results/benchmarks/split_tasks.tsv"
    conda:
        ENV
    params:
        settings=settings("split_tasks"),
        out_dir=lambda wildcards, output: str(Path(output.tasks[0]).parent.parent),
    shell:
        "python -m fomaml_math split-tasks --settings {params.settings:q} --input {input.table} --out-dir {params.out_dir}"
        " --stats {output.stats} > {log} 2>&1"
