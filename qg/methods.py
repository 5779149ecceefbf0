"""The study's methods: every way a model of the tables is made from a full-precision checkpoint.

A method's `name` is what `evaluations.csv` and the cached files call it; its `kind` says which
maker `Experiment.model_file` calls (`reference`: the checkpoint itself; `quantizer`: a data-free
quantizer of `qg.quant.baselines`; `control`: PTQ of a modified input; `qat`: the QAT model
01_collect trained; `finetuned`: QAT's control, the same fine-tuning without quantization, so that
QAT − FP32 splits into the steps' gain and quantization's cost; `generator`: a generator's forward
pass). Any quantized method with `+qwt` after
its name is that method's file with QwT on top (`qg.quant.qwt`), which needs calibration images and
the full-precision weights.

Adding a method is one entry here plus its maker: a quantizer's function in
`qg.quant.baselines.QUANTIZERS`, or the overrides of a generator's settings (`overrides`, applied to
the profile's by `Setting.generator_for`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

KINDS = ("reference", "quantizer", "control", "qat", "finetuned", "generator")
QWT_SUFFIX = "+qwt"


@dataclass(frozen=True)
class Method:
    """One way to make a table's model of a checkpoint."""

    name: str
    label: str  # in tables and figures
    kind: str  # one of KINDS
    data_free: bool  # made from the weights alone, no image seen
    needs: tuple[str, ...] = ()  # what it reads besides the checkpoint
    per_checkpoint: bool = True  # False: one model per (architecture, task) (the soup)
    scheme: str | None = None  # quantizers: the scheme their files declare (None: the spec's)
    overrides: dict = field(default_factory=dict)  # generators: settings changed from the profile's
    variant: str = ""  # generators: the `variant` their rows carry in the tables
    qwt_rows: bool = False  # 03_generate shows it with QwT on top too

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(
                f"method {self.name!r}: kind must be one of {KINDS}, got {self.kind!r}"
            )


_GENERATOR = ("a trained generator",)
REGISTRY = {
    m.name: m
    for m in (
        Method("fp", "FP32", "reference", True),
        Method("ptq", "PTQ", "quantizer", True, qwt_rows=True),
        Method("rtn-asym", "RTN asym", "quantizer", True, scheme="asymmetric"),
        Method("mse-clip", "RTN + MSE clip", "quantizer", True, scheme="symmetric"),
        Method("hqq", "HQQ", "quantizer", True, scheme="asymmetric", qwt_rows=True),
        Method("noise", "PTQ of ckpt + noise", "control", True),
        Method(
            "soup",
            "PTQ of the soup",
            "control",
            True,
            ("the training checkpoints",),
            per_checkpoint=False,
        ),
        Method("qat", "QAT", "qat", False, ("training images",)),
        Method("fp-steps", "FP32 + QAT's steps", "finetuned", False, ("training images",)),
        Method("gen", "Gen", "generator", True, _GENERATOR, qwt_rows=True),
    )
}


def get(name: str) -> Method:
    """The method called `name`, `+qwt` ones included; a clear error for an unknown name."""
    base = name.removesuffix(QWT_SUFFIX)
    if base not in REGISTRY:
        raise ValueError(
            f"unknown method {name!r}; the methods are {list(REGISTRY)}, "
            f"each quantized one also with {QWT_SUFFIX!r} after it"
        )
    if base == name:
        return REGISTRY[name]
    m = REGISTRY[base]
    if m.kind == "reference":
        raise ValueError(
            f"QwT compensates a quantized model: `{name}` is not a method (try `ptq{QWT_SUFFIX}`)"
        )
    return Method(
        name,
        f"{m.label} + QwT",
        m.kind,
        False,
        (*m.needs, "calibration images", "the fp32 weights"),
        m.per_checkpoint,
        m.scheme,
        m.overrides,
        m.variant,
    )


def names(*kinds: str) -> tuple[str, ...]:
    """The registered methods of `kinds` (all when none is given), in the registry's order."""
    return tuple(n for n, m in REGISTRY.items() if not kinds or m.kind in kinds)


def label(name: str) -> str:
    """A method's label in tables; a paired difference `a-b` reads `A − B`; anything else stays as
    it is."""
    try:
        return get(name).label
    except ValueError:
        pass
    # names hold "-" too: split where both are known
    for i in (i for i, ch in enumerate(name) if ch == "-"):
        if _known(name[:i]) and _known(name[i + 1 :]):
            return f"{label(name[:i])} − {label(name[i + 1 :])}"
    return name


def _known(name: str) -> bool:
    return name.removesuffix(QWT_SUFFIX) in REGISTRY


def shown_with_qwt() -> tuple[str, ...]:
    """The methods 03_generate shows with and without QwT on top: each, then itself `+qwt`."""
    return tuple(x for n, m in REGISTRY.items() if m.qwt_rows for x in (n, n + QWT_SUFFIX))


def order() -> list[str]:
    """The tables' order of methods: the registry's, each shown-with-QwT method followed by its
    `+qwt`, then the generators' paired differences against PTQ."""
    qwt = shown_with_qwt()
    shown = [x for n in REGISTRY for x in ((n, n + QWT_SUFFIX) if n in qwt else (n,))]
    return shown + [f"{g}-ptq" for g in names("generator")]
