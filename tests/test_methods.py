"""The methods registry: every method has a maker, labels and order as the tables print them."""

import pytest

from qg import methods
from qg.quant.baselines import QUANTIZERS


def test_every_quantizer_method_has_its_maker_and_every_maker_a_method():
    assert set(methods.names("quantizer")) == set(QUANTIZERS)


def test_a_generator_is_one_registry_entry_carrying_its_overrides(monkeypatch):
    """Ours has none; another generator is an entry whose overrides and variant its rows carry,
    and takes its place in the tables' order and labels."""
    assert methods.get("gen").overrides == {} and methods.get("gen").variant == ""
    paper = methods.Method(
        "gen-paper",
        "Gen (paper head)",
        "generator",
        True,
        overrides={"generator": {"skip": "none"}},
        variant="paper head",
    )
    monkeypatch.setitem(methods.REGISTRY, paper.name, paper)
    assert methods.get("gen-paper").overrides == {"generator": {"skip": "none"}}
    assert methods.order()[-2:] == ["gen-ptq", "gen-paper-ptq"]
    assert methods.label("gen-paper-ptq") == "Gen (paper head) − PTQ"


def test_qwt_on_top_of_a_method_needs_data_and_the_fp_weights():
    m = methods.get("hqq+qwt")
    assert (m.label, m.kind, m.data_free, m.scheme) == (
        "HQQ + QwT",
        "quantizer",
        False,
        "asymmetric",
    )
    assert "calibration images" in m.needs
    with pytest.raises(ValueError, match=r"fp\+qwt. is not a method"):
        methods.get("fp+qwt")
    with pytest.raises(ValueError, match="unknown method 'gptq'.*'hqq'"):
        methods.get("gptq")


def test_labels_of_methods_and_paired_differences():
    expected = {
        "fp": "FP32",
        "rtn-asym": "RTN asym",
        "gen-ptq": "Gen − PTQ",
        "gen+qwt-ptq+qwt": "Gen + QwT − PTQ + QwT",
        "other": "other",
    }
    assert {m: methods.label(m) for m in expected} == expected


def test_the_tables_order():
    """Rows of every table run in this order (the committed results' order)."""
    assert methods.order() == [
        "fp",
        "ptq",
        "ptq+qwt",
        "rtn-asym",
        "mse-clip",
        "hqq",
        "hqq+qwt",
        "noise",
        "soup",
        "qat",
        "fp-steps",
        "gen",
        "gen+qwt",
        "gen-ptq",
    ]
    assert methods.shown_with_qwt() == ("ptq", "ptq+qwt", "hqq", "hqq+qwt", "gen", "gen+qwt")


def test_a_method_of_an_unknown_kind_is_refused():
    with pytest.raises(ValueError, match="kind must be one of"):
        methods.Method("x", "X", "magic", True)
