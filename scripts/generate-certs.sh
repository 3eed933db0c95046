#!/usr/bin/env bash
# A private CA and the TLS certificates of a fedsparse Flower 1.41 deployment (openssl).
#
# usage: [SUPERNODES="supernode-1 supernode-2"] scripts/generate-certs.sh [OUT_DIR] [EXTRA_SAN ...]
#   OUT_DIR     default: certificates
#   EXTRA_SAN   hostnames or IP addresses under which remote SuperNodes and `flwr` reach the
#               SuperLink (e.g. fl.example.org 203.0.113.7); added to the SuperLink certificate
#   SUPERNODES  compose service names of the SuperNodes that get a Runtime API certificate
#               (docker-compose.tls.yml); SUPERNODES="" skips them
#
# Writes into OUT_DIR:
#   ca.crt, ca.key          the CA. Reused when both exist, and so is every certificate already
#                           issued by it: a later run only adds what is missing (a new SuperNode).
#                           FORCE=1 re-issues the certificates (other SANs); delete ca.* to start over.
#   server.pem, server.key  SuperLink: SAN localhost, superlink, 127.0.0.1, ::1 and EXTRA_SAN
#   <node>.pem, <node>.key  each SuperNode's Runtime API (its SuperExec connects to it):
#                           SAN <node>, localhost, 127.0.0.1, ::1
# ca.crt is the only file that parties outside this machine need. Keys are mode 600. For
# research deployments; in production use your organisation's PKI.
set -euo pipefail

out=${1:-certificates}
shift || true
supernodes=${SUPERNODES-supernode-1 supernode-2}
days=${DAYS:-825}
bits=${BITS:-3072}

command -v openssl >/dev/null || { echo "generate-certs.sh: openssl is not installed" >&2; exit 1; }
mkdir -p "$out"
umask 077
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

san_entry() {  # IPv4/IPv6 literal -> IP:..., anything else -> DNS:...
  if [[ $1 =~ ^[0-9]+(\.[0-9]+){3}$ || $1 == *:* ]]; then echo "IP:$1"; else echo "DNS:$1"; fi
}

new_ca=0
if [[ -s $out/ca.crt && -s $out/ca.key ]]; then
  echo "reusing CA $out/ca.crt"
else
  new_ca=1
  cat > "$tmp/ca.cnf" <<'EOF'
[req]
distinguished_name = dn
prompt = no
x509_extensions = v3_ca
[dn]
CN = fedsparse Flower CA
[v3_ca]
basicConstraints = critical, CA:TRUE, pathlen:0
keyUsage = critical, keyCertSign, cRLSign
subjectKeyIdentifier = hash
EOF
  openssl req -x509 -new -newkey "rsa:$bits" -nodes -sha256 -days "$days" -config "$tmp/ca.cnf" \
    -keyout "$out/ca.key" -out "$out/ca.crt" 2>/dev/null
fi

issue() {  # issue NAME CN SAN_LIST
  local name=$1 cn=$2 sans=$3
  if [[ $new_ca == 0 && ${FORCE:-0} != 1 && -s $out/$name.pem && -s $out/$name.key ]] \
     && openssl verify -CAfile "$out/ca.crt" "$out/$name.pem" >/dev/null 2>&1; then
    echo "keeping $out/$name.pem (FORCE=1 re-issues it)"
    return
  fi
  openssl req -new -newkey "rsa:$bits" -nodes -sha256 -subj "/CN=$cn" \
    -keyout "$out/$name.key" -out "$tmp/$name.csr" 2>/dev/null
  cat > "$tmp/$name.ext" <<EOF
basicConstraints = critical, CA:FALSE
keyUsage = critical, digitalSignature, keyEncipherment
extendedKeyUsage = serverAuth
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid, issuer
subjectAltName = $sans
EOF
  openssl x509 -req -sha256 -days "$days" -in "$tmp/$name.csr" -CA "$out/ca.crt" -CAkey "$out/ca.key" \
    -set_serial "0x$(openssl rand -hex 16)" -extfile "$tmp/$name.ext" -out "$out/$name.pem" 2>/dev/null
  openssl verify -CAfile "$out/ca.crt" "$out/$name.pem" >/dev/null
  echo "wrote $out/$name.pem, $out/$name.key (SAN $sans)"
}

sans="DNS:localhost,DNS:superlink,IP:127.0.0.1,IP:::1"
for extra in "$@"; do sans="$sans,$(san_entry "$extra")"; done
issue server superlink "$sans"

for node in $supernodes; do
  [[ $node =~ ^[A-Za-z0-9][A-Za-z0-9.-]*$ ]] || { echo "bad SuperNode name: $node" >&2; exit 1; }
  issue "$node" "$node" "DNS:$node,DNS:localhost,IP:127.0.0.1,IP:::1"
done

chmod 644 "$out"/ca.crt "$out"/*.pem
chmod 600 "$out"/*.key
echo "CA: $out/ca.crt  (containers run as uid 49999: see docs/deployment.md for file ownership)"
