"""The committed model_repository/ (no export, no server): configs that parse as they are, agree with
settings and with each other, and the rules that render a copy at another S or for a target."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace

import pytest
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2

import export
from contract import ContractError, InvalidSizeError
from export.__main__ import main as export_main
from export.repository import OPENVINO_TARGETS, _copy_model_files
from settings import EXPORT_TARGETS, NAMES, OPERATING_POINT, PREPROCESSING, SERVING

DEFAULTS = export.ServingOptions()
MODELS = (NAMES.triage, NAMES.preprocess, NAMES.classifier, NAMES.postprocess)
EXPLANATION_MODELS = (NAMES.triage_explain, NAMES.explain, NAMES.localize)
LIGHT = (NAMES.postprocess, NAMES.localize)  # milliseconds per study: the short wait and the long queue


@pytest.mark.parametrize("target", export.TARGETS)
def test_committed_configs_parse_as_triton_model_configs_for_every_target(target):
    configs = export.target_configs(target)
    assert sorted(configs) == sorted([*MODELS, *EXPLANATION_MODELS])
    assert all(config.name == name for name, config in configs.items())
    classifier = configs[NAMES.classifier]
    (volume,), (probabilities,) = classifier.input, classifier.output
    assert (volume.name, list(volume.dims)) == (NAMES.volume, [1, PREPROCESSING.size] + [PREPROCESSING.size] * 2)
    assert (probabilities.name, list(probabilities.dims), probabilities.label_filename) == (NAMES.probabilities, [2], "labels.txt")
    (group,) = classifier.instance_group
    expected = {"cpu": ("python", "", group.KIND_CPU), "openvino": ("openvino", "", group.KIND_CPU),
                "onnx-gpu": ("", "onnxruntime_onnx", group.KIND_GPU),
                "tensorrt": ("", "tensorrt_plan", group.KIND_GPU), "torch-gpu": ("python", "", group.KIND_GPU)}  # fmt: skip
    assert (classifier.backend, classifier.platform, group.kind) == expected[target]
    assert (classifier.backend == "python") == (target in EXPORT_TARGETS.python_backend)  # what serve.sizing counts a stub for
    # a batching wait only where batches run faster than their volumes one by one (the GPU engines)
    delay = classifier.dynamic_batching.max_queue_delay_microseconds
    assert (delay == 0) == (target in ("cpu", "openvino")), (target, delay)
    if target == "torch-gpu":  # GPU volumes stay on the GPU; the model file it runs is committed
        assert classifier.parameters["FORCE_CPU_ONLY_INPUT_TENSORS"].string_value == "no"
        assert classifier.parameters["precision"].string_value == "fp16"
        assert (export.COMMITTED / NAMES.classifier / "1" / classifier.default_model_filename).is_file()
    if target == "onnx-gpu":
        (accelerator,) = classifier.optimization.execution_accelerators.gpu_execution_accelerator
        assert accelerator.name == "tensorrt" and accelerator.parameters["precision_mode"] == "FP16"
        assert int(accelerator.parameters["max_workspace_size_bytes"]) == SERVING.tensorrt_workspace_bytes
    # only the classifier has per-target configs: the other models are the same on every server
    assert export.config_path(export.COMMITTED / NAMES.preprocess, target).name == "config.pbtxt"


def test_committed_configs_serve_what_settings_say():
    """The repository is the served truth and settings the typed one: they must not drift apart."""
    # the batching wait is the target's: none on the CPU, whose engine runs a batch's volumes one by one
    assert export.serving_options(export.target_configs("cpu")) == replace(DEFAULTS, max_queue_delay_microseconds=0)
    for target in export.TARGETS:
        for name, config in export.target_configs(target).items():
            if config.platform == "ensemble":
                continue
            policy = config.dynamic_batching.default_queue_policy
            heavy = name not in LIGHT
            timeout_s = SERVING.request_timeout_s if heavy else SERVING.postprocess_queue_timeout_s
            assert policy.default_timeout_microseconds == int(timeout_s * 1e6), (target, name)
            # a study waiting at a model that takes a volume holds it in the CUDA pool with GPU preprocessing
            takes_volume = name == NAMES.explain or (name == NAMES.classifier and target not in OPENVINO_TARGETS)
            queue = SERVING.volume_queue_size if takes_volume else SERVING.max_queue_size if heavy else SERVING.postprocess_max_queue_size
            assert policy.max_queue_size == queue, (target, name)
            assert policy.timeout_action == policy.REJECT and policy.allow_timeout_override
    assert (export.COMMITTED / NAMES.classifier / "labels.txt").read_text().split() == list(NAMES.labels)
    assert DEFAULTS.threshold == OPERATING_POINT.threshold


def test_rendering_the_defaults_gives_the_committed_configs():
    for target in export.TARGETS:
        rendered = export.render_configs(target, DEFAULTS)
        assert rendered == export.target_configs(target), target


def test_a_rendered_copy_changes_size_batching_instances_and_threshold_everywhere():
    options = export.ServingOptions(size=64, max_batch_size=8, max_queue_delay_microseconds=5, preprocess_instances=3, threshold=0.25)
    configs = export.render_configs("onnx-gpu", options)
    assert export.serving_options(configs) == options
    classifier = configs[NAMES.classifier]
    # a warm-up per batch size the batcher can form: cuDNN and ONNX Runtime tune per input shape
    assert [list(w.inputs[NAMES.volume].dims) for w in classifier.model_warmup] == [[1, 64, 64, 64]] * 8
    assert [(w.name, w.batch_size) for w in classifier.model_warmup] == [(f"batch_{b}", b) for b in range(1, 9)]
    assert [w.batch_size for w in export.render_configs("tensorrt", options)[NAMES.classifier].model_warmup] == [1]  # a fixed profile
    text = export.repository.config_text(classifier, "ct_classifier/configs/onnx-gpu.pbtxt")
    assert text_format.Parse(text, model_config_pb2.ModelConfig()) == classifier  # what the copy's file holds


def test_a_rendered_copy_can_put_preprocessing_on_the_gpu():
    options = export.ServingOptions(preprocess_device="cuda")
    configs = export.render_configs("torch-gpu", options)
    (group,) = configs[NAMES.preprocess].instance_group
    assert group.kind == group.KIND_GPU and configs[NAMES.preprocess].parameters["device"].string_value == "cuda"
    assert replace(export.serving_options(configs), max_queue_delay_microseconds=None) == options.validated()  # the wait: the target's
    with pytest.raises(export.ExportError, match="preprocess device must be one of cpu, cuda, not 'gpu'"):
        export.ServingOptions(preprocess_device="gpu").validated()


def test_a_rendered_copy_can_put_explanations_on_the_gpu():
    options = export.ServingOptions(explain_device="cuda")
    configs = export.render_configs("torch-gpu", options)
    (group,) = configs[NAMES.explain].instance_group
    assert group.kind == group.KIND_GPU and configs[NAMES.explain].parameters["device"].string_value == "cuda"
    (group,) = configs[NAMES.preprocess].instance_group
    assert group.kind == group.KIND_CPU  # each model's device is its own option
    assert replace(export.serving_options(configs), max_queue_delay_microseconds=None) == options.validated()  # the wait: the target's
    with pytest.raises(export.ExportError, match="explain device must be one of cpu, cuda, not 'gpu'"):
        export.ServingOptions(explain_device="gpu").validated()


def _tensors(config) -> dict[str, tuple[int, list[int]]]:
    return {t.name: (t.data_type, list(t.dims)) for t in (*config.input, *config.output)}


@pytest.mark.parametrize("target", export.TARGETS)
def test_the_explanation_models_keep_their_contract_on_every_target(target):
    """ct_triage_explain answers what ct_triage does plus the map, its box and the explained volume;
    ct_triage itself knows nothing of explanations."""
    configs = export.target_configs(target)
    size, fp16, fp32, int32, text = (
        PREPROCESSING.size,
        model_config_pb2.TYPE_FP16,
        model_config_pb2.TYPE_FP32,
        model_config_pb2.TYPE_INT32,
        model_config_pb2.TYPE_STRING,
    )
    volume, attribution = [1, 1, size, size, size], [size, size, size]
    triage, explained = configs[NAMES.triage], configs[NAMES.triage_explain]
    assert explained.platform == "ensemble" and explained.max_batch_size == 0
    assert _tensors(explained) == {
        **_tensors(triage),
        NAMES.attribution: (fp16, attribution),
        NAMES.localization: (int32, [6]),
        NAMES.volume: (fp32, volume),
    }
    assert [step.model_name for step in triage.ensemble_scheduling.step] == [NAMES.preprocess, NAMES.classifier, NAMES.postprocess]
    steps = {step.model_name: step for step in explained.ensemble_scheduling.step}
    assert list(steps) == [NAMES.preprocess, NAMES.explain, NAMES.postprocess, NAMES.localize]
    assert steps[NAMES.postprocess].input_map[NAMES.probabilities] == steps[NAMES.explain].output_map[NAMES.probabilities]
    # a straight chain: ct_localize reads ct_postprocess's META, so no two steps run side by side (a client
    # gone mid-request cancelled two parallel steps, and Triton 2.51 crashed)
    assert steps[NAMES.localize].input_map[NAMES.meta] == steps[NAMES.postprocess].output_map[NAMES.meta]
    assert steps[NAMES.postprocess].input_map[NAMES.meta] == steps[NAMES.preprocess].output_map[NAMES.meta]
    assert steps[NAMES.explain].input_map[NAMES.volume] == steps[NAMES.preprocess].output_map[NAMES.volume] == NAMES.volume
    explain, localize = configs[NAMES.explain], configs[NAMES.localize]
    assert _tensors(explain) == {NAMES.volume: (fp32, volume), NAMES.attribution: (fp16, attribution), NAMES.probabilities: (fp32, [1, 2])}
    assert _tensors(localize) == {NAMES.attribution: (fp16, attribution), NAMES.meta: (text, [1]), NAMES.localization: (int32, [6])}
    for config in (explain, localize):
        (group,) = config.instance_group
        assert (config.backend, config.max_batch_size, group.kind, group.count) == ("python", 0, group.KIND_CPU, 1)
    parameters = {key: value.string_value for key, value in explain.parameters.items()}
    assert parameters == {"method": "gradcam", "steps": "16", "window": "16", "threads": "0", "device": "cpu"}
    for name in EXPLANATION_MODELS[1:]:
        assert (export.COMMITTED / name / "1" / "model.py").is_file()


def test_a_rendered_copy_puts_s_into_the_explanation_models():
    configs = export.render_configs("cpu", export.ServingOptions(size=32))
    assert _tensors(configs[NAMES.explain])[NAMES.volume][1] == [1, 1, 32, 32, 32]
    assert _tensors(configs[NAMES.explain])[NAMES.attribution][1] == [32, 32, 32]
    assert _tensors(configs[NAMES.localize])[NAMES.attribution][1] == [32, 32, 32]
    assert _tensors(configs[NAMES.triage_explain])[NAMES.attribution][1] == [32, 32, 32]
    assert _tensors(configs[NAMES.triage_explain])[NAMES.volume][1] == [1, 1, 32, 32, 32]
    configs[NAMES.localize].input[0].dims[:] = [16, 16, 16]
    with pytest.raises(export.ExportError, match=r"ct_localize's ATTRIBUTION \[16, 16, 16\] disagrees with ct_classifier's S=32"):
        export.serving_options(configs)


def test_configs_that_disagree_on_the_volume_are_refused():
    configs = export.target_configs("cpu")
    configs[NAMES.preprocess].output[0].dims[:] = [1, 1, 128, 128, 128]
    with pytest.raises(export.ExportError, match="disagree on the volume shape"):
        export.serving_options(configs)


def test_model_files_are_copied_without_caches_configs_earlier_exports_or_an_unused_model_py(tmp_path):
    source = tmp_path / "ct_example"
    (source / "1" / "__pycache__").mkdir(parents=True)
    (source / "configs").mkdir()
    (source / "1" / "model.py").write_text("")
    (source / "1" / "torch_model.py").write_text("")
    (source / "1" / "model.onnx").write_bytes(b"an earlier export's graph")
    (source / "1" / "provenance.json").write_text("{}")
    (source / "1" / "__pycache__" / "model.cpython-311.pyc").write_bytes(b"")
    (source / "configs" / "gpu.pbtxt").write_text("")
    (source / "config.pbtxt").write_text("")
    (source / "labels.txt").write_text("a\n")
    python, onnx = model_config_pb2.ModelConfig(backend="python"), model_config_pb2.ModelConfig(platform="onnxruntime_onnx")
    torch_gpu = model_config_pb2.ModelConfig(backend="python", default_model_filename="torch_model.py")
    for name, config in (("python", python), ("onnx", onnx), ("torch", torch_gpu)):
        _copy_model_files(source, tmp_path / name, config)
    assert sorted(p.relative_to(tmp_path / "python").as_posix() for p in (tmp_path / "python").rglob("*")) == [
        "1",
        "1/model.py",
        "labels.txt",
    ]
    assert sorted(p.relative_to(tmp_path / "torch").as_posix() for p in (tmp_path / "torch").rglob("*")) == [
        "1",
        "1/torch_model.py",
        "labels.txt",
    ]
    assert sorted(p.relative_to(tmp_path / "onnx").as_posix() for p in (tmp_path / "onnx").rglob("*")) == ["labels.txt"]


@pytest.mark.parametrize("size", [30, 8, 0, 1024])
def test_bad_sizes_are_refused_before_any_work(tmp_path, size):
    with pytest.raises(InvalidSizeError, match="multiple of 8 between 16 and 512"):
        export.write_repository(tmp_path / "repo", target="cpu", size=size, demo_weights=True)
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize(
    "option, value, message",
    [
        ("threshold", 1.5, r"threshold must be a number in \[0, 1\]"),
        ("threshold", "high", "threshold must be a number"),
        ("max_batch_size", 0, "max batch size must be an integer from 1 to 64"),
        ("max_batch_size", 2_000_000_000, "max batch size must be an integer from 1 to 64"),  # a warm-up per batch size: unbounded memory
        ("preprocess_instances", 99_999_999_999, "preprocess instances must be an integer from 1 to 64"),  # past protobuf's int32
        ("max_queue_delay_microseconds", -1, "max queue delay must be an integer from 0 to 10000000"),
        ("max_queue_delay_microseconds", 10**24, "max queue delay must be an integer from 0 to 10000000"),  # past uint64
    ],
)
def test_bad_serving_options_are_refused_before_any_work(tmp_path, option, value, message):
    """The operating point follows the one rule ct_postprocess and set_threshold apply."""
    with pytest.raises((export.ExportError, ContractError), match=message):
        export.write_repository(tmp_path / "repo", target="cpu", size=16, demo_weights=True, **{option: value})
    assert not list(tmp_path.iterdir())


def test_the_committed_repository_takes_no_serving_options(tmp_path):
    with pytest.raises(export.ExportError, match="committed repository's configs set these"):
        export.write_repository(target="cpu", demo_weights=True, threshold=0.3, artifacts_dir=tmp_path / "kept")
    assert not list(tmp_path.iterdir())


def test_user_folders_are_never_replaced(tmp_path):
    folder = tmp_path / "my_models"
    folder.mkdir()
    (folder / "notes.txt").write_text("mine")
    for out, artifacts in ((folder, None), (tmp_path / "repo", folder)):
        with pytest.raises(export.OutputFolderError, match="not written by export"):
            export.write_repository(out, target="cpu", size=32, demo_weights=True, artifacts_dir=artifacts)
    assert (folder / "notes.txt").read_text() == "mine" and len(list(folder.iterdir())) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["my_models"]  # no staging left behind


def test_an_artifacts_folder_never_takes_the_place_of_a_repository(tmp_path):
    """--artifacts on (or around) the repository, or on an earlier export's repository: refused before any
    work, so a served repository is never replaced by artifacts while the command says it is ready."""
    earlier = tmp_path / "earlier"
    earlier.mkdir()
    (earlier / export.MARKER).write_text(json.dumps({"written_by": "python -m export", "kind": "repository"}))
    cases = [
        (tmp_path / "repo", tmp_path / "repo", "must be separate, neither inside the other"),
        (tmp_path / "repo", tmp_path / "repo" / "kept", "must be separate, neither inside the other"),
        (tmp_path / "all" / "repo", tmp_path / "all", "must be separate, neither inside the other"),
        (tmp_path / "repo", earlier, "holds an earlier export's repository, not its artifacts"),
    ]
    for out, artifacts, message in cases:
        with pytest.raises(export.OutputFolderError, match=message):
            export.write_repository(out, target="cpu", size=16, demo_weights=True, artifacts_dir=artifacts)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["earlier"] and [p.name for p in earlier.iterdir()] == [export.MARKER]


def test_outputs_inside_or_around_the_source_repository_are_refused_before_any_work(tmp_path, monkeypatch):
    """A folder written into the source repository is one Triton takes for a model, without a config:
    every later export of the source failed on it with a traceback."""
    source = tmp_path / "model_repository"
    shutil.copytree(export.COMMITTED, source, ignore=shutil.ignore_patterns("__pycache__", *export.repository.GENERATED))
    before = sorted(p.relative_to(source) for p in source.rglob("*"))

    def no_work():
        raise AssertionError("the export began")

    monkeypatch.setattr(export.repository, "make_demo_weights", no_work)
    cases = [
        (source / "s16", None, r"output folder .*/model_repository/s16 is inside the source repository"),
        (tmp_path / "out", source / "kept", r"artifacts folder .*/model_repository/kept is inside the source repository"),
        (None, source, r"artifacts folder .*/model_repository is the source repository"),
        (tmp_path, tmp_path / "kept", r"output folder .* holds the source repository"),
    ]
    for out, artifacts, message in cases:
        with pytest.raises(export.OutputFolderError, match=message):
            export.write_repository(out, target="cpu", demo_weights=True, source=source, artifacts_dir=artifacts, parity_size=16)
    assert sorted(p.relative_to(source) for p in source.rglob("*")) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model_repository"]
    (source / "s16").mkdir()  # left by an export before this check
    with pytest.raises(export.ExportError, match=r"model_repository/s16 holds no config\.pbtxt: not a model folder"):
        export.target_configs("cpu", source)


def test_a_failed_export_leaves_no_folder_it_created(tmp_path, monkeypatch):
    """The parent folders export made for its outputs go too (the deepest first, only if empty); a
    folder that was there stays."""

    def failed(*args, **kwargs):
        raise export.ExportError("the ONNX export failed")

    monkeypatch.setattr(export.repository, "make_demo_weights", lambda: None)  # no weights needed before the failure
    monkeypatch.setattr(export.repository, "build_classifier", lambda weights: None)
    monkeypatch.setattr(export.repository.onnx_graph, "export_fp32", failed)
    (tmp_path / "mine").mkdir()
    for out, artifacts in (
        (tmp_path / "deep" / "a" / "b" / "repo", None),
        (tmp_path / "mine" / "a" / "repo", tmp_path / "other" / "c" / "kept"),
    ):
        with pytest.raises(export.ExportError, match="the ONNX export failed"):
            export.write_repository(out, target="cpu", size=16, demo_weights=True, artifacts_dir=artifacts)
        assert sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*")) == ["mine"]


def test_an_output_that_cannot_be_written_is_refused_before_any_work(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(export.OutputFolderError, match="is not a writable folder"):  # (root may write anywhere: a file as parent)
        (tmp_path / "a_file").write_text("")
        export.write_repository(tmp_path / "a_file" / "repo", target="cpu", size=16, demo_weights=True)
    with pytest.raises(export.OutputFolderError, match="exists, is not empty and was not written by export"):
        export.write_repository(".", target="cpu", size=16, demo_weights=True)  # "." is the folder it names, not a crash


def test_ctrl_c_is_one_line_and_leaves_an_earlier_export_as_it_was(tmp_path, capsys, monkeypatch):
    earlier = tmp_path / "repo"
    earlier.mkdir()
    (earlier / export.MARKER).write_text(json.dumps({"written_by": "python -m export", "kind": "repository"}))
    (earlier / "served.txt").write_text("the earlier export")

    def interrupted():
        raise KeyboardInterrupt

    monkeypatch.setattr(export.repository, "make_demo_weights", interrupted)
    assert export_main(["--demo-weights", "--target", "cpu", "--size", "16", "--out", str(earlier)]) == 130
    assert capsys.readouterr().err.strip() == "export: interrupted (an output folder is replaced only once its export is complete)"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["repo"] and (earlier / "served.txt").read_text() == "the earlier export"


@pytest.mark.parametrize(
    "args, message",
    [
        (["--checkpoint", "missing.pth", "--size", "32", "--out", "{tmp}/repo"], "export: error: checkpoint not found"),
        (["--demo-weights", "--size", "36", "--out", "{tmp}/repo"], "export: error: size 36 is not usable"),
        (["--demo-weights", "--size", "32", "--out", "{tmp}/repo", "--target", "tensorrt"], "needs the TensorRT Python API"),
        (["--demo-weights", "--threshold", "0.3"], "--threshold applies only to a rendered copy (--out DIR)"),
    ],
)
def test_cli_bad_input_is_one_clear_line(tmp_path, capsys, args, message):
    args = [arg.format(tmp=tmp_path) for arg in args]
    if "--target" not in args:
        args = [*args, "--target", "cpu"]
    try:
        code = export_main(args)
    except SystemExit as stopped:  # argparse's own usage errors
        code = stopped.code
    assert code == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]  # argparse prints usage first
    assert len(errors) == 1 and message in errors[0] and "Traceback" not in errors[0], errors
    assert not list(tmp_path.iterdir())


def test_parity_inputs_include_the_preprocess_chest_phantom():
    """One phantom description: export's chest volumes are preprocess's phantom in model range."""
    names, volumes = export.parity.parity_inputs(16)
    chest = volumes[names.index("chest-lesion")]
    assert volumes.shape == (len(names), 1, 16, 16, 16) and -1.0 <= volumes.min() and volumes.max() <= 1.0
    assert (chest == -1.0).any() and (chest == 1.0).any()  # air outside the body, bone clipped at the top
    assert names == ["uniform-0", "uniform-1", "smooth-0", "smooth-1", "chest", "chest-lesion", "air"]


def test_the_cpu_target_computes_in_fp32_unless_bf16_is_chosen():
    """BF16 is an explicit opt-in: the committed cpu config says fp32, a rendered copy says what was chosen."""
    classifier = export.target_configs("cpu")[NAMES.classifier]
    assert classifier.parameters["precision"].string_value == "fp32"
    assert export.repository.served_precision("cpu", classifier) == "fp32"
    assert export.render_configs("cpu", DEFAULTS) == export.target_configs("cpu")  # no choice, no change
    for target, precision in (("cpu", "bf16"), ("cpu", "fp32"), ("torch-gpu", "bf16"), ("torch-gpu", "fp32")):
        rendered = export.render_configs(target, export.ServingOptions(precision=precision))[NAMES.classifier]
        assert rendered.parameters["precision"].string_value == precision
        assert export.repository.served_precision(target, rendered) == precision
        text = export.repository.config_text(rendered, "ct_classifier/config.pbtxt")
        assert text_format.Parse(text, model_config_pb2.ModelConfig()) == rendered


@pytest.mark.parametrize(
    "target, precision, message",
    [
        ("cpu", "fp16", "precision 'fp16' for the cpu target: choose one of fp32, bf16"),
        ("cpu", "int8", "precision 'int8' for the cpu target: choose one of fp32, bf16"),
        ("torch-gpu", "f32", "precision 'f32' for the torch-gpu target: choose one of fp16, fp32, bf16"),
        ("openvino", "bf16", "the openvino target serves fp32 and takes no precision"),
        ("onnx-gpu", "fp16", "the onnx-gpu target serves fp32 graph, fp16 TensorRT accelerator and takes no precision"),
        ("tensorrt", "fp32", "the tensorrt target serves fp16 and takes no precision"),
    ],
)
def test_a_precision_a_target_cannot_serve_is_refused_before_any_work(tmp_path, target, precision, message):
    with pytest.raises(export.ExportError, match=message):
        export.write_repository(tmp_path / "repo", target=target, size=16, demo_weights=True, precision=precision)
    assert not list(tmp_path.iterdir())


def test_a_committed_cpu_config_with_an_unknown_precision_is_refused():
    classifier = export.target_configs("cpu")[NAMES.classifier]
    classifier.parameters["precision"].string_value = "bfloat16"
    with pytest.raises(export.ExportError, match="precision 'bfloat16' for the cpu target: choose one of fp32, bf16"):
        export.repository.served_precision("cpu", classifier)


@pytest.mark.parametrize(
    "args, message",
    [
        (["--demo-weights", "--precision", "bf16"], "--precision applies only to a rendered copy (--out DIR)"),
        (["--demo-weights", "--size", "16", "--out", "{tmp}/repo", "--precision", "fp16"], "export: error: ct_classifier precision 'fp16'"),
        (["--demo-weights", "--size", "16", "--out", "{tmp}/repo", "--precision", "bf16", "--target", "openvino"], "takes no precision"),
    ],
)
def test_cli_precision_errors_are_one_line(tmp_path, capsys, args, message):
    test_cli_bad_input_is_one_clear_line(tmp_path, capsys, args, message)
