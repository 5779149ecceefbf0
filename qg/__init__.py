"""QuantGen reproduction: generate quantized weights (codes, scale S, zero point Z) from
full-precision ones.

Packages and top-level modules, one job each; each imports only those above it in this list (the
modules inside a package are listed, in the same rule, by its own docstring):
  core       foundations: the pinned CPU kernels, the cache and file rules, provenance and
             figures
  methods    the study's methods (fp, ptq, hqq, gen, ...): names, labels, kinds, what each needs
  quant      quantization without a generator: quantizer and file format, packed codes,
             baselines, QwT
  targets    the networks being quantized: datasets, timm models, the packed runtime, QwT
             calibration
  generator  the parameter generator: tokenizer, Mamba-2 body, heads, training loop, RPG mode
  config     a run's settings: the profile schema and the profiles in params/
  study      the experiments: collected checkpoints, the generators each table needs, scores,
             fidelity
  tables     the paper's tables and figures, one module per notebook
  notebook   what the notebooks share: the set-up line, the findings, the ablations'
             run-and-report
  results    results/<profile>/README.md, generated from the results CSVs by the tables' findings
  pipeline   the papermill runner that executes the notebooks in order
  bench      the speed and memory benchmark
  __main__   the command line (quantize, evaluate): core, quant, targets and generator only
"""

__version__ = "0.1.0"

from .core import kernels  # noqa: E402  (before any module that imports torch)

kernels.pin()
