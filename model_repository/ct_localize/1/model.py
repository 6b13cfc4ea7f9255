"""ct_localize: attribution map + a META holding ct_preprocess's mapping (ct_triage_explain passes
ct_postprocess's META, which keeps it) -> the box of the most attributed region in the chosen series'
original voxels. Thin: the work is `explain.localize` (numpy and scipy, no PyTorch).

LOCALIZATION is x_min, x_max, y_min, y_max, z_min, z_max (inclusive voxel indices: column, row, and
slice as preprocess sorted them). An attribution that is zero everywhere (nothing speaks for
pathology) has no region: the answer is then [-1, -1, -1, -1, -1, -1], not an error. Any other
input it cannot localize (wrong shape, non-finite values, META without preprocess's mapping) fails
that request with INVALID_ARG and explain's one-line message. Anything else is a bug here: INTERNAL
with the exception's type only, logged with its type and where (never its message, which could
quote META values; never a traceback to the caller).
"""

import numpy as np
import triton_python_backend_utils as pb_utils

from contract import ContractError, internal_error, parse_meta
from explain import LocalizationError, localize
from settings import NAMES

NOTHING_ATTRIBUTED = np.full(6, -1, dtype=np.int32)


class TritonPythonModel:
    def execute(self, requests):
        return [self._respond(request) for request in requests]

    def _respond(self, request):
        try:
            attribution = pb_utils.get_input_tensor_by_name(request, NAMES.attribution).as_numpy()
            meta = parse_meta(pb_utils.get_input_tensor_by_name(request, NAMES.meta).as_numpy().reshape(-1)[0])
            if np.isfinite(attribution).all() and not (attribution > 0).any():
                box = NOTHING_ATTRIBUTED
            else:
                _, original = localize(attribution, meta)
                box = np.array(original.as_list(), dtype=np.int32)
        except (LocalizationError, ContractError) as error:
            return pb_utils.InferenceResponse(error=pb_utils.TritonError(f"{NAMES.localize}: {error}", pb_utils.TritonError.INVALID_ARG))
        except Exception as error:  # an internal bug: report the type and where, never the message
            logged, answered = internal_error(NAMES.localize, error)
            pb_utils.Logger.log_error(logged)
            return pb_utils.InferenceResponse(error=pb_utils.TritonError(answered, pb_utils.TritonError.INTERNAL))
        return pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor(NAMES.localization, box)])
