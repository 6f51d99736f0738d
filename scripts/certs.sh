#!/usr/bin/env bash
# Throwaway certificates for the TLS tests (Kafka SSL/SASL_SSL, PostgreSQL,
# MariaDB, moto over HTTPS, director RPC and HTTPS ingest), made with the
# openssl CLI. Test material only: the keys are unencrypted PKCS#8 PEM and
# every file is mode 0644 (scripts/sql.sh gives PostgreSQL its own 0600 copy).
#
#   scripts/certs.sh <dir>
#       Write into <dir> (nothing is done if <dir>/done exists):
#         ca.pem ca.key                 CA "sluice test CA" (10 years)
#         wrongca.pem wrongca.key       another CA, "sluice wrong CA"
#         server.pem server.key         CN=localhost, SAN DNS:localhost,IP:127.0.0.1,
#                                       EKU serverAuth,clientAuth, signed by ca
#         server2.pem server2.key       a second server pair (own key, other
#                                       serial, same names) for reload tests
#         client.pem client.key         CN=sluice-route, EKU clientAuth, signed by ca
#         expired.pem                   server.key's certificate, same names,
#                                       valid 2020-01-01..2021-01-01 only
#         wrongca-server.pem            server.key's certificate signed by wrongca
#         server-keystore.pem           server.key + server.pem (Kafka PEM keystore)
#         client-keystore.pem           client.key + client.pem (Kafka CLI clients)
#       Every certificate is checked with `openssl verify` before <dir>/done is
#       written. Prints SLUICE_TEST_CERT_DIR=<absolute dir>.
source "$(dirname "$0")/common.sh"

usage() {
  sed -n '2,/^source /p' "$0" | sed -e '/^source /d' -e 's/^# \{0,1\}//' >&2
  exit 2
}

[ $# -eq 1 ] || usage
command -v openssl >/dev/null || apt_ensure openssl
mkdir -p "$1"
DIR="$(cd "$1" && pwd)"

# Two callers at once (e.g. parallel tests) must not interleave.
exec 9>"$DIR/.lock"
flock 9
if [ -f "$DIR/done" ]; then
  echo "SLUICE_TEST_CERT_DIR=$DIR"
  exit 0
fi

log "generating test certificates in $DIR"
TMP="$(mktemp -d "$DIR/.tmp.XXXXXX")"
trap 'rm -rf "$TMP"' EXIT
cd "$TMP"

ossl() {  # openssl, quiet unless it fails
  local out
  out="$(openssl "$@" 2>&1)" || { log "openssl $1 failed:"; printf '%s\n' "$out" >&2; exit 1; }
}

# new_ca NAME CN: a self-signed CA certificate NAME.pem with key NAME.key
new_ca() {
  ossl req -x509 -newkey rsa:2048 -nodes -keyout "$1.key" -out "$1.pem" -days 3650 \
    -subj "/CN=$2" -addext basicConstraints=critical,CA:TRUE \
    -addext keyUsage=critical,keyCertSign,cRLSign
}

# new_csr NAME CN: key NAME.key (PKCS#8) and request NAME.csr
new_csr() {
  ossl req -newkey rsa:2048 -nodes -keyout "$1.key" -out "$1.csr" -subj "/CN=$2"
}

# sign CSR CA EXT OUT: OUT signed by CA (825 days); each CA's serial file
# counts up, so no two certificates of a CA share a serial
sign() {
  ossl x509 -req -in "$1" -CA "$2.pem" -CAkey "$2.key" -CAserial "$2.srl" -CAcreateserial \
    -days 825 -sha256 -extfile "$3" -out "$4"
}

cat >server.ext <<'EOF'
basicConstraints=CA:FALSE
keyUsage=critical,digitalSignature,keyEncipherment
subjectAltName=DNS:localhost,IP:127.0.0.1
extendedKeyUsage=serverAuth,clientAuth
EOF
cat >client.ext <<'EOF'
basicConstraints=CA:FALSE
keyUsage=critical,digitalSignature,keyEncipherment
extendedKeyUsage=clientAuth
EOF

new_ca ca "sluice test CA"
new_ca wrongca "sluice wrong CA"
new_csr server localhost
sign server.csr ca server.ext server.pem
new_csr server2 localhost
sign server2.csr ca server.ext server2.pem
new_csr client sluice-route
sign client.csr ca client.ext client.pem
sign server.csr wrongca server.ext wrongca-server.pem

# OpenSSL 3.0's `x509 -req` cannot set a start date in the past: `openssl ca`
# with a minimal configuration can.
mkdir ca-db
: >ca-db/index.txt
echo 1000 >ca-db/serial
cat >ca.cnf <<EOF
[ ca ]
default_ca = test_ca
[ test_ca ]
database = $TMP/ca-db/index.txt
serial = $TMP/ca-db/serial
new_certs_dir = $TMP/ca-db
default_md = sha256
unique_subject = no
policy = policy_any
[ policy_any ]
commonName = supplied
EOF
ossl ca -batch -notext -config ca.cnf -cert ca.pem -keyfile ca.key -in server.csr \
  -startdate 20200101000000Z -enddate 20210101000000Z -extfile server.ext -out expired.pem

cat server.key server.pem >server-keystore.pem
cat client.key client.pem >client-keystore.pem

# Checks: the chains, the expiry, the wrong CA, and that each key fits its certificate.
expect_ok() {  # expect_ok CA CERT [openssl verify options]
  local ca="$1" cert="$2" out
  shift 2
  out="$(openssl verify "$@" -CAfile "$ca" "$cert" 2>&1)" ||
    { log "check failed: $cert does not verify against $ca: $out"; exit 1; }
}
expect_fail() {  # expect_fail CA CERT TEXT: verification fails, saying TEXT
  local out
  if out="$(openssl verify -CAfile "$1" "$2" 2>&1)"; then
    log "check failed: $2 verifies against $1 but must not"; exit 1
  fi
  grep -q "$3" <<<"$out" || { log "check failed: $2 against $1: expected '$3', got: $out"; exit 1; }
}
same_key() {  # same_key KEY CERT
  [ "$(openssl pkey -in "$1" -pubout 2>/dev/null)" = "$(openssl x509 -in "$2" -noout -pubkey 2>/dev/null)" ] ||
    { log "check failed: $1 is not the key of $2"; exit 1; }
}
for f in ca.key wrongca.key server.key server2.key client.key; do
  head -n 1 "$f" | grep -q -- '-----BEGIN PRIVATE KEY-----' || { log "check failed: $f is not unencrypted PKCS#8"; exit 1; }
done
expect_ok ca.pem ca.pem
expect_ok wrongca.pem wrongca.pem
expect_ok ca.pem server.pem -purpose sslserver -verify_hostname localhost
expect_ok ca.pem server.pem -purpose sslserver -verify_ip 127.0.0.1
expect_ok ca.pem server2.pem -purpose sslserver -verify_ip 127.0.0.1
expect_ok ca.pem client.pem -purpose sslclient
expect_ok ca.pem expired.pem -no_check_time -purpose sslserver -verify_ip 127.0.0.1
expect_fail ca.pem expired.pem "certificate has expired"
expect_ok wrongca.pem wrongca-server.pem -purpose sslserver -verify_ip 127.0.0.1
expect_fail ca.pem wrongca-server.pem "unable to get local issuer certificate"
same_key server.key server.pem
same_key server.key expired.pem
same_key server.key wrongca-server.pem
same_key server2.key server2.pem
same_key client.key client.pem
[ "$(openssl x509 -in server.pem -noout -serial)" != "$(openssl x509 -in server2.pem -noout -serial)" ] ||
  { log "check failed: server.pem and server2.pem share a serial"; exit 1; }

files=(ca.pem ca.key wrongca.pem wrongca.key server.pem server.key server2.pem server2.key
  client.pem client.key expired.pem wrongca-server.pem server-keystore.pem client-keystore.pem)
chmod 0644 "${files[@]}"
mv -f "${files[@]}" "$DIR/"
date -u +%Y-%m-%dT%H:%M:%SZ >"$DIR/done"
log "test certificates ready in $DIR"
echo "SLUICE_TEST_CERT_DIR=$DIR"
