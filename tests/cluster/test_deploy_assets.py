"""The deployment assets in cluster/, kept in step with the code and with the tools that read them.

Covers cluster/runtime_env.yaml and /.rayignore, cluster/aws-cluster.yaml, cluster/kuberay/*.yaml,
cluster/Dockerfile and the "Deploying to a cluster" section of cluster/README.md. Each asset is
checked with the validator of the tool that consumes it where one is installed (Ray's runtime_env
parsing and packaging, Ray's cluster-config schema, `ray start`'s and `mlflow server`'s own option
parsers, botocore's RunInstances model), and against pyproject.toml and the other assets: one
image, one Ray version, one region, one runtime env for every cluster with the services' addresses
in every node's environment (the embedded stack's included), secrets only by reference.

Fast and offline: nothing is started, nothing is fetched.
"""

from __future__ import annotations

import copy
import functools
import re
import shlex
from pathlib import Path
from typing import Any, Iterator
from urllib.parse import urlsplit

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name
from packaging.version import Version

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    tomllib = pytest.importorskip("tomli")

REPO = Path(__file__).resolve().parents[2]
PYPROJECT = REPO / "pyproject.toml"
CLUSTER = REPO / "cluster"
KUBERAY = CLUSTER / "kuberay"
RUNTIME_ENV = CLUSTER / "runtime_env.yaml"
RAYIGNORE = REPO / ".rayignore"
AWS_CLUSTER = CLUSTER / "aws-cluster.yaml"
DOCKERFILE = CLUSTER / "Dockerfile"
README = CLUSTER / "README.md"
README_SECTION = "## Deploying to a cluster"

NAMESPACE = "vitae"
IMAGE_REPOSITORY = "vitae-pipeline"  # the last path component of the project image's name
THIRD_PARTY_IMAGES = {"postgres"}  # repositories of images the project does not build
S3_CREDENTIALS_SECRET = "vitae-s3-credentials"
S3_CREDENTIALS_SECRET_KEY = "credentials"  # the Secret's one key: an AWS credentials file

# The services' addresses: node configuration that every Ray node of every cluster carries (the
# embedded stack's head too), and that the job runtime env must therefore never set (it would
# override them). AWS_ENDPOINT_URL_S3 joins them on clusters that use an S3-compatible store.
NODE_SERVICE_VARIABLES = {"MLFLOW_TRACKING_URI", "AWS_DEFAULT_REGION"}

# Runtime-env variables the Python interpreter reads.
INTERPRETER_VARIABLES = {"PYTHONUNBUFFERED"}

# GPUs and memory (GiB) per instance type, for the node types of aws-cluster.yaml (extend when
# adding a type; the cluster launcher itself looks them up with the AWS API).
EC2_GPUS = {
    "p5.48xlarge": 8, "p5e.48xlarge": 8, "p5en.48xlarge": 8, "p4d.24xlarge": 8, "p4de.24xlarge": 8,
    "g6e.xlarge": 1, "g6e.12xlarge": 4, "g6e.48xlarge": 8, "g6.12xlarge": 4, "g5.12xlarge": 4,
}  # fmt: skip
EC2_MEMORY_GIB = {
    "p5.48xlarge": 2048, "p5e.48xlarge": 2048, "p5en.48xlarge": 2048, "p4d.24xlarge": 1152,
    "p4de.24xlarge": 1152, "g6e.xlarge": 32, "g6e.12xlarge": 384, "g6e.48xlarge": 1536,
    "g6.12xlarge": 192, "g5.12xlarge": 192, "m7i.xlarge": 16, "m7i.2xlarge": 32, "m7i.4xlarge": 64,
    "m6i.2xlarge": 32, "m5.2xlarge": 32,
}  # fmt: skip

# Names of things that hold secrets: in env lists and mappings they may only be references.
SECRET_NAME = re.compile(r"SECRET|PASSWORD|PASSWD|TOKEN|ACCESS_KEY|PRIVATE_KEY|CREDENTIAL", re.IGNORECASE)
# Names that match SECRET_NAME but hold no secret (EC2's IMDSv2 switch, the credentials file's path,
# a Kubernetes Secret volume's reference to its Secret).
NOT_SECRET_KEYS = {"HttpTokens", "AWS_SHARED_CREDENTIALS_FILE", "secretName"}
# Literal secret material, wherever it appears in the assets' text.
SECRET_TEXT = [
    re.compile(r"\b(?:AKIA|ASIA)[0-9A-Z]{16}\b"),  # AWS access key ID
    re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----"),
    re.compile(r"\bRAY_AUTH_TOKEN\b\s*[=:]\s*['\"]?[\w+/=-]{16,}"),  # a token itself, not $(...) or <token>
    re.compile(r"aws_secret_access_key\s*[=:]\s*['\"]?[A-Za-z0-9/+]{40}", re.IGNORECASE),
]
# `python -m a.b` (a placeholder such as `pipelines.<job>` is not a module name).
PYTHON_MODULE = re.compile(r"\bpython3?\s+-m\s+([A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*)(?![\w.<])")


# ---------------------------------------------------------------------------------------------
# Reading the assets


@functools.cache
def project() -> dict[str, Any]:
    return tomllib.loads(PYPROJECT.read_text())["project"]


def requirement(name: str) -> Requirement:
    for line in project()["dependencies"]:
        req = Requirement(line)
        if canonicalize_name(req.name) == canonicalize_name(name):
            return req
    raise AssertionError(f"pyproject.toml has no dependency on {name}")


def pinned_ray_version() -> str:
    specifiers = list(requirement("ray").specifier)
    assert len(specifiers) == 1 and specifiers[0].operator == "==", (
        f"pyproject.toml must pin one Ray version (ray[...]==X.Y.Z), not {requirement('ray')}"
    )
    return specifiers[0].version


@functools.cache
def runtime_env_file() -> dict[str, Any]:
    return yaml.safe_load(RUNTIME_ENV.read_text())


def job_env_vars() -> dict[str, str]:
    return runtime_env_file()["env_vars"]


@functools.cache
def aws_config() -> dict[str, Any]:
    return yaml.safe_load(AWS_CLUSTER.read_text())


@functools.cache
def kuberay_documents() -> list[tuple[str, dict[str, Any]]]:
    documents = []
    for path in sorted(KUBERAY.glob("*.y*ml")):
        for document in yaml.safe_load_all(path.read_text()):
            if document is not None:
                documents.append((path.name, document))
    return documents


def the(kind: str, name: str | None = None) -> dict[str, Any]:
    found = [
        doc
        for _, doc in kuberay_documents()
        if doc.get("kind") == kind and (name is None or doc["metadata"]["name"] == name)
    ]
    assert len(found) == 1, f"expected one {kind} {name or ''} in {KUBERAY}, found {len(found)}"
    return found[0]


def pod_specs(document: dict[str, Any]) -> Iterator[tuple[str, dict[str, Any]]]:
    """(where, pod spec) for every pod template in a manifest."""
    kind, name = document["kind"], document["metadata"]["name"]
    if kind in ("RayCluster", "RayJob"):
        cluster = document["spec"] if kind == "RayCluster" else document["spec"]["rayClusterSpec"]
        yield f"{kind} {name} head", cluster["headGroupSpec"]["template"]["spec"]
        for group in cluster.get("workerGroupSpecs", []):
            yield f"{kind} {name} group {group['groupName']}", group["template"]["spec"]
    elif kind in ("Deployment", "StatefulSet", "DaemonSet", "Job"):
        yield f"{kind} {name}", document["spec"]["template"]["spec"]


def containers(pod_spec: dict[str, Any]) -> list[dict[str, Any]]:
    return pod_spec.get("initContainers", []) + pod_spec["containers"]


def image_repository(image: str) -> str:
    return image.rsplit(":", 1)[0].rsplit("/", 1)[-1]


def module_exists(module: str) -> bool:
    path = REPO.joinpath(*module.split("."))
    return path.with_suffix(".py").is_file() or (path / "__main__.py").is_file()


def assert_known_module(module: str, where: str) -> None:
    assert module_exists(module), (
        f"{where} runs `python -m {module}`, but there is no {module.replace('.', '/')}.py in the repository"
    )


def parse_ray_start(args: list[str]) -> dict[str, Any]:
    """`ray start`'s own option parser (click): unknown flags and bad values raise."""
    from ray.scripts.scripts import start

    return start.make_context("ray start", list(args)).params


def ray_start_args(params: dict[str, str]) -> list[str]:
    """The flags KubeRay builds from rayStartParams (ray-operator's convertParamMap)."""
    takes_boolean_value = {"log-color", "include-dashboard", "include-log-monitor"}
    args = []
    for option, argument in sorted(params.items()):
        if argument.lower() in ("true", "false") and option not in takes_boolean_value:
            if argument.lower() == "true":
                args.append(f"--{option}")
        else:
            args.append(f"--{option}={argument}")
    return args


def ray_start_segment(command: str) -> list[str] | None:
    """The arguments after `ray start` in a shell command line, if it runs `ray start`."""
    for segment in re.split(r";|&&|\|\|", command):
        words = shlex.split(segment)
        if words[:2] == ["ray", "start"]:
            return words[2:]
    return None


def docker_options(options: list[str]) -> tuple[dict[str, str], list[str]]:
    """(environment, volume specs) from `docker run` options."""
    words = shlex.split(" ".join(options))
    env, volumes = {}, []
    for flag, value in zip(words, words[1:] + [""]):
        if flag in ("--env", "-e"):
            key, _, val = value.partition("=")
            env[key] = val
        elif flag in ("--volume", "-v"):
            volumes.append(value)
    return env, volumes


def shm_bytes(options: list[str]) -> int:
    for word in shlex.split(" ".join(options)):
        if word.startswith("--shm-size="):
            size = word.split("=", 1)[1].strip("'\"").lower()
            units = {"b": 1, "k": 2**10, "m": 2**20, "g": 2**30}
            if size[-1] in units:
                return int(float(size[:-1]) * units[size[-1]])
            return int(size)
    raise AssertionError(f"no --shm-size in {options}")


def quantity_bytes(quantity: str) -> float:
    """A Kubernetes memory quantity (16Gi, 500M, 1e9) in bytes."""
    units = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12}
    match = re.fullmatch(r"([0-9.e+]+)([KMGT]i?|k)?", str(quantity))
    assert match, f"not a memory quantity: {quantity}"
    return float(match[1]) * units.get(match[2] or "", 1)


def object_store_bytes(memory_bytes: float) -> float:
    """The object store Ray sizes by default on a node with that much memory; it lives in /dev/shm
    (Ray falls back to slow disk when /dev/shm is smaller)."""
    from ray._private import ray_constants

    proportion = ray_constants.DEFAULT_OBJECT_STORE_MEMORY_PROPORTION
    return min(memory_bytes * proportion, ray_constants.DEFAULT_OBJECT_STORE_MAX_MEMORY_BYTES)


def walk_mappings(node: Any, path: str = "") -> Iterator[tuple[str, str, Any]]:
    if isinstance(node, dict):
        for key, value in node.items():
            yield path, str(key), value
            yield from walk_mappings(value, f"{path}.{key}")
    elif isinstance(node, list):
        for index, item in enumerate(node):
            yield from walk_mappings(item, f"{path}[{index}]")


# ---------------------------------------------------------------------------------------------
# Runtime environment (ray job submit --working-dir . --runtime-env cluster/runtime_env.yaml)


def test_runtime_env_is_what_ray_job_submit_accepts():
    from ray.dashboard.modules.dashboard_sdk import parse_runtime_env_args
    from ray.runtime_env import RuntimeEnv

    # Exactly what the CLI does with --runtime-env FILE --working-dir DIR ...
    submitted = parse_runtime_env_args(runtime_env=str(RUNTIME_ENV), working_dir=str(REPO))
    unknown = set(submitted) - set(RuntimeEnv.known_fields)
    assert not unknown, f"fields Ray does not know (plugins are silently ignored): {unknown}"
    # ... and what the job server validates (types of env_vars, excludes, working_dir).
    validated = RuntimeEnv(**submitted)
    assert validated["working_dir"] == str(REPO)
    assert validated["env_vars"], "runtime_env.yaml passes the job's configuration as env_vars"


def aws_node_env() -> dict[str, str]:
    """The environment aws-cluster.yaml gives the container of every node, head and workers."""
    env, _ = docker_options(aws_config()["docker"]["run_options"])
    return env


def kuberay_node_envs() -> dict[str, dict[str, str]]:
    """The literal `env` of every Ray container (head and worker groups) of the RayCluster and RayJob."""
    envs = {}
    for file, document in kuberay_documents():
        if document["kind"] not in ("RayCluster", "RayJob"):
            continue
        for where, pod in pod_specs(document):
            for container in pod["containers"]:
                if container["name"].startswith("ray-"):
                    envs[f"{file} {where}"] = {item["name"]: item["value"] for item in container.get("env", [])
                                               if "value" in item}
    return envs


def embedded_stack_node_env() -> dict[str, str]:
    """What `vitae stack up` hands every Ray process of its head (cluster.stack.Stack.service_env)."""
    from cluster.stack import ServiceRecord, Stack, StackSettings, StackState

    state = StackState.new(StackSettings())
    state.services = {"s3": ServiceRecord({"s3": 9000}), "mlflow": ServiceRecord({"mlflow": 5000})}
    return Stack(Path(".vitae")).service_env(state)


def node_envs() -> dict[str, dict[str, str]]:
    """Every kind of Ray node's environment, by where it is defined."""
    return {"aws-cluster.yaml docker.run_options": aws_node_env(), **kuberay_node_envs(),
            "the embedded stack's Ray head": embedded_stack_node_env()}


def test_runtime_env_overrides_no_node_configuration_and_holds_no_secrets():
    """A runtime env's env_vars override the node's environment: a service address set there would
    send the jobs of every other cluster, the embedded stack's included, to the wrong service."""
    env_vars = job_env_vars()
    for where, env in node_envs().items():
        overridden = set(env_vars) & (set(env) | NODE_SERVICE_VARIABLES | {"AWS_ENDPOINT_URL_S3"})
        assert not overridden, f"runtime_env.yaml sets {sorted(overridden)}, node configuration ({where})"
    for name, value in env_vars.items():
        assert not SECRET_NAME.search(name), f"{name} looks like a credential: never put one in runtime_env"
        assert not urlsplit(value).password, f"{name} embeds credentials in its URL"


def test_every_ray_node_carries_the_services_addresses():
    envs = node_envs()
    assert len(kuberay_node_envs()) >= 4, "the heads and GPU groups of the RayCluster and the RayJob"
    for where, env in envs.items():
        missing = NODE_SERVICE_VARIABLES - set(env)
        assert not missing, f"{where}: {sorted(missing)} not in the node's environment"
        tracking = urlsplit(env["MLFLOW_TRACKING_URI"])
        assert tracking.scheme in ("http", "https") and tracking.hostname, f"{where}: {tracking.geturl()}"
        assert not tracking.password, f"{where}: MLflow credentials come from a Secret, not the URI"
    distinct = {tuple(sorted(env.items())) for env in kuberay_node_envs().values()}
    assert len(distinct) == 1, f"the Ray containers of the KubeRay clusters disagree: {kuberay_node_envs()}"
    # aws-cluster.yaml: set once in run_options for every node, not per node type.
    config = aws_config()
    per_type = [config["docker"].get("head_run_options", [])] + [
        node_type.get("docker", {}).get("worker_run_options", [])
        for node_type in config["available_node_types"].values()
    ]
    for options in per_type:
        assert not NODE_SERVICE_VARIABLES & set(docker_options(options)[0]), f"set per node type: {options}"


def variables_read_by_the_jobs() -> set[str]:
    """Environment variables that something in a job reads: the project's code (environ.get("X"),
    environ["X"], getenv("X")), MLflow, botocore (boto3; pyarrow follows the same AWS_* names)."""
    import botocore.configprovider
    import mlflow.environment_variables

    packages = ("vitae", "infra", "data_prep", "pipelines", "cluster")
    sources = "\n".join(path.read_text() for package in packages for path in (REPO / package).rglob("*.py"))
    names = set(re.findall(r"(?:environ\.get\(|environ\[|getenv\()\s*[\"']([A-Z][A-Z0-9_]*)[\"']", sources))
    names |= {
        value.name
        for value in vars(mlflow.environment_variables).values()
        if isinstance(value, mlflow.environment_variables._EnvironmentVariable)
    }
    for _, env_names, _, _ in botocore.configprovider.BOTOCORE_DEFAUT_SESSION_VARIABLES.values():
        names |= {env_names} if isinstance(env_names, str) else set(env_names or ())
    return names | INTERPRETER_VARIABLES


def test_runtime_env_and_node_variables_are_read_by_the_jobs():
    """A variable renamed in the code (or one nothing reads) would silently configure nothing."""
    read = variables_read_by_the_jobs()
    unread = set(job_env_vars()) - read
    assert not unread, f"runtime_env.yaml sets {sorted(unread)}, which neither the project nor its libraries read"
    for where, env in {"aws-cluster.yaml docker.run_options": aws_node_env(), **kuberay_node_envs()}.items():
        unread = {name for name in env if not name.startswith("RAY_")} - read  # RAY_*: Ray's own
        assert not unread, f"{where} sets {sorted(unread)}, which neither the project nor its libraries read"


def test_rayignore_and_runtime_env_excludes_agree():
    patterns = [
        line.strip() for line in RAYIGNORE.read_text().splitlines() if line.strip() and not line.startswith("#")
    ]
    assert sorted(patterns) == sorted(runtime_env_file()["excludes"])


def uploaded_files(root: Path, excludes: list[str]) -> dict[str, int]:
    """The files (relative path -> size) Ray packs when `root` is a job's working_dir: Ray's own
    traversal with its default excludes, `excludes`, and the .gitignore/.rayignore files it finds."""
    from ray._private import ray_constants
    from ray._private.runtime_env.packaging import _dir_travel, _get_excludes

    files: dict[str, int] = {}

    def collect(path: Path) -> None:
        if path.is_file():
            files[path.relative_to(root).as_posix()] = path.stat().st_size

    all_excludes = ray_constants.get_runtime_env_default_excludes() + list(excludes)
    _dir_travel(root, [_get_excludes(root, all_excludes)], collect, include_gitignore=True)
    return files


KEPT_FILES = [
    "pyproject.toml", "configs/train.yaml", "pipelines/train.py", "vitae/model.py",
    "data_prep/shards.py", "cluster/runtime_env.yaml", "tests/fixtures/tiny-train.yaml",
]  # fmt: skip
# Each path is matched by one pattern only where possible, so that every pattern is exercised.
DROPPED_FILES = [
    ".git/HEAD", ".venv/bin/python", ".vitae/state.json", ".vitae/mlflow/mlflow.db", ".pytest_cache/v/x",
    ".benchmarks/run.json", "tests/fixtures/reference_logits.pt",
    "data/raw/cat.jpg", "shards/manifest.json", "checkpoints/epoch_1/state.json", "mlruns/0/meta.yaml",
    "mlartifacts/1/model.pkl", "ray_results/run/result.json", "pipelines/__pycache__/train.cpython-311.pyc",
    "vitae_pipeline.egg-info/PKG-INFO", "build/lib/vitae/model.py", "dist/vitae_pipeline-0.1.0.whl",
    "weights.pth", "model.safetensors", "last.ckpt", "export/shard-000001.tar",
]  # fmt: skip


@pytest.mark.parametrize("exclusion", ["runtime_env excludes", ".rayignore"])
def test_working_dir_upload_keeps_the_code_and_drops_the_bulk(tmp_path, exclusion):
    for name in KEPT_FILES + DROPPED_FILES:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text("x")
    if exclusion == ".rayignore":
        (tmp_path / ".rayignore").write_text(RAYIGNORE.read_text())
        excludes = []
    else:
        excludes = runtime_env_file()["excludes"]

    uploaded = uploaded_files(tmp_path, excludes)

    assert set(KEPT_FILES) <= set(uploaded), f"code left out: {set(KEPT_FILES) - set(uploaded)}"
    assert not set(DROPPED_FILES) & set(uploaded), f"uploaded anyway: {set(DROPPED_FILES) & set(uploaded)}"


def test_working_dir_upload_of_this_repository_is_small():
    uploaded = uploaded_files(REPO, runtime_env_file()["excludes"])
    for needed in ("pyproject.toml", "pipelines/cli/__init__.py", "vitae/model.py", "infra/object_store.py",
                   "cluster/runtime_env.yaml"):  # fmt: skip
        assert needed in uploaded
    assert not [name for name in uploaded if name.startswith((".git/", ".vitae/")) or name.endswith(".pt")]
    total = sum(uploaded.values())
    assert total < 16 * 2**20, f"the working_dir upload is {total / 2**20:.1f} MiB: exclude the bulk"


# ---------------------------------------------------------------------------------------------
# AWS cluster launcher (ray up cluster/aws-cluster.yaml)

COMMAND_LISTS = (
    "initialization_commands", "setup_commands", "head_setup_commands", "worker_setup_commands",
    "head_start_ray_commands", "worker_start_ray_commands",
)  # fmt: skip


def test_aws_cluster_config_passes_rays_own_validation():
    from ray.autoscaler._private.util import prepare_config, validate_config

    raw = aws_config()
    prepared = prepare_config(copy.deepcopy(raw))  # what `ray up` does first: defaults, docker, bounds
    validate_config(prepared)  # Ray's ray-schema.json and its cross-field checks
    assert raw["provider"]["type"] == "aws"
    for key in COMMAND_LISTS:
        # An omitted list is filled from Ray's aws/defaults.yaml, which pip-installs a dev Ray.
        assert key in raw, f"{key} must be given (even empty), or Ray fills it from its defaults"
    commands = [command for key in COMMAND_LISTS for command in prepared[key]]
    assert not [c for c in commands if "pip install" in c or "ray-wheels" in c], (
        "nothing is installed at boot: every package comes from the image"
    )


def test_aws_node_configs_are_valid_run_instances_parameters():
    """node_config goes to EC2 RunInstances verbatim (plus counts and tags): check it against
    botocore's model of that API (unknown keys, wrong types)."""
    import botocore.session
    from botocore.validate import validate_parameters

    shape = botocore.session.get_session().get_service_model("ec2").operation_model("RunInstances").input_shape
    for name, node_type in aws_config()["available_node_types"].items():
        validate_parameters({**node_type["node_config"], "MinCount": 1, "MaxCount": 1}, shape)


def test_aws_node_types_cpu_head_gpu_workers_autoscaling_and_spot():
    config = aws_config()
    node_types = config["available_node_types"]
    head = node_types[config["head_node_type"]]
    assert head.get("max_workers", 0) == 0
    assert head["node_config"]["InstanceType"] not in EC2_GPUS, "a CPU head"
    workers = {name: t for name, t in node_types.items() if name != config["head_node_type"]}
    gpus = {}
    for name, node_type in workers.items():
        instance = node_type["node_config"]["InstanceType"]
        assert instance in EC2_GPUS, f"{name}: {instance} is not a known GPU instance type"
        gpus[name] = EC2_GPUS[instance]
        low, high = node_type.get("min_workers", 0), node_type.get("max_workers")
        assert high is not None and 0 <= low <= high and high >= 1, f"{name}: autoscaling bounds {low}..{high}"
        assert high <= config["max_workers"]
        memory = EC2_MEMORY_GIB[instance] * 2**30
        assert shm_bytes(node_type["docker"]["worker_run_options"]) >= object_store_bytes(memory), (
            f"{name}: /dev/shm smaller than Ray's object store"
        )
    assert max(gpus.values()) == 8 and min(gpus.values()) < 8, "an 8-GPU type and a smaller GPU type"
    markets = {n: t["node_config"].get("InstanceMarketOptions", {}).get("MarketType") for n, t in workers.items()}
    spot = [name for name, market in markets.items() if market == "spot"]
    assert spot, "a spot node type"
    head_memory = EC2_MEMORY_GIB[head["node_config"]["InstanceType"]] * 2**30
    assert shm_bytes(config["docker"]["head_run_options"]) >= object_store_bytes(head_memory)
    profiles = {n: t["node_config"]["IamInstanceProfile"] for n, t in node_types.items()}
    assert all(p.get("Name") or p.get("Arn") for p in profiles.values()), "every node has an instance profile"
    head_profile = profiles.pop(config["head_node_type"])
    assert head_profile not in profiles.values(), "workers do not get the head's EC2 permissions"


def test_aws_start_commands_are_valid_ray_start_invocations():
    config = aws_config()
    head_runs = [a for a in map(ray_start_segment, config["head_start_ray_commands"]) if a is not None]
    worker_runs = [a for a in map(ray_start_segment, config["worker_start_ray_commands"]) if a is not None]
    assert len(head_runs) == 1 and len(worker_runs) == 1
    head, worker = parse_ray_start(head_runs[0]), parse_ray_start(worker_runs[0])
    assert head["head"] and head["autoscaling_config"] == "~/ray_bootstrap_config.yaml"
    assert not worker["head"] and worker["address"] == f"$RAY_HEAD_IP:{head['port']}"
    head_cpus = config["available_node_types"][config["head_node_type"]]["resources"].get("CPU")
    assert head["num_cpus"] == head_cpus, "the head's advertised CPUs match what the autoscaler plans with"


def test_aws_commands_only_run_modules_that_exist():
    config = aws_config()
    for key in COMMAND_LISTS:
        for command in config[key]:
            for module in PYTHON_MODULE.findall(command):
                assert_known_module(module, f"aws-cluster.yaml {key}")


def test_aws_token_auth_comes_from_secrets_manager():
    config = aws_config()
    env, volumes = docker_options(config["docker"]["run_options"])
    assert env["RAY_AUTH_MODE"] == "token"
    assert "RAY_AUTH_TOKEN" not in env, "the token is a mounted file, never a literal in the config"
    token_path = env["RAY_AUTH_TOKEN_PATH"]
    mounted = [v.split(":") for v in volumes if v.split(":")[1:2] == [token_path]]
    assert len(mounted) == 1 and mounted[0][2:] == ["ro"], f"{token_path} mounted read-only from the host"
    host_file = mounted[0][0]
    fetch = [c for c in config["initialization_commands"] if host_file in c]
    assert fetch and "secretsmanager get-secret-value" in fetch[0] and "umask 077" in fetch[0]


def test_aws_region_is_the_same_everywhere():
    config = aws_config()
    region = config["provider"]["region"]
    env, _ = docker_options(config["docker"]["run_options"])
    assert env["AWS_DEFAULT_REGION"] == region
    assert {env["AWS_DEFAULT_REGION"] for env in kuberay_node_envs().values()} == {region}
    for command in config["initialization_commands"]:
        assert set(re.findall(r"--region[= ](\S+)", command)) <= {region}
    registry = re.match(r"\d+\.dkr\.ecr\.([a-z0-9-]+)\.amazonaws\.com/", config["docker"]["image"])
    if registry:
        assert registry.group(1) == region


# ---------------------------------------------------------------------------------------------
# KubeRay manifests and the cluster's MLflow server


def test_every_manifest_parses_and_lives_in_the_namespace():
    kinds = set()
    for file, document in kuberay_documents():
        for field in ("apiVersion", "kind", "metadata"):
            assert field in document, f"{file}: a document without {field}"
        assert document["metadata"].get("name"), f"{file}: a {document['kind']} without a name"
        assert document["metadata"].get("namespace") == NAMESPACE, f"{file}: {document['kind']} not in {NAMESPACE}"
        if document["kind"] in ("RayCluster", "RayJob"):
            assert document["apiVersion"] == "ray.io/v1"
        kinds.add(document["kind"])
    assert {"RayCluster", "RayJob", "Deployment", "Service", "StatefulSet"} <= kinds


def check_ray_cluster_spec(spec: dict[str, Any], where: str) -> None:
    """What KubeRay needs and what this project relies on, for a RayCluster's or RayJob's cluster."""
    assert spec["rayVersion"] == pinned_ray_version(), f"{where}: rayVersion is not the pinned Ray"
    assert spec.get("authOptions", {}).get("mode") == "token", f"{where}: Ray token authentication"
    assert spec.get("enableInTreeAutoscaling") is True, f"{where}: autoscaling"

    groups = [("head", spec["headGroupSpec"], True)] + [
        (group["groupName"], group, False) for group in spec["workerGroupSpecs"]
    ]
    gpu_groups = []
    for name, group, is_head in groups:
        params = group["rayStartParams"]  # required by the CRD (may be empty)
        assert all(isinstance(v, str) for v in params.values()), f"{where} {name}: rayStartParams must be strings"
        parse_ray_start((["--head"] if is_head else []) + ray_start_args(params))
        pod = group["template"]["spec"]
        (ray_container,) = [c for c in pod["containers"] if c["name"].startswith("ray-")]
        limits = ray_container["resources"]["limits"]
        assert "cpu" in limits and "memory" in limits, f"{where} {name}: CPU and memory limits"
        shm_mounts = [m["name"] for m in ray_container.get("volumeMounts", []) if m["mountPath"] == "/dev/shm"]
        shm_volumes = [v for v in pod.get("volumes", []) if v["name"] in shm_mounts]
        assert shm_volumes and shm_volumes[0].get("emptyDir", {}).get("medium") == "Memory", (
            f"{where} {name}: /dev/shm from a memory-backed emptyDir"
        )
        shm_limit = quantity_bytes(shm_volumes[0]["emptyDir"]["sizeLimit"])
        assert object_store_bytes(quantity_bytes(limits["memory"])) <= shm_limit < quantity_bytes(limits["memory"]), (
            f"{where} {name}: /dev/shm must hold Ray's object store and fit in the memory limit"
        )
        assert_s3_credentials_as_a_file(pod, ray_container, f"{where} {name}")
        if not is_head:
            low, high = group["minReplicas"], group["maxReplicas"]
            replicas = group.get("replicas", low)
            assert 0 <= low <= replicas <= high and high >= 1, f"{where} {name}: replicas {low}..{high}"
            if "nvidia.com/gpu" in limits:
                gpus = int(limits["nvidia.com/gpu"])
                assert gpus >= 1
                requests = ray_container["resources"].get("requests", {})
                assert int(requests.get("nvidia.com/gpu", gpus)) == gpus
                gpu_groups.append(name)
    assert gpu_groups, f"{where}: a worker group with nvidia.com/gpu limits"


def assert_s3_credentials_as_a_file(pod: dict[str, Any], container: dict[str, Any], where: str) -> None:
    """The S3 credentials Secret reaches the container as a private file that AWS_SHARED_CREDENTIALS_FILE
    names, never as variables: Ray Tune copies credential variables into every trial's runtime env,
    and Ray logs runtime envs."""
    volumes = {v["name"]: v["secret"] for v in pod.get("volumes", [])
               if v.get("secret", {}).get("secretName") == S3_CREDENTIALS_SECRET}
    mounts = [m for m in container.get("volumeMounts", []) if m["name"] in volumes]
    assert len(mounts) == 1 and mounts[0].get("readOnly"), f"{where}: {S3_CREDENTIALS_SECRET} mounted read-only"
    (mount,) = mounts
    path = container_env(container)["AWS_SHARED_CREDENTIALS_FILE"]["value"]
    assert path == f"{mount['mountPath'].rstrip('/')}/{S3_CREDENTIALS_SECRET_KEY}", f"{where}: {path}"
    mode = volumes[mount["name"]].get("defaultMode", 0o644)
    assert not mode & 0o007 and mode & 0o040, f"{where}: the file is for the pod's group only ({mode:o})"
    assert pod.get("securityContext", {}).get("fsGroup") is not None, f"{where}: an fsGroup, to read the file"
    as_variables = [e["secretRef"]["name"] for e in container.get("envFrom", []) if "secretRef" in e] + [
        item["valueFrom"]["secretKeyRef"]["name"] for item in container.get("env", [])
        if "secretKeyRef" in item.get("valueFrom", {})]
    assert S3_CREDENTIALS_SECRET not in as_variables, f"{where}: S3 credentials as environment variables"


def test_raycluster():
    cluster = the("RayCluster")
    check_ray_cluster_spec(cluster["spec"], f"RayCluster {cluster['metadata']['name']}")


def test_rayjob_runs_a_known_module_and_cleans_up():
    job = the("RayJob")
    spec = job["spec"]
    check_ray_cluster_spec(spec["rayClusterSpec"], f"RayJob {job['metadata']['name']}")
    assert spec["shutdownAfterJobFinishes"] is True
    assert isinstance(spec["ttlSecondsAfterFinished"], int) and spec["ttlSecondsAfterFinished"] > 0
    assert spec.get("submissionMode", "K8sJobMode") in ("K8sJobMode", "HTTPMode", "SidecarMode", "InteractiveMode")

    words = shlex.split(spec["entrypoint"])
    assert words[:2] == ["python", "-m"], "the entrypoint is `python -m pipelines.<job> --config FILE`"
    assert_known_module(words[2], "the RayJob's entrypoint")
    config_path = words[words.index("--config") + 1]
    # The config file comes from a ConfigMap mounted on the head, where the driver runs.
    head = spec["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]
    config_maps = {v["name"] for v in head.get("volumes", []) if "configMap" in v}
    mounts = [m["mountPath"] for c in head["containers"] for m in c.get("volumeMounts", []) if m["name"] in config_maps]
    assert any(config_path.startswith(mount.rstrip("/") + "/") for mount in mounts), (
        f"--config {config_path} is not in a ConfigMap mounted on the head"
    )


def test_rayjob_runtime_env_is_valid_and_matches_runtime_env_yaml():
    from ray.runtime_env import RuntimeEnv

    runtime_env = yaml.safe_load(the("RayJob")["spec"]["runtimeEnvYAML"])
    RuntimeEnv(**runtime_env)
    assert set(runtime_env) <= set(RuntimeEnv.known_fields)
    assert "working_dir" not in runtime_env, "the RayJob runs the code installed in the image"
    assert runtime_env["env_vars"] == job_env_vars(), "the RayJob and cluster/runtime_env.yaml configure jobs alike"


def mlflow_server_container() -> dict[str, Any]:
    deployment = the("Deployment", "mlflow")
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    return container


def mlflow_server_options() -> dict[str, Any]:
    """The container's arguments parsed by `mlflow server`'s own option parser."""
    from mlflow.cli import server

    container = mlflow_server_container()
    assert container["command"][-2:] == ["mlflow", "server"]
    return server.make_context("mlflow server", list(container.get("args", []))).params


def container_env(container: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {item["name"]: item for item in container.get("env", [])}


def test_mlflow_server_postgresql_backend_from_secret_and_s3_artifacts():
    from mlflow.cli import server

    options = mlflow_server_options()
    assert options["artifacts_destination"].startswith("s3://"), "artifacts in S3"
    assert options["serve_artifacts"], "clients upload artifacts through the server"
    assert options["host"] == "0.0.0.0"
    container = mlflow_server_container()
    assert_s3_credentials_as_a_file(the("Deployment", "mlflow")["spec"]["template"]["spec"], container,
                                    "the MLflow server")
    assert not any("postgresql://" in arg for arg in container.get("args", [])), (
        "the backend store URI, password included, stays off the command line"
    )
    # `--backend-store-uri` reads this variable when the option is not given.
    (option,) = [p for p in server.params if p.name == "backend_store_uri"]
    env = container_env(container)
    uri = env[option.envvar]["value"]
    assert uri.startswith("postgresql://")
    parts = urlsplit(uri.replace("$(", "{").replace(")", "}"))
    assert parts.username and parts.password and parts.hostname
    postgres = the("StatefulSet", "postgres")
    service = the("Service", postgres["spec"]["serviceName"])
    assert parts.hostname == f"{service['metadata']['name']}.{NAMESPACE}.svc.cluster.local"
    assert parts.port == service["spec"]["ports"][0]["port"]
    (db,) = [c for c in postgres["spec"]["template"]["spec"]["containers"]]
    assert container_env(db)["POSTGRES_DB"]["value"] == parts.path.lstrip("/")
    assert postgres["spec"].get("volumeClaimTemplates"), "the database survives pod restarts"
    # The credentials MLflow uses are the ones PostgreSQL was initialised with.
    for variable in ("POSTGRES_USER", "POSTGRES_PASSWORD"):
        assert env[variable]["valueFrom"]["secretKeyRef"] == container_env(db)[variable]["valueFrom"]["secretKeyRef"]


def test_mlflow_is_reachable_at_the_nodes_tracking_uri():
    from mlflow.server.security_utils import is_allowed_host_header

    (tracking,) = {urlsplit(env["MLFLOW_TRACKING_URI"]) for env in kuberay_node_envs().values()}
    service = the("Service", "mlflow")
    assert tracking.hostname == f"{service['metadata']['name']}.{service['metadata']['namespace']}.svc.cluster.local"
    (port,) = service["spec"]["ports"]
    assert tracking.port == port["port"]
    container = mlflow_server_container()
    container_ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert container_ports[port["targetPort"]] == mlflow_server_options()["port"]
    selector = service["spec"]["selector"]
    labels = the("Deployment", "mlflow")["spec"]["template"]["metadata"]["labels"]
    assert selector.items() <= labels.items()
    # MLflow 3 answers 403 to a Host header it does not allow: the jobs' and port-forward's.
    allowed = mlflow_server_options()["allowed_hosts"].split(",")
    assert is_allowed_host_header(allowed, tracking.netloc), f"{tracking.netloc} not in --allowed-hosts"
    assert is_allowed_host_header(allowed, f"localhost:{port['port']}")


def test_secrets_are_only_referenced():
    for file, document in kuberay_documents():
        assert document["kind"] != "Secret", f"{file}: Secrets are created out of band, never committed"
        for where, pod in pod_specs(document):
            for container in containers(pod):
                defined_from_secrets = set()
                for item in container.get("env", []):
                    name, source = item["name"], item.get("valueFrom", {})
                    if "secretKeyRef" in source:
                        defined_from_secrets.add(name)
                    elif SECRET_NAME.search(name) and name not in NOT_SECRET_KEYS:
                        raise AssertionError(f"{file} {where}: {name} must come from a secretKeyRef")
                    password = urlsplit(str(item.get("value", ""))).password
                    if password:
                        referenced = set(re.findall(r"\$\((\w+)\)", password))
                        assert re.fullmatch(r"(\$\(\w+\))+", password) and referenced <= defined_from_secrets, (
                            f"{file} {where}: {name} embeds a password that is not a Secret reference"
                        )
    for path, document in [(AWS_CLUSTER, aws_config()), (RUNTIME_ENV, runtime_env_file())] + [
        (KUBERAY / f, d) for f, d in kuberay_documents()
    ]:
        for where, key, value in walk_mappings(document):
            if SECRET_NAME.search(key) and key not in NOT_SECRET_KEYS and isinstance(value, (str, int)):
                raise AssertionError(f"{path.name}: {where}.{key} holds a literal value")


def test_no_secret_material_in_any_asset():
    assets = [RUNTIME_ENV, RAYIGNORE, AWS_CLUSTER, DOCKERFILE, README, *sorted(KUBERAY.glob("*.y*ml"))]
    for path in assets:
        text = path.read_text()
        for pattern in SECRET_TEXT:
            match = pattern.search(text)
            assert not match, f"{path.relative_to(REPO)}: secret material {match.group(0)!r}"


# ---------------------------------------------------------------------------------------------
# The image


def dockerfile() -> tuple[list[str], dict[str, str], list[str]]:
    """(base images, ARG defaults, USER lines) of cluster/Dockerfile, stage aliases resolved."""
    lines = re.sub(r"\\\n", " ", DOCKERFILE.read_text()).splitlines()
    args, stages, bases, users = {}, set(), [], []
    for line in lines:
        words = line.split()
        if not words or words[0].startswith("#"):
            continue
        instruction = words[0].upper()
        if instruction == "ARG" and "=" in words[1]:
            key, value = words[1].split("=", 1)
            args[key] = value.strip("\"'")
        elif instruction == "FROM":
            words = [w for w in words[1:] if not w.startswith("--platform")]
            image = re.sub(r"\$\{?(\w+)\}?", lambda m: args.get(m.group(1), m.group(0)), words[0])
            if image not in stages:
                bases.append(image)
            if len(words) >= 3 and words[1].upper() == "AS":
                stages.add(words[2])
        elif instruction == "USER":
            users.append(words[1])
    return bases, args, users


def test_dockerfile_base_image_matches_pyproject():
    bases, args, _ = dockerfile()
    assert len(set(bases)) == 1, f"one base image for every stage, not {bases}"
    match = re.fullmatch(r"rayproject/ray:(?P<ray>\d+\.\d+\.\d+)-py(?P<py>\d)(?P<minor>\d+)-cu(?P<cuda>\d+)", bases[0])
    assert match, f"{bases[0]} is not a rayproject/ray:<ray>-py<XY>-cu<NNN> CUDA image"
    assert match["ray"] == pinned_ray_version(), f"base image Ray {match['ray']} != pinned {pinned_ray_version()}"
    python = Version(f"{match['py']}.{match['minor']}")
    assert python in SpecifierSet(project()["requires-python"]), f"Python {python} outside requires-python"
    assert args["RAY_VERSION"] == pinned_ray_version()
    assert Version(args["TORCH_VERSION"]) in requirement("torch").specifier, "torch outside pyproject's bound"
    assert args["TORCH_INDEX_URL"].rstrip("/").endswith(f"/cu{match['cuda']}"), "torch built for the image's CUDA"


def test_dockerfile_installs_the_package_as_a_non_root_user():
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    _, _, users = dockerfile()
    assert users and users[-1] not in ("root", "0") and not users[-1].startswith("0:"), "runs as non-root"
    installs = [line for line in text.splitlines() if "pip install" in line and "vitae_pipeline" in line]
    assert installs, "the project's wheel is installed (a regular install, not editable)"
    extras = ",".join(sorted(requirement("ray").extras))
    assert f'"ray[{extras}]==${{RAY_VERSION}}"' in installs[0], "with the pinned Ray and its extras"
    # The MLflow Deployment uses a postgresql:// backend: its driver must be in the image.
    assert re.search(r"psycopg2(-binary)?==", installs[0])


def test_image_build_context_holds_every_package():
    """cluster/Dockerfile.dockerignore ignores everything but what the wheel is built from: a
    package added to pyproject.toml but not re-included there would be missing from the image."""
    ignore = [line.strip() for line in (CLUSTER / "Dockerfile.dockerignore").read_text().splitlines()]
    assert "*" in ignore and "!pyproject.toml" in ignore
    for pattern in tomllib.loads(PYPROJECT.read_text())["tool"]["setuptools"]["packages"]["find"]["include"]:
        package = pattern.rstrip("*")
        if (REPO / package).is_dir():
            assert f"!{package}/" in ignore, f"the image's build context leaves out {package}/"


def all_images() -> dict[str, str]:
    config = aws_config()
    images = {"aws-cluster.yaml docker.image": config["docker"]["image"]}
    for key in ("head_image", "worker_image"):
        if key in config["docker"]:
            images[f"aws-cluster.yaml docker.{key}"] = config["docker"][key]
    for name, node_type in config["available_node_types"].items():
        if "worker_image" in node_type.get("docker", {}):
            images[f"aws-cluster.yaml {name}"] = node_type["docker"]["worker_image"]
    for file, document in kuberay_documents():
        for where, pod in pod_specs(document):
            for container in containers(pod):
                if image_repository(container["image"]) not in THIRD_PARTY_IMAGES:
                    images[f"{file} {where} {container['name']}"] = container["image"]
    return images


def test_one_project_image_everywhere_tagged_with_the_package_version():
    images = all_images()
    distinct = set(images.values())
    assert len(distinct) == 1, f"different images: {images}"
    (image,) = distinct
    name, _, tag = image.rpartition(":")
    assert name.rsplit("/", 1)[-1] == IMAGE_REPOSITORY
    assert tag == project()["version"], f"image tag {tag} != package version {project()['version']}"
    assert image in README.read_text(), "cluster/README.md builds and pushes that image"


# ---------------------------------------------------------------------------------------------
# Documentation


def test_readme_deploy_section_names_real_assets_and_modules():
    text = README.read_text()
    assert README_SECTION in text
    section = text[text.index(README_SECTION) :]
    for path in (RUNTIME_ENV, RAYIGNORE, AWS_CLUSTER, DOCKERFILE, *sorted(KUBERAY.glob("*.yaml"))):
        name = path.relative_to(REPO).as_posix()
        assert name in section or f"/{name}" in section, f"{name} is not described"
    for module in PYTHON_MODULE.findall(text):
        assert_known_module(module, "cluster/README.md")
    for mentioned in re.findall(r"(?<![\w/])(cluster/[\w./-]+\.(?:ya?ml|py)|cluster/Dockerfile\b)", section):
        assert (REPO / mentioned).exists(), f"cluster/README.md mentions {mentioned}, which does not exist"
