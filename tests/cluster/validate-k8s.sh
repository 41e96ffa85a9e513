#!/usr/bin/env bash
# Offline validation of deploy/kubernetes/: every manifest against the Kubernetes
# API schemas (kubernetes-validate, schemas bundled in the wheel, --strict so an
# unknown or misspelt field fails), for the oldest and newest Kubernetes versions
# we claim; then the cross-references no schema sees (kustomization lists every
# manifest, StatefulSet <-> headless Service <-> selectors, the ConfigMap's TOML
# parses and names one peer per replica with the pod DNS names).
#
# No cluster and no network needed.
#   SLUICE_VENV  venv with kubernetes-validate (default /var/tmp/sluice-venv;
#                `bash scripts/test.sh setup` installs scripts/requirements-test.txt)
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
DIR="$ROOT/deploy/kubernetes"
VENV=${SLUICE_VENV:-/var/tmp/sluice-venv}
VERSIONS=${SLUICE_K8S_VERSIONS:-"1.28.0 1.37.0"}

log() { printf '[validate-k8s] %s\n' "$*"; }
fail() {
    printf '[validate-k8s] FAIL: %s\n' "$*" >&2
    exit 1
}

KV=$VENV/bin/kubernetes-validate
[[ -x $KV ]] || fail "kubernetes-validate not in $VENV (bash scripts/test.sh setup)"

mapfile -t MANIFESTS < <(find "$DIR" -maxdepth 1 -name '*.yaml' ! -name kustomization.yaml | sort)
((${#MANIFESTS[@]} > 0)) || fail "no manifests in $DIR"

for v in $VERSIONS; do
    out=$("$KV" --strict --kubernetes-version "$v" "${MANIFESTS[@]}" 2>&1) || {
        echo "$out" >&2
        fail "schema validation failed for Kubernetes $v"
    }
    if grep -q -e '^WARN' -e '^ERROR' <<<"$out"; then
        echo "$out" >&2
        fail "warnings for Kubernetes $v (a kind without schema?)"
    fi
    log "Kubernetes $v: $(grep -c '^INFO.*passed' <<<"$out") resources pass the strict schemas"
done

"$VENV/bin/python" - "$DIR" <<'EOF'
import sys, tomllib
from pathlib import Path

import yaml

d = Path(sys.argv[1])
docs = {}
for f in sorted(d.glob("*.yaml")):
    for doc in yaml.safe_load_all(f.read_text()):
        if doc:
            docs.setdefault(doc["kind"], []).append((f.name, doc))
errors = []

def check(cond, msg):
    if not cond:
        errors.append(msg)

kust = docs["Kustomization"][0][1]
files = {f.name for f in d.glob("*.yaml")} - {"kustomization.yaml"}
check(set(kust["resources"]) == files, f"kustomization resources {sorted(kust['resources'])} != manifests {sorted(files)}")

(_, sts), = docs["StatefulSet"]
services = {doc["metadata"]["name"]: doc for _, doc in docs["Service"]}
headless = services.get(sts["spec"]["serviceName"])
check(headless is not None, f"StatefulSet serviceName {sts['spec']['serviceName']} has no Service")
if headless:
    check(headless["spec"].get("clusterIP") == "None", "the StatefulSet's service is not headless")
    check(headless["spec"].get("publishNotReadyAddresses") is True,
          "headless service must publish not-ready pods (the quorum forms before readiness)")
labels = sts["spec"]["template"]["metadata"]["labels"]
check(all(labels.get(k) == v for k, v in sts["spec"]["selector"]["matchLabels"].items()),
      "StatefulSet selector does not match its pod labels")
for name, svc in services.items():
    check(all(labels.get(k) == v for k, v in svc["spec"]["selector"].items()), f"Service {name} selects no pod")
for _, pdb in docs["PodDisruptionBudget"]:
    check(all(labels.get(k) == v for k, v in pdb["spec"]["selector"]["matchLabels"].items()), "PDB selects no pod")
check(sts["spec"].get("podManagementPolicy") == "Parallel",
      "podManagementPolicy must be Parallel (a node is ready only once the quorum exists)")

pod = sts["spec"]["template"]["spec"]
(container,) = pod["containers"]
ports = {p["name"]: p["containerPort"] for p in container["ports"]}
check(ports == {"kafka": 9092, "raft": 9093, "http": 8080, "amqp": 5672}, f"container ports {ports}")
mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
claims = {c["metadata"]["name"] for c in sts["spec"]["volumeClaimTemplates"]}
check(mounts.get("data") == "/data" and "data" in claims, "the data claim is not mounted at /data")

(_, cm), = docs["ConfigMap"]
cfg_vol = [v for v in pod["volumes"] if v.get("configMap", {}).get("name") == cm["metadata"]["name"]]
check(cfg_vol and mounts.get(cfg_vol[0]["name"]) == "/etc/sluice", "the ConfigMap is not mounted at /etc/sluice")
cfg = tomllib.loads(cm["data"]["sluice.toml"])
known = {"server", "storage", "kafka", "amqp", "group", "cluster", "defaults"}
check(set(cfg) <= known, f"unknown sections in sluice.toml: {set(cfg) - known}")
check(cfg["storage"]["data_dir"] == "/data", "data_dir is not /data")
peers = cfg["cluster"]["peers"]
want = [f"{i + 1}@{sts['metadata']['name']}-{i}.{headless['metadata']['name']}:9093" for i in range(sts["spec"]["replicas"])]
check(peers == want, f"cluster peers {peers} != one per replica {want}")
script = "\n".join(container.get("args", []))
check("--config /etc/sluice/sluice.toml" in script and "SLUICE_NODE_ID" in script, "the start script does not set the node id / config")

if errors:
    for e in errors:
        print(f"[validate-k8s] FAIL: {e}", file=sys.stderr)
    sys.exit(1)
print("[validate-k8s] cross-references consistent (kustomization, services, selectors, PDB, peers, mounts)")
EOF
log "PASS"
