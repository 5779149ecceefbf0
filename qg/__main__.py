"""Command line: quantize your own checkpoint with a trained generator, and evaluate a quantized
file.

    python -m qg quantize --generator DIR --checkpoint FILE --bits N --granularity G -o OUT
        [--qwt 512]
    python -m qg evaluate OUT [--test-subset N] [--runtime]
    python -m qg export OUT -o HQQ_FILE

`quantize` reads a full-precision checkpoint (safetensors written by
`qg.targets.models.save_checkpoint`, e.g. one from `artifacts/<profile>/collect/`), runs the
generator once and writes a quantized model file (integer codes bit-packed, S, Z); `evaluate`
rebuilds the timm model from a file's metadata and reports its top-1 accuracy on the test split of
the dataset the file names, and for a quantized file its size and bits per weight; `--runtime`
scores the model kept packed in memory (`qg.targets.runtime`) instead of dequantized; `export`
writes a quantized file in hqq's layout, whose Linear layers hqq's `HQQLinear` loads
(`qg.targets.export`).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from .core.io import CorruptFileError, check_recorded, read_safetensors
from .generator.directory import QuantGen
from .quant.fileformat import FORMAT_NAME, save_quantized, storage
from .quant.quantizer import GRANULARITIES, QuantSpec
from .targets.calibrate import with_qwt
from .targets.data import batches
from .targets.export import export_hqq
from .targets.models import (
    accuracy,
    check_model_size,
    load_checkpoint,
    load_model_description,
    load_model_file,
    resolve_device,
)
from .targets.models import evaluate as evaluate_model
from .targets.runtime import load_runtime


def quantize(args) -> None:
    _check_output(
        Path(args.output),
        inputs=[Path(args.checkpoint)],
        protected=Path(args.generator),
        force=args.force,
    )
    quantgen = QuantGen.load(args.generator, resolve_device(args.device))
    trained = quantgen.specs
    group_size = args.group_size or trained[0].group_size
    spec = QuantSpec(args.bits, args.granularity, group_size, args.scheme or trained[0].scheme)
    check_model_size(load_model_description(args.checkpoint))
    sd, model_spec, _ = load_checkpoint(args.checkpoint)
    qsd, seconds = quantgen.quantize(sd, spec, seed=args.seed)
    meta = {
        "model": model_spec.to_dict(),
        "method": "gen",
        "source": str(args.checkpoint),
        "generator": str(args.generator),
        "seconds": seconds,
    }
    if args.qwt:
        try:
            qsd, record = with_qwt(
                qsd, sd, model_spec, args.qwt, seed=args.seed, device=resolve_device(args.device)
            )
        except FileNotFoundError as e:
            raise ValueError(
                f"--qwt fits on {args.qwt} images of the training split of {model_spec.dataset}, "
                f"which is not here: {e}\nOmit --qwt to write the data-free file."
            ) from e
        meta.update(method="gen+qwt", qwt=record, seconds=seconds + record["seconds"])
    save_quantized(args.output, qsd, spec, meta)
    applied = (
        f", QwT on {sum(record['applied'])} of {len(record['applied'])} blocks" if args.qwt else ""
    )
    print(f"wrote {args.output}: {spec.name}, generated in {meta['seconds']:.3f} s{applied}")


def _check_output(out: Path, inputs: list[Path], protected: Path | None, force: bool) -> None:
    """Refuse an output that would destroy an input (the checkpoint, anything inside the generator
    directory), a path that cannot be a file, or an existing file unless --force: before any work is
    done."""
    target = out.resolve()
    inside = protected is not None and target.is_relative_to(protected.resolve())
    if any(target == p.resolve() for p in inputs) or inside:
        raise ValueError(
            f"output {out} would overwrite an input ({', '.join(map(str, inputs))}"
            f"{f' or the generator in {protected}' if protected else ''}); write it elsewhere"
        )
    if out.is_dir():
        raise ValueError(
            f"output {out} is a directory: give a file name, e.g. {out / 'model.safetensors'}"
        )
    parent = next((p for p in out.parents if p.exists()), Path("."))
    if not parent.is_dir():
        raise ValueError(f"output {out}: {parent} is a file, not a directory")
    if out.exists() and not force:
        raise ValueError(f"output {out} exists; pass --force to replace it")


def evaluate(args) -> None:
    check_model_size(load_model_description(args.file))
    sd, model_spec, meta = load_model_file(args.file)
    bad = sorted(k for k, v in sd.items() if v.is_floating_point() and not torch.isfinite(v).all())
    if bad:
        message = (
            f"{args.file} has NaN/inf values in {len(bad)} tensor(s) ({', '.join(bad[:3])}"
            f"{' ...' if len(bad) > 3 else ''}): its accuracy means nothing"
        )
        if not args.allow_nonfinite:
            raise ValueError(message + "; pass --allow-nonfinite to score it anyway")
        print(f"warning: {message}", file=sys.stderr)
    test = batches(
        model_spec.dataset,
        "test",
        model_spec.img_size,
        250,
        subset=args.test_subset,
        seed=args.seed,
        norm=model_spec.norm,
    )
    quantized = read_safetensors(args.file, tensors=False)[1].get("format") == FORMAT_NAME
    if args.runtime and not quantized:
        raise ValueError(
            f"{args.file} is a full-precision checkpoint: --runtime runs quantized model files only"
        )
    device = resolve_device(args.device)
    acc = (
        evaluate_model(load_runtime(args.file)[0], test, device)
        if args.runtime
        else accuracy(model_spec, sd, test, device)
    )
    what = f"{meta.get('method', 'fp')} model" if "method" in meta else "checkpoint"
    how = " (packed runtime)" if args.runtime else ""
    print(
        f"{args.file}: {what} of {model_spec.arch} on {model_spec.dataset} test "
        f"({len(test.dataset)} images): top-1 {acc:.2f}%{how}"
    )
    if quantized:
        size = storage(args.file)
        print(
            f"  {size['file_bytes'] / 1024:.1f} KiB on disk, "
            f"1/{size['fp32_bytes'] / size['file_bytes']:.1f} of its float32 tensors "
            f"({size['fp32_bytes'] / 1024:.1f} KiB); {size['bits_per_weight']:.2f} bits per "
            f"quantized weight (format version {size['format_version']})"
        )


def export(args) -> None:
    _check_output(Path(args.output), inputs=[Path(args.file)], protected=None, force=args.force)
    written = export_hqq(args.file, args.output)
    kept = [f"  {m}: {how}" for m, how in written.items() if how != "HQQLinear"]
    print(
        f"{args.output}: {len(written) - len(kept)} of {len(written)} quantized layers as hqq's "
        "HQQLinear (load with qg.targets.export.load_hqq)"
        + ("; written as float32:\n" + "\n".join(kept) if kept else "")
    )


def _positive(text: str) -> int:
    if not text.lstrip("-").isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return int(text)


def main(argv: list[str] | None = None) -> None:
    args = _parser().parse_args(argv)
    try:
        for path in _inputs(args):
            check_recorded(path)
        {"quantize": quantize, "evaluate": evaluate, "export": export}[args.command](args)
    except (ValueError, OSError, CorruptFileError) as err:
        sys.exit(f"error: {err}")


def _inputs(args) -> list[Path]:
    """The files a command reads: each is refused if a `.sha256` beside it no longer matches."""
    if args.command in ("evaluate", "export"):
        return [Path(args.file)]
    generator = Path(args.generator)
    return [
        Path(args.checkpoint),
        generator / "generator.safetensors",
        generator / "generator.json",
    ]


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m qg",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = p.add_subparsers(dest="command", required=True)
    x = sub.add_parser("export", help="write a quantized model file in hqq's layout")
    x.add_argument("file", help="a quantized model file of qg")
    x.add_argument("-o", "--output", required=True, help="the hqq file to write (.safetensors)")
    x.add_argument("--force", action="store_true", help="replace the output file if it exists")
    for sp in (_quantize_arguments(sub), _evaluate_arguments(sub)):
        sp.add_argument(
            "--device", default="auto", help="cpu, cuda[:i] or auto (CUDA when available; default)"
        )
    return p


def _quantize_arguments(sub) -> argparse.ArgumentParser:
    q = sub.add_parser(
        "quantize", help="quantize a full-precision checkpoint with a trained generator"
    )
    q.add_argument(
        "--generator",
        required=True,
        help="a generator directory (artifacts/<profile>/generators/...)",
    )
    q.add_argument(
        "--checkpoint",
        required=True,
        help="full-precision checkpoint (.safetensors with a qg model description)",
    )
    q.add_argument(
        "--bits", type=int, required=True, help="bit-width the generator was trained for (2..8)"
    )
    q.add_argument("--granularity", choices=GRANULARITIES, required=True)
    q.add_argument("--group-size", type=_positive, help="default: the generator's")
    q.add_argument("--scheme", choices=("symmetric", "asymmetric"), help="default: the generator's")
    q.add_argument(
        "--seed",
        type=int,
        default=0,
        help="seed of the padding noise, any sampler and QwT's images",
    )
    q.add_argument(
        "--qwt",
        type=_positive,
        metavar="N",
        help="add QwT compensations fitted on N images of the checkpoint's training data "
        "(needs the dataset)",
    )
    q.add_argument(
        "-o", "--output", required=True, help="quantized model file to write (.safetensors)"
    )
    q.add_argument("--force", action="store_true", help="replace the output file if it exists")
    return q


def _evaluate_arguments(sub) -> argparse.ArgumentParser:
    e = sub.add_parser("evaluate", help="top-1 accuracy of a quantized model file or a checkpoint")
    e.add_argument("file")
    e.add_argument(
        "--test-subset", type=_positive, help="evaluate on a seeded subset of this many test images"
    )
    e.add_argument(
        "--allow-nonfinite",
        action="store_true",
        help="score a model with NaN/inf float weights (warns); NaN scales in a quantized file "
        "are refused",
    )
    e.add_argument(
        "--runtime",
        action="store_true",
        help="run the packed low-bit model (qg.targets.runtime) instead of the dequantized "
        "float one",
    )
    e.add_argument("--seed", type=int, default=0)
    return e


if __name__ == "__main__":
    main()
