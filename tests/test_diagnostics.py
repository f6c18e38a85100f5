"""lora_sweep.diagnostics: ΔW, spectra, effective rank, subspace similarity and amplification against known answers."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from lora_sweep.analysis.diagnostics import spectrum_vs_rank
from lora_sweep.updates import _phi
from lora_sweep import adapters, diagnostics
from lora_sweep.settings import MethodSettings
from tests.conftest import tiny_bert


def _orthonormal(d: int, k: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.linalg.qr(torch.randn(d, k, generator=generator, dtype=torch.float64)).Q


def test_phi_of_a_subspace_with_itself_is_one():
    v = _orthonormal(64, 8, seed=0)
    assert np.allclose(diagnostics.phi_grid(v, v).diagonal(), 1.0)


def test_phi_of_independent_random_subspaces_is_about_max_i_j_over_d():
    d = 256
    grids = [diagnostics.phi_grid(_orthonormal(d, 8, 2 * s), _orthonormal(d, 32, 2 * s + 1)) for s in range(20)]
    mean = np.mean(grids, axis=0)
    for i, j in ((1, 1), (8, 8), (4, 32), (8, 32)):
        assert mean[i - 1, j - 1] == pytest.approx(max(i, j) / d, rel=0.3), (i, j)


def test_phi_of_nested_subspaces_is_one_and_of_orthogonal_ones_zero():
    basis = _orthonormal(32, 12, seed=3)
    assert diagnostics.phi_grid(basis[:, :4], basis)[3, 11] == pytest.approx(1.0)
    assert diagnostics.phi_grid(basis[:, :4], basis[:, 4:])[3, 7] == pytest.approx(0.0, abs=1e-12)


def test_effective_rank_of_a_known_spectrum_is_exact():
    sigma = np.sqrt([50.0, 30.0, 10.0, 6.0, 3.0, 1.0])  # energies sum to 100
    u, v = _orthonormal(20, 6, seed=4), _orthonormal(10, 6, seed=5)
    matrix = u @ torch.diag(torch.tensor(sigma)) @ v.T
    found = diagnostics.svd(matrix).S.numpy()[:6]
    assert np.allclose(found, sigma)
    assert diagnostics.effective_rank(found, 0.80) == 2  # 50 + 30 = 80 exactly
    assert diagnostics.effective_rank(found, 0.90) == 3
    assert diagnostics.effective_rank(found, 0.99) == 5
    assert diagnostics.effective_rank(np.zeros(4), 0.9) == 0


def test_delta_w_of_an_untrained_lora_is_zero_and_is_scale_b_a_once_b_is_set(one_thread):
    model, targets = adapters.apply_method(tiny_bert(), MethodSettings(name="lora", lr=1e-3, r=4, alpha=8), "SEQ_CLS")
    deltas = diagnostics.lora_deltas(model)
    assert sorted(deltas) == sorted(targets)
    assert all(torch.count_nonzero(d) == 0 for d in deltas.values())
    name = targets[0]
    layer = model.base_model.model.get_submodule(name)
    torch.nn.init.normal_(layer.lora_B["default"].weight)
    expected = 8 / 4 * layer.lora_B["default"].weight @ layer.lora_A["default"].weight
    assert torch.allclose(diagnostics.lora_deltas(model)[name], expected.double(), atol=1e-6)
    assert diagnostics.effective_rank(diagnostics.svd(expected).S.numpy(), 0.999) <= 4


def test_amplification_of_an_update_along_w0s_weakest_directions_is_large():
    u, v = _orthonormal(16, 16, seed=6), _orthonormal(16, 16, seed=7)
    w0 = u @ torch.diag(torch.linspace(10, 0.01, 16, dtype=torch.float64)) @ v.T
    weak = u[:, -1:] @ v[:, -1:].T  # W0's smallest singular direction
    strong = u[:, :1] @ v[:, :1].T
    assert diagnostics.amplification(diagnostics.svd(weak), w0, 1) == pytest.approx(1 / 0.01, rel=1e-6)
    assert diagnostics.amplification(diagnostics.svd(strong), w0, 1) == pytest.approx(1 / 10, rel=1e-6)
    top = diagnostics.right_directions(3 * weak + strong, 2)  # singular values 3 (weak) and 1 (strong)
    assert abs(float(top[:, 0] @ v[:, -1])) == pytest.approx(1.0) and abs(float(top[:, 1] @ v[:, 0])) == pytest.approx(1.0)


def _full_ft_tables(shapes: dict[str, tuple[int, int]], energy: dict[str, float]):
    """update_ranks/update_spectra rows of one full-FT run whose module m has singular values energy[m] * 0.8^k."""
    import pandas as pd

    ranks = pd.DataFrame([{"run_id": "full", "method": "full", "module": m, "d_out": o, "d_in": i} for m, (o, i) in shapes.items()])
    spectra = pd.DataFrame([{"run_id": "full", "module": m, "k": k + 1, "sigma": energy[m] * 0.8 ** k} for m in shapes for k in range(64)])
    return ranks, spectra


def test_the_advisor_meets_the_uniform_budget_exactly_and_gives_rank_where_the_energy_is():
    from lora_sweep.analysis.diagnostics import adapter_parameters, advise

    shapes = {"l0.q": (384, 384), "l1.q": (384, 384), "l0.up": (1536, 384), "l1.up": (1536, 384), "l0.down": (384, 1536)}
    energy = {"l0.q": 10.0, "l1.q": 1.0, "l0.up": 1.0, "l1.up": 1.0, "l0.down": 3.0}
    ranks, spectra = _full_ft_tables(shapes, energy)
    table = ranks.set_index("module")
    for r in (1, 4, 8):
        pattern = advise(ranks, spectra, list(shapes), r)
        assert set(pattern) == set(shapes) and min(pattern.values()) >= 1
        assert adapter_parameters(pattern, table) == adapter_parameters(dict.fromkeys(shapes, r), table)
    pattern = advise(ranks, spectra, list(shapes), 8)
    assert pattern["l0.q"] > 8 > pattern["l1.q"]  # the module with the larger update gets the rank
    assert pattern["l0.up"] == pattern["l1.up"] == 8 and pattern["l0.down"] == 8  # equal spectra, or alone in its shape


def test_phi_pairs_only_the_chosen_configuration_of_each_rank_and_keeps_the_spread_over_pairs():
    d, rows, directions = 16, [], {}
    for config, r, seeds in (("chosen_r4", 4, (0, 1, 2)), ("chosen_r8", 8, (0, 1, 2)), ("other_lr_r8", 8, (0, 1))):
        for seed in seeds:
            run = f"{config}_s{seed}"
            rows.append({"run_id": run, "config_id": config, "context_id": "c", "targets": "qv", "method": "lora", "rank_pattern": False,
                         "r": r, "seed": seed, "module": "layer.0.q", "matrix": "q"})
            basis = _orthonormal(d, 8, seed=seed if config != "other_lr_r8" else 100 + seed)
            directions[(run, "layer.0.q")] = basis[:, :r]  # r=4 of a seed spans the first half of that seed's r=8 basis
    phi = _phi(pd.DataFrame(rows), directions, paired={"chosen_r4", "chosen_r8"})
    top = phi[(phi["i"] == 1) & (phi["j"] == 1)].set_index("comparison")
    same = top.loc["r=4 vs r=8, same seed"]
    assert same["pairs"] == 3 and same["phi"] == pytest.approx(1.0)  # the other learning rate's runs would pull it below 1
    seeds = top.loc["r=8: seed vs seed"]
    assert seeds["pairs"] == 3  # 3 seeds of the chosen configuration: C(3, 2), not C(5, 2)
    assert seeds["phi_low"] < seeds["phi"] < seeds["phi_high"]


def test_spectrum_against_rank_curve_gives_the_exact_permutation_p_value():
    """Four ranks in perfect order: ρ = 1, and exactly 2 of the 4! orderings are as extreme (p = 1/12); scipy's t
    approximation would say p = 0.00."""
    ranks_table = pd.DataFrame({"method": ["full"], "run_id": ["f"]})
    curve = pd.DataFrame({"run_id": "f", "module": "q", "k": [1, 4, 16, 64], "share": [0.2, 0.4, 0.6, 0.8]})
    points = pd.DataFrame({"r": [1, 4, 16, 64], "primary_value_mean": [0.70, 0.71, 0.72, 0.73]})
    found = spectrum_vs_rank(ranks_table, curve, ["q"], points)
    assert found["rho"] == pytest.approx(1.0) and found["p"] == pytest.approx(2 / 24) and found["n"] == 4
