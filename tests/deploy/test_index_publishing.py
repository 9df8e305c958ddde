"""The Kubernetes manifests deliver a new index to running pods: a shared volume that a
publish Job updates (new release folder, symlink flip) and a file watch in every pod."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import kubernetes_validate
import yaml

from service.config import Settings
from tests.conftest import REPO

K8S = REPO / "deploy" / "k8s"


def _load(path: Path) -> dict[str, dict[str, Any]]:
    return {d["kind"]: d for d in yaml.safe_load_all(path.read_text()) if d}


def _base() -> dict[str, dict[str, Any]]:
    kustomization = yaml.safe_load((K8S / "base" / "kustomization.yaml").read_text())
    resources: dict[str, dict[str, Any]] = {}
    for name in kustomization["resources"]:
        resources.update(_load(K8S / "base" / name))
    return resources


def test_pods_read_the_published_volume_and_watch_the_link() -> None:
    base = _base()
    claim = base["PersistentVolumeClaim"]
    kubernetes_validate.validate(claim, "1.37.0", strict=True)
    assert "ReadWriteMany" in claim["spec"]["accessModes"]
    config = base["ConfigMap"]["data"]
    settings = Settings(**{k.removeprefix("FACEGATE_").lower(): v for k, v in config.items()})
    assert settings.index_watch_seconds > 0
    # An explicit threshold would pin it and ignore the calibration shipped with each index.
    assert settings.threshold is None and settings.replica_threshold is None
    pod = base["Deployment"]["spec"]["template"]["spec"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    mount = next(m for m in pod["containers"][0]["volumeMounts"] if m["mountPath"] == "/index")
    assert mount["readOnly"] is True
    assert volumes[mount["name"]]["persistentVolumeClaim"]["claimName"] == claim["metadata"]["name"]
    assert str(settings.index_path) == "/index/current"


def test_the_publish_job_flips_the_link_the_pods_read() -> None:
    job = _load(K8S / "jobs" / "publish-index.yaml")["Job"]
    kubernetes_validate.validate(job, "1.37.0", strict=True)
    base = _base()
    config = base["ConfigMap"]["data"]
    pod = job["spec"]["template"]["spec"]
    publish = pod["containers"][0]
    assert publish["args"][:2] == ["index", "publish"]
    assert publish["args"][3] == config["FACEGATE_INDEX_PATH"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    writable = next(m for m in publish["volumeMounts"] if m["mountPath"] == "/index")
    assert not writable.get("readOnly", False)
    claim = volumes[writable["name"]]["persistentVolumeClaim"]["claimName"]
    assert claim == base["PersistentVolumeClaim"]["metadata"]["name"]
    staging = pod["initContainers"][0]["volumeMounts"][0]["mountPath"]
    assert publish["args"][2].startswith(staging + "/")
    assert (
        publish["image"].split(":")[0]
        == (base["Deployment"]["spec"]["template"]["spec"]["containers"][0]["image"].split(":")[0])
    )


def test_the_publish_command_exists_as_the_job_calls_it() -> None:
    from service.cli import build_parser

    job = _load(K8S / "jobs" / "publish-index.yaml")["Job"]
    args = build_parser().parse_args(job["spec"]["template"]["spec"]["containers"][0]["args"])
    assert args.index_cmd == "publish" and args.name
