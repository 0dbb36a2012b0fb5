rule stats:
    input:
        evals=[*all_eval_files(), *metaloop_eval_files()],
        control=control_eval_files(),
    output:
        **{
            name: report(
                f"results/stats/{name}.tsv",
                caption=f"../report/{name}.rst",
                category="Significance tests",
            )
            for name in STATS_TABLES
        },
    log:
        "results/logs/stats.log",
    benchmark:
        "results/benchmarks/stats.tsv"
    conda:
        ENV
    params:
        settings=settings("stats"),
        out_dir=output_dir,
        control=lambda wildcards, input: f"--control-eval {' '.join(input.control)}" if input.control else "",
    shell:
        "python -m fomaml_math stats --settings {params.settings:q} --eval {input.evals} {params.control}"
        " --output-dir {params.out_dir} > {log} 2>&1"


rule figures:
    input:
        stats=expand("results/stats/{name}.tsv", name=STATS_TABLES),
        fomaml_metrics=f"results/{EXPERIMENTS[0]}/fomaml/seed-{SEEDS[0]}/metrics.csv",
        sft_metrics=f"results/{EXPERIMENTS[0]}/sft/seed-{SEEDS[0]}/metrics.csv",
        calibration=calibration_files(),
    output:
        pdf=expand("results/figures/{figure}.pdf", figure=FIGURES),
        png=[
            report(
                f"results/figures/{figure}.png",
                caption=f"../report/{figure}.rst",
                category="Figures",
            )
            for figure in FIGURES
        ],
    log:
        "results/logs/figures.log",
    benchmark:
        "results/benchmarks/figures.tsv"
    conda:
        ENV
    params:
        settings=settings("figures"),
        stats_dir=lambda wildcards, input: str(Path(input.stats[0]).parent),
        out_dir=output_dir,
        calibration=lambda wildcards, input: f"--calibration {' '.join(input.calibration)}" if input.calibration else "",
    shell:
        "MPLBACKEND=Agg python -m fomaml_math figures --settings {params.settings:q} --stats-dir {params.stats_dir}"
        " --fomaml-metrics {input.fomaml_metrics} --sft-metrics {input.sft_metrics} {params.calibration}"
        " --output-dir {params.out_dir} > {log} 2>&1"


rule summary:
    input:
        stats=expand("results/stats/{name}.tsv", name=STATS_TABLES),
        calibration=calibration_files(),
    output:
        summary=report("results/summary.md", caption="../report/summary.rst", category="Summary"),
        per_task=report("results/stats/per_task.md", caption="../report/per_task.rst", category="Summary"),
    log:
        "results/logs/summary.log",
    benchmark:
        "results/benchmarks/summary.tsv"
    conda:
        ENV
    params:
        settings=settings("summary"),
        stats_dir=lambda wildcards, input: str(Path(input.stats[0]).parent),
        calibration=lambda wildcards, input: f"--calibration {' '.join(input.calibration)}" if input.calibration else "",
    shell:
        "python -m fomaml_math summary --settings {params.settings:q} --stats-dir {params.stats_dir} {params.calibration}"
        " --output {output.summary} --per-task-output {output.per_task} > {log} 2>&1"


rule experiments:
    input:
        [f"results/{run}/train_summary.json" for run in trained_runs()],
    output:
        csv="results/experiments.csv",
        md=report(
            "results/experiments.md",
            caption="../report/experiments.rst",
            category="Summary",
        ),
    log:
        "results/logs/experiments.log",
    benchmark:
        "results/benchmarks/experiments.tsv"
    conda:
        ENV
    params:
        runs=lambda wildcards, input: " ".join(
            f"--run {Path(f).parent.relative_to('results')}={Path(f).parent}" for f in input
        ),
    shell:
        "python -m fomaml_math experiments {params.runs} --output-csv {output.csv} --output-md {output.md} > {log} 2>&1"


rule manifest:
    input:
        # the table and the role index determine every task file (no test file is read here)
        data=["results/data/math.parquet", ROLES],
        summaries=[f"results/{run}/train_summary.json" for run in trained_runs()],
        env="results/env/report.json",
    output:
        "results/manifest.json",
    log:
        "results/logs/manifest.log",
    conda:
        ENV
    params:
        config=json.dumps(config, sort_keys=True, default=str),
    shell:
        "python -m fomaml_math manifest --config-json {params.config:q} --data {input.data}"
        " --train-summaries {input.summaries} --output {output} > {log} 2>&1"
