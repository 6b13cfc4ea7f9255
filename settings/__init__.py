"""The project's configuration in one typed place.

Everything that more than one package must agree on lives here: the preprocessing the model was
trained with (docs/model.md), the input limits that protect the server, the Triton model and tensor
names, the default operating point, the serving defaults and the export targets. Packages import
these objects instead of repeating literals; `contract` holds the rules over them. The committed
model_repository/ configs carry the serving values as Triton reads them, and a test keeps the two
equal.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Preprocessing:
    """The trained model's input contract: change nothing here without retraining."""

    spacing_mm: float = 1.0  # isotropic resampling target
    crop_threshold_hu: float = -1000.0  # region of interest: voxels with HU strictly above this
    crop_margin_voxels: int = 5  # margin around the region of interest, in 1 mm voxels
    hu_min: float = -1000.0  # clip window, mapped linearly to [-1, 1]
    hu_max: float = 600.0
    size: int = 256  # S: the model input is [1, 1, S, S, S]


@dataclass(frozen=True)
class InputLimits:
    """Bounds checked before allocating, so a hostile or broken upload cannot exhaust memory."""

    min_slices: int = 16  # fewer slices is not a chest volume
    max_slices: int = 2000  # per series, and frames per file
    # image frames of a study, all files together, checked before a record of each is made: as many
    # as max_archive_members single-frame files (multi-frame files could declare 2000 each)
    max_study_frames: int = 10_000
    max_rows: int = 1024
    max_columns: int = 1024
    max_voxels: int = 2000 * 1024 * 1024 // 4  # ~1 GB of int16 before any float work
    max_grid_1mm_voxels: int = 2**28  # reference mode's 1 mm volume: 1 GiB of float32 (a 512 mm cube is 134 M)
    max_archive_members: int = 10_000
    max_uncompressed_bytes: int = 4 * 1024**3  # total bytes unpacked from ZIP archives per study
    max_compression_ratio: float = 200.0  # per ZIP member; above this it is treated as a ZIP bomb
    # bytes a ZIP member, a whole archive or a compressed DICOM value may unpack to beyond its ratio: the
    # ratio of a few KiB means nothing (64 KiB of zeros deflate to ~100 bytes), and 10,000 such members of
    # one archive are bounded by the archive's own ratio check
    compression_slack_bytes: int = 2**16
    max_archive_depth: int = 2  # a ZIP inside a ZIP is followed this many levels deep
    max_folder_files: int = 10_000  # files looked at in a study folder
    max_folder_depth: int = 32  # sub-folder levels below a study folder (DICOM exports use about 5)
    max_sequence_depth: int = 16  # DICOM sequences nested in sequences (Enhanced CT uses 3; pydicom recurses per level)
    # sequence items in one file that pydicom reads (Enhanced CT: about 8 per frame); each costs pydicom
    # a data set, so a million empty items cost it 1.3 GB
    max_sequence_items: int = 100_000
    # geometry and rescale values a CT series can have; outside them a header is broken or hostile
    min_spacing_mm: float = 0.05  # pixel spacing and slice step
    max_spacing_mm: float = 20.0
    # HU per stored unit (CT: almost always 1); below the minimum even 16-bit values (65,536 of them)
    # span less than the model's 1,600 HU window: the volume would be nearly constant
    min_rescale_slope: float = 0.025
    max_rescale_slope: float = 1000.0
    max_abs_rescale_intercept: float = 100_000.0


@dataclass(frozen=True)
class TritonNames:
    """Model and tensor names, and the classifier's labels in output order: clients rely on these."""

    triage: str = "ct_triage"
    preprocess: str = "ct_preprocess"
    classifier: str = "ct_classifier"
    postprocess: str = "ct_postprocess"
    triage_explain: str = "ct_triage_explain"  # ct_triage plus the attribution map: explanations are opt-in per request
    explain: str = "ct_explain"
    localize: str = "ct_localize"
    dicom: str = "DICOM"
    volume: str = "VOLUME"
    probabilities: str = "PROBABILITIES"
    probability: str = "PROBABILITY"
    pathology: str = "PATHOLOGY"
    study_uid: str = "STUDY_UID"
    series_uid: str = "SERIES_UID"
    meta: str = "META"
    attribution: str = "ATTRIBUTION"
    localization: str = "LOCALIZATION"
    labels: tuple[str, ...] = ("normal", "pathology")
    # request parameter naming the series to classify (Triton forwards an ensemble's parameters to its steps)
    series_parameter: str = "series_uid"


@dataclass(frozen=True)
class OperatingPoint:
    """Decision rule: pathology when P(pathology) >= threshold.

    The service exists to find studies without pathology, so a missed pathology is the expensive
    error: a site lowers the threshold for sensitivity (see README, "Operating point").
    """

    threshold: float = 0.5


@dataclass(frozen=True)
class Serving:
    """Defaults for the bundled server and the clients."""

    http_port: int = 8000
    grpc_port: int = 8001
    metrics_port: int = 8002
    # Python-backend shared memory: a 300-slice study is ~150 MB of DICOM plus a 64 MB volume.
    shm_default_byte_size: int = 64 * 1024**2
    shm_growth_byte_size: int = 64 * 1024**2
    preprocess_instances: int = 2
    # the largest study a deployment is sized for (its shared memory): a 1,100-slice 512 x 512 series
    largest_study_bytes: int = 600 * 1024**2
    max_batch_size: int = 4  # meant to fit 4 x 256^3 in FP16 on an 8 GB card: benchmarks/gpu_check.sh measures it, not run yet
    # The most an export accepts: 64 studies is 4 GiB of FP32 input alone at S=256 (and a warm-up per
    # batch size), 64 instances are 64 processes, a batching wait of 10 s outlasts any triage answer.
    most_max_batch_size: int = 64
    most_preprocess_instances: int = 64
    most_queue_delay_microseconds: int = 10_000_000
    request_timeout_s: float = 300.0  # the client's deadline per request; on the server, the longest queue wait
    max_queue_size: int = 32  # studies waiting per model queue before new ones are rejected (back-pressure)
    # ... at the models that take a volume (ct_classifier's GPU configs, ct_explain): with preprocessing
    # on the GPU each waiting study holds its 64 MiB volume (S=256) in Triton's CUDA pool, which is sized
    # for them all (serve.sizing) on an 8 GB card; two classifier batches keep batching fed, and 8
    # explanations are already minutes of queue on a CPU
    volume_queue_size: int = 8
    # ct_postprocess takes microseconds: a shorter wait and a longer queue than the heavy models
    postprocess_queue_timeout_s: float = 60.0
    postprocess_max_queue_size: int = 64
    tensorrt_workspace_bytes: int = 2 * 1024**3  # bounded so engine building fits next to the server on an 8 GB card
    # The server's and its stubs' glibc returns freed memory at once (blocks of 64 KiB and more mapped
    # on their own, the heap trimmed on every free, 2 arenas): with its defaults the buffers of one
    # 1 GiB gRPC request stayed resident in tritonserver (~400 MB) for good. The launcher sets them.
    malloc_environment: tuple[tuple[str, str], ...] = (
        ("MALLOC_MMAP_THRESHOLD_", "65536"),
        ("MALLOC_TRIM_THRESHOLD_", "0"),
        ("MALLOC_ARENA_MAX", "2"),
    )
    startup_timeout_s: float = 180.0
    exit_timeout_s: int = 30  # on stop, in-flight requests get this long before the server exits
    # python -m serve restarts a server whose /v2/health/live has gone unanswered this long (hung, not
    # exited): the Kubernetes liveness probe's minute, since large uploads keep the HTTP threads busy for seconds
    hang_timeout_s: float = 60.0
    # ... and restarts it when the instances a model reload replaced still hold their memory this long
    # after it (Triton 2.51 never unloads a model version whose stub died mid-request): the longest
    # queue wait plus a study's work, so that the old instances' own requests have long been answered
    drain_timeout_s: float = 600.0


@dataclass(frozen=True)
class ExportTargets:
    """What `python -m export --target` renders the repository for: each name is a ct_classifier config
    (`configs/<name>.pbtxt`; the cpu target's is `config.pbtxt`). `python_backend`: the targets whose
    classifier runs on Triton's Python backend, a stub process with a shared-memory region of its own
    (serve.sizing counts it); the others run on the OpenVINO, ONNX Runtime or TensorRT backend."""

    names: tuple[str, ...] = ("cpu", "openvino", "onnx-gpu", "tensorrt", "torch-gpu")
    python_backend: tuple[str, ...] = ("cpu", "torch-gpu")


@dataclass(frozen=True)
class ServiceMetrics:
    """The service's own Prometheus metrics, beside Triton's nv_* on the metrics port. Triton counts
    requests; these say what the model answered and why studies were refused: a shift in the share
    called pathology is the first sign of a new scanner protocol or a broken feed. Labels hold a
    decision or an error type, never anything from a study."""

    decisions: str = "ct_triage_decisions_total"  # counter by `decision`, one of NAMES.labels (ct_postprocess)
    probability: str = "ct_triage_probability"  # histogram of P(pathology) (ct_postprocess)
    probability_buckets: tuple[float, ...] = (0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95)
    threshold: str = "ct_triage_threshold"  # gauge: the operating point in force (ct_postprocess)
    refused: str = "ct_triage_refused_studies_total"  # counter by `reason`, the preprocess.StudyError type (ct_preprocess)


@dataclass(frozen=True)
class AdminAccess:
    """Triton's admin APIs (model control, shared memory, tracing, logging) answer only requests that
    carry the deployment's key (server flags --http-restricted-api / --grpc-restricted-protocol)."""

    key_env: str = "CT_TRIAGE_ADMIN_KEY"  # where the server and the clients read the key
    header: str = "ct-triage-admin-key"  # HTTP header; lower case, as gRPC metadata keys must be
    restricted_apis: tuple[str, ...] = ("model-repository", "shared-memory", "trace", "logging")
    longest_key: int = 1024  # `openssl rand -hex 32` gives 64; a 100 kB header is dropped by Triton's HTTP front end

    @property
    def grpc_metadata(self) -> str:
        """Triton prefixes the gRPC metadata key."""
        return f"triton-grpc-protocol-{self.header}"

    def checked_key(self, key: str | None) -> str | None:
        """The key as Triton and both protocols carry it intact (HTTP trims spaces, gRPC metadata is
        printable ASCII, Triton's HTTP front end drops very long headers), or None for no key; the
        launcher and set_threshold apply the same rule. ValueError names the rule, never the key."""
        if key is None:
            return None
        if not key or key != key.strip() or not all(" " <= c <= "~" for c in key) or len(key) > self.longest_key:
            raise ValueError(
                f"the admin key must be non-empty printable ASCII of at most {self.longest_key} characters, "
                "without leading or trailing spaces"
            )
        return key


PREPROCESSING = Preprocessing()
INPUT_LIMITS = InputLimits()
NAMES = TritonNames()
OPERATING_POINT = OperatingPoint()
SERVING = Serving()
EXPORT_TARGETS = ExportTargets()
ADMIN = AdminAccess()
METRICS = ServiceMetrics()

__all__ = [
    "ADMIN",
    "EXPORT_TARGETS",
    "INPUT_LIMITS",
    "METRICS",
    "NAMES",
    "OPERATING_POINT",
    "PREPROCESSING",
    "SERVING",
    "AdminAccess",
    "ExportTargets",
    "InputLimits",
    "OperatingPoint",
    "Preprocessing",
    "ServiceMetrics",
    "Serving",
    "TritonNames",
]
