"""The paper's tables and figures, rebuilt from per-checkpoint evaluations (`qg.study.evaluation`
rows), one module per notebook that shows them.

Each `*_table` returns (tidy DataFrame, Markdown) for `report.write_table`; each `*_figure` returns
a matplotlib figure for `report.save_figure`. Markdown tables are shaped like the paper's, with our
three splits as rows and the paper's own numbers (for the counterpart setting) in rows marked
"paper".

Modules, each importing only those above it here (and the packages before this one in qg):
  paper        the papers' own numbers (QuantGen Tables 1-6 and 10; RPG Tables 1, 9 and 14)
  common       method labels and order, paired differences and their intervals, the notes under
               every table, loss curves
  findings     what each results table says, with paired 95 % intervals (qg.results writes them)
  convergence  02_train's convergence study
  main         03_generate: Tables 1-3, Figures 1 and 3, Gen − PTQ per checkpoint
  qwt          03_generate: QwT on top of PTQ, HQQ and Gen
  fidelity     03_generate and 08: fidelity and memorisation of generated models
  following    03_generate and 08: does Gen's accuracy follow its target's, on every split
  ablations    04-07: one factor's variants against PTQ, and the computed findings
  amortized    08_residual_qat: amortized QAT against QAT and HQQ
  files        09_real_files: file sizes and the packed runtime
  rpg          10_rpg: RPG's samples and its unseen binary tasks
"""
