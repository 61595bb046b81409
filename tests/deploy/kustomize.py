"""A Kustomize renderer for the subset of it that deploy/kubernetes uses, so the manifests can be
tested where no kustomize binary is.

Supported fields of a kustomization: `resources` (files of YAML documents, and directories holding
a kustomization), `patches` (strategic-merge patches, by `path` or inline `patch`, each naming its
one target by kind and name), `replicas`, `namespace`, `labels` (with `includeSelectors` and
`includeTemplates`), `commonLabels`, and `images`. Anything else (another field, a patch `target`,
a `$patch` directive, a patch that matches nothing) is refused with an error rather than rendered
differently from kustomize.

The strategic merge follows Kubernetes' merge keys for the lists the manifests patch (containers
and volumes by name, env by name, mounts by path, ports by port); every other list, and every list
of a custom resource, is replaced whole, as kustomize does without an OpenAPI schema for it.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import yaml

Manifest = dict[str, Any]

FIELDS = frozenset(
    {
        "apiVersion",
        "kind",
        "resources",
        "patches",
        "replicas",
        "namespace",
        "labels",
        "commonLabels",
        "images",
    }
)
KUSTOMIZATION_FILES = ("kustomization.yaml", "kustomization.yml", "Kustomization")

# Kinds that live in no namespace: the namespace transformer leaves them as they are.
CLUSTER_SCOPED = frozenset(
    {
        "Namespace",
        "ClusterRole",
        "ClusterRoleBinding",
        "CustomResourceDefinition",
        "PersistentVolume",
        "StorageClass",
        "PriorityClass",
        "ClusterTriggerAuthentication",
        "MutatingWebhookConfiguration",
        "ValidatingWebhookConfiguration",
    }
)
WORKLOADS = frozenset({"Deployment", "StatefulSet", "ReplicaSet", "DaemonSet"})
SCALABLE = frozenset({"Deployment", "StatefulSet", "ReplicaSet"})
# API groups whose types carry Kubernetes' strategic merge keys.
BUILT_IN_GROUPS = frozenset({"", "apps", "batch", "policy", "autoscaling", "networking.k8s.io"})
MERGE_KEYS = {
    "containers": "name",
    "initContainers": "name",
    "ephemeralContainers": "name",
    "env": "name",
    "volumes": "name",
    "volumeMounts": "mountPath",
    "volumeDevices": "devicePath",
    "imagePullSecrets": "name",
    "hostAliases": "ip",
}


class KustomizeError(ValueError):
    """The kustomization asks for something this renderer does not do, or does not hold."""


def render(directory: Path) -> list[Manifest]:
    """The manifests `kustomize build directory` would print, in resource order."""
    kustomization = _kustomization(directory)
    unknown = set(kustomization) - FIELDS
    if unknown:
        raise KustomizeError(f"{directory}: unsupported kustomization fields {sorted(unknown)}")
    manifests: list[Manifest] = []
    for entry in kustomization.get("resources", []):
        manifests.extend(_resource(directory / entry))
    for patch in kustomization.get("patches", []):
        _patch(manifests, patch, directory)
    for replica in kustomization.get("replicas", []):
        _set_replicas(manifests, replica["name"], replica["count"])
    if "namespace" in kustomization:
        for manifest in manifests:
            if manifest["kind"] not in CLUSTER_SCOPED:
                manifest["metadata"]["namespace"] = kustomization["namespace"]
    if "commonLabels" in kustomization:
        _label(manifests, kustomization["commonLabels"], selectors=True, templates=True)
    for labels in kustomization.get("labels", []):
        selectors = bool(labels.get("includeSelectors", False))
        templates = selectors or bool(labels.get("includeTemplates", False))
        _label(manifests, labels["pairs"], selectors=selectors, templates=templates)
    for image in kustomization.get("images", []):
        _set_image(manifests, image)
    _check_unique(manifests, directory)
    return manifests


def identity(manifest: Manifest) -> tuple[str, str, str]:
    """Group and kind, namespace, name: what makes a resource itself."""
    group = manifest["apiVersion"].rpartition("/")[0]
    metadata = manifest["metadata"]
    return f"{group}/{manifest['kind']}", metadata.get("namespace", ""), metadata["name"]


def _kustomization(directory: Path) -> dict[str, Any]:
    for name in KUSTOMIZATION_FILES:
        path = directory / name
        if path.is_file():
            loaded = yaml.safe_load(path.read_text(encoding="utf-8"))
            if not isinstance(loaded, dict):
                raise KustomizeError(f"{path}: not a mapping")
            return loaded
    raise KustomizeError(f"{directory}: no kustomization file")


def _resource(path: Path) -> list[Manifest]:
    if path.is_dir():
        return render(path)
    documents = list(yaml.safe_load_all(path.read_text(encoding="utf-8")))
    manifests = [document for document in documents if document is not None]
    for manifest in manifests:
        if not isinstance(manifest, dict) or not {"apiVersion", "kind", "metadata"} <= set(
            manifest
        ):
            raise KustomizeError(f"{path}: a document is not a Kubernetes resource")
    return manifests


def _patch(manifests: list[Manifest], entry: dict[str, Any], directory: Path) -> None:
    if set(entry) - {"path", "patch"} or len(entry) != 1:
        raise KustomizeError(f"{directory}: a patch must be one `path` or `patch` (got {entry})")
    text = (
        (directory / entry["path"]).read_text(encoding="utf-8")
        if "path" in entry
        else entry["patch"]
    )
    for patch in yaml.safe_load_all(text):
        if patch is None:
            continue
        targets = [
            manifest
            for manifest in manifests
            if manifest["kind"] == patch["kind"]
            and manifest["apiVersion"] == patch["apiVersion"]
            and manifest["metadata"]["name"] == patch["metadata"]["name"]
            and patch["metadata"].get("namespace") in (None, manifest["metadata"].get("namespace"))
        ]
        if len(targets) != 1:
            raise KustomizeError(
                f"{directory}: the patch of {patch['kind']} {patch['metadata']['name']} matches "
                f"{len(targets)} resources, not one"
            )
        (target,) = targets
        built_in = patch["apiVersion"].rpartition("/")[0] in BUILT_IN_GROUPS
        _merge(target, patch, built_in=built_in, path=())


def _merge(
    base: dict[str, Any], patch: dict[str, Any], *, built_in: bool, path: tuple[str, ...]
) -> None:
    for key, value in patch.items():
        if key.startswith("$"):
            raise KustomizeError(f"unsupported patch directive {key} at {'.'.join(path)}")
        if value is None:
            base.pop(key, None)
        elif isinstance(value, dict) and isinstance(base.get(key), dict):
            _merge(base[key], value, built_in=built_in, path=(*path, key))
        elif isinstance(value, list) and isinstance(base.get(key), list) and built_in:
            merge_key = _merge_key(key, path)
            if merge_key is None:
                base[key] = copy.deepcopy(value)
            else:
                _merge_list(base[key], value, merge_key, built_in=built_in, path=(*path, key))
        else:
            base[key] = copy.deepcopy(value)


def _merge_key(field: str, path: tuple[str, ...]) -> str | None:
    if field == "ports":
        # A container's ports merge on containerPort, a Service's on port.
        in_container = any(part in ("containers", "initContainers") for part in path)
        return "containerPort" if in_container else "port"
    return MERGE_KEYS.get(field)


def _merge_list(
    base: list[Any], patch: list[Any], merge_key: str, *, built_in: bool, path: tuple[str, ...]
) -> None:
    for item in patch:
        if not isinstance(item, dict) or merge_key not in item:
            raise KustomizeError(f"an item of {'.'.join(path)} has no {merge_key}")
        same = [
            old for old in base if isinstance(old, dict) and old.get(merge_key) == item[merge_key]
        ]
        if same:
            _merge(same[0], item, built_in=built_in, path=path)
        else:
            base.append(copy.deepcopy(item))


def _set_replicas(manifests: list[Manifest], name: str, count: int) -> None:
    targets = [m for m in manifests if m["kind"] in SCALABLE and m["metadata"]["name"] == name]
    if not targets:
        raise KustomizeError(f"replicas: no Deployment, StatefulSet or ReplicaSet named {name}")
    for target in targets:
        target["spec"]["replicas"] = count


def _label(
    manifests: list[Manifest], pairs: dict[str, str], *, selectors: bool, templates: bool
) -> None:
    for manifest in manifests:
        manifest["metadata"].setdefault("labels", {}).update(pairs)
        spec = manifest.get("spec", {})
        kind = manifest["kind"]
        if templates and kind in WORKLOADS | {"Job"}:
            spec["template"].setdefault("metadata", {}).setdefault("labels", {}).update(pairs)
        if templates and kind == "CronJob":
            template = spec["jobTemplate"]["spec"]["template"]
            template.setdefault("metadata", {}).setdefault("labels", {}).update(pairs)
        if selectors and kind in WORKLOADS | {"PodDisruptionBudget"}:
            spec.setdefault("selector", {}).setdefault("matchLabels", {}).update(pairs)
        if selectors and kind == "Service":
            spec.setdefault("selector", {}).update(pairs)


def _set_image(manifests: list[Manifest], image: dict[str, str]) -> None:
    def visit(node: object) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                if key in ("containers", "initContainers") and isinstance(value, list):
                    for container in value:
                        if isinstance(container, dict) and "image" in container:
                            container["image"] = _retag(container["image"], image)
                visit(value)
        elif isinstance(node, list):
            for item in node:
                visit(item)

    for manifest in manifests:
        visit(manifest)


def _retag(reference: str, image: dict[str, str]) -> str:
    name, tag, digest = _split_image(reference)
    if name != image["name"]:
        return reference
    name = image.get("newName", name)
    if "digest" in image:
        return f"{name}@{image['digest']}"
    if "newTag" in image:
        return f"{name}:{image['newTag']}"
    return name + (f":{tag}" if tag else "") + (f"@{digest}" if digest else "")


def _split_image(reference: str) -> tuple[str, str, str]:
    rest, _, digest = reference.partition("@")
    slash = rest.rfind("/")
    colon = rest.rfind(":")
    if colon > slash:
        return rest[:colon], rest[colon + 1 :], digest
    return rest, "", digest


def _check_unique(manifests: list[Manifest], directory: Path) -> None:
    seen: set[tuple[str, str, str]] = set()
    for manifest in manifests:
        key = identity(manifest)
        if key in seen:
            raise KustomizeError(f"{directory}: {key} is defined twice")
        seen.add(key)
