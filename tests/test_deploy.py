"""The deployment files (deploy/, docs/deploy.md), checked without a cluster, Docker or network:
every YAML parses and carries the fields KubeRay and Ray's cluster launcher need, volumes and
mount paths agree, the job files validate and fit the cluster's CPUs, the object-storage variant
mounts no run-directory volume and gives every Ray container the bucket's Secret without a
credential in any file it ships, the image pins the Ray release pyproject.toml pins and has the
objectstore extra, and every `shardstep` command the files show parses with the real command
line."""

from __future__ import annotations

import base64
import contextlib
import copy
import functools
import io
import re
import shlex
import tomllib
from pathlib import Path, PurePosixPath

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.version import Version

from shardstep.service.cli import _parser
from shardstep.service.jobspec import JobSpec, load_job, parse_job

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
KUBERAY = DEPLOY / "kuberay"
JOBS = DEPLOY / "jobs"
GUIDE = ROOT / "docs" / "deploy.md"
DOCKERFILE = DEPLOY / "Dockerfile"
DOCKERIGNORE = DEPLOY / "Dockerfile.dockerignore"
CLUSTER = DEPLOY / "cluster.yaml"

# The fields of KubeRay's ray.io/v1 types (ray-operator/apis/ray/v1/rayjob_types.go and
# raycluster_types.go, KubeRay v1.6): the API server prunes or refuses any other key, so a
# misspelt field would silently do nothing.
RAYJOB_SPEC_FIELDS = {
    "activeDeadlineSeconds", "backoffLimit", "rayClusterSpec", "submitterPodTemplate", "metadata",
    "clusterSelector", "submitterConfig", "managedBy", "deletionStrategy", "entrypoint", "runtimeEnvYAML",
    "jobId", "submissionMode", "entrypointResources", "entrypointNumCpus", "entrypointNumGpus",
    "ttlSecondsAfterFinished", "shutdownAfterJobFinishes", "suspend",
}
RAYCLUSTER_SPEC_FIELDS = {
    "upgradeStrategy", "authOptions", "suspend", "managedBy", "autoscalerOptions", "headServiceAnnotations",
    "enableInTreeAutoscaling", "gcsFaultToleranceOptions", "historyServerOptions", "networkPolicy", "tlsOptions",
    "headGroupSpec", "rayVersion", "workerGroupSpecs",
}
HEAD_GROUP_FIELDS = {"template", "headService", "enableIngress", "ingressOptions", "resources", "labels",
                     "rayStartParams", "serviceType"}
WORKER_GROUP_FIELDS = {"suspend", "groupName", "replicas", "minReplicas", "maxReplicas", "idleTimeoutSeconds",
                       "priority", "resources", "labels", "rayStartParams", "template", "scaleStrategy", "numOfHosts"}
# modes in which KubeRay itself submits the entrypoint (InteractiveMode waits for a person)
SUBMITTING_MODES = {"K8sJobMode", "HTTPMode", "SidecarMode"}
DNS_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?")
SHARDSTEP_SUBCOMMANDS = ("run", "resume", "inspect", "export")
# the two RayJobs: the run directories on the shared claim of pvc.yaml, or in a bucket
VOLUME_RAYJOB = "rayjob.yaml"
S3_RAYJOB = "rayjob-s3.yaml"
RAYJOB_FILES = (VOLUME_RAYJOB, S3_RAYJOB)
# the variables the object store's client reads (docs/checkpoints.md, "On object storage"): the
# Secret holds nothing else, and the three credentials must never be written anywhere but there
STORE_VARIABLES = {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_REGION",
                   "AWS_ENDPOINT_URL", "AWS_ALLOW_HTTP"}
CREDENTIAL_VARIABLES = {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"}
# an AWS access key id (long-term AKIA..., temporary ASIA...)
ACCESS_KEY_ID = re.compile(r"\b(?:AKIA|ASIA)[A-Z0-9]{16}\b")


# ---------------------------------------------------------------------------------------
# reading the files


def yaml_documents(path: Path) -> list:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


def manifest(path: Path, kind: str) -> dict:
    found = [doc for doc in yaml_documents(path) if doc.get("kind") == kind]
    assert len(found) == 1, f"{path.name}: expected one {kind}, found {len(found)}"
    return found[0]


@functools.cache
def rayjob(name: str = VOLUME_RAYJOB) -> dict:
    return manifest(KUBERAY / name, "RayJob")


def s3_rayjob() -> dict:
    return rayjob(S3_RAYJOB)


@functools.cache
def s3_secret() -> dict:
    return manifest(KUBERAY / "s3-secret.yaml", "Secret")


def secret_values(secret: dict) -> dict[str, str]:
    """A Secret's keys and values, from stringData or (base64) data."""
    values = {key: base64.b64decode(value).decode() for key, value in (secret.get("data") or {}).items()}
    values.update(secret.get("stringData") or {})
    return values


@functools.cache
def pvc() -> dict:
    return manifest(KUBERAY / "pvc.yaml", "PersistentVolumeClaim")


@functools.cache
def jobs_configmap() -> dict:
    return manifest(KUBERAY / "jobs-configmap.yaml", "ConfigMap")


@functools.cache
def toolbox() -> dict:
    return manifest(KUBERAY / "toolbox.yaml", "Pod")


@functools.cache
def cluster_config() -> dict:
    return yaml.safe_load(CLUSTER.read_text())


@functools.cache
def pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


@functools.cache
def job_specs() -> dict[str, JobSpec]:
    """The job files of deploy/jobs, loaded and checked, by file name."""
    return {path.name: load_job(path) for path in sorted(JOBS.glob("*.toml"))}


def ray_requirement() -> Requirement:
    requirements = [Requirement(text) for text in pyproject()["project"]["dependencies"]]
    (ray,) = [r for r in requirements if r.name == "ray"]
    return ray


def head_spec(name: str = VOLUME_RAYJOB) -> dict:
    return rayjob(name)["spec"]["rayClusterSpec"]["headGroupSpec"]


def worker_groups(name: str = VOLUME_RAYJOB) -> list[dict]:
    return rayjob(name)["spec"]["rayClusterSpec"]["workerGroupSpecs"]


def ray_pod_specs(name: str) -> dict[str, dict]:
    """The pod specs of a RayJob's Ray cluster (head, every worker group), by a readable name."""
    specs = {"head": head_spec(name)["template"]["spec"]}
    for group in worker_groups(name):
        specs[f"worker group {group['groupName']}"] = group["template"]["spec"]
    return specs


def pod_specs() -> dict[str, dict]:
    """Every pod spec of the volume variant (rayjob.yaml and the toolbox), by a readable name."""
    return {**ray_pod_specs(VOLUME_RAYJOB), "toolbox": toolbox()["spec"]}


def all_pod_specs() -> dict[str, dict]:
    """Every pod spec of the Kubernetes manifests, both variants."""
    specs = {f"{name}: {pod}": spec for name in RAYJOB_FILES for pod, spec in ray_pod_specs(name).items()}
    return {**specs, "toolbox": toolbox()["spec"]}


def entrypoint_job(name: str) -> str:
    """The job file a RayJob's entrypoint runs: `shardstep run /jobs/NAME.toml` -> NAME.toml."""
    entrypoint = yaml.safe_load((KUBERAY / name).read_text())["spec"]["entrypoint"]
    (job,) = re.findall(r"\bshardstep run (\S+)", entrypoint)
    return PurePosixPath(job).name


def configmap_keys(variant: str) -> list[str]:
    """The ConfigMap's job files that the RayJob ``variant`` runs (for parametrizing; each key
    is run by exactly one RayJob, see test_configmap_holds_the_job_files_of_deploy_jobs_...)."""
    keys = yaml.safe_load((KUBERAY / "jobs-configmap.yaml").read_text())["data"]
    return sorted(key for key in keys if entrypoint_job(variant) == key)


def rayjob_running(key: str) -> str:
    """The RayJob file whose entrypoint runs the ConfigMap's job file ``key``."""
    (name,) = [name for name in RAYJOB_FILES if entrypoint_job(name) == key]
    return name


def is_url(location: str) -> bool:
    return re.match(r"[A-Za-z][A-Za-z0-9+.-]*://", str(location)) is not None


def is_under_url(url: str, root: str) -> bool:
    return url == root or url.startswith(root.rstrip("/") + "/")


def mounts_of(pod: dict) -> dict[str, tuple[dict, dict]]:
    """mountPath -> (volume, mount) over every container of a pod spec."""
    volumes = {volume["name"]: volume for volume in pod.get("volumes", [])}
    found = {}
    for container in pod["containers"]:
        for mount in container.get("volumeMounts", []):
            found[mount["mountPath"]] = (volumes[mount["name"]], mount)
    return found


def shared_mount_path(pod: dict) -> PurePosixPath:
    """Where a pod mounts the run-directory claim of pvc.yaml."""
    paths = [path for path, (volume, _) in mounts_of(pod).items()
             if volume.get("persistentVolumeClaim", {}).get("claimName") == pvc()["metadata"]["name"]]
    assert len(paths) == 1, f"the claim {pvc()['metadata']['name']} should be mounted once; mounts: {paths}"
    return PurePosixPath(paths[0])


def cpu_quantity(value) -> float:
    """A Kubernetes CPU quantity: 4, "4", "500m"."""
    text = str(value)
    return float(text[:-1]) / 1000 if text.endswith("m") else float(text)


def job_cpus(spec: JobSpec) -> float:
    return spec.shards * spec.shard_cpus + spec.workers * spec.worker_cpus


def is_under(path: str | PurePosixPath, root: PurePosixPath) -> bool:
    return PurePosixPath(path) == root or root in PurePosixPath(path).parents


# ---------------------------------------------------------------------------------------
# the Dockerfile


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) in order; continuation lines joined, comments dropped."""
    instructions, pending = [], ""
    for line in DOCKERFILE.read_text().splitlines():
        if not pending and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        text = (pending + line).strip()
        pending = ""
        keyword, _, arguments = text.partition(" ")
        instructions.append((keyword.upper(), arguments.strip()))
    assert not pending, "the Dockerfile ends inside a continued line"
    return instructions


def docker_arg_defaults() -> dict[str, str]:
    defaults = {}
    for keyword, arguments in dockerfile_instructions():
        if keyword == "FROM":
            break
        if keyword == "ARG" and "=" in arguments:
            name, _, value = arguments.partition("=")
            defaults[name.strip()] = value.strip()
    return defaults


def substitute(text: str, values: dict[str, str]) -> str:
    return re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: values[m.group(1) or m.group(2)], text)


def base_image() -> str:
    (image,) = [arguments for keyword, arguments in dockerfile_instructions() if keyword == "FROM"]
    return substitute(image, docker_arg_defaults())


def image_layout() -> tuple[dict[PurePosixPath, Path], PurePosixPath, str, list[tuple[PurePosixPath, str]]]:
    """What the Dockerfile puts where: container path -> repository path for every COPY, the
    final working directory, the final USER, and the RUN commands with their working directory
    and ARG values substituted."""
    copies: dict[PurePosixPath, Path] = {}
    workdir = PurePosixPath("/")
    user = "root"
    runs = []
    values = dict(docker_arg_defaults())
    for keyword, arguments in dockerfile_instructions():
        if keyword == "ARG" and "=" in arguments:
            name, _, value = arguments.partition("=")
            values[name.strip()] = value.strip()
        elif keyword == "WORKDIR":
            workdir = workdir / arguments
        elif keyword == "USER":
            user = arguments
        elif keyword == "COPY":
            words = [w for w in shlex.split(arguments) if not w.startswith("--")]
            *sources, destination = words
            target = workdir / destination
            for source in sources:
                copies[target if len(sources) == 1 and not destination.endswith("/")
                       else target / Path(source).name] = ROOT / source
        elif keyword == "RUN":
            runs.append((workdir, substitute(arguments, values)))
    return copies, workdir, user, runs


def in_image(path: PurePosixPath, copies: dict[PurePosixPath, Path]) -> Path | None:
    """The repository file a container path holds, if a COPY put it there."""
    for target, source in copies.items():
        if is_under(path, target):
            return source / path.relative_to(target)
    return None


def dockerignore_excludes(relative: str) -> bool:
    """Docker's rule: the last pattern matching the path or one of its parents wins; `*` stays
    within one path element, `**` spans any number of them, `!` re-includes."""
    excluded = False
    parts = relative.split("/")
    candidates = ["/".join(parts[:i]) for i in range(1, len(parts) + 1)]
    for line in DOCKERIGNORE.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        keep = line.startswith("!")
        pattern = line.lstrip("!").strip("/")
        regex = ""
        for piece in re.split(r"(\*\*/|\*\*|\*|\?|\[[^]]*\])", pattern):
            if piece == "**/":
                regex += "(?:.*/)?"
            elif piece == "**":
                regex += ".*"
            elif piece == "*":
                regex += "[^/]*"
            elif piece == "?":
                regex += "[^/]"
            elif piece.startswith("["):
                regex += piece
            else:
                regex += re.escape(piece)
        if any(re.fullmatch(regex, candidate) for candidate in candidates):
            excluded = not keep
    return excluded


# ---------------------------------------------------------------------------------------
# the shardstep commands the files show

SEPARATORS = {"&&", "||", ";", "|", "&", "(", ")"}
# words after which a new command starts
COMMAND_STARTS = SEPARATORS | {"--", "exec", "then", "do", "time", "xargs"}


def shell_commands(text: str) -> list[list[str]]:
    """The `shardstep ...` invocations in a shell command line, including ones nested in a
    quoted argument (`ray exec cluster.yaml "shardstep inspect ..."`)."""
    lexer = shlex.shlex(text, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    tokens = list(lexer)
    found = []
    for index, token in enumerate(tokens):
        previous = tokens[index - 1] if index else ""
        # a command starts the line, follows a separator or `--`, an environment assignment,
        # or the image of `docker run ... IMAGE shardstep ...`
        if token == "shardstep" and (index == 0 or previous in COMMAND_STARTS
                                     or re.fullmatch(r"\w+=\S*", previous)
                                     or re.fullmatch(r"[\w./-]+:[\w.-]+", previous)):
            command = []
            for word in tokens[index + 1:]:
                if word in SEPARATORS or set(word) <= set("<>&|;()"):
                    break
                command.append(word)
            found.append(command)
        elif " " in token and re.search(r"(^|\s)shardstep\s", token):
            found.extend(shell_commands(token))
    return found


def comment_commands(text: str) -> list[str]:
    """Command lines inside `#` comments: a comment indented by three or more spaces is a
    command line (`#   kubectl apply ...`); anywhere else, a `backticked` span."""
    lines = []
    for line in text.splitlines():
        stripped = line.strip()
        if not stripped.startswith("#"):
            continue
        body = stripped.lstrip("#")
        if body.startswith("   ") and body.strip():
            lines.append(body.strip())
        else:
            lines.extend(re.findall(r"`([^`]+)`", body))
    return lines


def inline_spans(text: str) -> list[str]:
    """The inline code spans of markdown prose that start with `shardstep `."""
    without_blocks = re.sub(r"```.*?```", "", text, flags=re.DOTALL)
    return [span for span in re.findall(r"`([^`\n]+)`", without_blocks) if span.startswith("shardstep ")]


def markdown_commands(text: str) -> list[str]:
    """Shell lines of the fenced code blocks (continued lines joined), and inline code spans
    with arguments (`shardstep resume RUN_DIR`); a span of just `shardstep WORD` names a
    command (see :func:`markdown_mentions`)."""
    lines = []
    for language, block in re.findall(r"```(\w*)\n(.*?)```", text, flags=re.DOTALL):
        if language in ("yaml", "toml", "python", "json"):
            continue
        lines.extend(line.removeprefix("$ ") for line in block.replace("\\\n", " ").splitlines() if line.strip())
    lines.extend(span for span in inline_spans(text) if len(span.split()) > 2)
    return lines


def markdown_mentions(text: str) -> list[str]:
    """The commands prose names without arguments: `shardstep run` -> "run"."""
    return [span.split()[1] for span in inline_spans(text) if len(span.split()) == 2]


def is_command_key(key: str) -> bool:
    """YAML keys whose values are commands: a RayJob's entrypoint, a container's command and
    args, the cluster launcher's *_commands lists."""
    return key in ("entrypoint", "command", "args") or key.endswith("_commands")


def yaml_shell_strings(value, key: str = "") -> list[str]:
    """The command lines of a YAML tree: strings under command keys (an exec-form list is one
    command line, a launcher list is one line per item)."""
    if isinstance(value, dict):
        return [s for k, item in value.items() for s in yaml_shell_strings(item, str(k))]
    if isinstance(value, list):
        if is_command_key(key) and value and all(isinstance(item, str) for item in value):
            lines = list(value) if key.endswith("_commands") else [shlex.join(value)]
            # `sh -c "..."` and friends: the script is a command line of its own
            return lines + [item for item in value if " " in item]
        return [s for item in value for s in yaml_shell_strings(item, key)]
    if isinstance(value, str) and is_command_key(key):
        return [value]
    return []


def collect_commands() -> list[tuple[str, list[str]]]:
    """(where, argv after `shardstep`) for every shardstep command in the deployment files."""
    found: list[tuple[str, list[str]]] = []

    def add(where: str, lines: list[str]) -> None:
        seen = set()
        for line in lines:
            for argv in shell_commands(line):
                if tuple(argv) not in seen:
                    seen.add(tuple(argv))
                    found.append((where, argv))

    for path in sorted(DEPLOY.rglob("*")):
        if not path.is_file():
            continue
        where = str(path.relative_to(ROOT))
        text = path.read_text()
        lines = comment_commands(text)
        if path.suffix == ".yaml":
            lines += [s for doc in yaml_documents(path) for s in yaml_shell_strings(doc)]
        elif path.name == "Dockerfile":
            lines += [arguments for keyword, arguments in dockerfile_instructions() if keyword == "RUN"]
        add(where, lines)
    add(str(GUIDE.relative_to(ROOT)), markdown_commands(GUIDE.read_text()))
    return found


COMMANDS = collect_commands()


def parse_cli(argv: list[str]):
    """The real parser's result, or a failure carrying argparse's message."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            return _parser().parse_args(argv)
        except SystemExit as stop:
            if stop.code == 0:  # --version, --help
                return None
            pytest.fail(f"`shardstep {shlex.join(argv)}` does not parse: {err.getvalue().strip()}")


# ---------------------------------------------------------------------------------------
# every file


def test_every_deploy_yaml_parses_into_named_objects():
    paths = sorted(DEPLOY.rglob("*.yaml"))
    assert {p.relative_to(DEPLOY).as_posix() for p in paths} >= {
        "cluster.yaml", "kuberay/rayjob.yaml", "kuberay/pvc.yaml", "kuberay/jobs-configmap.yaml",
        "kuberay/toolbox.yaml", "kuberay/rayjob-s3.yaml", "kuberay/s3-secret.yaml"}
    kinds = set()
    for path in paths:
        documents = yaml_documents(path)
        assert documents and all(isinstance(doc, dict) for doc in documents), path
        if path.parent == KUBERAY:
            for doc in documents:
                assert {"apiVersion", "kind", "metadata"} <= set(doc), f"{path.name}: {sorted(doc)}"
                assert DNS_LABEL.fullmatch(doc["metadata"]["name"]), doc["metadata"]["name"]
                kinds.add(doc["kind"])
    assert kinds == {"RayJob", "PersistentVolumeClaim", "ConfigMap", "Pod", "Secret"}


def test_the_guide_covers_every_deploy_file():
    guide = GUIDE.read_text()
    for path in DEPLOY.rglob("*"):
        if path.is_file() and path.name != "README.md":
            assert f"`deploy/{path.relative_to(DEPLOY).as_posix()}`" in guide, path


# ---------------------------------------------------------------------------------------
# Kubernetes


@pytest.mark.parametrize("name", RAYJOB_FILES)
def test_rayjob_has_kuberay_v1_fields_only_and_everything_it_needs(name):
    job = rayjob(name)
    assert job["apiVersion"] == "ray.io/v1" and job["kind"] == "RayJob"
    spec = job["spec"]
    assert set(spec) <= RAYJOB_SPEC_FIELDS, set(spec) - RAYJOB_SPEC_FIELDS
    assert isinstance(spec["entrypoint"], str) and spec["entrypoint"].strip()
    assert spec.get("submissionMode", "K8sJobMode") in SUBMITTING_MODES
    assert spec["shutdownAfterJobFinishes"] is True
    assert isinstance(spec["ttlSecondsAfterFinished"], int) and spec["ttlSecondsAfterFinished"] >= 0
    # a failed job is retried on a new cluster, which resumes from the shared run directory
    assert isinstance(spec["backoffLimit"], int) and spec["backoffLimit"] >= 1
    assert "clusterSelector" not in spec, "the RayJob brings its own cluster"

    cluster = spec["rayClusterSpec"]
    assert set(cluster) <= RAYCLUSTER_SPEC_FIELDS, set(cluster) - RAYCLUSTER_SPEC_FIELDS
    assert cluster["authOptions"] == {"mode": "token"}
    head = cluster["headGroupSpec"]
    assert set(head) <= HEAD_GROUP_FIELDS and {"template", "rayStartParams"} <= set(head), sorted(head)
    groups = cluster["workerGroupSpecs"]
    assert groups and len({g["groupName"] for g in groups}) == len(groups)
    for group in groups:
        assert set(group) <= WORKER_GROUP_FIELDS, set(group) - WORKER_GROUP_FIELDS
        assert {"groupName", "template", "rayStartParams", "minReplicas", "maxReplicas"} <= set(group)
        assert DNS_LABEL.fullmatch(group["groupName"])
        assert 1 <= group["minReplicas"] <= group.get("replicas", group["minReplicas"]) <= group["maxReplicas"]
    for params in [head["rayStartParams"]] + [g["rayStartParams"] for g in groups]:
        # map[string]string in KubeRay: an unquoted number is refused by the API server
        assert all(isinstance(k, str) and isinstance(v, str) for k, v in params.items()), params


def test_pods_mount_only_volumes_they_declare_and_reserve_their_resources():
    for name, pod in all_pod_specs().items():
        assert pod["containers"], name
        declared = {volume["name"] for volume in pod.get("volumes", [])}
        used = {mount["name"] for c in pod["containers"] for mount in c.get("volumeMounts", [])}
        assert used <= declared, f"{name}: mounts of undeclared volumes {used - declared}"
        assert declared <= used, f"{name}: volumes nothing mounts {declared - used}"
        security = pod["securityContext"]
        assert security["runAsNonRoot"] is True and security["runAsUser"] != 0, name
        for container in pod["containers"]:
            assert container["name"] and container["image"], name
            resources = container["resources"]
            for kind in ("requests", "limits"):
                assert {"cpu", "memory"} <= set(resources[kind]), f"{name}: {kind} {resources[kind]}"
            assert cpu_quantity(resources["requests"]["cpu"]) <= cpu_quantity(resources["limits"]["cpu"]), name


def test_run_directories_are_on_one_readwritemany_claim_at_one_path_everywhere():
    claim = pvc()
    assert "ReadWriteMany" in claim["spec"]["accessModes"], claim["spec"]["accessModes"]
    assert claim["spec"]["resources"]["requests"]["storage"]
    paths = {name: shared_mount_path(pod) for name, pod in pod_specs().items()}
    assert len(set(paths.values())) == 1, f"the run directories must be at one path on every pod: {paths}"
    for name, pod in pod_specs().items():
        _, mount = mounts_of(pod)[str(paths[name])]
        assert not mount.get("readOnly", False), f"{name} must write checkpoints"


@pytest.mark.parametrize("name", RAYJOB_FILES)
def test_entrypoint_runs_a_job_file_the_configmap_puts_on_the_head(name):
    (argv,) = shell_commands(rayjob(name)["spec"]["entrypoint"])
    args = parse_cli(argv)
    assert args.command == "run"
    job_path = PurePosixPath(args.job)
    head_mounts = mounts_of(head_spec(name)["template"]["spec"])
    assert str(job_path.parent) in head_mounts, f"the head mounts nothing at {job_path.parent}"
    volume, mount = head_mounts[str(job_path.parent)]
    configmap = jobs_configmap()
    assert volume["configMap"]["name"] == configmap["metadata"]["name"]
    assert mount.get("readOnly") is True
    keys = {item["path"]: item["key"] for item in volume["configMap"].get("items", [])} or {
        key: key for key in configmap["data"]}
    assert job_path.name in keys, f"{job_path.name} is not in ConfigMap {configmap['metadata']['name']}"
    if args.run_dir is not None:
        if name == VOLUME_RAYJOB:
            assert is_under(args.run_dir, shared_mount_path(head_spec()["template"]["spec"]))
        else:
            assert args.run_dir.startswith("s3://"), args.run_dir


def test_configmap_holds_the_job_files_of_deploy_jobs_each_run_by_one_rayjob():
    keys = set(jobs_configmap()["data"])
    # what `kubectl create configmap shardstep-jobs --from-file=deploy/jobs/` (the guide) makes
    assert keys == set(job_specs()), (sorted(keys), sorted(job_specs()))
    for key in sorted(keys):
        assert jobs_configmap()["data"][key] == (JOBS / key).read_text(), f"{key} differs from deploy/jobs/{key}"
        runners = [name for name in RAYJOB_FILES if entrypoint_job(name) == key]
        assert len(runners) == 1, f"{key} is run by {runners}: a job file no RayJob runs is checked by nothing"


@pytest.mark.parametrize("key", configmap_keys(VOLUME_RAYJOB))
def test_configmap_jobs_validate_and_write_to_the_shared_claim(key):
    text = jobs_configmap()["data"][key]
    spec = parse_job(text, source=f"ConfigMap {key}", base_dir=Path("/jobs"))
    shared = shared_mount_path(head_spec()["template"]["spec"])
    assert is_under(spec.run_dir, shared) and PurePosixPath(spec.run_dir) != shared, spec.run_dir
    assert spec.backend == "ray" and spec.address == "auto", "a cluster job joins the cluster it runs on"
    # the ConfigMap ships the repository's job file verbatim
    assert text == (JOBS / key).read_text()


@pytest.mark.parametrize("key", configmap_keys(S3_RAYJOB))
def test_configmap_s3_jobs_validate_and_write_to_a_bucket(key):
    text = jobs_configmap()["data"][key]
    spec = parse_job(text, source=f"ConfigMap {key}", base_dir=Path("/jobs"))
    # the repository's file validates too, to the same run directory
    assert load_job(JOBS / key).run_dir == spec.run_dir
    match = re.fullmatch(r"s3://(?P<bucket>[a-z0-9][a-z0-9.-]{1,61}[a-z0-9])/(?P<prefix>\S+)", spec.run_dir)
    assert match, f"{key}: run_dir should be a prefix in an S3 bucket (not the bucket's root); got {spec.run_dir}"
    assert spec.backend == "ray" and spec.address == "auto", "a cluster job joins the cluster it runs on"
    # two RayJobs may run at once: never on one run directory (the second would be refused)
    others = {other.run_dir for name, other in job_specs().items() if name != key}
    assert not any(is_under_url(spec.run_dir, o) or is_under_url(o, spec.run_dir) for o in others if is_url(o))
    assert text == (JOBS / key).read_text()


@pytest.mark.parametrize("key", sorted(yaml.safe_load((KUBERAY / "jobs-configmap.yaml").read_text())["data"]))
def test_configmap_jobs_fit_the_worker_groups_and_stay_off_the_head(key):
    spec = parse_job(jobs_configmap()["data"][key], source=key, base_dir=Path("/jobs"))
    name = rayjob_running(key)
    # every actor reserves CPUs, so Ray places them on workers and never on the CPU-less head
    assert spec.shard_cpus > 0 and spec.worker_cpus > 0
    assert head_spec(name)["rayStartParams"]["num-cpus"] == "0"
    capacity = sum(g.get("replicas", g["minReplicas"]) * cpu_quantity(c["resources"]["limits"]["cpu"])
                   for g in worker_groups(name) for c in g["template"]["spec"]["containers"][:1])
    assert job_cpus(spec) <= capacity, f"{key} reserves {job_cpus(spec)} CPUs; {name}'s worker pods have {capacity}"


def test_s3_rayjob_mounts_no_run_directory_volume():
    job = s3_rayjob()
    assert job["metadata"]["name"] != rayjob()["metadata"]["name"], "both variants can be applied side by side"
    for name, pod in ray_pod_specs(S3_RAYJOB).items():
        # the only volume is the read-only job files: no claim, host path, NFS, CSI or ephemeral disk
        # where a run directory could hide, and nothing at the volume variant's path
        for volume in pod.get("volumes", []):
            assert set(volume) == {"name", "configMap"}, f"{name}: volume {volume}"
        for path, (_, mount) in mounts_of(pod).items():
            assert mount.get("readOnly") is True, f"{name}: {path} is writable"
            assert not is_under(path, shared_mount_path(head_spec()["template"]["spec"])), f"{name}: {path}"
    spec = job_specs()[entrypoint_job(S3_RAYJOB)]
    assert spec.run_dir.startswith("s3://"), spec.run_dir


def test_s3_rayjob_gives_every_ray_container_the_secret():
    secret = s3_secret()
    name = secret["metadata"]["name"]
    keys = set(secret_values(secret))
    containers = [(pod_name, container) for pod_name, pod in ray_pod_specs(S3_RAYJOB).items()
                  for container in pod.get("initContainers", []) + pod["containers"]]
    assert len(containers) >= 1 + len(worker_groups(S3_RAYJOB))
    for pod_name, container in containers:
        where = f"{pod_name} container {container['name']}"
        whole = [source for source in container.get("envFrom", []) if source.get("secretRef", {}).get("name") == name]
        # a missing Secret must keep the pod from starting, not start it without credentials
        assert not any(source["secretRef"].get("optional", False) for source in whole), where
        assert not any(source.get("prefix") for source in whole), f"{where}: a prefix renames the variables"
        if whole:
            given = keys
        else:
            given = {variable["name"] for variable in container.get("env", [])
                     if variable.get("valueFrom", {}).get("secretKeyRef", {}).get("name") == name
                     and variable["valueFrom"]["secretKeyRef"].get("key") == variable["name"]
                     and not variable["valueFrom"]["secretKeyRef"].get("optional", False)}
        assert {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_REGION"} <= given, f"{where}: gets {sorted(given)}"
        # a literal value would override the Secret (env wins over envFrom)
        literal = {v["name"] for v in container.get("env", []) if "value" in v and v["name"] in STORE_VARIABLES}
        assert not literal, f"{where}: {sorted(literal)} set in the manifest"


def test_s3_secret_holds_the_store_variables_with_placeholders_only():
    secret = s3_secret()
    assert secret["apiVersion"] == "v1" and secret.get("type", "Opaque") == "Opaque"
    values = secret_values(secret)
    assert set(values) <= STORE_VARIABLES, set(values) - STORE_VARIABLES
    assert {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_REGION"} <= set(values)
    assert all(isinstance(value, str) for value in values.values()), "Secret values are strings"
    for key in CREDENTIAL_VARIABLES & set(values):
        # never a real key in the repository: an obvious placeholder
        assert re.fullmatch(r"<[^<>]+>", values[key]), f"{key}: {values[key]!r} is not a placeholder"
    # the file says how to make the Secret without a file
    create = [line for line in comment_commands((KUBERAY / "s3-secret.yaml").read_text())
              if line.startswith("kubectl create secret generic")]
    assert create and all(shlex.split(line)[4] == secret["metadata"]["name"] for line in create), create
    assert all(f"--from-literal={key}=" in create[0] for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"))


def test_no_credential_is_written_into_the_s3_rayjob_or_the_job_files():
    placeholders = {value for key, value in secret_values(s3_secret()).items() if key in CREDENTIAL_VARIABLES}
    job = s3_rayjob()
    spec = job["spec"]
    # a runtime environment is stored by Ray and shown by `ray job list` and the dashboard
    assert "AWS_" not in spec.get("runtimeEnvYAML", "") and "AWS_" not in spec["entrypoint"]
    containers = [c for pod in ray_pod_specs(S3_RAYJOB).values() for c in pod["containers"]]
    containers += spec.get("submitterPodTemplate", {}).get("spec", {}).get("containers", [])
    for container in containers:
        for variable in container.get("env", []):
            assert not (variable["name"] in CREDENTIAL_VARIABLES and "value" in variable), variable["name"]
    files = [KUBERAY / S3_RAYJOB, KUBERAY / "jobs-configmap.yaml", *sorted(JOBS.glob("*.toml"))]
    for path in files:
        text = path.read_text()
        assert not ACCESS_KEY_ID.search(text), f"{path.name} holds an access key id"
        assert not any(value in text for value in placeholders), path.name
    for path in sorted(JOBS.glob("*.toml")):
        # a job's fields go into job.json in the run directory and its file into a ConfigMap:
        # no store variable at all
        assert "AWS_" not in path.read_text(), path.name
    for path in sorted(p for p in DEPLOY.rglob("*") if p.is_file()) + [GUIDE]:
        assert not ACCESS_KEY_ID.search(path.read_text()), f"{path} holds an access key id"


def test_the_guide_creates_the_secret_the_s3_rayjob_reads():
    guide = GUIDE.read_text()
    name = s3_secret()["metadata"]["name"]
    creates = [line for line in markdown_commands(guide) if line.startswith(f"kubectl create secret generic {name} ")]
    assert creates, f"the guide creates the Secret {name}"
    for line in creates:
        given = set(re.findall(r"--from-literal=(\w+)=", line))
        assert {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_REGION"} <= given <= STORE_VARIABLES, given
    # the S3-compatible variant: the endpoint override and plain HTTP
    assert any({"AWS_ENDPOINT_URL", "AWS_ALLOW_HTTP"} <= set(re.findall(r"--from-literal=(\w+)=", line))
               for line in creates)
    assert f"kubectl apply -f deploy/kuberay/{S3_RAYJOB}" in guide
    assert f"kubectl get rayjob {s3_rayjob()['metadata']['name']} --watch" in guide


def test_every_pod_runs_the_project_image_of_the_pinned_ray():
    images = {c["image"] for pod in all_pod_specs().values() for c in pod["containers"]}
    assert len(images) == 1, images
    (image,) = images
    tag = image.rpartition(":")[2]
    assert tag == pyproject()["project"]["version"], f"{image}: tag it with the project version"
    assert f"docker build -f deploy/Dockerfile -t {image} ." in GUIDE.read_text()
    for name in RAYJOB_FILES:
        assert rayjob(name)["spec"]["rayClusterSpec"]["rayVersion"] == docker_arg_defaults()["RAY_VERSION"], name


# ---------------------------------------------------------------------------------------
# the image


def test_dockerfile_starts_from_ray_image_of_the_release_pyproject_pins():
    version = docker_arg_defaults()["RAY_VERSION"]
    assert Version(version) in ray_requirement().specifier, f"{version} vs pyproject's {ray_requirement()}"
    match = re.fullmatch(r"rayproject/ray:(?P<ray>[\d.]+)-py(?P<major>\d)(?P<minor>\d+)-cpu", base_image())
    assert match, base_image()
    assert match["ray"] == version
    python = Version(f"{match['major']}.{match['minor']}")
    assert python in SpecifierSet(pyproject()["project"]["requires-python"]) and python.release[:2] == (3, 11)


def test_dockerfile_installs_the_project_keeping_the_image_ray_and_never_torch():
    copies, _, _, runs = image_layout()
    version = docker_arg_defaults()["RAY_VERSION"]
    installs = [(workdir, shlex.split(command)) for workdir, command in runs if "pip install" in command]
    assert len(installs) == 1, runs
    workdir, words = installs[0]
    assert f"ray=={version}" in words
    # `.` is the working directory, where pyproject.toml was copied: the repository's project,
    # with the objectstore extra that run directories in a bucket need on every node
    (project,) = [word for word in words if re.fullmatch(r"\.(\[[\w,-]*\])?", word)]
    extras = set(Requirement(f"shardstep{project[1:]}").extras)
    assert "objectstore" in extras, f"{project}: install the objectstore extra"
    optional = pyproject()["project"]["optional-dependencies"]
    assert extras <= set(optional), extras - set(optional)
    assert "obstore" in {Requirement(text).name for text in optional["objectstore"]}
    assert in_image(workdir / "pyproject.toml", copies) == ROOT / "pyproject.toml"
    # no extra the image installs brings torch or another Ray
    for extra in extras:
        names = {Requirement(text).name for text in optional[extra]}
        assert "torch" not in names and "ray" not in names, (extra, names)
    instructions = " ".join(arguments for _, arguments in dockerfile_instructions())
    assert "torch" not in instructions.lower()


def test_dockerfile_copies_every_package_and_runs_as_the_ray_user():
    copies, workdir, user, _ = image_layout()
    for source in copies.values():
        assert source.exists(), source
    project = pyproject()
    # the folders that package-dir maps into the shardstep namespace
    needed = [project["project"]["readme"], *project["tool"]["setuptools"]["package-dir"].values()]
    copied = {source.relative_to(ROOT).as_posix() for source in copies.values()}
    assert set(needed) <= copied, set(needed) - copied
    assert user.split(":")[0] not in ("root", "0"), user
    chowns = re.findall(r"--chown=(\S+)", DOCKERFILE.read_text())
    assert chowns and all(owner == user for owner in chowns), (chowns, user)
    assert workdir == PurePosixPath("/home/ray"), "the Ray images' working directory"


def test_dockerignore_keeps_what_the_dockerfile_copies_and_drops_the_rest():
    copies, _, _, _ = image_layout()
    kept = 0
    for source in copies.values():
        files = [source] if source.is_file() else [p for p in source.rglob("*") if p.is_file()]
        for path in files:
            relative = path.relative_to(ROOT).as_posix()
            if "__pycache__" in path.parts or path.suffix in (".pyc", ".nbi", ".nbc"):
                assert dockerignore_excludes(relative), relative
                continue
            assert not dockerignore_excludes(relative), f"{relative} is copied but excluded from the context"
            kept += 1
    assert kept > 50
    for dropped in ("runs/digits/job.json", ".git/HEAD", "tests/test_deploy.py", ".venv/bin/python",
                    "shardstep.egg-info/PKG-INFO", "service/__pycache__/cli.cpython-311.pyc"):
        assert dockerignore_excludes(dropped), dropped


# ---------------------------------------------------------------------------------------
# the Ray cluster launcher


def test_cluster_config_passes_the_cluster_launchers_own_validation():
    import jsonschema
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = cluster_config()
    validate_config(prepare_config(copy.deepcopy(config)))  # what `ray up` runs first
    misspelt = copy.deepcopy(config)
    misspelt["setup_comands"] = misspelt.pop("setup_commands")
    with pytest.raises(jsonschema.ValidationError):
        validate_config(prepare_config(misspelt))


def test_cluster_runs_the_pinned_ray_and_installs_the_checkout():
    config = cluster_config()
    version = docker_arg_defaults()["RAY_VERSION"]
    assert config["docker"]["image"] == base_image()
    mounts = config["file_mounts"]
    (checkout,) = [remote for remote, local in mounts.items() if (ROOT / local).resolve() == ROOT]
    installs = [shlex.split(c) for c in config["setup_commands"] if "pip install" in c]
    assert len(installs) == 1 and f"ray=={version}" in installs[0] and checkout in installs[0], installs
    assert "torch" not in " ".join(config["setup_commands"]).lower()


def test_cluster_shares_the_run_directories_and_the_auth_token_on_every_node():
    config = cluster_config()
    options = " ".join(config["docker"]["run_options"])
    (host, inside) = re.search(r"--volume (\S+):(\S+)", options).groups()
    assert host == inside, "the same path on the host and in the container"
    assert any(re.search(rf"mount -t nfs4 .* {re.escape(host)}\b", c) for c in config["initialization_commands"])
    # the jobs on a file system (a bucket's job needs no shared path; its nodes need its credentials)
    on_disk = [spec for spec in job_specs().values() if not is_url(spec.run_dir)]
    assert on_disk
    for spec in on_disk:
        assert is_under(spec.run_dir, PurePosixPath(inside)), spec.run_dir
    assert "--env RAY_AUTH_MODE=token" in options
    token_path = re.search(r"--env RAY_AUTH_TOKEN_PATH=(\S+)", options).group(1)
    assert config["file_mounts"][token_path] == "~/.ray/auth_token"
    head = config["available_node_types"][config["head_node_type"]]
    assert head["resources"] == {"CPU": 0}
    assert any("--head" in c and "--num-cpus=0" in c for c in config["head_start_ray_commands"])


def test_cluster_job_files_are_mounted_where_its_commands_read_them():
    mounts = cluster_config()["file_mounts"]
    runs = [argv for where, argv in COMMANDS if where == "deploy/cluster.yaml" and argv[:1] == ["run"]]
    assert runs, "cluster.yaml shows how to submit a job"
    for argv in runs:
        job = PurePosixPath(parse_cli(argv).job)
        local = ROOT / mounts[str(job.parent)] / job.name
        assert local.is_file(), f"{job} is {local}, which does not exist"
        load_job(local)


# ---------------------------------------------------------------------------------------
# the commands


@pytest.mark.parametrize("where, argv", COMMANDS, ids=[f"{w}: {shlex.join(a)}" for w, a in COMMANDS])
def test_every_shardstep_command_parses_with_the_real_cli(where, argv):
    args = parse_cli(argv)
    if args is None:  # --version
        return
    assert args.command is not None, "`shardstep` without a command only prints its help"
    run_dirs = {spec.run_dir for spec in job_specs().values()}
    # paths on the shared storage are a job's run directory or lie inside one
    for name in ("run_dir", "path", "out"):
        value = getattr(args, name, None)
        if value is not None and value.startswith("/mnt/"):
            assert any(is_under(value, PurePosixPath(d)) for d in run_dirs), f"{value}: no job writes there"
        # and so are URLs: the bucket variant's run directory, or an object inside it
        if value is not None and is_url(value):
            assert any(is_under_url(value, d) for d in run_dirs if is_url(d)), f"{value}: no job writes there"
    if args.command == "submit":
        # run from the repository root, like every command of the guide: a job file of the checkout
        assert (ROOT / args.job).is_file(), args.job
        load_job(ROOT / args.job)
        return
    if args.command != "run" or args.job == "JOB.toml":  # JOB.toml: the placeholder of prose
        return
    job = PurePosixPath(args.job)
    if job.is_absolute():
        # /jobs is deploy/jobs on every cluster: the ConfigMap's keys, the launcher's file mount
        assert job.parent == PurePosixPath("/jobs") and job.name in job_specs(), args.job
    else:
        # the image's smoke test: a job file the Dockerfile copies, relative to its WORKDIR
        copies, workdir, _, _ = image_layout()
        local = in_image(workdir / job, copies)
        assert local is not None and local.is_file(), f"{args.job} is not in the image"
        load_job(local)


def test_commands_the_guide_names_exist():
    mentioned = markdown_mentions(GUIDE.read_text())
    assert mentioned, "the guide names commands in its prose"
    for command in mentioned:
        assert parse_cli([command, "--help"]) is None  # a subcommand prints its help and exits 0


def test_the_files_show_the_commands_users_need():
    by_file: dict[str, set[str]] = {}
    for where, argv in COMMANDS:
        by_file.setdefault(where, set()).add(argv[0] if argv else "")
    assert set(SHARDSTEP_SUBCOMMANDS) <= by_file["docs/deploy.md"]
    assert "run" in by_file["deploy/kuberay/rayjob.yaml"] and "run" in by_file["deploy/cluster.yaml"]
    assert "run" in by_file[f"deploy/kuberay/{S3_RAYJOB}"]
    assert "inspect" in by_file["deploy/kuberay/toolbox.yaml"]
    assert ["run", "/jobs/digits.toml"] in [argv for _, argv in COMMANDS]
    assert ["run", "/jobs/digits-s3.toml"] in [argv for _, argv in COMMANDS]
    # the bucket variant's results are read where they are, from any machine with the variables
    s3_run = job_specs()[entrypoint_job(S3_RAYJOB)].run_dir
    guide = [argv for where, argv in COMMANDS if where == "docs/deploy.md"]
    assert ["inspect", s3_run] in guide
    assert any(argv[:2] == ["export", s3_run] and "--out" in argv for argv in guide)


def test_command_extraction_finds_nested_and_prefixed_invocations():
    assert shell_commands('RAY_AUTH_MODE=token ray job submit --address http://h:8265 -- shardstep run /jobs/a.toml') \
        == [["run", "/jobs/a.toml"]]
    assert shell_commands('ray exec c.yaml "shardstep inspect /mnt/r" && shardstep --version > /dev/null') \
        == [["inspect", "/mnt/r"], ["--version"]]
    assert shell_commands("docker run --rm shardstep:0.1.0 shardstep run a.toml --quiet") \
        == [["run", "a.toml", "--quiet"]]
    assert shell_commands("pip install shardstep") == []
    with pytest.raises(pytest.fail.Exception, match="does not parse"):
        parse_cli(["run", "job.toml", "--shards", "0"])
