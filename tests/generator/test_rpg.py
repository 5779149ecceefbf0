"""RPG mode: whole models sampled from noise (qg.generator.rpg), and the memorisation metrics on
full-precision models."""

import pytest
import torch
from fakes import TINY_VIT, checkpoints

from qg.generator.model import GeneratorConfig
from qg.generator.rpg import RPG, ParamTokenizer, training_data
from qg.generator.train import TrainConfig
from qg.quant.quantizer import QuantSpec, quantize_state_dict
from qg.study.fidelity import distances, error_iou, nearest_distances
from qg.study.rpg_binary import embeddings, hamming, task_split
from qg.targets.models import ModelSpec, build_model

TINY_RPG = {
    "d_model": 32,
    "n_layers": 1,
    "d_state": 8,
    "headdim": 16,
    "chunk_size": 16,
    "diffusion": {
        "channels": [1, 8, 1],
        "n_steps": 20,
        "sampler": "ddim",
        "sample_steps": 4,
        "diffusion_batch": 64,
    },
}


def test_param_tokenizer_round_trips_every_tensor(model_spec):
    sds = checkpoints(model_spec, 3)
    tok = ParamTokenizer.fit(sds, token_size=32)
    n_values = sum(v.numel() for v in sds[0].values())
    # every value has one place; the rest is a tensor's last-token padding
    assert tok.mask().sum() == n_values
    assert tok.positions().shape == (tok.shape[0], 2)
    tokens = tok.encode(sds[1])
    assert tokens.shape == tok.shape and torch.all(tokens[~tok.mask()] == 0)
    back = tok.decode(tokens)
    assert set(back) == set(sds[1])
    for name, v in sds[1].items():
        torch.testing.assert_close(back[name], v, atol=1e-5, rtol=1e-5)


def test_param_tokenizer_refuses_another_architecture_and_nan(model_spec, tmp_path):
    sds = checkpoints(model_spec, 2)
    tok = ParamTokenizer.fit(sds, token_size=32)
    first = next(iter(sds[0]))
    with pytest.raises(ValueError, match="does not match the RPG tokenizer"):
        tok.encode({**sds[0], "extra.weight": torch.zeros(2, 2)})
    with pytest.raises(ValueError, match="does not match the RPG tokenizer"):
        tok.encode({**sds[0], first: torch.zeros(3)})
    with pytest.raises(ValueError, match="NaN"):
        tok.encode({**sds[0], first: torch.full_like(sds[0][first], float("nan"))})
    tok.save(tmp_path)
    assert torch.equal(ParamTokenizer.load(tmp_path).encode(sds[0]), tok.encode(sds[0]))


# The overfit tests' model and RPG: a ViT of 2,122 values (77 tokens of 32), small enough for RPG
# to learn it in a few hundred steps, and a head that predicts the clean token (x0).
MICRO_VIT = ModelSpec(
    "VisionTransformer",
    dict(img_size=28, patch_size=14, in_chans=1, num_classes=2, embed_dim=8, depth=1, num_heads=1),
)
REPLAY_RPG = {
    "n_layers": 1,
    "d_state": 16,
    "headdim": 16,
    "chunk_size": 16,
    "diffusion": {
        "channels": [1, 16, 32, 16, 1],
        "n_steps": 100,
        "sampler": "ddim",
        "sample_steps": 10,
        "diffusion_batch": 256,
        "prediction": "x0",
    },
}


def _overfit(sds, tmp_path):
    """RPG trained on `sds` (800 steps), and the distances of three samples to each of them."""
    train = TrainConfig(steps=800, batch_size=2, lr=3e-3, warmup=10, ckpt_every=800)
    rpg = RPG.fit(sds, tmp_path / "rpg", REPLAY_RPG, train, token_size=32)
    return distances(rpg.sample(3, seed=0), sds)


def test_rpg_trained_on_one_checkpoint_replays_it(tmp_path):
    """The overfit test whose answer is known: with one training checkpoint the only model to make
    is that one (measured: 0.016 of its norm away; the eps-predicting head at RPG's settings: at
    chance, 0.8 of it)."""
    d = _overfit(checkpoints(MICRO_VIT, 1), tmp_path)
    assert d.max() < 0.05


def test_rpg_trained_on_two_checkpoints_samples_within_their_spacing(tmp_path):
    """Two checkpoints: every sample nearer one of them than they are to each other (without RPG's
    per-checkpoint state the body cannot say which one to make, so samples sit between them)."""
    sds = checkpoints(MICRO_VIT, 2)
    spacing = float(distances(sds[:1], sds[1:]))
    assert (_overfit(sds, tmp_path).min(1).values < spacing).all()


def test_rpg_needs_the_diffusion_head():
    with pytest.raises(ValueError, match="diffusion"):
        GeneratorConfig(token_size=8, n_tokens=4, fp_input=False)


def test_training_data_has_no_input():
    sds = checkpoints(TINY_VIT, 3)
    tok = ParamTokenizer.fit(sds, token_size=32)
    data = training_data(tok, sds, [None] * 3)
    # one blank row: RPG reads no weights
    assert data.x.shape == (1, *tok.shape) and torch.all(data.x == 0)
    assert torch.equal(data.y[2], tok.encode(sds[2]))
    with pytest.raises(ValueError, match="every checkpoint"):
        training_data(tok, sds, ["a", None, "b"])


def test_rpg_samples_whole_models_that_load_strictly_into_timm(tmp_path):
    sds = checkpoints(TINY_VIT, 4)
    rpg = RPG.fit(
        sds, tmp_path / "rpg", TINY_RPG, TrainConfig(steps=3, batch_size=2, lr=1e-3), token_size=32
    )
    samples = rpg.sample(2, seed=0)
    for sd in samples:
        model = build_model(TINY_VIT)
        model.load_state_dict(sd, strict=True)
        assert all(torch.isfinite(v).all() for v in sd.values())
    # each sample its own noise
    assert not torch.equal(samples[0]["head.weight"], samples[1]["head.weight"])
    again = RPG.load(tmp_path / "rpg").sample(2, seed=0)  # from the saved directory, same samples
    for a, b in zip(samples, again):
        assert all(torch.equal(a[k], b[k]) for k in a)
    assert RPG.complete(tmp_path / "rpg")
    with pytest.raises(ValueError, match="unconditional"):
        rpg.sample(1, condition="0101")


def test_rpg_with_bit_conditions_reaches_an_unseen_condition(tmp_path):
    sds = checkpoints(TINY_VIT, 4)
    seen = ["0011", "0101", "0110", "1001"]
    cfg = {**TINY_RPG, "cond_bits": 4}
    rpg = RPG.fit(
        sds,
        tmp_path / "rpg",
        cfg,
        TrainConfig(steps=2, batch_size=2),
        conditions=seen,
        token_size=32,
    )
    assert rpg.model.cfg.conditions == sorted(seen)
    assert torch.equal(rpg.model.condition_matrix()[1], torch.tensor([0.0, 1.0, 0.0, 1.0]))
    unseen = rpg.sample(1, condition="1111")[0]  # a task embedding never trained on
    build_model(TINY_VIT).load_state_dict(unseen, strict=True)
    with pytest.raises(ValueError, match="0/1 characters"):
        rpg.sample(1, condition="012")
    with pytest.raises(ValueError, match="0/1 characters"):
        GeneratorConfig(token_size=8, n_tokens=4, cond_bits=4, conditions=["01"])


def test_memorisation_metrics_on_full_precision_models():
    train = checkpoints(TINY_VIT, 4, seed=0)
    new = checkpoints(TINY_VIT, 1, seed=5)[0]
    d = nearest_distances([train[2], new], None, train)
    # a copy of a training checkpoint: distance 0
    assert d.to_nearest_train[0] == 0 and d.nearest_train[0] == 2
    assert d.to_nearest_train[1] > 0 and d.to_own.isna().all()  # RPG's samples have no own target
    norms = (sum(float(v.double().pow(2).sum()) for v in t.values()) ** 0.5 for t in train)
    norm = sum(norms) / len(train)
    nearest = min(
        sum(float((new[k].double() - t[k].double()).pow(2).sum()) for k in new) ** 0.5
        for t in train
    )
    # every tensor counts, not only quantized layers
    assert d.to_nearest_train[1] == pytest.approx(nearest / norm)
    preds, labels = torch.tensor([0, 1, 2, 3]), torch.tensor([0, 1, 1, 1])
    assert error_iou(preds, preds.clone(), labels) == 1.0  # a copy makes the same mistakes
    quantized = quantize_state_dict(train[0], QuantSpec(8, "group"))
    with pytest.raises(ValueError, match="different tensors"):
        nearest_distances([quantized], None, train)


def test_frozen_tensors_are_kept_not_generated(tmp_path):
    """Head-only classifiers share every tensor but the head: RPG generates the head and copies the
    rest."""
    base = checkpoints(TINY_VIT, 1)[0]
    gen = torch.Generator().manual_seed(3)
    heads = [
        {
            **base,
            "head.weight": torch.randn(base["head.weight"].shape, generator=gen),
            "head.bias": torch.randn(base["head.bias"].shape, generator=gen),
        }
        for _ in range(3)
    ]
    tok = ParamTokenizer.fit(heads, token_size=16)
    assert [n for n, _ in tok.shapes] == ["head.weight", "head.bias"]
    assert tok.shape[0] == -(-base["head.weight"].numel() // 16) + 1
    rpg = RPG.fit(
        heads, tmp_path / "rpg", TINY_RPG, TrainConfig(steps=2, batch_size=2), token_size=16
    )
    sample = RPG.load(tmp_path / "rpg").sample_one(0)
    build_model(TINY_VIT).load_state_dict(sample, strict=True)
    assert all(torch.equal(sample[k], v) for k, v in base.items() if not k.startswith("head."))
    assert not torch.equal(sample["head.weight"], heads[0]["head.weight"])
    assert rpg.tokenizer.constants.keys() == ParamTokenizer.load(tmp_path / "rpg").constants.keys()


def test_binary_tasks_split_into_disjoint_seen_and_unseen_sets():
    every = embeddings(10)
    assert (
        len(every) == 1022
        and len(set(every)) == 1022
        and "0" * 10 not in every
        and "1" * 10 not in every
    )
    seen, unseen = task_split(10, 1012, 10, seed=0)
    # no unseen task leaks into training
    assert not set(seen) & set(unseen) and len(set(seen) | set(unseen)) == 1022
    assert task_split(10, 50, 10, seed=0) == task_split(10, 50, 10, seed=0)
    # the unseen set does not depend on how many are seen
    assert task_split(10, 50, 10, seed=0)[1] == unseen
    with pytest.raises(ValueError, match="only 1022"):
        task_split(10, 1020, 10, seed=0)
    assert hamming("0110", "0011") == 2
