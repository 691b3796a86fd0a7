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


def test_cpu_vendor_reads_cpuinfo_and_an_unreadable_file_means_empty(tmp_path):
    from kdcore.modeling.models import cpu_vendor

    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nvendor_id\t: AuthenticAMD\ncpu family\t: 25\n")
    assert cpu_vendor(str(info)) == "AuthenticAMD"
    assert cpu_vendor(str(tmp_path / "absent")) == ""


def test_cpu_decode_plan_is_fixed_per_vendor_and_the_engine_follows_it():
    from transformers import LlamaConfig

    from kdcore.engines.hf_rollout import CpuDecodePlan, HFRolloutEngine, cpu_decode_plan

    intel, amd, unnamed = cpu_decode_plan("GenuineIntel"), cpu_decode_plan("AuthenticAMD"), cpu_decode_plan("")
    assert (intel.matvec, intel.threads) == (False, None)
    assert (amd.matvec, amd.threads) == (True, 1) and unnamed == CpuDecodePlan(matvec=True, threads=1)
    config = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1)

    def linears(engine):
        return {type(m).__name__ for m in engine.model.modules() if isinstance(m, torch.nn.Linear)}

    as_intel = HFRolloutEngine(config, plan=intel)
    assert linears(as_intel) == {"Linear"} and as_intel.threads is None
    as_amd = HFRolloutEngine(config, plan=amd)
    assert linears(as_amd) == {"DecodeLinear"} and as_amd.threads == 1
    assert HFRolloutEngine(config, plan=amd, threads=2).threads == 2  # an explicit count wins
    # both layouts sample the same tokens from the same weights and seed (tiny model: no ties)
    as_intel.update_weights({k: v.clone() for k, v in as_amd._targets.items()})
    prompts = [[1, 2, 3], [4, 5]]
    kw = dict(max_new_tokens=6, temperature=1.0, seed=3)
    assert as_intel.generate(prompts, **kw) == as_amd.generate(prompts, **kw)
    assert HFRolloutEngine(config).plan == cpu_decode_plan()  # this machine's own
