"""LowRank config: defaults, validation (RecipeError names the field), YAML round trip, rank rules."""
import pytest
import torch

import fxpress
from fxpress.errors import RecipeError
from fxpress.passes.factorize.rank import budget_rank, energy_rank, vbmf_rank


def test_defaults_and_registration():
    cfg = fxpress.LowRank(method="svd", energy=0.9)
    assert cfg.energy == 0.9 and cfg.rank is None and cfg.budget is None
    assert fxpress.LowRank().energy == 0.9  # no rule given: 90% of the spectral energy
    assert [p.name for p in fxpress.LowRank(method="tt").passes()] == ["lowrank_tt"]
    assert "lowrank" in fxpress.recipe.known_entries()


@pytest.mark.parametrize("kwargs,field", [
    (dict(method="qr"), "method"),
    (dict(rank=0), "rank"),
    (dict(rank=-3), "rank"),
    (dict(rank=2.5), "rank"),
    (dict(rank=(4, 4)), "rank"),                      # svd takes one rank
    (dict(method="tucker", rank=(4, 4, 4)), "rank"),  # Tucker-2 takes (r_out, r_in)
    (dict(method="cp", rank=(4, 4)), "rank"),
    (dict(method="tt", tt_order=3, rank=(2, 2, 2)), "rank"),
    (dict(energy=1.5), "energy"),
    (dict(energy=0.0), "energy"),
    (dict(budget=0.0), "budget"),
    (dict(rank=4, energy=0.9), "energy"),             # two rank rules
    (dict(method="tucker", whiten=True), "whiten"),
    (dict(budget=0.5, budget_scope="model", budget_on="params"), "budget_on"),
    (dict(method="tt", tt_shape=((4, 4), (16,))), "tt_shape"),
    (dict(tt_order=1), "tt_order"),
])
def test_impossible_configs_raise_recipe_error_naming_the_field(kwargs, field):
    with pytest.raises(RecipeError) as e:
        fxpress.LowRank(**kwargs)
    assert e.value.field == field


def test_yaml_round_trip(tmp_path):
    r = fxpress.Recipe([fxpress.LowRank(method="tucker", rank=(8, 4), include=("layer1.*",)),
                        fxpress.LowRank(method="tt", tt_shape=((4, 4), (8, 2)), rank=3)])
    path = r.save(tmp_path / "r.yaml")
    back = fxpress.Recipe.load(path)
    assert back == r and back.entries[0].rank == (8, 4) and back.entries[1].tt_shape == ((4, 4), (8, 2))


def test_rank_rules():
    s = torch.tensor([4.0, 2.0, 1.0, 1.0])  # squared: 16, 4, 1, 1 of 22
    assert [energy_rank(s, e) for e in (0.7, 0.9, 0.95, 1.0)] == [1, 2, 3, 4]
    assert budget_rank(lambda r: 10 * r, 0.5, 100, 20) == 5 and budget_rank(lambda r: 10 * r, 0.05, 100, 20) == 0
    g = torch.Generator().manual_seed(0)
    y = torch.randn(80, 4, generator=g) @ torch.randn(4, 120, generator=g) + 0.05 * torch.randn(80, 120, generator=g)
    assert vbmf_rank(y) == 4 and vbmf_rank(y.T) == 4
    assert vbmf_rank(0.05 * torch.randn(50, 60, generator=g)) <= 1  # pure noise: nothing to keep
