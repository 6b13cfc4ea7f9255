"""How much shared memory and CUDA memory pool a deployment needs: one formula for the compose file,
the Kubernetes manifests and the tests that check it against a measured run.

Python-backend shared memory (`/dev/shm`): every Python-backend model instance (a stub process) owns
one region of `shm-default-byte-size`, enough for its control messages and small tensors. A request
whose tensors do not fit grows that instance's region in steps of `shm-growth-byte-size`, enough for
its input and output together, and the region keeps its size. So, per instance:

    region = default + ceil(need / growth) * growth     (need: tensor bytes of its largest request;
                                                         no growth while need fits the default region)

with need = largest study + one FP32 volume (4 S^3) for ct_preprocess, max batch x 4 S^3 for a
Python-backend ct_classifier (none on the OpenVINO, ONNX Runtime or TensorRT backend; also with GPU
preprocessing, whose volumes arrive on the GPU: Triton builds the warm-up batches in CPU memory, and
a client calling ct_classifier itself sends its volumes on the CPU), ~0 for ct_postprocess, one
FP32 volume in and one FP16 attribution map out (6 S^3) for ct_explain, and the map (2 S^3) for
ct_localize (the explanation models of ct_triage_explain, loaded on every server). The deployment's
`/dev/shm` is the sum over instances, plus Triton's own headroom. A region grown past its model's
peak held a request no deployment sends, and keeps those pages: the launcher's watchdog reloads that
model (`region_limits`).

Measured (benchmarks/results/cpu-s64.md, S=64, 6 stubs, one 150.3 MiB study at a time): 384 MiB
idle (6 x 64 MiB) and 576 MiB at the peak; the regions above give 576 MiB for that run (one
ct_preprocess region grown to 64 + 3 x 64 MiB, five at 64 MiB). A 40 MiB study did not grow its
region, a 73 MiB one grew it by 2 x 64 MiB, as the formula says (tests/server/test_deploy.py
measures such a run). A deployment is sized for every instance at its peak at once, plus headroom.

CUDA memory pool (`--cuda-memory-pool-byte-size`): with ct_preprocess on the GPU, each volume it
returns is one FP32 volume (4 S^3) in the pool until the step that reads it has finished with it.
The bound on how many are alive at once is the queues, not the instances: a volume waits in
ct_classifier's queue (at most `SERVING.volume_queue_size`, beyond which Triton rejects the study and
frees its volume) or runs in its batch (`max_batch_size`, one classifier instance per GPU), and in
ct_triage_explain it waits in ct_explain's queue (the same bound) or runs there (one per instance),
and stays alive as that ensemble's VOLUME output until ct_postprocess and ct_localize, which answer in
milliseconds against ct_explain's explanation, have run (one per ct_explain instance); plus the one
each ct_preprocess instance is handing over. A pool smaller than that fails requests under load:
Triton then falls back to pinned host memory, which the Python backend's stub cannot fill with a GPU
tensor ("failed to load GPU buffers ... failed to copy data: invalid argument", a request answered
with an error or empty outputs: triton-inference-server/server#7148, #8177). At S=256 with 2
ct_preprocess instances, batches of 4 and queues of 8 that is 24 volumes, 1.5 GiB of the card: those
two queues are short for that reason (the other heavy models queue 32 studies, on the CPU).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from settings import EXPORT_TARGETS, NAMES, PREPROCESSING, SERVING

MIB = 1024**2
# The smallest card the product promises to fit, as CUDA sees it: an "8 GB" card (RTX 3070 class)
# gives CUDA 7.76 to 7.78 GiB, the driver keeping the rest (PyTorch's "total capacity" in out-of-memory
# reports: sshan-zhao/GASDA#19, akshitac8/OW-DETR#46, meta-llama/codellama#82); 7.75 GiB is below each.
CARD_BYTES = 7936 * MIB
HEADROOM_BYTES = 64 * MIB  # Triton's own use of /dev/shm beyond the stubs' regions, rounded up
FITS_MARGIN_BYTES = 4 * MIB  # what a stub's own messages may hold of its default region


@dataclass(frozen=True)
class Deployment:
    """What the sizes depend on: the served configs' instance counts, S, batching and the largest study."""

    size: int
    preprocess_instances: int
    max_batch_size: int
    largest_study_bytes: int = SERVING.largest_study_bytes
    classifier_python_instances: int = 1  # Python-backend classifier instances (cpu, torch-gpu targets); 0 for openvino/onnx-gpu/tensorrt
    postprocess_instances: int = 1
    preprocess_on_gpu: bool = False
    explain_instances: int = 1  # ct_explain (its volume arrives on the CPU, wherever it runs)
    localize_instances: int = 1
    volume_queue_size: int = SERVING.volume_queue_size  # of ct_classifier (GPU configs) and ct_explain

    @property
    def volume_bytes(self) -> int:
        return 4 * self.size**3


def region_bytes(need: int, default: int = SERVING.shm_default_byte_size, growth: int = SERVING.shm_growth_byte_size) -> int:
    """One stub's region once a request of `need` tensor bytes has passed through it."""
    steps = 0 if need <= default - FITS_MARGIN_BYTES else math.ceil(need / growth)
    return default + steps * growth


def region_limits(deployment: Deployment) -> dict[str, int]:
    """Each Python-backend model's region at its peak, by model name: one instance's share of `shm_bytes`."""
    d = deployment
    return {
        NAMES.preprocess: region_bytes(d.largest_study_bytes + (0 if d.preprocess_on_gpu else d.volume_bytes)),
        NAMES.classifier: region_bytes(d.max_batch_size * d.volume_bytes),
        NAMES.postprocess: region_bytes(0),
        NAMES.explain: region_bytes(d.volume_bytes + d.volume_bytes // 2),
        NAMES.localize: region_bytes(d.volume_bytes // 2),
    }


def shm_bytes(deployment: Deployment) -> int:
    """/dev/shm the Python backend needs at the peak (compose `shm_size`, the Kubernetes emptyDir)."""
    d = deployment
    instances = {
        NAMES.preprocess: d.preprocess_instances,
        NAMES.classifier: d.classifier_python_instances,
        NAMES.postprocess: d.postprocess_instances,
        NAMES.explain: d.explain_instances,
        NAMES.localize: d.localize_instances,
    }
    return sum(instances[model] * limit for model, limit in region_limits(d).items()) + HEADROOM_BYTES


def pool_volumes(deployment: Deployment) -> int:
    """The most volumes GPU preprocessing can have alive in the CUDA pool at once (the module's
    docstring says why these are the bound)."""
    d = deployment
    classifier = d.volume_queue_size + d.max_batch_size
    explain = d.volume_queue_size + 2 * d.explain_instances if d.explain_instances else 0
    return d.preprocess_instances + classifier + explain


def cuda_pool_bytes(deployment: Deployment, in_flight: int | None = None) -> int:
    """Triton's CUDA memory pool on each GPU: room for every volume GPU preprocessing can have alive,
    or for `in_flight` when no more studies than that are ever sent at once (each holds at most one
    volume); at least Triton's default 64 MiB."""
    if not deployment.preprocess_on_gpu:
        return 64 * MIB
    volumes = pool_volumes(deployment) if in_flight is None else min(pool_volumes(deployment), in_flight)
    return max(volumes * deployment.volume_bytes, 64 * MIB)


def served_deployment(repository: Path, model_config_name: str | None = None, models: Sequence[str] | None = None) -> Deployment:
    """The Deployment a model repository's configs describe, as Triton will load them (the named
    alternative config where a model has one, only `models` and their ensembles' steps where given).
    A model that is missing or whose config does not parse counts with the project's defaults:
    Triton names that problem when it loads."""
    configs = _served_configs(Path(repository), model_config_name)
    loaded = set(configs) if models is None else _with_steps(set(models), configs)

    def instances(model: str) -> int:
        config = configs.get(model)
        if model not in loaded or config is None:
            return 0
        return sum(group.count or 1 for group in config.instance_group) or 1

    classifier, preprocess, explain = (configs.get(model) for model in (NAMES.classifier, NAMES.preprocess, NAMES.explain))
    queues = [
        config.dynamic_batching.default_queue_policy.max_queue_size
        for config in (classifier, explain)
        if config is not None and config.dynamic_batching.default_queue_policy.max_queue_size
    ]
    return Deployment(
        size=int(classifier.input[0].dims[-1]) if classifier is not None and classifier.input else PREPROCESSING.size,
        preprocess_instances=instances(NAMES.preprocess) or SERVING.preprocess_instances,
        max_batch_size=classifier.max_batch_size if classifier is not None and classifier.max_batch_size else SERVING.max_batch_size,
        classifier_python_instances=instances(NAMES.classifier) if classifier is not None and classifier.backend == "python" else 0,
        postprocess_instances=instances(NAMES.postprocess),
        preprocess_on_gpu=preprocess is not None and preprocess.parameters["device"].string_value == "cuda",
        explain_instances=instances(NAMES.explain),
        localize_instances=instances(NAMES.localize),
        volume_queue_size=max(queues, default=SERVING.volume_queue_size),
    )


def _served_configs(repository: Path, model_config_name: str | None) -> dict:
    """Model name -> its parsed config (tritonclient's ModelConfig), for the project's models found."""
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    configs = {}
    for folder in sorted(p for p in repository.glob("*") if p.is_dir()):
        alternative = folder / "configs" / f"{model_config_name}.pbtxt"
        path = alternative if model_config_name and alternative.is_file() else folder / "config.pbtxt"
        try:
            configs[folder.name] = text_format.Parse(path.read_text(), model_config_pb2.ModelConfig())
        except (OSError, UnicodeDecodeError, text_format.ParseError):
            continue
    return configs


def _with_steps(models: set[str], configs: dict) -> set[str]:
    """`models` and the models their ensembles run."""
    return models | {step.model_name for model in models if model in configs for step in configs[model].ensemble_scheduling.step}


def mib(value: int) -> int:
    """Whole MiB, rounded up (what compose and Kubernetes quantities are written in)."""
    return -(-value // MIB)


def main(argv: list[str] | None = None) -> int:
    import argparse
    import json

    from contract.arguments import integer, model_size

    parser = argparse.ArgumentParser(
        prog="python -m serve.sizing",
        description="/dev/shm and CUDA memory pool for a deployment, in MiB (one JSON object)",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument(
        "--size", type=model_size, default=PREPROCESSING.size, metavar="S", help="model input S, voxels per side of the S^3 volume"
    )
    parser.add_argument(
        "--preprocess-instances",
        type=integer(1, SERVING.most_preprocess_instances),
        default=SERVING.preprocess_instances,
        metavar="N",
        help="ct_preprocess instances",
    )
    parser.add_argument(
        "--max-batch-size",
        type=integer(1, SERVING.most_max_batch_size),
        default=SERVING.max_batch_size,
        metavar="N",
        help="the classifier's max batch size, studies",
    )
    parser.add_argument(
        "--largest-study-mib",
        type=integer(1, 1024**2),
        default=SERVING.largest_study_bytes // MIB,
        metavar="MIB",
        help="largest study a request sends, MiB",
    )
    parser.add_argument(
        "--target",
        choices=EXPORT_TARGETS.names,
        default="torch-gpu",
        help=f"export target ({' and '.join(EXPORT_TARGETS.python_backend)} serve the classifier on the Python backend)",
    )
    parser.add_argument("--gpu-preprocessing", action="store_true", help="ct_preprocess with device 'cuda'")
    args = parser.parse_args(argv)
    deployment = Deployment(
        size=args.size,
        preprocess_instances=args.preprocess_instances,
        max_batch_size=args.max_batch_size,
        largest_study_bytes=args.largest_study_mib * MIB,
        classifier_python_instances=1 if args.target in EXPORT_TARGETS.python_backend else 0,
        preprocess_on_gpu=args.gpu_preprocessing,
    )
    print(json.dumps({"shm_mib": mib(shm_bytes(deployment)), "cuda_memory_pool_mib": mib(cuda_pool_bytes(deployment))}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
