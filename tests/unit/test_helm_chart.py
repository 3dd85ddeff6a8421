"""The Helm chart (deploy/helm/uc-msc-trial): it lints, renders with its default values and with a
second set (ci/staging-values.yaml), every rendered object is valid against Kubernetes' own JSON
schemas, and the properties production relies on hold.

helm is built from its Go module by deploy/tools.py into .tools/bin the first time (a few minutes;
cached after that). Where it cannot be built the tests fail, saying why: they are never skipped.

Each property is a function returning the problems it finds, so that
test_each_check_catches_what_it_is_for can show every one of them failing on a manifest spoiled
on purpose.
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import re
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml
from kubernetes_validate import utils as kubernetes_schemas

from deploy import tools
from shared import settings as settings_module
from shared.protocol import load_protocol
from shared.settings import DEV_JWT_SECRET, DEV_RANDOMIZATION_SECRET, SERVICES

# The first run builds helm (minutes, on two cores): more than the suite's 300 s per test.
pytestmark = pytest.mark.timeout(1800)

CHART = tools.CHART
STAGING_VALUES = CHART / "ci" / "staging-values.yaml"
# The folder the services load by default; the chart's files/protocol/v1 is a link to it.
PROTOCOL_SOURCE = tools.REPO / "shared" / "protocol" / "v1"
RELEASE, NAMESPACE = "trial", "trial"
ALL = ("gateway", *SERVICES)
# The oldest Kubernetes the chart claims (Chart.yaml kubeVersion) and the newest the schemas know.
KUBE_VERSIONS = ("1.27.0", kubernetes_schemas.latest_version())
# Environment variables that carry a secret, and the only place each may come from.
SECRET_ENV = {"TRIAL_JWT_SECRET", "TRIAL_RANDOMIZATION_SECRET", "TRIAL_DATABASE_URL",
              "TRIAL_KAFKA_SASL_USERNAME", "TRIAL_KAFKA_SASL_PASSWORD"}
SECRETISH = re.compile(r"SECRET|PASSWORD|PASSWD|TOKEN|CREDENTIAL|DATABASE_URL|SASL_USERNAME")
# Credentials in a URL (user:password@host), the development secrets, compose's trial:trial.
LITERAL_SECRETS = [re.compile(r"[a-z][a-z0-9+.-]*://[^/\s:@'\"]+:[^/\s@'\"]+@", re.IGNORECASE),
                   re.compile(re.escape(DEV_JWT_SECRET)), re.compile(re.escape(DEV_RANDOMIZATION_SECRET)),
                   re.compile(r"trial:trial"), re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----")]

Docs = list[dict[str, Any]]


@pytest.fixture(scope="module")
def helm(pytestconfig: pytest.Config) -> Path:
    # Uncaptured, so a first build shows what it is doing while it takes its minutes.
    capture = pytestconfig.pluginmanager.getplugin("capturemanager")
    try:
        with capture.global_and_fixture_disabled() if capture else contextlib.nullcontext():
            return tools.ensure_helm()
    except tools.ToolError as exc:
        why = str(exc)
    pytest.fail(f"helm {tools.HELM_VERSION} is needed to check the chart and could not be built "
                f"into {tools.TOOLS_BIN}: {why}\n(run `python deploy/tools.py helm` to see the "
                "build; it needs Go and the Go module proxy)", pytrace=False)


def run_helm(helm: Path, *args: str) -> str:
    done = subprocess.run([str(helm), *args], capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, f"helm {' '.join(args)} failed:\n{done.stdout}{done.stderr}"
    return done.stdout


def render(helm: Path, *values: Path) -> tuple[str, Docs]:
    args = ["template", RELEASE, str(CHART), "--namespace", NAMESPACE,
            "--kube-version", KUBE_VERSIONS[-1]]
    for file in values:
        args += ["--values", str(file)]
    text = run_helm(helm, *args)
    return text, [doc for doc in yaml.safe_load_all(text) if doc]


@pytest.fixture(scope="module")
def renders(helm: Path) -> dict[str, tuple[str, Docs, dict[str, Any]]]:
    """name -> (rendered text, its objects, the values it was rendered with)."""
    defaults = yaml.safe_load((CHART / "values.yaml").read_text())
    staging = yaml.safe_load(STAGING_VALUES.read_text())
    return {"default": (*render(helm), defaults),
            "staging": (*render(helm, STAGING_VALUES), _merged(defaults, staging))}


def _merged(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for key, value in over.items():
        out[key] = (_merged(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict)
                    else value)
    return out


@pytest.fixture(params=["default", "staging"])
def rendered(request: pytest.FixtureRequest,
             renders: dict[str, tuple[str, Docs, dict[str, Any]]]) -> tuple[str, Docs, dict[str, Any]]:
    return renders[request.param]


# --- reading the objects -------------------------------------------------------------------------

def of_kind(docs: Docs, kind: str) -> dict[str, dict[str, Any]]:
    return {d["metadata"]["name"]: d for d in docs if d["kind"] == kind}


def name(component: str) -> str:
    return f"{RELEASE}-uc-msc-trial-{component}"


def pod_specs(docs: Docs) -> Iterator[tuple[str, dict[str, Any]]]:
    for doc in docs:
        if doc["kind"] in ("Deployment", "Job", "StatefulSet", "DaemonSet"):
            yield f"{doc['kind']} {doc['metadata']['name']}", doc["spec"]["template"]["spec"]


def containers(spec: dict[str, Any]) -> list[dict[str, Any]]:
    return [*spec.get("initContainers", []), *spec["containers"]]


def env_of(container: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {e["name"]: e for e in container.get("env", [])}


def selects(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    """Whether a label selector (matchLabels, matchExpressions) selects these labels."""
    if any(labels.get(k) != v for k, v in selector.get("matchLabels", {}).items()):
        return False
    for expr in selector.get("matchExpressions", []):
        key, op, values = expr["key"], expr["operator"], expr.get("values", [])
        ok = {"In": labels.get(key) in values, "NotIn": labels.get(key) not in values,
              "Exists": key in labels, "DoesNotExist": key not in labels}[op]
        if not ok:
            return False
    return True


def pod_labels(docs: Docs, component: str) -> dict[str, str]:
    labels: dict[str, str] = of_kind(docs, "Deployment")[name(component)]["spec"]["template"][
        "metadata"]["labels"]
    return labels


# --- the checks: each returns what is wrong ------------------------------------------------------

def deployment_problems(docs: Docs, values: dict[str, Any]) -> list[str]:
    """A Deployment and a Service per service, running that service, with both probes, requests and
    limits, and a non-root, read-only, capability-less container."""
    problems: list[str] = []
    deployments, services = of_kind(docs, "Deployment"), of_kind(docs, "Service")
    if set(deployments) != {name(s) for s in ALL}:
        problems.append(f"Deployments are {sorted(deployments)}, not one per service")
    if set(services) != {name(s) for s in ALL}:
        problems.append(f"Services are {sorted(services)}, not one per service")
    for component in ALL:
        deployment = deployments.get(name(component))
        if deployment is None:
            continue
        where = f"Deployment {name(component)}"
        spec = deployment["spec"]["template"]["spec"]
        want = values["services"].get(component, {}).get("replicas", values["replicas"])
        if deployment["spec"].get("replicas") != want:
            problems.append(f"{where}: replicas {deployment['spec'].get('replicas')}, values say {want}")
        if not selects(deployment["spec"]["selector"], deployment["spec"]["template"]["metadata"]["labels"]):
            problems.append(f"{where}: its selector does not select its own pods")
        service = services.get(name(component))
        if service and not selects({"matchLabels": service["spec"]["selector"]},
                                   deployment["spec"]["template"]["metadata"]["labels"]):
            problems.append(f"Service {name(component)} does not select {where}'s pods")
        pod_security = spec.get("securityContext", {})
        for container in containers(spec):
            at = f"{where} container {container['name']}"
            if f"services.{component}.app:app" not in container.get("command", []):
                problems.append(f"{at}: does not run services.{component}.app:app")
            ports = {p.get("name"): p["containerPort"] for p in container.get("ports", [])}
            for probe, path in (("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")):
                get = container.get(probe, {}).get("httpGet", {})
                if get.get("path") != path or get.get("port") not in (*ports, *ports.values()):
                    problems.append(f"{at}: no {probe} on GET {path} of a port it listens on")
            resources = container.get("resources", {})
            for part in ("requests", "limits"):
                for resource in ("cpu", "memory"):
                    if not resources.get(part, {}).get(resource):
                        problems.append(f"{at}: no {part}.{resource}")
            problems += _security_problems(at, pod_security, container.get("securityContext", {}))
            env = env_of(container)
            if env.get("TRIAL_SERVICE_NAME", {}).get("value") != component:
                problems.append(f"{at}: TRIAL_SERVICE_NAME is not {component}")
            if env.get("TRIAL_ENV", {}).get("value") != values["environment"]:
                problems.append(f"{at}: TRIAL_ENV is not {values['environment']!r}")
    return problems


def _security_problems(at: str, pod: dict[str, Any], container: dict[str, Any]) -> list[str]:
    def setting(key: str) -> Any:
        return container.get(key, pod.get(key))

    problems = []
    if setting("runAsNonRoot") is not True:
        problems.append(f"{at}: runAsNonRoot is not true")
    if setting("runAsUser") in (0, None):
        problems.append(f"{at}: runAsUser is root or unset")
    if container.get("readOnlyRootFilesystem") is not True:
        problems.append(f"{at}: the root filesystem is writable")
    if container.get("allowPrivilegeEscalation") is not False or container.get("privileged"):
        problems.append(f"{at}: may escalate privileges")
    if "ALL" not in container.get("capabilities", {}).get("drop", []) or \
            container.get("capabilities", {}).get("add"):
        problems.append(f"{at}: does not drop all capabilities")
    return problems


def secret_problems(text: str, docs: Docs, values: dict[str, Any]) -> list[str]:
    """Secrets only as secretKeyRef to the existing Secret; none in the output itself; the
    randomization secret in the randomization service alone."""
    problems = [f"the chart renders a Secret ({d['metadata']['name']}): it must use an existing one"
                for d in docs if d["kind"] == "Secret"]
    secret_name = values["secrets"]["existingSecret"] or name("secrets")
    sasl_secret = values["kafka"]["sasl"]["existingSecret"] or secret_name
    for where, spec in pod_specs(docs):
        for container in containers(spec):
            at = f"{where} container {container['name']}"
            if container.get("envFrom"):
                problems.append(f"{at}: envFrom (only named secretKeyRefs are allowed)")
            for var, entry in env_of(container).items():
                ref = entry.get("valueFrom", {}).get("secretKeyRef")
                if (var in SECRET_ENV or SECRETISH.search(var)) and (ref is None or "value" in entry):
                    problems.append(f"{at}: {var} is not read from a Secret")
                if ref is not None:
                    want = sasl_secret if var.startswith("TRIAL_KAFKA_SASL_") else secret_name
                    if ref.get("name") != want or not ref.get("key"):
                        problems.append(f"{at}: {var} refers to {ref}, not to a key of Secret {want}")
            if "TRIAL_RANDOMIZATION_SECRET" in env_of(container) and \
                    where != f"Deployment {name('randomization')}":
                problems.append(f"{at}: holds the randomization secret")
    for pattern in LITERAL_SECRETS:
        for hit in pattern.finditer(text):
            problems.append(f"a literal secret in the rendered output: {hit.group(0)!r}")
    return problems


def pdb_problems(docs: Docs) -> list[str]:
    """A PodDisruptionBudget per service, selecting exactly that service's pods."""
    problems = []
    pdbs = list(of_kind(docs, "PodDisruptionBudget").values())
    for component in ALL:
        if name(component) not in of_kind(docs, "Deployment"):
            continue
        mine = pod_labels(docs, component)
        covering = [p for p in pdbs if selects(p["spec"]["selector"], mine)]
        if len(covering) != 1:
            problems.append(f"{component}: {len(covering)} PodDisruptionBudgets select its pods, not 1")
            continue
        others = [c for c in ALL if c != component and name(c) in of_kind(docs, "Deployment")
                  and selects(covering[0]["spec"]["selector"], pod_labels(docs, c))]
        if others:
            problems.append(f"{component}'s PodDisruptionBudget also selects {others}")
        spec = covering[0]["spec"]
        if "maxUnavailable" not in spec and "minAvailable" not in spec:
            problems.append(f"{component}'s PodDisruptionBudget sets neither bound")
    return problems


def _ports_of(rule: dict[str, Any]) -> set[Any]:
    return {p.get("port") for p in rule.get("ports", [])}


def network_problems(docs: Docs, values: dict[str, Any]) -> list[str]:
    """Ingress to each non-gateway service only from the gateway's pods; the gateway reachable;
    the services able to reach DNS, PostgreSQL and Kafka."""
    problems = []
    policies = list(of_kind(docs, "NetworkPolicy").values())
    gateway = pod_labels(docs, "gateway")
    for component in ALL:
        labels = pod_labels(docs, component)
        mine = [p for p in policies if selects(p["spec"]["podSelector"], labels)]
        ingress_policies = [p for p in mine if "Ingress" in p["spec"].get("policyTypes", ["Ingress"])]
        if not ingress_policies:
            problems.append(f"{component}: no NetworkPolicy restricts ingress to its pods")
            continue
        rules = [r for p in ingress_policies for r in p["spec"].get("ingress", [])]
        if component == "gateway":
            if not rules:
                problems.append("gateway: its NetworkPolicy lets nothing in")
            continue
        if not rules:
            problems.append(f"{component}: its NetworkPolicy lets nothing in, not even the gateway")
        for rule in rules:
            peers = rule.get("from")
            if not peers:
                problems.append(f"{component}: an ingress rule without `from` admits everyone")
                continue
            for peer in peers:
                if set(peer) != {"podSelector"} or not selects(peer["podSelector"], gateway):
                    problems.append(f"{component}: admits {peer}, not only the gateway's pods")
                elif any(selects(peer["podSelector"], pod_labels(docs, other))
                         for other in ALL if other != "gateway"):
                    problems.append(f"{component}: its peer {peer} also selects non-gateway pods")
        egress = [r for p in mine if "Egress" in p["spec"].get("policyTypes", [])
                  for r in p["spec"].get("egress", [])]
        reachable = set().union(*(_ports_of(r) for r in egress)) if egress else set()
        np = values["networkPolicy"]
        for what, ports in (("DNS", np["dns"]["ports"]), ("PostgreSQL", np["postgres"]["ports"]),
                            ("Kafka", np["kafka"]["ports"])):
            if egress and not set(ports) <= reachable:
                problems.append(f"{component}: egress to {what} ({ports}) is not allowed")
    return problems


def migration_problems(docs: Docs, values: dict[str, Any]) -> list[str]:
    """A Job per service database, run by Helm before install and upgrade, as the owning role."""
    problems = []
    jobs = of_kind(docs, "Job")
    suffix = values["secrets"]["migrationDatabaseUrlKeySuffix"]
    runtime_suffix = values["secrets"]["databaseUrlKeySuffix"]
    if suffix == runtime_suffix:
        problems.append("the migrations use the services' runtime database role")
    for component in SERVICES:
        job = jobs.get(name(f"migrate-{component}"))
        if job is None:
            problems.append(f"no migration Job for {component}'s database")
            continue
        annotations = job["metadata"].get("annotations", {})
        hooks = {h.strip() for h in annotations.get("helm.sh/hook", "").split(",")}
        if not {"pre-install", "pre-upgrade"} <= hooks:
            problems.append(f"migration Job {component}: hooks {sorted(hooks)}, not pre-install and "
                            "pre-upgrade")
        spec = job["spec"]["template"]["spec"]
        if spec.get("restartPolicy") not in ("Never", "OnFailure"):
            problems.append(f"migration Job {component}: restartPolicy {spec.get('restartPolicy')}")
        (container,) = spec["containers"]
        if container.get("command", [])[:2] != ["trial", "migrate"]:
            problems.append(f"migration Job {component}: does not run `trial migrate`")
        ref = env_of(container).get("TRIAL_DATABASE_URL", {}).get("valueFrom", {}).get("secretKeyRef", {})
        if ref.get("key") != f"{component}{suffix}":
            problems.append(f"migration Job {component}: database URL from {ref}, not the owner's "
                            f"{component}{suffix}")
        role = env_of(container).get("TRIAL_DATABASE_SERVICE_ROLE", {}).get("value")
        if role != values["migrations"]["serviceRole"]:
            problems.append(f"migration Job {component}: grants the service role {role!r}, not "
                            f"{values['migrations']['serviceRole']!r} (least privilege, D44)")
        problems += _security_problems(f"migration Job {component}", spec.get("securityContext", {}),
                                       container.get("securityContext", {}))
        if not container.get("resources", {}).get("limits"):
            problems.append(f"migration Job {component}: no resource limits")
    return problems


def protocol_problems(docs: Docs) -> list[str]:
    """The protocol folder as a ConfigMap, mounted in every service where TRIAL_PROTOCOL_DIR says."""
    problems = []
    configmaps = of_kind(docs, "ConfigMap")
    for component in SERVICES:
        deployment = of_kind(docs, "Deployment").get(name(component))
        if deployment is None:
            continue
        spec = deployment["spec"]["template"]["spec"]
        volumes = {v["name"]: v for v in spec.get("volumes", [])}
        (container,) = spec["containers"]
        directory = env_of(container).get("TRIAL_PROTOCOL_DIR", {}).get("value")
        mounts = [m for m in container.get("volumeMounts", []) if m["mountPath"] == directory]
        if directory is None or not mounts:
            problems.append(f"{component}: TRIAL_PROTOCOL_DIR={directory} is not a mounted volume")
            continue
        source = volumes.get(mounts[0]["name"], {}).get("configMap", {}).get("name")
        if source not in configmaps:
            problems.append(f"{component}: {directory} is not mounted from a ConfigMap of the chart")
            continue
        expected = {p.name: json.loads(p.read_text()) for p in PROTOCOL_SOURCE.glob("*.json")}
        data = {k: json.loads(v) for k, v in configmaps[source].get("data", {}).items()}
        differ = sorted(k for k in expected.keys() | data.keys() if expected.get(k) != data.get(k))
        if differ:
            problems.append(f"{component}: ConfigMap {source} is not shared/protocol/v1 "
                            f"(differs in {differ})")
    return problems


def kafka_problems(docs: Docs, values: dict[str, Any]) -> list[str]:
    problems = []
    for component in SERVICES:
        deployment = of_kind(docs, "Deployment").get(name(component))
        if deployment is None:
            continue
        env = env_of(deployment["spec"]["template"]["spec"]["containers"][0])
        for var, want in (("TRIAL_KAFKA_REPLICATION_FACTOR", str(values["kafka"]["replicationFactor"])),
                          ("TRIAL_KAFKA_TOPIC_PREFIX", values["kafka"]["topicPrefix"]),
                          ("TRIAL_KAFKA_BOOTSTRAP_SERVERS", values["kafka"]["bootstrapServers"])):
            if env.get(var, {}).get("value") != want:
                problems.append(f"{component}: {var} is {env.get(var, {}).get('value')!r}, not {want!r}")
        if values["kafka"]["sasl"]["enabled"]:  # each service its own principal (D48)
            for var in ("TRIAL_KAFKA_SASL_USERNAME", "TRIAL_KAFKA_SASL_PASSWORD"):
                key = env.get(var, {}).get("valueFrom", {}).get("secretKeyRef", {}).get("key", "")
                if not key.startswith(f"{component}-"):
                    problems.append(f"{component}: {var} is read from key {key!r}, not its own")
        elif "TRIAL_KAFKA_ALLOW_PLAINTEXT" not in env:
            problems.append(f"{component}: plaintext Kafka without TRIAL_KAFKA_ALLOW_PLAINTEXT")
    return problems


# --- the tests -----------------------------------------------------------------------------------

@pytest.mark.parametrize("values", [None, STAGING_VALUES], ids=["default", "staging"])
def test_the_chart_lints(helm: Path, values: Path | None) -> None:
    run_helm(helm, "lint", "--strict", str(CHART), *(["--values", str(values)] if values else []))


def test_every_object_is_valid_against_the_kubernetes_schemas(
        rendered: tuple[str, Docs, dict[str, Any]]) -> None:
    _, docs, _ = rendered
    assert {d["kind"] for d in docs} >= {"Deployment", "Service", "PodDisruptionBudget",
                                         "NetworkPolicy", "ConfigMap", "Job"}
    problems = []
    for version in KUBE_VERSIONS:
        for doc in docs:
            problems += [f"{version} {doc['kind']} {doc['metadata']['name']}: {p}"
                         for p in schema_problems(doc, version)]
    assert not problems, "\n".join(problems)


def schema_problems(doc: dict[str, Any], version: str) -> list[str]:
    try:
        kubernetes_schemas.validate(doc, version, strict=True)  # strict: unknown fields too
    except kubernetes_schemas.ValidationError as exc:
        return [f"{'/'.join(map(str, exc.path))}: {exc.message}"]
    except kubernetes_schemas.SchemaNotFoundError as exc:
        return [f"no schema: {exc}"]
    return []


def test_the_schema_validation_refuses_an_invalid_object(renders: dict[str, Any]) -> None:
    _, docs, _ = renders["default"]
    deployment = copy.deepcopy(of_kind(docs, "Deployment")[name("gateway")])
    deployment["spec"]["template"]["spec"]["containers"][0]["livenessProbes"] = {}
    assert schema_problems(deployment, KUBE_VERSIONS[-1]), "an unknown field passed"
    deployment = copy.deepcopy(of_kind(docs, "Deployment")[name("gateway")])
    deployment["spec"]["replicas"] = "two"
    assert schema_problems(deployment, KUBE_VERSIONS[0]), "a string for an integer passed"


def test_deployments_run_each_service_with_probes_resources_and_no_privileges(
        rendered: tuple[str, Docs, dict[str, Any]]) -> None:
    _, docs, values = rendered
    assert not deployment_problems(docs, values), "\n".join(deployment_problems(docs, values))


def test_the_default_values_are_production_ones(renders: dict[str, Any]) -> None:
    _, docs, values = renders["default"]
    assert values["environment"] == "production"
    assert values["kafka"]["replicationFactor"] == 3
    for deployment in of_kind(docs, "Deployment").values():
        env = env_of(deployment["spec"]["template"]["spec"]["containers"][0])
        assert env["TRIAL_ENV"]["value"] == "production"


def test_the_second_values_file_changes_replicas_prefix_and_secret_names(renders: dict[str, Any]) -> None:
    _, default_docs, _ = renders["default"]
    _, docs, values = renders["staging"]
    assert of_kind(docs, "Deployment")[name("gateway")]["spec"]["replicas"] == 3
    assert of_kind(docs, "Deployment")[name("dosing")]["spec"]["replicas"] == 1
    assert of_kind(default_docs, "Deployment")[name("dosing")]["spec"]["replicas"] == 2
    assert kafka_problems(docs, values) == []
    assert values["kafka"]["topicPrefix"] == "staging."
    assert of_kind(docs, "Service")[name("gateway")]["spec"]["type"] == "LoadBalancer"


def test_secrets_come_only_from_secret_key_refs(rendered: tuple[str, Docs, dict[str, Any]]) -> None:
    text, docs, values = rendered
    assert not secret_problems(text, docs, values), "\n".join(secret_problems(text, docs, values))


def test_values_yaml_holds_no_secret() -> None:
    text = (CHART / "values.yaml").read_text() + STAGING_VALUES.read_text()
    hits = [m.group(0) for p in LITERAL_SECRETS for m in p.finditer(text)]
    assert not hits, f"secret values in the chart's values files: {hits}"


def test_every_service_has_a_pod_disruption_budget(rendered: tuple[str, Docs, dict[str, Any]]) -> None:
    _, docs, _ = rendered
    assert not pdb_problems(docs), "\n".join(pdb_problems(docs))


def test_only_the_gateway_reaches_the_services(rendered: tuple[str, Docs, dict[str, Any]]) -> None:
    _, docs, values = rendered
    assert not network_problems(docs, values), "\n".join(network_problems(docs, values))


def test_migrations_run_before_install_and_upgrade_as_the_owner(
        rendered: tuple[str, Docs, dict[str, Any]]) -> None:
    _, docs, values = rendered
    assert not migration_problems(docs, values), "\n".join(migration_problems(docs, values))


def test_the_protocol_is_mounted_where_the_services_read_it(
        rendered: tuple[str, Docs, dict[str, Any]], tmp_path: Path) -> None:
    _, docs, _ = rendered
    assert not protocol_problems(docs), "\n".join(protocol_problems(docs))
    # The mounted folder is one the services accept: write it out as the kubelet would, load it.
    (configmap,) = of_kind(docs, "ConfigMap").values()
    for file, content in configmap["data"].items():
        (tmp_path / file).write_text(content)
    assert load_protocol(tmp_path).trial_id == "NCT03424629"


def test_every_container_starts_with_its_settings(rendered: tuple[str, Docs, dict[str, Any]],
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """The env each Deployment renders is what shared/settings.py accepts, and (once it has
    production mode) nothing production mode refuses, given secrets of the right length."""
    _, docs, _ = rendered
    refusals = getattr(settings_module, "production_refusals", None)
    for component in ALL:
        for var in [v for v in os.environ if v.startswith("TRIAL_")]:
            monkeypatch.delenv(var)
        for var, entry in env_of(_container(docs, component)).items():
            placeholder = ("postgresql+asyncpg://db:5432/trial" if var == "TRIAL_DATABASE_URL"
                           else "p" * 64)
            monkeypatch.setenv(var, entry["value"] if "value" in entry else placeholder)
        settings = settings_module.Settings()
        assert settings.service_name == component
        if refusals is not None:
            assert refusals(settings) == [], f"{component} would refuse to start"


@pytest.mark.parametrize(("values", "refusal"), [
    (["environment=staging"], "value must be one of"),
    (["services.randomisation.replicas=1"], "additional properties 'randomisation'"),
    (["kafka.replicationFactor=0"], "/kafka/replicationFactor"),
    (["auth.allowHs256=false"], "production needs auth.jwksUrl"),
    (["auth.jwksUrl=https://idp.example/jwks.json", "auth.issuer=https://idp.example/"],
     "needs auth.issuer and auth.audience"),
    (["kafka.sasl.enabled=false"], "production refuses plaintext Kafka"),
    (["kafka.topicPrefix=prod/"], "/kafka/topicPrefix"),
], ids=["environment", "misspelt-service", "replication-factor", "no-jwks-no-hs256", "jwks-no-audience",
        "plaintext-kafka", "topic-prefix"])
def test_the_chart_refuses_values_that_cannot_run(helm: Path, values: list[str], refusal: str) -> None:
    args = [a for v in values for a in ("--set", v)]
    done = subprocess.run([str(helm), "template", RELEASE, str(CHART), *args],
                          capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode != 0, f"rendered with {values}"
    assert refusal in done.stderr, done.stderr


def test_plaintext_kafka_renders_only_when_allowed_and_then_says_so(helm: Path) -> None:
    text = run_helm(helm, "template", RELEASE, str(CHART), "--set", "kafka.sasl.enabled=false",
                    "--set", "kafka.allowPlaintext=true")
    docs = [d for d in yaml.safe_load_all(text) if d]
    values = _merged(yaml.safe_load((CHART / "values.yaml").read_text()),
                     {"kafka": {"sasl": {"enabled": False}, "allowPlaintext": True}})
    assert kafka_problems(docs, values) == []
    env = env_of(_container(docs, "dosing"))
    assert env["TRIAL_KAFKA_ALLOW_PLAINTEXT"]["value"] == "true"
    assert "TRIAL_KAFKA_SASL_USERNAME" not in env


def test_the_values_schema_is_a_valid_json_schema() -> None:
    schema = json.loads((CHART / "values.schema.json").read_text())
    jsonschema.validators.validator_for(schema).check_schema(schema)
    for file in (CHART / "values.yaml", STAGING_VALUES):
        jsonschema.validate(yaml.safe_load(file.read_text()), schema)


def test_kafka_settings_carry_replication_factor_and_prefix(
        rendered: tuple[str, Docs, dict[str, Any]]) -> None:
    _, docs, values = rendered
    assert not kafka_problems(docs, values), "\n".join(kafka_problems(docs, values))


# --- every check fails on what it is for ---------------------------------------------------------

def _container(docs: Docs, component: str) -> dict[str, Any]:
    container: dict[str, Any] = of_kind(docs, "Deployment")[name(component)]["spec"]["template"][
        "spec"]["containers"][0]
    return container


def _drop_readiness(docs: Docs) -> None:
    del _container(docs, "safety")["readinessProbe"]


def _liveness_on_readyz(docs: Docs) -> None:
    _container(docs, "audit")["livenessProbe"]["httpGet"]["path"] = "/readyz"


def _drop_limits(docs: Docs) -> None:
    del _container(docs, "dosing")["resources"]["limits"]


def _run_as_root(docs: Docs) -> None:
    spec = of_kind(docs, "Deployment")[name("efficacy")]["spec"]["template"]["spec"]
    spec["securityContext"]["runAsUser"] = 0
    spec["securityContext"]["runAsNonRoot"] = False


def _writable_root(docs: Docs) -> None:
    _container(docs, "gateway")["securityContext"]["readOnlyRootFilesystem"] = False


def _keep_capabilities(docs: Docs) -> None:
    _container(docs, "gateway")["securityContext"]["capabilities"] = {"add": ["NET_ADMIN"]}


def _remove_a_deployment(docs: Docs) -> None:
    docs.remove(of_kind(docs, "Deployment")[name("audit")])


def _literal_jwt_secret(docs: Docs) -> None:
    env = _container(docs, "gateway")["env"]
    entry = next(e for e in env if e["name"] == "TRIAL_JWT_SECRET")
    entry.pop("valueFrom")
    entry["value"] = "s3cret"


def _database_url_inline(docs: Docs) -> None:
    env = _container(docs, "dosing")["env"]
    entry = next(e for e in env if e["name"] == "TRIAL_DATABASE_URL")
    entry.pop("valueFrom")
    entry["value"] = "postgresql+asyncpg://trial:hunter2@db:5432/trial_dosing"


def _randomization_secret_elsewhere(docs: Docs) -> None:
    _container(docs, "audit")["env"].append(
        {"name": "TRIAL_RANDOMIZATION_SECRET",
         "valueFrom": {"secretKeyRef": {"name": name("secrets"), "key": "randomization-secret"}}})


def _render_a_secret(docs: Docs) -> None:
    docs.append({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "x"},
                 "stringData": {"jwt-secret": "x"}})


def _remove_a_pdb(docs: Docs) -> None:
    docs.remove(of_kind(docs, "PodDisruptionBudget")[name("safety")])


def _open_a_service(docs: Docs) -> None:
    policy = of_kind(docs, "NetworkPolicy")[name("randomization")]
    policy["spec"]["ingress"][0]["from"].append({"namespaceSelector": {}})


def _widen_the_gateway_peer(docs: Docs) -> None:
    policy = of_kind(docs, "NetworkPolicy")[name("dosing")]
    labels = policy["spec"]["ingress"][0]["from"][0]["podSelector"]["matchLabels"]
    del labels["app.kubernetes.io/component"]


def _remove_a_network_policy(docs: Docs) -> None:
    docs.remove(of_kind(docs, "NetworkPolicy")[name("audit")])


def _no_kafka_egress(docs: Docs) -> None:
    policy = of_kind(docs, "NetworkPolicy")[name("efficacy")]
    policy["spec"]["egress"] = [r for r in policy["spec"]["egress"] if 9092 not in _ports_of(r)]


def _migration_not_a_hook(docs: Docs) -> None:
    del of_kind(docs, "Job")[name("migrate-dosing")]["metadata"]["annotations"]["helm.sh/hook"]


def _migration_post_install(docs: Docs) -> None:
    of_kind(docs, "Job")[name("migrate-safety")]["metadata"]["annotations"]["helm.sh/hook"] = "post-install"


def _migrate_as_runtime_role(docs: Docs) -> None:
    job = of_kind(docs, "Job")[name("migrate-audit")]
    env = env_of(job["spec"]["template"]["spec"]["containers"][0])
    env["TRIAL_DATABASE_URL"]["valueFrom"]["secretKeyRef"]["key"] = "audit-database-url"


def _grant_no_service_role(docs: Docs) -> None:
    job = of_kind(docs, "Job")[name("migrate-dosing")]
    container = job["spec"]["template"]["spec"]["containers"][0]
    container["env"] = [e for e in container["env"] if e["name"] != "TRIAL_DATABASE_SERVICE_ROLE"]


def _protocol_not_mounted(docs: Docs) -> None:
    _container(docs, "safety")["volumeMounts"] = [
        m for m in _container(docs, "safety")["volumeMounts"] if m["name"] != "protocol"]


def _protocol_changed(docs: Docs) -> None:
    (configmap,) = of_kind(docs, "ConfigMap").values()
    configmap["data"]["trial.json"] = json.dumps({"trial_id": "other"})


def _replication_factor_one(docs: Docs) -> None:
    env = _container(docs, "audit")["env"]
    next(e for e in env if e["name"] == "TRIAL_KAFKA_REPLICATION_FACTOR")["value"] = "1"


def _shared_kafka_principal(docs: Docs) -> None:
    env = _container(docs, "safety")["env"]
    ref = next(e for e in env if e["name"] == "TRIAL_KAFKA_SASL_USERNAME")["valueFrom"]
    ref["secretKeyRef"]["key"] = "dosing-kafka-sasl-username"


Check = Callable[[str, Docs, dict[str, Any]], list[str]]
CHECKS: dict[str, Check] = {
    "deployments": lambda text, docs, values: deployment_problems(docs, values),
    "secrets": lambda text, docs, values: secret_problems(yaml.safe_dump_all(docs), docs, values),
    "pdb": lambda text, docs, values: pdb_problems(docs),
    "network": lambda text, docs, values: network_problems(docs, values),
    "migrations": lambda text, docs, values: migration_problems(docs, values),
    "protocol": lambda text, docs, values: protocol_problems(docs),
    "kafka": lambda text, docs, values: kafka_problems(docs, values),
}
SPOILS = [
    ("deployments", _drop_readiness), ("deployments", _liveness_on_readyz),
    ("deployments", _drop_limits), ("deployments", _run_as_root), ("deployments", _writable_root),
    ("deployments", _keep_capabilities), ("deployments", _remove_a_deployment),
    ("secrets", _literal_jwt_secret), ("secrets", _database_url_inline),
    ("secrets", _randomization_secret_elsewhere), ("secrets", _render_a_secret),
    ("pdb", _remove_a_pdb),
    ("network", _open_a_service), ("network", _widen_the_gateway_peer),
    ("network", _remove_a_network_policy), ("network", _no_kafka_egress),
    ("migrations", _migration_not_a_hook), ("migrations", _migration_post_install),
    ("migrations", _migrate_as_runtime_role), ("migrations", _grant_no_service_role),
    ("protocol", _protocol_not_mounted), ("protocol", _protocol_changed),
    ("kafka", _replication_factor_one), ("kafka", _shared_kafka_principal),
]


@pytest.mark.parametrize(("check", "spoil"), SPOILS, ids=[s.__name__.strip("_") for _, s in SPOILS])
def test_each_check_catches_what_it_is_for(renders: dict[str, Any], check: str,
                                           spoil: Callable[[Docs], None]) -> None:
    text, docs, values = renders["default"]
    assert CHECKS[check](text, docs, values) == [], f"{check} fails on the chart itself"
    spoiled = copy.deepcopy(docs)
    spoil(spoiled)
    assert CHECKS[check]("", spoiled, values), f"{check} did not notice {spoil.__name__}"
