"""explain.Explainer: Grad-CAM (and IG, Occlusion) on the classifier, with weights built by hand so
that the decision depends only on a known region, and probabilities equal to the classifier's (issue 15)."""

import numpy as np
import pytest
import torch
from captum.attr import LayerGradCam

from classifier import ResNet34Classifier, TorchClassifier
from explain import Explainer, ExplainError, most_attributed_region
from explain.attribution import cam_on_input_voxels, log_odds

SIZE = 64
REGION = (slice(16, 32), slice(32, 48), slice(8, 24))  # D, H, W of the bright cube at SIZE


def _region_only_weights(state_dict: dict) -> dict:
    """Every residual branch zero (blocks pass their input through), BatchNorm the identity, the stem
    one smoothing channel, FC: pathology logit = mean of that channel. The stem's ReLU keeps only
    voxels above 0, so on an air background only the bright region moves the decision."""
    state = {key: torch.zeros_like(value) for key, value in state_dict.items()}
    for key, value in state.items():
        if key.endswith("running_var") or (key.split(".")[-2].startswith("bn") and key.endswith("weight")):
            value.fill_(1.0)
    state["conv1.weight"][0] = 1.0 / 7**3
    state["fc.weight"][1, 0] = 1.0
    return state


@pytest.fixture(scope="module")
def region_classifier(demo_weights):
    return ResNet34Classifier.from_state_dict(_region_only_weights(demo_weights.state_dict))


def _region(size: int) -> tuple[slice, ...]:
    return tuple(slice(s.start * size // SIZE, s.stop * size // SIZE) for s in REGION)


def _volume(bright: bool = True, size: int = SIZE) -> np.ndarray:
    volume = np.full((1, 1, size, size, size), -1.0, np.float32)  # air
    if bright:
        volume[(0, 0, *_region(size))] = 1.0
    return volume


@pytest.mark.parametrize(
    ("method", "options", "size", "resolution"),
    [
        ("gradcam", {}, SIZE, 8),
        ("integrated_gradients", {"steps": 4}, SIZE // 2, 4),  # steps x (forward + backward): a smaller S keeps it fast
        ("occlusion", {"window": 16}, SIZE // 2, 16),  # (S / window)^3 + 1 forward passes
    ],
)
def test_attribution_concentrates_on_the_region_the_decision_depends_on(region_classifier, method, options, size, resolution):
    """Within the method's resolution (Grad-CAM: layer4's cells of 8 voxels at S=64; Occlusion: its
    window) of the bright region: 95% of the attribution, and the most attributed box around its centre."""
    region = _region(size)
    explanation = Explainer(region_classifier, size=size, method=method, **options)(_volume(size=size))
    attribution = explanation.attribution.astype(np.float32)
    assert attribution.shape == (size,) * 3 and explanation.attribution.dtype == np.float16
    assert attribution.min() >= 0.0 and attribution.max() == 1.0
    near = np.zeros_like(attribution, bool)
    near[tuple(slice(max(s.start - 8, 0), s.stop + 8) for s in region)] = True
    assert attribution[near].sum() / attribution.sum() > 0.95
    box = most_attributed_region(attribution).ranges
    for (lo, hi), expected in zip(box, region):
        assert expected.start - resolution <= lo <= (expected.start + expected.stop) // 2 <= hi < expected.stop + resolution, (method, box)
    assert explanation.probabilities[0, 1] > 0.5  # the region speaks for pathology


def test_the_gradcam_map_is_centred_on_the_region_not_half_a_cell_past_it(region_classifier):
    """Layer4's cell k is centred on input voxel 8k: a cube centred on such a voxel is seen
    symmetrically by the network, so its map is centred there too (a plain resize put every cell
    3.5 voxels further along each axis)."""
    volume = np.full((1, 1, SIZE, SIZE, SIZE), -1.0, np.float32)
    volume[0, 0, 20:29, 36:45, 12:21] = 1.0  # 9 voxels centred on 24, 40 and 16: cells 3, 5 and 2
    attribution = Explainer(region_classifier, size=SIZE)(volume).attribution.astype(np.float64)
    centre = [float((grid * attribution).sum() / attribution.sum()) for grid in np.indices(attribution.shape)]
    assert np.allclose(centre, [24, 40, 16], atol=0.25), centre


def test_nothing_attributed_when_nothing_speaks_for_pathology(region_classifier):
    explanation = Explainer(region_classifier, size=SIZE)(_volume(bright=False))
    assert not explanation.attribution.any()
    np.testing.assert_allclose(explanation.probabilities, [[0.5, 0.5]], atol=1e-6)


def test_probabilities_equal_the_classifiers_and_gradcam_equals_captums_on_the_whole_network(demo_weights):
    """The leaf-at-layer4 shortcut changes no number: Captum's LayerGradCam of the log-odds on the
    plain network's layer4 (full autograd graph) gives the same map."""
    size = 32
    volume = np.random.default_rng(1).uniform(-1, 1, (1, 1, size, size, size)).astype(np.float32)
    explanation = Explainer(ResNet34Classifier.from_state_dict(dict(demo_weights.state_dict)), size=size)(volume)
    engine = TorchClassifier(ResNet34Classifier.from_state_dict(dict(demo_weights.state_dict)), device="cpu", precision="fp32")
    np.testing.assert_allclose(explanation.probabilities, engine(torch.from_numpy(volume)).numpy(), atol=1e-6)
    plain = ResNet34Classifier.from_state_dict({k: v.clone() for k, v in demo_weights.state_dict.items()})
    cam = LayerGradCam(lambda x: log_odds(plain(x)), plain.layer4).attribute(torch.from_numpy(volume), target=0, relu_attributions=True)
    expected = cam_on_input_voxels(cam.detach(), size)[0, 0].numpy()
    assert expected.max() > 0
    np.testing.assert_allclose(explanation.attribution.astype(np.float32), expected / expected.max(), atol=2e-3)


METHOD_OPTIONS = [("gradcam", {}), ("integrated_gradients", {"steps": 2}), ("occlusion", {"window": 16})]


@pytest.mark.parametrize(("method", "options"), METHOD_OPTIONS)
def test_weights_with_the_same_decision_give_the_same_map(demo_weights, method, options):
    """The softmax depends only on logit[pathology] - logit[normal]: a vector and a bias added to both
    FC rows change no probability, so they must change no map either."""
    size = 32
    volume = np.random.default_rng(2).uniform(-1, 1, (1, 1, size, size, size)).astype(np.float32)
    shifted = {key: value.clone() for key, value in demo_weights.state_dict.items()}
    shifted["fc.weight"] += torch.randn(shifted["fc.weight"].shape[1], generator=torch.Generator().manual_seed(1)) * 0.05
    shifted["fc.bias"] += 0.7
    plain, moved = (
        Explainer(ResNet34Classifier.from_state_dict(state), size=size, method=method, **options)(volume)
        for state in (dict(demo_weights.state_dict), shifted)
    )
    np.testing.assert_allclose(moved.probabilities, plain.probabilities, atol=1e-5)
    assert plain.attribution.max() == 1.0
    np.testing.assert_allclose(moved.attribution.astype(np.float32), plain.attribution.astype(np.float32), atol=5e-3)


@pytest.mark.parametrize(("method", "options"), METHOD_OPTIONS)
def test_a_region_that_lowers_p_pathology_is_not_evidence_for_it(demo_weights, method, options):
    """The bright region raises the normal logit twice as much as the pathology logit: it raises the
    pathology logit, yet speaks against pathology, so nothing is attributed."""
    state = _region_only_weights(demo_weights.state_dict)
    state["fc.weight"][0, 0] = 2.0
    explanation = Explainer(ResNet34Classifier.from_state_dict(state), size=32, method=method, **options)(_volume(size=32))
    assert explanation.probabilities[0, 1] < 0.5
    assert not explanation.attribution.any()


@pytest.mark.parametrize(
    ("volume", "message"),
    [
        (np.zeros((1, 1, 16, 16, 16), np.float32), r"must be \[1, 1, 32, 32, 32\]"),
        (np.zeros((2, 1, 32, 32, 32), np.float32), "one study"),
        (np.zeros((1, 1, 32, 32, 32), np.float64), "float32, not float64"),
        (np.full((1, 1, 32, 32, 32), np.nan, np.float32), "non-finite"),
    ],
)
def test_bad_volumes_are_refused_by_name(region_classifier, volume, message):
    with pytest.raises(ExplainError, match=message):
        Explainer(region_classifier, size=32)(volume)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"method": "saliency"}, "method must be one of"),
        ({"steps": 0}, "steps"),
        ({"steps": 257}, "steps must be 1..256, not 257"),
        ({"method": "occlusion", "window": 5}, "divide"),
        # a window of 1 voxel: (S / 1)^3 + 1 passes, 16.7 million at S=256, that nothing could cancel
        (
            {"method": "occlusion", "window": 1},
            r"occlusion window 1 at S=32 costs 32769 forward passes per study, more than the limit of 4097: "
            r"the window must be at least S/16 = 2",
        ),
    ],
)
def test_bad_options_are_refused_by_name(region_classifier, options, message):
    with pytest.raises(ExplainError, match=message):
        Explainer(region_classifier, size=32, **options)


def test_occlusion_is_bounded_by_its_forward_passes_and_other_methods_ignore_the_window(region_classifier):
    assert Explainer(region_classifier, size=32, method="occlusion", window=2).window == 2  # 16^3 + 1: the limit itself
    with pytest.raises(ExplainError, match="16777217 forward passes"):
        Explainer(region_classifier, size=256, method="occlusion", window=1)
    assert Explainer(region_classifier, size=32, method="gradcam", window=1).method == "gradcam"
    assert Explainer(region_classifier, size=24, method="gradcam").method == "gradcam"  # 16 does not divide 24: gradcam has no window
    with pytest.raises(ExplainError, match="occlusion window must divide S=24, not 16"):
        Explainer(region_classifier, size=24, method="occlusion")
