"""Static checks of the deployment files under cluster/ (no cluster, no network).

- every YAML parses; KubeRay objects are ray.io/v1 RayCluster / RayJob / RayService
- every `cart` command in an entrypoint is a known verb, joins the cluster with
  `--address auto` and names an s3:// `--store`; where the CLI already has the verb,
  the real argument parser accepts the command
- GPU worker groups request nvidia.com/gpu, CPU groups don't; replicas are consistent
- the RayService Serve config is a valid Serve config and equals cluster/serve/cart-serve.yaml
- cluster/ray-up.yaml passes Ray's own cluster-config validation
- cluster/submit.sh passes `bash -n` and builds the expected `ray job submit` command
"""
from __future__ import annotations

import os
import re
import shlex
import subprocess
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
CLUSTER = ROOT / "cluster"
KUBERAY = CLUSTER / "kuberay"
SUBMIT = CLUSTER / "submit.sh"

RAY_VERSION = "2.60.0"
VERBS = {"import", "extract", "caption", "quantize", "reindex", "train", "retrieve", "serve", "evaluate",
         "versions", "rollback", "compact", "check"}
KUBERAY_KINDS = {"RayCluster", "RayJob", "RayService"}
EXPECTED_KINDS = {
    "raycluster.yaml": "RayCluster",
    "rayjob-extract.yaml": "RayJob",
    "rayjob-quantize.yaml": "RayJob",
    "rayjob-train.yaml": "RayJob",
    "rayservice-serve.yaml": "RayService",
}
APP_BUILDER = "pipelines.serve:app_builder"
IMAGE_REPO = "/home/ray/cart-ray"  # where cluster/docker/Dockerfile puts the project


# ---------------------------------------------------------------------------- helpers


def load_docs(path: Path) -> list:
    with open(path) as f:
        return [d for d in yaml.safe_load_all(f) if d is not None]


def kuberay_objects() -> list[tuple[str, dict]]:
    return [(p.name, d) for p in sorted(KUBERAY.glob("*.yaml")) for d in load_docs(p)]


def cluster_spec(obj: dict) -> dict:
    """The RayClusterSpec inside any of the three kinds."""
    kind, spec = obj["kind"], obj["spec"]
    if kind == "RayCluster":
        return spec
    if kind == "RayJob":
        return spec["rayClusterSpec"]
    if kind == "RayService":
        return spec["rayClusterConfig"]
    raise AssertionError(f"unexpected kind {kind}")


def containers(pod_template: dict) -> list[dict]:
    return pod_template["spec"]["containers"]


def gpu_limit(container: dict) -> int:
    return int(container.get("resources", {}).get("limits", {}).get("nvidia.com/gpu", 0))


def is_gpu_group(group: dict) -> bool:
    return "gpu" in group["groupName"].lower()


def cart_commands(entrypoint: str) -> list[list[str]]:
    """Every `cart ...` command in a shell entrypoint, as argv lists (without 'cart')."""
    tokens = shlex.split(entrypoint)
    commands, current = [], []
    for tok in tokens + ["&&"]:
        if tok in {"&&", "||", ";", "|"}:
            # skip leading VAR=value assignments
            while current and re.match(r"^[A-Za-z_][A-Za-z0-9_]*=", current[0]):
                current.pop(0)
            if current and os.path.basename(current[0]) == "cart":
                commands.append(current[1:])
            current = []
        else:
            current.append(tok)
    return commands


def option_value(argv: list[str], name: str) -> str | None:
    for i, tok in enumerate(argv):
        if tok == name and i + 1 < len(argv):
            return argv[i + 1]
        if tok.startswith(name + "="):
            return tok.split("=", 1)[1]
    return None


def set_values(argv: list[str]) -> dict[str, str]:
    out = {}
    for i, tok in enumerate(argv):
        if tok == "--set" and i + 1 < len(argv):
            key, _, value = argv[i + 1].partition("=")
            out[key] = value
    return out


def check_cart_command(argv: list[str], where: str) -> None:
    assert argv, f"{where}: `cart` without a verb"
    verb = argv[0]
    assert verb in VERBS, f"{where}: unknown cart verb {verb!r}"
    assert option_value(argv, "--address") == "auto", f"{where}: cart {verb} must join with --address auto"
    assert argv.count("--address") + sum(a.startswith("--address=") for a in argv) == 1, where
    store = option_value(argv, "--store")
    assert store, f"{where}: cart {verb} needs --store"
    assert store.startswith("s3://"), f"{where}: a cluster job needs a shared s3:// store, got {store}"


def cli_verbs() -> dict:
    """Subcommand parsers of the real `cart` CLI (an import error fails the tests that use it)."""
    import argparse

    from pipelines.cli import build_parser

    parser = build_parser()
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def local_path(image_path: str) -> Path:
    """A path inside the cluster image, mapped onto this checkout."""
    assert image_path.startswith(IMAGE_REPO + "/"), image_path
    return ROOT / image_path[len(IMAGE_REPO) + 1:]


def rayjobs() -> list[tuple[str, dict]]:
    return [(name, obj) for name, obj in kuberay_objects() if obj["kind"] == "RayJob"]


# ---------------------------------------------------------------------------- parsing


def test_every_yaml_parses():
    files = sorted(CLUSTER.rglob("*.yaml")) + sorted(CLUSTER.rglob("*.yml"))
    assert len(files) >= 7, files
    for path in files:
        docs = load_docs(path)
        assert docs, f"{path} is empty"
        assert all(isinstance(d, dict) for d in docs), path


def test_kuberay_kinds_and_api_versions():
    seen = {}
    for name, obj in kuberay_objects():
        assert obj["apiVersion"] == "ray.io/v1", (name, obj["apiVersion"])
        assert obj["kind"] in KUBERAY_KINDS, (name, obj["kind"])
        assert obj["metadata"]["name"], name
        assert re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", obj["metadata"]["name"]), name
        seen[name] = obj["kind"]
    assert seen == EXPECTED_KINDS


# ---------------------------------------------------------------------------- cluster specs


@pytest.mark.parametrize("name,obj", kuberay_objects(), ids=lambda v: v if isinstance(v, str) else "")
def test_cluster_spec(name, obj):
    spec = cluster_spec(obj)
    assert spec["rayVersion"] == RAY_VERSION, name
    assert spec.get("authOptions", {}).get("mode") == "token", f"{name}: token auth must be on"

    head = spec["headGroupSpec"]
    assert isinstance(head["rayStartParams"], dict), name
    head_containers = containers(head["template"])
    assert head_containers[0]["name"] == "ray-head"
    ports = {p["containerPort"] for p in head_containers[0].get("ports", [])}
    assert {6379, 8265, 10001} <= ports, name
    if obj["kind"] == "RayService":
        assert 8000 in ports, f"{name}: the Serve port must be declared on the head"
    assert all(gpu_limit(c) == 0 for c in head_containers), f"{name}: the head needs no GPU"

    images = {c["image"] for c in head_containers}
    groups = spec.get("workerGroupSpecs", [])
    assert groups, name
    names = [g["groupName"] for g in groups]
    assert len(names) == len(set(names)), f"{name}: duplicate groupName"
    for group in groups:
        assert isinstance(group["rayStartParams"], dict), (name, group["groupName"])
        lo, hi = group["minReplicas"], group["maxReplicas"]
        assert 0 <= lo <= group.get("replicas", lo) <= hi, (name, group["groupName"])
        worker_containers = containers(group["template"])
        images |= {c["image"] for c in worker_containers}
        gpus = sum(gpu_limit(c) for c in worker_containers)
        if is_gpu_group(group):
            assert gpus >= 1, f"{name}/{group['groupName']}: GPU group must request nvidia.com/gpu"
            for c in worker_containers:
                requests = c["resources"].get("requests", {})
                if "nvidia.com/gpu" in requests:  # extended resources: requests must equal limits
                    assert int(requests["nvidia.com/gpu"]) == gpu_limit(c)
            tolerations = group["template"]["spec"].get("tolerations", [])
            assert any(t.get("key") == "nvidia.com/gpu" for t in tolerations), (name, group["groupName"])
        else:
            assert gpus == 0, f"{name}/{group['groupName']}: only GPU groups request GPUs"

    # one image everywhere, built for the same Ray version
    assert len(images) == 1, (name, images)
    (image,) = images
    assert f"ray{RAY_VERSION}" in image or f":{RAY_VERSION}" in image, (name, image)


def test_gpu_groups_where_needed():
    by_name = dict(kuberay_objects())
    for name in ("raycluster.yaml", "rayjob-extract.yaml", "rayjob-train.yaml"):
        groups = cluster_spec(by_name[name])["workerGroupSpecs"]
        assert any(is_gpu_group(g) for g in groups), f"{name} needs a GPU worker group"


# ---------------------------------------------------------------------------- RayJobs


@pytest.mark.parametrize("name,obj", rayjobs(), ids=lambda v: v if isinstance(v, str) else "")
def test_rayjob_entrypoint(name, obj):
    spec = obj["spec"]
    commands = cart_commands(spec["entrypoint"])
    assert commands, f"{name}: the entrypoint runs no cart command"
    for argv in commands:
        check_cart_command(argv, name)
    assert spec.get("submissionMode", "K8sJobMode") in {"K8sJobMode", "HTTPMode", "SidecarMode"}
    assert spec["shutdownAfterJobFinishes"] is True
    assert spec.get("backoffLimit", 0) >= 0
    assert spec.get("activeDeadlineSeconds", 1) > 0
    verb = name.removeprefix("rayjob-").removesuffix(".yaml")
    assert commands[0][0] == verb, f"{name} should run cart {verb}"


def test_train_workers_match_gpu_replicas():
    (obj,) = [o for n, o in rayjobs() if n == "rayjob-train.yaml"]
    (argv,) = cart_commands(obj["spec"]["entrypoint"])
    workers = int(option_value(argv, "--workers"))
    assert set_values(argv).get("jobs.use_gpu") == "true"
    gpus = sum(
        g["replicas"] * sum(gpu_limit(c) for c in containers(g["template"]))
        for g in cluster_spec(obj)["workerGroupSpecs"]
    )
    assert workers == gpus, f"--workers {workers} but the cluster has {gpus} GPUs"
    assert "--resume" in argv, "retries on a new cluster must continue from the store's checkpoint"


def test_extract_actors_fit_gpus():
    (obj,) = [o for n, o in rayjobs() if n == "rayjob-extract.yaml"]
    (argv,) = cart_commands(obj["spec"]["entrypoint"])
    sets = set_values(argv)
    need = int(sets["extract.actors"]) * float(sets["extract.num_gpus"])
    gpus = sum(
        g["replicas"] * sum(gpu_limit(c) for c in containers(g["template"]))
        for g in cluster_spec(obj)["workerGroupSpecs"]
    )
    assert 0 < need <= gpus


def check_with_real_cli(argv: list[str], where: str) -> bool:
    """Parse with the real `cart` parser and load the config with the --set overrides."""
    assert argv[0] in cli_verbs(), f"{where}: `cart {argv[0]}` is not a verb of the CLI"
    from cart_core.config import load_config
    from pipelines.cli import build_parser

    args = build_parser().parse_args(argv)
    assert args.address == "auto", where
    config = local_path(args.config) if args.config else ROOT / "configs" / "default.yaml"
    load_config(config, args.overrides)  # unknown keys or bad values raise
    return True


def test_entrypoints_parse_with_the_real_cli():
    """Where the `cart` CLI has a verb, its parser and config loader accept our commands."""
    checked = 0
    for name, obj in rayjobs():
        for argv in cart_commands(obj["spec"]["entrypoint"]):
            checked += check_with_real_cli(argv, name)
    assert checked, "no `cart` command found in the RayJob entrypoints"


def test_cli_verbs_are_known():
    verbs = set(cli_verbs()) - {"demo", "scan", "config"}  # not Ray jobs: they run where you type them
    assert verbs == VERBS, "keep VERBS here and in cluster/submit.sh in step with pipelines/cli.py"


# ---------------------------------------------------------------------------- RayService


def serve_config_from_rayservice() -> dict:
    (obj,) = load_docs(KUBERAY / "rayservice-serve.yaml")
    assert isinstance(obj["spec"]["serveConfigV2"], str), "serveConfigV2 is a YAML string"
    return yaml.safe_load(obj["spec"]["serveConfigV2"])


def test_rayservice_serve_config():
    config = serve_config_from_rayservice()
    (app,) = config["applications"]
    assert app["import_path"] == APP_BUILDER
    assert set(app["args"]) <= {"store", "config", "overrides"}
    assert app["args"]["store"].startswith("s3://")
    assert app["args"]["config"].startswith(IMAGE_REPO + "/"), "a path inside the image; replicas' cwd is not fixed"
    assert local_path(app["args"]["config"]).exists()
    assert isinstance(app["args"].get("overrides", []), list)
    assert app["route_prefix"] == "/"
    assert app["name"] == "cart", "the name `cart serve` uses, so the two don't run side by side"


def test_serve_args_work_with_the_real_app_builder():
    import pipelines.serve as serve_module
    from ray.serve import Application

    (app,) = serve_config_from_rayservice()["applications"]
    module, _, attr = app["import_path"].partition(":")
    assert module == "pipelines.serve" and hasattr(serve_module, attr)
    args = dict(app["args"], config=str(local_path(app["args"]["config"])))
    assert isinstance(getattr(serve_module, attr)(args), Application)


def test_serve_config_is_valid_for_ray_serve():
    import ray.serve.schema as schema
    schema.ServeDeploySchema.model_validate(serve_config_from_rayservice())


def test_serve_deploy_file_matches_rayservice():
    (standalone,) = load_docs(CLUSTER / "serve" / "cart-serve.yaml")
    assert standalone == serve_config_from_rayservice()


# ---------------------------------------------------------------------------- ray up


def ray_up_config() -> dict:
    (config,) = load_docs(CLUSTER / "ray-up.yaml")
    return config


def test_ray_up_shape():
    config = ray_up_config()
    assert config["provider"]["type"] == "aws"
    types = config["available_node_types"]
    head = types[config["head_node_type"]]
    assert head["resources"].get("GPU", 0) == 0
    gpu_types = [t for n, t in types.items() if t.get("resources", {}).get("GPU", 0) >= 1]
    assert gpu_types, "ray-up.yaml needs a GPU worker type"
    for t in gpu_types:
        assert t["node_config"]["InstanceType"].split(".")[0] in {"g4dn", "g5", "g6", "g6e", "p3", "p4d", "p5"}
    workers = [t for n, t in types.items() if n != config["head_node_type"]]
    for t in workers:
        assert 0 <= t["min_workers"] <= t["max_workers"] <= config["max_workers"]
    assert sum(t["min_workers"] for t in workers) <= config["max_workers"]
    setup = "\n".join(config["setup_commands"])
    assert "[gpu]" in setup and "torch" in setup, "setup must install torch and the project's gpu extra"
    assert config["docker"]["image"].startswith(f"rayproject/ray:{RAY_VERSION}")
    assert any("RAY_AUTH_MODE=token" in opt for opt in config["docker"]["run_options"])
    assert "~/.ray/auth_token" in config["file_mounts"]


def test_ray_up_passes_ray_validation():
    import ray.autoscaler._private.util as util
    util.validate_config(util.prepare_config(ray_up_config()))


def test_dockerfile_ray_version_and_wheel_install():
    text = (CLUSTER / "docker" / "Dockerfile").read_text()
    assert f"rayproject/ray:{RAY_VERSION}" in text
    assert "pip wheel --no-cache-dir --no-deps" in text and 'cart_ray-*.whl)[gpu]"' in text
    assert "pip install --no-cache-dir -e" not in text, "the image installs the wheel, not the source tree"
    assert f"WORKDIR {IMAGE_REPO}" in text and "COPY --chown=ray:users configs ./configs" in text


# ---------------------------------------------------------------------------- submit.sh


def clean_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "AWS_"))}
    env["HOME"] = str(tmp_path)
    env.update(extra)
    return env


def run_submit(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(SUBMIT), *args], env=env, capture_output=True, text=True, timeout=60)


def test_submit_sh_syntax_and_mode():
    subprocess.run(["bash", "-n", str(SUBMIT)], check=True)
    assert os.access(SUBMIT, os.X_OK), "submit.sh should be executable"
    text = SUBMIT.read_text()
    assert "set -euo pipefail" in text
    assert set(re.search(r'^VERBS="([^"]+)"', text, re.M).group(1).split()) == VERBS


def test_submit_sh_help(tmp_path):
    out = run_submit(["--help"], clean_env(tmp_path))
    assert out.returncode == 0
    assert "usage:" in out.stdout and "RAY_AUTH_TOKEN" in out.stdout


def test_submit_sh_builds_the_job_command(tmp_path):
    env = clean_env(tmp_path, RAY_AUTH_TOKEN="t0ken", AWS_ENDPOINT_URL="http://minio:9000",
                    AWS_SECRET_ACCESS_KEY="do-not-forward")
    out = run_submit(["--dry-run", "-a", "http://10.0.0.5:8265", "train",
                      "--store", "s3://b/cart", "--workers", "2", "--set", "jobs.use_gpu=true"], env)
    assert out.returncode == 0, out.stderr
    argv = shlex.split(out.stdout)
    assert argv[0] == "RAY_AUTH_MODE=token", "the Ray CLI only sends the token in token mode"
    assert "t0ken" not in out.stdout + out.stderr, "the token must never be printed"
    assert argv[1:4] == ["ray", "job", "submit"]
    assert option_value(argv, "--address") == "http://10.0.0.5:8265"
    assert option_value(argv, "--working-dir") == str(ROOT)
    runtime_env = __import__("json").loads(option_value(argv, "--runtime-env-json"))
    assert runtime_env["env_vars"] == {"AWS_ENDPOINT_URL": "http://minio:9000"}
    assert ".venv/" in runtime_env["excludes"]
    entry = argv[argv.index("--") + 1:]
    assert entry[0] == "cart"
    check_cart_command(entry[1:], "submit.sh")
    assert entry[1:] == ["train", "--address", "auto", "--store", "s3://b/cart", "--workers", "2",
                         "--set", "jobs.use_gpu=true"]
    check_with_real_cli(entry[1:], "submit.sh")


def test_submit_sh_token_file_and_no_upload(tmp_path):
    token = tmp_path / ".ray" / "auth_token"
    token.parent.mkdir()
    token.write_text("abc")
    out = run_submit(["-n", "--no-working-dir", "--no-wait", "quantize", "--store", "s3://b/cart"],
                     clean_env(tmp_path))
    assert out.returncode == 0, out.stderr
    argv = shlex.split(out.stdout)
    assert argv[0] == "RAY_AUTH_MODE=token"
    assert "--working-dir" not in argv and "--no-wait" in argv
    assert "~/.ray/auth_token" in out.stderr


@pytest.mark.parametrize(
    "args,message",
    [
        (["bogus", "--store", "s3://b/c"], "unknown verb"),
        (["train", "--workers", "2"], "needs --store"),
        (["train", "--store", "s3://b/c", "--address", "ray://x:10001"], "--address auto"),
        (["-a", "ray://head:10001", "train", "--store", "s3://b/c"], "dashboard URL"),
        ([], "usage:"),
    ],
)
def test_submit_sh_rejects(tmp_path, args, message):
    out = run_submit(["-n", *args], clean_env(tmp_path, RAY_AUTH_TOKEN="x"))
    assert out.returncode == 2
    assert message in out.stderr


def test_submit_sh_requires_a_token_unless_told(tmp_path):
    out = run_submit(["-n", "quantize", "--store", "s3://b/c"], clean_env(tmp_path))
    assert out.returncode == 2 and "no Ray auth token" in out.stderr
    out = run_submit(["-n", "--no-auth", "quantize", "--store", "s3://b/c"], clean_env(tmp_path))
    assert out.returncode == 0 and shlex.split(out.stdout)[0] == "RAY_AUTH_MODE=disabled"
    out = run_submit(["-n", "quantize", "--store", "s3://b/c"],
                     clean_env(tmp_path, RAY_AUTH_TOKEN_PATH=str(tmp_path / "missing")))
    assert out.returncode == 2 and "RAY_AUTH_TOKEN_PATH" in out.stderr


# ---------------------------------------------------------------------------- README


def test_readme_covers_the_contract():
    text = (CLUSTER / "README.md").read_text()
    for needle in (APP_BUILDER, "RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH",
                   "--resume", "nvidia.com/gpu", "AWS_ENDPOINT_URL", "submit.sh", "ray up"):
        assert needle in text, needle
    code = "\n".join(re.findall(r"```[a-z]*\n(.*?)```", text, re.S))
    assert code
    for verb in re.findall(r"(?:^|[\s(])cart ([a-z]+)\b", code):
        assert verb in VERBS | {"demo"}, f"README runs unknown verb `cart {verb}`"
    for line in re.findall(r"^.*cluster/submit\.sh .*$", code, re.M):
        words = [w for w in shlex.split(line.split("#")[0].replace("\\", " ")) if not w.startswith("$")]
        after = words[words.index("cluster/submit.sh") + 1:]
        verbs = [w for w in after if w in VERBS]
        assert verbs or "--help" in after, f"README submit.sh line without a verb: {line.strip()}"
