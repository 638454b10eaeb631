"""A test kubelet: runs a pod spec as a real container (Podman or Docker).

What a node would do with the spec is done here, so a spec the image cannot satisfy fails:
`command`/`args` replace the image's ENTRYPOINT/CMD as in Kubernetes, `env` (values,
`secretKeyRef`, `configMapKeyRef`, `fieldRef`) and `envFrom` Secrets/ConfigMaps are read
from the emulated cluster, the security context is applied (runAsUser/runAsGroup,
runAsNonRoot checked against the image's USER, readOnlyRootFilesystem without the
engine's own tmpfs mounts, dropped capabilities, no-new-privileges), and emptyDir, Secret
and ConfigMap volumes become host directories mounted where the spec says (Memory
emptyDirs as tmpfs). A pod with a service-account token gets a kubeconfig with its account's
token and the emulator's CA (the emulator is not at kubernetes.default.svc, which the
in-cluster config assumes) instead of the token files; pods with `automountServiceAccountToken: false` get nothing.

Networking is the host's (`--network host`): containers reach the loopback test servers
and listen on the ports their spec names.
"""

from __future__ import annotations

import base64
import json
import os
import resource
import shutil
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[3]
KUBECONFIG_DIR = "/var/run/secrets/vbatch.test"


class PodSpecError(Exception):
    """The spec cannot run (what a kubelet reports as CreateContainerConfigError)."""


@dataclass
class Engine:
    """The container engine the image scripts use (scripts/container-engine.sh)."""

    name: str  # docker | podman
    prefix: list[str]

    @classmethod
    def detect(cls) -> Engine | None:
        if shutil.which("docker") and subprocess.run(["docker", "info"], capture_output=True,
                                                      timeout=30).returncode == 0:
            return cls("docker", ["docker"])
        if not shutil.which("podman"):
            return None
        root = os.environ.get("VBATCH_PODMAN_ROOT", "/var/tmp/vbatch-podman")
        return cls("podman", ["podman", "--root", f"{root}/storage", "--runroot", f"{root}/run",
                              "--storage-driver", "vfs", "--cgroup-manager", "cgroupfs", "--runtime", "runc"])

    def run(self, *args: str, timeout: float = 120, check: bool = True) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*self.prefix, *args], capture_output=True, text=True, timeout=timeout, check=check)

    def image_exists(self, image: str) -> bool:
        return self.run("image", "inspect", image, check=False).returncode == 0

    def image_config(self, image: str) -> dict[str, Any]:
        return json.loads(self.run("image", "inspect", image).stdout)[0]["Config"]

    def can_run_containers(self) -> str | None:
        """None when a container starts here; else why not."""
        base = os.environ.get("BASE_IMAGE", "python:3.11-slim-bookworm")
        if not self.image_exists(base):
            return None  # decided once an image is built
        probe = self.run("run", "--rm", "--pull=never", *ulimit_args(), "--network", "host", base, "true",
                         check=False)
        return None if probe.returncode == 0 else f"{self.name} cannot start a container: {probe.stderr.strip()}"


def ulimit_args() -> list[str]:
    """No higher than the host's: the engine's defaults (1M open files) are refused on the
    development and CI machines, and so is a process limit above 16384 (measured)."""
    out = []
    for flag, limit, cap in (("nofile", resource.RLIMIT_NOFILE, 65536), ("nproc", resource.RLIMIT_NPROC, 16384)):
        soft, hard = resource.getrlimit(limit)
        value = min(v for v in (soft, hard, cap) if v != resource.RLIM_INFINITY)
        out += ["--ulimit", f"{flag}={value}:{value}"]
    return out


def _b64(data: dict[str, str] | None) -> dict[str, str]:
    return {k: base64.b64decode(v).decode() for k, v in (data or {}).items()}


@dataclass
class Kubelet:
    engine: Engine
    workdir: Path
    # name, namespace -> object (Secret/ConfigMap) or None; reads the emulated cluster.
    get_object: Callable[[str, str, str], dict[str, Any] | None]
    # (path, service account) -> writes the kubeconfig a pod with that account's token gets
    # (the emulator's URL, its CA, the account's token: KubeCluster.write_kubeconfig).
    write_kubeconfig: Callable[[Path, str], Path] | None = None
    namespace: str = "default"
    started: list[str] = field(default_factory=list)

    # --- the pieces of a pod ---------------------------------------------------------

    def _secret(self, name: str) -> dict[str, str]:
        obj = self.get_object("Secret", name, self.namespace)
        if obj is None:
            raise PodSpecError(f'secret "{name}" not found')
        return {**_b64(obj.get("data")), **(obj.get("stringData") or {})}

    def _config_map(self, name: str) -> dict[str, str]:
        obj = self.get_object("ConfigMap", name, self.namespace)
        if obj is None:
            raise PodSpecError(f'configmap "{name}" not found')
        return dict(obj.get("data") or {})

    def _env(self, pod_name: str, container: dict[str, Any], extra: dict[str, str]) -> dict[str, str]:
        env: dict[str, str] = {}
        for source in container.get("envFrom") or []:
            prefix = source.get("prefix", "")
            if "secretRef" in source:
                data = self._secret(source["secretRef"]["name"])
            else:
                data = self._config_map(source["configMapRef"]["name"])
            env.update({prefix + k: v for k, v in data.items()})
        fields = {"metadata.name": pod_name, "metadata.namespace": self.namespace, "spec.nodeName": "test-node",
                  "status.podIP": "127.0.0.1"}
        for entry in container.get("env") or []:
            name = entry["name"]
            if "value" in entry:
                env[name] = entry["value"]
                continue
            ref = entry.get("valueFrom") or {}
            if "fieldRef" in ref:
                env[name] = fields[ref["fieldRef"]["fieldPath"]]
            elif "secretKeyRef" in ref:
                key = ref["secretKeyRef"]
                data = self._secret(key["name"])
                if key["key"] not in data:
                    raise PodSpecError(f'couldn\'t find key {key["key"]} in Secret {key["name"]}')
                env[name] = data[key["key"]]
            elif "configMapKeyRef" in ref:
                key = ref["configMapKeyRef"]
                env[name] = self._config_map(key["name"])[key["key"]]
            else:
                raise PodSpecError(f"env {name}: unsupported valueFrom {sorted(ref)}")
        env.update(extra)
        return env

    def _volume_dir(self, pod_dir: Path, volume: dict[str, Any]) -> tuple[Path | None, list[str]]:
        """A host directory holding the volume (or tmpfs flags for a Memory emptyDir)."""
        path = pod_dir / "volumes" / volume["name"]
        if "emptyDir" in volume:
            path.mkdir(parents=True)
            path.chmod(0o777)  # as the kubelet makes emptyDirs: writable by any pod uid
            return path, []
        if "secret" in volume or "configMap" in volume:
            source = volume.get("secret") or volume.get("configMap")
            data = self._secret(source["secretName"]) if "secret" in volume else self._config_map(source["name"])
            items = source.get("items") or [{"key": k, "path": k} for k in data]
            path.mkdir(parents=True)
            mode = source.get("defaultMode", 0o644)
            for item in items:
                if item["key"] not in data:
                    raise PodSpecError(f'volume {volume["name"]}: no key {item["key"]}')
                target = path / item["path"]
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_text(data[item["key"]], encoding="utf-8")
                target.chmod(item.get("mode", mode))
            path.chmod(0o755)
            return path, []
        if "hostPath" in volume:
            return Path(volume["hostPath"]["path"]), []
        raise PodSpecError(f"volume {volume['name']}: unsupported type {sorted(volume)}")

    def _user(self, pod: dict[str, Any], container: dict[str, Any], image: str) -> list[str]:
        ctx = {**(pod.get("securityContext") or {}), **(container.get("securityContext") or {})}
        uid, gid = ctx.get("runAsUser"), ctx.get("runAsGroup")
        if ctx.get("runAsNonRoot"):
            effective = uid
            if effective is None:
                user = (self.engine.image_config(image).get("User") or "0").split(":")[0]
                if not user.isdigit():
                    raise PodSpecError(f"container has runAsNonRoot and image has non-numeric user ({user}), "
                                       "cannot verify user is non-root")
                effective = int(user)
            if int(effective) == 0:
                raise PodSpecError("container has runAsNonRoot and image will run as root")
        args: list[str] = []
        if uid is not None:  # without runAsGroup the primary group is the image's for that uid
            args += ["--user", str(uid) if gid is None else f"{uid}:{gid}"]
        fs_group = (pod.get("securityContext") or {}).get("fsGroup")
        if fs_group is not None:
            args += ["--group-add", str(fs_group)]
        if ctx.get("readOnlyRootFilesystem"):
            # Podman adds tmpfs on /tmp, /var/tmp and /run to read-only containers; a node
            # does not, so a spec without a writable /tmp must fail here as it would there.
            args += ["--read-only"] + (["--read-only-tmpfs=false"] if self.engine.name == "podman" else [])
        caps = ctx.get("capabilities") or {}
        args += [f"--cap-drop={c}" for c in caps.get("drop") or []]
        args += [f"--cap-add={c}" for c in caps.get("add") or []]
        if ctx.get("allowPrivilegeEscalation") is False:
            args += ["--security-opt", "no-new-privileges"]
        if ctx.get("privileged"):
            args += ["--privileged"]
        return args

    def _kubeconfig(self, pod_dir: Path, account: str) -> Path:
        if self.write_kubeconfig is None:
            raise PodSpecError("this test kubelet has no API server to give pods a token for")
        path = pod_dir / "serviceaccount"
        path.mkdir(parents=True)
        self.write_kubeconfig(path / "kubeconfig", account)
        (path / "kubeconfig").chmod(0o644)
        return path

    # --- running it ------------------------------------------------------------------

    def command(self, pod_name: str, pod: dict[str, Any], *, extra_env: dict[str, str] | None = None,
                container_index: int = 0) -> list[str]:
        """The engine command line that runs the pod's container."""
        container = pod["containers"][container_index]
        image = container["image"]
        if not self.engine.image_exists(image):
            raise PodSpecError(f'image "{image}" is not on this node (ErrImageNeverPull)')
        pod_dir = self.workdir / pod_name
        if pod_dir.exists():
            shutil.rmtree(pod_dir)
        pod_dir.mkdir(parents=True)
        args = ["run", "--rm", "--name", f"vbatch-test-{pod_name}", "--pull=never", "--network", "host",
                *ulimit_args()]
        env = self._env(pod_name, container, dict(extra_env or {}))
        volumes = {v["name"]: v for v in pod.get("volumes") or []}
        dirs: dict[str, Path | None] = {}
        for mount in container.get("volumeMounts") or []:
            volume = volumes.get(mount["name"])
            if volume is None:
                raise PodSpecError(f"volumeMount {mount['name']}: no such volume")
            if mount["name"] not in dirs:
                if volume.get("emptyDir", {}).get("medium") == "Memory":
                    dirs[mount["name"]] = None
                else:
                    dirs[mount["name"]] = self._volume_dir(pod_dir, volume)[0]
            host = dirs[mount["name"]]
            target = mount["mountPath"]
            if host is None:
                size = volume["emptyDir"].get("sizeLimit")
                if target == "/dev/shm":
                    args += ["--shm-size", _bytes(size) if size else "64m"]
                else:
                    args += ["--tmpfs", f"{target}:rw,mode=1777" + (f",size={_bytes(size)}" if size else "")]
                continue
            if mount.get("subPath"):
                host = host / mount["subPath"]
            args += ["-v", f"{host}:{target}:{'ro' if mount.get('readOnly') else 'rw'}"]
        if pod.get("automountServiceAccountToken", True) and container.get("automountServiceAccountToken", True):
            account = pod.get("serviceAccountName") or "default"
            args += ["-v", f"{self._kubeconfig(pod_dir, account)}:{KUBECONFIG_DIR}:ro"]
            env.setdefault("KUBECONFIG", f"{KUBECONFIG_DIR}/kubeconfig")
        args += self._user(pod, container, image)
        for name, value in env.items():
            args += ["-e", f"{name}={value}"]
        if container.get("workingDir"):
            args += ["-w", container["workingDir"]]
        command, rest = container.get("command"), list(container.get("args") or [])
        if command:
            args += ["--entrypoint", command[0]]  # a single word: both engines take it as is
            rest = list(command[1:]) + rest
        args.append(image)
        self.started.append(pod_name)
        return [*self.engine.prefix, *args, *rest]

    def start(self, pod_name: str, pod: dict[str, Any], *, log: Path,
              extra_env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
        """The container's engine process: exits with the container's exit code, and
        SIGTERM reaches the container's main process (the engine forwards it)."""
        argv = self.command(pod_name, pod, extra_env=extra_env)
        with open(log, "wb") as out:
            return subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)

    def remove(self, pod_name: str) -> None:
        self.engine.run("rm", "-f", "-t", "5", f"vbatch-test-{pod_name}", check=False, timeout=60)

    def stop_all(self) -> None:
        for name in self.started:
            self.remove(name)


def _bytes(quantity: str) -> str:
    """Kubernetes quantity (1Gi, 512Mi) -> the engine's size (1g, 512m)."""
    units = {"Ki": "k", "Mi": "m", "Gi": "g", "Ti": "t"}
    for suffix, short in units.items():
        if quantity.endswith(suffix):
            return quantity[: -len(suffix)] + short
    return quantity


def wait_http(url: str, *, timeout: float = 60, proc: subprocess.Popen[bytes] | None = None,
              log: Path | None = None) -> None:
    """Until `url` answers 200 (a readiness probe), or the container exited."""
    import httpx

    deadline = time.monotonic() + timeout
    last = ""
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            tail = log.read_text(errors="replace")[-3000:] if log and log.exists() else ""
            raise AssertionError(f"container exited with {proc.returncode} before {url} answered:\n{tail}")
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.HTTPError as exc:
            last = repr(exc)
        time.sleep(0.3)
    raise AssertionError(f"{url} did not answer 200 in {timeout}s ({last})")
