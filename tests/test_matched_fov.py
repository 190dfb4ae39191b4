"""Registration on features from matched fields of view (issue 22, item 4): ``RegistrationConfig.matched_fov``.

MOVING is FIXED itself with 12 more voxels of its own edge on every side: the same anatomy in a larger
field of view. A network with instance normalisation (features that depend on the whole volume) gives
the two different features on the same anatomy when each is computed on its own field of view; with
``matched_fov`` MOVING's features for the deformable stages are computed on the working grid, the window
FIXED's are computed on, and they agree.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from synthvox.models import build_model
from synthvox.registration.config import RegistrationConfig
from synthvox.registration.network import FeatureNetwork
from synthvox.registration.stages import (
    State,
    choose_start,
    compute_features,
    find_working_grid,
    frame_moving,
    moving_onto_working_grid,
)
from synthvox.volume import Volume

PAD = 12


def _pair() -> tuple[Volume, Volume]:
    g = torch.Generator().manual_seed(0)
    x = F.avg_pool3d(torch.rand(1, 1, 40, 36, 32, generator=g), 5, 1, 2)[0]
    x = (x - x.min()) / (x.max() - x.min()) * 100.0
    affine = np.diag([2.0, 2.0, 2.0, 1.0])
    padded = F.pad(x[None], [PAD] * 6, mode="replicate")[0]
    shifted = affine.copy()
    shifted[:3, 3] -= 2.0 * PAD  # the same world positions for the shared voxels
    return Volume(x, affine), Volume(padded, shifted)


def _features_on_working_grid(matched: bool, kind: str = "net") -> tuple[torch.Tensor, torch.Tensor, State]:
    fixed, moving = _pair()
    model = build_model("tiny", seed=0).eval() if kind in ("net", "both") else None
    shares = {"mind": 0.7, "net": 0.3} if kind == "both" else None
    st = State(fixed=fixed, moving=moving, fixed_mask=None, moving_mask=None, moving_labels=None,
               network=FeatureNetwork(kind=kind, model=model, shares=shares), cfg=RegistrationConfig(spacing=2.0, matched_fov=matched if isinstance(matched, str) else ("network" if matched else "none")),
               init="none", modality_fixed="mr", modality_moving="mr", ct_window=None, device=torch.device("cpu"),
               workers=1, warn=lambda _m: None)
    for step in (find_working_grid, choose_start, frame_moving, compute_features, moving_onto_working_grid):
        step(st)
    inside = st.weight > 0
    return st.feat_fixed[:, inside], st.feat_moving_w[:, inside], st


def _relative_change(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(((a - b) ** 2).sum() / ((a - a.mean(1, keepdim=True)) ** 2).sum())


def test_matched_fov_gives_the_same_features_on_the_same_anatomy():
    f, m, st = _features_on_working_grid(matched=True)
    assert _relative_change(f, m) < 1e-6
    assert st.cover_w is not None and float(st.cover_w[st.weight > 0].min()) > 0.99


def test_without_it_an_instance_normalised_network_sees_the_larger_field_of_view():
    f, m, _ = _features_on_working_grid(matched=False)
    assert _relative_change(f, m) > 1e-3  # the control: the property above is not trivially true


def test_mind_alone_is_left_as_it_was():
    f0, m0, st0 = _features_on_working_grid(matched=False, kind="mind")
    f1, m1, st1 = _features_on_working_grid(matched=True, kind="mind")
    torch.testing.assert_close(m0, m1, rtol=0, atol=0)
    assert st1.cover_w is None


def test_with_both_only_the_network_channels_are_computed_again():
    f0, m0, _ = _features_on_working_grid(matched=False, kind="both")
    f1, m1, _ = _features_on_working_grid(matched=True, kind="both")
    n_net = 16  # the tiny network's output channels; MIND-SSC's come first
    torch.testing.assert_close(m1[:-n_net], m0[:-n_net], rtol=0, atol=0)  # MIND-SSC is local: kept as it was
    assert _relative_change(f1[-n_net:], m1[-n_net:]) < 1e-6 < _relative_change(f0[-n_net:], m0[-n_net:])


def test_all_recomputes_mind_too_and_a_bad_value_is_refused():
    from synthvox.errors import InputError

    f0, m0, _ = _features_on_working_grid(matched="network", kind="both")
    f1, m1, _ = _features_on_working_grid(matched="all", kind="both")
    assert not torch.equal(m1[:-16], m0[:-16])  # MIND-SSC of MOVING on the working grid, not resampled
    torch.testing.assert_close(m1[-16:], m0[-16:], rtol=1e-5, atol=1e-6)
    assert _relative_change(f1, m1) < 1e-6  # the same image in the same window: the same features
    import pytest

    with pytest.raises(InputError, match="matched_fov"):
        RegistrationConfig(matched_fov="yes")
