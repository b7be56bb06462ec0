#!/usr/bin/env bash
# stepmesh bootstrap: makes the PKI and the webhook's serving certificate, and
# writes a Kustomize overlay over deploy/ that carries them.
#
#   deploy/scripts/bootstrap.sh OUT_DIR [--namespace NS]... [--rotate-webhook] [--apply]
#
# In OUT_DIR (created 0700, every key 0600):
#   root.crt/.key          the mesh's root CA (ECDSA P-256, 10 years). Move
#                          root.key offline once the intermediate exists.
#   intermediate.crt/.key  the CA's signing intermediate (pathlen 0, 1 year):
#                          Secret stepmesh-ca-pki (tls.crt, tls.key, ca.crt,
#                          and jwt-svid-key.pem), mounted into every replica.
#   jwt-svid.key           the CA's JWT-SVID signing key (ECDSA P-256): one
#                          key for all replicas, so one JWK set.
#   admin.token            the CA's admin token (`ca revoke`, ...): Secret
#                          stepmesh-ca-admin (token).
#   webhook-ca.crt/.key    a separate CA for the webhook's serving certificate
#                          only; its certificate is the webhook's caBundle.
#   webhook.crt/.key       serving certificate for
#                          stepmesh-injector.stepmesh-system.svc (1 year):
#                          Secret stepmesh-injector-tls.
#   gateway.crt/.key       serving certificate of the Kubernetes gateway
#                          (stepmesh-gateway.stepmesh-system.svc, signed by
#                          webhook-ca: give people webhook-ca.crt as the
#                          gateway's certificate-authority): Secret
#                          stepmesh-gateway-tls.
#   kustomization.yaml     overlay: deploy/ + the four Secrets (secret-*.yaml)
#                          + ConfigMap stepmesh-ca-bundle (bundle.pem =
#                          root.crt) in stepmesh-system and each --namespace
#                          (ca-bundle-NS.yaml; default stepmesh-demo) + the
#                          caBundle patch (webhook-cabundle-patch.yaml).
# Existing keys are reused, so re-running only refreshes the overlay;
# --rotate-webhook issues a new serving certificate (the injector reloads it
# from the Secret without a restart). --apply runs `kubectl apply -k OUT_DIR`.
set -euo pipefail

die() { echo "bootstrap: $*" >&2; exit 64; }

out="" rotate=0 apply=0 namespaces=()
while (($#)); do
    case "$1" in
        --namespace) [[ $# -ge 2 ]] || die "--namespace needs a value"; namespaces+=("$2"); shift 2 ;;
        --rotate-webhook) rotate=1; shift ;;
        --apply) apply=1; shift ;;
        -h|--help) sed -n '2,34p' "$0"; exit 0 ;;
        -*) die "unknown flag $1" ;;
        *) [[ -z "$out" ]] || die "one OUT_DIR only"; out="$1"; shift ;;
    esac
done
[[ -n "$out" ]] || die "usage: bootstrap.sh OUT_DIR [--namespace NS]... [--rotate-webhook] [--apply]"
((${#namespaces[@]})) || namespaces=(stepmesh-demo)
command -v openssl >/dev/null || die "openssl is required"

base="$(cd "$(dirname "$0")/.." && pwd)"
umask 077
mkdir -p "$out"
out="$(cd "$out" && pwd)"
cd "$out"

key() { [[ -f "$1" ]] || openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out "$1" 2>/dev/null; chmod 600 "$1"; }

# Issues $1.crt from $1.key, signed by $2 (or self-signed when $2 is "-").
cert() {
    local name="$1" issuer="$2" subject="$3" days="$4" ext="$5"
    printf '%b\n' "$ext" > "$name.ext"
    if [[ "$issuer" == "-" ]]; then
        openssl req -new -x509 -key "$name.key" -subj "$subject" -days "$days" \
            -extensions v3 -config <(printf '[req]\ndistinguished_name=dn\n[dn]\n[v3]\n%b\n' "$ext") \
            -out "$name.crt" 2>/dev/null
    else
        openssl req -new -key "$name.key" -subj "$subject" -out "$name.csr" 2>/dev/null
        openssl x509 -req -in "$name.csr" -CA "$issuer.crt" -CAkey "$issuer.key" \
            -CAcreateserial -days "$days" -extfile <(printf '%b\n' "$ext") \
            -out "$name.crt" 2>/dev/null
        rm -f "$name.csr"
    fi
    rm -f "$name.ext"
}

ca_ext='basicConstraints=critical,CA:TRUE\nkeyUsage=critical,keyCertSign,cRLSign\nsubjectKeyIdentifier=hash'
if [[ ! -f root.crt ]]; then
    key root.key
    cert root - "/O=stepmesh/CN=stepmesh root CA" 3650 "$ca_ext"
fi
if [[ ! -f intermediate.crt ]]; then
    key intermediate.key
    cert intermediate root "/O=stepmesh/CN=stepmesh-ca intermediate" 365 \
        'basicConstraints=critical,CA:TRUE,pathlen:0\nkeyUsage=critical,keyCertSign,cRLSign\nsubjectKeyIdentifier=hash\nauthorityKeyIdentifier=keyid'
fi
if [[ ! -f webhook-ca.crt ]]; then
    key webhook-ca.key
    cert webhook-ca - "/O=stepmesh/CN=stepmesh webhook CA" 3650 "$ca_ext"
fi
if [[ $rotate == 1 || ! -f webhook.crt ]]; then
    rm -f webhook.key
    key webhook.key
    cert webhook webhook-ca "/O=stepmesh/CN=stepmesh-injector.stepmesh-system.svc" 365 \
        'basicConstraints=critical,CA:FALSE\nkeyUsage=critical,digitalSignature\nextendedKeyUsage=serverAuth\nsubjectAltName=DNS:stepmesh-injector.stepmesh-system.svc,DNS:stepmesh-injector.stepmesh-system.svc.cluster.local'
fi
if [[ ! -f gateway.crt ]]; then
    key gateway.key
    cert gateway webhook-ca "/O=stepmesh/CN=stepmesh-gateway.stepmesh-system.svc" 365 \
        'basicConstraints=critical,CA:FALSE\nkeyUsage=critical,digitalSignature\nextendedKeyUsage=serverAuth\nsubjectAltName=DNS:stepmesh-gateway.stepmesh-system.svc,DNS:stepmesh-gateway.stepmesh-system.svc.cluster.local'
fi
key jwt-svid.key
[[ -f admin.token ]] || openssl rand -hex 32 > admin.token
chmod 600 admin.token
openssl verify -CAfile root.crt intermediate.crt >/dev/null || die "intermediate does not chain to root"
openssl verify -CAfile webhook-ca.crt webhook.crt >/dev/null || die "webhook certificate does not chain"

rel="$(python3 -c 'import os,sys; print(os.path.relpath(sys.argv[1], sys.argv[2]))' "$base" "$out" 2>/dev/null || echo "$base")"
ca_bundle="$(openssl base64 -A < webhook-ca.crt)"
cat > webhook-cabundle-patch.yaml <<PATCH
- op: add
  path: /webhooks/0/clientConfig/caBundle
  value: $ca_bundle
PATCH
b64() { openssl base64 -A < "$1"; }
indent() { sed 's/^/    /' "$1"; }
# Secret (name, type, key=file...) and ConfigMap manifests, written as plain
# files: kustomize v2 (Debian's kubectl 1.20) ignores a generator's namespace.
secret() {
    local name="$1" type="$2"; shift 2
    {
        printf 'apiVersion: v1\nkind: Secret\nmetadata:\n  name: %s\n  namespace: stepmesh-system\ntype: %s\ndata:\n' "$name" "$type"
        for pair in "$@"; do printf '  %s: %s\n' "${pair%%=*}" "$(b64 "${pair#*=}")"; done
    } > "secret-$name.yaml"
}
secret stepmesh-ca-pki Opaque tls.crt=intermediate.crt tls.key=intermediate.key ca.crt=root.crt jwt-svid-key.pem=jwt-svid.key
secret stepmesh-ca-admin Opaque token=admin.token
secret stepmesh-injector-tls kubernetes.io/tls tls.crt=webhook.crt tls.key=webhook.key
secret stepmesh-gateway-tls kubernetes.io/tls tls.crt=gateway.crt tls.key=gateway.key
rm -f ca-bundle-*.yaml
for ns in stepmesh-system "${namespaces[@]}"; do
    {
        printf 'apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: stepmesh-ca-bundle\n  namespace: %s\ndata:\n  bundle.pem: |\n' "$ns"
        indent root.crt
    } > "ca-bundle-$ns.yaml"
done
# The base as a directory under `resources` and the JSON patch under
# `patches` with a `target` (kustomize >= 3.1, kubectl >= 1.21): the
# deprecated `bases` and `patchesJson6902` make current kubectl warn.
{
    echo "# Generated by deploy/scripts/bootstrap.sh: do not edit; re-run it."
    echo "apiVersion: kustomize.config.k8s.io/v1beta1"
    echo "kind: Kustomization"
    echo "resources:"
    echo "  - $rel"
    echo "  - secret-stepmesh-ca-pki.yaml"
    echo "  - secret-stepmesh-ca-admin.yaml"
    echo "  - secret-stepmesh-injector-tls.yaml"
    echo "  - secret-stepmesh-gateway-tls.yaml"
    for ns in stepmesh-system "${namespaces[@]}"; do echo "  - ca-bundle-$ns.yaml"; done
    echo "patches:"
    echo "  - target: {group: admissionregistration.k8s.io, version: v1, kind: MutatingWebhookConfiguration, name: stepmesh-injector}"
    echo "    path: webhook-cabundle-patch.yaml"
} > kustomization.yaml
chmod 600 kustomization.yaml

echo "bootstrap: overlay written to $out (kubectl apply -k $out)"
if [[ $apply == 1 ]]; then
    kubectl apply -k "$out"
fi
