"""The profile schema: the whole profile (`Profile`, its sections from `qg.config.blocks` and
`qg.config.rpg`), checked.

`load_profile` checks a profile (with its overrides merged in) against `Profile` before any notebook
starts, so a typo, a string where a number belongs or a negative step count is refused at once with
the key's path and, for a misspelt name, the nearest known one. Types are coerced where YAML is
ambiguous (`lr: 3e-3`, which YAML 1.1 reads as a string, becomes 0.003; `steps: "40"` becomes 40)
and refused otherwise. The code reads the checked `Profile` itself (`P.train.steps`: every default
is the schema's, stated once); cache keys and provenance are made from `Profile.written`, the keys
the file set with the file's own values (an int stays an int), so that a default added to the
schema or a number's coercion changes no cache key.

The tokenizer, generator and train blocks (in `qg.config.blocks`) mirror `Tokenizer.fit`,
`GeneratorConfig` and `TrainConfig` (their defaults are read from there; a test keeps the key sets
equal).
Cross-references (an ablation on an (arch, task) 01_collect does not make, amortized bits without
QAT targets) are `profiles.profile_problems`. The profile reference, `params/README.md`, is
`reference_page()`.
"""

from __future__ import annotations

import copy
import difflib
import types
from typing import Annotated, Any, Literal, Union, get_args, get_origin

import annotated_types as at
from pydantic import Field, PrivateAttr, ValidationError, field_validator, model_validator
from pydantic.fields import FieldInfo

from .blocks import (
    Ablation,
    AblationSetup,
    Amortized,
    Arch,
    Block,
    Checkpoints,
    Controls,
    Convergence,
    DiffusionBlock,
    Eval,
    GeneratorBlock,
    Overrides,
    Pair,
    Qat,
    Quant,
    Qwt,
    Selection,
    Table1,
    TokenizerBlock,
    TrainBlock,
    TrainRun,
)
from .rpg import BinaryRun, Rpg, RpgBinary


class Profile(Block):
    """A whole profile (`params/<name>.yaml`)."""

    seed: Annotated[int, Field(ge=0)] = Field(description="seed of every random step")
    device: str | None = Field(None, description="cpu, cuda, cuda:N or auto")
    archs: dict[str, Arch] = Field(min_length=1, description="target architectures")
    pretrain: TrainRun | None = Field(description="pretraining (null: timm's pretrained weights)")
    tasks: dict[str, TrainRun] = Field(
        min_length=1, description="fine-tuning tasks (full, head, ...)"
    )
    checkpoints: Checkpoints = Field(description="checkpoints per (arch, task) and their splits")
    quant: Quant = Field(description="group size and scheme of every spec")
    qat: Qat = Field(description="QAT targets")
    amortized_qat: Amortized | None = Field(None, description="08_residual_qat's bit-widths")
    tokenizer: TokenizerBlock = Field(description="how checkpoints become tokens")
    generator: GeneratorBlock = Field(description="the generator's architecture")
    train: TrainBlock = Field(description="the generator's training")
    conditional_train: TrainBlock | None = Field(
        None, description="train settings of conditional generators"
    )
    convergence: Convergence | None = Field(None, description="02_train's convergence study")
    table1: Table1 = Field(description="Table 1's bit-widths")
    figure1: Pair = Field(description="Figure 1's (arch, task)")
    figure3: Pair = Field(description="Figure 3's (arch, task)")
    table3: Selection = Field(description="which pairs get conditional generators")
    eval: Eval = Field(description="scoring")
    ablation: Ablation = Field(description="notebooks 04-07")
    controls: Controls = Field(description="03_generate's controls")
    qwt: Qwt | None = Field(
        None, description="QwT compensation in 03_generate (unset: no QwT rows)"
    )
    rpg: Rpg | None = Field(None, description="10_rpg (unset: the notebook has nothing to run)")
    # set by load_profile, not by a profile file
    name: str | None = None
    cache: str | None = None
    overrides: dict | None = None
    _written: dict = PrivateAttr(default_factory=dict)

    @property
    def written(self) -> dict:
        """The profile as its file wrote it (a copy): only the keys it set, its own values, and the
        name, cache and overrides `load_profile` gave it. Cache keys and provenance are made from
        this, never from the defaults filled in."""
        return copy.deepcopy(self._written)

    def set_in(self, *keys: str) -> dict:
        """The keys the file set under `keys` (`set_in("archs", "vit", "train")`), as written; empty
        when it set none there. Settings merged from several blocks are keyed from these."""
        block = self._written
        for k in keys:
            block = block.get(k) or {}
        return copy.deepcopy(block)

    @field_validator("device")
    @classmethod
    def _device(cls, v):
        if v is not None and not (v in ("cpu", "auto") or v.startswith("cuda")):
            raise ValueError(f"unknown device {v!r}: use cpu, cuda, cuda:N or auto")
        return v

    @model_validator(mode="after")
    def _token_size(self):
        if self.tokenizer.token_size is None:
            raise ValueError("tokenizer.token_size is required")
        return self

    @model_validator(mode="after")
    def _rtn_base_adds(self):
        """The one rule spanning two blocks: an RTN base is what the head's skip adds to (checked
        for the profile's blocks, each architecture's own and each convergence variant's)."""

        def value(block, own, key):
            return getattr(own if own and key in own.model_fields_set else block, key)

        variants = self.convergence.variants if self.convergence else {}
        places = [("", None)]
        places += [(f"archs.{n}.", a) for n, a in self.archs.items()]
        places += [(f"convergence.variants.{n}.", v) for n, v in variants.items() if v]
        for where, own in places:
            base = value(self.tokenizer, own and own.tokenizer, "base")
            skip = value(self.generator, own and own.generator, "skip")
            if base == "rtn" and skip != "add":
                raise ValueError(
                    f"{where}tokenizer.base: rtn is what the generator's skip adds to: set "
                    f"{where}generator.skip: add (it is {skip!r})"
                )
        return self


MODELS = [
    Block,
    TrainRun,
    TokenizerBlock,
    DiffusionBlock,
    GeneratorBlock,
    TrainBlock,
    Arch,
    Checkpoints,
    Quant,
    Selection,
    Qat,
    Amortized,
    Overrides,
    Convergence,
    Table1,
    Pair,
    Eval,
    AblationSetup,
    Ablation,
    Controls,
    Qwt,
    BinaryRun,
    RpgBinary,
    Rpg,
    Profile,
]
KNOWN_KEYS = sorted({k for m in MODELS for k in m.model_fields})


def validated(raw: Any, source: str) -> Profile:
    """`raw` checked against `Profile` (its `written` the keys `raw` set); a ValueError listing
    every problem, each with its key's path, otherwise."""
    if not isinstance(raw, dict):
        raise ValueError(
            f"profile {source} must be a YAML mapping of sections (seed, archs, ...), "
            f"got {type(raw).__name__}"
        )
    try:
        profile = Profile.model_validate(raw)
    except ValidationError as e:
        lines = [_problem(err) for err in e.errors()]
        raise ValueError(
            f"profile {source} does not validate ({len(lines)} problem(s)):\n" + "\n".join(lines)
        ) from None
    profile._written = _as_written(raw, profile.model_dump(exclude_unset=True))
    return profile


def _as_written(raw, checked):
    """The file's own values, except strings the schema read as numbers (`3e-3`): validation must
    not turn `epochs: 3` into 3.0, which would change every cache key made from the profile."""
    if isinstance(raw, dict) and isinstance(checked, dict):
        return {k: _as_written(v, checked[k]) for k, v in raw.items()}
    if isinstance(raw, list) and isinstance(checked, list):
        return [_as_written(a, b) for a, b in zip(raw, checked)]
    return checked if isinstance(raw, str) and not isinstance(checked, str) else raw


def _problem(err: dict) -> str:
    where = ".".join(str(x) for x in err["loc"]) or "(top level)"
    if err["type"] == "extra_forbidden":
        near = difflib.get_close_matches(str(err["loc"][-1]), KNOWN_KEYS, n=1, cutoff=0.7)
        hint = f"; did you mean `{near[0]}`?" if near else ""
        return f"  {where}: unknown key{hint}"
    if err["type"] == "missing":
        return f"  {where}: missing (required)"
    return f"  {where}: {err['msg']} (got {err.get('input')!r})"


REFERENCE_INTRO = """# Profile reference

A profile (`params/<name>.yaml`: smoke, cpu, paper) sets every parameter of a run; a notebook's
`overrides` merge into it. Generated from `qg.config.schema` by
`python -m qg.config.schema > params/README.md` (a test keeps it equal). Nested blocks are the
tables below their name."""


def reference_page() -> str:
    """`params/README.md`: what a profile is, then `reference_markdown`."""
    return f"{REFERENCE_INTRO}\n\n{reference_markdown()}\n"


def reference_markdown() -> str:
    """The profile reference: one table per section, from the schema itself."""
    out = []
    for model in (
        Profile,
        TrainRun,
        Arch,
        Checkpoints,
        Quant,
        Qat,
        TokenizerBlock,
        GeneratorBlock,
        DiffusionBlock,
        TrainBlock,
        Convergence,
        Table1,
        Eval,
        Ablation,
        Controls,
        Qwt,
        Rpg,
        RpgBinary,
        BinaryRun,
    ):
        # a docstring's first paragraph, its lines joined (a summary may wrap onto a second line)
        summary = " ".join((model.__doc__ or "").strip().split("\n\n")[0].split())
        out += [
            f"**{model.__name__}**: {summary}" if model.__doc__ else f"**{model.__name__}**",
            "",
            "| key | type | default | meaning |",
            "|---|---|---|---|",
        ]
        for key, f in model.model_fields.items():
            if key in ("name", "cache", "overrides"):
                continue
            default = (
                "required" if f.is_required() else ("" if f.default_factory else repr(f.default))
            )
            kind = _type_name(f.annotation) + _constraints(f.metadata)
            out.append(f"| `{key}` | {kind} | {default} | {f.description or ''} |")
        out.append("")
    return "\n".join(out)


def _type_name(t) -> str:
    """A type as a reader writes it: `int >= 1 | None`, `list[int 2..8]`,
    `gaussian / zero / one`."""
    origin, args = get_origin(t), get_args(t)
    if origin is Annotated:
        return _type_name(args[0]) + _constraints(args[1:])
    if origin in (Union, types.UnionType):
        return " \\| ".join(_type_name(a) for a in args)
    if origin is Literal:
        return " / ".join(str(a) for a in args)
    if origin in (list, dict):
        return f"{origin.__name__}[{', '.join(_type_name(a) for a in args)}]"
    return "None" if t is type(None) else getattr(t, "__name__", str(t)).replace("Any", "any")


def _constraints(metadata) -> str:
    flat = [c for m in metadata for c in (m.metadata if isinstance(m, FieldInfo) else [m])]
    ge, gt, le = (
        next((getattr(c, k) for c in flat if isinstance(c, cls)), None)
        for k, cls in (("ge", at.Ge), ("gt", at.Gt), ("le", at.Le))
    )
    if ge is not None and le is not None:
        return f" {ge}..{le}"
    return "".join(f" {op} {v}" for v, op in ((ge, ">="), (gt, ">"), (le, "<=")) if v is not None)


if __name__ == "__main__":  # python -m qg.config.schema > params/README.md
    print(reference_page(), end="")
