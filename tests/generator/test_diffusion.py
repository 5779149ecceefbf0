import numpy as np
import pytest
import torch

from qg.generator.diffusion import ConvDenoiser, DiffusionHead, timestep_embedding


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def small_head(token_size=24, cond_dim=12, **kwargs) -> DiffusionHead:
    torch.manual_seed(0)
    return DiffusionHead(token_size, cond_dim, channels=(1, 8, 16, 8, 1), **kwargs)


@pytest.mark.parametrize("token_size", [8, 24, 33])
def test_shapes_for_any_token_size(token_size):
    torch.manual_seed(0)
    net = ConvDenoiser(token_size, cond_dim=10)
    x, cond = torch.randn(5, token_size), torch.randn(5, 10)
    assert net(x, torch.randint(1000, (5,)), cond).shape == (5, token_size)

    head = small_head(token_size, 10, n_steps=50)
    x0, cond = torch.randn(2, 3, token_size), torch.randn(2, 3, 10)
    loss = head.loss(x0, cond, n_tokens=4, rng=gen(0))
    assert loss.ndim == 0 and torch.isfinite(loss)
    loss.backward()
    assert head.sample(cond, rng=gen(0)).shape == (2, 3, token_size)
    assert head.sample(cond, steps=7, method="ddim", rng=gen(0)).shape == (2, 3, token_size)


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="palindrome"):
        ConvDenoiser(16, 4, channels=(1, 32, 64, 1))
    with pytest.raises(ValueError, match="odd"):
        ConvDenoiser(16, 4, kernel_size=6)
    head = small_head(n_steps=20)
    with pytest.raises(ValueError, match="DDPM runs all"):
        head.sample(torch.randn(1, 2, 12), steps=5, method="ddpm")
    with pytest.raises(ValueError, match="sampler"):
        head.sample(torch.randn(1, 2, 12), method="euler")


def test_schedule_matches_independent_computation():
    head = DiffusionHead(16, 4)
    betas = np.linspace(1e-4, 0.02, 1000)
    np.testing.assert_allclose(head.betas.numpy(), betas, rtol=1e-6)
    np.testing.assert_allclose(head.alphas_cumprod.numpy(), np.cumprod(1 - betas), rtol=1e-5)
    assert head.alphas_cumprod[-1] < 1e-4  # x_T is (almost) pure noise


def test_q_sample_at_t0_is_x0():
    head = DiffusionHead(16, 4)
    g = gen(0)
    x0, noise = torch.randn(6, 16, generator=g), torch.randn(6, 16, generator=g)
    xt = head.q_sample(x0, torch.zeros(6, dtype=torch.long), noise)
    # sqrt(1 - abar_0) = 0.01
    assert (xt - x0).abs().max() <= 0.0101 * (x0.abs() + noise.abs()).max()
    xT = head.q_sample(x0, torch.full((6,), 999), noise)
    assert (xT - noise).abs().max() <= 0.01 * (x0.abs() + noise.abs()).max()  # sqrt(abar_T) < 0.01


def test_timestep_embedding_distinguishes_steps():
    emb = timestep_embedding(torch.arange(1000), 64)
    assert emb.shape == (1000, 64)
    assert torch.cdist(emb, emb).add(torch.eye(1000) * 10).min() > 1e-3


def test_masked_loss_ignores_masked_positions():
    head = small_head()
    x0, cond = torch.randn(2, 5, 24), torch.randn(2, 5, 12)
    mask = torch.ones(2, 5, 24, dtype=torch.bool)
    mask[0, 4, 10:] = False  # a padded tail
    mask[1, 4] = False  # an all-padding token
    changed = x0.clone()
    changed[~mask] = 1000.0
    assert head.loss(x0, cond, mask, rng=gen(3)) == head.loss(changed, cond, mask, rng=gen(3))
    assert head.loss(x0, cond, mask, n_tokens=3, rng=gen(3)) == head.loss(
        changed, cond, mask, n_tokens=3, rng=gen(3)
    )
    assert head.loss(x0, cond, rng=gen(3)) != head.loss(changed, cond, rng=gen(3))


def test_token_subset_only_uses_n_tokens_positions():
    head = small_head(diffusion_batch=3)
    x0, cond = torch.randn(2, 5, 24), torch.randn(2, 5, 12)
    seen = []
    head.net.register_forward_hook(lambda mod, args, out: seen.append(args[0].shape[0]))
    head.loss(x0, cond, rng=gen(0))
    head.loss(x0, cond, n_tokens=7, rng=gen(0))
    head.loss(x0, cond, n_tokens=100, rng=gen(0))
    assert seen == [3, 7, 10]


def test_sampling_is_deterministic_given_a_generator():
    head = small_head(n_steps=100)
    cond = torch.randn(2, 3, 12)
    for kwargs in (dict(), dict(method="ddim", steps=10), dict(method="ddim", steps=10, eta=1.0)):
        a, b = head.sample(cond, rng=gen(7), **kwargs), head.sample(cond, rng=gen(7), **kwargs)
        assert torch.equal(a, b)
        assert not torch.equal(a, head.sample(cond, rng=gen(8), **kwargs))
    assert head.training  # sampling restores the mode it found


def test_state_dict_round_trips_strictly():
    head = small_head(n_steps=100)
    # moves BatchNorm's running stats
    head.loss(torch.randn(1, 4, 24), torch.randn(1, 4, 12)).backward()
    other = small_head(n_steps=100)
    torch.nn.init.normal_(other.net.cond_proj.weight)
    other.load_state_dict(head.state_dict(), strict=True)
    cond = torch.randn(1, 3, 12)
    assert torch.equal(head.sample(cond, rng=gen(0)), other.sample(cond, rng=gen(0)))


def test_tiny_head_overfits_four_tokens():
    """Four fixed targets, each with its own fixed condition: after training, DDIM sampling from
    those conditions must land on the right target (chance: a fresh N(0, I) draw is ~sqrt(2)
    relative error away, and lands nearest its own target one time in four)."""
    g = gen(0)
    x0, cond = torch.randn(1, 4, 16, generator=g), torch.randn(1, 4, 16, generator=g)
    torch.manual_seed(0)
    # RPG's depth at half width, for speed
    head = DiffusionHead(16, 16, channels=(1, 16, 32, 64, 32, 16, 1))
    steps, copies = 800, 16  # each step sees every target 16 times, at 16 random timesteps
    opt = torch.optim.Adam(head.parameters(), lr=3e-3)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    batch = dict(x0=x0.expand(copies, -1, -1), cond=cond.expand(copies, -1, -1))
    losses = []
    for step in range(steps):
        loss = head.loss(**batch, rng=gen(step))
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        losses.append(loss.item())
    assert np.mean(losses[-50:]) < np.mean(losses[:10]) / 10

    draws = 8  # several initial noises per target: a rare draw may drift, the typical one must not
    out = head.sample(cond.expand(draws, -1, -1), method="ddim", steps=50, rng=gen(1))
    rel = (out - x0).norm(dim=-1) / x0.norm(dim=-1)  # (draws, 4)
    assert rel.median(0).values.max() < 0.3, rel
    assert (rel < 0.3).float().mean() >= 0.75, rel
    # which target each sample lands on
    nearest = torch.cdist(out, x0.expand(draws, -1, -1)).argmin(-1)
    assert (nearest == torch.arange(4)).float().mean() >= 0.9, nearest


@pytest.mark.parametrize("prediction", ["eps", "x0"])
def test_predict_returns_a_consistent_x0_and_noise(prediction):
    head = small_head(prediction=prediction)
    x, cond = torch.randn(6, head.token_size), torch.randn(6, 12)
    t = torch.tensor([0, 3, 7, 11, 15, 19])
    x0, eps = head.predict(x, t, cond)
    abar = head.alphas_cumprod[t][:, None]
    assert torch.allclose(abar.sqrt() * x0 + (1 - abar).sqrt() * eps, x, atol=1e-4)


def test_an_unknown_prediction_is_refused():
    with pytest.raises(ValueError, match="prediction must be one of"):
        small_head(prediction="v")
