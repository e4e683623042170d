"""The study pipelines behind docs/results.md: each reads the run directories that `mea sweep`,
`mea pretrain`, `mea convert` and `mea evaluate` wrote and turns them into tables, plots and the
next configs to run. Nothing here trains a model of its own.

- ``lr_scaling`` (``mea study-lr-scaling``): the optimal learning rate per model size, a power-law
  fit and a prediction for a larger size (experiment 5).
- ``compression_table`` (``mea study-compression``): a pretrained model converted to fewer stored KV
  heads by each init, before and after healing, against mean-pooled GQA/MQA (experiment 4).
- ``report`` (``mea study-report``): every table and plot of docs/results.md from the study's runs.
- ``scratch`` (``mea study-scratch declare | report | plan``): the from-scratch study at 10 tokens per
  parameter: the pilot's declared choices, summary.json with paired tests over seeds, and the GPU plan.

Each also runs as ``python -m mea.study.<module>`` with the same arguments.
"""
