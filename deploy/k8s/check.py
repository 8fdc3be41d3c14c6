#!/usr/bin/env python3
"""Renders every overlay of deploy/k8s with `kubectl kustomize`, validates every object against
the Kubernetes schemas (kubernetes-validate, strict) and checks the rules the mesh's manifests
promise: the restricted Pod Security Standard with a read-only root filesystem, resources on
every container, native gRPC probes on the right port and health names, a drain that fits the
termination grace period, one pinned image, default-deny NetworkPolicies with only the
aggregator open to the outside, headless Services for client-side balancing, no Secret in git,
TLS everywhere (cert-manager Certificates whose Secrets every service mounts whole, mutual TLS
into auth and users, names that match the URLs clients dial, probes on the plaintext health
port), and per overlay what it adds. Exits non-zero on any failure.

cert-manager's custom resources are not in kubernetes-validate's schemas: they are checked by
hand here (the fields the mesh relies on, and no unknown top-level spec field).

Usage: deploy/k8s/check.py [kubernetes-version]   (run by scripts/test)
"""

import pathlib
import re
import subprocess
import sys

import kubernetes_validate
import yaml

ROOT = pathlib.Path(__file__).resolve().parent
K8S_VERSION = sys.argv[1] if len(sys.argv) > 1 else "1.33.0"
SERVICES = {
    "auth": (50052, "mesh.auth.v1.AuthService"),
    "users": (50053, "mesh.users.v1.UserService"),
    "aggregator": (50051, "mesh.aggregator.v1.AggregatorService"),
}
GRACE_SECONDS = 10  # MESH_GRACE_PERIOD in the base ConfigMap
PROBE_PORT = 8081  # MESH_HEALTH_LISTEN in the base ConfigMap
CERT_MANAGER = "cert-manager.io/v1"
CERTIFICATE_FIELDS = {
    "secretName", "commonName", "dnsNames", "ipAddresses", "uris", "duration", "renewBefore",
    "privateKey", "usages", "issuerRef", "isCA", "subject", "secretTemplate",
}
ISSUER_KINDS = {"selfSigned", "ca", "acme", "vault", "venafi"}

failures = []
passed = 0


def check(condition, message):
    global passed
    if condition:
        passed += 1
    else:
        failures.append(message)


def render(overlay):
    out = subprocess.run(
        ["kubectl", "kustomize", str(ROOT / "overlays" / overlay)],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    return [doc for doc in yaml.safe_load_all(out) if doc]


def of_kind(docs, kind):
    return [d for d in docs if d["kind"] == kind]


def by_name(docs, kind, name):
    found = [d for d in of_kind(docs, kind) if d["metadata"]["name"] == name]
    return found[0] if found else None


def workloads(docs):
    return of_kind(docs, "Deployment") + of_kind(docs, "StatefulSet")


def check_common(overlay, docs):
    where = f"[{overlay}]"
    for doc in docs:
        name = f'{where} {doc["kind"]}/{doc["metadata"]["name"]}'
        if doc["apiVersion"] == CERT_MANAGER:
            check_cert_manager(name, doc)
            check(doc["metadata"].get("namespace") == "mesh", f"{name}: not in namespace mesh")
            continue
        try:
            kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
            check(True, "")
        except Exception as err:  # noqa: BLE001 - report any validation failure
            first = str(err).strip().splitlines()[0] if str(err).strip() else repr(err)
            check(False, f"{name}: invalid for Kubernetes {K8S_VERSION}: {first}")
        check(
            doc["metadata"].get("namespace", "mesh") == "mesh" or doc["kind"] == "Namespace",
            f"{name}: not in namespace mesh",
        )

    namespace = by_name(docs, "Namespace", "mesh")
    check(namespace is not None, f"{where} no Namespace mesh")
    if namespace:
        labels = namespace["metadata"].get("labels", {})
        check(
            labels.get("pod-security.kubernetes.io/enforce") == "restricted",
            f"{where} namespace does not enforce the restricted Pod Security Standard",
        )
    check(not of_kind(docs, "Secret"), f"{where} a Secret is rendered from git")

    for work in workloads(docs):
        name = f'{where} {work["kind"]}/{work["metadata"]["name"]}'
        pod = work["spec"]["template"]["spec"]
        psc = pod.get("securityContext", {})
        check(psc.get("runAsNonRoot") is True, f"{name}: pod not runAsNonRoot")
        check(
            isinstance(psc.get("runAsUser"), int) and psc["runAsUser"] > 0,
            f"{name}: no numeric non-root runAsUser",
        )
        check(
            psc.get("seccompProfile", {}).get("type") == "RuntimeDefault",
            f"{name}: seccomp is not RuntimeDefault",
        )
        check(pod.get("automountServiceAccountToken") is False, f"{name}: mounts an API token")
        for container in pod.get("initContainers", []) + pod["containers"]:
            cname = f'{name} container {container["name"]}'
            sc = container.get("securityContext", {})
            check(sc.get("allowPrivilegeEscalation") is False, f"{cname}: privilege escalation")
            check(sc.get("readOnlyRootFilesystem") is True, f"{cname}: writable root filesystem")
            check("ALL" in sc.get("capabilities", {}).get("drop", []), f"{cname}: capabilities kept")
            check(sc.get("privileged") is not True, f"{cname}: privileged")
            resources = container.get("resources", {})
            for kind in ("requests", "limits"):
                for res in ("cpu", "memory"):
                    check(res in resources.get(kind, {}), f"{cname}: no {res} {kind}")
            image = container["image"]
            last = image.rsplit("/", 1)[-1]
            check(
                ("@sha256:" in image) or (":" in last and not last.endswith(":latest")),
                f"{cname}: image {image} is not pinned to a tag or digest",
            )

    images = set()
    for service, (port, full_name) in SERVICES.items():
        deployment = by_name(docs, "Deployment", service)
        check(deployment is not None, f"{where} no Deployment {service}")
        if not deployment:
            continue
        name = f"{where} Deployment/{service}"
        pod = deployment["spec"]["template"]["spec"]
        container = pod["containers"][0]
        images.add(container["image"])
        check(container.get("args", [None])[0] == service, f"{name}: does not run `mesh {service}`")
        ports = [p["containerPort"] for p in container.get("ports", [])]
        check(port in ports, f"{name}: does not expose {port}")
        expected = {
            "livenessProbe": "liveness",
            "readinessProbe": "readiness",
            "startupProbe": "liveness",
        }
        check(PROBE_PORT in ports, f"{name}: does not expose the probe port {PROBE_PORT}")
        for probe, health_name in expected.items():
            grpc = container.get(probe, {}).get("grpc")
            check(grpc is not None, f"{name}: {probe} is not a native grpc probe")
            if grpc:
                # The kubelet's gRPC probe speaks no TLS: the plaintext health-only port.
                check(grpc.get("port") == PROBE_PORT, f"{name}: {probe} on port {grpc.get('port')}")
                check(
                    grpc.get("service") == health_name,
                    f"{name}: {probe} asks for {grpc.get('service')!r}, not {health_name!r}",
                )
        pre_stop = container.get("lifecycle", {}).get("preStop", {}).get("sleep", {})
        pause = pre_stop.get("seconds", 0)
        # Clients resolve the headless names every 5 s (RESOLVE_INTERVAL in mesh_runtime's
        # client) and the cluster DNS answers with a 5 s TTL: the pause must outlast both, or a
        # client can still hold only the stopping pod (deploy/k8s/rehearse.py shows it).
        check(pause >= 10, f"{name}: preStop pause {pause} s is shorter than re-resolving (10 s)")
        grace = pod.get("terminationGracePeriodSeconds", 30)
        check(
            grace > pause + GRACE_SECONDS,
            f"{name}: terminationGracePeriodSeconds {grace} does not cover the pause and drain",
        )
        env = {e["name"]: e for e in container.get("env", [])}
        check(env.get("OTEL_SERVICE_NAME", {}).get("value") == service, f"{name}: service name")
        for e in container.get("env", []):
            if any(word in e["name"] for word in ("SECRET", "DATABASE_URL", "CLIENTS")):
                check("valueFrom" in e, f"{name}: {e['name']} is a literal, not from a Secret")
    check(len(images) == 1, f"{where} the services run different images: {images}")

    for service in ("auth", "users"):
        headless = by_name(docs, "Service", f"{service}-headless")
        check(
            headless is not None and headless["spec"].get("clusterIP") == "None",
            f"{where} no headless Service for {service}",
        )
    configs = [c for c in of_kind(docs, "ConfigMap") if c["metadata"]["name"].startswith("mesh-config")]
    check(len(configs) == 1, f"{where} expected one mesh-config ConfigMap")
    if configs:
        data = configs[0]["data"]
        check(data.get("MESH_AUTH_URL", "").startswith("https://auth-headless:"), f"{where} auth URL")
        check(data.get("MESH_USERS_URL", "").startswith("https://users-headless:"), f"{where} users URL")
        check(data.get("MESH_HEALTH_LISTEN") == f"0.0.0.0:{PROBE_PORT}", f"{where} probe port")
        check(data.get("MESH_GRACE_PERIOD") == f"{GRACE_SECONDS}s", f"{where} grace period")
        check("OTEL_EXPORTER_OTLP_ENDPOINT" in data, f"{where} no OTLP endpoint")
        # The SDK's default transport is OTLP/HTTP (port 4318): a gRPC port needs it said.
        endpoint = data.get("OTEL_EXPORTER_OTLP_ENDPOINT", "")
        protocol = data.get("OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf")
        if endpoint.rstrip("/").endswith(":4317"):
            check(protocol == "grpc", f"{where} OTLP endpoint {endpoint} is gRPC's port but the protocol is {protocol}")
        elif endpoint.rstrip("/").endswith(":4318"):
            check(protocol == "http/protobuf", f"{where} OTLP endpoint {endpoint} is HTTP's port but the protocol is {protocol}")

    check_tls(where, docs)
    check_labels(where, docs)


RECOMMENDED_LABELS = ("name", "instance", "version", "component", "part-of", "managed-by")


def check_labels(where, docs):
    """The recommended app.kubernetes.io labels on every object and pod template."""
    for doc in docs:
        name = f'{where} {doc["kind"]}/{doc["metadata"]["name"]}'
        places = [("metadata.labels", doc["metadata"].get("labels") or {})]
        if doc["kind"] in ("Deployment", "StatefulSet"):
            places.append(("spec.template.metadata.labels", doc["spec"]["template"]["metadata"].get("labels") or {}))
        for field, labels in places:
            missing = [k for k in RECOMMENDED_LABELS if f"app.kubernetes.io/{k}" not in labels]
            check(not missing, f"{name} {field}: no app.kubernetes.io/{', '.join(missing)}")

    policies = of_kind(docs, "NetworkPolicy")
    deny = [
        p for p in policies
        if p["spec"].get("podSelector") == {}
        and set(p["spec"].get("policyTypes", [])) == {"Ingress", "Egress"}
        and not p["spec"].get("ingress") and not p["spec"].get("egress")
    ]
    check(len(deny) == 1, f"{where} no default-deny NetworkPolicy")
    open_to_all = []
    for policy in policies:
        selector = policy["spec"].get("podSelector", {}).get("matchLabels", {})
        for rule in policy["spec"].get("ingress", []):
            if not rule.get("from"):
                open_to_all.append(selector.get("app.kubernetes.io/name"))
                # Open to everyone on the facade's TLS port only (not the probe port).
                ports = [p.get("port") for p in rule.get("ports", [])]
                check(ports == [SERVICES["aggregator"][0]], f"{where} open to everyone on ports {ports}")
    check(open_to_all == ["aggregator"], f"{where} open to everyone: {open_to_all}")

    def ingress_from(service):
        policy = by_name(docs, "NetworkPolicy", service)
        sources = set()
        for rule in (policy or {}).get("spec", {}).get("ingress", []):
            for peer in rule.get("from", []):
                sources.add(peer.get("podSelector", {}).get("matchLabels", {}).get("app.kubernetes.io/name"))
        return sources

    check(ingress_from("auth") == {"users", "aggregator"}, f"{where} auth ingress: {ingress_from('auth')}")
    check(ingress_from("users") == {"aggregator"}, f"{where} users ingress: {ingress_from('users')}")


def check_cert_manager(name, doc):
    spec = doc.get("spec", {})
    if doc["kind"] == "Certificate":
        unknown = set(spec) - CERTIFICATE_FIELDS
        check(not unknown, f"{name}: unknown fields {sorted(unknown)}")
        for field in ("secretName", "issuerRef"):
            check(field in spec, f"{name}: no {field}")
        check(spec.get("issuerRef", {}).get("kind") in ("Issuer", "ClusterIssuer"), f"{name}: issuer kind")
        # Leaf keys change at each renewal; the CA's does not (a new CA key would leave the
        # certificates it issued before untrusted by the services that renewed first).
        policy = "Never" if spec.get("isCA") else "Always"
        check(spec.get("privateKey", {}).get("rotationPolicy") == policy, f"{name}: rotationPolicy is not {policy}")
        check(spec.get("isCA") or spec.get("dnsNames"), f"{name}: no dnsNames")
        if "commonName" in spec and not spec.get("isCA"):
            # ACME issuers refuse a commonName that is not also a DNS name.
            check(spec["commonName"] in spec.get("dnsNames", []), f"{name}: commonName not in dnsNames")
    elif doc["kind"] in ("Issuer", "ClusterIssuer"):
        kinds = set(spec) & ISSUER_KINDS
        check(len(kinds) == 1 and not set(spec) - ISSUER_KINDS, f"{name}: issuer spec {sorted(spec)}")
    else:
        check(False, f"{name}: unexpected cert-manager kind")


def check_tls(where, docs):
    """Every mesh server serves TLS from a cert-manager Secret it mounts whole (so renewals
    reach it); auth and users require client certificates from the mesh's CA; users and the
    aggregator present theirs; the names clients dial are in the servers' certificates."""
    certificates = {c["spec"]["secretName"]: c for c in of_kind(docs, "Certificate")}
    issuers = {i["metadata"]["name"] for i in of_kind(docs, "Issuer")}
    for cert in certificates.values():
        ref = cert["spec"]["issuerRef"]
        if ref.get("kind", "Issuer") == "Issuer":
            check(ref["name"] in issuers, f'{where} Certificate/{cert["metadata"]["name"]}: no Issuer {ref["name"]}')

    def mounted_secret(pod, container, path):
        """The Certificate whose Secret is mounted at the folder of `path`."""
        folder = path.rsplit("/", 1)[0]
        for mount in container.get("volumeMounts", []):
            if mount["mountPath"] == folder:
                check("subPath" not in mount, f"{where} {container['name']}: {folder} by subPath: renewals never reach it")
                volume = next((v for v in pod.get("volumes", []) if v["name"] == mount["name"]), {})
                return certificates.get(volume.get("secret", {}).get("secretName"))
        return None

    for service in SERVICES:
        deployment = by_name(docs, "Deployment", service)
        if not deployment:
            continue
        name = f"{where} Deployment/{service}"
        pod = deployment["spec"]["template"]["spec"]
        container = pod["containers"][0]
        env = {e["name"]: e.get("value", "") for e in container.get("env", [])}
        for var, file in (
            ("MESH_TLS_CERT", "tls.crt"), ("MESH_TLS_KEY", "tls.key"), ("MESH_TLS_CLIENT_CA", "ca.crt"),
            ("MESH_TLS_CA", "ca.crt"), ("MESH_TLS_CLIENT_CERT", "tls.crt"), ("MESH_TLS_CLIENT_KEY", "tls.key"),
        ):
            if var in env:
                check(env[var].endswith("/" + file), f"{name}: {var} is not a {file}")
        for var in ("MESH_TLS_CLIENT_CA", "MESH_TLS_CA", "MESH_TLS_CLIENT_CERT"):
            if var in env:
                # The mesh's own trust: from a Secret its CA issued, never the public facade's.
                origin = mounted_secret(pod, container, env[var])
                check(
                    origin is not None and origin["spec"]["issuerRef"]["name"] == "mesh-ca",
                    f"{name}: {var} is not from a certificate of the mesh CA",
                )
        served = mounted_secret(pod, container, env.get("MESH_TLS_CERT", "/none/x"))
        check(served is not None, f"{name}: MESH_TLS_CERT is not in a mounted cert-manager Secret")
        check(
            mounted_secret(pod, container, env.get("MESH_TLS_KEY", "/none/x")) is served,
            f"{name}: MESH_TLS_KEY is not beside its certificate",
        )
        if served:
            check("server auth" in served["spec"].get("usages", ["server auth"]), f"{name}: not a server certificate")
        mutual = service in ("auth", "users")
        check(("MESH_TLS_CLIENT_CA" in env) == mutual, f"{name}: mutual TLS {'missing' if mutual else 'on the public facade'}")
        if mutual:
            check(mounted_secret(pod, container, env.get("MESH_TLS_CLIENT_CA", "/none/x")) is not None, f"{name}: client CA not mounted")
            dialled = f"{service}-headless"
            check(served and dialled in served["spec"].get("dnsNames", []), f"{name}: certificate lacks {dialled}")
        if service in ("users", "aggregator"):
            identity = mounted_secret(pod, container, env.get("MESH_TLS_CLIENT_CERT", "/none/x"))
            check(identity is not None, f"{name}: no client certificate for mutual TLS")
            check(identity and "client auth" in identity["spec"].get("usages", []), f"{name}: its identity is not a client certificate")
            check(mounted_secret(pod, container, env.get("MESH_TLS_CA", "/none/x")) is not None, f"{name}: MESH_TLS_CA not mounted")
        for svc_name in (service, f"{service}-headless"):
            svc = by_name(docs, "Service", svc_name)
            if svc:
                check(
                    [p["port"] for p in svc["spec"]["ports"]] == [SERVICES[service][0]],
                    f"{where} Service/{svc_name}: carries more than its TLS port",
                )


def check_dev(docs):
    postgres = by_name(docs, "StatefulSet", "postgres")
    check(postgres is not None and postgres["spec"].get("volumeClaimTemplates"), "[dev] PostgreSQL with a PVC")
    check(by_name(docs, "Deployment", "otel-collector") is not None, "[dev] no OpenTelemetry Collector")
    jaeger = by_name(docs, "Deployment", "jaeger")
    check(jaeger is not None, "[dev] no Jaeger")
    if jaeger:
        image = jaeger["spec"]["template"]["spec"]["containers"][0]["image"]
        check(image.startswith("jaegertracing/jaeger:2."), f"[dev] Jaeger is {image}, not the v2 image jaegertracing/jaeger:2.x")
    prometheus = by_name(docs, "Deployment", "prometheus")
    check(prometheus is not None, "[dev] no Prometheus for the metrics")
    if prometheus:
        args = prometheus["spec"]["template"]["spec"]["containers"][0].get("args", [])
        check("--web.enable-otlp-receiver" in args, "[dev] Prometheus does not accept OTLP (--web.enable-otlp-receiver)")
    collector = by_name(docs, "ConfigMap", "otel-collector")
    if collector:
        config = yaml.safe_load(collector["data"]["config.yaml"])
        pipelines = config["service"]["pipelines"]
        check("otlp/jaeger" in pipelines.get("traces", {}).get("exporters", []), "[dev] the collector's traces do not go to Jaeger")
        check("otlphttp/prometheus" in pipelines.get("metrics", {}).get("exporters", []), "[dev] the collector's metrics do not go to Prometheus")
        check("logs" in pipelines, "[dev] the collector takes no logs (the services send them)")
    for service in SERVICES:
        deployment = by_name(docs, "Deployment", service)
        check(deployment and deployment["spec"]["replicas"] == 1, f"[dev] {service} is not one replica")


def check_prod(docs):
    hpa = by_name(docs, "HorizontalPodAutoscaler", "aggregator")
    check(hpa is not None and hpa["spec"]["minReplicas"] >= 2, "[prod] no HPA for the aggregator")
    aggregator = by_name(docs, "Service", "aggregator")
    check(aggregator and aggregator["spec"].get("type") == "LoadBalancer", "[prod] aggregator not exposed")
    for service in SERVICES:
        deployment = by_name(docs, "Deployment", service)
        check(deployment and deployment["spec"]["replicas"] >= 2, f"[prod] {service}: one replica")
        pod = deployment["spec"]["template"]["spec"] if deployment else {}
        check(pod.get("topologySpreadConstraints"), f"[prod] {service}: no topology spread")
        check(by_name(docs, "PodDisruptionBudget", service) is not None, f"[prod] {service}: no PDB")
    check(by_name(docs, "StatefulSet", "postgres") is None, "[prod] runs its own PostgreSQL")
    for work in workloads(docs):
        for container in work["spec"]["template"]["spec"]["containers"]:
            check(
                re.search(r"@sha256:[0-9a-f]{64}$", container["image"]) is not None,
                f'[prod] {work["kind"]}/{work["metadata"]["name"]} container {container["name"]}: image {container["image"]} is not by digest',
            )
    public = by_name(docs, "Certificate", "aggregator-public-tls")
    check(
        public is not None and public["spec"]["issuerRef"].get("kind") == "ClusterIssuer",
        "[prod] the facade's certificate is not from a public issuer",
    )


def check_dockerignore():
    """The image's build context: sources only, no build outputs or fuzz artefacts."""
    path = ROOT.parent.parent / ".dockerignore"
    lines = {line.strip() for line in path.read_text().splitlines() if line.strip() and not line.startswith("#")}
    for entry in ("target/", "fuzz/target/", "fuzz/corpus/", "fuzz/artifacts/", "fuzz/coverage/",
                  ".git/", "node_modules/", "tools/.venv/", ".mesh/"):
        check(entry in lines, f".dockerignore: does not keep {entry} out of the image's build context")


def main():
    check_dockerignore()
    for overlay, extra in (("dev", check_dev), ("prod", check_prod)):
        docs = render(overlay)
        check_common(overlay, docs)
        extra(docs)
    for failure in failures:
        print(f"FAIL {failure}")
    print(f"deploy checks: {passed} passed, {len(failures)} failed (Kubernetes {K8S_VERSION})")
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
