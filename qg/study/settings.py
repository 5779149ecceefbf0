"""Which generators a profile's tables need: a `Setting` is one generator (an architecture and task,
the spec(s) it produces, where its targets come from, overrides for the ablations), and these
functions list the settings and methods of every table, the convergence study, the ablations and
amortized QAT.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field, replace

from .. import methods
from ..config.blocks import Block, GeneratorBlock, TokenizerBlock, TrainBlock
from ..config.profiles import ablation_setup, pairs, selected
from ..config.schema import Profile
from ..generator.target_values import TARGETS
from ..quant.quantizer import QuantSpec

SPLITS = ("trained", "heldout_ckpt", "heldout_run")  # what the tables report
# where a choice among variants is made (run C): a run no generator trained on, like the held-out
# run, but never the one the tables report
VALIDATION = "validation_run"  # run C's split
CHOICE_SPLIT = VALIDATION


SOURCES = ("ptq", "qat")


PARTS = {"tokenizer": TokenizerBlock, "generator": GeneratorBlock, "train": TrainBlock}


@dataclass
class Setting:
    """One generator to train: which model, which spec(s), which targets, which overrides."""

    arch: str
    task: str
    specs: list[QuantSpec]
    source: str = "ptq"
    condition: str | None = None  # None (one spec), "precision" or "granularity"
    # {"tokenizer"|"generator"|"train": {...}} for ablations
    overrides: dict = field(default_factory=dict)
    label: str = ""  # names an ablation variant in tables

    def __post_init__(self):
        if self.source not in SOURCES:
            raise ValueError(f"source must be one of {SOURCES}, got {self.source!r}")
        if len(self.specs) > 1 and self.condition is None:
            raise ValueError(
                "a setting with several specs is a conditional generator: give condition="
            )

    @property
    def name(self) -> str:
        """Names the generator (not the ablation label: a variant equal to the default shares its
        generator)."""
        what = f"cond-{self.condition}" if self.condition else self.specs[0].name
        return "-".join([self.arch, self.task, self.source, what])

    def generator_for(self, method: str) -> "Setting":
        """The setting of the generator that makes `method`'s models (a `generator` of `qg.methods`,
        with its overrides and variant label): this one for `gen`."""
        m = methods.get(method)
        if m.kind != "generator":
            raise ValueError(
                f"{method!r} is not a generator method; they are {list(methods.names('generator'))}"
            )
        if not m.overrides:
            return self
        merged = copy.deepcopy(self.overrides)
        for part, conf in m.overrides.items():
            merged[part] = {**merged.get(part, {}), **conf}
        return replace(self, overrides=merged, label=m.variant)

    def config(self, profile: Profile, part: str) -> dict:
        """The keys of the profile's `tokenizer`, `generator` or `train` settings for this
        generator, as written (what its cache key is made from), updated in turn by
        `conditional_train` (conditional generators), the architecture's own entry (ViT-Base's
        larger tokens) and the setting's overrides (ablations, convergence variants)."""
        conf = profile.set_in(part)
        if self.condition and part == "train":
            conf.update(profile.set_in("conditional_train"))
        conf.update(profile.set_in("archs", self.arch, part))
        conf.update(copy.deepcopy(self.overrides.get(part, {})))
        return conf

    def block(self, profile: Profile, part: str) -> Block:
        """`config` checked against its schema block: every value, defaults filled in."""
        return PARTS[part](**self.config(profile, part))


def main_settings(profile: Profile) -> dict[str, list[Setting]]:
    """The generators Tables 1-3 and Figure 3 need, by the table that first needs them.

    table1: unconditional, PTQ targets, group-wise at every bit-width and channel-wise at
    `granularity_bits`, for every (architecture, task); figure3: channel-wise at the other
    bit-widths for one (architecture, task); table2: QAT targets; table3: one generator conditional
    on precision, one on granularity.
    """
    quant, bits, gbits = profile.quant, profile.table1.bits, profile.table1.granularity_bits
    f3, t3, qat = profile.figure3, profile.table3, profile.qat
    settings = {
        "table1": [Setting(a, t, [quant.spec(b, "group")]) for a, t in pairs(profile) for b in bits]
        + [Setting(a, t, [quant.spec(gbits, "channel")]) for a, t in pairs(profile)],
        "figure3": [
            Setting(f3.arch, f3.task, [quant.spec(b, "channel")]) for b in bits if b != gbits
        ],
        "table2": [
            Setting(a, t, [qat.spec(quant, b)], source="qat")
            for a, t in pairs(profile)
            if selected(qat, a, t)
            for b in qat.bits
        ],
        "table3": [],
    }
    for a, t in pairs(profile):
        if selected(t3, a, t):
            settings["table3"] += [
                Setting(a, t, [quant.spec(b, "group") for b in bits], condition="precision"),
                Setting(
                    a,
                    t,
                    [quant.spec(gbits, g) for g in ("channel", "group")],
                    condition="granularity",
                ),
            ]
    return settings


def table1_generators(profile: Profile) -> tuple[str, ...]:
    """The generator methods (`qg.methods`) Table 1 compares for each of its settings."""
    return tuple(profile.table1.generators)


def table_methods(profile: Profile) -> dict[str, tuple[str, ...]]:
    """The methods (`qg.methods`) 03_generate scores for each table on every split: Table 1 and
    Figure 3 set the generators against FP32 and every data-free quantizer and per-checkpoint
    control; Tables 2 and 3 against PTQ (and QAT)."""
    baselines = tuple(
        n for n in methods.names("quantizer", "control") if methods.get(n).per_checkpoint
    )
    return {
        "table1": ("fp", *baselines, *table1_generators(profile)),
        "figure3": ("fp", *baselines, "gen"),
        "table2": ("fp", "ptq", "qat", "gen"),
        "table3": ("fp", "ptq", "gen"),
    }


def qwt_methods(profile: Profile) -> tuple[str, ...]:
    """The methods 03_generate also scores with QwT on top (needs calibration data): none without a
    `qwt` block."""
    if profile.qwt is None:
        return ()
    return tuple(m for m in methods.shown_with_qwt() if m.endswith(methods.QWT_SUFFIX))


def convergence_settings(profile: Profile) -> list[Setting]:
    """The convergence study of 02_train: every (architecture, task) at one spec, once per variant
    of the profile's `convergence` block (label -> overrides of tokenizer / generator / train
    settings: more steps, the paper's head, another width). A variant equal to the defaults is the
    Table 1 generator, not a new one; no block (or no variants) means no study."""
    c = profile.convergence
    if c is None or not c.variants:
        return []
    spec = profile.quant.spec(c.bits, c.granularity)
    return [
        Setting(
            a, t, [spec], overrides=profile.set_in("convergence", "variants", label), label=label
        )
        for a, t in pairs(profile)
        for label in c.variants
    ]


ABLATIONS = {
    # factor -> how one variant value overrides the profile (the ablation notebooks 04-07, and
    # 08's target)
    "target": lambda v: {"tokenizer": {"target": v}} if v != "direct" else {},
    "padding": lambda v: {"tokenizer": {"padding": v}},
    "head": lambda v: {"generator": v},
    "backbone": lambda v: {"generator": {"backbone": v}},
    # RPG: width = token
    "token_size": lambda v: {"tokenizer": {"token_size": v}, "generator": {"d_model": v}},
}


def amortized_settings(profile: Profile) -> list[Setting]:
    """08_residual_qat: for every (architecture, task) with QAT targets and each of
    `amortized_qat.bits`, one generator per target (`direct`, the paper's; `residual`, offsets from
    RTN) and per source (PTQ targets: the correctness check, where the right answer is to change
    nothing; QAT targets: amortized QAT). The direct ones are Tables 1 and 2's generators, read from
    the cache."""
    qat = profile.qat
    return [
        Setting(
            a,
            t,
            [
                qat.spec(profile.quant, b)
                if source == "qat"
                else profile.quant.spec(b, qat.granularity)
            ],
            source,
            overrides=ABLATIONS["target"](target),
            label=target,
        )
        for a, t in pairs(profile)
        if selected(qat, a, t)
        for b in (profile.amortized_qat.bits if profile.amortized_qat else [])
        for source in SOURCES
        for target in TARGETS
    ]


def amortized_methods(profile: Profile, setting: Setting) -> tuple[str, ...]:
    """What 08_residual_qat scores for one of its settings: FP32, PTQ, HQQ, QAT and QAT's FP32
    control beside Gen. When QAT has a grid of its own (`qat.scheme`), the PTQ-target settings
    score no QAT (there is none on their grid) and the QAT-target ones no HQQ; their PTQ is RTN
    on QAT's grid, what their Gen − PTQ pairs with (the amortized table's PTQ column stays the
    quant block's: `qg.tables.amortized.amortized_wide`)."""
    if profile.qat.scheme in (None, profile.quant.scheme):
        return ("fp", "ptq", "hqq", "qat", "fp-steps", "gen")
    own = ("hqq",) if setting.source == "ptq" else ("qat", "fp-steps")
    return ("fp", "ptq", *own, "gen")


def ablation_settings(profile: Profile, factor: str, variants: dict | None = None) -> list[Setting]:
    """One generator per (variant, spec) of the profile's ablation setting, changing only `factor`.

    `variants` maps a label to the factor's value (for `head`, GeneratorConfig fields; default: the
    profile's `ablation.<factor>`, as written). A variant
    equal to the profile's default trains nothing new: it is the main tables' generator, read from
    the cache.
    """
    if factor not in ABLATIONS:
        raise ValueError(f"unknown ablation factor {factor!r}; one of {sorted(ABLATIONS)}")
    a = ablation_setup(profile, factor)
    if variants is None:
        variants = profile.set_in("ablation", factor)
    return [
        Setting(
            a.arch,
            a.task,
            [profile.quant.spec(b, a.granularity)],
            overrides=ABLATIONS[factor](value),
            label=str(label),
        )
        for label, value in variants.items()
        for b in a.bits
    ]
