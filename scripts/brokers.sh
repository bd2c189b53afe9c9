#!/usr/bin/env bash
# Installs, starts, stops and checks the brokers the tests use, all on loopback.
#
#   scripts/brokers.sh start   [broker...]   install what is missing, start what is stopped,
#                                            wait until each accepts connections, then print
#                                            `export BUS_TEST_<BROKER>_URL=...` lines on stdout
#   scripts/brokers.sh stop    [broker...]   stop them and wait until their ports close
#   scripts/brokers.sh restart [broker...]   stop, then start (as the broker-restart tests do)
#   scripts/brokers.sh status  [broker...]   say which are up; exit 1 if any is down
#   scripts/brokers.sh env     [broker...]   print the export lines only
#   scripts/brokers.sh check   [broker...]   run the checks of what the test servers are
#                                            patched for (sqs: moto's receive, see
#                                            scripts/moto_server.py); exit 1 if one fails
#
# With no broker named, all of them: nats rabbitmq redis postgres sqs kafka.
# Progress goes to stderr and the export lines to stdout, so that a caller can do
#   broker_env=$(scripts/brokers.sh start) && eval "$broker_env"
#
# Starting a broker that is already up does nothing. The start commands are the ones this
# machine kind uses to start its services; installs come from Debian's packages (needs root,
# or sudo).
set -euo pipefail

ALL_BROKERS=(nats rabbitmq redis postgres sqs kafka)
# A broker joins this list with five functions below: <name>_port, <name>_url, <name>_install,
# <name>_start, <name>_stop; optionally <name>_stale (the running broker must be restarted to
# read what _install configured), <name>_configure (run once it is up), <name>_env (more
# export lines) and <name>_check (for the check command).

START_TIMEOUT=${BUS_BROKER_START_TIMEOUT:-120}
STOP_TIMEOUT=${BUS_BROKER_STOP_TIMEOUT:-60}

say() { printf 'brokers: %s\n' "$*" >&2; }
die() {
    say "error: $*"
    exit 1
}

as_root() {
    if [ "$(id -u)" -eq 0 ]; then
        "$@"
    elif command -v sudo >/dev/null 2>&1; then
        sudo "$@"
    else
        die "'$*' needs root and sudo is not available"
    fi
}

APT_UPDATED=0
apt_install() {
    if [ "$APT_UPDATED" -eq 0 ]; then
        say "apt-get update"
        as_root env DEBIAN_FRONTEND=noninteractive apt-get update -q >&2 ||
            die "apt-get update failed"
        APT_UPDATED=1
    fi
    say "apt-get install $*"
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -q \
        -o Dpkg::Options::=--force-confdef -o Dpkg::Options::=--force-confold \
        --no-install-recommends "$@" </dev/null >&2 ||
        die "apt-get install $* failed"
}

# Whether something accepts TCP connections on 127.0.0.1:$1.
port_open() {
    timeout 2 bash -c "exec 3<>/dev/tcp/127.0.0.1/$1" 2>/dev/null
}

# Waits up to $3 seconds for 127.0.0.1:$2 to accept connections; $1 names the broker, $4 is a
# log file shown on failure.
wait_up() {
    local name=$1 port=$2 seconds=$3 log=${4:-}
    local deadline=$((SECONDS + seconds))
    until port_open "$port"; do
        if [ "$SECONDS" -ge "$deadline" ]; then
            say "$name did not accept connections on 127.0.0.1:$port within ${seconds}s"
            if [ -n "$log" ] && [ -r "$log" ]; then
                say "last lines of $log:"
                tail -n 20 "$log" >&2 || true
            fi
            exit 1
        fi
        sleep 0.5
    done
}

# Waits up to $3 seconds for 127.0.0.1:$2 to stop accepting connections.
wait_down() {
    local name=$1 port=$2 seconds=$3
    local deadline=$((SECONDS + seconds))
    while port_open "$port"; do
        if [ "$SECONDS" -ge "$deadline" ]; then
            die "$name still accepts connections on 127.0.0.1:$port after ${seconds}s"
        fi
        sleep 0.5
    done
}

# --- Throwaway certificates for the TLS tests ------------------------------------------------
# $TLS_DIR holds, in PEM: ca.pem/ca.key (the test CA), server.pem/server.key (CN localhost,
# for DNS localhost and IP 127.0.0.1), client.pem/client.key (CN bus-tls-client, a client
# certificate for mutual TLS and EXTERNAL login), and other-ca.pem/other-ca.key (a second CA
# that signed nothing here, for the wrong-CA tests). Made again when a file is missing or a
# certificate expires within a day.
TLS_DIR=${BUS_TEST_TLS_DIR:-/var/lib/bus-test-tls}
TLS_DAYS=365

tls_current() {
    local file
    for file in ca.pem ca.key server.pem server.key client.pem client.key other-ca.pem other-ca.key; do
        [ -s "$TLS_DIR/$file" ] || return 1
    done
    for file in ca.pem server.pem client.pem other-ca.pem; do
        openssl x509 -checkend 86400 -noout -in "$TLS_DIR/$file" >/dev/null 2>&1 || return 1
    done
}

# Makes the certificates if they are missing or expiring (and sets TLS_MADE=1 then).
TLS_MADE=0
tls_ensure() {
    command -v openssl >/dev/null 2>&1 || apt_install openssl
    tls_current && return 0
    say "generating throwaway TLS certificates in $TLS_DIR"
    local tmp
    tmp=$(mktemp -d)
    tls_make_ca "$tmp" ca "bus test CA"
    tls_make_ca "$tmp" other-ca "bus test CA (not trusted by anything)"
    tls_make_leaf "$tmp" server localhost \
        "subjectAltName=DNS:localhost,IP:127.0.0.1" "extendedKeyUsage=serverAuth"
    tls_make_leaf "$tmp" client "$RABBITMQ_EXTERNAL_USER" \
        "subjectAltName=DNS:$RABBITMQ_EXTERNAL_USER" "extendedKeyUsage=clientAuth"
    as_root mkdir -p "$TLS_DIR"
    as_root chmod 0755 "$TLS_DIR"
    local file
    for file in ca.pem server.pem client.pem other-ca.pem client.key; do
        as_root install -m 0644 "$tmp/$file" "$TLS_DIR/$file"
    done
    for file in ca.key other-ca.key; do
        as_root install -m 0600 "$tmp/$file" "$TLS_DIR/$file"
    done
    # The broker runs as its own user and reads its key itself.
    if getent group rabbitmq >/dev/null 2>&1; then
        as_root install -m 0640 -g rabbitmq "$tmp/server.key" "$TLS_DIR/server.key"
    else
        as_root install -m 0644 "$tmp/server.key" "$TLS_DIR/server.key"
    fi
    rm -rf "$tmp"
    TLS_MADE=1
}

# tls_make_ca DIR NAME SUBJECT_CN: DIR/NAME.pem and DIR/NAME.key, a self-signed CA (P-256).
tls_make_ca() {
    openssl req -x509 -new -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -sha256 \
        -days "$TLS_DAYS" -subj "/CN=$3" -keyout "$1/$2.key" -out "$1/$2.pem" \
        -addext "basicConstraints=critical,CA:TRUE" \
        -addext "keyUsage=critical,keyCertSign,cRLSign" >/dev/null 2>&1 ||
        die "openssl could not make the CA $2"
}

# tls_make_leaf DIR NAME CN SAN EKU: DIR/NAME.pem and DIR/NAME.key, signed by DIR/ca.
tls_make_leaf() {
    local dir=$1 name=$2 cn=$3 san=$4 eku=$5
    openssl req -new -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -sha256 \
        -subj "/CN=$cn" -keyout "$dir/$name.key" -out "$dir/$name.csr" >/dev/null 2>&1 ||
        die "openssl could not make the key of $name"
    printf '%s\n' "basicConstraints=critical,CA:FALSE" \
        "keyUsage=critical,digitalSignature" "$eku" "$san" >"$dir/$name.ext"
    openssl x509 -req -in "$dir/$name.csr" -CA "$dir/ca.pem" -CAkey "$dir/ca.key" \
        -set_serial "0x$(openssl rand -hex 16)" -days "$TLS_DAYS" -sha256 \
        -extfile "$dir/$name.ext" -out "$dir/$name.pem" >/dev/null 2>&1 ||
        die "openssl could not sign the certificate of $name"
}

# --- NATS with JetStream ------------------------------------------------------------------
NATS_BIN=/usr/sbin/nats-server
NATS_LOG=/var/log/nats-server.log
nats_port() { echo 4222; }
nats_url() { echo "nats://127.0.0.1:4222"; }
nats_install() { [ -x "$NATS_BIN" ] || apt_install nats-server; }
nats_start() {
    as_root mkdir -p /var/lib/nats-server
    as_root start-stop-daemon --start --oknodo --background --exec "$NATS_BIN" -- \
        -a 127.0.0.1 -p 4222 -js -sd /var/lib/nats-server -l "$NATS_LOG" >&2
    wait_up nats 4222 "$START_TIMEOUT" "$NATS_LOG"
}
nats_stop() {
    # JetStream keeps its data in /var/lib/nats-server, so a restart loses no stored message.
    as_root start-stop-daemon --stop --oknodo --retry TERM/30/KILL/5 --exec "$NATS_BIN" >&2
    wait_down nats 4222 "$STOP_TIMEOUT"
}

# --- RabbitMQ ---------------------------------------------------------------------------
RABBITMQ_LOG=/var/log/rabbitmq/startup_log
rabbitmq_port() { echo 5672; }
rabbitmq_url() { echo "amqp://guest:guest@127.0.0.1:5672/%2f"; }
rabbitmq_install() {
    if [ ! -x /usr/sbin/rabbitmq-server ]; then
        apt_install rabbitmq-server
    fi
    # Keep the broker, epmd and Erlang distribution on loopback (as this machine kind does);
    # files someone already wrote are left alone.
    if [ ! -e /etc/rabbitmq/rabbitmq.conf ]; then
        as_root mkdir -p /etc/rabbitmq
        echo "listeners.tcp.local = 127.0.0.1:5672" | as_root tee /etc/rabbitmq/rabbitmq.conf >/dev/null
    fi
    if [ ! -e /etc/rabbitmq/rabbitmq-env.conf ]; then
        printf '%s\n' 'NODENAME=rabbit@localhost' 'ERL_EPMD_ADDRESS=127.0.0.1' \
            'export ERL_FLAGS="-kernel inet_dist_use_interface {127,0,0,1}"' |
            as_root tee /etc/rabbitmq/rabbitmq-env.conf >/dev/null
    fi
    rabbitmq_tls_install
}
rabbitmq_start() {
    # The Debian wrapper switches to the rabbitmq user itself.
    as_root rabbitmq-server -detached >&2 </dev/null
    wait_up rabbitmq 5672 "$START_TIMEOUT" "$RABBITMQ_LOG"
    # The port opens before every plugin and vhost is ready; wait for the whole node.
    as_root timeout "$START_TIMEOUT" rabbitmqctl await_startup >&2 ||
        die "rabbitmq accepts connections but did not finish starting"
}
rabbitmq_stop() {
    # `rabbitmqctl stop` returns once the node has stopped. Durable queues and persistent
    # messages survive it.
    as_root timeout "$STOP_TIMEOUT" rabbitmqctl stop >&2 ||
        die "rabbitmqctl stop failed"
    wait_down rabbitmq 5672 "$STOP_TIMEOUT"
}

# TLS and authentication tests (adapter-rabbitmq/tests/tls.rs): a listener on
# 127.0.0.1:5671 with the throwaway certificates of $TLS_DIR, the client certificate asked for
# but not required (so password logins over TLS work as well), and SASL EXTERNAL (the
# rabbitmq_auth_mechanism_ssl plugin) logging in the user named by the certificate's CN. The
# plain listener on 5672 is not changed.
RABBITMQ_TLS_PORT=5671
RABBITMQ_TLS_USER=bus-tls-user
# Throwaway: a loopback-only test user, the password is printed by `env` anyway.
RABBITMQ_TLS_PASSWORD=bus-tls-password
RABBITMQ_EXTERNAL_USER=bus-tls-client
RABBITMQ_CONF=/etc/rabbitmq/rabbitmq.conf
RABBITMQ_PLUGINS_FILE=/etc/rabbitmq/enabled_plugins
# Set when this run changed what a running node has to be restarted to read.
RABBITMQ_RECONFIGURED=0

rabbitmq_tls_conf() {
    cat <<CONF
# bus-test-tls begin: written by scripts/brokers.sh (TLS listener and EXTERNAL login for tests)
listeners.ssl.local = 127.0.0.1:$RABBITMQ_TLS_PORT
ssl_options.cacertfile = $TLS_DIR/ca.pem
ssl_options.certfile = $TLS_DIR/server.pem
ssl_options.keyfile = $TLS_DIR/server.key
ssl_options.verify = verify_peer
ssl_options.fail_if_no_peer_cert = false
auth_mechanisms.1 = PLAIN
auth_mechanisms.2 = AMQPLAIN
auth_mechanisms.3 = EXTERNAL
ssl_cert_login_from = common_name
# bus-test-tls end
CONF
}

rabbitmq_tls_install() {
    tls_ensure
    # The node reads its certificates when it starts.
    [ "$TLS_MADE" -eq 0 ] || RABBITMQ_RECONFIGURED=1
    local wanted current
    wanted=$(rabbitmq_tls_conf)
    current=$(sed -n '/^# bus-test-tls begin/,/^# bus-test-tls end/p' "$RABBITMQ_CONF")
    if [ "$current" != "$wanted" ]; then
        say "writing the TLS listener on 127.0.0.1:$RABBITMQ_TLS_PORT into $RABBITMQ_CONF"
        local conf
        conf=$(sed '/^# bus-test-tls begin/,/^# bus-test-tls end/d' "$RABBITMQ_CONF")
        printf '%s\n%s\n' "$conf" "$wanted" | as_root tee "$RABBITMQ_CONF" >/dev/null
        RABBITMQ_RECONFIGURED=1
    fi
    if ! grep -qs rabbitmq_auth_mechanism_ssl "$RABBITMQ_PLUGINS_FILE"; then
        say "enabling the rabbitmq_auth_mechanism_ssl plugin (SASL EXTERNAL)"
        as_root rabbitmq-plugins enable --offline rabbitmq_auth_mechanism_ssl >&2 ||
            die "rabbitmq-plugins enable rabbitmq_auth_mechanism_ssl failed"
        RABBITMQ_RECONFIGURED=1
    fi
}

# Whether the running node has to be restarted to serve what rabbitmq_install configured.
rabbitmq_stale() {
    [ "$RABBITMQ_RECONFIGURED" -eq 1 ] || ! port_open "$RABBITMQ_TLS_PORT"
}

# The test users, made once (they live in the node's database, across restarts). To reset
# one, delete it (`rabbitmqctl delete_user bus-tls-user`) and run `scripts/brokers.sh start`.
rabbitmq_configure() {
    wait_up rabbitmq "$RABBITMQ_TLS_PORT" "$START_TIMEOUT" "$RABBITMQ_LOG"
    local users
    users=$(as_root rabbitmqctl list_users -q --no-table-headers 2>/dev/null | cut -f1) ||
        die "rabbitmqctl list_users failed"
    if ! grep -qx "$RABBITMQ_TLS_USER" <<<"$users"; then
        say "adding the RabbitMQ user $RABBITMQ_TLS_USER (password login over TLS)"
        as_root rabbitmqctl add_user "$RABBITMQ_TLS_USER" "$RABBITMQ_TLS_PASSWORD" >&2
        as_root rabbitmqctl set_permissions -p / "$RABBITMQ_TLS_USER" '.*' '.*' '.*' >&2
    fi
    if ! grep -qx "$RABBITMQ_EXTERNAL_USER" <<<"$users"; then
        say "adding the RabbitMQ user $RABBITMQ_EXTERNAL_USER (EXTERNAL login, no password)"
        as_root rabbitmqctl add_user "$RABBITMQ_EXTERNAL_USER" "$(openssl rand -hex 24)" >&2
        as_root rabbitmqctl clear_password "$RABBITMQ_EXTERNAL_USER" >&2
        as_root rabbitmqctl set_permissions -p / "$RABBITMQ_EXTERNAL_USER" '.*' '.*' '.*' >&2
    fi
}

rabbitmq_env() {
    printf 'export BUS_TEST_RABBITMQ_TLS_URL=%q\n' \
        "amqps://$RABBITMQ_TLS_USER:$RABBITMQ_TLS_PASSWORD@127.0.0.1:$RABBITMQ_TLS_PORT/%2f"
    printf 'export BUS_TEST_TLS_DIR=%q\n' "$TLS_DIR"
}

# --- Redis (idempotency store) ------------------------------------------------------------
REDIS_LOG=/var/log/redis/ci.log
redis_port() { echo 6379; }
redis_url() { echo "redis://127.0.0.1:6379"; }
redis_install() { command -v redis-server >/dev/null 2>&1 || apt_install redis-server; }
redis_start() {
    as_root mkdir -p /var/lib/redis /var/log/redis
    as_root redis-server --daemonize yes --bind 127.0.0.1 -::1 --port 6379 --save "" \
        --appendonly no --dir /var/lib/redis --logfile "$REDIS_LOG" >&2
    wait_up redis 6379 "$START_TIMEOUT" "$REDIS_LOG"
}
redis_stop() {
    redis-cli -h 127.0.0.1 -p 6379 shutdown nosave >&2 || true
    wait_down redis 6379 "$STOP_TIMEOUT"
}

# --- PostgreSQL (idempotency store) ---------------------------------------------------------
postgres_port() { echo 5432; }
postgres_url() { echo "postgres://postgres@127.0.0.1:5432/test"; }
postgres_version() {
    { find /etc/postgresql -mindepth 1 -maxdepth 1 -type d -printf '%f\n' 2>/dev/null || true; } |
        sort -V | tail -n 1
}
postgres_install() {
    local fresh=0
    if ! command -v pg_ctlcluster >/dev/null 2>&1 || [ -z "$(postgres_version)" ]; then
        apt_install postgresql
        fresh=1
    fi
    local version
    version=$(postgres_version)
    [ -n "$version" ] || die "postgresql is installed but has no cluster in /etc/postgresql"
    if [ "$fresh" -eq 1 ]; then
        # The tests connect as postgres without a password, over TCP on loopback only.
        local hba=/etc/postgresql/$version/main/pg_hba.conf
        as_root sed -i '1i host all all 127.0.0.1/32 trust\nhost all all ::1/128 trust' "$hba"
    fi
}
postgres_start() {
    local version
    version=$(postgres_version)
    as_root pg_ctlcluster --skip-systemctl-redirect "$version" main start >&2
    wait_up postgres 5432 "$START_TIMEOUT" "/var/log/postgresql/postgresql-$version-main.log"
    # The tests use the database `test`.
    if ! as_root runuser -u postgres -- psql -tAq -c "SELECT 1 FROM pg_database WHERE datname = 'test'" | grep -q 1; then
        as_root runuser -u postgres -- createdb test >&2 || die "could not create database test"
    fi
}
postgres_stop() {
    as_root pg_ctlcluster --skip-systemctl-redirect "$(postgres_version)" main stop >&2 || true
    wait_down postgres 5432 "$STOP_TIMEOUT"
}

# --- SQS and SNS (moto in server mode) ------------------------------------------------------
# moto keeps everything in memory: a restart loses every queue, topic and message.
SQS_LOG=/var/log/moto-server.log
SQS_PID=/run/moto-server.pid
sqs_port() { echo 4566; }
sqs_url() { echo "sqs://127.0.0.1:4566?region=us-east-1"; }
sqs_install() {
    command -v moto_server >/dev/null 2>&1 && return 0
    command -v pip >/dev/null 2>&1 || command -v pip3 >/dev/null 2>&1 || apt_install python3-pip
    say "pip install 'moto[server]'"
    local pip
    pip=$(command -v pip || command -v pip3)
    "$pip" install -q 'moto[server]' >&2 || "$pip" install -q --break-system-packages 'moto[server]' >&2 ||
        die "pip install 'moto[server]' failed"
    hash -r
    command -v moto_server >/dev/null 2>&1 || die "moto_server is not on PATH after pip install"
}
# The Python that has moto (the one moto_server's #! line names, else python3 or python), to
# run scripts/moto_server.py with: moto's server with ReceiveMessage made atomic per queue, as
# SQS's is (see that file).
sqs_python() {
    local line py candidates=()
    line=$(head -n 1 "$(command -v moto_server)")
    case $line in
    '#!'*python*) candidates+=("${line#\#!}") ;;
    esac
    candidates+=(python3 python)
    for py in "${candidates[@]}"; do
        # Unquoted: a #! line may be `/usr/bin/env python3`.
        # shellcheck disable=SC2086
        if $py -c 'import moto.server' 2>/dev/null; then
            echo "$py"
            return 0
        fi
    done
    die "no Python here imports moto.server (pip install 'moto[server]')"
}
SQS_LAUNCHER="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/moto_server.py"
sqs_start() {
    mkdir -p "$(dirname "$SQS_LOG")"
    local py
    py=$(sqs_python)
    # setsid: the server outlives this script and the shell that ran it.
    # shellcheck disable=SC2086
    setsid $py "$SQS_LAUNCHER" -H 127.0.0.1 -p 4566 >"$SQS_LOG" 2>&1 </dev/null &
    echo $! >"$SQS_PID"
    wait_up sqs 4566 "$START_TIMEOUT" "$SQS_LOG"
}
# The pid of what listens on 127.0.0.1:<port>, where `ss` can say (empty otherwise).
listener_pid() {
    command -v ss >/dev/null 2>&1 || return 0
    ss -ltnp "sport = :$1" 2>/dev/null | grep -o 'pid=[0-9]*' | head -n 1 | cut -d= -f2 || true
}
# The command line of process <pid>, arguments joined by spaces (fails if there is none).
cmdline_of() {
    tr '\0' ' ' 2>/dev/null <"/proc/$1/cmdline"
}
# The patch works (moto_server.py --check), and the server the tests use runs it.
sqs_check() {
    local py pid
    py=$(sqs_python)
    # shellcheck disable=SC2086
    $py "$SQS_LAUNCHER" --check
    pid=$(listener_pid 4566)
    [ -n "$pid" ] || pid=$(cat "$SQS_PID" 2>/dev/null || true)
    if [ -n "$pid" ] && [[ $(cmdline_of "$pid") == *moto_server.py* ]]; then
        say "sqs: the server on 127.0.0.1:4566 (pid $pid) runs scripts/moto_server.py"
    else
        die "sqs: the server on 127.0.0.1:4566 does not run scripts/moto_server.py (stop it, then scripts/brokers.sh start sqs)"
    fi
}
# A moto started by an earlier version of this script, as plain moto_server, is restarted.
sqs_stale() {
    local cmdline
    [ -s "$SQS_PID" ] || return 1
    cmdline=$(cmdline_of "$(cat "$SQS_PID")") || return 1
    # Only a plain moto_server: a pid reused by another process is left alone.
    [[ $cmdline == *moto_server* && $cmdline != *moto_server.py* ]]
}
sqs_stop() {
    if [ -s "$SQS_PID" ] && kill -0 "$(cat "$SQS_PID")" 2>/dev/null; then
        kill "$(cat "$SQS_PID")" 2>/dev/null || true
    else
        say "no moto_server pid in $SQS_PID; stop the process serving 127.0.0.1:4566 by hand"
    fi
    wait_down sqs 4566 "$STOP_TIMEOUT"
    rm -f "$SQS_PID"
}

# --- Kafka (tansu, a Kafka-API broker from crates.io) ----------------------------------------
# Installed with cargo (about 25 minutes cold on 2 cores; an installed binary is reused).
# Storage: BUS_KAFKA_STORAGE=memory (default: fast, a restart loses everything), sqlite
# (/var/lib/tansu/tansu.db, survives restarts, slow), or a tansu storage URL.
KAFKA_LOG=/var/log/tansu.log
KAFKA_PID=/run/tansu.pid
kafka_port() { echo 9092; }
kafka_url() { echo "kafka://127.0.0.1:9092"; }
kafka_bin() { command -v tansu 2>/dev/null || echo "$HOME/.cargo/bin/tansu"; }
kafka_install() {
    # The Kafka adapter builds librdkafka with TLS against the system's OpenSSL (rdkafka's `ssl`
    # feature, see Cargo.toml): every build of the workspace needs these, and test.sh starts the
    # brokers before it builds anything.
    dpkg -s libssl-dev pkg-config >/dev/null 2>&1 || apt_install libssl-dev pkg-config
    [ -x "$(kafka_bin)" ] && return 0
    command -v cargo >/dev/null 2>&1 || die "cargo is needed to install tansu"
    say "cargo install tansu --locked --features dynostore,libsql (about 25 minutes cold)"
    cargo install tansu --locked --features dynostore,libsql >&2 || die "cargo install tansu failed"
    [ -x "$(kafka_bin)" ] || die "tansu is not in PATH or ~/.cargo/bin after cargo install"
}
kafka_start() {
    local storage=${BUS_KAFKA_STORAGE:-memory}
    case $storage in
    memory) storage=memory://tansu/ ;;
    sqlite)
        mkdir -p /var/lib/tansu
        storage=sqlite:///var/lib/tansu/tansu.db
        ;;
    esac
    mkdir -p "$(dirname "$KAFKA_LOG")"
    # setsid: the broker outlives this script and the shell that ran it. tansu reads the path
    # of a sqlite:// URL relative to its working directory: start it in /.
    local here=$PWD bin
    bin=$(kafka_bin)
    cd /
    setsid "$bin" broker --listener-url tcp://127.0.0.1:9092 \
        --advertised-listener-url tcp://localhost:9092 --storage-engine "$storage" \
        >"$KAFKA_LOG" 2>&1 </dev/null &
    echo $! >"$KAFKA_PID"
    cd "$here"
    wait_up kafka 9092 "$START_TIMEOUT" "$KAFKA_LOG"
}
kafka_stop() {
    if [ -s "$KAFKA_PID" ] && kill -0 "$(cat "$KAFKA_PID")" 2>/dev/null; then
        kill "$(cat "$KAFKA_PID")" 2>/dev/null || true
    else
        say "no tansu pid in $KAFKA_PID; stop the process serving 127.0.0.1:9092 by hand"
    fi
    wait_down kafka 9092 "$STOP_TIMEOUT"
    rm -f "$KAFKA_PID"
}

# --- commands -----------------------------------------------------------------------------
env_line() {
    local name=$1
    printf 'export BUS_TEST_%s_URL=%q\n' "$(echo "$name" | tr '[:lower:]' '[:upper:]')" "$("${name}_url")"
    # A broker may export more (<name>_env), e.g. RabbitMQ's TLS listener.
    if declare -F "${name}_env" >/dev/null; then "${name}_env"; fi
}

start_one() {
    local name=$1 port
    port=$("${name}_port")
    "${name}_install"
    if port_open "$port" && declare -F "${name}_stale" >/dev/null && "${name}_stale"; then
        # Its configuration changed (<name>_install said so): one restart to read it.
        say "$name runs with an older configuration; restarting it"
        "${name}_stop"
    fi
    if port_open "$port"; then
        say "$name is already running on 127.0.0.1:$port"
    else
        say "starting $name"
        "${name}_start"
        say "$name is up on 127.0.0.1:$port"
    fi
    # What needs the broker up (users, say): <name>_configure, if the broker has one.
    if declare -F "${name}_configure" >/dev/null; then "${name}_configure"; fi
}

stop_one() {
    local name=$1 port
    port=$("${name}_port")
    if port_open "$port"; then
        say "stopping $name"
        "${name}_stop"
        say "$name stopped"
    else
        say "$name is not running"
    fi
}

usage() {
    awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0" >&2
    exit 2
}

main() {
    [ $# -ge 1 ] || usage
    local command=$1
    shift
    local brokers=("$@")
    [ ${#brokers[@]} -gt 0 ] || brokers=("${ALL_BROKERS[@]}")
    local name known
    for name in "${brokers[@]}"; do
        known=0
        for k in "${ALL_BROKERS[@]}"; do [ "$k" = "$name" ] && known=1; done
        [ "$known" -eq 1 ] || die "unknown broker '$name' (known: ${ALL_BROKERS[*]})"
    done

    case $command in
    start)
        for name in "${brokers[@]}"; do start_one "$name"; done
        for name in "${brokers[@]}"; do env_line "$name"; done
        ;;
    stop)
        for name in "${brokers[@]}"; do stop_one "$name"; done
        ;;
    restart)
        for name in "${brokers[@]}"; do
            stop_one "$name"
            start_one "$name"
        done
        for name in "${brokers[@]}"; do env_line "$name"; done
        ;;
    status)
        local down=0 port
        for name in "${brokers[@]}"; do
            port=$("${name}_port")
            if port_open "$port"; then
                printf '%-9s up     %s\n' "$name" "$("${name}_url")"
            else
                printf '%-9s DOWN   (nothing on 127.0.0.1:%s)\n' "$name" "$port"
                down=1
            fi
        done
        return "$down"
        ;;
    env)
        for name in "${brokers[@]}"; do env_line "$name"; done
        ;;
    check)
        for name in "${brokers[@]}"; do
            if declare -F "${name}_check" >/dev/null; then "${name}_check"; fi
        done
        ;;
    -h | --help | help) usage ;;
    *) die "unknown command '$command' (start, stop, restart, status, env, check)" ;;
    esac
}

main "$@"
