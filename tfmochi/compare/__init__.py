"""`python -m tfmochi.compare`: trains named variants over several seeds, evaluates every run the
same way, and writes the results: mean ± std over seeds, and each variant against moco_v2 seed by
seed (paired differences, 95% t intervals, Holm's adjustment, what the design resolves).

  python -m tfmochi.compare --base_flagfile=configs/compare_digits.flags \\
      --variants=moco_v2,mochi,hard --seeds=5 --output_dir=runs/compare

Each (variant, seed) is one `python -m tfmochi.train` process, `--flagfile=BASE` followed by the
variant's flags (`variants`), the sweep's overrides (`--train_steps`/`--epochs`,
`--strategy`, `--train_flags`) and `--seed=k --model_dir=OUTPUT/runs/<variant>/seed<k>`; then one
`python -m tfmochi.compare.eval` process measures it (kNN, the linear probe on cached features,
the random-init and raw-pixel baselines on the same split, the negatives analysis). Separate
processes isolate the runs: a crash or a failing variant is reported (exit status and the log's
last line) and the sweep goes on. The driver itself needs no TensorFlow.

Resuming: a run with summary.json is not trained again, one with compare_eval.json of its final
step is not evaluated again; a run killed half-way resumes from its last checkpoint (the
trainer's own resume). So after a kill, the same command continues the sweep. A Ctrl-C / SIGTERM
reaches the training process too: it checkpoints, and the sweep stops.

Outputs in OUTPUT: results.json (every run's numbers, means and spreads, the paired comparisons,
the resolution, failures), results_runs.csv (one row per run: variant, seed, status, cost and
every figure, to redo the statistics elsewhere), results.md (what the design resolves, the
tables, the paired comparisons and their reading), knn_over_steps.png, alignment_uniformity.png
(`report`), rewritten after every run. Logs: OUTPUT/runs/<variant>/seed<k>/train.log and eval.log;
the run's compare_cost.json adds up the wall and CPU seconds every invocation spent on it.

Under `--strategy=multi_worker` run the same command on every worker (TF_CONFIG): all of them
train each run together, only the chief evaluates and writes the results (not tested here).

Modules, one job each (none imports TensorFlow but `eval`, which runs in its own process):

  variants   the named variants: registry, parametric names, variants files
  sweep      `run_sweep`: the train and eval processes of every (variant, seed), resuming
  eval       `python -m tfmochi.compare.eval`: what the sweep measures of one finished run
  report     per-run metrics from the runs' files, mean ± std over seeds, the per-run CSV,
             the paired table, results.json/.md, plots
  stats      paired t intervals over seeds, Holm/Bonferroni, resolution, the reading's words
  cli        the command line (`tfmochi.cli` conventions: one message and exit status 2 on errors)
"""
