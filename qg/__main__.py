"""Command line: quantize your own checkpoint with a trained generator, and evaluate a quantized file.

    python -m qg quantize --generator DIR --checkpoint FILE --bits N --granularity G -o OUT
    python -m qg evaluate OUT [--test-subset N]

`quantize` reads a full-precision checkpoint (safetensors written by `qg.models.save_checkpoint`, e.g. one
from `artifacts/<profile>/collect/`), runs the generator once and writes a quantized model file (integer
codes, S, Z); `evaluate` rebuilds the timm model from a file's metadata and reports its top-1 accuracy on
the test split of the dataset the file names.
"""

from __future__ import annotations

import argparse
import sys

from .data import batches
from .generator import QuantGen
from .io import CorruptFileError
from .models import accuracy, load_checkpoint, load_model_file, resolve_device
from .quant import GRANULARITIES, QuantSpec, save_quantized


def quantize(args) -> None:
    quantgen = QuantGen.load(args.generator, resolve_device(args.device))
    trained = quantgen.specs
    group_size = args.group_size or trained[0].group_size
    spec = QuantSpec(args.bits, args.granularity, group_size, args.scheme or trained[0].scheme)
    sd, model_spec, _ = load_checkpoint(args.checkpoint)
    qsd, seconds = quantgen.quantize(sd, spec, seed=args.seed)
    save_quantized(args.output, qsd, spec, {"model": model_spec.to_dict(), "method": "gen", "source": str(args.checkpoint),
                                             "generator": str(args.generator), "seconds": seconds})
    print(f"wrote {args.output}: {spec.name}, generated in {seconds:.3f} s")


def evaluate(args) -> None:
    sd, model_spec, meta = load_model_file(args.file)
    test = batches(model_spec.dataset, "test", model_spec.img_size, 250, subset=args.test_subset, seed=args.seed,
                   norm=model_spec.norm)
    acc = accuracy(model_spec, sd, test, resolve_device(args.device))
    what = f"{meta.get('method', 'fp')} model" if "method" in meta else "checkpoint"
    print(f"{args.file}: {what} of {model_spec.arch} on {model_spec.dataset} test ({len(test.dataset)} images): "
          f"top-1 {acc:.2f}%")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m qg", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    q = sub.add_parser("quantize", help="quantize a full-precision checkpoint with a trained generator")
    q.add_argument("--generator", required=True, help="a generator directory (artifacts/<profile>/generators/...)")
    q.add_argument("--checkpoint", required=True, help="full-precision checkpoint (.safetensors with a qg model description)")
    q.add_argument("--bits", type=int, required=True, help="bit-width the generator was trained for (2..8)")
    q.add_argument("--granularity", choices=GRANULARITIES, required=True)
    q.add_argument("--group-size", type=int, help="default: the generator's")
    q.add_argument("--scheme", choices=("symmetric", "asymmetric"), help="default: the generator's")
    q.add_argument("--seed", type=int, default=0, help="seed of the padding noise and any sampler")
    q.add_argument("-o", "--output", required=True, help="quantized model file to write (.safetensors)")
    e = sub.add_parser("evaluate", help="top-1 accuracy of a quantized model file or a checkpoint")
    e.add_argument("file")
    e.add_argument("--test-subset", type=int, help="evaluate on a seeded subset of this many test images")
    e.add_argument("--seed", type=int, default=0)
    for sp in (q, e):
        sp.add_argument("--device", default="auto", help="cpu, cuda[:i] or auto (CUDA when available; default)")
    args = p.parse_args(argv)
    try:
        {"quantize": quantize, "evaluate": evaluate}[args.command](args)
    except (ValueError, FileNotFoundError, CorruptFileError) as err:
        sys.exit(f"error: {err}")


if __name__ == "__main__":
    main()
