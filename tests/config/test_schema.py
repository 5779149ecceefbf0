"""The profile schema: the committed profiles pass unchanged, bad ones are refused before anything
runs."""

import dataclasses
import inspect

import pytest
import yaml

from qg.config import schema
from qg.config.profiles import load_profile
from qg.core.io import ROOT, params_key
from qg.generator.diffusion import DiffusionHead
from qg.generator.model import GeneratorConfig
from qg.generator.tokenizer import Tokenizer
from qg.generator.train import TrainConfig
from qg.study.collect import QATSpec
from qg.study.training import TrainSpec


def _fields(cls) -> set[str]:
    return {f.name for f in dataclasses.fields(cls)}


@pytest.mark.parametrize("name", ["smoke", "cpu", "paper"])
def test_committed_profiles_validate_unchanged(name):
    raw = yaml.safe_load((ROOT / "params" / f"{name}.yaml").read_text())
    checked = schema.validated(raw, name).written
    # nothing added, no 3 -> 3.0: the cache keys stay what the file says
    assert params_key(checked) == params_key(raw)
    assert params_key(checked["pretrain"] or {}) == params_key(raw["pretrain"] or {})


def test_blocks_mirror_the_code_they_configure():
    assert set(schema.TrainBlock.model_fields) == _fields(TrainConfig) - {"seed"}
    assert set(schema.GeneratorBlock.model_fields) == _fields(GeneratorConfig) - {
        "token_size",
        "n_tokens",
        "conditions",
        "target",
        "fp_input",
        "cond_bits",
    }
    fit = set(inspect.signature(Tokenizer.fit).parameters) - {
        "cls",
        "fp_checkpoints",
        "quantized",
        "seed",
    }
    assert set(schema.TokenizerBlock.model_fields) == fit
    assert set(schema.TrainRun.model_fields) == _fields(TrainSpec)
    assert set(schema.Qat.model_fields) == _fields(QATSpec) | {
        "bits",
        "granularity",
        "scheme",
        "archs",
        "tasks",
    }
    head = set(inspect.signature(DiffusionHead.__init__).parameters) - {
        "self",
        "token_size",
        "cond_dim",
    }
    assert set(schema.DiffusionBlock.model_fields) == head


def _write(tmp_path, text: str):
    path = tmp_path / "mine.yaml"
    path.write_text(text)
    return str(path)


def _smoke_with(tmp_path, edit):
    raw = yaml.safe_load((ROOT / "params" / "smoke.yaml").read_text())
    edit(raw)
    return _write(tmp_path, yaml.safe_dump(raw))


@pytest.mark.parametrize(
    "edit, message",
    [
        (
            lambda p: p["train"].update(stpes=5),
            r"train\.stpes: unknown key; did you mean `steps`\?",
        ),
        (lambda p: p.update(trian=p.pop("train")), r"trian: unknown key; did you mean `train`\?"),
        (lambda p: p["train"].update(steps=-5), r"train\.steps: .*greater than or equal to 1"),
        (lambda p: p["train"].update(steps=0), r"train\.steps"),
        (lambda p: p["checkpoints"].update(n=-3), r"checkpoints\.n"),
        (lambda p: p["pretrain"].update(epochs=-1), r"pretrain\.epochs: .*greater than 0"),
        (lambda p: p["quant"].update(group_size=0), r"quant\.group_size"),
        (lambda p: p["table1"].update(bits=[8, 9]), r"table1\.bits\.1: .*less than or equal to 8"),
        (lambda p: p["train"].update(steps="forty"), r"train\.steps: .*valid integer"),
        # a float count would reach the code as written (Profile.set_in) and crash there
        (lambda p: p["train"].update(steps=40.0), r"train\.steps: .*write 40 without a decimal"),
        (lambda p: p["eval"].update(test_subset=500.0), r"eval\.test_subset: .*write 500"),
        (lambda p: p["generator"].update(backbone="gru"), r"generator\.backbone"),
        (lambda p: p["train"].update(strategy="zero"), r"train\.strategy: .*'ddp' or 'fsdp'"),
        (lambda p: p.pop("eval"), r"eval: missing"),
        # the rule spanning two blocks, for the profile's blocks and an architecture's own
        (
            lambda p: p["tokenizer"].update(base="rtn"),
            r"tokenizer\.base: rtn .* set generator\.skip: add \(it is 'gain'\)",
        ),
        (
            lambda p: p["archs"]["vit"].update(tokenizer={"base": "rtn"}),
            r"set archs\.vit\.generator\.skip: add",
        ),
    ],
)
def test_bad_profiles_are_refused_with_the_key(tmp_path, edit, message):
    with pytest.raises(ValueError, match=message):
        load_profile(_smoke_with(tmp_path, edit))


def test_yaml_ambiguities_are_coerced(tmp_path):
    # YAML 1.1 reads 3e-3 as a string; a quoted count is a count
    path = _write(
        tmp_path,
        (ROOT / "params" / "smoke.yaml")
        .read_text()
        .replace("lr: 0.003", "lr: 3e-3")
        .replace("steps: 40, batch_size: 4", 'steps: "40", batch_size: 4'),
    )
    P = load_profile(path)
    assert P.train.lr == 0.003 and P.train.steps == 40


@pytest.mark.parametrize(
    "text, message",
    [
        ("", "YAML mapping"),
        ("- a\n- b\n", "YAML mapping.*got list"),
        ("train: {steps: [\n", "not valid YAML"),
    ],
)
def test_empty_list_or_broken_yaml(tmp_path, text, message):
    with pytest.raises(ValueError, match=message):
        load_profile(_write(tmp_path, text))


def test_the_code_reads_the_schema_and_keys_read_the_file():
    """Every default filled in for the code; `written` and `set_in` hold only what the file set,
    with its own values (what cache keys are made from)."""
    P = load_profile("smoke")
    assert P.eval.hold_mb == schema.Eval.model_fields["hold_mb"].default
    assert "hold_mb" not in P.written["eval"] and P.set_in("eval") == P.written["eval"]
    assert P.set_in("conditional_train") == {} or "conditional_train" in P.written
    assert P.set_in("archs", "vit", "no such block") == {}
    P.set_in("train")["steps"] = -1  # a copy: the profile is unchanged
    assert P.written["train"]["steps"] == P.train.steps > 0


def test_overrides_are_validated_by_the_same_schema():
    with pytest.raises(ValueError, match=r"train\.stpes: unknown key; did you mean `steps`\?"):
        load_profile("smoke", {"train": {"stpes": 5}})
    with pytest.raises(ValueError, match="did you mean `train`"):
        load_profile("smoke", {"trian": {"steps": 5}})
    assert load_profile("smoke", {"train": {"lr": "3e-3"}}).train.lr == 0.003


def test_the_profile_reference_is_the_schema():
    assert (ROOT / "params" / "README.md").read_text() == schema.reference_page(), (
        "params/README.md is stale: python -m qg.config.schema > params/README.md"
    )


def test_qat_targets_can_have_their_own_grid_and_every_qat_spec_follows_it(tmp_path):
    """`qat.scheme` moves QAT's targets, Table 2's generators and the amortized QAT ones onto
    QAT's grid; the PTQ-target generators keep the quant block's; unset, nothing moves."""
    from qg.study.collect import _qat_specs
    from qg.study.settings import amortized_methods, amortized_settings, main_settings

    plain = load_profile("smoke")
    assert all(s == plain.quant.spec(s.bits, s.granularity) for s in _qat_specs(plain))
    every = ("fp", "ptq", "hqq", "qat", "fp-steps", "gen")
    assert {amortized_methods(plain, s) for s in amortized_settings(plain)} == {every}

    def asymmetric(raw):
        raw["qat"]["scheme"] = "asymmetric"

    p = load_profile(_smoke_with(tmp_path, asymmetric))
    assert p.quant.scheme == "symmetric"
    assert {s.scheme for s in _qat_specs(p)} == {"asymmetric"}
    assert {s.specs[0].scheme for s in main_settings(p)["table2"]} == {"asymmetric"}
    by_source = {
        source: {s.specs[0].scheme for s in amortized_settings(p) if s.source == source}
        for source in ("ptq", "qat")
    }
    assert by_source == {"ptq": {"symmetric"}, "qat": {"asymmetric"}}
    # each baseline scored on its own grid: no QAT on PTQ's, and HQQ once, from the PTQ settings
    scored = {s.source: amortized_methods(p, s) for s in amortized_settings(p)}
    assert scored == {
        "ptq": ("fp", "ptq", "hqq", "gen"),
        "qat": ("fp", "ptq", "qat", "fp-steps", "gen"),
    }
    assert p.qat.grid() == "group-wise, asymmetric grid" and plain.qat.grid() == "group-wise"


def test_qat_steps_can_differ_by_task_and_must_name_every_task_qat_covers(tmp_path):
    """`qat.steps: {full: 40, head: 20}`: each task's QAT (and its FP32 control) runs its own
    count; a task with one count is keyed as if the profile gave that one number, so the other
    task's files stay cached. A count for no task, or a task with none, is refused by name."""
    from qg.study.collect import _qat_training

    plain = load_profile("smoke")
    tasks = list(plain.tasks)

    def per_task(steps):
        def edit(raw):
            raw["qat"]["steps"] = steps

        return edit

    p = load_profile(_smoke_with(tmp_path, per_task({tasks[0]: 7, **{t: 3 for t in tasks[1:]}})))
    assert p.qat.steps_for(tasks[0]) == 7 and _qat_training(p, tasks[0]).steps == 7
    for task in tasks[1:]:
        assert _qat_training(p, task) == _qat_training(plain, task)
    assert p.qat.steps_text().startswith(f"7 steps on {tasks[0]}")
    assert plain.qat.steps_text() == f"{plain.qat.steps} steps"
    with pytest.raises(ValueError, match=rf"qat\.steps has no step count for task '{tasks[-1]}'"):
        load_profile(_smoke_with(tmp_path, per_task({t: 3 for t in tasks[:-1]})))
    with pytest.raises(ValueError, match=r"qat\.steps names task 'fulll'"):
        load_profile(_smoke_with(tmp_path, per_task({"fulll": 3, **{t: 3 for t in tasks}})))
    with pytest.raises(ValueError, match=r"qat\.steps"):
        load_profile(_smoke_with(tmp_path, per_task({t: 0 for t in tasks})))
