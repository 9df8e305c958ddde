#!/usr/bin/env bash
# A throwaway ES256 chain for C2PA content credentials: a test root CA and a signing
# certificate issued by it. UNTRUSTED: no verifier's trust list holds this root, so
# `facegate verify` reports "untrusted" (pass --trust-anchors OUT/root.pem to trust it).
# Production uses a certificate from a CA on the C2PA trust list, mounted from a Secret.
#
#   deploy/c2pa-test-chain.sh OUT    ->  OUT/chain.pem (FACEGATE_C2PA_CERT),
#                                        OUT/signer.key (FACEGATE_C2PA_KEY, 0600),
#                                        OUT/root.pem (the test root, for verifiers)
set -euo pipefail
out=${1:?usage: $0 OUT_DIR}
days=${C2PA_TEST_CHAIN_DAYS:-365}
umask 077
mkdir -p "$out"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

# C2PA signing certificates: X.509 v3, keyUsage digitalSignature (critical), an extended
# key usage (emailProtection is on the C2PA list), not a CA, issued by a CA (not self-signed).
cat > "$work/ext.cnf" <<'CNF'
[req]
distinguished_name = dn
[dn]
[root]
basicConstraints = critical, CA:TRUE
keyUsage = critical, keyCertSign, cRLSign
subjectKeyIdentifier = hash
[signer]
basicConstraints = critical, CA:FALSE
keyUsage = critical, digitalSignature
extendedKeyUsage = emailProtection
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid:always
CNF

openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out "$work/root.key" 2>/dev/null
openssl req -new -x509 -sha256 -days "$days" -key "$work/root.key" -config "$work/ext.cnf" \
  -extensions root -subj "/O=facegate/CN=facegate UNTRUSTED test root" -out "$work/root.pem"
openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out "$work/signer.key" 2>/dev/null
openssl req -new -sha256 -key "$work/signer.key" -config "$work/ext.cnf" \
  -subj "/O=facegate/CN=facegate UNTRUSTED test signer" -out "$work/signer.csr"
openssl x509 -req -sha256 -days "$days" -in "$work/signer.csr" -CA "$work/root.pem" \
  -CAkey "$work/root.key" -set_serial "0x$(openssl rand -hex 16)" -extfile "$work/ext.cnf" \
  -extensions signer -out "$work/signer.pem" 2>/dev/null

# The root's key is not kept: this chain is for showing the feature, never for reissuing.
install -m 0644 "$work/signer.pem" "$out/chain.pem"
install -m 0644 "$work/root.pem" "$out/root.pem"
install -m 0600 "$work/signer.key" "$out/signer.key"
echo "C2PA test chain (UNTRUSTED) in $out: chain.pem, signer.key, root.pem"
