"""Offline checks of cluster/: Ray's own schema for the launcher YAML, a vendored KubeRay CRD subset for
the KubeRay manifests, and the cross-file facts a deployment silently depends on (commands that parse,
GPUs that exist, one shared path everywhere). Nothing here talks to a cloud or a Kubernetes API.
"""
from __future__ import annotations

import copy
import json
import re
import shlex
import sys
from pathlib import Path

import jsonschema
import pytest
import yaml
from referencing import Registry, Resource

from byol_ray.cli import build_parser
from byol_ray.config import PRESETS_DIR, ConfigError, load_config

REPO = Path(__file__).resolve().parents[1]
CLUSTER = REPO / "cluster"
AWS_YAML = CLUSTER / "aws-gpu.yaml"
KUBERAY = CLUSTER / "kuberay"
SCHEMAS = Path(__file__).parent / "schemas" / "kuberay"
DOCS = REPO / "docs" / "cluster.md"

SHARED = "/mnt/shared"  # the one path every node sees the same storage at
GPU_KEY = "nvidia.com/gpu"


def _load(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


def _errors(validator: jsonschema.Validator, doc: dict) -> list[str]:
    return [f"{'/'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}" for e in validator.iter_errors(doc)]


def _installed_ray_version() -> str:
    from importlib.metadata import version

    return version("ray")


# ----------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def aws() -> dict:
    return _load(AWS_YAML)


@pytest.fixture(scope="module")
def ray_validator() -> jsonschema.Validator:
    import ray.autoscaler

    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    return jsonschema.validators.validator_for(schema)(schema)  # what jsonschema.validate in `ray up` picks


@pytest.fixture(scope="module")
def kuberay_validators() -> dict[str, jsonschema.Validator]:
    docs = {p.name: json.loads(p.read_text()) for p in SCHEMAS.glob("*.schema.json")}
    registry = Registry().with_resources([(d["$id"], Resource.from_contents(d)) for d in docs.values()])
    out = {}
    for kind, name in (("RayCluster", "raycluster.schema.json"), ("RayJob", "rayjob.schema.json")):
        jsonschema.Draft202012Validator.check_schema(docs[name])
        out[kind] = jsonschema.Draft202012Validator(docs[name], registry=registry)
    return out


@pytest.fixture(scope="module")
def raycluster() -> dict:
    return _load(KUBERAY / "raycluster.yaml")


@pytest.fixture(scope="module")
def rayjob() -> dict:
    return _load(KUBERAY / "rayjob.yaml")


@pytest.fixture(scope="module")
def pvc() -> dict:
    return _load(KUBERAY / "pvc.yaml")


# ----------------------------------------------------------------------------- byol-ray commands


def parse_cli_command(command: str):
    """Parse a ``byol-ray <subcommand> ...`` line with the real CLI parser."""
    argv = shlex.split(command)
    assert argv[0] == "byol-ray", f"not a byol-ray command: {command!r}"
    return build_parser().parse_args(argv[1:])


def config_sources(args) -> list[str]:
    """Map ``--config`` values to loadable files: preset names, or staged copies of a preset on shared storage."""
    out = []
    for source in args.config or ["demo"]:
        path = Path(source)
        if not path.suffix and (PRESETS_DIR / f"{source}.yaml").exists():
            out.append(source)
        elif str(path).startswith(SHARED + "/") and (PRESETS_DIR / path.name).exists():
            out.append(str(PRESETS_DIR / path.name))  # the docs stage the packaged preset there
        else:
            raise AssertionError(f"--config {source!r} is neither a preset nor a staged copy of one under {SHARED}")
    return out


def resolve_command(command: str):
    """The config a command would run with: its own sources for a new run; for --resume, CLI defaults."""
    args = parse_cli_command(command)
    assert args.command == "train", command
    load_config(["demo"], args.overrides)  # every override key exists and type-checks
    return args, load_config(config_sources(args), args.overrides)


def doc_commands(markdown: str, subcommand: str) -> list[str]:
    """``byol-ray <subcommand> ...`` lines in the fenced shell blocks, with backslash continuations joined."""
    out = []
    for block in re.findall(r"```(?:bash|sh)\n(.*?)```", markdown, flags=re.S):
        for line in block.replace("\\\n", " ").splitlines():
            at = line.find(f"byol-ray {subcommand}")
            if at >= 0:
                out.append(" ".join(line[at:].split()))
    return out


# ----------------------------------------------------------------------------- AWS: Ray's own schema


def test_aws_config_matches_the_schema_ray_ships(aws, ray_validator):
    assert _errors(ray_validator, aws) == []


def test_aws_config_survives_ray_ups_own_preparation(aws):
    """`ray up` runs prepare_config (defaults merge) then validate_config before touching AWS."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    prepared = prepare_config(copy.deepcopy(aws))
    validate_config(prepared)
    assert prepared["head_node_type"] in prepared["available_node_types"]


AWS_MUTATIONS = {
    "typo'd top-level key": lambda c: c.update(setup_command=c.pop("setup_commands")),
    "min_workers as a string": lambda c: c["available_node_types"]["ray.worker.gpu"].update(min_workers="2"),
    "unknown docker key": lambda c: c["docker"].update(imagee=c["docker"]["image"]),
    "node type without resources": lambda c: c["available_node_types"]["ray.worker.gpu"].pop("resources"),
    "fractional GPU resource": lambda c: c["available_node_types"]["ray.worker.gpu"]["resources"].update(GPU=0.5),
    "command list holding a mapping": lambda c: c["setup_commands"].append({"run": "pip install x"}),
}


@pytest.mark.parametrize("mutation", list(AWS_MUTATIONS), ids=list(AWS_MUTATIONS))
def test_aws_schema_rejects_a_broken_config(aws, ray_validator, mutation):
    broken = copy.deepcopy(aws)
    AWS_MUTATIONS[mutation](broken)
    assert _errors(ray_validator, broken), f"Ray's schema accepted: {mutation}"


@pytest.mark.parametrize("mutation", ["head type missing", "min_workers above max_workers"])
def test_aws_semantic_checks_reject_a_broken_config(aws, mutation):
    from ray.autoscaler._private.util import prepare_config, validate_config

    broken = copy.deepcopy(aws)
    if mutation == "head type missing":
        broken["head_node_type"] = "ray.head.typo"
    else:
        broken["available_node_types"]["ray.worker.gpu"]["min_workers"] = broken["max_workers"] + 1
    with pytest.raises((ValueError, KeyError, AssertionError)):
        validate_config(prepare_config(broken))


# ----------------------------------------------------------------------------- AWS: cross-file facts


def aws_problems(cfg: dict) -> list[str]:
    problems = []
    image = cfg["docker"]["image"]
    ray_version = _installed_ray_version()
    if f":{ray_version}-" not in image:
        problems.append(f"docker image {image} is not Ray {ray_version} (the version pyproject.toml pins)")
    region = cfg["provider"]["region"]
    if not cfg["provider"].get("availability_zone", region).startswith(region):
        problems.append("availability_zone is outside provider.region")

    init = " ".join(cfg.get("initialization_commands", []))
    efs = re.search(r"(fs-[0-9a-f]+)\.efs\.([a-z0-9-]+)\.amazonaws\.com:/ +([^\s)]+)", init)
    if not efs:
        problems.append("no EFS mount in initialization_commands")
    else:
        if efs.group(2) != region:
            problems.append(f"EFS is in {efs.group(2)} but the cluster in {region}")
        if efs.group(3) != SHARED:
            problems.append(f"EFS is mounted at {efs.group(3)}, not {SHARED}")
    if f"-v {SHARED}:{SHARED}" not in cfg["docker"].get("run_options", []):
        problems.append(f"{SHARED} is not bind-mounted into the container")

    setup = " ".join(cfg.get("setup_commands", []))
    for pkg in ffcv_system_packages():
        if pkg not in setup.split():
            problems.append(f"setup_commands do not install {pkg} (FFCV builds against it)")
    repo_mounts = [remote for remote, local in cfg.get("file_mounts", {}).items() if local in (".", "./")]
    if not any(f"pip install -q {remote}" in setup or f"pip install {remote}" in setup for remote in repo_mounts):
        problems.append("setup_commands do not pip-install the checkout that file_mounts copies")
    if "--env RAY_AUTH_MODE=token" not in cfg["docker"].get("run_options", []):
        problems.append("token auth (RAY_AUTH_MODE=token) is not set on the nodes")
    if "/home/ray/.ray/auth_token" not in cfg.get("file_mounts", {}):
        problems.append("the auth token is not copied to the nodes")
    if cfg["available_node_types"][cfg["head_node_type"]]["resources"].get("CPU") != 0:
        problems.append("the head advertises CPUs, so training workers could land on it")
    return problems


def ffcv_system_packages() -> list[str]:
    """The apt packages scripts/setup.sh installs for FFCV: the cluster must install the same ones."""
    match = re.search(r"for pkg in ([^;]+);", (REPO / "scripts" / "setup.sh").read_text())
    assert match, "scripts/setup.sh no longer lists FFCV's system packages in a `for pkg in ...` loop"
    return match.group(1).split()


def aws_capacity_problems(cfg: dict, ray_cfg) -> list[str]:
    """What is up when `ray up` returns: byol-ray checks it before starting workers (no autoscaling wait)."""
    gpus = cpus = 0
    problems = []
    for name, node in cfg["available_node_types"].items():
        res = node["resources"]
        n = node.get("min_workers", 0) if name != cfg["head_node_type"] else 1
        gpus += n * res.get("GPU", 0)
        cpus += n * res.get("CPU", 0)
        if res.get("GPU", 0) * ray_cfg.cpus_per_worker > res.get("CPU", 0):
            problems.append(f"{name}: {res.get('GPU')} GPU workers x {ray_cfg.cpus_per_worker} CPUs "
                            f"exceed its {res.get('CPU')} CPUs")
    if ray_cfg.use_gpu and gpus < ray_cfg.num_workers:
        problems.append(f"min_workers give {gpus} GPUs at start, ray.num_workers={ray_cfg.num_workers}")
    if cpus < ray_cfg.num_workers * ray_cfg.cpus_per_worker:
        problems.append(f"min_workers give {cpus} CPUs, the run needs {ray_cfg.num_workers * ray_cfg.cpus_per_worker}")
    return problems


def test_aws_cross_file_facts_hold(aws):
    assert aws_problems(aws) == []


def test_aws_image_matches_pyproject_ray_pin(aws):
    from packaging.requirements import Requirement

    deps = [Requirement(d) for d in _pyproject()["project"]["dependencies"]]
    ray_req = next(r for r in deps if r.name == "ray")
    tag = aws["docker"]["image"].split(":")[1]
    assert ray_req.specifier.contains(tag.split("-")[0]), f"{tag} is outside pyproject's {ray_req}"
    assert f"-py{sys.version_info.major}{sys.version_info.minor}-" in f"{tag}-", "image Python != project Python"


AWS_CROSS_MUTATIONS = {
    "EFS in another region": lambda c: c.update(initialization_commands=[
        s.replace(".us-west-2.", ".eu-west-1.") for s in c["initialization_commands"]]),
    "EFS mounted elsewhere": lambda c: c.update(initialization_commands=[
        s.replace(":/ /mnt/shared", ":/ /mnt/efs") for s in c["initialization_commands"]]),
    "shared dir not in container": lambda c: c["docker"]["run_options"].remove("-v /mnt/shared:/mnt/shared"),
    "FFCV package dropped": lambda c: c.update(setup_commands=[
        s.replace("libturbojpeg0-dev", "") for s in c["setup_commands"]]),
    "other Ray in the image": lambda c: c["docker"].update(image="rayproject/ray:2.59.0-py311-gpu"),
}


@pytest.mark.parametrize("mutation", list(AWS_CROSS_MUTATIONS), ids=list(AWS_CROSS_MUTATIONS))
def test_aws_cross_file_checks_catch_breakage(aws, mutation):
    broken = copy.deepcopy(aws)
    AWS_CROSS_MUTATIONS[mutation](broken)
    assert aws_problems(broken), f"not caught: {mutation}"


# ----------------------------------------------------------------------------- KubeRay: vendored CRD subset


def test_kuberay_manifests_match_the_crd_subset(kuberay_validators, raycluster, rayjob):
    assert _errors(kuberay_validators["RayCluster"], raycluster) == []
    assert _errors(kuberay_validators["RayJob"], rayjob) == []


def _worker(spec: dict) -> dict:
    return spec["workerGroupSpecs"][0]


def _cluster_spec(doc: dict) -> dict:
    return doc["spec"]["rayClusterSpec"] if doc["kind"] == "RayJob" else doc["spec"]


KUBERAY_MUTATIONS = {
    "typo'd worker key": lambda d: _worker(_cluster_spec(d)).update(minReplica=2),
    "replicas as a string": lambda d: _worker(_cluster_spec(d)).update(replicas="2"),
    "rayStartParams value not a string": lambda d: _cluster_spec(d)["headGroupSpec"]["rayStartParams"].update(
        {"num-cpus": 0}),
    "container without image": lambda d: _worker(_cluster_spec(d))["template"]["spec"]["containers"][0].pop("image"),
    "malformed GPU quantity": lambda d: _worker(_cluster_spec(d))["template"]["spec"]["containers"][0]["resources"][
        "limits"].update({GPU_KEY: "8 GPUs"}),
    "volumeMount without mountPath": lambda d: _worker(_cluster_spec(d))["template"]["spec"]["containers"][0][
        "volumeMounts"][0].pop("mountPath"),
    "typo'd container key": lambda d: _worker(_cluster_spec(d))["template"]["spec"]["containers"][0].update(
        resource={}),
    "head group without template": lambda d: _cluster_spec(d)["headGroupSpec"].pop("template"),
    "old apiVersion": lambda d: d.update(apiVersion="ray.io/v1alpha1"),
    "unknown autoscaling flag": lambda d: _cluster_spec(d).update(enableAutoscaling=True),
}
RAYJOB_MUTATIONS = {
    "camel-case typo in entrypoint key": lambda d: d["spec"].update(entryPoint=d["spec"].pop("entrypoint")),
    "misspelt submissionMode": lambda d: d["spec"].update(submissionMode="K8sJob"),
    "shutdownAfterJobFinishes as a string": lambda d: d["spec"].update(shutdownAfterJobFinishes="true"),
    "ttl as a string": lambda d: d["spec"].update(ttlSecondsAfterFinished="600"),
    "runtime env as a mapping": lambda d: d["spec"].update(runtimeEnvYAML={"pip": ["x"]}),
}


@pytest.mark.parametrize("kind", ["RayCluster", "RayJob"])
@pytest.mark.parametrize("mutation", list(KUBERAY_MUTATIONS), ids=list(KUBERAY_MUTATIONS))
def test_kuberay_schema_rejects_broken_manifests(kuberay_validators, raycluster, rayjob, kind, mutation):
    broken = copy.deepcopy(raycluster if kind == "RayCluster" else rayjob)
    KUBERAY_MUTATIONS[mutation](broken)
    assert _errors(kuberay_validators[kind], broken), f"schema accepted: {mutation}"


@pytest.mark.parametrize("mutation", list(RAYJOB_MUTATIONS), ids=list(RAYJOB_MUTATIONS))
def test_rayjob_schema_rejects_broken_job_fields(kuberay_validators, rayjob, mutation):
    broken = copy.deepcopy(rayjob)
    RAYJOB_MUTATIONS[mutation](broken)
    assert _errors(kuberay_validators["RayJob"], broken), f"schema accepted: {mutation}"


# ----------------------------------------------------------------------------- KubeRay: cross-file facts


def _groups(spec: dict) -> list[tuple[str, dict]]:
    return [("head", spec["headGroupSpec"])] + [(w["groupName"], w) for w in spec.get("workerGroupSpecs", [])]


def _ray_container(group: dict) -> dict:
    return group["template"]["spec"]["containers"][0]  # KubeRay's Ray container is the first one


def shared_volume_problems(spec: dict, claim_name: str) -> list[str]:
    """Every head and worker pod mounts the one shared PVC at the same path."""
    problems = []
    for name, group in _groups(spec):
        volumes = {v["name"]: v for v in group["template"]["spec"].get("volumes", [])}
        shared = [n for n, v in volumes.items() if v.get("persistentVolumeClaim", {}).get("claimName") == claim_name]
        if not shared:
            problems.append(f"{name}: no volume from PVC {claim_name!r}")
            continue
        mounts = [m["mountPath"] for m in _ray_container(group).get("volumeMounts", []) if m["name"] in shared]
        if mounts != [SHARED]:
            problems.append(f"{name}: PVC {claim_name!r} mounted at {mounts}, not [{SHARED!r}]")
    return problems


def _quantity(value) -> float:
    text = str(value)
    units = {"m": 1e-3, "": 1, "k": 1e3, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40}
    number, unit = re.fullmatch(r"([0-9.]+)([a-zA-Z]*)", text).groups()
    return float(number) * units[unit]


def gpu_capacity_problems(spec: dict, ray_cfg) -> list[str]:
    """GPU workers exist at start, hold their CPUs, and cover ray.num_workers (byol-ray checks before launching)."""
    problems = []
    if GPU_KEY in _ray_container(spec["headGroupSpec"]).get("resources", {}).get("limits", {}):
        problems.append("the head requests GPUs; training runs on the worker group")
    gpus = 0
    for name, group in _groups(spec)[1:]:
        limits = _ray_container(group).get("resources", {}).get("limits", {})
        per_pod = int(_quantity(limits.get(GPU_KEY, 0)))
        if per_pod < 1:
            problems.append(f"{name}: no {GPU_KEY} limit")
            continue
        requests = _ray_container(group).get("resources", {}).get("requests", {})
        if GPU_KEY in requests and _quantity(requests[GPU_KEY]) != per_pod:
            problems.append(f"{name}: {GPU_KEY} request differs from its limit")
        cpu = _quantity(limits.get("cpu", 0))
        if per_pod * ray_cfg.cpus_per_worker > cpu:
            problems.append(f"{name}: {per_pod} workers x {ray_cfg.cpus_per_worker} CPUs exceed the pod's {cpu:g}")
        pods = max(group["minReplicas"], group.get("replicas", group["minReplicas"]))
        gpus += pods * group.get("numOfHosts", 1) * per_pod
    if ray_cfg.use_gpu and gpus < ray_cfg.num_workers:
        problems.append(f"worker groups start with {gpus} GPUs, ray.num_workers={ray_cfg.num_workers}")
    if not ray_cfg.use_gpu:
        problems.append("the run does not use the GPUs (ray.use_gpu=false)")
    return problems


def image_problems(spec: dict) -> list[str]:
    ray_version = _installed_ray_version()
    images = {_ray_container(g)["image"] for _, g in _groups(spec)}
    problems = [] if len(images) == 1 else [f"head and workers run different images: {sorted(images)}"]
    problems += [f"image {i} is not Ray {ray_version}" for i in images if f":{ray_version}-" not in i]
    if spec.get("rayVersion") != ray_version:
        problems.append(f"rayVersion {spec.get('rayVersion')!r} != Ray {ray_version}")
    return problems


def entrypoint_problems(job: dict) -> list[str]:
    entrypoint = job["spec"].get("entrypoint", "")
    if not entrypoint.startswith("byol-ray train "):
        return [f"entrypoint does not start with 'byol-ray train': {entrypoint!r}"]
    try:
        args, cfg = resolve_command(entrypoint)
    except (AssertionError, ConfigError, SystemExit) as exc:
        return [f"entrypoint does not resolve: {exc}"]
    problems = [] if args.config else ["entrypoint has no --config"]
    for key, value in (("data.train", cfg.data.train), ("ray.storage_path", cfg.ray.storage_path),
                       ("output_dir", cfg.output_dir)):
        if not value.startswith(SHARED + "/"):
            problems.append(f"{key}={value} is not on the shared volume {SHARED}")
    return problems


def test_rayjob_entrypoint_is_a_valid_byol_ray_command(rayjob):
    assert entrypoint_problems(rayjob) == []
    args, cfg = resolve_command(rayjob["spec"]["entrypoint"])
    assert args.config == ["/mnt/shared/configs/imagenet_resnet50_300ep.yaml"]
    assert cfg.ray.storage_path == "/mnt/shared/byol-ray"
    assert cfg.mlflow.tracking_uri == "http://mlflow.mlflow.svc:5000"


@pytest.mark.parametrize("edit", [
    ("ray.num_workers=16", "ray.num_worker=16"),                        # a key that does not exist
    ("ray.num_workers=16", "ray.num_workers=sixteen"),                  # a wrong type
    ("imagenet_resnet50_300ep.yaml", "imagenet_resnet50_30ep.yaml"),    # a config that is no preset
    ("byol-ray train", "byol-ray trian"),                               # not the train command
    ("ray.storage_path=/mnt/shared/byol-ray", "ray.storage_path=/tmp/byol-ray"),  # off the shared volume
])
def test_entrypoint_checks_catch_breakage(rayjob, edit):
    broken = copy.deepcopy(rayjob)
    broken["spec"]["entrypoint"] = broken["spec"]["entrypoint"].replace(*edit)
    assert broken["spec"]["entrypoint"] != rayjob["spec"]["entrypoint"]
    assert entrypoint_problems(broken), f"not caught: {edit}"


@pytest.mark.parametrize("which", ["RayCluster", "RayJob"])
def test_kuberay_pods_share_storage_gpus_and_image(raycluster, rayjob, pvc, which):
    spec = _cluster_spec(raycluster if which == "RayCluster" else rayjob)
    _, job_cfg = resolve_command(rayjob["spec"]["entrypoint"])
    assert shared_volume_problems(spec, pvc["metadata"]["name"]) == []
    assert gpu_capacity_problems(spec, job_cfg.ray) == []
    assert image_problems(spec) == []
    assert spec["enableInTreeAutoscaling"] is False, "byol-ray needs its GPUs up before the run starts"


def _first_worker_container(spec):
    return _ray_container(_worker(spec))


SHARED_CHECK = ("shared", lambda spec, claim, ray_cfg: shared_volume_problems(spec, claim))
GPU_CHECK = ("gpu", lambda spec, claim, ray_cfg: gpu_capacity_problems(spec, ray_cfg))
IMAGE_CHECK = ("image", lambda spec, claim, ray_cfg: image_problems(spec))

KUBERAY_CROSS_MUTATIONS = {
    "worker mounts elsewhere": (SHARED_CHECK, lambda s: _first_worker_container(s)["volumeMounts"][0].update(
        mountPath="/mnt/data")),
    "head uses another claim": (SHARED_CHECK, lambda s: s["headGroupSpec"]["template"]["spec"]["volumes"][0][
        "persistentVolumeClaim"].update(claimName="byol-shard")),
    "worker forgets the volume": (SHARED_CHECK, lambda s: _worker(s)["template"]["spec"].update(volumes=[])),
    "no GPU limit": (GPU_CHECK, lambda s: _first_worker_container(s)["resources"]["limits"].pop(GPU_KEY)),
    "too few GPUs": (GPU_CHECK, lambda s: _worker(s).update(replicas=1, minReplicas=1)),
    "too few CPUs per pod": (GPU_CHECK, lambda s: _first_worker_container(s)["resources"]["limits"].update(cpu="16")),
    "image skew": (IMAGE_CHECK, lambda s: _first_worker_container(s).update(image="rayproject/ray:2.59.0-py311-gpu")),
    "rayVersion skew": (IMAGE_CHECK, lambda s: s.update(rayVersion="2.59.0")),
}


@pytest.mark.parametrize("mutation", list(KUBERAY_CROSS_MUTATIONS), ids=list(KUBERAY_CROSS_MUTATIONS))
def test_kuberay_cross_file_checks_catch_breakage(raycluster, rayjob, pvc, mutation):
    (_, check), mutate = KUBERAY_CROSS_MUTATIONS[mutation]
    spec = copy.deepcopy(raycluster["spec"])
    _, job_cfg = resolve_command(rayjob["spec"]["entrypoint"])
    assert check(spec, pvc["metadata"]["name"], job_cfg.ray) == []  # the unmutated spec passes this check
    mutate(spec)
    assert check(spec, pvc["metadata"]["name"], job_cfg.ray), f"not caught: {mutation}"


def test_rayjob_cluster_is_the_raycluster(raycluster, rayjob):
    """One cluster shape: edit raycluster.yaml and rayjob.yaml's rayClusterSpec together."""
    assert rayjob["spec"]["rayClusterSpec"] == raycluster["spec"]


def runtime_env_problems(text: str) -> list[str]:
    from ray.runtime_env import RuntimeEnv

    env = yaml.safe_load(text)
    if not isinstance(env, dict):
        return ["runtimeEnvYAML is not a mapping"]
    problems = [f"unknown runtime_env field {k!r}" for k in env if k not in RuntimeEnv.known_fields]
    try:
        RuntimeEnv(**env)
    except (ValueError, TypeError) as exc:
        problems.append(f"Ray rejects the runtime env: {exc}")
    pip = env.get("pip", {})
    packages = pip.get("packages", []) if isinstance(pip, dict) else pip
    if not any(str(p).startswith(SHARED + "/") for p in packages):
        problems.append(f"pip does not install byol-ray from the shared volume {SHARED}")
    return problems


def test_rayjob_runtime_env_is_valid_for_ray(rayjob):
    assert runtime_env_problems(rayjob["spec"]["runtimeEnvYAML"]) == []
    assert rayjob["spec"]["shutdownAfterJobFinishes"] is True
    assert rayjob["spec"]["submissionMode"] == "K8sJobMode"


@pytest.mark.parametrize("text", [
    "pipp:\n  - /mnt/shared/src/byol-ray\n",                       # typo'd field: Ray would ignore it
    "pip:\n  packages: /mnt/shared/src/byol-ray\n",                 # a string, not a list
    "env_vars:\n  NCCL_DEBUG: 1\n",                                 # env values must be strings
    "- pip\n",                                                      # not a mapping
])
def test_runtime_env_checks_catch_breakage(text):
    assert runtime_env_problems(text)


def test_pvc_is_shared_read_write_many(pvc, raycluster):
    assert (pvc["apiVersion"], pvc["kind"]) == ("v1", "PersistentVolumeClaim")
    assert "ReadWriteMany" in pvc["spec"]["accessModes"], "many pods on many nodes write checkpoints here"
    storage = pvc["spec"]["resources"]["requests"]["storage"]
    assert re.fullmatch(r"[0-9]+(Ki|Mi|Gi|Ti|Pi)", storage), storage
    claims = {v["persistentVolumeClaim"]["claimName"] for _, g in _groups(raycluster["spec"])
              for v in g["template"]["spec"]["volumes"] if "persistentVolumeClaim" in v}
    assert claims == {pvc["metadata"]["name"]}


def test_aws_and_kuberay_run_the_same_image(aws, raycluster):
    assert {aws["docker"]["image"]} == {_ray_container(g)["image"] for _, g in _groups(raycluster["spec"])}


# ----------------------------------------------------------------------------- docs/cluster.md


def test_every_documented_train_command_resolves_and_fits_both_clusters(aws, raycluster):
    commands = doc_commands(DOCS.read_text(), "train")
    assert len(commands) >= 3, commands
    for command in commands:
        args, cfg = resolve_command(command)
        if args.resume:  # a resumed run reloads its saved config; only its overrides must load
            assert "output_dir=/mnt/shared/byol-ray/outputs" in args.overrides, command
            continue
        assert aws_capacity_problems(aws, cfg.ray) == [], command
        assert gpu_capacity_problems(raycluster["spec"], cfg.ray) == [], command
        assert cfg.ray.storage_path.startswith(SHARED + "/") and cfg.data.train.startswith(SHARED + "/"), command


def test_every_documented_prepare_command_parses():
    commands = doc_commands(DOCS.read_text(), "prepare")
    assert commands
    for command in commands:
        args = parse_cli_command(command)
        assert args.command == "prepare" and args.output.endswith(".beton") and args.max_resolution == 256


def test_docs_name_files_that_exist():
    text = DOCS.read_text()
    for path in re.findall(r"cluster/[\w/.-]+\.yaml", text):
        assert (REPO / path).is_file(), path


def test_aws_capacity_check_catches_too_few_nodes(aws):
    _, cfg = resolve_command("byol-ray train --config imagenet_resnet50_300ep ray.num_workers=32")
    assert aws_capacity_problems(aws, cfg.ray), "32 GPU workers cannot start on 2 x 8 GPUs"


def _pyproject() -> dict:
    import tomllib

    return tomllib.loads((REPO / "pyproject.toml").read_text())
