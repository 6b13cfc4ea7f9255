"""Attribution maps of the classifier's P(pathology), computed with Captum.

Methods, by cost for one study at S (F = one forward pass, B = one backward pass):
- `gradcam` (default): Captum's LayerGradCam on the last residual layer (layer4), upsampled
  linearly to S^3 with each cell on the input voxel it is centred on (`cam_on_input_voxels`).
  The network below layer4 runs without an autograd graph (layer4's output is
  made the leaf Grad-CAM differentiates to), so it costs one forward pass plus a backward pass
  through the pooling and the FC layer, with an inference pass's memory. Resolution: layer4's grid,
  S/8 per axis.
- `integrated_gradients`: Captum's IntegratedGradients from an all-air baseline (-1), `steps`
  interpolation points, one at a time: `steps` x (F + full B to the input), plus one F for the
  probabilities; memory of one full backward pass. Voxel resolution.
- `occlusion`: Captum's Occlusion with cubes of `window` voxels (stride `window`) replaced by air:
  (S / window)^3 + 1 forward passes, inference memory. Resolution: the window. At most
  MAX_OCCLUSION_PASSES (16 windows per axis: window >= S / 16): one explanation runs to the end once
  started (nothing cancels it) and holds its instance, so a finer window is refused, not queued.
Every method attributes the log-odds of pathology, logit[pathology] - logit[normal]: the softmax the
decision is taken on depends on nothing else, so a region that raises the normal logit more than the
pathology one counts against pathology, and weights with the same decision give the same map. The map
is its positive part (evidence for pathology), scaled so that its maximum is 1 (all zero when nothing
speaks for pathology).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from captum.attr import IntegratedGradients, LayerGradCam, Occlusion
from torch import nn
from torch.nn import functional as F

from classifier import ResNet34Classifier
from contract import ContractError, check_model_range, validate_size
from settings import NAMES

METHODS = ("gradcam", "integrated_gradients", "occlusion")
PATHOLOGY = NAMES.labels.index("pathology")
NORMAL = NAMES.labels.index("normal")
AIR = -1.0  # the model-range value of -1000 HU and below: the baseline IG and Occlusion replace voxels with
MAX_STEPS = 256  # integrated_gradients: steps x (F + B) + F
CAM_STRIDE = 8  # layer4's cells in input voxels (conv1, the max pool and layer2 each stride 2)
MAX_OCCLUSION_PASSES = 16**3 + 1  # occlusion: (S / window)^3 + 1 F; the default window (16) at S=256


class ExplainError(ValueError):
    """A request the explainer cannot answer as asked (shape, values, method options): a client error."""


@dataclass(frozen=True)
class Explanation:
    attribution: np.ndarray  # float16 [S, S, S] in [0, 1], the model input's D, H, W
    probabilities: np.ndarray  # float32 [1, 2], softmax of the same network in FP32
    method: str


def log_odds(logits: torch.Tensor) -> torch.Tensor:
    """[N, 2] logits -> [N, 1] logit[pathology] - logit[normal], what the softmax's decision depends on (target 0)."""
    return (logits[:, PATHOLOGY] - logits[:, NORMAL]).unsqueeze(1)


class _GradCamNetwork(nn.Module):
    """The classifier with layer4's output as a leaf: Grad-CAM needs d(logit)/d(layer4 output) only,
    so nothing below it keeps an autograd graph (the memory of an inference pass)."""

    def __init__(self, classifier: ResNet34Classifier) -> None:
        super().__init__()
        self.classifier = classifier
        self.last_residual = nn.Identity()  # what LayerGradCam hooks: layer4's output

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            features = self.classifier.features(x)
        features = self.last_residual(features.requires_grad_())
        return self.classifier.fc(F.adaptive_avg_pool3d(features, 1).flatten(1))


class Explainer:
    """[1, 1, S, S, S] float32 volume in [-1, 1] -> Explanation, on one device at FP32."""

    def __init__(
        self,
        classifier: ResNet34Classifier,
        *,
        size: int,
        device: str | torch.device = "cpu",
        method: str = "gradcam",
        steps: int = 16,
        window: int = 16,
    ) -> None:
        self.size = validate_size(size)
        if method not in METHODS:
            raise ExplainError(f"method must be one of {', '.join(METHODS)}, not {method!r}")
        if not 1 <= steps <= MAX_STEPS:
            raise ExplainError(f"integrated_gradients steps must be 1..{MAX_STEPS}, not {steps}")
        if method == "occlusion" and not (1 <= window <= self.size and self.size % window == 0):  # the others have no window
            raise ExplainError(f"occlusion window must divide S={self.size}, not {window}")
        passes = (self.size // window) ** 3 + 1 if method == "occlusion" else 0
        if passes > MAX_OCCLUSION_PASSES:
            raise ExplainError(
                f"occlusion window {window} at S={self.size} costs {passes} forward passes per study, more than the limit of "
                f"{MAX_OCCLUSION_PASSES}: the window must be at least S/16 = {max(1, self.size // 16)}"
            )
        self.method, self.steps, self.window = method, steps, window
        self.device = torch.device(device)
        self.classifier = classifier.eval().to(self.device)
        for parameter in self.classifier.parameters():
            parameter.requires_grad_(False)  # attributions need gradients of activations, never of weights
        self._gradcam_network = _GradCamNetwork(self.classifier)

    @classmethod
    def from_file(cls, path: str | Path, **options) -> Explainer:
        """Weights as export writes them (a plain state_dict), read with weights-only loading."""
        state = torch.load(path, map_location="cpu", weights_only=True)
        return cls(ResNet34Classifier.from_state_dict(state), **options)

    def check(self, volume: np.ndarray | torch.Tensor) -> None:
        """Refuse what is not one model input at this S, before any work."""
        shape = tuple(volume.shape)
        if shape != (1, 1, self.size, self.size, self.size):
            raise ExplainError(
                f"VOLUME must be [1, 1, {self.size}, {self.size}, {self.size}] (one study at S={self.size}), not {list(shape)}"
            )
        if str(volume.dtype).rsplit(".", 1)[-1] != "float32":
            raise ExplainError(f"VOLUME must be float32, not {str(volume.dtype).rsplit('.', 1)[-1]}")

    def __call__(self, volume: np.ndarray | torch.Tensor) -> Explanation:
        self.check(volume)
        x = torch.as_tensor(volume).to(self.device)
        try:
            check_model_range(x)
        except ContractError as error:
            raise ExplainError(str(error)) from None
        if self.method == "gradcam":
            attribution, logits = self._gradcam(x)
        else:
            with torch.inference_mode():
                logits = self.classifier(x)
            attribution = self._input_attribution(x)
        probabilities = torch.softmax(logits.detach().float(), dim=1).cpu().numpy()
        return Explanation(attribution=_normalised(attribution), probabilities=probabilities, method=self.method)

    def _gradcam(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        outputs: list[torch.Tensor] = []

        def forward(inputs: torch.Tensor) -> torch.Tensor:
            logits = self._gradcam_network(inputs)
            outputs.append(logits)  # the same forward pass gives the probabilities
            return log_odds(logits)

        cam = LayerGradCam(forward, self._gradcam_network.last_residual).attribute(x, target=0, relu_attributions=True)
        return cam_on_input_voxels(cam.detach(), self.size)[0, 0], outputs[0]

    def _input_attribution(self, x: torch.Tensor) -> torch.Tensor:
        baseline = torch.full_like(x, AIR)

        def forward(inputs: torch.Tensor) -> torch.Tensor:
            return log_odds(self.classifier(inputs))

        if self.method == "integrated_gradients":
            method = IntegratedGradients(forward)
            attribution = method.attribute(x, baselines=baseline, target=0, n_steps=self.steps, internal_batch_size=1)
        else:
            window = (1, self.window, self.window, self.window)
            with torch.no_grad():
                attribution = Occlusion(forward).attribute(
                    x, sliding_window_shapes=window, strides=window, baselines=AIR, target=0, perturbations_per_eval=1
                )
        return attribution.detach()[0, 0].clamp_min(0)


def cam_on_input_voxels(cam: torch.Tensor, size: int) -> torch.Tensor:
    """layer4's [N, C, n, n, n] grid on the S^3 input: cell k sits on voxel CAM_STRIDE * k, where the
    strides centre it (conv1 k7 s2 p3, the k3 s2 p1 max pool and layer2's stride 2 each centre output
    i on input 2i; layer3 and layer4 are dilated, not strided), linear in between and the last cell's
    value past it. A plain resize (align_corners=False, as Captum's `interpolate`) puts cell k on
    8k + 3.5: the map and its box shifted half a cell towards the high end of every axis."""
    span = CAM_STRIDE * (cam.shape[-1] - 1) + 1
    inside = F.interpolate(cam, size=(span,) * 3, mode="trilinear", align_corners=True)
    return F.pad(inside, (0, size - span) * 3, mode="replicate")


def _normalised(attribution: torch.Tensor) -> np.ndarray:
    values = attribution.float().clamp_min(0)
    peak = float(values.max())
    if not np.isfinite(peak):
        raise ExplainError("the attribution is not finite (the network overflowed on this input)")
    if peak > 0:
        values = values / peak
    return values.cpu().numpy().astype(np.float16)
