"""The networks being quantized: their data, the timm models, and running them quantized.

Modules, each importing only those above it here (and packages listed before this one in qg):
  data       datasets (Fashion-MNIST, digits, CIFAR, ImageNet folder)
  models     timm target models from a JSON-able description; train / fine-tune / evaluate
  runtime    a quantized model kept packed in memory, dequantized per layer; its memory and latency
  calibrate  QwT fitted on a target model's own training images (the cache's and the CLI's one fit)
"""
