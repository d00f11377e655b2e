#!/usr/bin/env python3
"""Check that the deployment examples agree with themselves and with token-proxy.

    python3 .ci/check_deploy.py [--binary target/release/token-proxy] [--root DIR]

Kubernetes (every YAML document in config/kubernetes/*.yaml), for each token-proxy container:
  - it is a native sidecar: in initContainers, with restartPolicy: Always;
  - its args are `run --config PATH`, and a read-only ConfigMap volume mount provides PATH;
  - that ConfigMap's TOML parses (tomllib), and admin_listen is set on a non-loopback address
    with admin_allow_remote = true (kubelet probes connect to the pod IP);
  - startupProbe and readinessProbe are httpGet /readyz, livenessProbe httpGet /healthz, all on
    the port of admin_listen;
  - the routes listen on loopback (or are remote and protected), and every app container's
    http://127.0.0.1:PORT (or localhost) URL names a route's listen port;
  - client secrets come from files on read-only Secret volume mounts (or from secretKeyRef
    environment variables), never from the ConfigMap; no Secret object carries data;
  - a workload identity credential (client_assertion_file / azure = {...}) has the pod label
    azure.workload.identity/use: "true" and a ServiceAccount with the client-id annotation;
  - resource requests (cpu, memory) and a memory limit are set;
  - securityContext: runAsNonRoot, readOnlyRootFilesystem, allowPrivilegeEscalation: false,
    capabilities drop ALL, not privileged, seccompProfile RuntimeDefault (container or pod).
systemd (config/systemd/token-proxy.service):
  - ExecStart runs `token-proxy run --config /absolute/path`; ExecReload sends SIGHUP to $MAINPID.
With --binary: `<binary> health --help` runs, and its default URL has the port and path of the
readiness probes (same admin port, /readyz).

Prints one line per check ("ok" or "FAIL", with the reason) and a closing "N passed, N failed"
line. Exits 0 when every check passed, 1 otherwise (also when PyYAML is missing), 2 on a usage
error.
"""

from __future__ import annotations

import argparse
import ipaddress
import re
import subprocess
import sys
import tomllib
from pathlib import Path, PurePosixPath
from urllib.parse import urlsplit

try:
    import yaml
except ImportError:
    print(
        "check_deploy.py needs PyYAML, which is not installed for "
        f"{sys.executable}. Install it with:\n"
        f"  {sys.executable} -m pip install pyyaml\n"
        "or, for Debian's /usr/bin/python3:\n"
        "  apt-get install -y python3-yaml",
        file=sys.stderr,
    )
    sys.exit(1)

REPO = Path(__file__).resolve().parent.parent
WORKLOAD_KINDS = {"Deployment", "StatefulSet", "DaemonSet", "ReplicaSet", "Job", "CronJob", "Pod"}
WI_LABEL = "azure.workload.identity/use"
WI_CLIENT_ID = "azure.workload.identity/client-id"
WI_SKIP = "azure.workload.identity/skip-containers"
LOCAL_URL = re.compile(r"\bhttps?://(127\.\d+\.\d+\.\d+|localhost|\[::1\])(?::(\d+))?", re.I)
VAR_REF = re.compile(r"\$\{([A-Za-z0-9_]+)\}")


class Report:
    def __init__(self) -> None:
        self.passed = 0
        self.failed = 0

    def check(self, where: str, what: str, problem: str | None) -> bool:
        """Record one check: `problem` is None when it passed, else the reason it failed."""
        if problem is None:
            self.passed += 1
            print(f"ok    {where}: {what}")
            return True
        self.failed += 1
        print(f"FAIL  {where}: {what}: {problem}")
        return False


# ---------------------------------------------------------------- helpers


def parse_listen(value: str) -> tuple[str, int]:
    """'IP:port' or '[v6]:port' -> (ip, port). Raises ValueError."""
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f"{value!r} is not IP:port")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    ipaddress.ip_address(host)
    return host, int(port)


def is_loopback(host: str) -> bool:
    return ipaddress.ip_address(host).is_loopback


def expand(value: str, env: dict[str, str]) -> tuple[str, list[str]]:
    """Expand ${VAR} from the container's literal env; return (text, names not known)."""
    missing: list[str] = []

    def sub(m: re.Match[str]) -> str:
        if m.group(1) in env:
            return env[m.group(1)]
        missing.append(m.group(1))
        return m.group(0)

    return VAR_REF.sub(sub, value), missing


class StrictLoader(yaml.SafeLoader):
    """SafeLoader that refuses duplicate mapping keys (PyYAML keeps the last one silently;
    kubectl refuses them)."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r}", key_node.start_mark
                )
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def pod_template(doc: dict) -> dict | None:
    kind = doc.get("kind")
    if kind == "Pod":
        return doc
    if kind == "CronJob":
        return (((doc.get("spec") or {}).get("jobTemplate") or {}).get("spec") or {}).get(
            "template"
        )
    if kind in WORKLOAD_KINDS:
        return (doc.get("spec") or {}).get("template")
    return None


def is_token_proxy(container: dict) -> bool:
    image = str(container.get("image", ""))
    last = image.rsplit("/", 1)[-1].split("@", 1)[0].split(":", 1)[0]
    return container.get("name") == "token-proxy" or last == "token-proxy"


def literal_env(container: dict) -> dict[str, str]:
    return {e["name"]: str(e["value"]) for e in container.get("env") or [] if "value" in e}


def config_path_from_args(container: dict) -> tuple[str | None, str | None]:
    """(path, problem) from `run --config PATH` in command + args."""
    args = [str(a) for a in (container.get("command") or []) + (container.get("args") or [])]
    if not args:
        return None, "no args: set args: [run, --config, /etc/token-proxy/config.toml] explicitly"
    if "run" not in args:
        return None, f"args {args} do not run the `run` subcommand"
    rest = args[args.index("run") + 1 :]
    for i, arg in enumerate(rest):
        if arg in ("--config", "-c") and i + 1 < len(rest):
            return rest[i + 1], None
        if arg.startswith("--config="):
            return arg.split("=", 1)[1], None
    return None, f"args {args} have no `--config PATH` after `run`"


def mount_for(container: dict, path: str) -> tuple[dict | None, str | None]:
    """The volumeMount that provides `path`, and the path inside the volume (None = the mount
    is the file itself via subPath)."""
    p = PurePosixPath(path)
    best: tuple[dict | None, str | None] = (None, None)
    best_len = -1
    for m in container.get("volumeMounts") or []:
        mp = PurePosixPath(m.get("mountPath", ""))
        if m.get("subPath"):
            if mp == p:
                return m, None
            continue
        if p == mp or mp in p.parents:
            if len(mp.parts) > best_len:
                best, best_len = (m, str(p.relative_to(mp))), len(mp.parts)
    return best


def volume(pod: dict, name: str) -> dict | None:
    for v in pod.get("volumes") or []:
        if v.get("name") == name:
            return v
    return None


def volume_source(vol: dict, kind: str) -> list[dict]:
    """The configMap/secret sources of a volume (direct, or inside a projected volume)."""
    if kind in vol:
        return [vol[kind]]
    return [s[kind] for s in (vol.get("projected") or {}).get("sources") or [] if kind in s]


def key_in_volume(src: dict, rel: str | None, mount: dict) -> str | None:
    """The ConfigMap/Secret key behind `rel` (a path inside the volume)."""
    rel = mount.get("subPath") if rel is None else rel
    items = src.get("items")
    if items:
        for item in items:
            if item.get("path") == rel:
                return item.get("key")
        return None
    return rel if rel and "/" not in rel else None


def effective(container: dict, pod_spec: dict, key: str):
    c = container.get("securityContext") or {}
    if key in c:
        return c[key]
    return (pod_spec.get("securityContext") or {}).get(key)


# ---------------------------------------------------------------- Kubernetes


class Workload:
    def __init__(self, rel: str, doc: dict, tmpl: dict) -> None:
        self.rel = rel
        self.doc = doc
        self.meta = tmpl.get("metadata") or {}
        self.spec = tmpl.get("spec") or {}
        self.name = f"{doc.get('kind')}/{(doc.get('metadata') or {}).get('name')}"


def check_container(
    r: Report,
    w: Workload,
    c: dict,
    in_init: bool,
    objects: dict[tuple[str, str], dict],
    probes_seen: list[tuple[str, int, str]],
) -> None:
    where = f"{w.rel} {w.name} container {c.get('name')}"
    spec = w.spec

    # Native sidecar.
    if not in_init:
        problem = "it is in containers; move it to initContainers with restartPolicy: Always"
    elif c.get("restartPolicy") != "Always":
        problem = (
            f"restartPolicy is {c.get('restartPolicy')!r}, not 'Always': without it this is a"
            " plain init container, which must exit before the app starts"
        )
    else:
        problem = None
    r.check(where, "native sidecar (initContainers, restartPolicy: Always)", problem)

    # Config path, its mount and the TOML.
    path, problem = config_path_from_args(c)
    r.check(where, f"args run --config {path or '?'}", problem)
    config = None
    if path:
        mount, rel = mount_for(c, path)
        vol = volume(spec, mount["name"]) if mount else None
        srcs = volume_source(vol, "configMap") if vol else []
        if mount is None:
            problem = f"no volumeMount provides {path}"
        elif not srcs:
            problem = (
                f"volume {mount['name']!r} mounted at {mount.get('mountPath')} is not a ConfigMap"
            )
        elif mount.get("readOnly") is not True:
            problem = f"volumeMount {mount['name']!r} is not readOnly: true"
        else:
            problem = None
            src = srcs[0]
            key = key_in_volume(src, rel, mount)
            cm = objects.get(("ConfigMap", src.get("name")))
            if key is None:
                problem = f"{path} is not a key of the ConfigMap volume {mount['name']!r}"
            elif cm is None:
                problem = f"ConfigMap {src.get('name')!r} is not defined in {w.rel}"
            elif key not in (cm.get("data") or {}):
                problem = f"ConfigMap {src.get('name')!r} has no key {key!r}"
            else:
                try:
                    config = tomllib.loads(cm["data"][key])
                except tomllib.TOMLDecodeError as e:
                    problem = f"ConfigMap {src.get('name')!r} key {key!r} is not valid TOML: {e}"
        r.check(where, f"read-only ConfigMap mount provides {path} and its TOML parses", problem)
    if config is None:
        r.check(where, "remaining checks need the config", "skipped: the config could not be read")
        return

    env = literal_env(c)

    # admin_listen.
    admin_port = None
    admin = config.get("admin_listen")
    if admin is None:
        problem = "admin_listen is not set; the probes need the admin listener"
    else:
        text, missing = expand(str(admin), env)
        try:
            if missing:
                raise ValueError(
                    f"uses ${{{missing[0]}}}, which is not a literal env value of the container"
                )
            host, admin_port = parse_listen(text)
            if is_loopback(host):
                problem = f"admin_listen {text} is loopback: kubelet probes connect to the pod IP; use 0.0.0.0:{admin_port}"
            elif config.get("admin_allow_remote") is not True:
                problem = (
                    f"admin_listen {text} is not loopback, so admin_allow_remote = true is required"
                )
            else:
                problem = None
        except ValueError as e:
            problem = f"admin_listen {admin!r}: {e}"
    r.check(where, f"admin_listen {admin} reachable by kubelet probes", problem)

    # Probes.
    named_ports = {
        p.get("name"): p.get("containerPort") for p in c.get("ports") or [] if p.get("name")
    }
    for probe, want in (
        ("startupProbe", "/readyz"),
        ("readinessProbe", "/readyz"),
        ("livenessProbe", "/healthz"),
    ):
        get = (c.get(probe) or {}).get("httpGet")
        if get is None:
            problem = f"{probe} is missing or not httpGet"
        else:
            port = get.get("port")
            port = named_ports.get(port, port) if isinstance(port, str) else port
            if get.get("path") != want:
                problem = f"path is {get.get('path')!r}, expected {want}"
            elif str(get.get("scheme", "HTTP")).upper() != "HTTP":
                problem = f"scheme is {get.get('scheme')}, the admin listener speaks plain HTTP"
            elif admin_port is None:
                problem = "cannot compare the port: admin_listen is not usable"
            elif port != admin_port:
                problem = f"port {get.get('port')!r} is not admin_listen's port {admin_port}"
            else:
                problem = None
                if probe == "readinessProbe":
                    probes_seen.append((where, port, want))
        r.check(where, f"{probe} httpGet {want} on the admin port", problem)

    # Routes and the app containers' target.
    route_ports: set[int] = set()
    problems = []
    for i, route in enumerate(config.get("routes") or []):
        listen = str(route.get("listen", ""))
        if listen.startswith("unix:"):
            continue
        text, missing = expand(listen, env)
        try:
            if missing:
                raise ValueError(f"uses ${{{missing[0]}}}, which is not a literal env value")
            host, port = parse_listen(text)
        except ValueError as e:
            problems.append(f"routes[{i}].listen {listen!r}: {e}")
            continue
        route_ports.add(port)
        if not is_loopback(host):
            if route.get("allow_remote") is not True:
                problems.append(
                    f"routes[{i}].listen {text} is not loopback and allow_remote is not set"
                )
            elif not (route.get("inbound_token_file") or route.get("allowed_clients")):
                problems.append(
                    f"routes[{i}].listen {text} is open to the network without inbound_token_file or allowed_clients"
                )
    if not config.get("routes"):
        problems.append("the config has no [[routes]]")
    r.check(
        where,
        f"routes listen on the pod's loopback (ports {sorted(route_ports)})",
        "; ".join(problems) or None,
    )

    targets = []
    for app in spec.get("containers") or []:
        if is_token_proxy(app):
            continue
        texts = [str(e.get("value", "")) for e in app.get("env") or []]
        texts += [str(a) for a in (app.get("command") or []) + (app.get("args") or [])]
        for text in texts:
            for m in LOCAL_URL.finditer(text):
                port = (
                    int(m.group(2))
                    if m.group(2)
                    else (443 if m.group(0).lower().startswith("https") else 80)
                )
                targets.append((app.get("name"), m.group(0), port))
    if not targets:
        problem = "no app container names an http://127.0.0.1:PORT (or localhost) URL in env, command or args"
    else:
        bad = [
            f"{name}: {url} (port {port})" for name, url, port in targets if port not in route_ports
        ]
        problem = (
            f"not a route's listen port {sorted(route_ports)}: {', '.join(bad)}" if bad else None
        )
    shown = ", ".join(sorted({url for _, url, _ in targets})) or "?"
    r.check(where, f"app target {shown} is a route's listen port", problem)

    # Credentials: where secrets come from.
    check_credentials(r, w, c, where, config, spec, env, objects)

    # Every mount read-only.
    rw = [m.get("name") for m in c.get("volumeMounts") or [] if m.get("readOnly") is not True]
    r.check(where, "all volume mounts read-only", f"not readOnly: {rw}" if rw else None)

    # Resources.
    res = c.get("resources") or {}
    req, lim = res.get("requests") or {}, res.get("limits") or {}
    missing = [f"requests.{k}" for k in ("cpu", "memory") if k not in req]
    missing += ["limits.memory"] if "memory" not in lim else []
    r.check(
        where,
        f"resources requests {req} limits {lim}",
        f"missing {', '.join(missing)}" if missing else None,
    )

    # securityContext.
    sc = c.get("securityContext") or {}
    problems = []
    if effective(c, spec, "runAsNonRoot") is not True:
        problems.append("runAsNonRoot is not true")
    if effective(c, spec, "runAsUser") == 0:
        problems.append("runAsUser is 0")
    if sc.get("readOnlyRootFilesystem") is not True:
        problems.append("readOnlyRootFilesystem is not true")
    if sc.get("allowPrivilegeEscalation") is not False:
        problems.append("allowPrivilegeEscalation is not false")
    if sc.get("privileged") is True:
        problems.append("privileged is true")
    caps = sc.get("capabilities") or {}
    if "ALL" not in (caps.get("drop") or []):
        problems.append("capabilities.drop does not contain ALL")
    if caps.get("add"):
        problems.append(f"capabilities.add {caps['add']}")
    seccomp = effective(c, spec, "seccompProfile") or {}
    if seccomp.get("type") != "RuntimeDefault":
        problems.append(f"seccompProfile.type is {seccomp.get('type')!r}, not RuntimeDefault")
    r.check(where, "securityContext hardened", "; ".join(problems) or None)


def check_credentials(r, w, c, where, config, spec, env, objects) -> None:
    env_from_secret = {
        e["name"] for e in c.get("env") or [] if ((e.get("valueFrom") or {}).get("secretKeyRef"))
    }
    for name, cred in (config.get("credentials") or {}).items():
        what = f"credential {name}: secret source"
        if "client_secret" in cred:
            refs = VAR_REF.findall(str(cred["client_secret"]))
            if not refs:
                problem = "client_secret is written in the ConfigMap; use client_secret_file on a Secret volume"
            elif not all(v in env_from_secret for v in refs):
                problem = f"client_secret = {cred['client_secret']!r} must come from a secretKeyRef env var"
            else:
                problem = None
            r.check(where, what + " (client_secret from a Secret env var)", problem)
        elif "client_secret_file" in cred:
            path, missing = expand(str(cred["client_secret_file"]), env)
            mount, rel = mount_for(c, path) if not missing else (None, None)
            vol = volume(spec, mount["name"]) if mount else None
            if missing:
                problem = f"client_secret_file uses ${{{missing[0]}}}, not a literal env value"
            elif mount is None:
                problem = f"no volumeMount provides client_secret_file {path}"
            elif not volume_source(vol or {}, "secret"):
                problem = f"volume {mount['name']!r} that provides {path} is not a Secret"
            elif mount.get("readOnly") is not True:
                problem = f"volumeMount {mount['name']!r} is not readOnly: true"
            else:
                src = volume_source(vol, "secret")[0]
                key = key_in_volume(src, rel, mount)
                problem = (
                    None
                    if key
                    else f"{path} is not a key path of the Secret volume {mount['name']!r}"
                )
                if problem is None:
                    what += f" (file {path}: key {key!r} of Secret {src.get('secretName')!r})"
            r.check(where, what, problem)
        elif "client_assertion_file" in cred or "azure" in cred:
            labels = w.meta.get("labels") or {}
            sa_name = w.spec.get("serviceAccountName") or "default"
            sa = objects.get(("ServiceAccount", sa_name))
            skip = [
                s.strip()
                for s in str((w.meta.get("annotations") or {}).get(WI_SKIP, "")).split(";")
            ]
            if str(labels.get(WI_LABEL)) != "true":
                problem = f'the pod template has no label {WI_LABEL}: "true"'
            elif sa is None:
                problem = f"ServiceAccount {sa_name!r} is not defined in {w.rel}"
            elif not ((sa.get("metadata") or {}).get("annotations") or {}).get(WI_CLIENT_ID):
                problem = f"ServiceAccount {sa_name!r} has no {WI_CLIENT_ID} annotation"
            elif c.get("name") in skip:
                problem = f"the container is listed in {WI_SKIP}"
            else:
                problem = None
            r.check(
                where,
                what + " (workload identity: pod label and ServiceAccount client-id)",
                problem,
            )
        else:
            r.check(where, what, "no client_secret, client_secret_file or client_assertion_file")


def check_kubernetes(r: Report, root: Path, probes_seen: list[tuple[str, int, str]]) -> None:
    files = sorted((root / "config/kubernetes").glob("*.yaml"))
    if not files:
        r.check("config/kubernetes", "YAML files present", "no config/kubernetes/*.yaml")
        return
    for path in files:
        rel = str(path.relative_to(root))
        try:
            docs = [
                d for d in yaml.load_all(path.read_text(), Loader=StrictLoader) if d is not None
            ]
        except yaml.YAMLError as e:
            r.check(rel, "YAML parses", str(e).replace("\n", " "))
            continue
        bad = [
            i
            for i, d in enumerate(docs)
            if not (
                isinstance(d, dict)
                and d.get("apiVersion")
                and d.get("kind")
                and (d.get("metadata") or {}).get("name")
            )
        ]
        r.check(
            rel,
            f"YAML parses ({len(docs)} documents with apiVersion, kind, metadata.name)",
            f"documents {bad} lack one of them" if bad else None,
        )
        objects = {
            (d.get("kind"), (d.get("metadata") or {}).get("name")): d
            for d in docs
            if isinstance(d, dict)
        }

        leaking = [
            n
            for (k, n), d in objects.items()
            if k == "Secret" and (d.get("data") or d.get("stringData"))
        ]
        r.check(
            rel,
            "no Secret object carries data (create secrets with kubectl)",
            f"Secret {leaking} has data" if leaking else None,
        )

        found = 0
        for doc in docs:
            tmpl = pod_template(doc) if isinstance(doc, dict) else None
            if tmpl is None:
                continue
            w = Workload(rel, doc, tmpl)
            for key, in_init in (("initContainers", True), ("containers", False)):
                for c in w.spec.get(key) or []:
                    if is_token_proxy(c):
                        found += 1
                        check_container(r, w, c, in_init, objects, probes_seen)
        r.check(
            rel,
            f"token-proxy containers found ({found})",
            None if found else "no workload runs a token-proxy container",
        )


# ---------------------------------------------------------------- binary and systemd


def check_binary(r: Report, binary: str, probes_seen: list[tuple[str, int, str]]) -> None:
    where = f"binary {binary}"
    cmd = [binary, "health", "--help"]
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired) as e:
        r.check(where, "`health --help` runs", f"could not run {' '.join(cmd)}: {e}")
        return
    if out.returncode != 0:
        first = (out.stderr or out.stdout).strip().splitlines()[:1]
        r.check(
            where,
            "`health` subcommand exists",
            f"`{' '.join(cmd)}` exited {out.returncode}: {first[0] if first else '(no output)'}"
            " -- this binary has no `token-proxy health` subcommand yet; build one that has it",
        )
        return
    text = out.stdout + out.stderr
    m = re.search(r"\[default:\s*(\S+?)\]", text) or re.search(r"https?://\S+", text)
    url = m.group(1) if m and m.re.groups else (m.group(0) if m else None)
    if not url:
        r.check(
            where,
            "`health --help` shows a default URL",
            "no [default: URL] or http:// URL in its output",
        )
        return
    url = url.rstrip(").,'\"")
    parts = urlsplit(url)
    r.check(where, f"`health --help` default URL {url}", None)
    if not probes_seen:
        r.check(
            where,
            "default URL matches the readiness probes",
            "no usable readinessProbe to compare with",
        )
    for place, port, path in probes_seen:
        problem = None
        if parts.port != port:
            problem = f"default port {parts.port} differs from the probe port {port}"
        elif parts.path != path:
            problem = f"default path {parts.path!r} differs from the probe path {path!r}"
        r.check(
            where, f"default URL has the probe's port {port} and path {path} ({place})", problem
        )


def parse_unit(text: str) -> dict[str, dict[str, list[str]]]:
    sections: dict[str, dict[str, list[str]]] = {}
    current = None
    pending = ""
    for raw in text.splitlines():
        line = pending + raw.strip() if pending else raw.strip()
        pending = ""
        if line.endswith("\\"):
            pending = line[:-1] + " "
            continue
        if not line or line[0] in "#;":
            continue
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], {})
        elif "=" in line and current is not None:
            key, value = line.split("=", 1)
            current.setdefault(key.strip(), []).append(value.strip())
    return sections


def check_systemd(r: Report, root: Path) -> None:
    path = root / "config/systemd/token-proxy.service"
    rel = str(path.relative_to(root))
    if not path.is_file():
        r.check(rel, "unit file present", "missing")
        return
    service = parse_unit(path.read_text()).get("Service", {})

    starts = service.get("ExecStart", [])
    problem = None
    if len(starts) != 1:
        problem = f"expected one ExecStart=, found {len(starts)}"
    else:
        argv = starts[0].lstrip("-@:+!").split()
        if not argv or not argv[0].endswith("/token-proxy") or not argv[0].startswith("/"):
            problem = f"ExecStart does not run an absolute path to token-proxy: {starts[0]!r}"
        elif "run" not in argv:
            problem = "ExecStart does not use the `run` subcommand"
        else:
            rest = argv[argv.index("run") + 1 :]
            cfg = next(
                (rest[i + 1] for i, a in enumerate(rest[:-1]) if a in ("--config", "-c")), None
            )
            cfg = cfg or next((a.split("=", 1)[1] for a in rest if a.startswith("--config=")), None)
            if not cfg:
                problem = "ExecStart has no `--config PATH` after `run`"
            elif not cfg.startswith("/"):
                problem = f"--config {cfg} is not an absolute path"
    r.check(rel, f"ExecStart={starts[0] if starts else ''} (run --config)", problem)

    reloads = service.get("ExecReload", [])
    reload = " ".join(reloads)
    if not reloads:
        problem = "no ExecReload="
    elif not re.search(r"\bkill\b", reload) or not re.search(
        r"(-s\s*|--signal[=\s]\s*|-)(SIG)?HUP\b|\bSIGHUP\b", reload
    ):
        problem = f"ExecReload does not send SIGHUP: {reload!r}"
    elif "$MAINPID" not in reload and "${MAINPID}" not in reload:
        problem = f"ExecReload does not signal $MAINPID: {reload!r}"
    else:
        problem = None
    r.check(rel, f"ExecReload={reload} (SIGHUP reloads the config)", problem)


# ---------------------------------------------------------------- main


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--binary",
        help="built token-proxy binary, e.g. target/release/token-proxy: also check `health --help`",
    )
    ap.add_argument("--root", default=str(REPO), help="repository root (default: %(default)s)")
    args = ap.parse_args()
    root = Path(args.root).resolve()

    r = Report()
    probes_seen: list[tuple[str, int, str]] = []
    check_kubernetes(r, root, probes_seen)
    check_systemd(r, root)
    if args.binary:
        check_binary(r, args.binary, probes_seen)
    print(f"{r.passed} passed, {r.failed} failed")
    return 1 if r.failed else 0


if __name__ == "__main__":
    sys.exit(main())
