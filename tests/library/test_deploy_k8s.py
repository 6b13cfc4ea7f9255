"""The Kubernetes manifests in deploy/k8s/ (no cluster): every object valid against the Kubernetes
OpenAPI schemas (kubernetes-validate, offline, strict: unknown fields fail), and the numbers and names
they share with the project equal to their sources: serve.sizing for /dev/shm and the CUDA memory pool,
settings.SERVING for ports and flags, the model repository for model and config names, the
prometheus-adapter rule for the HPA's metric, the export Job for what the Deployment serves."""

from __future__ import annotations

import argparse
import contextlib
import functools
import http.server
import io
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import kubernetes_validate
import pytest
import yaml
from google.protobuf import text_format
from helpers import ROOT, run_module, served_configs

import serve.__main__ as serve_cli
from serve import installation_at, sizing
from serve.launcher import STUB_BINARY
from settings import ADMIN, EXPORT_TARGETS, NAMES, PREPROCESSING, SERVING

K8S = ROOT / "deploy" / "k8s"
REPOSITORY = ROOT / "model_repository"
KUBERNETES_VERSION = "1.31.0"  # the oldest Kubernetes still maintained upstream when written; the schemas ship with the package
# In the folder, deliberately not applied by `kubectl apply -k` (kustomization.yaml says why; the export
# Job runs on its own, once per release, before the Deployment serves what it wrote).
NOT_APPLIED = {"secret.example.yaml", "prometheus-adapter.yaml", "export-job.yaml"}
# What the restricted-API flags must put behind the admin key, and what must stay open (probes and
# clients send no key).
ADMIN_APIS = {"model-repository", "shared-memory", "trace", "logging"}
OPEN_APIS = {"health", "inference", "metadata"}
TRITON_APIS = {"health", "metadata", "inference", "shared-memory", "model-config", "model-repository", "statistics", "trace", "logging"}
MANIFESTS = sorted(path.name for path in K8S.glob("*.yaml"))


@functools.cache
def documents(name: str) -> tuple[dict, ...]:
    return tuple(doc for doc in yaml.safe_load_all((K8S / name).read_text()) if doc is not None)


def the(kind: str, name: str | None = None) -> dict:
    """The one object of `kind` (and `name`) in the folder."""
    found = [doc for file in MANIFESTS for doc in documents(file) if doc["kind"] == kind and name in (None, doc["metadata"].get("name"))]
    assert len(found) == 1, f"{len(found)} {kind} objects named {name} in {K8S}"
    return found[0]


def pod_spec() -> dict:
    return the("Deployment")["spec"]["template"]["spec"]


def container() -> dict:
    (server,) = pod_spec()["containers"]
    return server


def serve_arguments() -> argparse.Namespace:
    """The container's arguments, `python3 -m serve ...`, as serve's own parser reads them (the container
    keeps the image's entrypoint, NVIDIA's, which execs its arguments)."""
    server = container()
    assert "command" not in server
    assert server["args"][:3] == ["python3", "-m", "serve"], server["args"]
    return serve_cli.parser().parse_args(server["args"][3:])


# the repository export writes for the Deployment, as the launcher reads it: the committed configs
_RENDERED = tempfile.TemporaryDirectory(prefix="ct-triage-k8s-")


@functools.cache
def flags() -> dict[str, list[str]]:
    """tritonserver's `--name=value` arguments, by name (some are repeated), as the launcher passes them
    for the container's arguments: on the configs export writes for the Deployment (the committed ones,
    with ct_preprocess where its annotation puts it), with a key in CT_TRIAGE_ADMIN_KEY."""
    written = export_command(shlex.split(the("Deployment")["metadata"]["annotations"]["ct-triage/model-repository"]))
    args = serve_arguments()
    args.repository = str(served_configs(Path(_RENDERED.name) / "repository", written.preprocess_device, written.preprocess_instances))
    assert args.tritonserver == "/opt/tritonserver"  # the image's Triton, with its ONNX Runtime and TensorRT backends
    root = Path(_RENDERED.name) / "opt" / "tritonserver"  # laid out as there: what serve.installation_at checks
    for part in ("bin/tritonserver", f"backends/python/{STUB_BINARY}"):
        (root / part).parent.mkdir(parents=True, exist_ok=True)
        (root / part).touch(mode=0o755)
    installation = installation_at(root)
    command = serve_cli.server_for(args, "test-key", installation).command(installation.backends)
    assert command[0] == str(root / "bin" / "tritonserver")
    parsed: dict[str, list[str]] = {}
    for argument in command[1:]:
        name, equals, value = argument.partition("=")
        assert argument.startswith("--") and equals, f"not a --name=value flag: {argument}"
        parsed.setdefault(name[2:], []).append(value)
    return parsed


def flag(name: str) -> str:
    (value,) = flags()[name]
    return value


def mebibytes(quantity: str) -> float:
    match = re.fullmatch(r"(\d+)(Mi|Gi)", quantity)
    assert match, f"write sizes in Mi or Gi: {quantity}"
    return int(match[1]) * {"Mi": 1, "Gi": 1024}[match[2]]


def sizing_args() -> argparse.Namespace:
    """The deployment's `ct-triage/serve-sizing` annotation: the arguments of `python -m serve.sizing`
    its /dev/shm and CUDA pool were computed with (the same options and defaults as that CLI)."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--preprocess-instances", type=int, default=SERVING.preprocess_instances)
    parser.add_argument("--max-batch-size", type=int, default=SERVING.max_batch_size)
    parser.add_argument("--largest-study-mib", type=int, default=SERVING.largest_study_bytes // sizing.MIB)
    parser.add_argument("--target", default="torch-gpu")
    parser.add_argument("--gpu-preprocessing", action="store_true")
    return parser.parse_args(shlex.split(the("Deployment")["metadata"]["annotations"]["ct-triage/serve-sizing"]))


def deployment_sizing() -> sizing.Deployment:
    args = sizing_args()
    return sizing.Deployment(
        size=args.size,
        preprocess_instances=args.preprocess_instances,
        max_batch_size=args.max_batch_size,
        largest_study_bytes=args.largest_study_mib * sizing.MIB,
        classifier_python_instances=1 if args.target in EXPORT_TARGETS.python_backend else 0,
        preprocess_on_gpu=args.gpu_preprocessing,
    )


def sizing_cli() -> dict:
    """What `python -m serve.sizing` prints for the annotation's arguments."""
    output = io.StringIO()
    with contextlib.redirect_stdout(output):
        assert sizing.main(shlex.split(the("Deployment")["metadata"]["annotations"]["ct-triage/serve-sizing"])) == 0
    return json.loads(output.getvalue())


def pod_labels_selected(selector: dict, labels: dict | None = None) -> bool:
    """Whether `selector` selects the Deployment's pods (or pods labelled `labels`)."""
    labels = the("Deployment")["spec"]["template"]["metadata"]["labels"] if labels is None else labels
    return all(labels.get(key) == value for key, value in selector["matchLabels"].items())


def export_command(command: list[str]) -> argparse.Namespace:
    """`python -m export ...`, parsed with export's options (python -m export --help; an option it does
    not have fails the parse)."""
    assert command[0] in ("python", "python3") and command[1:3] == ["-m", "export"], command
    parser = argparse.ArgumentParser(exit_on_error=False)
    parser.add_argument("--demo-weights", action="store_true")
    for option in ("--checkpoint", "--target", "--out", "--artifacts", "--preprocess-device", "--explain-device", "--precision"):
        parser.add_argument(option)
    for option in ("--size", "--max-batch-size", "--max-queue-delay-us", "--preprocess-instances", "--parity-size"):
        parser.add_argument(option, type=int)
    parser.add_argument("--threshold", type=float)
    written, unknown = parser.parse_known_args(command[3:])
    assert not unknown, f"options the test does not know: {unknown}"
    return written


def job_pod_spec() -> dict:
    return the("Job")["spec"]["template"]["spec"]


def job_container(name: str) -> dict:
    (found,) = [c for c in (*job_pod_spec().get("initContainers", ()), *job_pod_spec()["containers"]) if c["name"] == name]
    return found


def expanded(text: str, container: dict) -> str:
    """`text` with Kubernetes' $(VAR) references to the container's plain env values expanded."""
    values = {env["name"]: env["value"] for env in container.get("env", ()) if "value" in env}
    return re.sub(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)", lambda match: values[match[1]], text)


# -- every file, every object --------------------------------------------------------------------------


@pytest.mark.parametrize("name", MANIFESTS)
def test_every_manifest_parses_and_validates_against_the_kubernetes_schemas(name):
    docs = documents(name)
    assert docs, f"{name} holds no object"
    for doc in docs:
        if doc["kind"] == "Kustomization":  # kustomize's own file, not an API object: no OpenAPI schema
            assert doc["apiVersion"] == "kustomize.config.k8s.io/v1beta1"
            assert set(doc) <= {"apiVersion", "kind", "namespace", "resources", "images", "labels", "commonAnnotations"}
            continue
        try:
            kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)
        except kubernetes_validate.ValidationError as error:
            pytest.fail(f"{name}: {doc['kind']} {doc['metadata'].get('name')}: {error}")


def test_the_kustomization_lists_existing_files_and_leaves_out_only_what_it_says():
    (kustomization,) = documents("kustomization.yaml")
    resources = kustomization["resources"]
    assert len(resources) == len(set(resources))
    assert all((K8S / resource).is_file() for resource in resources), resources
    assert set(resources) | NOT_APPLIED | {"kustomization.yaml"} == set(MANIFESTS)
    assert not set(resources) & NOT_APPLIED
    # the image the deployment names is the one kustomize rewrites
    (image,) = kustomization["images"]
    assert container()["image"].split(":")[0] == image["name"]


def test_labels_and_selectors_agree():
    deployment = the("Deployment")
    assert pod_labels_selected(deployment["spec"]["selector"])
    assert pod_labels_selected({"matchLabels": the("Service")["spec"]["selector"]})
    assert pod_labels_selected(the("PodDisruptionBudget")["spec"]["selector"])
    assert pod_labels_selected(the("NetworkPolicy")["spec"]["podSelector"])
    assert all(pod_labels_selected(spread["labelSelector"]) for spread in pod_spec()["topologySpreadConstraints"])
    target = the("HorizontalPodAutoscaler")["spec"]["scaleTargetRef"]
    assert (target["kind"], target["name"]) == ("Deployment", deployment["metadata"]["name"])


# -- sizes: serve.sizing -------------------------------------------------------------------------------


def test_the_sizing_annotation_describes_what_the_deployment_serves():
    args = sizing_args()
    # S and the largest batch are the committed repository's (a rendered copy at other values would
    # need its own sizes): the defaults, not overridden
    assert (args.size, args.max_batch_size) == (PREPROCESSING.size, SERVING.max_batch_size)
    assert args.largest_study_mib * sizing.MIB == SERVING.largest_study_bytes
    assert args.target == flag("model-config-name")
    # GPU preprocessing is what the CUDA pool flag is for
    assert args.gpu_preprocessing == ("cuda-memory-pool-byte-size" in flags())
    # the repository on the volume is written for the same target, device and instance count
    written = export_command(shlex.split(the("Deployment")["metadata"]["annotations"]["ct-triage/model-repository"]))
    assert written.target == args.target
    assert written.out == serve_arguments().repository
    assert written.preprocess_device == ("cuda" if args.gpu_preprocessing else "cpu")
    assert written.preprocess_instances == args.preprocess_instances


def test_dev_shm_is_a_memory_emptydir_of_the_size_serve_sizing_gives():
    volumes = {volume["name"]: volume for volume in pod_spec()["volumes"]}
    mounts = {mount["mountPath"]: mount["name"] for mount in container()["volumeMounts"]}
    shm = volumes[mounts["/dev/shm"]]["emptyDir"]
    assert shm["medium"] == "Memory"
    expected = sizing.mib(sizing.shm_bytes(deployment_sizing()))
    assert mebibytes(shm["sizeLimit"]) == expected == sizing_cli()["shm_mib"]
    # memory-backed: its pages count against the container's memory limit, which must hold them and more
    limits = container()["resources"]["limits"]
    assert mebibytes(limits["memory"]) >= 2 * expected
    # the Python backend's regions are the ones serve.sizing counts
    backend = flags()["backend-config"]
    assert f"python,shm-default-byte-size={SERVING.shm_default_byte_size}" in backend
    assert f"python,shm-growth-byte-size={SERVING.shm_growth_byte_size}" in backend


def test_the_sizing_command_prints_its_json_and_nothing_else():
    done = run_module("serve.sizing", *shlex.split(the("Deployment")["metadata"]["annotations"]["ct-triage/serve-sizing"]), timeout=60)
    assert done.returncode == 0 and done.stderr == "" and json.loads(done.stdout) == sizing_cli()  # no runpy warning


def test_the_cuda_memory_pool_is_serve_sizing_for_gpu_preprocessing():
    deployment = deployment_sizing()
    assert deployment.preprocess_on_gpu
    gpu, size = flag("cuda-memory-pool-byte-size").split(":")
    assert gpu == "0"  # the pod's one GPU
    assert int(size) == sizing.cuda_pool_bytes(deployment)
    assert sizing.mib(int(size)) == sizing_cli()["cuda_memory_pool_mib"]


def test_the_cuda_memory_pool_holds_every_volume_the_served_queues_can_hold():
    """A GPU volume stays in the pool while it waits in ct_classifier's or ct_explain's queue (a pool too
    small fails studies under load): the size follows the queue lengths the served configs really have."""
    from export import parse_config

    def queue(path: Path) -> int:
        return parse_config(path.read_text(), str(path)).dynamic_batching.default_queue_policy.max_queue_size

    deployment = deployment_sizing()
    classifier = queue(REPOSITORY / NAMES.classifier / "configs" / f"{sizing_args().target}.pbtxt")
    explain = queue(REPOSITORY / NAMES.explain / "config.pbtxt")
    # handed over by each ct_preprocess instance, queued and batched at the classifier, queued, running
    # and on its way to the answer at ct_explain
    volumes = deployment.preprocess_instances + classifier + deployment.max_batch_size + explain + 2 * deployment.explain_instances
    assert sizing.cuda_pool_bytes(deployment) == volumes * deployment.volume_bytes == 24 * 64 * sizing.MIB
    # a benchmark that never has more studies in the server needs no more than their volumes
    assert sizing.cuda_pool_bytes(deployment, in_flight=16) == 16 * deployment.volume_bytes
    assert sizing.cuda_pool_bytes(deployment, in_flight=1000) == sizing.cuda_pool_bytes(deployment)


def test_the_launcher_sizes_the_cuda_pool_from_the_configs_it_serves(tmp_path):
    """`python -m serve` on a repository rendered with ct_preprocess on the GPU: the same pool as the
    deployment above (with Triton's default 64 MiB one volume at S=256 filled it), smaller when the
    explanation models are not loaded, and none asked for while preprocessing stays on the CPU."""
    from export import parse_config
    from serve import TritonServer

    repository = tmp_path / "repository"
    shutil.copytree(REPOSITORY, repository, ignore=shutil.ignore_patterns("1"))  # the configs are what is read
    target = sizing_args().target
    launched = TritonServer(repository, model_config_name=target).command(tmp_path)
    assert not any(flag.startswith("--cuda-memory-pool-byte-size") for flag in launched)

    config_path = repository / NAMES.preprocess / "config.pbtxt"
    config = parse_config(config_path.read_text(), str(config_path))
    config.parameters["device"].string_value = "cuda"  # as export --preprocess-device cuda renders it
    config_path.write_text(text_format.MessageToString(config))
    launched = TritonServer(repository, model_config_name=target).command(tmp_path)
    assert f"--cuda-memory-pool-byte-size=0:{sizing.cuda_pool_bytes(deployment_sizing())}" in launched
    assert sizing.served_deployment(repository, target) == deployment_sizing()

    without_explanations = sizing.served_deployment(repository, target, models=[NAMES.triage])
    assert without_explanations.explain_instances == 0 and without_explanations.preprocess_instances == 2
    launched = TritonServer(repository, model_config_name=target, models=[NAMES.triage]).command(tmp_path)
    assert f"--cuda-memory-pool-byte-size=0:{sizing.cuda_pool_bytes(without_explanations)}" in launched
    assert sizing.cuda_pool_bytes(without_explanations) < sizing.cuda_pool_bytes(deployment_sizing())
    assert f"--cuda-memory-pool-byte-size=0:{2**30}" in TritonServer(repository, cuda_memory_pool_bytes=2**30).command(tmp_path)


def test_the_launcher_gives_the_dashboards_gpu_metrics_where_there_is_a_gpu(tmp_path, monkeypatch):
    """The deploy/README panels of GPU utilisation and memory read Triton's nv_gpu_*, which a server
    started with --allow-gpu-metrics=false (right where there is no GPU) never exports."""
    from serve import TritonServer, launcher

    repository = served_configs(tmp_path / "repository", "cuda", SERVING.preprocess_instances)
    monkeypatch.setattr(launcher, "NVIDIA_CONTROL_DEVICE", tmp_path / "nvidiactl")
    assert "--allow-gpu-metrics=false" in TritonServer(repository).command(tmp_path)
    (tmp_path / "nvidiactl").touch()
    assert not any("gpu-metrics" in argument for argument in TritonServer(repository).command(tmp_path))


# -- the server's flags, ports and probes ----------------------------------------------------------------


def test_flags_are_the_projects():
    parsed = flags()
    assert serve_arguments().load_model == ["*"] and flag("load-model") == "*"
    assert flag("model-control-mode") == "explicit"
    assert flag("strict-readiness") == "true"
    assert int(flag("exit-timeout-secs")) == SERVING.exit_timeout_s
    assert flag("grpc-infer-allocation-pool-size") == "0"  # as serve.launcher runs it: no request keeps a study's capacity
    assert len(parsed["backend-config"]) == len(set(parsed["backend-config"]))
    # the served repository is on the read-only volume, which is the model-repository PVC
    repository = Path(serve_arguments().repository)
    (mount,) = [mount for mount in container()["volumeMounts"] if Path(mount["mountPath"]) in repository.parents]
    assert mount["readOnly"] is True
    volume = next(volume for volume in pod_spec()["volumes"] if volume["name"] == mount["name"])
    claim = the("PersistentVolumeClaim")
    assert volume["persistentVolumeClaim"]["claimName"] == claim["metadata"]["name"]
    assert claim["spec"]["accessModes"] == ["ReadWriteMany"]  # the export pod fills it through this claim


def test_the_model_config_name_is_a_target_with_a_committed_config():
    name = flag("model-config-name")
    assert name in EXPORT_TARGETS.names
    assert (REPOSITORY / NAMES.classifier / "configs" / f"{name}.pbtxt").is_file()


def test_every_model_named_in_the_manifests_is_in_the_model_repository():
    text = "\n".join((K8S / name).read_text() for name in MANIFESTS)
    # model label matchers in PromQL (model="x", model=~"x|y"), and any bare ct_<word> name
    matchers = re.findall(r'model=~?"([^"]+)"', text)
    assert matchers, "the adapter rule selects models by name"
    named = {model for matcher in matchers for model in matcher.split("|")} | set(re.findall(r"\bct_[a-z]+\b", text))
    served = {path.parent.name for path in REPOSITORY.glob("*/config.pbtxt")}
    assert named <= served, named - served
    assert {NAMES.triage, NAMES.preprocess, NAMES.classifier} <= named


def test_ports_are_the_settings():
    ports = {port["name"]: port["containerPort"] for port in container()["ports"]}
    assert ports == {"http": SERVING.http_port, "grpc": SERVING.grpc_port, "metrics": SERVING.metrics_port}
    assert (int(flag("http-port")), int(flag("grpc-port")), int(flag("metrics-port"))) == (
        SERVING.http_port,
        SERVING.grpc_port,
        SERVING.metrics_port,
    )
    service = {port["name"]: (port["port"], port["targetPort"]) for port in the("Service")["spec"]["ports"]}
    assert service == {name: (number, name) for name, number in ports.items()}
    scrape = the("Deployment")["spec"]["template"]["metadata"]["annotations"]
    assert (scrape["prometheus.io/scrape"], int(scrape["prometheus.io/port"])) == ("true", SERVING.metrics_port)


def test_network_policy_opens_inference_to_all_and_metrics_to_monitoring_only():
    rules = the("NetworkPolicy")["spec"]["ingress"]
    opened = {port["port"]: rule.get("from") for rule in rules for port in rule["ports"]}
    assert set(opened) == {SERVING.http_port, SERVING.grpc_port, SERVING.metrics_port}
    assert opened[SERVING.http_port] is None and opened[SERVING.grpc_port] is None  # no `from`: any source
    (monitoring,) = opened[SERVING.metrics_port]
    assert monitoring == {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}


def test_probes_ask_triton_for_readiness_and_liveness_on_the_http_port():
    server = container()
    named_ports = {port["name"]: port["containerPort"] for port in server["ports"]}

    def probed(probe: str) -> tuple[str, int]:
        get = server[probe]["httpGet"]
        return get["path"], named_ports.get(get["port"], get["port"])

    assert probed("startupProbe") == ("/v2/health/ready", SERVING.http_port)
    assert probed("livenessProbe") == ("/v2/health/live", SERVING.http_port)
    startup = server["startupProbe"]
    # generous, and at least the launcher's own allowance for loading and warming up the models (its
    # default would give up on a GPU warm-up the probe still waits for)
    assert startup["periodSeconds"] * startup["failureThreshold"] >= serve_arguments().startup_timeout > SERVING.startup_timeout_s


def readiness_probe() -> tuple[str, list[str]]:
    """The readiness probe's `python3 -c SCRIPT MODEL...`: its script and the models it asks for."""
    command = container()["readinessProbe"]["exec"]["command"]
    assert command[:2] == ["python3", "-c"], command
    return command[2], command[3:]


def test_the_pod_is_ready_while_every_ensemble_it_loads_is():
    """The Service offers every ensemble the pod loads: ct_triage, and ct_triage_explain under --load-model=*.
    Not /v2/health/ready, which stays 200 when a model-control call unloads one of them or a step
    (tests/server/test_serving.py); with ct_triage alone probed, a pod whose explanations were unloaded
    stayed in the Service and failed every explanation sent to it."""
    loaded = serve_arguments().load_model
    ensembles = {path.parent.name for path in REPOSITORY.glob("*/config.pbtxt") if 'platform: "ensemble"' in path.read_text().splitlines()}
    assert ensembles == {NAMES.triage, NAMES.triage_explain}
    _, probed = readiness_probe()
    assert sorted(probed) == sorted(ensembles if loaded in (None, ["*"]) else loaded)


class _ModelsReady(http.server.BaseHTTPRequestHandler):
    """Triton's /v2/models/NAME/ready: 200 for the models in `ready`, 400 for the others."""

    ready: frozenset[str] = frozenset()

    def do_GET(self):
        model = self.path.removeprefix("/v2/models/").removesuffix("/ready")
        self.send_response(200 if model in self.ready else 400)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args):
        pass


def test_the_readiness_probe_fails_in_one_line_naming_the_model_not_ready():
    script, probed = readiness_probe()
    assert f"localhost:{SERVING.http_port}/" in script
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _ModelsReady)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    port = server.server_address[1]

    def probe(*ready: str) -> tuple[int, str]:
        _ModelsReady.ready = frozenset(ready)
        local = script.replace(f"localhost:{SERVING.http_port}/", f"127.0.0.1:{port}/")
        proxied = {**os.environ, "http_proxy": "http://127.0.0.1:1", "no_proxy": ""}  # a pod's proxy is not asked
        done = subprocess.run([sys.executable, "-c", local, *probed], capture_output=True, text=True, timeout=30, env=proxied)
        return done.returncode, done.stderr

    try:
        assert probe(NAMES.triage, NAMES.triage_explain) == (0, "")
        assert probe(NAMES.triage) == (1, f"{NAMES.triage_explain} is not ready: HTTP Error 400: Bad Request\n")
    finally:
        server.shutdown()
        server.server_close()
    code, error = probe(NAMES.triage, NAMES.triage_explain)  # nothing listening: a server not (yet) up
    assert code == 1 and error.startswith(f"{NAMES.triage} is not ready: <urlopen error [Errno 111]") and error.count("\n") == 1


def test_termination_outlasts_the_pre_stop_pause_and_the_exit_timeout():
    pause = container()["lifecycle"]["preStop"]["exec"]["command"]
    assert pause[0] == "sleep"
    # the launcher's stop: SIGTERM, Triton's exit timeout for in-flight studies and 15 s more, then SIGKILL
    assert pod_spec()["terminationGracePeriodSeconds"] > int(pause[1]) + int(flag("exit-timeout-secs")) + 15


# -- access and privileges -----------------------------------------------------------------------------


@pytest.mark.parametrize("option", ["http-restricted-api", "grpc-restricted-protocol"])
def test_admin_apis_need_the_key_from_a_secret(option):
    (value,) = flags()[option]
    apis, _, header = value.partition(":")
    key, _, secret = header.partition("=")
    restricted = set(apis.split(","))
    assert ADMIN_APIS <= restricted <= TRITON_APIS
    assert not restricted & OPEN_APIS  # probes and clients send no key
    assert re.fullmatch(r"[a-z0-9-]+", key), key  # a header (HTTP) and metadata key (gRPC): lower case
    assert secret == "test-key"  # the launcher's, from CT_TRIAGE_ADMIN_KEY
    assert not any(ADMIN.key_env in argument for argument in container()["args"])  # never on the command line
    (env,) = [env for env in container()["env"] if env["name"] == ADMIN.key_env]
    reference = env["valueFrom"]["secretKeyRef"]
    assert reference.get("optional") is not True  # no secret, no server: never an empty key
    example = the("Secret", reference["name"])
    assert reference["key"] in example["stringData"]


def test_the_server_runs_as_the_images_non_root_user_without_privileges():
    pod, server = pod_spec()["securityContext"], container()["securityContext"]
    assert pod["runAsNonRoot"] is True and server["runAsNonRoot"] is True
    assert pod["runAsUser"] == server["runAsUser"] == 1000
    assert server["allowPrivilegeEscalation"] is False
    assert server["capabilities"]["drop"] == ["ALL"]
    assert server["readOnlyRootFilesystem"] is True
    volumes = {volume["name"]: volume for volume in pod_spec()["volumes"]}
    (tmp,) = [mount for mount in container()["volumeMounts"] if mount["mountPath"] == "/tmp"]
    assert "emptyDir" in volumes[tmp["name"]]
    assert pod_spec()["automountServiceAccountToken"] is False


def test_one_gpu_per_pod_and_guaranteed_resources():
    resources = container()["resources"]
    assert resources["limits"]["nvidia.com/gpu"] == 1
    assert resources["requests"] == resources["limits"]  # Guaranteed QoS
    assert float(resources["limits"]["cpu"]) >= SERVING.preprocess_instances  # at least a core per preprocessing instance


# -- autoscaling ---------------------------------------------------------------------------------------


def adapter_rule() -> dict:
    (rule,) = yaml.safe_load(the("ConfigMap")["data"]["config.yaml"])["rules"]
    return rule


def test_the_hpa_scales_on_the_metric_the_adapter_rule_serves():
    spec = the("HorizontalPodAutoscaler")["spec"]
    (metric,) = spec["metrics"]
    assert metric["type"] == "Pods"
    rule = adapter_rule()
    assert metric["pods"]["metric"]["name"] == rule["name"]["as"]
    assert metric["pods"]["target"]["type"] == "AverageValue"
    assert 2 <= spec["minReplicas"] < spec["maxReplicas"]
    assert spec["behavior"]["scaleDown"]["stabilizationWindowSeconds"] >= 300
    # the PDB lets at most one of the minimum go
    assert the("PodDisruptionBudget")["spec"]["maxUnavailable"] < spec["minReplicas"]


def test_the_adapter_rule_is_queue_time_per_request_per_pod():
    rule = adapter_rule()
    assert rule["resources"]["overrides"] == {"namespace": {"resource": "namespace"}, "pod": {"resource": "pod"}}
    series = re.match(r"[a-z_]+", rule["seriesQuery"].strip("'\""))[0]
    assert re.search(rule["name"]["matches"], series)
    query = rule["metricsQuery"]
    queue = re.search(r"rate\(nv_inference_queue_duration_us\{[^}]*<<\.LabelMatchers>>\}\[1m\]\)", query)
    success = re.search(r"rate\(nv_inference_request_success\{[^}]*<<\.LabelMatchers>>\}\[1m\]\)", query)
    assert queue and success and queue.start() < query.index("/") < success.start(), query
    assert query.count("by (<<.GroupBy>>)") == 2


# -- the export Job: what the Deployment serves, written into its volume -------------------------------


def test_the_export_job_runs_the_annotations_export_with_a_checkpoint_from_the_volume():
    export = job_container("export")
    assert "command" not in export  # the image's entrypoint execs the args, as in the Deployment
    run = export_command([expanded(argument, export) for argument in export["args"]])
    annotated = export_command(shlex.split(the("Deployment")["metadata"]["annotations"]["ct-triage/model-repository"]))
    assert {**vars(run), "checkpoint": None} == {**vars(annotated), "checkpoint": None}  # all but the checkpoint's path
    assert not run.demo_weights
    assert run.out == serve_arguments().repository
    assert run.target in EXPORT_TARGETS.names
    # the checkpoint is a file on the Job's volume, the one the init container waits for
    checkpoint = Path(run.checkpoint)
    mounts = {Path(mount["mountPath"]): mount for mount in export["volumeMounts"]}
    assert any(path in checkpoint.parents for path in mounts), f"{checkpoint} is on no volume of the Job"
    waiting = job_container("checkpoint")
    script = " ".join(waiting["args"])
    waited = {env["name"]: env["value"] for env in waiting["env"]}
    assert f'until [ -s "{checkpoint.parent}/$CHECKPOINT_FILE" ]' in script  # bash expands it from the env
    assert waited["CHECKPOINT_FILE"] == checkpoint.name


def test_the_export_job_writes_the_claim_the_deployment_reads():
    claim = the("PersistentVolumeClaim")["metadata"]["name"]
    served = next(volume for volume in pod_spec()["volumes"] if volume["name"] == "models")
    (written,) = [volume for volume in job_pod_spec()["volumes"] if "persistentVolumeClaim" in volume]
    assert written["persistentVolumeClaim"]["claimName"] == served["persistentVolumeClaim"]["claimName"] == claim
    assert written["persistentVolumeClaim"].get("readOnly") is not True
    for name in ("checkpoint", "export"):
        (mount,) = [mount for mount in job_container(name)["volumeMounts"] if mount["name"] == written["name"]]
        assert mount.get("readOnly") is not True and mount["mountPath"] == "/models"
    # the repository's folder on the volume is the one the Deployment serves
    run = export_command([expanded(argument, job_container("export")) for argument in job_container("export")["args"]])
    assert Path(mount["mountPath"]) in Path(run.out).parents


def test_the_export_job_runs_the_serving_image_as_its_user():
    (kustomization,) = documents("kustomization.yaml")
    (image,) = kustomization["images"]
    # applied on its own, so kustomize does not rewrite it: the tag must be set here as there
    for name in ("checkpoint", "export"):
        assert job_container(name)["image"] == container()["image"] == f"{image['newName']}:{image['newTag']}"
    pod, serving = job_pod_spec()["securityContext"], pod_spec()["securityContext"]
    assert pod["runAsNonRoot"] is True
    assert (pod["runAsUser"], pod["runAsGroup"]) == (serving["runAsUser"], serving["runAsGroup"]) == (1000, 1000)
    assert pod["fsGroup"] == serving["runAsGroup"]  # the volume writable by the image's group
    for name in ("checkpoint", "export"):
        context = job_container(name)["securityContext"]
        assert context["runAsUser"] == 1000 and context["runAsNonRoot"] is True
        assert context["allowPrivilegeEscalation"] is False and context["readOnlyRootFilesystem"] is True
        assert context["capabilities"]["drop"] == ["ALL"]
    assert job_pod_spec()["automountServiceAccountToken"] is False
    volumes = {volume["name"]: volume for volume in job_pod_spec()["volumes"]}
    (tmp,) = [mount for mount in job_container("export")["volumeMounts"] if mount["mountPath"] == "/tmp"]
    assert "emptyDir" in volumes[tmp["name"]]


def test_the_export_job_has_the_gpu_its_target_proves_parity_on_and_runs_once():
    export = job_container("export")
    run = export_command([expanded(argument, export) for argument in export["args"]])
    resources = export["resources"]
    assert resources["requests"] == resources["limits"]
    # torch-gpu proves its FP16 engine only on a GPU; tensorrt builds its engine there; cpu needs none
    assert resources["limits"].get("nvidia.com/gpu", 0) == (0 if run.target in ("cpu", "openvino") else 1)
    job = the("Job")["spec"]
    assert job["template"]["spec"]["restartPolicy"] == "Never" and job["backoffLimit"] == 0
    assert job["activeDeadlineSeconds"] > 0


def test_the_export_pod_is_no_serving_pod():
    labels = the("Job")["spec"]["template"]["metadata"]["labels"]
    for selector in (
        the("Deployment")["spec"]["selector"],
        {"matchLabels": the("Service")["spec"]["selector"]},
        the("PodDisruptionBudget")["spec"]["selector"],
        the("NetworkPolicy")["spec"]["podSelector"],
    ):
        assert not pod_labels_selected(selector, labels), selector
