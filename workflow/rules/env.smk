rule check_env:
    output:
        report="results/env/report.json",
        summary="results/env/report.txt",
    log:
        "results/logs/check_env.log",
    benchmark:
        "results/benchmarks/check_env.tsv"
    conda:
        ENV
    params:
        settings=settings("check_env"),
    shell:
        "python -m fomaml_math check-env --settings {params.settings:q} --output {output.report} --summary {output.summary}"
        " 2>&1 | tee {log}"
