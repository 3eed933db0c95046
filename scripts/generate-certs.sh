#!/usr/bin/env bash
# Self-signed CA + SuperLink server certificate for Flower's TLS mode (research use).
# usage: scripts/generate-certs.sh [OUT_DIR=certificates] [EXTRA_SAN ...]
#   EXTRA_SAN: hostnames or IPs where SuperNodes reach the SuperLink (e.g. a public DNS name).
# Writes OUT_DIR/ca.crt, ca.key, server.pem, server.key. The SAN always covers localhost,
# 127.0.0.1, ::1 and `superlink` (the compose service name).
set -euo pipefail
out=${1:-certificates}
shift || true
mkdir -p "$out"
sans="DNS:localhost,DNS:superlink,IP:127.0.0.1,IP:::1"
for extra in "$@"; do
  if [[ $extra =~ ^[0-9.]+$ || $extra == *:* ]]; then sans="$sans,IP:$extra"; else sans="$sans,DNS:$extra"; fi
done
openssl req -x509 -newkey rsa:4096 -sha256 -days 365 -nodes -subj "/CN=fedsparse CA" \
  -keyout "$out/ca.key" -out "$out/ca.crt" 2>/dev/null
openssl req -newkey rsa:4096 -sha256 -nodes -subj "/CN=superlink" \
  -keyout "$out/server.key" -out "$out/server.csr" 2>/dev/null
printf 'subjectAltName=%s\nbasicConstraints=CA:FALSE\nkeyUsage=digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth\n' \
  "$sans" > "$out/server.ext"
openssl x509 -req -in "$out/server.csr" -CA "$out/ca.crt" -CAkey "$out/ca.key" -CAcreateserial \
  -days 365 -sha256 -extfile "$out/server.ext" -out "$out/server.pem" 2>/dev/null
rm -f "$out/server.csr" "$out/server.ext" "$out/ca.srl"
chmod 600 "$out"/*.key
echo "wrote $out/{ca.crt,ca.key,server.pem,server.key} (SAN: $sans)"
