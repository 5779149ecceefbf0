import pytest
import torch

from qg.study.agreement import agreement_matrix, closest, summary


def _preds(n_models: int, n_images: int = 200, flips: int = 20, seed: int = 0) -> list:
    """Predicted classes of models that each differ from a shared base on `flips` images of their
    own."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randint(0, 5, (n_images,), generator=g)
    out = []
    for i in range(n_models):
        p = base.clone()
        p[i * flips : (i + 1) * flips] = (p[i * flips : (i + 1) * flips] + 1) % 5
        out.append(p)
    return out


def test_agreement_by_hand():
    a, b = torch.tensor([0, 1, 2, 3]), torch.tensor([0, 1, 0, 0])
    m = agreement_matrix([a, b], [a, b])
    assert torch.allclose(m, torch.tensor([[1.0, 0.5], [0.5, 1.0]]))
    assert closest(torch.tensor([[0.9, 0.9], [0.8, 0.7]])) == 1  # a tie counts, a loss does not


def test_a_generator_that_follows_its_input_is_closest_to_it_and_a_constant_one_is_not():
    """A model per checkpoint that moves with its input finds it on every checkpoint; one model
    returned whatever the input finds one checkpoint at most (its nearest), however good it is."""
    fp = _preds(5)
    target = [p.clone() for p in fp]
    for t in target:
        t[-10:] = 4  # quantization's own errors, the same for every checkpoint
    follows = summary(target, target, fp)
    assert follows["closest_input"] == follows["target_closest_input"] == 5
    assert follows["closest_target"] == 5 and follows["agree_own"] == 100.0
    constant = summary([target[0]] * 5, target, fp)
    assert constant["closest_input"] == 1 and constant["closest_target"] == 1
    # no more like its own checkpoint's target than like the others'
    assert constant["agree_own"] == pytest.approx(constant["agree_others"])
    assert 0 < constant["targets_agree"] < 100
