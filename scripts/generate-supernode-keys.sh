#!/usr/bin/env bash
# SuperNode authentication keys for Flower 1.41 (`flower-superlink --enable-supernode-auth`).
#
# usage: scripts/generate-supernode-keys.sh [OUT_DIR] [NODE ...]
#   OUT_DIR  default: keys
#   NODE     default: supernode-1 supernode-2 (the compose service names)
#
# For each NODE writes OUT_DIR/NODE (private key, OpenSSH format, mode 600: stays on that node,
# `flower-supernode --auth-supernode-private-key OUT_DIR/NODE`) and OUT_DIR/NODE.pub (public key,
# registered with `flwr supernode register OUT_DIR/NODE.pub <connection>`). Flower accepts ECDSA
# keys on NIST curves; this makes ECDSA P-384. Existing keys are kept (a node's identity).
set -euo pipefail

out=${1:-keys}
shift || true
nodes=("$@")
[[ ${#nodes[@]} -gt 0 ]] || nodes=(supernode-1 supernode-2)

command -v ssh-keygen >/dev/null || {
  echo "generate-supernode-keys.sh: ssh-keygen is not installed (Debian: apt-get install openssh-client)" >&2
  exit 1
}
mkdir -p "$out"
for node in "${nodes[@]}"; do
  [[ $node =~ ^[A-Za-z0-9][A-Za-z0-9._-]*$ ]] || { echo "bad SuperNode name: $node" >&2; exit 1; }
  if [[ -e $out/$node ]]; then
    echo "keeping $out/$node"
  else
    ssh-keygen -q -t ecdsa -b 384 -N "" -C "$node" -f "$out/$node"
    echo "wrote $out/$node, $out/$node.pub"
  fi
done
