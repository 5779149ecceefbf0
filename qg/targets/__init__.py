"""The networks being quantized: their data, the timm models, and running them quantized.

Modules, each importing only those above it here (and packages listed before this one in qg):
  formats    the file formats datasets come in (IDX, CIFAR's pickles, restricted), read untrusted
  sources    where each dataset's files are found and how they are decoded; DATASET_INFO
  names      dataset names: a known dataset, or one relabelled (binary tasks, class splits)
  data       datasets by name, their fingerprints, and the batches models see
  models     timm target models from a JSON-able description; train / fine-tune / evaluate
  runtime    a quantized model kept packed in memory, dequantized per layer or on fused kernels
  export     a quantized file in hqq's layout, loaded by hqq's own HQQLinear
  calibrate  QwT fitted on a target model's own training images (the cache's and the CLI's one fit)
"""
