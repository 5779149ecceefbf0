import pandas as pd
import torch

from qg.quant.quantizer import QuantSpec, quantize
from qg.study.attribution import FLOATS, _differs, _swaps, largest_loss, swap_summary
from qg.study.settings import Setting


def test_each_swap_takes_one_layer_or_the_floats_from_the_target():
    spec = QuantSpec(4, "group", 4, "asymmetric")
    w = torch.randn(3, 8)
    gen = {"a.weight": quantize(w, spec), "b.weight": quantize(-w, spec), "a.bias": torch.zeros(3)}
    target = {
        "a.weight": quantize(w + 1, spec),
        "b.weight": quantize(w, spec),
        "a.bias": torch.ones(3),
    }
    swaps = _swaps(gen, target)
    assert set(swaps) == {"a.weight", "b.weight", FLOATS}
    assert swaps["a.weight"]["a.weight"] is target["a.weight"]
    assert swaps["a.weight"]["b.weight"] is gen["b.weight"]
    assert swaps["a.weight"]["a.bias"] is gen["a.bias"]
    assert (
        swaps[FLOATS]["a.bias"] is target["a.bias"] and swaps[FLOATS]["a.weight"] is gen["a.weight"]
    )
    assert _differs(gen["a.weight"], gen["a.weight"]) == {"codes_off": 0.0, "zero_off": 0.0}
    assert _differs(gen["a.bias"], target["a.bias"]) == {}


def test_the_summary_ranks_the_layers_by_what_their_swap_gives_back():
    rows = [
        {"split": "heldout_run", "layer": layer, "checkpoint": c, "gen": 70.0, "target": 72.0,
         "gain": gain, "codes_off": 5.0, "zero_off": 0.0}
        for c in ("c0", "c1")
        for layer, gain in (("a.weight", 0.5), ("patch.weight", 1.8), (FLOATS, 0.1))
    ]  # fmt: skip
    out = swap_summary(pd.DataFrame(rows)).loc["heldout_run"]
    assert list(out.index) == ["patch.weight", "a.weight", FLOATS]
    assert out.gen_loss.tolist() == [2.0, 2.0, 2.0]


def test_the_largest_loss_is_the_setting_furthest_below_its_target():
    """Among settings of several pairs, and between the two targets of one pair (which share a
    setting name): the generator furthest below its own target."""
    a = Setting("vit", "head", [QuantSpec(4, "group")], source="qat", label="direct")
    b = Setting("vit", "full", [QuantSpec(4, "group")], source="qat", label="direct")
    c = Setting("vit", "head", [QuantSpec(4, "group")], source="qat", label="residual")
    runs = pd.DataFrame(
        [{"setting": s.name, "variant": s.label, "split": "heldout_run", "method": m,
          "accuracy": acc}
         for s, gen in ((a, 71.0), (b, 71.5), (c, 60.0))
         for m, acc in (("gen", gen), ("qat", 72.0))]
    )  # fmt: skip
    assert largest_loss(runs, [a, b, c], "heldout_run") is c
    assert largest_loss(runs[runs.variant == "direct"], [b, a], "heldout_run") is a
