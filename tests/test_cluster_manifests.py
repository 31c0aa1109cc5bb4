"""Offline checks of cluster/ and the runtime image: Ray's own schema for the launcher YAML, a vendored KubeRay
CRD subset for the KubeRay manifests, small structural schemas for the core Kubernetes kinds (the MLflow
Deployment/Service, the staging Job), and the cross-file facts a deployment silently depends on: one pinned
image everywhere, built FROM the Ray and Python the tests run, installed by scripts/setup.sh with the lock the
tests pass in, nothing installed at node or job start, commands that parse, GPUs that exist, one shared path and
one tracking server everywhere. Each check has a test that breaks it and sees it caught. Nothing here talks to a
cloud, a registry, a Docker daemon or a Kubernetes API.
"""
from __future__ import annotations

import configparser
import copy
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
from functools import lru_cache
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import jsonschema
import pytest
import yaml
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name
from referencing import Registry, Resource

from byol_ray.cli import build_parser
from byol_ray.config import PRESETS_DIR, ConfigError, load_config
from byol_ray.run_tags import IMAGE_COMMIT_ENV, IMAGE_DIRTY_ENV, IMAGE_ENV
from byol_ray.launch import check_outputs_outlive_job
from byol_ray.run_folder import storage_root

REPO = Path(__file__).resolve().parents[1]
CLUSTER = REPO / "cluster"
AWS_YAML = CLUSTER / "aws-gpu.yaml"
KUBERAY = CLUSTER / "kuberay"
SCHEMAS = Path(__file__).parent / "schemas"
DOCS = REPO / "docs" / "cluster.md"
DOCKERFILE = REPO / "Dockerfile"
DOCKERIGNORE = REPO / ".dockerignore"
LOCK = REPO / "requirements.lock"
SETUP = REPO / "scripts" / "setup.sh"
MAKEFILE = REPO / "Makefile"

SHARED = "/mnt/shared"  # the one path every node sees the same storage at
GPU_KEY = "nvidia.com/gpu"
TRACKING_ENV = "MLFLOW_TRACKING_URI"


def _load(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


def _errors(validator: jsonschema.Validator, doc: dict) -> list[str]:
    return [f"{'/'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}" for e in validator.iter_errors(doc)]


def _installed_ray_version() -> str:
    return version("ray")


def _pyproject() -> dict:
    import tomllib

    return tomllib.loads((REPO / "pyproject.toml").read_text())


def _under_shared(value: str) -> bool:
    return value.startswith(SHARED + "/")


PLACEHOLDER_TAG = "GIT_SHA"  # what the committed manifests carry until `make image`'s tag is put in (docs, step 1)


def image_repo() -> str:
    """The repository `make image` tags into (the Makefile's IMAGE_REPO)."""
    match = re.search(r"^IMAGE_REPO \?= (\S+)$", MAKEFILE.read_text(), flags=re.M)
    assert match, "Makefile no longer sets a default IMAGE_REPO ?= ..."
    return match.group(1)


def image_ref_problems(image: str) -> list[str]:
    """A runtime-image reference as `make image` writes it: the Makefile's repository, tagged with a commit (12 hex
    digits) or the manifests' placeholder; never a version tag, `latest` or a -dirty build."""
    repo, _, tag = image.rpartition(":")
    if "@sha256:" in image:
        repo, tag = image.split("@", 1)[0], PLACEHOLDER_TAG  # a digest pin is as good as a commit tag
    problems = []
    if repo != image_repo():
        problems.append(f"{image}: not the repository `make image` tags ({image_repo()})")
    if not re.fullmatch(rf"[0-9a-f]{{12}}|{PLACEHOLDER_TAG}", tag):
        problems.append(f"{image}: tag {tag!r} is not a commit tag from `make image` (12 hex digits, or {PLACEHOLDER_TAG})")
    return problems


def pinned_image() -> str:
    """The runtime image every node runs: the one aws-gpu.yaml names (every other manifest must name the same)."""
    image = _load(AWS_YAML)["docker"]["image"]
    assert image_ref_problems(image) == [], image_ref_problems(image)
    return image


# ----------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def aws() -> dict:
    return _load(AWS_YAML)


@pytest.fixture(scope="module")
def ray_validator() -> jsonschema.Validator:
    import ray.autoscaler

    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    return jsonschema.validators.validator_for(schema)(schema)  # what jsonschema.validate in `ray up` picks


def _schema_registry() -> tuple[dict, Registry]:
    docs = {f"{p.parent.name}/{p.name}": json.loads(p.read_text()) for p in SCHEMAS.glob("*/*.schema.json")}
    return docs, Registry().with_resources([(d["$id"], Resource.from_contents(d)) for d in docs.values()])


@pytest.fixture(scope="module")
def kuberay_validators() -> dict[str, jsonschema.Validator]:
    docs, registry = _schema_registry()
    out = {}
    for kind, name in (("RayCluster", "kuberay/raycluster.schema.json"), ("RayJob", "kuberay/rayjob.schema.json")):
        jsonschema.Draft202012Validator.check_schema(docs[name])
        out[kind] = jsonschema.Draft202012Validator(docs[name], registry=registry)
    return out


@pytest.fixture(scope="module")
def core_validators() -> dict[str, jsonschema.Validator]:
    """Structural subsets for the core kinds (tests/schemas/core/SOURCE.md), not the API server's schema."""
    docs, registry = _schema_registry()
    out = {}
    for kind in ("Deployment", "Service", "Job", "ConfigMap", "NetworkPolicy"):
        schema = docs[f"core/{kind.lower()}.schema.json"]
        jsonschema.Draft202012Validator.check_schema(schema)
        out[kind] = jsonschema.Draft202012Validator(schema, registry=registry)
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


def _by_kind(path: Path) -> dict[str, dict]:
    docs = [d for d in yaml.safe_load_all(path.read_text()) if d]
    out = {d["kind"]: d for d in docs}
    assert len(out) == len(docs), f"{path.name}: two documents of one kind"
    return out


@pytest.fixture(scope="module")
def mlflow_docs() -> dict[str, dict]:
    return _by_kind(KUBERAY / "mlflow.yaml")


@pytest.fixture(scope="module")
def stage() -> dict:
    return _load(KUBERAY / "stage.yaml")


@pytest.fixture(scope="module")
def dockerfile() -> str:
    return DOCKERFILE.read_text()


# ----------------------------------------------------------------------------- byol-ray commands


def parse_cli_command(command: str):
    """Parse a ``byol-ray <subcommand> ...`` line with the real CLI parser."""
    argv = shlex.split(command)
    assert argv[0] == "byol-ray", f"not a byol-ray command: {command!r}"
    return build_parser().parse_args(argv[1:])


def config_sources(args) -> list[str]:
    """Map ``--config`` values to loadable files: preset names (in the image), or staged copies of a preset."""
    out = []
    for source in args.config or ["demo"]:
        path = Path(source)
        if not path.suffix and (PRESETS_DIR / f"{source}.yaml").exists():
            out.append(source)
        elif _under_shared(str(path)) and (PRESETS_DIR / path.name).exists():
            out.append(str(PRESETS_DIR / path.name))  # a copy of the packaged preset on shared storage
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


def doc_shell_lines(markdown: str) -> list[str]:
    """Every line of the fenced shell blocks, backslash continuations joined."""
    return [" ".join(line.split()) for block in re.findall(r"```(?:bash|sh)\n(.*?)```", markdown, flags=re.S)
            for line in block.replace("\\\n", " ").splitlines() if line.strip()]


def output_problems(cfg, *, what: str) -> list[str]:
    """Outputs that outlive a `ray job submit` on a multi-node cluster: the rules byol-ray enforces, plus ours
    (data and every output on the shared volume, MLflow on a tracking server reached over HTTP)."""
    problems = []
    try:
        check_outputs_outlive_job(cfg, in_job=True, multi_node=True)
    except ConfigError as exc:
        problems.append(f"{what}: byol-ray would refuse it: {exc}")
    for key, value in (("data.train", cfg.data.train), ("output_dir", cfg.output_dir),
                       ("checkpoint root (ray.storage_path or output_dir)", storage_root(cfg))):
        if not (_under_shared(value) or re.match(r"(s3|gs)://[^/]+/.+", value)):  # or an object store (section 10)
            problems.append(f"{what}: {key}={value} is not on the shared volume {SHARED}")
    if not re.match(r"https?://", cfg.mlflow.tracking_uri):
        problems.append(f"{what}: mlflow.tracking_uri={cfg.mlflow.tracking_uri!r} is not a tracking server URL")
    return problems


# ----------------------------------------------------------------------------- nothing installed at start


FFCV_BUILD_PACKAGES = ("build-essential", "g++", "gcc")


def ffcv_system_packages() -> list[str]:
    """The apt packages scripts/setup.sh installs for FFCV (the image gets them by running setup.sh)."""
    match = re.search(r"for pkg in ([^;]+);", SETUP.read_text())
    assert match, "scripts/setup.sh no longer lists FFCV's system packages in a `for pkg in ...` loop"
    return match.group(1).split()


_ALLOWED_PIP = {"boto3"}  # Ray's AWS autoscaler dependency on the launcher's head, not byol-ray


def install_problems(command: str, where: str) -> list[str]:
    """An apt-get of FFCV's packages, or a pip/uv/conda install of anything but Ray's own boto3, at start."""
    problems = []
    for segment in re.split(r"&&|\|\||;|\||\n|\(|\)", command):
        words = segment.split()
        for i, word in enumerate(words):
            if word in ("apt-get", "apt") and "install" in words[i + 1:]:
                pkgs = [w for w in words[words.index("install", i) + 1:] if not w.startswith("-")]
                bad = [p for p in pkgs if p in ffcv_system_packages() or p in FFCV_BUILD_PACKAGES]
                if bad:
                    problems.append(f"{where}: installs FFCV's system packages at start: {' '.join(bad)}")
            if word in ("pip", "pip3", "conda", "mamba") or word.endswith("/pip") or word == "uv":
                rest = words[i + 1:]
                if rest[:1] == ["pip"]:  # uv pip install
                    rest = rest[1:]
                if rest[:1] == ["install"]:
                    targets = [w.strip("'\"") for w in rest[1:] if not w.startswith("-")]
                    names = [re.split(r"[<>=!~\[ ]", w, maxsplit=1)[0] for w in targets]
                    if "-e" in rest or "-r" in rest or any(n not in _ALLOWED_PIP for n in names):
                        problems.append(f"{where}: pip-installs at start: {' '.join(targets) or ' '.join(rest)}")
    return problems


def aws_commands(cfg: dict) -> dict[str, list[str]]:
    keys = ("initialization_commands", "setup_commands", "head_setup_commands", "worker_setup_commands",
            "head_start_ray_commands", "worker_start_ray_commands")
    return {k: [c for c in cfg.get(k, []) if isinstance(c, str)] for k in keys}


def _containers(pod_spec: dict) -> list[dict]:
    return pod_spec.get("initContainers", []) + pod_spec.get("containers", [])


def _container_command(container: dict) -> str:
    return " ".join(container.get("command", []) + container.get("args", []))


def runtime_env_problems(text: str | None) -> list[str]:
    """The RayJob needs no runtime env; if there is one, it must not build environments or ship code."""
    if text is None:
        return []
    from ray.runtime_env import RuntimeEnv

    env = yaml.safe_load(text)
    if not isinstance(env, dict):
        return ["runtimeEnvYAML is not a mapping"]
    problems = [f"unknown runtime_env field {k!r}" for k in env if k not in RuntimeEnv.known_fields]
    try:
        RuntimeEnv(**env)
    except (ValueError, TypeError) as exc:
        problems.append(f"Ray rejects the runtime env: {exc}")
    for field in ("pip", "uv", "conda", "py_modules", "working_dir", "py_executable", "image_uri", "container"):
        if field in env:
            problems.append(f"runtime env field {field!r}: Ray would build or ship code per job instead of "
                            f"running the image's byol-ray")
    return problems


# ----------------------------------------------------------------------------- the runtime image


def dockerfile_instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs: comments dropped, continuation lines joined."""
    lines = [line for line in text.splitlines() if not line.lstrip().startswith("#")]
    joined = re.sub(r"\\\n", " ", "\n".join(lines))
    out = []
    for line in joined.splitlines():
        if line.strip():
            instr, _, rest = line.strip().partition(" ")
            out.append((instr.upper(), " ".join(rest.split())))
    return out


def _dockerignore_allows(path: str, ignore_text: str) -> bool:
    """Docker's rule: the last matching pattern wins (a `!` pattern re-includes)."""
    import fnmatch

    allowed = True
    for raw in ignore_text.splitlines():
        pattern = raw.strip()
        if not pattern or pattern.startswith("#"):
            continue
        negate = pattern.startswith("!")
        pattern = pattern.lstrip("!").rstrip("/")
        if fnmatch.fnmatch(path, pattern) or path.startswith(pattern + "/"):
            allowed = negate
    return allowed


def dockerfile_stages(text: str) -> list[tuple[str, str, list[tuple[str, str]]]]:
    """(base image, stage name or '', instructions) per FROM."""
    stages: list[tuple[str, str, list]] = []
    for instr, args in dockerfile_instructions(text):
        if instr == "FROM":
            words = args.split()
            name = words[2] if len(words) >= 3 and words[1].upper() == "AS" else ""
            stages.append((words[0], name, []))
        elif stages:
            stages[-1][2].append((instr, args))
    return stages


def _copy_parts(args: str) -> tuple[dict[str, str], list[str], str]:
    flags = dict(f[2:].split("=", 1) for f in args.split() if f.startswith("--") and "=" in f)
    parts = [p for p in args.split() if not p.startswith("--")]
    return flags, parts[:-1], parts[-1]


def neutralise_with_stage(run_args: str, pyproject_text: str) -> str | None:
    """Run the `sed` of a Dockerfile RUN on pyproject text, as the build would; None when there is none."""
    segment = next((seg.strip() for seg in run_args.split("&&") if seg.strip().startswith("sed ")), None)
    if segment is None or shutil.which("sed") is None:
        return None
    tokens = shlex.split(segment.split(">", 1)[0])
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "pyproject.toml"
        path.write_text(pyproject_text)
        argv = [tokens[0]] + [t for t in tokens[1:-1]] + [str(path)]
        out = subprocess.run(argv, capture_output=True, text=True, timeout=10)
        if out.returncode != 0:
            return None
        return path.read_text() if "-i" in tokens else out.stdout


def lock_cuda(lock_text: str) -> str:
    """The CUDA (major.minor) the locked torch runs on: its +cuXYZ variant, else the CUDA runtime wheels it pins
    (cuda-toolkit, nvidia-cuda-runtime). Raises for a CPU-only torch: the GPU image needs a CUDA build."""
    pins = lock_entries(lock_text)
    torch_pin = pins.get("torch", "")
    local = torch_pin.partition("+")[2]
    if local == "cpu":
        raise AssertionError(f"the lock pins a CPU-only torch ({torch_pin}); the GPU image needs a CUDA build")
    if re.fullmatch(r"cu\d{3,}", local):
        return f"{local[2:-1]}.{local[-1]}"
    for name in ("cuda-toolkit", "nvidia-cuda-runtime", "nvidia-cuda-runtime-cu12", "nvidia-cuda-runtime-cu13"):
        if name in pins:
            return ".".join(pins[name].split(".")[:2])
    raise AssertionError("the lock pins no CUDA runtime for torch (cuda-toolkit / nvidia-cuda-runtime)")


def dockerfile_problems(text: str, ignore_text: str, lock_text: str | None = None) -> list[str]:
    problems = []
    stages = dockerfile_stages(text)
    if not stages:
        return ["no FROM"]
    base = stages[-1][0]
    for other, name, _ in stages[:-1]:
        if other != base:
            problems.append(f"stage {name or '?'} is FROM {other}, not the runtime base {base} (one base, one pull)")
    match = re.fullmatch(r"rayproject/ray:(\d+\.\d+\.\d+)-py(\d)(\d+)-gpu", base)
    if not match:
        problems.append(f"base image {base} is not Ray's official GPU image rayproject/ray:X.Y.Z-pyXY-gpu")
    else:
        ray_version, py = match.group(1), (int(match.group(2)), int(match.group(3)))
        ray_req = next(Requirement(d) for d in _pyproject()["project"]["dependencies"] if Requirement(d).name == "ray")
        if not ray_req.specifier.contains(ray_version):
            problems.append(f"base image Ray {ray_version} is outside pyproject's {ray_req}")
        if ray_version != _installed_ray_version():
            problems.append(f"base image Ray {ray_version} != the Ray the tests run ({_installed_ray_version()})")
        if py != sys.version_info[:2]:
            problems.append(f"base image Python {py[0]}.{py[1]} != the Python the tests run "
                            f"({sys.version_info.major}.{sys.version_info.minor})")

    stage_runs = {name: [a for i, a in instrs if i == "RUN"] for _, name, instrs in stages[:-1] if name}
    final = stages[-1][2]
    copied: list[str] = []
    setup_runs = []
    for instr, args in final:
        if instr in ("COPY", "ADD"):
            flags, sources, dest = _copy_parts(args)
            if "from" in flags:
                for source in sources:
                    if Path(source).name == "pyproject.toml":
                        copied.append(f"pyproject.toml@{flags['from']}")
                continue
            for source in sources:
                copied.append(source)
                if not _dockerignore_allows(source, ignore_text):
                    problems.append(f"COPY {source}: excluded from the build context by .dockerignore")
        if instr == "RUN":
            if re.search(r"\bpip3?\s+install\b|\bapt(-get)?\s+install\b|\bconda\s+install\b", args):
                problems.append(f"RUN installs outside scripts/setup.sh (one source of truth): {args}")
            if "scripts/setup.sh" in args:
                setup_runs.append((args, list(copied)))
                if not re.search(r"&&\s*(python3? -m )?pip3? check\b", args):
                    problems.append(f"no `pip check` after this install: {args}")
    full = [(args, seen) for args, seen in setup_runs if "--system" in args.split() and "--deps-only" not in args]
    deps = [(args, seen) for args, seen in setup_runs if "--deps-only" in args]
    if not full:
        problems.append("no RUN of `scripts/setup.sh --system` (the script make setup and CI run)")
    for args, seen in setup_runs:
        have = {"pyproject.toml" if c.startswith("pyproject.toml@") else c for c in seen}
        missing = {"requirements.lock", "scripts/setup.sh", "pyproject.toml"} - have
        if missing:
            problems.append(f"setup.sh runs before {sorted(missing)} are copied in: {args}")
    for args, seen in full:
        if "byol_ray" not in seen:
            problems.append("the full setup.sh run comes before the byol_ray source is copied in")
        if "pyproject.toml" not in seen:
            problems.append("the full setup.sh run installs without the real pyproject.toml (its version)")

    # The dependency layer must not change with the version: its pyproject.toml is a neutralised copy.
    if not deps:
        problems.append("no cached dependency layer (`scripts/setup.sh --system --deps-only`)")
    for args, seen in deps:
        if "pyproject.toml" in seen:
            problems.append("the dependency layer copies pyproject.toml itself: a version bump rebuilds it")
        spec = [c.split("@", 1)[1] for c in seen if c.startswith("pyproject.toml@")]
        if not spec:
            problems.append("the dependency layer has no pyproject.toml copied from a version-neutralising stage")
            continue
        text_now = (REPO / "pyproject.toml").read_text()
        bumped = re.sub(r'^version = "[^"]*"$', 'version = "99.1.2"', text_now, count=1, flags=re.M)
        outs = []
        for run in stage_runs.get(spec[-1], []):
            a, b = neutralise_with_stage(run, text_now), neutralise_with_stage(run, bumped)
            if a is not None:
                outs.append((a, b))
        if not outs:
            problems.append(f"stage {spec[-1]} runs no sed over pyproject.toml")
            continue
        a, b = outs[-1]
        import tomllib

        if a != b:
            problems.append(f"stage {spec[-1]}'s pyproject.toml still changes with the version: the 6 GB layer is rebuilt")
        elif tomllib.loads(a)["project"]["dependencies"] != _pyproject()["project"]["dependencies"]:
            problems.append(f"stage {spec[-1]} changes the dependency list, not only the version")

    args_declared = {args.split("=")[0] for instr, args in final if instr == "ARG"}
    env_text = " ".join(a for instr, a in final if instr == "ENV")
    for var in (IMAGE_ENV, IMAGE_COMMIT_ENV, IMAGE_DIRTY_ENV):
        if var not in args_declared:
            problems.append(f"no build ARG {var}")
        if not re.search(rf"\b{var}=\$\{{?{var}\}}?", env_text):
            problems.append(f"ENV {var} is not set from its build ARG (the run tags read it)")

    cuda = re.search(r'\bNVIDIA_REQUIRE_CUDA="?cuda>=([0-9]+\.[0-9]+)"?', env_text)
    try:
        want = lock_cuda(lock_text if lock_text is not None else LOCK.read_text())
    except AssertionError as exc:
        problems.append(str(exc))
        want = None
    if not cuda:
        problems.append("no ENV NVIDIA_REQUIRE_CUDA=\"cuda>=X.Y\" (the CUDA the locked torch needs)")
    elif want and cuda.group(1) != want:
        problems.append(f"NVIDIA_REQUIRE_CUDA asks for cuda>={cuda.group(1)}, the locked torch is built for CUDA {want}")
    return problems


def setup_problems(text: str) -> list[str]:
    """scripts/setup.sh installs everything with requirements.lock as constraints, nothing pinned by itself."""
    problems = []
    if not re.search(r"^LOCK=requirements\.lock$", text, flags=re.M):
        problems.append("setup.sh does not name requirements.lock (LOCK=requirements.lock)")
    installs = [line.strip() for line in text.splitlines()
                if re.search(r"\bpip\b.*\binstall\b|\$PIP install", line) and not line.lstrip().startswith("#")]
    if not installs:
        problems.append("setup.sh installs nothing with pip")
    for line in installs:
        if not re.search(r'-c "?\$LOCK"?|-c "?requirements\.lock"?', line):
            problems.append(f"pip install without the lock as constraints: {line}")
    if re.search(r"(torch|torchvision)==", text):
        problems.append("setup.sh pins torch/torchvision itself; the lock is the one source of versions")
    want = re.search(r"^want=\$\((.*)\)", text, flags=re.M)
    if not want or not re.search(r"\$LOCK|requirements\.lock", want.group(1)):
        problems.append("the idempotency stamp does not hash the lock file")
    if "--system" not in text:
        problems.append("setup.sh has no --system mode (install into the current interpreter) for the image")
    return problems


def lock_entries(text: str) -> dict[str, str]:
    out = {}
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        name, sep, ver = line.partition("==")
        assert sep and ver and " " not in line, f"not a name==version pin: {line!r}"
        out[canonicalize_name(name)] = ver
    return out


def lock_problems(text: str, installed=None) -> list[str]:
    """The lock pins what the tests run on, covers every declared dependency, and leaves the project out."""
    installed = installed or _installed_version
    problems = []
    if "pip freeze --exclude-editable" not in text or "make lock" not in text:
        problems.append("the lock's header does not say how it was generated (pip freeze --exclude-editable, make lock)")
    try:
        pins = lock_entries(text)
    except AssertionError as exc:
        return [str(exc)]
    if "byol-ray" in pins:
        problems.append("the lock pins byol-ray itself (the image installs it from source)")
    project = _pyproject()["project"]
    declared = project["dependencies"] + [d for extra in project.get("optional-dependencies", {}).values()
                                          for d in extra]
    for dep in declared:
        name = canonicalize_name(Requirement(dep).name)
        if name not in pins:
            problems.append(f"{name} is a dependency in pyproject.toml but not pinned in the lock (make lock)")
        elif not Requirement(dep).specifier.contains(pins[name], prereleases=True):
            problems.append(f"the lock pins {name}=={pins[name]}, outside pyproject's {dep}")
    for name in ("torch", "torchvision"):
        if name not in pins:
            problems.append(f"the lock does not pin {name} (the matching pair)")
    for name, ver in pins.items():
        have = installed(name)
        if have is not None and not SpecifierSet(f"=={ver}").contains(have, prereleases=True):
            problems.append(f"the lock pins {name}=={ver} but the tests run {have}: run `make lock` (or make setup)")
    return problems


def _installed_version(name: str) -> str | None:
    try:
        return version(name)
    except PackageNotFoundError:
        return None


# ----------------------------------------------------------------------------- the MLflow tracking server


@lru_cache(maxsize=None)
def _mlflow_server_command():
    import warnings

    with warnings.catch_warnings():  # importing MLflow's CLI configures its SQLAlchemy models (a deprecation)
        warnings.simplefilter("ignore", DeprecationWarning)
        from mlflow.cli import server
    return server


def mlflow_server_params(command: str) -> dict:
    """The options of the ``mlflow server ...`` in a shell command, parsed by MLflow's own CLI (click)."""
    at = command.find("mlflow server")
    assert at >= 0, f"no `mlflow server` in {command!r}"
    args = []
    for token in shlex.split(command[at + len("mlflow server"):]):
        if token in ("&&", ";", "&", "|", "&)", ")", "2>&1") or token.startswith(">"):
            break
        args.append(token)
    return _mlflow_server_command().make_context("server", args).params


def mlflow_server_problems(command: str, where: str) -> list[str]:
    """A server that every node can reach, that serves artifacts, and whose store outlives the cluster."""
    try:
        params = mlflow_server_params(command)
    except Exception as exc:  # noqa: BLE001 - click's usage errors, our assertion
        return [f"{where}: mlflow server does not parse: {exc}"]
    problems = []
    if params["host"] != "0.0.0.0":
        problems.append(f"{where}: mlflow server binds {params['host']}, unreachable from other pods/nodes")
    if not params["serve_artifacts"] or params["artifacts_only"]:
        problems.append(f"{where}: the server does not serve artifacts (workers would need storage credentials)")
    backend = params["backend_store_uri"] or ""
    if backend.startswith("sqlite:"):
        path = backend.split(":///", 1)[-1]
        if not _under_shared(path):
            problems.append(f"{where}: the MLflow store {backend} is not on the shared volume: lost with the pod")
        if str(params["workers"]) != "1":
            problems.append(f"{where}: SQLite on a network file system needs one writer (--workers 1)")
    elif "://" not in backend:
        problems.append(f"{where}: backend store {backend!r} is neither SQLite on {SHARED} nor a database URL")
    artifacts = params["artifacts_destination"] or ""
    if not (_under_shared(artifacts) or re.match(r"(s3|gs|wasbs|abfss)://", artifacts)):
        problems.append(f"{where}: artifacts go to {artifacts or './mlartifacts'}, not {SHARED} or an object store")
    return problems


def mlflow_service_url(service: dict) -> str:
    return f"http://{service['metadata']['name']}:{service['spec']['ports'][0]['port']}"


def mlflow_image() -> str:
    """MLflow's own image at the MLflow version the lock pins, its -full variant (basic auth needs Flask-WTF and
    S3 artifacts boto3, which the plain image, `pip install mlflow` alone, lacks)."""
    return f"ghcr.io/mlflow/mlflow:v{lock_entries(LOCK.read_text())['mlflow']}-full"


def _env(container: dict) -> dict[str, dict]:
    return {e["name"]: e for e in container.get("env", [])}


def _from_secret(env: dict[str, dict], name: str) -> tuple[str, str] | None:
    ref = env.get(name, {}).get("valueFrom", {}).get("secretKeyRef")
    return (ref["name"], ref["key"]) if ref and "value" not in env.get(name, {}) else None


def mlflow_auth_problems(docs: dict[str, dict], where: str = "mlflow.yaml") -> list[str]:
    """Basic auth: the basic-auth app, admin credentials and the CSRF key from a Secret, the users' store where the
    runs' store is (a file from the ConfigMap names it), MLflow's own image at the locked version, pulled at start."""
    problems = []
    pod = docs["Deployment"]["spec"]["template"]["spec"]
    container = pod["containers"][0]
    if container["image"] != mlflow_image():
        problems.append(f"{where}: image {container['image']} is not {mlflow_image()} (MLflow's own, locked version)")
    if container.get("imagePullPolicy") != "Always" and "@sha256:" not in container["image"]:
        problems.append(f"{where}: the MLflow image is neither pulled at every start nor pinned by digest")
    if pod.get("enableServiceLinks") is not False:
        problems.append(f"{where}: enableServiceLinks is not false (the Service mlflow sets MLFLOW_PORT in the pod)")
    try:
        params = mlflow_server_params(_container_command(container))
    except Exception as exc:  # noqa: BLE001 - click's usage errors
        return problems + [f"{where}: mlflow server does not parse: {exc}"]
    if params.get("app_name") != "basic-auth":
        problems.append(f"{where}: the server runs without authentication (--app-name basic-auth)")
    env = _env(container)
    for var in ("MLFLOW_AUTH_ADMIN_USERNAME", "MLFLOW_AUTH_ADMIN_PASSWORD", "MLFLOW_FLASK_SERVER_SECRET_KEY"):
        if _from_secret(env, var) is None:
            problems.append(f"{where}: {var} does not come from a Secret")
    path = env.get("MLFLOW_AUTH_CONFIG_PATH", {}).get("value", "")
    mounts = {m["mountPath"]: m["name"] for m in container.get("volumeMounts", [])}
    volumes = {v["name"]: v for v in pod.get("volumes", [])}
    volume = volumes.get(mounts.get(str(Path(path).parent), ""), {})
    cm_name = volume.get("configMap", {}).get("name")
    cm = docs.get("ConfigMap", {})
    if not path or cm_name is None or cm.get("metadata", {}).get("name") != cm_name:
        problems.append(f"{where}: MLFLOW_AUTH_CONFIG_PATH={path!r} is not a file of the ConfigMap in this manifest")
        return problems
    ini = configparser.ConfigParser()
    try:
        ini.read_string(cm.get("data", {}).get(Path(path).name, ""))
        db = ini["mlflow"]["database_uri"]
        ini["mlflow"]["default_permission"]
    except (KeyError, configparser.Error) as exc:
        return problems + [f"{where}: {Path(path).name} is not a usable basic-auth config: {exc!r}"]
    store_dir = str(Path(params["backend_store_uri"].split(":///", 1)[-1]).parent)
    if db.startswith("sqlite:") and not (db.startswith("sqlite:////")
                                         and str(Path(db.split(":///", 1)[1]).parent) == store_dir):
        problems.append(f"{where}: the users' store {db} is not beside the runs' store ({store_dir}): lost with the pod")
    if ini["mlflow"].get("admin_password"):
        problems.append(f"{where}: an admin password is written in the ConfigMap")
    return problems


def mlflow_k8s_problems(docs: dict[str, dict], claim: str) -> list[str]:
    from mlflow.server.security_utils import is_allowed_host_header

    deploy, service = docs["Deployment"], docs["Service"]
    problems = mlflow_auth_problems(docs)
    spec = deploy["spec"]
    if spec.get("replicas", 1) != 1 or spec.get("strategy", {}).get("type") != "Recreate":
        problems.append("the MLflow Deployment must be one replica with strategy Recreate (one SQLite writer)")
    pod_labels = spec["template"]["metadata"].get("labels", {})
    if not spec["selector"].get("matchLabels", {}).items() <= pod_labels.items():
        problems.append("the Deployment's selector does not match its pod labels")
    if not service["spec"].get("selector") or not service["spec"]["selector"].items() <= pod_labels.items():
        problems.append("the Service's selector does not select the MLflow pods")
    container = spec["template"]["spec"]["containers"][0]
    command = _container_command(container)
    problems += mlflow_server_problems(command, "mlflow.yaml")
    try:
        params = mlflow_server_params(command)
    except Exception:  # noqa: BLE001 - reported above
        return problems
    port = service["spec"]["ports"][0]
    if port.get("targetPort", port["port"]) != params["port"]:
        problems.append(f"Service targetPort {port.get('targetPort')} != the server's --port {params['port']}")
    if params["port"] not in [p["containerPort"] for p in container.get("ports", [])]:
        problems.append(f"the container does not declare port {params['port']}")
    allowed = [h.strip() for h in (params["allowed_hosts"] or "").split(",") if h.strip()]
    name, svc_port = service["metadata"]["name"], port["port"]
    for host in (f"{name}:{svc_port}", f"{name}.byol.svc:{svc_port}", f"{name}.byol.svc.cluster.local:{svc_port}"):
        if not params["disable_security_middleware"] and not (allowed and is_allowed_host_header(allowed, host)):
            problems.append(f"MLflow would refuse requests for Host {host!r} (--allowed-hosts)")
    mounts = [m["mountPath"] for m in container.get("volumeMounts", [])
              if any(v["name"] == m["name"] and v.get("persistentVolumeClaim", {}).get("claimName") == claim
                     for v in spec["template"]["spec"].get("volumes", []))]
    if mounts != [SHARED]:
        problems.append(f"the MLflow pod mounts PVC {claim!r} at {mounts}, not [{SHARED!r}]")
    return problems


# ----------------------------------------------------------------------------- AWS: Ray's own schema


def test_aws_config_matches_the_schema_ray_ships(aws, ray_validator):
    assert _errors(ray_validator, aws) == []


def test_aws_config_survives_ray_ups_own_preparation(aws):
    """`ray up` runs prepare_config (defaults merge) then validate_config before touching AWS."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    prepared = prepare_config(copy.deepcopy(aws))
    validate_config(prepared)
    assert prepared["head_node_type"] in prepared["available_node_types"]


SPOT = "ray.worker.gpu.spot"  # aws-gpu.yaml's spot GPU node type
ONDEMAND = "ray.worker.gpu.ondemand"

AWS_MUTATIONS = {
    "typo'd top-level key": lambda c: c.update(setup_command=c.pop("setup_commands")),
    "min_workers as a string": lambda c: c["available_node_types"][SPOT].update(min_workers="2"),
    "unknown docker key": lambda c: c["docker"].update(imagee=c["docker"]["image"]),
    "node type without resources": lambda c: c["available_node_types"][SPOT].pop("resources"),
    "fractional GPU resource": lambda c: c["available_node_types"][SPOT]["resources"].update(GPU=0.5),
    "unknown security_group key": lambda c: c["provider"]["security_group"].update(GroupId="sg-0123"),
    "pull_before_run as a string": lambda c: c["docker"].update(pull_before_run="true"),
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
        broken["available_node_types"][SPOT]["min_workers"] = broken["max_workers"] + 1
    with pytest.raises((ValueError, KeyError, AssertionError)):
        validate_config(prepare_config(broken))


# ----------------------------------------------------------------------------- AWS: cross-file facts


def aws_problems(cfg: dict) -> list[str]:
    problems = []
    image = cfg["docker"]["image"]
    if image != pinned_image():
        problems.append(f"docker image {image} is not the pinned runtime image {pinned_image()}")
    for key in ("head_image", "worker_image"):
        for node in cfg["available_node_types"].values():
            if node.get("docker", {}).get(key, image) != image:
                problems.append(f"a node type overrides the image with {node['docker'][key]}")
    region = cfg["provider"]["region"]
    if not cfg["provider"].get("availability_zone", region).startswith(region):
        problems.append("availability_zone is outside provider.region")

    commands = aws_commands(cfg)
    init = " ".join(commands["initialization_commands"])
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
    for key, lines in commands.items():
        for line in lines:
            problems += install_problems(line, key)
    if any(local in (".", "./") for local in cfg.get("file_mounts", {}).values()):
        problems.append("file_mounts copies the checkout onto the nodes; the code is in the image")

    servers = [c for c in commands["head_start_ray_commands"] if "mlflow server" in c]
    if len(servers) != 1:
        problems.append("the head does not start one MLflow tracking server")
    else:
        problems += mlflow_server_problems(servers[0], "head_start_ray_commands")

    if "--env RAY_AUTH_MODE=token" not in cfg["docker"].get("run_options", []):
        problems.append("token auth (RAY_AUTH_MODE=token) is not set on the nodes")
    if "/home/ray/.ray/auth_token" not in cfg.get("file_mounts", {}):
        problems.append("the auth token is not copied to the nodes")
    if cfg["available_node_types"][cfg["head_node_type"]]["resources"].get("CPU") != 0:
        problems.append("the head advertises CPUs, so training workers could land on it")
    return problems


def _gpu_worker_types(cfg: dict) -> dict[str, dict]:
    return {name: node for name, node in cfg["available_node_types"].items()
            if name != cfg["head_node_type"] and node["resources"].get("GPU", 0) > 0}


def _is_spot(node: dict) -> bool:
    return node["node_config"].get("InstanceMarketOptions", {}).get("MarketType") == "spot"


def ray_picks(cfg: dict, bundles: list[dict]) -> dict[str, int]:
    """The node types Ray 2.60's autoscaler launches for these bundles from nothing (its own get_nodes_for)."""
    from functools import partial

    from ray.autoscaler._private.node_provider_availability_tracker import NodeAvailabilitySummary
    from ray.autoscaler._private.resource_demand_scheduler import _default_utilization_scorer, get_nodes_for

    scorer = partial(_default_utilization_scorer, node_availability_summary=NodeAvailabilitySummary({}))
    types = copy.deepcopy(cfg["available_node_types"])
    picked, _ = get_nodes_for(types, {}, cfg["head_node_type"], cfg.get("max_workers", 0), bundles, scorer)
    return dict(picked)


def spot_problems(cfg: dict) -> list[str]:
    """Scale to zero on spot: an on-demand head without GPUs; GPU types at min_workers 0, spot first; idle nodes
    released; a spot watcher on every worker after `ray start`; IMDS reachable; the nodes' security group by name."""
    problems = []
    head = cfg["available_node_types"][cfg["head_node_type"]]
    if _is_spot(head):
        problems.append("the head is a spot instance: a reclaim ends every run and the MLflow server")
    if head["resources"].get("GPU", 0):
        problems.append("the head advertises GPUs")
    gpu_types = _gpu_worker_types(cfg)
    if not any(_is_spot(n) for n in gpu_types.values()):
        problems.append("no spot GPU node type (InstanceMarketOptions: MarketType: spot)")
    for name, node in gpu_types.items():
        if node.get("min_workers", 0) != 0:
            problems.append(f"{name}: min_workers {node.get('min_workers')}: GPU nodes stay up with nothing to run")
        if node["node_config"].get("MetadataOptions", {}).get("HttpEndpoint") == "disabled":
            problems.append(f"{name}: the instance metadata service is off; spot-watch cannot see notices")
    if gpu_types:
        one_node = max(n["resources"]["GPU"] for n in gpu_types.values())
        picked = ray_picks(cfg, [{"GPU": 1}] * int(one_node))
        if not picked or not all(_is_spot(cfg["available_node_types"][t]) for t in picked):
            problems.append(f"Ray's autoscaler would start {picked} for one node's worth of GPUs, not a spot node")
    if not cfg.get("idle_timeout_minutes", 5) > 0:
        problems.append("idle_timeout_minutes is 0: idle GPU nodes are never released")
    if not cfg["provider"].get("cache_stopped_nodes", True) is False:
        problems.append("cache_stopped_nodes is not false: idle GPU nodes are stopped (EBS bills), not terminated")
    if not cfg["provider"].get("security_group", {}).get("GroupName"):
        problems.append("no provider.security_group.GroupName: the EFS mount target cannot admit the nodes' group "
                        "before the first `ray up`")
    for name, node in cfg["available_node_types"].items():
        if "SecurityGroupIds" in node["node_config"]:
            problems.append(f"{name}: SecurityGroupIds bypass provider.security_group (no intra-cluster rules)")
    if cfg["docker"].get("pull_before_run") is not True:
        problems.append("docker.pull_before_run is not true: a node may run a stale local copy of the tag")

    head_port = re.search(r"ray start --head\b.*?--port=(\d+)", " ".join(cfg["head_start_ray_commands"]))
    commands = cfg.get("worker_start_ray_commands", [])
    start = next((i for i, c in enumerate(commands) if re.search(r"\bray start\b", c)), None)
    watch = [(i, c) for i, c in enumerate(commands) if "byol-ray spot-watch" in c]
    if not watch:
        problems.append("worker_start_ray_commands does not start `byol-ray spot-watch`")
    for i, command in watch:
        if start is None or i < start:
            problems.append("spot-watch starts before `ray start` (there is no node to drain yet)")
        line = command[command.index("byol-ray spot-watch"):]
        line = re.split(r"\s[>&|;]|\)", line)[0]
        if not re.search(r"nohup byol-ray spot-watch[^&]*&", command):
            problems.append("spot-watch does not run in the background under nohup (it would block or die with `ray up`)")
        try:
            args = parse_cli_command(line)
        except SystemExit:
            problems.append(f"`{line}` does not parse")
            continue
        if getattr(args, "cloud", None) != "aws" or getattr(args, "drain_now", False):
            problems.append(f"`{line}`: not the AWS watcher (--cloud aws, no --drain-now)")
        address = getattr(args, "address", None)
        if head_port and address != f"$RAY_HEAD_IP:{head_port.group(1)}":
            problems.append(f"`{line}`: --address {address} is not the head's GCS ($RAY_HEAD_IP:{head_port.group(1)})")
    return problems


def aws_capacity_problems(cfg: dict, ray_cfg) -> list[str]:
    """What the cluster can grow to: byol-ray asks the autoscaler for its workers and waits (ray.wait_for_workers_s),
    so max_workers x GPUs per node must cover ray.num_workers, and one worker (1 GPU, ray.cpus_per_worker CPUs) must
    fit every GPU node type (a request no type holds is refused at once)."""
    problems = []
    gpu_types = _gpu_worker_types(cfg)
    for name, node in gpu_types.items():
        res = node["resources"]
        if res.get("CPU", 0) < ray_cfg.cpus_per_worker:
            problems.append(f"{name}: one worker needs {ray_cfg.cpus_per_worker} CPUs, the node has {res.get('CPU', 0)}")
        elif res["GPU"] * ray_cfg.cpus_per_worker > res.get("CPU", 0):
            problems.append(f"{name}: {res['GPU']} GPU workers x {ray_cfg.cpus_per_worker} CPUs exceed its "
                            f"{res.get('CPU')} CPUs")
    if ray_cfg.use_gpu:
        room, gpus = cfg.get("max_workers", 0), 0
        for node in sorted(gpu_types.values(), key=lambda n: -n["resources"]["GPU"]):
            n = min(node.get("max_workers", 0), room)
            gpus, room = gpus + n * node["resources"]["GPU"], room - n
        if gpus < ray_cfg.num_workers:
            problems.append(f"max_workers allow {gpus} GPUs, ray.num_workers={ray_cfg.num_workers}")
    else:
        cpus = sum(n.get("max_workers", 0) * n["resources"].get("CPU", 0)
                   for name, n in cfg["available_node_types"].items() if name != cfg["head_node_type"])
        if cpus < ray_cfg.num_workers * ray_cfg.cpus_per_worker:
            problems.append(f"max_workers allow {cpus} CPUs, the run needs {ray_cfg.num_workers * ray_cfg.cpus_per_worker}")
    return problems


def test_aws_cross_file_facts_hold(aws):
    assert aws_problems(aws) == []


def test_aws_scales_to_zero_on_spot(aws):
    assert spot_problems(aws) == []


def _edit_worker_start(old: str, new: str):
    def mutate(c):
        assert any(old in x for x in c["worker_start_ray_commands"]), f"stale mutation: {old!r}"
        c["worker_start_ray_commands"] = [x.replace(old, new) for x in c["worker_start_ray_commands"]]
    return mutate


AWS_SPOT_MUTATIONS = {
    "GPU nodes kept up": lambda c: c["available_node_types"][SPOT].update(min_workers=2),
    "on-demand fallback kept up": lambda c: c["available_node_types"][ONDEMAND].update(min_workers=1),
    "no spot type": lambda c: c["available_node_types"][SPOT]["node_config"].pop("InstanceMarketOptions"),
    "spot head": lambda c: c["available_node_types"][c["head_node_type"]]["node_config"].update(
        InstanceMarketOptions={"MarketType": "spot"}),
    "on-demand preferred": lambda c: c["available_node_types"].update(
        {"ray.worker.gpu.x": c["available_node_types"].pop(ONDEMAND)}),
    "idle nodes never released": lambda c: c.update(idle_timeout_minutes=0),
    "idle nodes stopped, not terminated": lambda c: c["provider"].update(cache_stopped_nodes=True),
    "security group left to ray up": lambda c: c["provider"].pop("security_group"),
    "node type with its own groups": lambda c: c["available_node_types"][SPOT]["node_config"].update(
        SecurityGroupIds=["sg-0123456789abcdef0"]),
    "no pull before run": lambda c: c["docker"].update(pull_before_run=False),
    "IMDS off": lambda c: c["available_node_types"][SPOT]["node_config"]["MetadataOptions"].update(HttpEndpoint="disabled"),
    "no spot watcher": lambda c: c.update(worker_start_ray_commands=[
        x for x in c["worker_start_ray_commands"] if "spot-watch" not in x]),
    "watcher before ray start": lambda c: c["worker_start_ray_commands"].reverse(),
    "watcher in the foreground": _edit_worker_start("(nohup byol-ray spot-watch", "(byol-ray spot-watch"),
    "watcher for another cloud": _edit_worker_start("--cloud aws", "--cloud gcp"),
    "watcher on another port": _edit_worker_start("--address $RAY_HEAD_IP:6379", "--address $RAY_HEAD_IP:6380"),
    "watcher with a typo'd flag": _edit_worker_start("--cloud aws", "--clouds aws"),
    "drain-now instead of watching": _edit_worker_start("--cloud aws", "--drain-now"),
}


@pytest.mark.parametrize("mutation", list(AWS_SPOT_MUTATIONS), ids=list(AWS_SPOT_MUTATIONS))
def test_aws_spot_checks_catch_breakage(aws, mutation):
    broken = copy.deepcopy(aws)
    AWS_SPOT_MUTATIONS[mutation](broken)
    assert spot_problems(broken), f"not caught: {mutation}"


_FFCV_APT = ("sudo apt-get -qq update && sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "
             "--no-install-recommends libopencv-dev libturbojpeg0-dev pkg-config build-essential")

AWS_CROSS_MUTATIONS = {
    "EFS in another region": lambda c: c.update(initialization_commands=[
        s.replace(".us-west-2.", ".eu-west-1.") for s in c["initialization_commands"]]),
    "EFS mounted elsewhere": lambda c: c.update(initialization_commands=[
        s.replace(":/ /mnt/shared", ":/ /mnt/efs") for s in c["initialization_commands"]]),
    "shared dir not in container": lambda c: c["docker"]["run_options"].remove("-v /mnt/shared:/mnt/shared"),
    "stock Ray image (nothing baked in)": lambda c: c["docker"].update(image="rayproject/ray:2.60.0-py311-gpu"),
    "another tag of the image": lambda c: c["docker"].update(image=pinned_image() + "-rc1"),
    "worker type overrides the image": lambda c: c["available_node_types"][SPOT].update(
        docker={"worker_image": "rayproject/ray:2.60.0-py311-gpu"}),
    "apt-get of FFCV's packages at node start": lambda c: c["setup_commands"].append(_FFCV_APT),
    "pip install of the checkout at node start": lambda c: (
        c["file_mounts"].update({"/home/ray/byol-ray": "."}), c["setup_commands"].append("pip install -q /home/ray/byol-ray")),
    "pip install of byol-ray from a registry": lambda c: c["worker_setup_commands"].append("pip install byol-ray==0.1.0"),
    "editable install on the head": lambda c: c["head_setup_commands"].append("cd ~/byol-ray && pip install -e ."),
    "MLflow store on the head's disk": lambda c: c.update(head_start_ray_commands=[
        s.replace("sqlite:////mnt/shared/mlflow/mlflow.db", "sqlite:////home/ray/mlflow.db")
        for s in c["head_start_ray_commands"]]),
    "MLflow on loopback only": lambda c: c.update(head_start_ray_commands=[
        s.replace("--host 0.0.0.0", "--host 127.0.0.1") for s in c["head_start_ray_commands"]]),
    "no MLflow server": lambda c: c.update(head_start_ray_commands=[
        s for s in c["head_start_ray_commands"] if "mlflow server" not in s]),
}


@pytest.mark.parametrize("mutation", list(AWS_CROSS_MUTATIONS), ids=list(AWS_CROSS_MUTATIONS))
def test_aws_cross_file_checks_catch_breakage(aws, mutation):
    broken = copy.deepcopy(aws)
    AWS_CROSS_MUTATIONS[mutation](broken)
    assert aws_problems(broken), f"not caught: {mutation}"


@pytest.mark.parametrize("command", [
    "pip install -q /home/ray/byol-ray", "pip3 install .", "python -m pip install -e /src/byol-ray",
    "uv pip install byol-ray", "pip install -r requirements.txt", "sudo apt-get install -y libturbojpeg0-dev",
    "apt install -y build-essential", "cd /x && pip install 'torch==2.14.1'",
])
def test_install_check_catches_installs(command):
    assert install_problems(command, "x"), command


@pytest.mark.parametrize("command", [
    "pip install -q 'boto3>=1.4.8'", "sudo apt-get install -y -qq nfs-common", "ray stop",
    "ulimit -n 65536; ray start --head --port=6379",
])
def test_install_check_lets_the_rest_through(command):
    assert install_problems(command, "x") == [], command


# ----------------------------------------------------------------------------- the runtime image and the lock


def test_dockerfile_builds_on_the_tested_ray_and_python_and_runs_setup_sh(dockerfile):
    assert dockerfile_problems(dockerfile, DOCKERIGNORE.read_text()) == []


_FINAL_FROM = "FROM rayproject/ray:2.60.0-py311-gpu\n"
_DEPS_COPY = "COPY --from=deps-spec --chown=ray:users /tmp/deps-spec/pyproject.toml ./pyproject.toml\n"

DOCKERFILE_MUTATIONS = {
    "other Ray in the base": (_FINAL_FROM, "FROM rayproject/ray:2.59.0-py311-gpu\n"),
    "other Python in the base": (_FINAL_FROM, "FROM rayproject/ray:2.60.0-py312-gpu\n"),
    "not Ray's GPU image": (_FINAL_FROM, "FROM python:3.11-slim\n"),
    "helper stage on another base": ("FROM rayproject/ray:2.60.0-py311-gpu AS deps-spec",
                                     "FROM python:3.11-slim AS deps-spec"),
    "setup.sh not run": ("PYTHON=python bash scripts/setup.sh --system && python -m pip check\n", "pip install .\n"),
    "version in the dependency layer": (_DEPS_COPY, "COPY --chown=ray:users pyproject.toml ./\n"),
    "sed that keeps the version": ("'s/^version = \"[^\"]*\"$/version = \"0\"/'", "'s/^versio = \"[^\"]*\"$/version = \"0\"/'"),
    "sed that drops the dependencies": ("'s/^version = \"[^\"]*\"$/version = \"0\"/'", "'/^dependencies/,/^]/d'"),
    "no pip check after the full install": ("PYTHON=python bash scripts/setup.sh --system && python -m pip check\n",
                                            "PYTHON=python bash scripts/setup.sh --system\n"),
    "no pip check after the dependencies": ("--system --deps-only && python -m pip check\n", "--system --deps-only\n"),
    "CUDA requirement dropped": ('ENV NVIDIA_REQUIRE_CUDA="cuda>=13.0"\n', ""),
    "CUDA requirement of another torch": ('NVIDIA_REQUIRE_CUDA="cuda>=13.0"', 'NVIDIA_REQUIRE_CUDA="cuda>=12.4"'),
    "dirty ARG dropped": ("ARG BYOL_RAY_GIT_DIRTY\n", ""),
    "dirty flag not baked in": ("BYOL_RAY_GIT_DIRTY=${BYOL_RAY_GIT_DIRTY}", "BYOL_RAY_GIT_DIRTY=false"),
    "own pip install beside setup.sh": ("ARG BYOL_RAY_IMAGE\n",
                                        "RUN pip install torch==2.14.1\nARG BYOL_RAY_IMAGE\n"),
    "apt-get in the Dockerfile": ("ARG BYOL_RAY_IMAGE\n",
                                  "RUN sudo apt-get install -y libopencv-dev\nARG BYOL_RAY_IMAGE\n"),
    "lock not copied": ("COPY --chown=ray:users requirements.lock ./\n", ""),
    "image tag not baked in": ("BYOL_RAY_IMAGE=${BYOL_RAY_IMAGE}", "BYOL_RAY_IMAGE=latest"),
    "commit ARG dropped": ("ARG BYOL_RAY_GIT_COMMIT\n", ""),
    "source never copied in": ("COPY --chown=ray:users byol_ray byol_ray\n", ""),
}


@pytest.mark.parametrize("mutation", list(DOCKERFILE_MUTATIONS), ids=list(DOCKERFILE_MUTATIONS))
def test_dockerfile_checks_catch_breakage(dockerfile, mutation):
    old, new = DOCKERFILE_MUTATIONS[mutation]
    assert old in dockerfile, f"stale mutation: {old!r} not in the Dockerfile"
    assert dockerfile_problems(dockerfile.replace(old, new), DOCKERIGNORE.read_text()), f"not caught: {mutation}"


@pytest.mark.parametrize("edit", [
    (r"^cuda-toolkit==.*$", "cuda-toolkit==12.8.1"),                  # a torch built for another CUDA
    (r"^torch==.*$", "torch==2.14.1+cpu"),                             # a CPU-only torch in the GPU image
])
def test_cuda_requirement_check_follows_the_lock(dockerfile, edit):
    lock = re.sub(edit[0], edit[1], LOCK.read_text(), count=1, flags=re.M)
    assert lock != LOCK.read_text()
    assert dockerfile_problems(dockerfile, DOCKERIGNORE.read_text(), lock_text=lock), edit


def test_the_dependency_layer_does_not_depend_on_the_version(dockerfile):
    """The deps-spec stage's sed, run as the build runs it: two versions give the same file, with every dependency."""
    stage = next(instrs for _, name, instrs in dockerfile_stages(dockerfile) if name == "deps-spec")
    (run,) = [a for i, a in stage if i == "RUN"]
    text = (REPO / "pyproject.toml").read_text()
    a = neutralise_with_stage(run, text)
    b = neutralise_with_stage(run, text.replace(f'version = "{_pyproject()["project"]["version"]}"', 'version = "7.7.7"'))
    assert a is not None and a == b
    assert 'version = "0"' in a


def test_dockerignore_check_catches_an_excluded_source(dockerfile):
    ignore = DOCKERIGNORE.read_text().replace("!requirements.lock\n", "")
    assert dockerfile_problems(dockerfile, ignore), "a COPY of an ignored file was not caught"


def test_dockerignore_keeps_the_venv_and_git_out():
    ignore = DOCKERIGNORE.read_text()
    for path in (".venv", ".git", "runs", "data.beton", "mlflow.db"):
        assert not _dockerignore_allows(path, ignore), path


def test_setup_sh_installs_with_the_lock_as_constraints():
    assert setup_problems(SETUP.read_text()) == []


SETUP_MUTATIONS = {
    "constraints dropped": ('$PIP install -q -c "$LOCK" -e ".[dev]"', '$PIP install -q -e ".[dev]"'),
    "own torch pins": ('$PIP install -q -c "$LOCK" -e ".[dev]"',
                       '$PIP install -q "torch==2.14.1" "torchvision==0.29.1"\n  $PIP install -q -c "$LOCK" -e ".[dev]"'),
    "stamp ignores the lock": ('want=$(cat pyproject.toml "$LOCK" scripts/setup.sh', 'want=$(cat pyproject.toml scripts/setup.sh'),
    "other lock file": ("LOCK=requirements.lock", "LOCK=constraints.txt"),
}


@pytest.mark.parametrize("mutation", list(SETUP_MUTATIONS), ids=list(SETUP_MUTATIONS))
def test_setup_checks_catch_breakage(mutation):
    text = SETUP.read_text()
    old, new = SETUP_MUTATIONS[mutation]
    assert old in text, f"stale mutation: {old!r} not in setup.sh"
    assert setup_problems(text.replace(old, new)), f"not caught: {mutation}"


def test_lock_pins_the_environment_the_tests_run_in():
    assert lock_problems(LOCK.read_text()) == []
    pins = lock_entries(LOCK.read_text())
    assert pins["ray"] == _installed_ray_version()


LOCK_MUTATIONS = {
    "torch pin moved": lambda t: re.sub(r"^torch==.*$", "torch==2.0.0", t, flags=re.M),
    "torchvision dropped": lambda t: re.sub(r"^torchvision==.*\n", "", t, flags=re.M),
    "a dependency missing": lambda t: re.sub(r"^mlflow==.*\n", "", t, flags=re.M),
    "the project pinned": lambda t: t + "byol-ray==0.1.0\n",
    "an unpinned line": lambda t: t + "numpy>=1.24\n",
    "no header": lambda t: "\n".join(line for line in t.splitlines() if not line.startswith("#")),
}


@pytest.mark.parametrize("mutation", list(LOCK_MUTATIONS), ids=list(LOCK_MUTATIONS))
def test_lock_checks_catch_breakage(mutation):
    text = LOCK.read_text()
    broken = LOCK_MUTATIONS[mutation](text)
    assert broken != text
    assert lock_problems(broken), f"not caught: {mutation}"


def test_lock_check_catches_a_stale_lock():
    """A package upgraded in the test environment without `make lock`."""
    text = LOCK.read_text()
    stale = {canonicalize_name("numpy"): "0.0.1"}
    assert lock_problems(text, installed=lambda n: stale.get(n, _installed_version(n)))


def _git(repo: Path, *args: str) -> str:
    return subprocess.run(["git", "-c", "user.email=t@example.invalid", "-c", "user.name=t", *args], cwd=repo,
                          check=True, capture_output=True, text=True).stdout.strip()


def make_image_problems(makefile_text: str) -> list[str]:
    """`make image` in a scratch checkout with a stand-in `docker` that records its arguments: a clean tree builds
    <IMAGE_REPO>:<12-hex HEAD> with BYOL_RAY_GIT_DIRTY=false; an edit outside what the image is built from changes
    nothing; a modified or untracked source file is refused (no docker call); ALLOW_DIRTY=1 builds <sha>-dirty with
    BYOL_RAY_GIT_DIRTY=true. Every build passes the commit and the tag it is built under."""
    if not (shutil.which("make") and shutil.which("git")):
        pytest.skip("needs make and git")
    problems = []
    with tempfile.TemporaryDirectory() as tmp:
        repo, bin_dir = Path(tmp) / "repo", Path(tmp) / "bin"
        (repo / "byol_ray").mkdir(parents=True)
        (repo / "docs").mkdir()
        bin_dir.mkdir()
        for name in ("Dockerfile", ".dockerignore", "pyproject.toml"):
            shutil.copy(REPO / name, repo / name)
        (repo / "Makefile").write_text(makefile_text)
        (repo / "byol_ray" / "__init__.py").write_text("")
        (repo / "docs" / "cluster.md").write_text("x\n")
        docker = bin_dir / "docker"
        docker.write_text('#!/bin/sh\nprintf "%s\\n" "$@" > "$DOCKER_ARGS"\n')
        docker.chmod(0o755)
        _git(repo, "init", "-q")
        _git(repo, "add", "-A")
        _git(repo, "commit", "-q", "-m", "x")
        sha, full = _git(repo, "rev-parse", "--short=12", "HEAD"), _git(repo, "rev-parse", "HEAD")

        def make(**env) -> tuple[int, list[str] | None]:
            record = Path(tmp) / "docker.args"
            record.unlink(missing_ok=True)
            run_env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "DOCKER_ARGS": str(record), **env}
            run_env.pop("IMAGE", None)
            if "ALLOW_DIRTY" not in env:
                run_env.pop("ALLOW_DIRTY", None)
            out = subprocess.run(["make", "-s", "image"], cwd=repo, env=run_env, capture_output=True, text=True,
                                 timeout=60)
            return out.returncode, (record.read_text().split("\n") if record.exists() else None)

        def expect_build(what: str, argv, tag: str, dirty: str) -> None:
            if argv is None:
                problems.append(f"{what}: docker build was not run")
                return
            want = [f"{image_repo()}:{tag}", f"{IMAGE_ENV}={image_repo()}:{tag}", f"{IMAGE_COMMIT_ENV}={full}",
                    f"{IMAGE_DIRTY_ENV}={dirty}"]
            problems.extend(f"{what}: docker build lacks {w}" for w in want if w not in argv)

        rc, argv = make()
        expect_build("clean tree", argv, sha, "false")
        (repo / "docs" / "cluster.md").write_text("edited\n")
        rc, argv = make()
        expect_build("edit outside the image's inputs", argv, sha, "false")
        for what, change in (("modified source", lambda: (repo / "byol_ray" / "__init__.py").write_text("x = 1\n")),
                             ("untracked source", lambda: (repo / "byol_ray" / "new.py").write_text("y = 2\n"))):
            _git(repo, "checkout", "-q", "--", ".")
            _git(repo, "clean", "-qfd")
            change()
            rc, argv = make()
            if rc == 0 or argv is not None:
                problems.append(f"{what}: make image built a dirty tree without ALLOW_DIRTY=1")
            rc, argv = make(ALLOW_DIRTY="1")
            expect_build(f"{what} with ALLOW_DIRTY=1", argv, f"{sha}-dirty", "true")
    return problems


def test_make_image_tags_by_commit_and_refuses_a_dirty_tree():
    assert make_image_problems(MAKEFILE.read_text()) == []


MAKEFILE_MUTATIONS = {
    "no refusal": ('[ "$(GIT_DIRTY)" = true ] && [ "$(ALLOW_DIRTY)" != 1 ]', "false"),
    "tagged by version": ("IMAGE ?= $(IMAGE_REPO):$(GIT_SHA)", "IMAGE ?= $(IMAGE_REPO):$(VERSION)"),
    "dirty build without -dirty": ("$(GIT_SHA)$(if $(filter true,$(GIT_DIRTY)),-dirty)", "$(GIT_SHA)"),
    "dirty flag not passed": ("--build-arg BYOL_RAY_GIT_DIRTY=$(GIT_DIRTY)", "--build-arg BYOL_RAY_GIT_DIRTY=false"),
    "untracked files ignored": ("git status --porcelain -- $(IMAGE_INPUTS)",
                                "git status --porcelain --untracked-files=no -- $(IMAGE_INPUTS)"),
    "the whole tree counts": ("git status --porcelain -- $(IMAGE_INPUTS)", "git status --porcelain"),
}


@pytest.mark.parametrize("mutation", list(MAKEFILE_MUTATIONS), ids=list(MAKEFILE_MUTATIONS))
def test_make_image_checks_catch_breakage(mutation):
    old, new = MAKEFILE_MUTATIONS[mutation]
    text = MAKEFILE.read_text()
    assert old in text, f"stale mutation: {old!r}"
    assert make_image_problems(text.replace(old, new)), f"not caught: {mutation}"


def test_makefile_regenerates_the_lock_and_builds_the_tagged_image():
    make = MAKEFILE.read_text()
    lock_rule = re.search(r"^lock:.*?(?=^\S)", make, flags=re.S | re.M)
    assert lock_rule and "pip freeze --exclude-editable" in lock_rule.group(0)
    image_rule = re.search(r"^image:.*?(?=^\S)", make, flags=re.S | re.M)
    assert image_rule, "no `make image`"
    for arg in (f"--build-arg {IMAGE_ENV}=$(IMAGE)", f"--build-arg {IMAGE_COMMIT_ENV}=$$(git rev-parse HEAD)"):
        assert arg in image_rule.group(0), arg


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
    "env value not a string": lambda d: _worker(_cluster_spec(d))["template"]["spec"]["containers"][0]["env"][0].update(
        value=5000),
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
    """Every pod runs the pinned runtime image, installs nothing at start, and rayVersion is the image's Ray."""
    ray_version = _installed_ray_version()
    problems = []
    for name, group in _groups(spec):
        for container in _containers(group["template"]["spec"]):
            if container["image"] != pinned_image():
                problems.append(f"{name}/{container['name']}: image {container['image']} is not {pinned_image()}")
            problems += install_problems(_container_command(container), f"{name}/{container['name']}")
    if spec.get("rayVersion") != ray_version:
        problems.append(f"rayVersion {spec.get('rayVersion')!r} != Ray {ray_version}")
    return problems


def tracking_env_problems(spec: dict, url: str) -> list[str]:
    """Every Ray pod points MLFLOW_TRACKING_URI at the tracking server (jobs that set no mlflow.tracking_uri)."""
    problems = []
    for name, group in _groups(spec):
        env = {e["name"]: e.get("value") for e in _ray_container(group).get("env", [])}
        if env.get(TRACKING_ENV) != url:
            problems.append(f"{name}: {TRACKING_ENV}={env.get(TRACKING_ENV)!r}, not the MLflow service {url}")
    return problems


def entrypoint_problems(job: dict, tracking_url: str) -> list[str]:
    entrypoint = job["spec"].get("entrypoint", "")
    if not entrypoint.startswith("byol-ray train "):
        return [f"entrypoint does not start with 'byol-ray train': {entrypoint!r}"]
    try:
        args, cfg = resolve_command(entrypoint)
    except (AssertionError, ConfigError, SystemExit) as exc:
        return [f"entrypoint does not resolve: {exc}"]
    problems = [] if args.config else ["entrypoint has no --config"]
    problems += output_problems(cfg, what="entrypoint")
    if cfg.mlflow.tracking_uri != tracking_url:
        problems.append(f"mlflow.tracking_uri={cfg.mlflow.tracking_uri} is not the MLflow service {tracking_url}")
    problems += runtime_env_problems(job["spec"].get("runtimeEnvYAML"))
    return problems


def test_rayjob_entrypoint_is_a_valid_byol_ray_command(rayjob, mlflow_docs):
    url = mlflow_service_url(mlflow_docs["Service"])
    assert entrypoint_problems(rayjob, url) == []
    args, cfg = resolve_command(rayjob["spec"]["entrypoint"])
    assert args.config == ["imagenet_resnet50_300ep"], "the preset packaged in the image"
    assert cfg.output_dir == "/mnt/shared/byol-ray"
    assert "runtimeEnvYAML" not in rayjob["spec"], "the image holds byol-ray; a runtime env would rebuild it per job"


@pytest.mark.parametrize("edit", [
    ("ray.num_workers=16", "ray.num_worker=16"),                        # a key that does not exist
    ("ray.num_workers=16", "ray.num_workers=sixteen"),                  # a wrong type
    ("imagenet_resnet50_300ep", "imagenet_resnet50_30ep"),              # a config that is no preset
    ("byol-ray train", "byol-ray trian"),                               # not the train command
    ("output_dir=/mnt/shared/byol-ray", "output_dir=runs"),             # relative: gone with the job's dir
    ("output_dir=/mnt/shared/byol-ray", "output_dir=/tmp/byol-ray"),    # off the shared volume
    ("output_dir=/mnt/shared/byol-ray", "output_dir=/mnt/shared/byol-ray ray.storage_path=/home/ray/ckpt"),
    ("mlflow.tracking_uri=http://mlflow:5000", "mlflow.tracking_uri=sqlite:///mlflow.db"),  # a local store
    ("mlflow.tracking_uri=http://mlflow:5000", "mlflow.tracking_uri=http://mlflow-server:5000"),  # no such Service
    ("data.train=/mnt/shared/imagenet-train.beton", "data.train=/data/imagenet-train.beton"),
])
def test_entrypoint_checks_catch_breakage(rayjob, mlflow_docs, edit):
    broken = copy.deepcopy(rayjob)
    broken["spec"]["entrypoint"] = broken["spec"]["entrypoint"].replace(*edit)
    assert broken["spec"]["entrypoint"] != rayjob["spec"]["entrypoint"]
    assert entrypoint_problems(broken, mlflow_service_url(mlflow_docs["Service"])), f"not caught: {edit}"


@pytest.mark.parametrize("which", ["RayCluster", "RayJob"])
def test_kuberay_pods_share_storage_gpus_image_and_tracking(raycluster, rayjob, pvc, mlflow_docs, which):
    spec = _cluster_spec(raycluster if which == "RayCluster" else rayjob)
    _, job_cfg = resolve_command(rayjob["spec"]["entrypoint"])
    assert shared_volume_problems(spec, pvc["metadata"]["name"]) == []
    assert gpu_capacity_problems(spec, job_cfg.ray) == []
    assert image_problems(spec) == []
    assert tracking_env_problems(spec, mlflow_service_url(mlflow_docs["Service"])) == []
    assert spec["enableInTreeAutoscaling"] is False, "byol-ray needs its GPUs up before the run starts"


def _first_worker_container(spec):
    return _ray_container(_worker(spec))


SHARED_CHECK = ("shared", lambda spec, claim, ray_cfg, url: shared_volume_problems(spec, claim))
GPU_CHECK = ("gpu", lambda spec, claim, ray_cfg, url: gpu_capacity_problems(spec, ray_cfg))
IMAGE_CHECK = ("image", lambda spec, claim, ray_cfg, url: image_problems(spec))
TRACKING_CHECK = ("tracking", lambda spec, claim, ray_cfg, url: tracking_env_problems(spec, url))

KUBERAY_CROSS_MUTATIONS = {
    "worker mounts elsewhere": (SHARED_CHECK, lambda s: _first_worker_container(s)["volumeMounts"][0].update(
        mountPath="/mnt/data")),
    "head uses another claim": (SHARED_CHECK, lambda s: s["headGroupSpec"]["template"]["spec"]["volumes"][0][
        "persistentVolumeClaim"].update(claimName="byol-shard")),
    "worker forgets the volume": (SHARED_CHECK, lambda s: _worker(s)["template"]["spec"].update(volumes=[])),
    "no GPU limit": (GPU_CHECK, lambda s: _first_worker_container(s)["resources"]["limits"].pop(GPU_KEY)),
    "too few GPUs": (GPU_CHECK, lambda s: _worker(s).update(replicas=1, minReplicas=1)),
    "too few CPUs per pod": (GPU_CHECK, lambda s: _first_worker_container(s)["resources"]["limits"].update(cpu="16")),
    "stock Ray image on the workers": (IMAGE_CHECK, lambda s: _first_worker_container(s).update(
        image="rayproject/ray:2.60.0-py311-gpu")),
    "another tag on the head": (IMAGE_CHECK, lambda s: _ray_container(s["headGroupSpec"]).update(
        image=pinned_image().rsplit(":", 1)[0] + ":latest")),
    "rayVersion skew": (IMAGE_CHECK, lambda s: s.update(rayVersion="2.59.0")),
    "apt-get at pod start": (IMAGE_CHECK, lambda s: _first_worker_container(s).update(command=[_FFCV_APT])),
    "pip install at pod start": (IMAGE_CHECK, lambda s: _ray_container(s["headGroupSpec"]).update(
        command=["pip install /mnt/shared/src/byol-ray"])),
    "init container installs": (IMAGE_CHECK, lambda s: _worker(s)["template"]["spec"].update(initContainers=[
        {"name": "install", "image": pinned_image(), "command": ["bash", "-c", "pip install -e /mnt/shared/src"]}])),
    "worker without the tracking URI": (TRACKING_CHECK, lambda s: _first_worker_container(s).pop("env")),
    "head tracks to a local file": (TRACKING_CHECK, lambda s: _ray_container(s["headGroupSpec"])["env"][0].update(
        value="sqlite:////mnt/shared/mlflow.db")),
}


@pytest.mark.parametrize("mutation", list(KUBERAY_CROSS_MUTATIONS), ids=list(KUBERAY_CROSS_MUTATIONS))
def test_kuberay_cross_file_checks_catch_breakage(raycluster, rayjob, pvc, mlflow_docs, mutation):
    (_, check), mutate = KUBERAY_CROSS_MUTATIONS[mutation]
    spec = copy.deepcopy(raycluster["spec"])
    _, job_cfg = resolve_command(rayjob["spec"]["entrypoint"])
    url = mlflow_service_url(mlflow_docs["Service"])
    assert check(spec, pvc["metadata"]["name"], job_cfg.ray, url) == []  # the unmutated spec passes this check
    mutate(spec)
    assert check(spec, pvc["metadata"]["name"], job_cfg.ray, url), f"not caught: {mutation}"


def test_rayjob_cluster_is_the_raycluster(raycluster, rayjob):
    """One cluster shape: edit raycluster.yaml and rayjob.yaml's rayClusterSpec together."""
    assert rayjob["spec"]["rayClusterSpec"] == raycluster["spec"]


def test_rayjob_runs_once_and_cleans_up(rayjob):
    assert rayjob["spec"]["shutdownAfterJobFinishes"] is True
    assert rayjob["spec"]["submissionMode"] == "K8sJobMode"
    assert rayjob["spec"]["backoffLimit"] == 0, "a re-submission of the same run_name is refused (use --resume)"


@pytest.mark.parametrize("text", [
    "pip:\n  packages:\n    - /mnt/shared/src/byol-ray\n",       # the old per-job virtualenv
    "uv:\n  - byol-ray\n",
    "working_dir: /mnt/shared/src/byol-ray\n",                      # ships code that shadows the image's
    "py_modules:\n  - /mnt/shared/src/byol_ray\n",
    "pipp:\n  - /mnt/shared/src/byol-ray\n",                        # typo'd field: Ray would ignore it
    "env_vars:\n  NCCL_DEBUG: 1\n",                                 # env values must be strings
    "- pip\n",                                                      # not a mapping
])
def test_runtime_env_checks_catch_breakage(text):
    assert runtime_env_problems(text)


def test_runtime_env_check_lets_plain_env_vars_through():
    assert runtime_env_problems('env_vars:\n  NCCL_DEBUG: "WARN"\n') == []
    assert runtime_env_problems(None) == []


def test_pvc_is_shared_read_write_many(pvc, raycluster):
    assert (pvc["apiVersion"], pvc["kind"]) == ("v1", "PersistentVolumeClaim")
    assert "ReadWriteMany" in pvc["spec"]["accessModes"], "many pods on many nodes write checkpoints here"
    storage = pvc["spec"]["resources"]["requests"]["storage"]
    assert re.fullmatch(r"[0-9]+(Ki|Mi|Gi|Ti|Pi)", storage), storage
    claims = {v["persistentVolumeClaim"]["claimName"] for _, g in _groups(raycluster["spec"])
              for v in g["template"]["spec"]["volumes"] if "persistentVolumeClaim" in v}
    assert claims == {pvc["metadata"]["name"]}


# ----------------------------------------------------------------------------- KubeRay: MLflow server and staging


def test_core_manifests_match_the_structural_schemas(core_validators, mlflow_docs, stage):
    assert set(mlflow_docs) == {"ConfigMap", "Deployment", "Service", "NetworkPolicy"}
    for kind, doc in mlflow_docs.items():
        assert _errors(core_validators[kind], doc) == [], kind
    assert _errors(core_validators["Job"], stage) == []


CORE_SCHEMA_MUTATIONS = {
    "Deployment: typo'd spec key": ("Deployment", lambda d: d["spec"].update(replica=1)),
    "Deployment: replicas as a string": ("Deployment", lambda d: d["spec"].update(replicas="1")),
    "Deployment: no selector": ("Deployment", lambda d: d["spec"].pop("selector")),
    "Deployment: unknown strategy": ("Deployment", lambda d: d["spec"]["strategy"].update(type="Recreated")),
    "Deployment: old apiVersion": ("Deployment", lambda d: d.update(apiVersion="extensions/v1beta1")),
    "Deployment: container without image": ("Deployment", lambda d: d["spec"]["template"]["spec"]["containers"][0]
                                            .pop("image")),
    "Service: port as a string": ("Service", lambda d: d["spec"]["ports"][0].update(port="5000")),
    "Service: unknown type": ("Service", lambda d: d["spec"].update(type="Internal")),
    "Service: typo'd key": ("Service", lambda d: d["spec"].update(selectors=d["spec"]["selector"])),
    "Job: restartPolicy Always": ("Job", lambda d: d["spec"]["template"]["spec"].update(restartPolicy="Always")),
    "Job: no restartPolicy": ("Job", lambda d: d["spec"]["template"]["spec"].pop("restartPolicy")),
    "Job: backoffLimit as a string": ("Job", lambda d: d["spec"].update(backoffLimit="1")),
    "Job: typo'd volumeMount": ("Job", lambda d: d["spec"]["template"]["spec"]["containers"][0]["volumeMounts"][0]
                                .update(mountpath="/x")),
    "Job: enableServiceLinks as a string": ("Job", lambda d: d["spec"]["template"]["spec"].update(
        enableServiceLinks="false")),
    "ConfigMap: a spec": ("ConfigMap", lambda d: d.update(spec={})),
    "ConfigMap: a value that is no string": ("ConfigMap", lambda d: d["data"].update(workers=1)),
    "NetworkPolicy: typo'd spec key": ("NetworkPolicy", lambda d: d["spec"].update(podselector={})),
    "NetworkPolicy: unknown policy type": ("NetworkPolicy", lambda d: d["spec"].update(policyTypes=["Inbound"])),
    "NetworkPolicy: typo'd peer key": ("NetworkPolicy", lambda d: d["spec"]["ingress"][0]["from"][0].update(
        podSelectors={})),
    "NetworkPolicy: unknown protocol": ("NetworkPolicy", lambda d: d["spec"]["ingress"][0]["ports"][0].update(
        protocol="HTTP")),
    "NetworkPolicy: old apiVersion": ("NetworkPolicy", lambda d: d.update(apiVersion="extensions/v1beta1")),
}


@pytest.mark.parametrize("mutation", list(CORE_SCHEMA_MUTATIONS), ids=list(CORE_SCHEMA_MUTATIONS))
def test_core_schemas_reject_broken_manifests(core_validators, mlflow_docs, stage, mutation):
    kind, mutate = CORE_SCHEMA_MUTATIONS[mutation]
    broken = copy.deepcopy(stage if kind == "Job" else mlflow_docs[kind])
    mutate(broken)
    assert _errors(core_validators[kind], broken), f"schema accepted: {mutation}"


def test_mlflow_server_serves_artifacts_from_the_shared_volume_to_every_pod(mlflow_docs, pvc):
    deploy, service = mlflow_docs["Deployment"], mlflow_docs["Service"]
    assert mlflow_k8s_problems(mlflow_docs, pvc["metadata"]["name"]) == []
    assert deploy["spec"]["template"]["spec"]["containers"][0]["image"] == mlflow_image()


def _mlflow_args(d: dict) -> list[str]:
    return d["spec"]["template"]["spec"]["containers"][0]["args"]


def _mlflow_container(docs: dict) -> dict:
    return docs["Deployment"]["spec"]["template"]["spec"]["containers"][0]


def basic_auth_ini_swap(data: dict, old: str, new: str) -> dict:
    assert old in data["basic_auth.ini"], f"stale mutation: {old!r}"
    return {"basic_auth.ini": data["basic_auth.ini"].replace(old, new)}


def _edit_args(old: str, new: str):
    def mutate(docs):
        args = _mlflow_args(docs["Deployment"])
        assert any(old in a for a in args), f"stale mutation: {old!r}"
        args[:] = [a.replace(old, new) for a in args]
    return mutate


MLFLOW_MUTATIONS = {
    "two replicas on one SQLite file": lambda d: d["Deployment"]["spec"].update(replicas=2),
    "rolling update (two writers)": lambda d: d["Deployment"]["spec"]["strategy"].update(type="RollingUpdate"),
    "Service selects nothing": lambda d: d["Service"]["spec"]["selector"].update({"app.kubernetes.io/name": "mlfow"}),
    "Service targets another port": lambda d: d["Service"]["spec"]["ports"][0].update(targetPort=8080),
    "store inside the pod": _edit_args("sqlite:////mnt/shared/mlflow/mlflow.db", "sqlite:////tmp/mlflow.db"),
    "artifacts inside the pod": _edit_args("--artifacts-destination /mnt/shared/mlflow/artifacts",
                                           "--artifacts-destination /tmp/artifacts"),
    "no artifact serving": _edit_args("--workers 1", "--workers 1 --no-serve-artifacts"),
    "loopback only": _edit_args("--host 0.0.0.0", "--host 127.0.0.1"),
    "several SQLite writers": _edit_args("--workers 1", "--workers 4"),
    "default allowed hosts (refuses mlflow:5000)": lambda d: _mlflow_args(d["Deployment"]).__setitem__(
        0, re.sub(r"--allowed-hosts '[^']*'", "", _mlflow_args(d["Deployment"])[0])),
    "typo'd flag": _edit_args("--artifacts-destination", "--artifact-destination"),
    "PVC not mounted": lambda d: d["Deployment"]["spec"]["template"]["spec"].update(volumes=[]),
    "byol-ray's image (no Flask-WTF)": lambda d: _mlflow_container(d).update(image=pinned_image()),
    "plain MLflow image (no Flask-WTF, no boto3)": lambda d: _mlflow_container(d).update(
        image=mlflow_image().removesuffix("-full")),
    "another MLflow than the lock's": lambda d: _mlflow_container(d).update(image="ghcr.io/mlflow/mlflow:v3.16.0-full"),
    "image not pulled at start": lambda d: _mlflow_container(d).update(imagePullPolicy="IfNotPresent"),
    "service links on": lambda d: d["Deployment"]["spec"]["template"]["spec"].pop("enableServiceLinks"),
    "no authentication": _edit_args("exec mlflow server --app-name basic-auth", "exec mlflow server"),
    "admin password in the manifest": lambda d: _env(_mlflow_container(d))["MLFLOW_AUTH_ADMIN_PASSWORD"].update(
        value="hunter2hunter2"),
    "CSRF key missing": lambda d: _mlflow_container(d).update(env=[
        e for e in _mlflow_container(d)["env"] if e["name"] != "MLFLOW_FLASK_SERVER_SECRET_KEY"]),
    "auth config not mounted": lambda d: _mlflow_container(d).update(volumeMounts=[
        m for m in _mlflow_container(d)["volumeMounts"] if m["mountPath"] != "/etc/mlflow"]),
    "users' store inside the pod": lambda d: d["ConfigMap"]["data"].update(basic_auth_ini_swap(
        d["ConfigMap"]["data"], "sqlite:////mnt/shared/mlflow/basic_auth.db", "sqlite:///basic_auth.db")),
    "admin password in the ConfigMap": lambda d: d["ConfigMap"]["data"].update(basic_auth_ini_swap(
        d["ConfigMap"]["data"], "default_permission = READ", "default_permission = READ\nadmin_password = hunter2hunter2")),
}


@pytest.mark.parametrize("mutation", list(MLFLOW_MUTATIONS), ids=list(MLFLOW_MUTATIONS))
def test_mlflow_checks_catch_breakage(mlflow_docs, pvc, mutation):
    broken = copy.deepcopy(mlflow_docs)
    MLFLOW_MUTATIONS[mutation](broken)
    assert mlflow_k8s_problems(broken, pvc["metadata"]["name"]), \
        f"not caught: {mutation}"


def kuberay_pod_labels(cluster_name: str, node_type: str, group: dict) -> dict[str, str]:
    """The labels KubeRay 1.5.1 gives a Ray pod (controllers/ray/common/pod.go, labelPod): its own, then the
    template's, except ray.io/node-type, ray.io/group and ray.io/cluster, which the template cannot override."""
    labels = {"ray.io/is-ray-node": "yes", "ray.io/cluster": cluster_name, "ray.io/node-type": node_type,
              "ray.io/group": group.get("groupName", "headgroup"), "app.kubernetes.io/name": "kuberay",
              "app.kubernetes.io/created-by": "kuberay-operator"}
    for key, value in group["template"].get("metadata", {}).get("labels", {}).items():
        if key not in ("ray.io/node-type", "ray.io/group", "ray.io/cluster"):
            labels[key] = value
    return labels


def _selects(selector: dict, labels: dict) -> bool:
    """A LabelSelector with matchLabels only (the policy's peers use nothing else; others are refused)."""
    return selector.get("matchLabels", {}).items() <= labels.items() and not selector.get("matchExpressions")


def network_policy_problems(policy: dict, docs: dict, clusters: dict[str, dict], stage: dict) -> list[str]:
    """Only byol-ray's pods reach the MLflow port: the Ray pods (as KubeRay labels them) and the staging Job."""
    problems = []
    spec = policy["spec"]
    mlflow_labels = docs["Deployment"]["spec"]["template"]["metadata"]["labels"]
    if not spec["podSelector"].get("matchLabels") or not _selects(spec["podSelector"], mlflow_labels):
        problems.append("the NetworkPolicy does not select the MLflow pods")
    if "Ingress" not in spec.get("policyTypes", ["Ingress"]):
        problems.append("the NetworkPolicy does not restrict ingress")
    port = docs["Service"]["spec"]["ports"][0].get("targetPort", docs["Service"]["spec"]["ports"][0]["port"])
    peers = []
    for rule in spec.get("ingress", []):
        if not rule.get("from"):
            problems.append("an ingress rule without `from` admits every pod and address")
        for peer in rule.get("from", []):
            if set(peer) != {"podSelector"} or not peer["podSelector"].get("matchLabels") \
                    or peer["podSelector"].get("matchExpressions"):
                problems.append(f"peer {peer} admits more than pods of this namespace with given labels")
            else:
                peers.append(peer["podSelector"])
        ports = rule.get("ports", [])
        if [(p.get("protocol", "TCP"), p.get("port")) for p in ports] != [("TCP", port)]:
            problems.append(f"an ingress rule opens {ports or 'every port'}, not TCP {port} alone")
    pods = {}
    for doc_name, (cluster_name, cluster_spec) in clusters.items():
        for group_name, group in _groups(cluster_spec):
            node_type = "head" if group_name == "head" else "worker"
            pods[f"{doc_name} {group_name}"] = kuberay_pod_labels(cluster_name, node_type, group)
    pods["stage.yaml"] = stage["spec"]["template"]["metadata"]["labels"]
    for where, labels in pods.items():
        if not any(_selects(sel, labels) for sel in peers):
            problems.append(f"the NetworkPolicy refuses {where} (labels {labels})")
    strangers = {"another app": {"app.kubernetes.io/name": "other"},
                 "another team's Ray pod": {"ray.io/is-ray-node": "yes", "app.kubernetes.io/name": "kuberay"}}
    for where, labels in strangers.items():
        if any(_selects(sel, labels) for sel in peers):
            problems.append(f"the NetworkPolicy admits {where} ({labels})")
    return problems


def _policy_clusters(raycluster: dict, rayjob: dict) -> dict[str, tuple[str, dict]]:
    # A RayJob's cluster is named <RayJob name>-<5 random characters>.
    return {"raycluster.yaml": (raycluster["metadata"]["name"], raycluster["spec"]),
            "rayjob.yaml": (rayjob["metadata"]["name"] + "-x7k2q", rayjob["spec"]["rayClusterSpec"])}


def test_only_byol_ray_pods_reach_the_mlflow_port(mlflow_docs, raycluster, rayjob, stage):
    assert network_policy_problems(mlflow_docs["NetworkPolicy"], mlflow_docs, _policy_clusters(raycluster, rayjob),
                                   stage) == []


def _ingress(d: dict) -> dict:
    return d["spec"]["ingress"][0]


NETWORK_POLICY_MUTATIONS = {
    "selects no MLflow pod": lambda d: d["spec"]["podSelector"]["matchLabels"].update(
        {"app.kubernetes.io/name": "mlfow"}),
    "selects every pod": lambda d: d["spec"].update(podSelector={}),
    "egress only": lambda d: d["spec"].update(policyTypes=["Egress"]),
    "rule from anywhere": lambda d: _ingress(d).pop("from"),
    "every pod in the namespace": lambda d: _ingress(d)["from"].append({"podSelector": {}}),
    "every namespace": lambda d: _ingress(d)["from"].append({"namespaceSelector": {}}),
    "an address block": lambda d: _ingress(d)["from"].append({"ipBlock": {"cidr": "0.0.0.0/0"}}),
    "another port": lambda d: _ingress(d)["ports"][0].update(port=5001),
    "every port": lambda d: _ingress(d).pop("ports"),
    "Ray label KubeRay does not set": lambda d: _ingress(d)["from"][0]["podSelector"]["matchLabels"].update(
        {"ray.io/is-ray-node": "true"}),
    "KubeRay's own app label (overridden by the templates)": lambda d: _ingress(d)["from"][0]["podSelector"][
        "matchLabels"].update({"app.kubernetes.io/name": "kuberay"}),
    "every Ray pod of every cluster": lambda d: _ingress(d)["from"][0]["podSelector"]["matchLabels"].pop(
        "app.kubernetes.io/name"),
    "staging Job refused": lambda d: _ingress(d)["from"].pop(1),
    "cluster name (the RayJob's is generated)": lambda d: _ingress(d)["from"][0]["podSelector"].update(
        matchLabels={"ray.io/cluster": "byol-ray"}),
}


@pytest.mark.parametrize("mutation", list(NETWORK_POLICY_MUTATIONS), ids=list(NETWORK_POLICY_MUTATIONS))
def test_network_policy_checks_catch_breakage(mlflow_docs, raycluster, rayjob, stage, mutation):
    broken = copy.deepcopy(mlflow_docs["NetworkPolicy"])
    NETWORK_POLICY_MUTATIONS[mutation](broken)
    assert network_policy_problems(broken, mlflow_docs, _policy_clusters(raycluster, rayjob), stage), \
        f"not caught: {mutation}"


def stage_problems(job: dict, rayjob: dict, claim: str) -> list[str]:
    """The staging Job writes, from the pinned image, exactly the .beton the RayJob trains on."""
    problems = []
    pod = job["spec"]["template"]["spec"]
    container = pod["containers"][0]
    for c in _containers(pod):
        if c["image"] != pinned_image() and c["name"] == container["name"]:
            problems.append(f"stage container image {c['image']} is not {pinned_image()}")
        problems += install_problems(_container_command(c), f"stage.yaml/{c['name']}")
    command = _container_command(container)
    at = command.find("byol-ray prepare")
    if at < 0:
        return problems + ["the staging Job does not run `byol-ray prepare`"]
    line = command[at:]
    try:
        args = parse_cli_command(" ".join(shlex.split(line)))
    except SystemExit:
        return problems + [f"`{line}` does not parse"]
    _, cfg = resolve_command(rayjob["spec"]["entrypoint"])
    if args.output != cfg.data.train:
        problems.append(f"stage writes {args.output}, the RayJob trains on {cfg.data.train}")
    if not _under_shared(args.source):
        problems.append(f"the ImageFolder {args.source} is not on the shared volume")
    volumes = {v["name"] for v in pod.get("volumes", []) if v.get("persistentVolumeClaim", {}).get("claimName") == claim}
    if [m["mountPath"] for m in container.get("volumeMounts", []) if m["name"] in volumes] != [SHARED]:
        problems.append(f"the staging pod does not mount PVC {claim!r} at {SHARED}")
    if GPU_KEY in container.get("resources", {}).get("limits", {}):
        problems.append("the staging Job asks for GPUs; prepare runs on CPUs")
    return problems


def test_stage_job_prepares_the_file_the_rayjob_trains_on(stage, rayjob, pvc):
    assert stage_problems(stage, rayjob, pvc["metadata"]["name"]) == []


def _stage_edit(old: str, new: str):
    def mutate(job):
        args = job["spec"]["template"]["spec"]["containers"][0]["args"]
        assert any(old in a for a in args), f"stale mutation: {old!r}"
        args[:] = [a.replace(old, new) for a in args]
    return mutate


STAGE_MUTATIONS = {
    "writes another file": _stage_edit("/mnt/shared/imagenet-train.beton --max", "/mnt/shared/imagenet.beton --max"),
    "old flag name": _stage_edit("--num-workers 32", "--workers 32"),
    "reads pod-local images": _stage_edit("prepare /mnt/shared/imagenet/train", "prepare /data/imagenet/train"),
    "stock Ray image": lambda j: j["spec"]["template"]["spec"]["containers"][0].update(
        image="rayproject/ray:2.60.0-py311-gpu"),
    "installs at start": _stage_edit("exec byol-ray prepare", "pip install /mnt/shared/src && exec byol-ray prepare"),
    "PVC not mounted": lambda j: j["spec"]["template"]["spec"]["containers"][0].update(volumeMounts=[]),
    "asks for a GPU": lambda j: j["spec"]["template"]["spec"]["containers"][0]["resources"]["limits"].update(
        {GPU_KEY: 1}),
}


@pytest.mark.parametrize("mutation", list(STAGE_MUTATIONS), ids=list(STAGE_MUTATIONS))
def test_stage_checks_catch_breakage(stage, rayjob, pvc, mutation):
    broken = copy.deepcopy(stage)
    STAGE_MUTATIONS[mutation](broken)
    assert stage_problems(broken, rayjob, pvc["metadata"]["name"]), f"not caught: {mutation}"


# ----------------------------------------------------------------------------- one image everywhere


def all_images(aws: dict, raycluster: dict, rayjob: dict, mlflow_docs: dict, stage: dict) -> dict[str, str]:
    out = {"aws-gpu.yaml docker.image": aws["docker"]["image"]}
    for doc_name, doc in (("raycluster.yaml", raycluster), ("rayjob.yaml", rayjob)):
        for group, g in _groups(_cluster_spec(doc)):
            for c in _containers(g["template"]["spec"]):
                out[f"{doc_name} {group}/{c['name']}"] = c["image"]
    for c in rayjob["spec"].get("submitterPodTemplate", {}).get("spec", {}).get("containers", []):
        out[f"rayjob.yaml submitter/{c['name']}"] = c["image"]
    for c in stage["spec"]["template"]["spec"]["containers"]:
        out[f"stage.yaml {c['name']}"] = c["image"]
    return out


def test_every_node_and_pod_runs_the_pinned_image(aws, raycluster, rayjob, mlflow_docs, stage):
    images = all_images(aws, raycluster, rayjob, mlflow_docs, stage)
    assert {where: i for where, i in images.items() if i != pinned_image()} == {}
    assert image_ref_problems(pinned_image()) == []


@pytest.mark.parametrize("image", [
    "ghcr.io/byol-ray/byol-ray:0.1.0",                  # the version: one tag for many builds
    "ghcr.io/byol-ray/byol-ray:latest",
    "ghcr.io/byol-ray/byol-ray:6276cc03279b-dirty",     # uncommitted code: not reproducible from git
    "ghcr.io/byol-ray/byol-ray:6276cc0",                # another length than make image's
    "ghcr.io/other/byol-ray:6276cc03279b",              # not the repository make image tags
])
def test_image_reference_check_catches_tags_make_image_does_not_write(image):
    assert image_ref_problems(image), image


def pod_hygiene_problems(doc: dict) -> list[str]:
    """Every pod: images pulled at start (or pinned by digest), no Service links, /dev/shm in memory for Ray pods;
    the RayJob's submitter too."""
    problems = []
    if doc["kind"] == "Job":
        templates = [("stage Job", doc["spec"]["template"]["spec"])]
    else:
        templates = [(f"{doc['kind']} {name}", g["template"]["spec"]) for name, g in _groups(_cluster_spec(doc))]
    if doc["kind"] == "RayJob" and "submitterPodTemplate" in doc["spec"]:
        templates.append(("RayJob submitter", doc["spec"]["submitterPodTemplate"]["spec"]))
    elif doc["kind"] == "RayJob":
        problems.append("RayJob: no submitterPodTemplate: KubeRay's default submitter pulls IfNotPresent")
    for where, pod in templates:
        if pod.get("enableServiceLinks") is not False:
            problems.append(f"{where}: enableServiceLinks is not false")
        for c in _containers(pod):
            if c.get("imagePullPolicy") != "Always" and "@sha256:" not in c["image"]:
                problems.append(f"{where}/{c['name']}: image neither pulled at every start nor pinned by digest")
        if doc["kind"] in ("RayCluster", "RayJob") and "submitter" not in where:
            volumes = {v["name"]: v for v in pod.get("volumes", [])}
            shm = [m for m in pod["containers"][0].get("volumeMounts", []) if m["mountPath"] == "/dev/shm"]
            if not shm or volumes.get(shm[0]["name"], {}).get("emptyDir", {}).get("medium") != "Memory":
                problems.append(f"{where}: no memory emptyDir at /dev/shm (the container default is 64 MiB)")
    return problems


def test_every_pod_pulls_its_image_and_keeps_service_links_out(raycluster, rayjob, stage):
    for doc in (raycluster, rayjob, stage):
        assert pod_hygiene_problems(doc) == [], doc["kind"]


POD_HYGIENE_MUTATIONS = {
    "head pulls IfNotPresent": ("RayCluster", lambda d: _ray_container(d["spec"]["headGroupSpec"]).update(
        imagePullPolicy="IfNotPresent")),
    "worker without a pull policy": ("RayCluster", lambda d: _first_worker_container(d["spec"]).pop("imagePullPolicy")),
    "head without /dev/shm": ("RayCluster", lambda d: _ray_container(d["spec"]["headGroupSpec"]).update(
        volumeMounts=[m for m in _ray_container(d["spec"]["headGroupSpec"])["volumeMounts"]
                      if m["mountPath"] != "/dev/shm"])),
    "worker /dev/shm on disk": ("RayCluster", lambda d: [v["emptyDir"].pop("medium") for v in
                                                         _worker(d["spec"])["template"]["spec"]["volumes"]
                                                         if "emptyDir" in v]),
    "worker service links on": ("RayCluster", lambda d: _worker(d["spec"])["template"]["spec"].pop(
        "enableServiceLinks")),
    "default submitter": ("RayJob", lambda d: d["spec"].pop("submitterPodTemplate")),
    "submitter pulls IfNotPresent": ("RayJob", lambda d: d["spec"]["submitterPodTemplate"]["spec"]["containers"][0]
                                     .update(imagePullPolicy="IfNotPresent")),
    "stage pulls IfNotPresent": ("Job", lambda d: d["spec"]["template"]["spec"]["containers"][0].pop(
        "imagePullPolicy")),
    "stage service links on": ("Job", lambda d: d["spec"]["template"]["spec"].pop("enableServiceLinks")),
}


@pytest.mark.parametrize("mutation", list(POD_HYGIENE_MUTATIONS), ids=list(POD_HYGIENE_MUTATIONS))
def test_pod_hygiene_checks_catch_breakage(raycluster, rayjob, stage, mutation):
    kind, mutate = POD_HYGIENE_MUTATIONS[mutation]
    broken = copy.deepcopy({"RayCluster": raycluster, "RayJob": rayjob, "Job": stage}[kind])
    mutate(broken)
    assert pod_hygiene_problems(broken), f"not caught: {mutation}"


def preemption_problems(spec: dict) -> list[str]:
    """Every GPU worker pod drains itself before it goes: a preStop hook `byol-ray spot-watch --drain-now
    --deadline-s D` that parses, D below the grace period (which counts from before preStop), and Ray's own
    SIGTERM drain timeout set to D as well."""
    problems = []
    for name, group in _groups(spec)[1:]:
        pod = group["template"]["spec"]
        container = _ray_container(group)
        grace = pod.get("terminationGracePeriodSeconds", 30)
        command = container.get("lifecycle", {}).get("preStop", {}).get("exec", {}).get("command")
        if not command:
            problems.append(f"{name}: no preStop exec hook: a reclaimed pod's Ray node is killed without a drain")
            continue
        try:
            args = parse_cli_command(shlex.join(command))
        except (SystemExit, AssertionError) as exc:
            problems.append(f"{name}: preStop {command} does not parse: {exc}")
            continue
        if args.command != "spot-watch" or not getattr(args, "drain_now", False):
            problems.append(f"{name}: preStop {command} is not `byol-ray spot-watch --drain-now`")
            continue
        deadline = float(args.deadline_s)
        if deadline + 10 > grace:
            problems.append(f"{name}: the drain's {deadline:g} s leave less than 10 s of the "
                            f"{grace} s grace period for SIGTERM and the shutdown")
        env = _env(container).get("RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S", {}).get("value")
        if env is None or float(env) != deadline:
            problems.append(f"{name}: RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S={env}, not the preStop deadline {deadline:g}")
    return problems


def test_gpu_workers_drain_before_they_go(raycluster, rayjob):
    for doc in (raycluster, rayjob):
        assert preemption_problems(_cluster_spec(doc)) == []


def _pre_stop(spec: dict) -> list[str]:
    return _first_worker_container(spec)["lifecycle"]["preStop"]["exec"]["command"]


PREEMPTION_MUTATIONS = {
    "no preStop": lambda s: _first_worker_container(s).pop("lifecycle"),
    "default grace period": lambda s: _worker(s)["template"]["spec"].pop("terminationGracePeriodSeconds"),
    "deadline past the grace period": lambda s: _pre_stop(s).__setitem__(-1, "130"),
    "the watcher, not a drain": lambda s: _pre_stop(s).__setitem__(slice(2, None), ["--cloud", "aws"]),
    "typo'd flag": lambda s: _pre_stop(s).__setitem__(3, "--deadline-ms"),
    "not byol-ray": lambda s: _pre_stop(s).__setitem__(slice(None), ["ray", "stop"]),
    "Ray's drain at its 30 s default": lambda s: _first_worker_container(s).update(env=[
        e for e in _first_worker_container(s)["env"] if e["name"] != "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S"]),
}


@pytest.mark.parametrize("mutation", list(PREEMPTION_MUTATIONS), ids=list(PREEMPTION_MUTATIONS))
def test_preemption_checks_catch_breakage(raycluster, mutation):
    spec = copy.deepcopy(raycluster["spec"])
    PREEMPTION_MUTATIONS[mutation](spec)
    assert preemption_problems(spec), f"not caught: {mutation}"


def credentials_problems(spec: dict, training_secret: str) -> list[str]:
    """Every Ray container logs in to MLflow as the training user, from the Secret, never a literal password."""
    problems = []
    for name, group in _groups(spec):
        env = _env(_ray_container(group))
        for var, key in (("MLFLOW_TRACKING_USERNAME", "username"), ("MLFLOW_TRACKING_PASSWORD", "password")):
            if _from_secret(env, var) != (training_secret, key):
                problems.append(f"{name}: {var} is not key {key!r} of Secret {training_secret!r}")
    if (spec.get("authOptions") or {}).get("mode") != "token":
        problems.append("Ray token authentication is off (authOptions.mode: token)")
    return problems


def test_ray_pods_log_in_to_mlflow_and_to_each_other(raycluster, rayjob):
    for doc in (raycluster, rayjob):
        assert credentials_problems(_cluster_spec(doc), "mlflow-training") == []


CREDENTIALS_MUTATIONS = {
    "literal password": lambda s: _env(_first_worker_container(s))["MLFLOW_TRACKING_PASSWORD"].update(
        value="hunter2hunter2"),
    "head without a user": lambda s: _ray_container(s["headGroupSpec"]).update(env=[
        e for e in _ray_container(s["headGroupSpec"])["env"] if e["name"] != "MLFLOW_TRACKING_USERNAME"]),
    "another Secret": lambda s: _env(_first_worker_container(s))["MLFLOW_TRACKING_USERNAME"]["valueFrom"][
        "secretKeyRef"].update(name="mlflow-admin"),
    "no Ray auth": lambda s: s.pop("authOptions"),
}


@pytest.mark.parametrize("mutation", list(CREDENTIALS_MUTATIONS), ids=list(CREDENTIALS_MUTATIONS))
def test_credentials_checks_catch_breakage(raycluster, mutation):
    spec = copy.deepcopy(raycluster["spec"])
    CREDENTIALS_MUTATIONS[mutation](spec)
    assert credentials_problems(spec, "mlflow-training"), f"not caught: {mutation}"


# ----------------------------------------------------------------------------- docs/cluster.md


def documented_train_problems(command: str, aws: dict, raycluster: dict) -> list[str]:
    try:
        args, cfg = resolve_command(command)
    except (AssertionError, ConfigError, SystemExit) as exc:
        return [f"{command}: does not resolve: {exc}"]
    if args.resume:  # a resumed run reloads its saved config; its output_dir must be where that config lives
        out = [o.split("=", 1)[1] for o in args.overrides if o.startswith("output_dir=")]
        return [] if out and _under_shared(out[-1]) else [f"{command}: --resume without output_dir under {SHARED}"]
    problems = output_problems(cfg, what=command)
    problems += [f"{command}: {p}" for p in aws_capacity_problems(aws, cfg.ray)]
    problems += [f"{command}: {p}" for p in gpu_capacity_problems(raycluster["spec"], cfg.ray)]
    return problems


def test_every_documented_train_command_resolves_and_fits_both_clusters(aws, raycluster):
    commands = doc_commands(DOCS.read_text(), "train")
    assert len(commands) >= 3, commands
    assert any(parse_cli_command(c).resume for c in commands), "the docs show how to resume"
    for command in commands:
        assert documented_train_problems(command, aws, raycluster) == [], command


@pytest.mark.parametrize("command", [
    "byol-ray train --config imagenet_resnet50_300ep ray.num_workers=16 output_dir=runs "
    "data.train=/mnt/shared/imagenet-train.beton mlflow.tracking_uri=http://mlflow:5000",           # relative outputs
    "byol-ray train --config imagenet_resnet50_300ep ray.num_workers=16 output_dir=/mnt/shared/byol-ray "
    "data.train=/mnt/shared/imagenet-train.beton",                                                  # local sqlite store
    "byol-ray train --config imagenet_resnet50_300ep ray.num_workers=16 output_dir=/mnt/shared/byol-ray "
    "data.train=/mnt/shared/imagenet-train.beton mlflow.tracking_uri=sqlite:////mnt/shared/mlflow.db",
    "byol-ray train --config imagenet_resnet50_300ep ray.num_workers=16 output_dir=/mnt/shared/byol-ray "
    "data.train=/data/imagenet-train.beton mlflow.tracking_uri=http://mlflow:5000",                 # node-local data
    "byol-ray train --config imagenet_resnet50_300ep ray.num_workers=16 output_dir=/mnt/shared/byol-ray "
    "ray.storage_path=ckpt data.train=/mnt/shared/imagenet-train.beton mlflow.tracking_uri=http://mlflow:5000",
    "byol-ray train --config imagenet_resnet50_300ep ray.num_workers=32 output_dir=/mnt/shared/byol-ray "
    "data.train=/mnt/shared/imagenet-train.beton mlflow.tracking_uri=http://mlflow:5000",           # 32 GPUs: too few
    "byol-ray train --resume imagenet-r50-300ep output_dir=runs",
])
def test_documented_train_checks_catch_breakage(aws, raycluster, command):
    assert documented_train_problems(command, aws, raycluster), command


def test_documented_job_submissions_ship_no_code():
    """byol-ray is in the image: a --working-dir or a pip runtime env would shadow or rebuild it per job."""
    lines = [line for line in doc_shell_lines(DOCS.read_text()) if "ray job submit" in line]
    assert lines
    for line in lines:
        assert "--working-dir" not in line and "--runtime-env" not in line, line


def test_every_documented_prepare_command_parses():
    commands = doc_commands(DOCS.read_text(), "prepare")
    assert commands
    for command in commands:
        args = parse_cli_command(command)
        assert args.command == "prepare" and args.output.endswith(".beton")
        assert "imagenet" not in args.source or args.max_resolution == 384, command  # ImageNet stored at 384 px


def test_docs_name_files_that_exist():
    text = DOCS.read_text()
    paths = re.findall(r"(?<![\w/.-])((?:cluster|scripts|tests|docs|byol_ray)/[\w/.-]*\w)", text)
    paths += re.findall(r"\]\(([^)#\s]+)\)", text)  # markdown links, relative to docs/
    paths += [name for name in ("Dockerfile", ".dockerignore", "requirements.lock", "Makefile") if name in text]
    assert len(paths) > 5
    for path in paths:
        if "://" in path:
            continue
        in_repo, in_docs = REPO / path, DOCS.parent / path
        assert in_repo.exists() or in_docs.exists(), path


NEWCOMER_ORDER = ("make image", "aws ec2 create-security-group --group-name", "aws efs create-mount-target",
                  "ray up cluster/aws-gpu.yaml", "byol-ray prepare", "byol-ray train", "byol-ray linear-eval",
                  "byol-ray promote")  # staging is a `ray job submit`: after `ray up`


def docs_flow_problems(markdown: str, aws: dict, raycluster: dict, mlflow_docs: dict) -> list[str]:
    """The guide as a newcomer follows it: the steps in order; the nodes' security group created under the name
    aws-gpu.yaml gives, with the EFS group admitting NFS from it, before `ray up`; the KubeRay token Secret named
    as KubeRay 1.5.1 names it and exported for `ray job submit`; the MLflow Secrets with the keys the manifests
    read; the image sed aimed at `make image`'s repository."""
    problems = []
    lines = doc_shell_lines(markdown)
    firsts = []
    for step in NEWCOMER_ORDER:
        at = next((i for i, line in enumerate(lines) if step in line), None)
        if at is None:
            problems.append(f"the guide never runs `{step}`")
        firsts.append(at)
    known = [(s, i) for s, i in zip(NEWCOMER_ORDER, firsts) if i is not None]
    for (a, i), (b, j) in zip(known, known[1:]):
        if i > j:
            problems.append(f"the guide runs `{b}` before `{a}`")
    text = "\n".join(lines)
    group = aws["provider"].get("security_group", {}).get("GroupName")
    sg = re.search(r"(\w+)=\$\(aws ec2 create-security-group --group-name (\S+)", text)
    if not sg or sg.group(2) != group:
        problems.append(f"the guide does not create the nodes' security group {group!r} (provider.security_group)")
    elif not re.search(rf"authorize-security-group-ingress .*--protocol tcp --port 2049 --source-group \${sg.group(1)}\b",
                       text):
        problems.append("the EFS security group does not admit NFS (TCP 2049) from the nodes' group")
    secret = raycluster["metadata"]["name"]  # KubeRay 1.5.1: the token Secret is named after the RayCluster
    if not re.search(rf"kubectl create secret generic {re.escape(secret)} --from-literal=auth_token=", text):
        problems.append(f"the guide does not create the RayCluster's token Secret {secret!r} (key auth_token)")
    if f"export RAY_AUTH_TOKEN=$(kubectl get secret {secret} -o jsonpath='{{.data.auth_token}}' | base64 -d)" not in text:
        problems.append(f"the guide does not export RAY_AUTH_TOKEN from Secret {secret!r}")
    if "export RAY_AUTH_MODE=token" not in text:
        problems.append("the guide does not export RAY_AUTH_MODE=token")
    wanted: dict[str, set[str]] = {}
    pods = [mlflow_docs["Deployment"]["spec"]["template"]["spec"]["containers"][0]]
    pods += [_ray_container(g) for _, g in _groups(raycluster["spec"])]
    for container in pods:
        for e in container.get("env", []):
            ref = e.get("valueFrom", {}).get("secretKeyRef")
            if ref and ref["name"] != secret:
                wanted.setdefault(ref["name"], set()).add(ref["key"])
    for name, keys in wanted.items():
        created = next((line for line in lines if f"kubectl create secret generic {name} " in line), None)
        if created is None:
            problems.append(f"the guide does not create the Secret {name!r}")
            continue
        have = set(re.findall(r"--from-literal=([\w.-]+)=", created))
        if keys - have:
            problems.append(f"Secret {name!r} is created without the keys {sorted(keys - have)} the manifests read")
    sed = next((line for line in lines if line.startswith("sed -i -E") and "cluster/aws-gpu.yaml" in line), "")
    if image_repo().replace(".", "\\.") not in sed or "cluster/kuberay/*.yaml" not in sed:
        problems.append("the guide's sed does not point every file of cluster/ at the new tag")
    return problems


def test_the_guide_runs_every_step_in_order_with_names_that_match(aws, raycluster, mlflow_docs):
    assert docs_flow_problems(DOCS.read_text(), aws, raycluster, mlflow_docs) == []


def _doc_swap(old: str, new: str):
    def mutate(text, aws, raycluster, mlflow_docs):
        assert old in text, f"stale mutation: {old!r}"
        return text.replace(old, new)
    return mutate


def _move_block(marker: str, after: str):
    """Move the fenced block holding `marker` to just after the block holding `after`."""
    def mutate(text, aws, raycluster, mlflow_docs):
        blocks = re.findall(r"```bash\n.*?```\n", text, flags=re.S)
        moved = next(b for b in blocks if marker in b)
        target = next(b for b in blocks if after in b)
        text = text.replace(moved, "", 1)
        return text.replace(target, target + moved, 1)
    return mutate


def _rename_cluster(text, aws, raycluster, mlflow_docs):
    raycluster["metadata"]["name"] = "byol"
    return text


def _rekey_secret(text, aws, raycluster, mlflow_docs):
    env = _env(mlflow_docs["Deployment"]["spec"]["template"]["spec"]["containers"][0])
    env["MLFLOW_AUTH_ADMIN_PASSWORD"]["valueFrom"]["secretKeyRef"]["key"] = "admin-password"
    return text


def _rename_group(text, aws, raycluster, mlflow_docs):
    aws["provider"]["security_group"]["GroupName"] = "ray-autoscaler-byol-ray"
    return text


DOCS_FLOW_MUTATIONS = {
    "security group created after ray up": _move_block("create-security-group", "ray up cluster/aws-gpu.yaml"),
    "promote before the evaluation": _doc_swap("byol-ray linear-eval --model", "byol-ray promot --model"),
    "training before staging": _move_block("byol-ray prepare /mnt/shared/imagenet/train", "byol-ray train"),
    "another group name than the config's": _rename_group,
    "EFS admits another port": _doc_swap("--port 2049 --source-group", "--port 2048 --source-group"),
    "EFS admits another group": _doc_swap("--source-group $NODES_SG", "--source-group $EFS_SG"),
    "RayCluster renamed (its token Secret too)": _rename_cluster,
    "token under another key": _doc_swap("--from-literal=auth_token=", "--from-literal=token="),
    "token not exported": _doc_swap("export RAY_AUTH_TOKEN=$(kubectl get secret byol-ray",
                                    "RAY_AUTH_TOKEN=$(kubectl get secret byol-ray"),
    "MLflow Secret key the guide does not create": _rekey_secret,
    "training Secret never created": _doc_swap("kubectl create secret generic mlflow-training",
                                               "kubectl create secret generic mlflow-train"),
    "sed misses the KubeRay files": _doc_swap("cluster/aws-gpu.yaml cluster/kuberay/*.yaml", "cluster/aws-gpu.yaml"),
}


@pytest.mark.parametrize("mutation", list(DOCS_FLOW_MUTATIONS), ids=list(DOCS_FLOW_MUTATIONS))
def test_guide_checks_catch_breakage(aws, raycluster, mlflow_docs, mutation):
    aws, raycluster, mlflow_docs = copy.deepcopy(aws), copy.deepcopy(raycluster), copy.deepcopy(mlflow_docs)
    text = DOCS_FLOW_MUTATIONS[mutation](DOCS.read_text(), aws, raycluster, mlflow_docs)
    assert docs_flow_problems(text, aws, raycluster, mlflow_docs), f"not caught: {mutation}"


def documented_downstream_problems(markdown: str, aws: dict, raycluster: dict) -> list[str]:
    """The documented spot-watch, linear-eval and promote commands parse; the watcher and the preStop hook are the
    ones the cluster files run; the evaluation runs on a GPU against the staged validation split and the
    preset's registered name, and promote moves @champion on the metric linear-eval writes."""
    problems = []
    watch = doc_commands(markdown, "spot-watch")
    aws_line = next((c for c in aws["worker_start_ray_commands"] if "byol-ray spot-watch" in c), "")
    aws_watch = " ".join(re.split(r"\s>", aws_line[aws_line.find("byol-ray spot-watch"):])[0].split())
    pre_stop = shlex.join(_ray_container(_worker(raycluster["spec"])).get("lifecycle", {}).get("preStop", {})
                          .get("exec", {}).get("command", ["?"]))
    for want, what in ((aws_watch, "aws-gpu.yaml's watcher"), (pre_stop, "the workers' preStop hook")):
        if not any(" ".join(re.split(r"\s>", c)[0].split()) == want for c in watch):
            problems.append(f"the guide does not show {what}: {want}")
    for command in watch:
        try:
            parse_cli_command(re.split(r"\s[>&]", command)[0])
        except SystemExit:
            problems.append(f"`{command}` does not parse")
    preset = load_config(["imagenet_resnet50_300ep"], [])
    staged = {parse_cli_command(c).output for c in doc_commands(markdown, "prepare")}
    evals = doc_commands(markdown, "linear-eval")
    promotes = doc_commands(markdown, "promote")
    if not evals or not promotes:
        return problems + ["the guide shows no `byol-ray linear-eval` and `byol-ray promote`"]
    for command in evals:
        try:
            args = parse_cli_command(command)
        except SystemExit:
            problems.append(f"`{command}` does not parse")
            continue
        if not args.model.startswith(preset.mlflow.register_name):
            problems.append(f"`{command}`: --model {args.model} is not the preset's {preset.mlflow.register_name}")
        if args.device != "cuda":
            problems.append(f"`{command}`: not on the GPU (--device cuda)")
        if args.test not in staged or args.train not in staged:
            problems.append(f"`{command}`: --train/--test are not the staged files {sorted(staged)}")
    for command in promotes:
        try:
            args = parse_cli_command(command)
        except SystemExit:
            problems.append(f"`{command}` does not parse")
            continue
        if args.alias != "champion" or args.metric != "linear_top1" or args.force:
            problems.append(f"`{command}`: does not earn @champion on linear_top1")
    submits = [line for line in doc_shell_lines(markdown) if "byol-ray linear-eval" in line]
    if not all("--entrypoint-num-gpus" in line for line in submits):
        problems.append("the evaluation's `ray job submit` asks for no GPU (--entrypoint-num-gpus)")
    return problems


def test_documented_watcher_evaluation_and_promotion_are_the_real_commands(aws, raycluster):
    assert documented_downstream_problems(DOCS.read_text(), aws, raycluster) == []


DOWNSTREAM_MUTATIONS = {
    "watcher differs from aws-gpu.yaml": ("--cloud aws --address $RAY_HEAD_IP:6379 >", "--cloud aws >"),
    "hook differs from the manifests": ("spot-watch --drain-now --deadline-s 100", "spot-watch --drain-now"),
    "evaluation on the CPU": ("--device cuda", "--device cpu"),
    "evaluation of another model": ("linear-eval --model byol-imagenet-resnet50:1", "linear-eval --model byol-cifar:1"),
    "evaluation on an unstaged split": ("--test /mnt/shared/imagenet-val.beton", "--test /mnt/shared/val.beton"),
    "typo'd flag": ("--expect-arch resnet50", "--expect-architecture resnet50"),
    "promotion by force": ("byol-ray promote --model byol-imagenet-resnet50:1",
                           "byol-ray promote --force --model byol-imagenet-resnet50:1"),
    "no GPU for the evaluation": ("--entrypoint-num-gpus 1 --entrypoint-num-cpus 10", "--entrypoint-num-cpus 10"),
}


@pytest.mark.parametrize("mutation", list(DOWNSTREAM_MUTATIONS), ids=list(DOWNSTREAM_MUTATIONS))
def test_documented_downstream_checks_catch_breakage(aws, raycluster, mutation):
    old, new = DOWNSTREAM_MUTATIONS[mutation]
    text = DOCS.read_text()
    assert old in text, f"stale mutation: {old!r}"
    assert documented_downstream_problems(text.replace(old, new), aws, raycluster), f"not caught: {mutation}"


def test_kuberay_version_is_stated_as_1_5_1_everywhere():
    texts = {p: p.read_text() for p in [DOCS, *CLUSTER.rglob("*.yaml"), *SCHEMAS.rglob("SOURCE.md")]}
    for path, text in texts.items():
        for match in re.finditer(r">= ?1\.5(\.\d+)?", text):
            assert match.group(1) == ".1", f"{path.relative_to(REPO)}: {match.group(0)!r} (authOptions needs 1.5.1)"
    assert ">= 1.5.1" in texts[DOCS]


def test_aws_capacity_check_counts_what_the_cluster_can_grow_to(aws):
    _, cfg = resolve_command("byol-ray train --config imagenet_resnet50_300ep ray.num_workers=64")
    assert aws_capacity_problems(aws, cfg.ray) == [], "64 workers = 8 spot nodes, started on demand"


@pytest.mark.parametrize("case", [
    ("ray.num_workers=88 train.batch_size=4096", None),             # 10 nodes x 8 = 80 GPUs at most
    ("ray.num_workers=16", lambda c: c.update(max_workers=1)),      # the global cap: 8 GPUs
    ("ray.num_workers=16", lambda c: [n.update(max_workers=0) for n in _gpu_worker_types(c).values()]),
    ("ray.num_workers=16 ray.cpus_per_worker=100", None),           # one worker fits no node type
    ("ray.num_workers=16 ray.cpus_per_worker=13", None),            # 8 x 13 CPUs > 96: GPUs left idle
])
def test_aws_capacity_check_catches_too_small_a_cluster(aws, case):
    overrides, mutate = case
    broken = copy.deepcopy(aws)
    if mutate:
        mutate(broken)
    _, cfg = resolve_command(f"byol-ray train --config imagenet_resnet50_300ep {overrides}")
    assert aws_capacity_problems(broken, cfg.ray), case


# ----------------------------------------------------------------------------- no shared volume: artifacts in S3


def test_mlflow_s3_variant_serves_artifacts_from_the_bucket_and_keeps_its_store_on_its_own_claim(core_validators):
    """cluster/kuberay/mlflow-s3.yaml: structurally valid; the same reachable, artifact-serving server as mlflow.yaml,
    with artifacts in an object store and SQLite on a ReadWriteOnce claim that only this pod mounts."""
    docs = _by_kind(KUBERAY / "mlflow-s3.yaml")
    assert set(docs) == {"PersistentVolumeClaim", "ConfigMap", "Deployment", "Service", "NetworkPolicy"}
    for kind in ("ConfigMap", "Deployment", "Service", "NetworkPolicy"):
        assert _errors(core_validators[kind], docs[kind]) == [], kind
    assert mlflow_auth_problems(docs, "mlflow-s3.yaml") == []
    assert docs["NetworkPolicy"] == _by_kind(KUBERAY / "mlflow.yaml")["NetworkPolicy"], "one policy for both servers"
    deploy, service, claim = docs["Deployment"], docs["Service"], docs["PersistentVolumeClaim"]
    assert claim["spec"]["accessModes"] == ["ReadWriteOnce"]
    spec = deploy["spec"]
    assert spec["replicas"] == 1 and spec["strategy"]["type"] == "Recreate"  # one SQLite writer
    container = spec["template"]["spec"]["containers"][0]
    params = mlflow_server_params(_container_command(container))
    assert params["host"] == "0.0.0.0" and params["serve_artifacts"] and not params["artifacts_only"]
    assert params["artifacts_destination"].startswith("s3://") and str(params["workers"]) == "1"
    db_path = params["backend_store_uri"].split(":///", 1)[1]
    claims = [v for v in spec["template"]["spec"]["volumes"] if "persistentVolumeClaim" in v]
    (volume,) = claims
    (mount,) = [m["mountPath"] for m in container["volumeMounts"] if m["name"] == volume["name"]]
    assert db_path.startswith(f"{mount}/") and volume["persistentVolumeClaim"]["claimName"] == claim["metadata"]["name"]
    assert service["spec"]["ports"][0]["targetPort"] == params["port"]
    assert any(e.get("secretRef", {}).get("optional") for e in container.get("envFrom", []))  # or IRSA
