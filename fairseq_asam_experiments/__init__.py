"""The experiment kit: the paper's IWSLT'14 De→En Table 4 with the plugin, from data to report.

It depends on the plugin (`fairseq_asam`), never the other way round: `--user-dir
fairseq_asam` loads none of these modules and none of their dependencies (the `experiments`
extra: sacrebleu, subword-nmt, sacremoses, matplotlib, regex).

    prepare          IWSLT'14 de-en as fairseq's prepare-iwslt14.sh (fairseq-asam-prepare)
    synthetic_data   the generated corpora: the toy corpus and the IWSLT-layout sample archive
    recipe           the fairseq-train argument files of configs/ (shipped as package data)
    grid             presets, rows, sweeps, seeds, each run's fairseq-train command, grid.json
    launch           one run (lock, train, evaluate, sharpness), the local pool, submitit jobs
    table4           the pipeline command: checks, data, grid, runs, report (fairseq-asam-table4)
    evaluation       a run's tokenized BLEU (assumed Table 4's), sacreBLEU (fairseq-asam-evaluate)
    report           Table 4 and plots from the runs (fairseq-asam-report)
    sharpness        sharpness and adaptive sharpness of a checkpoint (fairseq-asam-sharpness)
    trajectories     SGD/SAM/ASAM on a 2-parameter scale-symmetric loss (fairseq-asam-trajectories)
    benchmark        the cost of an update, Adam vs SAM vs ASAM (fairseq-asam-benchmark)
    loading          a checkpoint, its task on a data folder, model, criterion and batches
    cli              the console commands above (also `python -m fairseq_asam_experiments NAME`)
    files, logs      the one atomic-write helper; progress to stdout in fairseq's format

A module imports only modules below it (test_structure checks there is no cycle).
"""

# fairseq-asam-<command> -> the module whose `main` it is: setup.py's console scripts and
# `python -m fairseq_asam_experiments <command>` both read this (so it imports nothing).
COMMANDS = {
    "table4": "table4",
    "prepare": "prepare",
    "evaluate": "evaluation",
    "report": "report",
    "sharpness": "sharpness",
    "benchmark": "benchmark",
    "trajectories": "trajectories",
    "precision": "precision",
    "correlation": "correlation",
}
