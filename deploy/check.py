#!/usr/bin/env python3
"""Checks the rendered manifests of deploy/ against each other and against their sources.

Usage: deploy/check.py OUTDIR RENDERED.yaml...  (deploy/check.sh renders the overlays with
`kubectl kustomize` first). For each rendered file it writes OUTDIR/<name>-core.yaml (the core
objects, for kubernetes-validate) and OUTDIR/rules/<name>-<rule>.yml (each PrometheusRule's
spec, for promtool), and checks:

- operator objects (PodMonitor, ServiceMonitor, PrometheusRule) against
  deploy/schemas/monitoring.coreos.com_v1.json; any other non-core kind is an error;
- every PrometheusRule's spec equals its source in config/prometheus/rules, and every
  dashboard ConfigMap's JSON equals its source in grafana/dashboards;
- every `job="..."` matcher of the rules and dashboards names a job that a PodMonitor sets by
  relabeling, and every PodMonitor selects a pod template that has the port it scrapes;
- every container that runs tokentap: its probes and ports agree with the listen and
  admin_listen of the tokentap.toml it mounts (whole directory, no subPath), it runs as
  non-root with a read-only root filesystem and no capabilities, and its pod's
  terminationGracePeriodSeconds covers the preStop pause plus proxy.shutdown_grace_secs;
- every object fits the 256 KiB annotation that client-side `kubectl apply` keeps;
- the config-reload container posts to the admin port of the tokentap beside it;
- a sidecar tokentap's upstream is vLLM's port on loopback in its own pod; a gateway's route
  upstreams are headless Services of the same namespace, on a port they serve.

Also checks the Dockerfile at the repository root (--dockerfile): every COPY source exists and
is not excluded by .dockerignore, every script it runs exists, and the binary it ships is the
one bench/pgo.sh builds. Exit 1 with one line per problem.
"""
import fnmatch
import json
import re
import sys
import tomllib
from pathlib import Path

import jsonschema
import yaml

ROOT = Path(__file__).resolve().parent.parent
CORE_GROUPS = {"v1", "apps/v1", "policy/v1", "batch/v1", "networking.k8s.io/v1", "autoscaling/v2"}
OPERATOR_KINDS = {"PodMonitor", "ServiceMonitor", "PrometheusRule"}
problems = []


def problem(msg):
    problems.append(msg)


def port_of(addr):
    return int(addr.rsplit(":", 1)[1])


def named_port(container, name_or_number):
    if isinstance(name_or_number, int):
        return name_or_number
    for p in container.get("ports", []):
        if p.get("name") == name_or_number:
            return p["containerPort"]
    return None


def selects(selector, labels):
    for k, v in (selector.get("matchLabels") or {}).items():
        if labels.get(k) != v:
            return False
    for e in selector.get("matchExpressions") or []:
        has = e["key"] in labels
        val = labels.get(e["key"])
        op = e["operator"]
        if op == "Exists" and not has or op == "DoesNotExist" and has:
            return False
        if op == "In" and val not in e.get("values", []) or op == "NotIn" and val in e.get("values", []):
            return False
    return True


def job_matchers(text):
    return set(re.findall(r'\bjob\s*=~?\s*\\?"([^"\\]+)\\?"', text))


def check_operator(doc, where, schema, rules_dir, stem):
    kind = doc["kind"]
    validator = jsonschema.Draft202012Validator(
        {"$ref": f"#/$defs/{kind}", "$defs": schema["$defs"]}
    )
    for err in sorted(validator.iter_errors(doc), key=lambda e: list(e.absolute_path)):
        path = "/".join(str(p) for p in err.absolute_path)
        problem(f"{where}: {kind} {doc['metadata'].get('name')}: {path}: {err.message}")
    if kind == "PrometheusRule":
        name = doc["metadata"]["name"]
        src = ROOT / "config" / "prometheus" / "rules" / f"{name}.yml"
        if not src.exists():
            problem(f"{where}: PrometheusRule {name}: no source {src.relative_to(ROOT)}")
        elif yaml.safe_load(src.read_text()) != doc["spec"]:
            problem(f"{where}: PrometheusRule {name} differs from {src.relative_to(ROOT)}")
        rules_dir.mkdir(parents=True, exist_ok=True)
        (rules_dir / f"{stem}-{name}.yml").write_text(yaml.safe_dump(doc["spec"], sort_keys=False))


def tokentap_containers(workload):
    spec = workload["spec"]["template"]["spec"]
    for c in spec.get("containers", []):
        if c.get("args", [None])[0] == "serve" or c.get("name") == "tokentap":
            yield c


def config_of(container, pod_spec, configmaps, where):
    """The parsed tokentap.toml the container's --config names, from the ConfigMap it mounts."""
    args = container.get("args", [])
    if "--config" not in args:
        problem(f"{where}: container {container['name']} runs without --config")
        return None
    path = args[args.index("--config") + 1]
    directory, filename = path.rsplit("/", 1)
    for m in container.get("volumeMounts", []):
        if m["mountPath"] != directory:
            continue
        if "subPath" in m:
            problem(f"{where}: {m['name']} mounted with subPath: a ConfigMap edit would never reach it")
        vol = next((v for v in pod_spec.get("volumes", []) if v["name"] == m["name"]), None)
        cm_name = (vol or {}).get("configMap", {}).get("name")
        cm = configmaps.get(cm_name)
        if cm is None or filename not in cm.get("data", {}):
            problem(f"{where}: {path} is not in a ConfigMap of this install")
            return None
        return tomllib.loads(cm["data"][filename])
    problem(f"{where}: nothing is mounted at {directory}")
    return None


def check_workloads(docs, where):
    configmaps = {d["metadata"]["name"]: d for d in docs if d["kind"] == "ConfigMap"}
    services = {d["metadata"]["name"]: d for d in docs if d["kind"] == "Service"}
    workloads = [d for d in docs if d["kind"] in ("Deployment", "StatefulSet", "DaemonSet")]
    for w in workloads:
        pod = w["spec"]["template"]["spec"]
        pod_sc = pod.get("securityContext", {})
        for c in tokentap_containers(w):
            cw = f"{where}: {w['kind']} {w['metadata']['name']}/{c['name']}"
            sc = {**pod_sc, **c.get("securityContext", {})}
            if not sc.get("runAsNonRoot") or not sc.get("readOnlyRootFilesystem"):
                problem(f"{cw}: must run as non-root with a read-only root filesystem")
            if sc.get("allowPrivilegeEscalation", True) or sc.get("capabilities", {}).get("drop") != ["ALL"]:
                problem(f"{cw}: must drop ALL capabilities and forbid privilege escalation")
            cfg = config_of(c, pod, configmaps, cw)
            if cfg is None:
                continue
            admin = port_of(cfg.get("admin_listen", "127.0.0.1:9464"))
            if not cfg.get("admin_listen", "127.0.0.1").startswith("0.0.0.0"):
                problem(f"{cw}: admin_listen must bind 0.0.0.0 for the kubelet's probes and Prometheus")
            if named_port(c, "tokentap-admin") != admin:
                problem(f"{cw}: port tokentap-admin is not admin_listen's port {admin}")
            if named_port(c, "http") != port_of(cfg.get("listen", "0.0.0.0:8080")):
                problem(f"{cw}: port http is not listen's port")
            for probe, path in (("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")):
                get = c.get(probe, {}).get("httpGet", {})
                if get.get("path") != path or named_port(c, get.get("port")) != admin:
                    problem(f"{cw}: {probe} must be GET {path} on the admin port")
            pause = c.get("lifecycle", {}).get("preStop", {}).get("sleep", {}).get("seconds", 0)
            grace = cfg.get("proxy", {}).get("shutdown_grace_secs", 30.0)
            if pod.get("terminationGracePeriodSeconds", 30) < pause + grace:
                problem(f"{cw}: terminationGracePeriodSeconds < preStop {pause} s + shutdown_grace_secs {grace} s")
            for other in pod["containers"]:
                for a in other.get("args", []):
                    if a.startswith("--webhook-url=") and not a.startswith(f"--webhook-url=http://127.0.0.1:{admin}/"):
                        problem(f"{cw}: {other['name']} posts to {a}, not to the admin port {admin}")
            upstream = cfg.get("upstream", {}).get("url")
            routes = cfg.get("routes", [])
            if upstream:
                m = re.fullmatch(r"http://127\.0\.0\.1:(\d+)", upstream)
                ports = {p["containerPort"] for o in pod["containers"] if o is not c for p in o.get("ports", [])}
                if not m or int(m.group(1)) not in ports:
                    problem(f"{cw}: upstream {upstream} is not a port of another container of the pod")
            ns = w["metadata"].get("namespace")
            for r in routes:
                for u in r.get("upstreams", []):
                    m = re.fullmatch(r"http://([a-z0-9-]+)\.([a-z0-9-]+)\.svc\.cluster\.local:(\d+)", u)
                    svc = services.get(m.group(1)) if m else None
                    if not m or svc is None or svc["metadata"].get("namespace") != m.group(2) or m.group(2) != ns:
                        problem(f"{cw}: route upstream {u} is not a Service of this install in namespace {ns}")
                    elif svc["spec"].get("clusterIP") != "None":
                        problem(f"{cw}: route upstream {u} is not headless: one endpoint, balanced by kube-proxy")
                    elif int(m.group(3)) not in {p["port"] for p in svc["spec"]["ports"]}:
                        problem(f"{cw}: route upstream {u}: the Service has no port {m.group(3)}")


def check_monitoring(docs, where):
    pods = [
        (d["spec"]["template"]["metadata"].get("labels", {}), d["spec"]["template"]["spec"])
        for d in docs
        if d["kind"] in ("Deployment", "StatefulSet", "DaemonSet")
    ]
    jobs = set()
    for d in docs:
        if d["kind"] != "PodMonitor":
            continue
        for ep in d["spec"].get("podMetricsEndpoints", []):
            for r in ep.get("relabelings", []):
                if r.get("targetLabel") == "job" and "replacement" in r:
                    jobs.add(r["replacement"])
            if not any(
                selects(d["spec"]["selector"], labels) and any(named_port(c, ep["port"]) for c in spec["containers"])
                for labels, spec in pods
            ):
                problem(f"{where}: PodMonitor {d['metadata']['name']} selects no pod with port {ep['port']}")
    if not jobs:
        return
    wanted = set()
    for d in docs:
        if d["kind"] == "PrometheusRule":
            wanted |= job_matchers(json.dumps(d["spec"]))
        if d["kind"] == "ConfigMap" and d["metadata"].get("labels", {}).get("grafana_dashboard") == "1":
            for key, text in d["data"].items():
                src = ROOT / "grafana" / "dashboards" / key
                if not src.exists() or json.loads(src.read_text()) != json.loads(text):
                    problem(f"{where}: dashboard {key} differs from grafana/dashboards/{key}")
                wanted |= job_matchers(text)
    for job in sorted(wanted - jobs):
        problem(f"{where}: the rules or dashboards match job=\"{job}\" but no PodMonitor sets that job")


def check_rendered(path, outdir, schema):
    where = path.name
    docs = [d for d in yaml.safe_load_all(path.read_text()) if d]
    core = []
    for d in docs:
        if d["kind"] in OPERATOR_KINDS:
            check_operator(d, where, schema, outdir / "rules", path.stem)
        elif d.get("apiVersion") in CORE_GROUPS:
            core.append(d)
        else:
            problem(f"{where}: {d.get('apiVersion')} {d['kind']}: no schema to check it against")
    for d in docs:
        # `kubectl apply` (client-side) stores the whole object in an annotation, which may not
        # exceed 256 KiB: a larger dashboard would need --server-side.
        if len(json.dumps(d, separators=(",", ":"))) >= 262144:
            problem(f"{where}: {d['kind']} {d['metadata']['name']} is too large for `kubectl apply`")
    (outdir / f"{path.stem}-core.yaml").write_text(yaml.safe_dump_all(core, sort_keys=False))
    check_workloads(docs, where)
    check_monitoring(docs, where)


def dockerignored(rel, patterns):
    ignored = False
    for p in patterns:
        neg = p.startswith("!")
        p = p.lstrip("!").strip("/")
        parts = rel.split("/")
        hit = any(
            fnmatch.fnmatch("/".join(parts[: i + 1]), p) or fnmatch.fnmatch("/".join(parts[: i + 1]), p.removeprefix("**/"))
            or (p.startswith("**/") and fnmatch.fnmatch(parts[i], p.removeprefix("**/")))
            for i in range(len(parts))
        )
        if hit:
            ignored = not neg
    return ignored


def check_dockerfile():
    path = ROOT / "Dockerfile"
    text = re.sub(r"\\\n", " ", path.read_text())
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.strip().startswith("#")]
    ignore = [
        line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    stages = [line for line in lines if line.upper().startswith("FROM ")]
    if len(stages) < 2:
        problem("Dockerfile: not multi-stage")
    runs = " ".join(line for line in lines if line.upper().startswith("RUN "))
    for script in re.findall(r"\b((?:bench|deploy|\.ci)/[\w./-]+\.(?:sh|py))", runs):
        if not (ROOT / script).is_file():
            problem(f"Dockerfile: runs {script}, which does not exist")
        elif dockerignored(script, ignore):
            problem(f"Dockerfile: runs {script}, which .dockerignore leaves out of the context")
    if "bench/pgo.sh" not in runs:
        problem("Dockerfile: the build stage does not run bench/pgo.sh")
    built = re.search(r"built (target/[\w./-]+)", (ROOT / "bench" / "pgo.sh").read_text())
    if not built or built.group(1) not in runs:
        problem("Dockerfile: does not take the binary bench/pgo.sh says it built")
    for line in lines:
        if not line.upper().startswith(("COPY ", "ADD ")):
            continue
        words = [w for w in line.split()[1:] if not w.startswith("--")]
        if "--from=" in line:
            continue
        for src in words[:-1]:
            if src == ".":
                for need in ("Cargo.toml", "Cargo.lock", "src", "bench/pgo.sh", "bench/configs.sh"):
                    if dockerignored(need, ignore):
                        problem(f"Dockerfile: .dockerignore leaves {need} out of the context")
            elif not list(ROOT.glob(src)):
                problem(f"Dockerfile: COPY source {src} does not exist")
    user = [line.split()[1] for line in lines if line.upper().startswith("USER ")]
    if not user or user[-1].split(":")[0] in ("0", "root"):
        problem("Dockerfile: the runtime stage must run as a non-root user")
    bins = re.findall(r'\[\[bin\]\]\s*name\s*=\s*"([^"]+)"', (ROOT / "Cargo.toml").read_text())
    entry = [line for line in lines if line.upper().startswith("ENTRYPOINT ")]
    if not entry or not any(f"/{b}\"" in entry[-1] for b in bins):
        problem("Dockerfile: ENTRYPOINT is not a binary of Cargo.toml")


def main():
    args = sys.argv[1:]
    if args == ["--dockerfile"]:
        check_dockerfile()
    elif len(args) >= 2:
        outdir = Path(args[0])
        schema = json.loads((ROOT / "deploy" / "schemas" / "monitoring.coreos.com_v1.json").read_text())
        for p in args[1:]:
            check_rendered(Path(p), outdir, schema)
    else:
        sys.exit("usage: deploy/check.py OUTDIR RENDERED.yaml... | deploy/check.py --dockerfile")
    for p in problems:
        print(p, file=sys.stderr)
    sys.exit(1 if problems else 0)


if __name__ == "__main__":
    main()
