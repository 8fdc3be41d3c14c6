#!/usr/bin/env python3
"""Rehearses a deployment of the mesh without a cluster: what the kubelet, kube-proxy, the
cluster DNS and the Endpoints controller would do with the rendered manifests, done here with
the real `mesh` binary.

For each overlay named on the command line (dev, prod, or a folder holding a kustomization):

1. Render it with `kubectl kustomize` and check what a cluster would only find at run time:
   every Secret key a container asks for is one that `create-secrets.sh` makes, every variable
   set in a container is one the binary reads (its `--help` lists them), every host name in a
   URL is a Service of the overlay, every PodDisruptionBudget and the HPA select the pods they
   are named for.
2. Generate what is not in git: the Secrets (the same names and keys as create-secrets.sh, with
   fresh values), and the TLS Secrets cert-manager would issue from the overlay's Certificates
   (their DNS names, their CA), with a private openssl CA.
3. Start every replica of every mesh Deployment as a pod: its own network namespace on a bridge
   (one IP address per pod, as in a cluster), its own mount namespace with a root of its own
   that is read-only when the container asks for `readOnlyRootFilesystem` (only the mounted
   volumes are writable), `/etc/hosts` resolving every Service name as the cluster DNS would
   (headless Services to their ready pods, one address each; the others to a stand-in for
   kube-proxy), the container's user, groups and no capabilities, and exactly the container's
   `command`, `args` and `env` (ConfigMaps and Secrets resolved).
   PostgreSQL is the one the test suite uses (a fresh database per overlay, reached through
   the name the Secrets give); the OpenTelemetry collector is an OTLP/gRPC receiver here.
4. Run each container's startup, liveness and readiness probes as the kubelet does (their own
   port, service name, period, timeout and thresholds), with only ready pods behind a Service.
5. Once every pod is ready: SignUp, GetMe and WatchProfiles through the aggregator's Service,
   over TLS checked against the mesh's CA; one trace of the three services reaches the
   collector. Then a rolling update of every Deployment, pod by pod (surge one, then the old
   pod leaves its Services, runs its preStop and gets SIGTERM, and must be gone within
   terminationGracePeriodSeconds) while a client keeps calling GetMe: no call may fail.
6. Every connection the pods made is recorded (from each pod's own /proc/net/tcp, and by the
   kube-proxy stand-in), and checked against the NetworkPolicies: each is allowed, and each
   rule of a policy for the mesh's pods is used by one of them.

Failures name the object and the field. Needs root (namespaces, mounts), `ip`, `unshare`,
`openssl`, `psql` and `kubectl`; run by scripts/test. Usage:

    deploy/k8s/rehearse.py [--mesh target/debug/mesh] [--rollout|--no-rollout] OVERLAY...
    deploy/k8s/rehearse.py --cases      (the broken manifests of deploy/k8s/rehearsal-cases)
"""

import argparse
import hashlib
import ipaddress
import os
import pathlib
import re
import secrets as random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse

import grpc
import yaml
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
from grpc_health.v1 import health_pb2, health_pb2_grpc

HERE = pathlib.Path(__file__).resolve().parent
ROOT = HERE.parent.parent
NAMESPACE = "mesh"
BRIDGE = "mrh0"
SUBNET = ipaddress.ip_network("10.254.0.0/24")
NODE_IP = str(SUBNET[1])
AGGREGATOR = "mesh.aggregator.v1.AggregatorService"
# The variables the mesh reads besides its flags' (`mesh <service> --help`): the
# OpenTelemetry SDK's standard ones and the log filter.
STANDARD_ENV = {
    "RUST_LOG",
    "OTEL_SERVICE_NAME",
    "OTEL_RESOURCE_ATTRIBUTES",
    "OTEL_SDK_DISABLED",
    "OTEL_EXPORTER_OTLP_ENDPOINT",
    "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
    "OTEL_EXPORTER_OTLP_METRICS_ENDPOINT",
    "OTEL_EXPORTER_OTLP_LOGS_ENDPOINT",
    "OTEL_EXPORTER_OTLP_PROTOCOL",
    "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL",
    "OTEL_EXPORTER_OTLP_METRICS_PROTOCOL",
    "OTEL_EXPORTER_OTLP_LOGS_PROTOCOL",
    "OTEL_EXPORTER_OTLP_HEADERS",
    "OTEL_EXPORTER_OTLP_CERTIFICATE",
    "OTEL_EXPORTER_OTLP_CLIENT_CERTIFICATE",
    "OTEL_EXPORTER_OTLP_CLIENT_KEY",
    "OTEL_EXPORTER_OTLP_TIMEOUT",
    "OTEL_TRACES_EXPORTER",
    "OTEL_METRICS_EXPORTER",
    "OTEL_LOGS_EXPORTER",
    "OTEL_TRACES_SAMPLER",
    "OTEL_TRACES_SAMPLER_ARG",
    "OTEL_PROPAGATORS",
    "OTEL_BSP_SCHEDULE_DELAY",
    "OTEL_BSP_MAX_QUEUE_SIZE",
    "OTEL_BSP_MAX_EXPORT_BATCH_SIZE",
    "OTEL_BSP_EXPORT_TIMEOUT",
    "OTEL_BLRP_SCHEDULE_DELAY",
    "OTEL_BLRP_MAX_QUEUE_SIZE",
    "OTEL_BLRP_MAX_EXPORT_BATCH_SIZE",
    "OTEL_BLRP_EXPORT_TIMEOUT",
    "OTEL_METRIC_EXPORT_INTERVAL",
    "OTEL_METRIC_EXPORT_TIMEOUT",
}


class Failure(Exception):
    """A finding: the rehearsal stops and reports it."""


def log(message):
    print(f"rehearse: {message}", flush=True)


def run(args, **kwargs):
    done = subprocess.run(args, capture_output=True, text=True, **kwargs)
    if done.returncode != 0:
        raise subprocess.CalledProcessError(done.returncode, args, done.stdout, done.stderr)
    return done.stdout


def run_or_fail(args, what):
    try:
        return run(args)
    except subprocess.CalledProcessError as err:
        raise Failure(f"{what}: `{' '.join(args)}` failed: {err.stderr.strip()}") from err


def name_of(doc):
    return f'{doc["kind"]}/{doc["metadata"]["name"]}'


def matches(selector, labels):
    """A label selector (matchLabels, matchExpressions In/NotIn/Exists) against labels."""
    for key, value in (selector.get("matchLabels") or {}).items():
        if labels.get(key) != value:
            return False
    for expr in selector.get("matchExpressions") or []:
        key, op, values = expr["key"], expr["operator"], expr.get("values", [])
        if op == "In" and labels.get(key) not in values:
            return False
        if op == "NotIn" and labels.get(key) in values:
            return False
        if op == "Exists" and key not in labels:
            return False
        if op == "DoesNotExist" and key in labels:
            return False
    return True


# ---------------------------------------------------------------------------------------------
# The manifests: rendering and what can be checked before anything runs.


def render(overlay):
    path = pathlib.Path(overlay)
    if not path.is_dir():
        path = HERE / "overlays" / overlay
    try:
        out = run(["kubectl", "kustomize", str(path)])
    except subprocess.CalledProcessError as err:
        raise Failure(f"{path}: kubectl kustomize failed: {err.stderr.strip()}") from err
    return [doc for doc in yaml.safe_load_all(out) if doc]


def secret_keys_of_create_secrets():
    """The Secrets and keys create-secrets.sh makes, read from the script itself."""
    text = (HERE / "overlays" / "dev" / "create-secrets.sh").read_text()
    made = {}
    for line in re.findall(r"^apply (\S+)((?:.*\\\n)*.*)$", text, re.M):
        name, rest = line
        made[name] = set(re.findall(r"--from-(?:literal|file)=([^=\s]+)=", rest))
    return made


def databases_of_create_secrets():
    """The database each Secret's database-url names in create-secrets.sh."""
    text = (HERE / "overlays" / "dev" / "create-secrets.sh").read_text()
    urls = dict(re.findall(r'^(\w+)="postgres://[^"]*/(\w+)"$', text, re.M))
    found = {}
    for name, var in re.findall(
        r'^apply (\S+) --from-literal=database-url="\$\{?(\w+)\}?"', text, re.M
    ):
        if var not in urls:
            raise Failure(
                f"create-secrets.sh: {name} database-url is ${var}, which is no postgres:// URL"
            )
        found[name] = urls[var]
    return found


def mesh_env_names(mesh, service):
    out = run([mesh, service, "--help"])
    return set(re.findall(r"\[env: ([A-Z0-9_]+)", out)) | STANDARD_ENV


class Manifests:
    def __init__(self, docs, mesh):
        self.docs = docs
        self.deployments = [
            d for d in docs if d["kind"] == "Deployment" and self.mesh_container(d) is not None
        ]
        self.configmaps = {
            d["metadata"]["name"]: d.get("data", {}) for d in docs if d["kind"] == "ConfigMap"
        }
        self.services = [d for d in docs if d["kind"] == "Service"]
        self.policies = [d for d in docs if d["kind"] == "NetworkPolicy"]
        self.certificates = {
            d["spec"]["secretName"]: d
            for d in docs
            if d["kind"] == "Certificate" and d["apiVersion"].startswith("cert-manager.io/")
        }
        self.secret_keys = secret_keys_of_create_secrets()
        self.mesh = mesh
        self.env_names = {}

    @staticmethod
    def mesh_container(deployment):
        """The container that runs the mesh image (its image name is mesh, with any registry)."""
        for container in deployment["spec"]["template"]["spec"]["containers"]:
            last = container.get("image", "").split("@")[0].rsplit("/", 1)[-1]
            if last.split(":")[0] == "mesh":
                return container
        return None

    def service_names(self):
        """Every name the cluster DNS answers for a Service of the namespace."""
        names = set()
        for svc in self.services:
            n = svc["metadata"]["name"]
            names |= {
                n,
                f"{n}.{NAMESPACE}",
                f"{n}.{NAMESPACE}.svc",
                f"{n}.{NAMESPACE}.svc.cluster.local",
            }
        return names

    def container_env(self, deployment, container, generated):
        """The container's environment as the kubelet builds it, in order."""
        where = f"{name_of(deployment)} container {container['name']}"
        env = {}
        for source in container.get("envFrom", []):
            ref = source.get("configMapRef") or source.get("secretRef")
            if "configMapRef" in source:
                if ref["name"] not in self.configmaps:
                    raise Failure(f"{where} envFrom.configMapRef: no ConfigMap {ref['name']}")
                data = self.configmaps[ref["name"]]
            else:
                data = generated.secret(ref["name"], where + " envFrom.secretRef")
            for key, value in data.items():
                env[source.get("prefix", "") + key] = value
        for var in container.get("env", []):
            name = var["name"]
            if "value" in var:
                env[name] = str(var["value"])
                continue
            ref = var.get("valueFrom", {})
            field = f"{where} env {name}"
            if "secretKeyRef" in ref:
                sref = ref["secretKeyRef"]
                data = generated.secret(sref["name"], field + " valueFrom.secretKeyRef")
                if sref["key"] not in data:
                    raise Failure(
                        f"{field} valueFrom.secretKeyRef: Secret {sref['name']} has no key "
                        f"{sref['key']!r} (create-secrets.sh makes: {', '.join(sorted(data))})"
                    )
                env[name] = data[sref["key"]]
            elif "configMapKeyRef" in ref:
                cref = ref["configMapKeyRef"]
                data = self.configmaps.get(cref["name"])
                if data is None or cref["key"] not in data:
                    raise Failure(
                        f"{field} valueFrom.configMapKeyRef: no key {cref['key']!r} in ConfigMap {cref['name']}"
                    )
                env[name] = data[cref["key"]]
            elif "fieldRef" in ref:
                env[name] = {"metadata.namespace": NAMESPACE}.get(ref["fieldRef"]["fieldPath"], "")
            else:
                raise Failure(f"{field}: a valueFrom the rehearsal cannot resolve: {ref}")
        return env

    def check_static(self, generated):
        """What is wrong before anything starts; raises the first finding."""
        names = self.service_names()
        for dep in self.deployments:
            container = self.mesh_container(dep)
            where = f"{name_of(dep)} container {container['name']}"
            service = (container.get("args") or [""])[0]
            if service not in self.env_names:
                try:
                    self.env_names[service] = mesh_env_names(self.mesh, service)
                except subprocess.CalledProcessError as err:
                    raise Failure(
                        f"{where} args: `mesh {service}` is no subcommand: {err.stderr.strip().splitlines()[0]}"
                    ) from err
            known = self.env_names[service]
            for var in container.get("env", []):
                if var["name"] not in known:
                    raise Failure(
                        f"{where} env {var['name']}: `mesh {service}` reads no such variable"
                    )
            env = self.container_env(dep, container, generated)
            for key, value in env.items():
                if "://" not in value:
                    continue
                host = urllib.parse.urlsplit(value).hostname
                source = self.env_source(dep, container, key)
                if key.endswith("DATABASE_URL"):
                    continue  # the database is outside the namespace in prod
                if host and host not in names and not host.endswith(".observability"):
                    raise Failure(
                        f"{source}: host {host!r} in {value!r} is no Service of the overlay"
                    )
        # Every key of a shared ConfigMap is read by one of the services that load it.
        for cname, data in self.configmaps.items():
            readers = [
                d
                for d in self.deployments
                if any(
                    s.get("configMapRef", {}).get("name") == cname
                    for s in self.mesh_container(d).get("envFrom", [])
                )
            ]
            if not readers:
                continue
            for key in data:
                if not any(
                    key in self.env_names[(self.mesh_container(d).get("args") or [""])[0]]
                    for d in readers
                ):
                    raise Failure(
                        f"ConfigMap/{cname} data.{key}: no service that loads it reads it"
                    )
        self.check_selectors()

    def env_source(self, dep, container, key):
        for var in container.get("env", []):
            if var["name"] == key:
                return f"{name_of(dep)} container {container['name']} env {key}"
        for source in container.get("envFrom", []):
            ref = source.get("configMapRef")
            if ref and key in self.configmaps.get(ref["name"], {}):
                return f"ConfigMap/{ref['name']} data.{key}"
        return f"{name_of(dep)} container {container['name']} env {key}"

    def check_selectors(self):
        pods = {
            d["metadata"]["name"]: d["spec"]["template"]["metadata"].get("labels", {})
            for d in self.docs
            if d["kind"] in ("Deployment", "StatefulSet")
        }
        for svc in self.services:
            sel = svc["spec"].get("selector") or {}
            hit = [n for n, labels in pods.items() if matches({"matchLabels": sel}, labels)]
            if not hit:
                raise Failure(f"{name_of(svc)} spec.selector {sel}: selects no pod")
        for pdb in (d for d in self.docs if d["kind"] == "PodDisruptionBudget"):
            hit = [n for n, labels in pods.items() if matches(pdb["spec"]["selector"], labels)]
            if hit != [pdb["metadata"]["name"]]:
                raise Failure(
                    f"{name_of(pdb)} spec.selector: selects the pods of {hit or 'nothing'}, not of {pdb['metadata']['name']}"
                )
        for hpa in (d for d in self.docs if d["kind"] == "HorizontalPodAutoscaler"):
            ref = hpa["spec"]["scaleTargetRef"]
            target = [
                d
                for d in self.docs
                if d["kind"] == ref["kind"] and d["metadata"]["name"] == ref["name"]
            ]
            if not target:
                raise Failure(f"{name_of(hpa)} spec.scaleTargetRef: no {ref['kind']}/{ref['name']}")
            for metric in hpa["spec"].get("metrics", []):
                res = metric.get("resource", {})
                if (
                    metric.get("type") == "Resource"
                    and res.get("target", {}).get("type") == "Utilization"
                ):
                    for c in target[0]["spec"]["template"]["spec"]["containers"]:
                        if res["name"] not in c.get("resources", {}).get("requests", {}):
                            raise Failure(
                                f"{name_of(hpa)} spec.metrics: {res['name']} utilization of {name_of(target[0])}, whose container {c['name']} requests no {res['name']}"
                            )


# ---------------------------------------------------------------------------------------------
# What is not in git: Secrets and certificates.


class Generated:
    def __init__(self, work, manifests, database_urls):
        self.work = work
        self.manifests = manifests
        self.secrets = {}
        password = random.token_hex(16)
        client_secret = random.token_hex(32)
        key = work / "signing-key.pem"
        run(["openssl", "genpkey", "-algorithm", "ed25519", "-out", str(key)])
        # The Secrets name PostgreSQL as the cluster does; /etc/hosts sends that name to the
        # PostgreSQL of the test suite, where each database create-secrets.sh names is made
        # afresh (under a name of the rehearsal's own).

        def url(secret):
            parsed = urllib.parse.urlsplit(database_urls[secret])
            user = parsed.username or "postgres"
            return f"postgres://{user}:{password}@postgres:5432/{parsed.path.lstrip('/')}"

        digest = hashlib.sha256(client_secret.encode()).hexdigest()
        values = {
            "mesh-postgres": {"password": password},
            "mesh-auth": {
                "database-url": url("mesh-auth"),
                "signing-key.pem": key.read_text(),
                "service-clients": f"aggregator=sha256:{digest}",
            },
            "mesh-users": {"database-url": url("mesh-users")},
            "mesh-aggregator": {"client-secret": client_secret},
        }
        made = manifests.secret_keys
        if {k: set(v) for k, v in values.items()} != made:
            raise Failure(
                f"deploy/k8s/overlays/dev/create-secrets.sh makes {made}; the rehearsal makes {({k: set(v) for k, v in values.items()})}: keep them the same"
            )
        self.secrets.update(values)
        self.issue_certificates()

    def secret(self, name, where):
        if name not in self.secrets:
            raise Failure(
                f"{where}: no Secret {name} (neither create-secrets.sh nor a Certificate makes it)"
            )
        return self.secrets[name]

    def issue_certificates(self):
        """What cert-manager would issue: self-signed issuers make CAs, CA issuers sign."""
        certs = self.manifests.certificates
        issuers = {
            d["metadata"]["name"]: d
            for d in self.manifests.docs
            if d["kind"] in ("Issuer", "ClusterIssuer")
        }
        done = {}

        def issue(secret_name):
            if secret_name in done:
                return done[secret_name]
            cert = certs[secret_name]
            spec = cert["spec"]
            ref = spec["issuerRef"]["name"]
            issuer = issuers.get(ref)
            base = self.work / f"cert-{secret_name}"
            subprocess.run(
                [
                    "openssl",
                    "ecparam",
                    "-name",
                    "prime256v1",
                    "-genkey",
                    "-noout",
                    "-out",
                    f"{base}.key",
                ],
                check=True,
            )
            cn = spec.get("commonName") or (spec.get("dnsNames") or ["mesh"])[0]
            ext = base.with_suffix(".ext")
            lines = []
            if spec.get("isCA"):
                lines += [
                    "basicConstraints=critical,CA:TRUE",
                    "keyUsage=critical,keyCertSign,cRLSign",
                ]
            else:
                usages = spec.get("usages", ["digital signature", "key encipherment"])
                eku = [
                    {"server auth": "serverAuth", "client auth": "clientAuth"}[u]
                    for u in usages
                    if u in ("server auth", "client auth")
                ]
                lines += [
                    "basicConstraints=critical,CA:FALSE",
                    "keyUsage=critical,digitalSignature",
                ]
                if eku:
                    lines.append("extendedKeyUsage=" + ",".join(eku))
                sans = [f"DNS:{n}" for n in spec.get("dnsNames", [])] + [
                    f"IP:{a}" for a in spec.get("ipAddresses", [])
                ]
                if sans:
                    lines.append("subjectAltName=" + ",".join(sans))
            ext.write_text("\n".join(lines) + "\n")
            if issuer is not None and "selfSigned" in issuer["spec"]:
                subprocess.run(
                    [
                        "openssl",
                        "req",
                        "-new",
                        "-key",
                        f"{base}.key",
                        "-subj",
                        f"/CN={cn}",
                        "-out",
                        f"{base}.csr",
                    ],
                    check=True,
                    capture_output=True,
                )
                subprocess.run(
                    [
                        "openssl",
                        "x509",
                        "-req",
                        "-in",
                        f"{base}.csr",
                        "-signkey",
                        f"{base}.key",
                        "-days",
                        "30",
                        "-extfile",
                        str(ext),
                        "-out",
                        f"{base}.crt",
                    ],
                    check=True,
                    capture_output=True,
                )
                ca_crt = pathlib.Path(f"{base}.crt").read_text()
            else:
                if issuer is not None and "ca" in issuer["spec"]:
                    ca_secret = issuer["spec"]["ca"]["secretName"]
                    ca = issue(ca_secret)
                else:
                    # An issuer the platform runs (e.g. a public ACME one in prod): a stand-in CA.
                    ca = self.standin_ca(ref)
                subprocess.run(
                    [
                        "openssl",
                        "req",
                        "-new",
                        "-key",
                        f"{base}.key",
                        "-subj",
                        f"/CN={cn}",
                        "-out",
                        f"{base}.csr",
                    ],
                    check=True,
                    capture_output=True,
                )
                subprocess.run(
                    [
                        "openssl",
                        "x509",
                        "-req",
                        "-in",
                        f"{base}.csr",
                        "-CA",
                        ca["crt_path"],
                        "-CAkey",
                        ca["key_path"],
                        "-CAcreateserial",
                        "-days",
                        "30",
                        "-extfile",
                        str(ext),
                        "-out",
                        f"{base}.crt",
                    ],
                    check=True,
                    capture_output=True,
                )
                ca_crt = ca["tls.crt"]
            key_pem = run(["openssl", "pkcs8", "-topk8", "-nocrypt", "-in", f"{base}.key"])
            data = {
                "tls.crt": pathlib.Path(f"{base}.crt").read_text(),
                "tls.key": key_pem,
                "ca.crt": ca_crt,
                "crt_path": f"{base}.crt",
                "key_path": f"{base}.key",
            }
            done[secret_name] = data
            self.secrets[secret_name] = {
                k: v for k, v in data.items() if k in ("tls.crt", "tls.key", "ca.crt")
            }
            return data

        self._issue = issue
        for secret_name in certs:
            issue(secret_name)

    def standin_ca(self, issuer):
        name = f"standin-{issuer}"
        if name not in self.secrets:
            base = self.work / name
            subprocess.run(
                [
                    "openssl",
                    "ecparam",
                    "-name",
                    "prime256v1",
                    "-genkey",
                    "-noout",
                    "-out",
                    f"{base}.key",
                ],
                check=True,
            )
            subprocess.run(
                [
                    "openssl",
                    "req",
                    "-new",
                    "-x509",
                    "-key",
                    f"{base}.key",
                    "-subj",
                    f"/CN={issuer}",
                    "-days",
                    "30",
                    "-out",
                    f"{base}.crt",
                ],
                check=True,
                capture_output=True,
            )
            self.secrets[name] = {
                "tls.crt": pathlib.Path(f"{base}.crt").read_text(),
                "crt_path": f"{base}.crt",
                "key_path": f"{base}.key",
            }
        return self.secrets[name]


# ---------------------------------------------------------------------------------------------
# The node: a bridge, pods in network namespaces, a kube-proxy stand-in, stand-ins for the
# collector and PostgreSQL.


class Recorder:
    """Connections seen: (source, destination, port), as entity names."""

    def __init__(self):
        self.lock = threading.Lock()
        self.seen = set()

    def add(self, src, dst, port):
        with self.lock:
            self.seen.add((src, dst, port))


class Forwarder(threading.Thread):
    """A TCP listener on the node that forwards each connection to one target of `targets()`
    (kube-proxy for a ClusterIP Service, or the way to PostgreSQL), and records who asked."""

    def __init__(self, port, targets, on_connect=None):
        super().__init__(daemon=True)
        self.sock = socket.create_server((NODE_IP, port), reuse_port=False)
        self.port = port
        self.targets = targets
        self.on_connect = on_connect
        self.turn = 0

    def run(self):
        while True:
            try:
                client, addr = self.sock.accept()
            except OSError:
                return
            options = self.targets()
            if not options:
                client.close()
                continue
            self.turn += 1
            target = options[self.turn % len(options)]
            if self.on_connect:
                self.on_connect(addr[0], target)
            threading.Thread(target=self.pipe, args=(client, target), daemon=True).start()

    @staticmethod
    def pipe(client, target):
        try:
            upstream = socket.create_connection(target, timeout=5)
            upstream.settimeout(None)
        except OSError:
            client.close()
            return

        def one_way(a, b):
            try:
                while True:
                    data = a.recv(65536)
                    if not data:
                        break
                    b.sendall(data)
            except OSError:
                pass
            for s in (a, b):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

        t = threading.Thread(target=one_way, args=(upstream, client), daemon=True)
        t.start()
        one_way(client, upstream)
        t.join()
        client.close()
        upstream.close()

    def close(self):
        # shutdown wakes the accept() of the thread; close alone leaves the port bound.
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()
        self.join(timeout=5)


def pb_fields(data):
    """(field number, wire type, value) of one protobuf message; bytes for length-delimited."""
    i, n = 0, len(data)
    while i < n:
        key, i = varint(data, i)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, i = varint(data, i)
        elif wire == 2:
            length, i = varint(data, i)
            value, i = data[i : i + length], i + length
        elif wire == 1:
            value, i = data[i : i + 8], i + 8
        elif wire == 5:
            value, i = data[i : i + 4], i + 4
        else:
            return
        yield number, wire, value


def varint(data, i):
    shift = result = 0
    while True:
        b = data[i]
        i += 1
        result |= (b & 0x7F) << shift
        if not b & 0x80:
            return result, i
        shift += 7


class Collector:
    """An OTLP/gRPC receiver: which services sent spans of which trace."""

    def __init__(self):
        self.lock = threading.Lock()
        self.traces = {}  # trace id (hex) -> services

    def export(self, request, context):
        self.record(request)
        return b""

    def record(self, request):
        for num, _, resource_spans in pb_fields(request):
            if num != 1:
                continue
            service = None
            spans = []
            for n2, _, value in pb_fields(resource_spans):
                if n2 == 1:  # Resource
                    for n3, _, kv in pb_fields(value):
                        if n3 != 1:
                            continue
                        fields = {a: b for a, _, b in pb_fields(kv)}
                        if fields.get(1) == b"service.name":
                            service = (
                                dict((a, b) for a, _, b in pb_fields(fields.get(2, b"")))
                                .get(1, b"")
                                .decode()
                            )
                elif n2 == 2:  # ScopeSpans
                    for n3, _, span in pb_fields(value):
                        if n3 == 2:
                            ids = {a: b for a, _, b in pb_fields(span)}
                            spans.append(ids.get(1, b"").hex())
            with self.lock:
                for trace in spans:
                    self.traces.setdefault(trace, set()).add(service)

    def start(self):
        handler = grpc.method_handlers_generic_handler(
            "opentelemetry.proto.collector.trace.v1.TraceService",
            {"Export": grpc.unary_unary_rpc_method_handler(self.export)},
        )
        others = [
            grpc.method_handlers_generic_handler(
                f"opentelemetry.proto.collector.{s}.v1.{k}Service",
                {"Export": grpc.unary_unary_rpc_method_handler(lambda r, c: b"")},
            )
            for s, k in (("metrics", "Metrics"), ("logs", "Logs"))
        ]
        from concurrent import futures

        self.server = grpc.server(
            futures.ThreadPoolExecutor(max_workers=4), handlers=[handler, *others]
        )
        self.server.add_insecure_port(f"{NODE_IP}:4317")
        self.server.start()

    def stop(self):
        self.server.stop(0)


class Pod:
    def __init__(self, rehearsal, deployment, index):
        self.r = rehearsal
        self.deployment = deployment
        self.service_name = deployment["metadata"]["name"]
        self.name = f"{self.service_name}-{index}"
        self.ip = rehearsal.next_ip()
        self.netns = f"mrh-{os.getpid()}-{self.name}"
        self.container = Manifests.mesh_container(deployment)
        self.spec = deployment["spec"]["template"]["spec"]
        self.labels = deployment["spec"]["template"]["metadata"].get("labels", {})
        self.where = f"{name_of(deployment)} container {self.container['name']}"
        self.started = self.ready = False
        self.terminating = False
        self.failure = None
        self.proc = None
        self.listening = set()
        self.stop_probes = threading.Event()

    # -- the sandbox

    def prepare(self):
        r = self.r
        self.dir = r.work / "pods" / self.name
        root = self.dir / "root"
        for d in (
            "usr/bin",
            "usr/lib",
            "usr/lib64",
            "usr/local/bin",
            "etc",
            "proc",
            "dev",
            "tmp-not-mounted",
        ):
            (root / d).mkdir(parents=True, exist_ok=True)
        (root / "tmp-not-mounted").rmdir()
        for link, target in (("lib", "usr/lib"), ("lib64", "usr/lib64"), ("bin", "usr/bin")):
            (root / link).symlink_to(target)
        (root / "usr/local/bin/mesh").touch()
        (root / "etc/hosts").touch()
        (root / "etc/nsswitch.conf").write_text("hosts: files\n")
        (root / "etc/passwd").write_text(
            "root:x:0:0::/root:/sbin/nologin\nnonroot:x:65532:65532::/home/nonroot:/sbin/nologin\n"
        )
        (root / "etc/group").write_text("root:x:0:\nnonroot:x:65532:\n")
        psc = self.spec.get("securityContext", {})
        csc = self.container.get("securityContext", {})
        uid = csc.get("runAsUser", psc.get("runAsUser", 0))
        gid = csc.get("runAsGroup", psc.get("runAsGroup", uid))
        fs_group = psc.get("fsGroup")
        if (csc.get("runAsNonRoot") or psc.get("runAsNonRoot")) and uid == 0:
            raise Failure(f"{self.where} securityContext: runAsNonRoot with no non-root runAsUser")
        volumes = {v["name"]: v for v in self.spec.get("volumes", [])}
        mounts = []
        for vm in self.container.get("volumeMounts", []):
            vol = volumes.get(vm["name"])
            if vol is None:
                raise Failure(f"{self.where} volumeMounts {vm['name']}: no such volume in the pod")
            if "subPath" in vm:
                raise Failure(
                    f"{self.where} volumeMounts {vm['name']}: subPath mounts are not renewed in place"
                )
            src = self.dir / "volumes" / vm["name"]
            src.mkdir(parents=True, exist_ok=True)
            readonly = vm.get("readOnly", False)
            if "secret" in vol:
                sec = vol["secret"]
                data = r.generated.secret(
                    sec["secretName"],
                    f"{name_of(self.deployment)} volume {vm['name']} secret.secretName",
                )
                items = sec.get("items") or [{"key": k, "path": k} for k in data]
                mode = sec.get("defaultMode", 0o644)
                for item in items:
                    if item["key"] not in data:
                        raise Failure(
                            f"{name_of(self.deployment)} volume {vm['name']} secret.items: Secret {sec['secretName']} has no key {item['key']!r}"
                        )
                    f = src / item["path"]
                    f.write_text(data[item["key"]])
                    # The kubelet hands secret files to the fsGroup, group-readable.
                    os.chown(f, 0, fs_group if fs_group is not None else 0)
                    os.chmod(f, item.get("mode", mode) | (0o040 if fs_group is not None else 0))
                os.chmod(src, 0o755)
                readonly = True
            elif "emptyDir" in vol:
                os.chmod(src, 0o777)
            elif "configMap" in vol:
                data = r.manifests.configmaps.get(vol["configMap"]["name"], {})
                for k, v in data.items():
                    (src / k).write_text(v)
                os.chmod(src, 0o755)
                readonly = True
            else:
                raise Failure(
                    f"{name_of(self.deployment)} volume {vm['name']}: a kind the rehearsal cannot make"
                )
            target = root / vm["mountPath"].lstrip("/")
            target.mkdir(parents=True, exist_ok=True)
            mounts.append((src, vm["mountPath"], readonly))
        self.env = r.manifests.container_env(self.deployment, self.container, r.generated)
        self.env.setdefault("HOSTNAME", self.name)
        self.env.setdefault("PATH", "/usr/local/bin:/usr/bin")
        command = self.container.get("command") or ["/usr/local/bin/mesh"]
        args = self.container.get("args") or []
        ro_root = csc.get("readOnlyRootFilesystem", False)
        script = ["set -e", f"R={root}", "mount --bind $R $R"]
        if ro_root:
            script.append("mount -o remount,bind,ro $R")
        for d in ("usr/bin", "usr/lib", "usr/lib64"):
            script += [f"mount --bind /{d} $R/{d}", f"mount -o remount,bind,ro $R/{d}"]
        script += [
            f"mount --bind {r.mesh} $R/usr/local/bin/mesh",
            f"mount --bind {r.hosts} $R/etc/hosts",
            "mount --bind /dev $R/dev",
            "mount -t proc proc $R/proc",
        ]
        for src, path, readonly in mounts:
            script.append(f"mount --bind {src} $R{path}")
            if readonly:
                script.append(f"mount -o remount,bind,ro $R{path}")
        groups = (
            ",".join(
                str(g)
                for g in ([fs_group] if fs_group is not None else [])
                + psc.get("supplementalGroups", [])
            )
            or None
        )
        setpriv = ["/usr/bin/setpriv", f"--reuid={uid}", f"--regid={gid}"]
        setpriv += [f"--groups={groups}"] if groups else ["--clear-groups"]
        if csc.get("allowPrivilegeEscalation") is False:
            setpriv.append("--no-new-privs")
        if "ALL" in csc.get("capabilities", {}).get("drop", []):
            setpriv += ["--inh-caps=-all", "--bounding-set=-all"]
        script.append(
            'exec /usr/sbin/chroot "$R" '
            + " ".join(sh_quote(a) for a in setpriv + ["--", *command, *args])
        )
        self.script = "\n".join(script)
        self.ro_root = ro_root

    def start(self):
        veth = f"mrh{os.getpid() % 100000}-{self.ip.rsplit('.', 1)[1]}"
        ns = ["ip", "netns", "exec", self.netns]
        for step in (
            ["ip", "netns", "add", self.netns],
            [
                "ip",
                "link",
                "add",
                veth,
                "type",
                "veth",
                "peer",
                "name",
                "eth0",
                "netns",
                self.netns,
            ],
            ["ip", "link", "set", veth, "master", BRIDGE, "up"],
            ns + ["ip", "addr", "add", f"{self.ip}/{SUBNET.prefixlen}", "dev", "eth0"],
            ns + ["ip", "link", "set", "eth0", "up"],
            ns + ["ip", "link", "set", "lo", "up"],
            ns + ["ip", "route", "add", "default", "via", NODE_IP],
            # Client ports above every server port, so the recorder can tell a connection's
            # direction from its ports alone.
            ns + ["sysctl", "-qw", "net.ipv4.ip_local_port_range=51000 60999"],
        ):
            run_or_fail(step, f"the network of pod {self.name}")
        self.log = open(self.dir / "log", "w")
        self.proc = subprocess.Popen(
            ns + ["sh", "-c", self.script],
            env=self.env,
            stdout=self.log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self.started_at = time.monotonic()
        self.prober = threading.Thread(target=self.probe_loop, daemon=True)
        self.prober.start()

    def log_tail(self, lines=6):
        try:
            text = (self.dir / "log").read_text(errors="replace").strip().splitlines()
        except OSError:
            return ""
        return "\n    ".join(text[-lines:])

    # -- probes, as the kubelet runs them

    def probe(self, probe):
        if "grpc" not in probe:
            raise Failure(f"{self.where}: a probe that is not gRPC (the mesh serves gRPC health)")
        port = probe["grpc"]["port"]
        service = probe["grpc"].get("service", "")
        timeout = probe.get("timeoutSeconds", 1)
        channel = grpc.insecure_channel(f"{self.ip}:{port}")
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=service), timeout=timeout
            )
            return reply.status == health_pb2.HealthCheckResponse.SERVING, None
        except grpc.RpcError as err:
            return False, err.code()
        finally:
            channel.close()

    def probe_loop(self):
        try:
            self._probe_loop()
        except Failure as f:
            self.failure = str(f)
        except Exception as err:  # noqa: BLE001 - any crash of the prober is a finding
            self.failure = f"{self.where}: prober crashed: {err!r}"

    def _probe_loop(self):
        c = self.container
        startup, liveness, readiness = (
            c.get("startupProbe"),
            c.get("livenessProbe"),
            c.get("readinessProbe"),
        )
        next_at = {}
        failures = {"startupProbe": 0, "livenessProbe": 0, "readinessProbe": 0}
        successes = {"readinessProbe": 0}
        started = startup is None
        now = time.monotonic()
        for kind, p in (
            ("startupProbe", startup),
            ("livenessProbe", liveness),
            ("readinessProbe", readiness),
        ):
            if p:
                next_at[kind] = now + p.get("initialDelaySeconds", 0)
        while not self.stop_probes.is_set():
            if self.proc.poll() is not None:
                if not self.terminating:
                    raise Failure(
                        f"{self.where}: exited with status {self.proc.returncode} (command {c.get('command') or ['/usr/local/bin/mesh']}, args {c.get('args')}):\n    {self.log_tail()}"
                    )
                return
            now = time.monotonic()
            for kind, p in (
                ("startupProbe", startup),
                ("livenessProbe", liveness),
                ("readinessProbe", readiness),
            ):
                if not p or now < next_at.get(kind, 0):
                    continue
                if kind != "startupProbe" and not started:
                    continue
                if kind == "startupProbe" and started:
                    continue
                next_at[kind] = now + p.get("periodSeconds", 10)
                ok, code = self.probe(p)
                field = f"{self.where} {kind}.grpc.service {p['grpc'].get('service', '')!r} on port {p['grpc']['port']}"
                if code == grpc.StatusCode.NOT_FOUND:
                    raise Failure(
                        f"{field}: the server has no such health name (NOT_FOUND): the probe can never pass"
                    )
                if code == grpc.StatusCode.UNIMPLEMENTED:
                    raise Failure(f"{field}: that port serves no gRPC health (UNIMPLEMENTED)")
                threshold = p.get("failureThreshold", 3)
                if ok:
                    failures[kind] = 0
                    if kind == "startupProbe":
                        started = True
                        self.started = True
                        # The other probes start once the startup probe has passed.
                        next_at["livenessProbe"] = next_at["readinessProbe"] = now
                    elif kind == "readinessProbe":
                        successes[kind] += 1
                        if successes[kind] >= p.get("successThreshold", 1) and not self.ready:
                            self.ready = True
                            self.r.endpoints_changed()
                else:
                    failures[kind] += 1
                    if kind == "readinessProbe":
                        successes[kind] = 0
                    if failures[kind] >= threshold:
                        if kind == "startupProbe":
                            raise Failure(
                                f"{field}: still failing after {threshold} tries every {p.get('periodSeconds', 10)} s ({code}): the kubelet kills the container\n    {self.log_tail()}"
                            )
                        if kind == "livenessProbe" and not self.terminating:
                            raise Failure(
                                f"{field}: failed {threshold} times ({code}): the kubelet restarts the container\n    {self.log_tail()}"
                            )
                        if kind == "readinessProbe" and self.ready:
                            self.ready = False
                            self.r.endpoints_changed()
            self.record_connections()
            self.stop_probes.wait(0.2)

    def record_connections(self):
        """Connections of the pod's network namespace, from its /proc/net/tcp."""
        # Until `ip netns exec` has entered the pod's namespace, the process is still in the
        # node's, whose connections (the kube-proxy stand-in's) are not the pod's.
        try:
            if (
                os.stat(f"/proc/{self.proc.pid}/ns/net").st_ino
                != os.stat(f"/run/netns/{self.netns}").st_ino
            ):
                return
        except OSError:
            return
        try:
            text = pathlib.Path(f"/proc/{self.proc.pid}/net/tcp").read_text()
        except OSError:
            return
        rows = [line.split() for line in text.splitlines()[1:]]
        for row in rows:
            local, remote, state = row[1], row[2], row[3]
            if state == "0A":
                self.listening.add(int(local.split(":")[1], 16))
        for row in rows:
            local, remote, state = row[1], row[2], row[3]
            if state not in ("01", "02"):  # ESTABLISHED, SYN_SENT
                continue
            lport = int(local.split(":")[1], 16)
            rip = socket.inet_ntoa(bytes.fromhex(remote.split(":")[0])[::-1])
            rport = int(remote.split(":")[1], 16)
            if lport in self.listening or lport < 51000 or rip.startswith("127."):
                continue  # inbound (recorded on the client's side), or the pod's own loopback
            self.r.record_outbound(self, rip, rport)

    # -- termination

    def terminate(self):
        """What the kubelet does to a pod being deleted: preStop, SIGTERM, then SIGKILL at the
        end of the grace period."""
        self.terminating = True
        grace = self.spec.get("terminationGracePeriodSeconds", 30)
        deadline = time.monotonic() + grace
        pre_stop = self.container.get("lifecycle", {}).get("preStop")
        if pre_stop:
            if "sleep" in pre_stop:
                time.sleep(pre_stop["sleep"]["seconds"])
            else:
                raise Failure(
                    f"{self.where} lifecycle.preStop: a handler the distroless image cannot run (only sleep)"
                )
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise Failure(
                f"{self.where} terminationGracePeriodSeconds {grace}: still running at the end of the grace period (after preStop and SIGTERM): killed"
            )
        self.stop_probes.set()
        if self.proc.returncode != 0:
            raise Failure(
                f"{self.where}: exited with status {self.proc.returncode} after SIGTERM:\n    {self.log_tail()}"
            )

    def kill(self):
        self.stop_probes.set()
        if self.proc and self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except OSError:
                pass
            self.proc.wait()
        subprocess.run(["ip", "netns", "del", self.netns], capture_output=True)


def sh_quote(s):
    return "'" + str(s).replace("'", "'\\''") + "'"


# ---------------------------------------------------------------------------------------------
# The client side: calls through the aggregator's Service.


class Api:
    def __init__(self, work):
        image = work / "proto.binpb"
        run(
            [
                str(ROOT / "tools/node_modules/.bin/buf"),
                "build",
                str(ROOT / "proto"),
                "-o",
                str(image),
            ]
        )
        fds = descriptor_pb2.FileDescriptorSet.FromString(image.read_bytes())
        pool = descriptor_pool.DescriptorPool()
        for f in fds.file:
            pool.Add(f)
        self.pool = pool

    def message(self, name):
        return message_factory.GetMessageClass(self.pool.FindMessageTypeByName(name))

    def method(self, channel, name, kind="unary_unary"):
        m = self.pool.FindServiceByName(AGGREGATOR).FindMethodByName(name)
        req, resp = self.message(m.input_type.full_name), self.message(m.output_type.full_name)
        make = getattr(channel, kind)
        return (
            make(
                f"/{AGGREGATOR}/{name}",
                request_serializer=req.SerializeToString,
                response_deserializer=resp.FromString,
            ),
            req,
        )


# ---------------------------------------------------------------------------------------------
# One overlay.


class Rehearsal:
    def __init__(self, overlay, mesh, database_url, rollout):
        self.overlay = overlay
        self.mesh = mesh
        self.rollout = rollout
        self.database_url = database_url
        self.pods = []
        self.ip_count = 1
        self.lock = threading.Lock()
        self.recorder = Recorder()
        self.forwarders = []
        self.collector = None

    def next_ip(self):
        self.ip_count += 1
        return str(SUBNET[self.ip_count])

    def record_outbound(self, pod, ip, port):
        other = next((p for p in self.pods if p.ip == ip), None)
        if other is not None:
            self.recorder.add(pod.name, other.name, port)
        elif ip == NODE_IP and port == 5432:
            self.recorder.add(pod.name, "postgres", port)
        elif ip == NODE_IP and port == 4317:
            self.recorder.add(pod.name, "otel-collector", port)
        elif ip == NODE_IP and port in self.proxied_ports:
            pass  # through the kube-proxy stand-in, which records the pod it chose
        else:
            self.recorder.add(pod.name, f"{ip}", port)

    # -- names and endpoints

    def endpoints_changed(self):
        with self.lock:
            lines = ["127.0.0.1 localhost"]
            for svc in self.manifests.services:
                name = svc["metadata"]["name"]
                selector = svc["spec"].get("selector") or {}
                names = f"{name} {name}.{NAMESPACE} {name}.{NAMESPACE}.svc {name}.{NAMESPACE}.svc.cluster.local"
                if svc["spec"].get("clusterIP") == "None":
                    for pod in self.pods:
                        if (
                            pod.ready
                            and not pod.terminating
                            and matches({"matchLabels": selector}, pod.labels)
                        ):
                            lines.append(f"{pod.ip} {names}")
                else:
                    lines.append(f"{NODE_IP} {names}")
            # Outside the namespace: the platform's collector (prod) and the database.
            lines.append(
                f"{NODE_IP} otel-collector.observability otel-collector.observability.svc otel-collector.observability.svc.cluster.local"
            )
            if not any(s["metadata"]["name"] == "postgres" for s in self.manifests.services):
                lines.append(f"{NODE_IP} postgres")  # prod: the database the Secrets name
            text = "\n".join(lines) + "\n"
            # In place: every pod has this file bind-mounted.
            with open(self.hosts, "r+") as f:
                f.truncate(0)
                f.write(text)

    def service_targets(self, svc):
        selector = svc["spec"].get("selector") or {}
        port = svc["spec"]["ports"][0]

        def targets():
            with self.lock:
                return [
                    (p.ip, self.target_port(p, port))
                    for p in self.pods
                    if p.ready
                    and not p.terminating
                    and matches({"matchLabels": selector}, p.labels)
                ]

        return targets

    @staticmethod
    def target_port(pod, port):
        target = port.get("targetPort", port["port"])
        if isinstance(target, int):
            return target
        for p in pod.container.get("ports", []):
            if p.get("name") == target:
                return p["containerPort"]
        raise Failure(f"{pod.where} ports: no port named {target!r} (a Service's targetPort)")

    # -- the whole run

    def setup(self):
        self.work = pathlib.Path(
            tempfile.mkdtemp(prefix=f"mesh-rehearse-{pathlib.Path(self.overlay).name}-")
        )
        os.chmod(self.work, 0o755)
        self.docs = render(self.overlay)
        self.manifests = Manifests(self.docs, self.mesh)
        admin = self.database_url
        prefix = (
            f"rehearse_{os.getpid()}_{re.sub('[^a-z0-9]', '_', pathlib.Path(self.overlay).name)}"
        )
        self.databases = []
        urls = {}
        for secret, database in databases_of_create_secrets().items():
            name = f"{prefix}_{database}"
            if name not in self.databases:
                run(["psql", admin, "-qAtc", f"CREATE DATABASE {name}"])
                self.databases.append(name)
            urls[secret] = urllib.parse.urlunsplit(
                urllib.parse.urlsplit(admin)._replace(path="/" + name)
            )
        self.generated = Generated(self.work, self.manifests, urls)
        self.manifests.check_static(self.generated)
        self.hosts = self.work / "hosts"
        self.hosts.write_text("")
        os.chmod(self.hosts, 0o644)
        cleanup_network()
        run(["ip", "link", "add", BRIDGE, "type", "bridge"])
        run(["ip", "addr", "add", f"{NODE_IP}/{SUBNET.prefixlen}", "dev", BRIDGE])
        run(["ip", "link", "set", BRIDGE, "up"])
        pg = urllib.parse.urlsplit(admin)
        self.forwarders.append(
            Forwarder(5432, lambda: [(pg.hostname or "127.0.0.1", pg.port or 5432)])
        )
        self.proxied_ports = set()
        for svc in self.manifests.services:
            if svc["spec"].get("clusterIP") == "None" or not any(
                matches(
                    {"matchLabels": svc["spec"].get("selector") or {}},
                    Manifests.mesh_container(d) and d["spec"]["template"]["metadata"]["labels"],
                )
                for d in self.manifests.deployments
            ):
                continue
            for port in svc["spec"]["ports"]:
                self.proxied_ports.add(port["port"])
                targets = self.service_targets(svc)
                self.forwarders.append(
                    Forwarder(port["port"], targets, on_connect=self.proxied(svc))
                )
        for f in self.forwarders:
            f.start()
        self.collector = Collector()
        self.collector.start()
        self.api = Api(self.work)
        self.endpoints_changed()

    def proxied(self, svc):
        def on_connect(src_ip, target):
            src = next((p.name for p in self.pods if p.ip == src_ip), "outside")
            dst = next((p.name for p in self.pods if p.ip == target[0]), target[0])
            self.recorder.add(src, dst, target[1])

        return on_connect

    def teardown(self):
        for pod in self.pods:
            pod.kill()
        for f in self.forwarders:
            f.close()
        if self.collector:
            self.collector.stop()
        cleanup_network()
        for name in getattr(self, "databases", []):
            subprocess.run(
                [
                    "psql",
                    self.database_url,
                    "-qAtc",
                    f"DROP DATABASE IF EXISTS {name} WITH (FORCE)",
                ],
                capture_output=True,
            )
        if os.environ.get("MESH_REHEARSE_KEEP") != "1":
            shutil.rmtree(self.work, ignore_errors=True)
        else:
            log(f"kept {self.work}")

    def add_pod(self, deployment, index):
        pod = Pod(self, deployment, index)
        pod.prepare()
        with self.lock:
            self.pods.append(pod)
        pod.start()
        return pod

    def wait_ready(self, pods, timeout):
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            self.raise_pod_failure()
            if all(p.ready for p in pods):
                return
            time.sleep(0.1)
        waiting = [p for p in pods if not p.ready]
        raise Failure(
            "not ready in time: "
            + "; ".join(f"{p.where} (started: {p.started})\n    {p.log_tail()}" for p in waiting)
        )

    def raise_pod_failure(self):
        for p in self.pods:
            if p.failure:
                raise Failure(p.failure)

    def startup_budget(self, dep):
        c = Manifests.mesh_container(dep)
        p = c.get("startupProbe") or {}
        r = c.get("readinessProbe") or {}
        return (
            p.get("periodSeconds", 10) * p.get("failureThreshold", 3)
            + r.get("periodSeconds", 10) * 2
            + 5
        )

    def channel(self):
        svc = next(s for s in self.manifests.services if s["metadata"]["name"] == "aggregator")
        port = svc["spec"]["ports"][0]["port"]
        agg = next(d for d in self.manifests.deployments if d["metadata"]["name"] == "aggregator")
        # The name the aggregator's serving certificate is for, checked against its CA.
        env = self.manifests.container_env(agg, Manifests.mesh_container(agg), self.generated)
        cert_secret = next(
            (
                v["secret"]["secretName"]
                for v in agg["spec"]["template"]["spec"]["volumes"]
                if "secret" in v
                and any(
                    m["name"] == v["name"]
                    and env.get("MESH_TLS_CERT", "").startswith(m["mountPath"])
                    for m in Manifests.mesh_container(agg).get("volumeMounts", [])
                )
            ),
            None,
        )
        if cert_secret is None:
            raise Failure(f"{name_of(agg)}: MESH_TLS_CERT is in no mounted Secret")
        cert = self.manifests.certificates[cert_secret]["spec"]
        name = cert["dnsNames"][0]
        ca = self.generated.secrets[cert_secret]["ca.crt"].encode()
        creds = grpc.ssl_channel_credentials(root_certificates=ca)
        return grpc.secure_channel(
            f"{NODE_IP}:{port}", creds, options=[("grpc.ssl_target_name_override", name)]
        )

    def drive(self):
        """SignUp, GetMe, WatchProfiles through the aggregator's Service; one trace collected."""
        channel = self.channel()
        sign_up, SignUp = self.api.method(channel, "SignUp")
        get_me, GetMe = self.api.method(channel, "GetMe")
        watch, Watch = self.api.method(channel, "WatchProfiles", "unary_stream")
        trace = random.token_hex(16)
        traceparent = [("traceparent", f"00-{trace}-{random.token_hex(8)}-01")]
        email = f"rehearsal-{random.token_hex(4)}@example.com"
        reply = sign_up(
            SignUp(email=email, password="rehearsal-password", display_name="Rehearsal"),
            timeout=30,
            metadata=traceparent,
        )
        token = reply.tokens.access_token
        me = get_me(GetMe(), timeout=10, metadata=[("authorization", f"Bearer {token}")])
        if me.profile.user_id != reply.profile.user_id:
            raise Failure(
                f"GetMe answered {me.profile.user_id}, SignUp made {reply.profile.user_id}"
            )
        stream = watch(Watch(), timeout=30, metadata=[("authorization", f"Bearer {token}")])
        events = []

        def read():
            try:
                for event in stream:
                    events.append(event)
            except grpc.RpcError as err:
                if err.code() != grpc.StatusCode.CANCELLED:
                    events.append(err)

        reader = threading.Thread(target=read, daemon=True)
        reader.start()
        time.sleep(1)
        other = f"rehearsal-{random.token_hex(4)}@example.com"
        second = sign_up(
            SignUp(email=other, password="rehearsal-password", display_name="Second"), timeout=30
        )
        end = time.monotonic() + 15
        while time.monotonic() < end and not any(
            getattr(e, "profile", None) and e.profile.user_id == second.profile.user_id
            for e in events
        ):
            time.sleep(0.1)
        stream.cancel()
        if not any(
            getattr(e, "profile", None) and e.profile.user_id == second.profile.user_id
            for e in events
        ):
            raise Failure(
                "WatchProfiles through the aggregator's Service did not see a sign-up within 15 s"
            )
        log("SignUp, GetMe and WatchProfiles through the aggregator's Service: ok")
        end = time.monotonic() + 20
        want = {d["metadata"]["name"] for d in self.manifests.deployments}
        while time.monotonic() < end:
            with self.collector.lock:
                got = set(self.collector.traces.get(trace, set()))
            if got >= want:
                break
            time.sleep(0.2)
        if not got >= want:
            raise Failure(
                f"the SignUp's trace {trace} reached the collector from {sorted(got) or 'no service'}, not from all of {sorted(want)} (OTEL_EXPORTER_OTLP_ENDPOINT in ConfigMap/mesh-config)"
            )
        log(f"trace {trace} reached the collector from {', '.join(sorted(got))}")
        return channel, token

    def roll(self, channel, token):
        """A rolling update of every Deployment while a client keeps calling GetMe."""
        get_me, GetMe = self.api.method(channel, "GetMe")
        stop = threading.Event()
        outcome = {"ok": 0, "failed": []}

        def client():
            while not stop.is_set():
                try:
                    get_me(GetMe(), timeout=10, metadata=[("authorization", f"Bearer {token}")])
                    outcome["ok"] += 1
                except grpc.RpcError as err:
                    outcome["failed"].append(f"{err.code().name}: {err.details()}")
                time.sleep(0.02)

        caller = threading.Thread(target=client, daemon=True)
        caller.start()
        started = time.monotonic()
        for dep in self.manifests.deployments:
            old = [p for p in self.pods if p.deployment is dep and not p.terminating]
            for i, pod in enumerate(old):
                new = self.add_pod(dep, len(old) + i)
                self.wait_ready([new], self.startup_budget(dep))
                with self.lock:
                    pod.terminating = True
                self.endpoints_changed()
                pod.terminate()
                self.raise_pod_failure()
            log(
                f"rolled {name_of(dep)} ({len(old)} pods); GetMe so far: {outcome['ok']} ok, {len(outcome['failed'])} failed"
            )
        stop.set()
        caller.join()
        if outcome["failed"]:
            raise Failure(
                f"rolling update: {len(outcome['failed'])} of {outcome['ok'] + len(outcome['failed'])} GetMe calls failed, first: {outcome['failed'][0]}"
            )
        log(
            f"rolling update of {len(self.manifests.deployments)} Deployments in {time.monotonic() - started:.0f} s: {outcome['ok']} GetMe calls, none failed"
        )

    def check_policies(self):
        """Every recorded connection allowed; every rule of a policy of the mesh's pods used."""
        entities = {}
        for pod in self.pods:
            entities[pod.name] = ("pod", pod.labels, NAMESPACE, pod)
        stand_ins = {
            d["metadata"]["name"]: d
            for d in self.docs
            if d["kind"] in ("Deployment", "StatefulSet") and Manifests.mesh_container(d) is None
        }
        for name in ("postgres", "otel-collector"):
            if name in stand_ins:
                entities[name] = (
                    "pod",
                    stand_ins[name]["spec"]["template"]["metadata"].get("labels", {}),
                    NAMESPACE,
                    None,
                )
            else:
                entities[name] = (
                    "outside",
                    {},
                    "observability" if name == "otel-collector" else None,
                    None,
                )
        entities["outside"] = ("outside", {}, None, None)
        used = set()
        problems = []
        with self.recorder.lock:
            seen = sorted(self.recorder.seen)
        for src, dst, port in seen:
            s, d = entities.get(src, ("outside", {}, None, None)), entities.get(
                dst, ("outside", {}, None, None)
            )
            if s[0] == "pod":
                ok = self.allowed("Egress", s, d, port, used)
                if not ok:
                    problems.append(
                        f"{src} -> {dst}:{port} is denied by the egress policies of {src}"
                    )
            if d[0] == "pod":
                ok = self.allowed("Ingress", d, s, port, used)
                if not ok:
                    problems.append(
                        f"{src} -> {dst}:{port} is denied by the ingress policies of {dst}"
                    )
        run_labels = [p.labels for p in self.pods]
        for pol in self.manifests.policies:
            selector = pol["spec"].get("podSelector") or {}
            if not any(matches(selector, labels) for labels in run_labels):
                continue  # a policy for a stand-in (the collector, Jaeger, PostgreSQL)
            for direction, key, peer_key in (
                ("Ingress", "ingress", "from"),
                ("Egress", "egress", "to"),
            ):
                for r_i, rule in enumerate(pol["spec"].get(key) or []):
                    if self.is_dns(rule):
                        continue  # names resolve from /etc/hosts here, from kube-dns in a cluster
                    peers = rule.get(peer_key) or [None]
                    ports = rule.get("ports") or [None]
                    for p_i, _ in enumerate(peers):
                        for port in ports:
                            mark = (
                                pol["metadata"]["name"],
                                direction,
                                r_i,
                                p_i,
                                (port or {}).get("port"),
                            )
                            if mark not in used:
                                problems.append(
                                    f"{name_of(pol)} spec.{key}[{r_i}] {peer_key}[{p_i}] port {(port or {}).get('port', 'any')}: allows a connection no pod made"
                                )
        for line in seen:
            log(f"connection: {line[0]} -> {line[1]}:{line[2]}")
        if problems:
            raise Failure(
                "NetworkPolicies and the connections made differ:\n    " + "\n    ".join(problems)
            )
        log(
            f"{len(seen)} kinds of connection, each allowed; every rule of the mesh's NetworkPolicies used"
        )

    @staticmethod
    def is_dns(rule):
        return any(p.get("port") == 53 for p in rule.get("ports") or [])

    def allowed(self, direction, me, peer, port, used):
        key, peer_key = ("egress", "to") if direction == "Egress" else ("ingress", "from")
        policies = [
            p
            for p in self.manifests.policies
            if direction in p["spec"].get("policyTypes", ["Ingress"])
            and matches(p["spec"].get("podSelector") or {}, me[1])
        ]
        if not policies:
            return True
        ok = False
        for pol in policies:
            for r_i, rule in enumerate(pol["spec"].get(key) or []):
                for port_rule in rule.get("ports") or [None]:
                    if port_rule is not None and port_rule.get("port") not in (port, None):
                        continue
                    peers = rule.get(peer_key)
                    if not peers:
                        used.add(
                            (
                                pol["metadata"]["name"],
                                direction,
                                r_i,
                                0,
                                (port_rule or {}).get("port"),
                            )
                        )
                        ok = True
                        continue
                    for p_i, sel in enumerate(peers):
                        if self.peer_matches(sel, peer):
                            used.add(
                                (
                                    pol["metadata"]["name"],
                                    direction,
                                    r_i,
                                    p_i,
                                    (port_rule or {}).get("port"),
                                )
                            )
                            ok = True
        return ok

    @staticmethod
    def peer_matches(sel, peer):
        kind, labels, namespace, _ = peer
        if "ipBlock" in sel:
            return kind == "outside"
        if "namespaceSelector" in sel:
            ns_labels = {"kubernetes.io/metadata.name": namespace} if namespace else None
            if ns_labels is None or not matches(sel["namespaceSelector"], ns_labels):
                return False
            return (
                "podSelector" not in sel
                or (kind == "pod" and matches(sel["podSelector"], labels))
                or (kind == "outside" and not sel["podSelector"])
            )
        if "podSelector" in sel:
            return kind == "pod" and namespace == NAMESPACE and matches(sel["podSelector"], labels)
        return False

    def execute(self):
        started = time.monotonic()
        try:
            self.setup()
            for dep in self.manifests.deployments:
                for i in range(dep["spec"].get("replicas", 1)):
                    self.add_pod(dep, i)
            self.wait_ready(
                list(self.pods), max(self.startup_budget(d) for d in self.manifests.deployments)
            )
            log(
                f"{len(self.pods)} pods ready in {time.monotonic() - started:.1f} s: "
                + ", ".join(f"{p.name} {p.ip}" for p in self.pods)
            )
            channel, token = self.drive()
            if self.rollout:
                self.roll(channel, token)
            self.raise_pod_failure()
            self.check_writes()
            self.check_policies()
        finally:
            self.teardown()
        log(f"{self.overlay}: rehearsed in {time.monotonic() - started:.0f} s")

    def check_writes(self):
        for pod in self.pods:
            if not pod.ro_root:
                raise Failure(f"{pod.where} securityContext.readOnlyRootFilesystem: not set")
            root = pod.dir / "root"
            # Nothing may have been made under the root outside the mount points.
            for path in root.rglob("*"):
                rel = path.relative_to(root).as_posix()
                if rel.split("/")[0] in ("usr", "proc", "dev", "lib", "lib64", "bin", "etc"):
                    continue
                if not any(
                    rel == m.lstrip("/")
                    or rel.startswith(m.lstrip("/") + "/")
                    or m.lstrip("/").startswith(rel + "/")
                    for m in (vm["mountPath"] for vm in pod.container.get("volumeMounts", []))
                ):
                    raise Failure(f"{pod.where}: wrote {rel} outside its volume mounts")


def cleanup_network():
    subprocess.run(["ip", "link", "del", BRIDGE], capture_output=True)
    for line in subprocess.run(
        ["ip", "-br", "link"], capture_output=True, text=True
    ).stdout.splitlines():
        name = line.split()[0].split("@")[0] if line.split() else ""
        if name.startswith("mrh") and name != BRIDGE:
            subprocess.run(["ip", "link", "del", name], capture_output=True)
    for line in subprocess.run(
        ["ip", "netns", "list"], capture_output=True, text=True
    ).stdout.splitlines():
        name = line.split()[0] if line.split() else ""
        if name.startswith("mrh-"):
            subprocess.run(["ip", "netns", "del", name], capture_output=True)


def run_cases(args, database_url):
    """Each folder of rehearsal-cases is a broken copy of an overlay (a kustomization with a
    patch) and an `expect` file: the rehearsal must fail, with a message holding each line."""
    cases = sorted(p for p in (HERE / "rehearsal-cases").iterdir() if p.is_dir())
    bad = []
    for case in cases:
        expect = [
            line
            for line in (case / "expect").read_text().splitlines()
            if line.strip() and not line.startswith("#")
        ]
        started = time.monotonic()
        try:
            Rehearsal(str(case), args.mesh, database_url, rollout=False).execute()
            bad.append(f"{case.name}: the rehearsal passed a broken manifest")
            continue
        except Failure as f:
            message = str(f)
        missing = [e for e in expect if e not in message]
        if missing:
            bad.append(f"{case.name}: the failure does not say {missing}:\n    {message}")
        else:
            log(
                f"case {case.name}: failed as it must in {time.monotonic() - started:.1f} s: {message.splitlines()[0]}"
            )
    if bad:
        raise Failure("broken-manifest cases:\n  " + "\n  ".join(bad))
    log(f"all {len(cases)} broken-manifest cases fail with a message naming the object and field")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mesh", default=str(ROOT / "target/debug/mesh"))
    parser.add_argument("--no-rollout", dest="rollout", action="store_false")
    parser.add_argument("--cases", action="store_true")
    parser.add_argument("overlays", nargs="*", default=[])
    args = parser.parse_args()
    args.mesh = str(pathlib.Path(args.mesh).resolve())
    database_url = os.environ.get("MESH_TEST_DATABASE_URL")
    if not database_url:
        print("rehearse: MESH_TEST_DATABASE_URL is not set (scripts/test sets it)", file=sys.stderr)
        return 2
    if os.geteuid() != 0:
        print(
            "rehearse: needs root: network and mount namespaces, a bridge, mounts", file=sys.stderr
        )
        return 2
    try:
        for overlay in args.overlays:
            Rehearsal(overlay, args.mesh, database_url, args.rollout).execute()
        if args.cases:
            run_cases(args, database_url)
    except Failure as f:
        print(f"rehearse: FAILED: {f}", file=sys.stderr)
        return 1
    finally:
        cleanup_network()
    return 0


if __name__ == "__main__":
    sys.exit(main())
