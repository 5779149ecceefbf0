"""The reproduction's experiments: collected checkpoints, the generators each table needs, their
scores.

Modules, each importing only those above it here (and packages listed before this one in qg):
  training     one cached training run of a target model, and a task's starting points
  collect      collecting checkpoints and QAT targets (01_collect)
  settings     the splits, and which generators (Setting) and methods each table needs, per profile
  collected    reading them back: each pair's runs, splits and QAT targets
  scoring      top-1 of a model file on the profile's test subset, predictions cached beside the
               file
  fidelity     how faithful a generated quantized model is, and whether it follows its input
  layer_cost   what a one-step code error costs each layer (the `cost` loss weighting's input)
  experiments  every method's quantized file (PTQ, controls, Gen) and the generators, cached
  agreement    does Gen follow its input image by image: its predictions against every target's
  attribution  where a generated model loses its accuracy: one layer at a time from its target
  evaluation   scoring the experiments into tidy rows: evaluate, diagnose, convergence, ablations
  rpg_study    RPG's own experiment (10_rpg): its samples, the baselines and the memorisation tests,
               scored
  rpg_binary   RPG on binary tasks it never saw: relabelled tasks, per-task classifiers, samples
"""
