"""The CPU decoding shortcuts of the hf rollout engine give the same results as the plain ops."""

import torch

from kdcore.engines.hf_rollout import DecodeLinear, _inverse_cdf_sampling, decode_linears, sample_one


def test_decode_linear_matches_linear_for_few_and_many_rows():
    g = torch.Generator().manual_seed(0)
    for bias in (False, True):
        lin = torch.nn.Linear(24, 40, bias=bias)
        ref = torch.nn.Linear(24, 40, bias=bias)
        ref.load_state_dict(lin.state_dict())
        assert decode_linears(torch.nn.Sequential(lin)) == 1 and type(lin) is DecodeLinear
        for shape in ((1, 24), (3, 1, 24), (2, 7, 24), (DecodeLinear.max_rows + 5, 24)):
            x = torch.randn(*shape, generator=g)
            with torch.no_grad():
                torch.testing.assert_close(lin(x), ref(x), rtol=1e-5, atol=1e-6)
                assert lin(x).is_contiguous() and lin(x).shape == (*shape[:-1], 40)
    # with gradients on it is nn.Linear itself, so training through a converted module is unchanged
    x = torch.randn(4, 24, requires_grad=True)
    lin(x).sum().backward()
    assert x.grad is not None and lin.weight.grad is not None
    assert list(dict(torch.nn.Sequential(lin).named_parameters())) == ["0.weight", "0.bias"]


def test_sample_one_draws_from_the_distribution():
    probs = torch.tensor([[0.5, 0.0, 0.3, 0.2], [0.0, 0.0, 0.0, 2.0], [1.0, 1.0, 1.0, 1.0]])
    g = torch.Generator().manual_seed(1)
    draws = torch.cat([sample_one(probs, g) for _ in range(20000)], dim=1)  # [3, 20000]
    assert draws.dtype == torch.int64
    freq = torch.stack([(draws[0] == k).float().mean() for k in range(4)])
    # 20000 draws: 4 standard errors of a 0.5 share are 0.014
    torch.testing.assert_close(freq, torch.tensor([0.5, 0.0, 0.3, 0.2]), atol=0.015, rtol=0)
    assert (draws[1] == 3).all()  # unnormalised rows, zero-probability entries never drawn
    assert (draws[0] != 1).all()
    assert set(draws[2].tolist()) == {0, 1, 2, 3}


def test_inverse_cdf_sampling_is_scoped_and_passes_other_calls_through():
    original = torch.multinomial
    probs = torch.tensor([[0.0, 1.0, 0.0]])
    with _inverse_cdf_sampling(torch.device("cpu")):
        assert torch.multinomial is not original
        assert torch.multinomial(probs, 1).tolist() == [[1]]
        assert torch.multinomial(torch.ones(1, 5), 3).shape == (1, 3)  # not one draw per row: passed through
    assert torch.multinomial is original
    try:
        with _inverse_cdf_sampling(torch.device("cpu")):
            raise KeyError("boom")
    except KeyError:
        pass
    assert torch.multinomial is original
    with _inverse_cdf_sampling(torch.device("meta")):  # not CPU: untouched
        assert torch.multinomial is original
