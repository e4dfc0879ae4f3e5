# shellcheck shell=bash
# Helpers shared by ops/ scripts: make sure the local services and tools the
# twofold test suite talks to (PostgreSQL, NATS JetStream, oathtool, zbarimg,
# Debian python3 + aiosmtpd, Chromium + chromedriver) are installed and running.
#
# Usage: source this file, then call ensure_postgres / ensure_nats /
# ensure_packages PKG... / ensure_test_peers / ensure_schemathesis. Each returns non-zero after
# printing a "twofold: ..." message on stderr that says what to do by hand.

set -euo pipefail

# Connection strings. The Rust tests read the TWOFOLD_TEST_* variables; the
# admin URL is used to create one fresh database per test. Defaults are the
# local services managed below (literal defaults, not derived from
# DATABASE_URL, so tests never create databases somewhere unexpected).
export DATABASE_URL="${DATABASE_URL:-postgres://postgres@127.0.0.1:5432/postgres}"
export NATS_URL="${NATS_URL:-nats://127.0.0.1:4222}"
export TWOFOLD_TEST_DATABASE_URL="${TWOFOLD_TEST_DATABASE_URL:-postgres://postgres@127.0.0.1:5432/postgres}"
export TWOFOLD_TEST_NATS_URL="${TWOFOLD_TEST_NATS_URL:-nats://127.0.0.1:4222}"

# CI runs with no stdin: never let apt, sudo or psql wait for an answer.
export DEBIAN_FRONTEND=noninteractive

# Set once apt-get update has run; exported so ops/test -> ops/deps shares it
# (not TWOFOLD_...: the binary reads those as settings, and warns at one it
# does not know).
export OPS_APT_UPDATED="${OPS_APT_UPDATED:-0}"

# "host port" of a URL such as postgres://user:pw@host:port/db or
# nats://host:port (the first of a comma-separated list), with the default
# port when it names none. IPv6 hosts in brackets lose the brackets.
twofold_url_host_port() { # url default_port
    local rest=${1#*://} host port
    rest=${rest%%,*}
    rest=${rest%%/*}
    rest=${rest%%\?*}
    rest=${rest##*@}
    if [[ $rest =~ ^\[([^]]*)\](:([0-9]+))?$ ]]; then
        host=${BASH_REMATCH[1]} port=${BASH_REMATCH[3]}
    elif [[ $rest =~ ^([^:]*)(:([0-9]+))?$ ]]; then
        host=${BASH_REMATCH[1]} port=${BASH_REMATCH[3]}
    else
        host=$rest port=
    fi
    echo "${host:-127.0.0.1} ${port:-$2}"
}

# The probes and the services started here follow the test URLs.
read -r TWOFOLD_PG_HOST TWOFOLD_PG_PORT < <(twofold_url_host_port "$TWOFOLD_TEST_DATABASE_URL" 5432)
read -r TWOFOLD_NATS_HOST TWOFOLD_NATS_PORT < <(twofold_url_host_port "$TWOFOLD_TEST_NATS_URL" 4222)

# Whether a host is this machine (only then do we start or configure it).
twofold_is_local() {
    [[ $1 == 127.* || $1 == localhost || $1 == ::1 ]]
}
# How long to wait for a service we just started to answer.
TWOFOLD_WAIT_SECONDS="${TWOFOLD_WAIT_SECONDS:-30}"

twofold_say() { printf 'twofold: %s\n' "$*" >&2; }

# Run a command as root: directly if we are root, via passwordless sudo
# otherwise. Returns 126 (without running anything) if neither is possible.
twofold_as_root() {
    if [[ $EUID -eq 0 ]]; then
        "$@"
    elif command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
        sudo -n "$@"
    else
        return 126
    fi
}

twofold_can_root() {
    [[ $EUID -eq 0 ]] || { command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; }
}

# Bounded TCP probe; plain bash, so it works without nc or pg_isready.
twofold_tcp_open() {
    timeout 3 bash -c 'exec 3<>"/dev/tcp/$1/$2"' _ "$1" "$2" 2>/dev/null
}

# Poll "$@" once a second until it succeeds or TWOFOLD_WAIT_SECONDS pass.
twofold_wait_for() {
    local i
    for ((i = 0; i < TWOFOLD_WAIT_SECONDS; i++)); do
        "$@" && return 0
        sleep 1
    done
    "$@"
}

# apt-get update at most once per run (it is slow and hits the network).
twofold_apt_update() {
    [[ $OPS_APT_UPDATED == 1 ]] && return 0
    twofold_say "running apt-get update"
    # apt's chatter goes to stderr so stdout stays a clean summary.
    twofold_as_root apt-get update -q >&2 || return 1
    OPS_APT_UPDATED=1
}

# ensure_packages PKG...: install those Debian packages that are missing.
ensure_packages() {
    local pkg missing=()
    for pkg in "$@"; do
        if [[ $(dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null || true) != "install ok installed" ]]; then
            missing+=("$pkg")
        fi
    done
    ((${#missing[@]} == 0)) && return 0

    if ! command -v apt-get >/dev/null 2>&1 || ! twofold_can_root; then
        twofold_say "missing Debian packages: ${missing[*]}; apt-get is not available or you are not root (and passwordless sudo is not set up): install them (sudo apt-get install ${missing[*]}), then rerun"
        return 1
    fi
    twofold_apt_update || {
        twofold_say "apt-get update failed (see output above); fix the apt sources/network, or install ${missing[*]} by hand, then rerun"
        return 1
    }
    twofold_say "installing ${missing[*]}"
    twofold_as_root apt-get install -y -q --no-install-recommends "${missing[@]}" >&2 || {
        twofold_say "apt-get install ${missing[*]} failed (see output above); install them by hand, then rerun"
        return 1
    }
}

# ------------------------------------------------------------- build tools

# A C compiler and linker (Rust links through `cc`; a few crates compile C)
# and cargo. gcc is installed with apt when missing; cargo is not (it comes
# from rustup, per user), so its absence is a message saying how.
ensure_build_tools() {
    if ! command -v cc >/dev/null 2>&1; then
        twofold_say "no C compiler ('cc'): Rust needs one to link; installing gcc and libc6-dev"
        ensure_packages gcc libc6-dev || {
            twofold_say "install a C compiler by hand (sudo apt-get install gcc libc6-dev), then rerun"
            return 1
        }
    fi
    if ! command -v cargo >/dev/null 2>&1; then
        if [[ -x $HOME/.cargo/bin/cargo ]]; then
            export PATH="$HOME/.cargo/bin:$PATH"
        else
            twofold_say "cargo is missing: install Rust with rustup (curl --proto '=https' --tlsv1.2 -sSf https://sh.rustup.rs | sh -s -- -y --profile minimal -c rustfmt,clippy; on Debian 13 also: sudo apt-get install rustup && rustup default stable), open a new shell (or: source \$HOME/.cargo/env), then rerun"
            return 1
        fi
    fi
}

# ---------------------------------------------------------------- PostgreSQL

twofold_pg_answers() {
    if command -v pg_isready >/dev/null 2>&1; then
        pg_isready -q -h "$TWOFOLD_PG_HOST" -p "$TWOFOLD_PG_PORT" -t 3
    else
        twofold_tcp_open "$TWOFOLD_PG_HOST" "$TWOFOLD_PG_PORT"
    fi
}

twofold_pg_installed() {
    compgen -G '/usr/lib/postgresql/*/bin/postgres' >/dev/null || command -v pg_ctlcluster >/dev/null 2>&1
}

# Newest Debian cluster version that has a "main" cluster, e.g. "15".
twofold_pg_version() {
    local d
    for d in /etc/postgresql/*/main; do
        if [[ -d $d ]]; then basename "$(dirname "$d")"; fi
    done | sort -V | tail -n 1
}

twofold_pg_start() {
    local ver
    ver=$(twofold_pg_version)
    twofold_say "PostgreSQL is installed but not answering on $TWOFOLD_PG_HOST:$TWOFOLD_PG_PORT; starting it"
    # No systemd in containers/CI: bypass the systemctl redirect.
    if [[ -n $ver ]] && command -v pg_ctlcluster >/dev/null 2>&1 &&
        twofold_as_root pg_ctlcluster --skip-systemctl-redirect "$ver" main start; then
        return 0
    fi
    twofold_as_root service postgresql start
}

# Make 127.0.0.1/::1 trust-authenticated for a cluster we just installed
# (Debian defaults to scram-sha-256, and the tests connect without password).
# pg_hba.conf is first-match, so prepend the rules.
twofold_pg_trust_local() {
    local ver hba tmp
    ver=$(twofold_pg_version)
    hba="/etc/postgresql/$ver/main/pg_hba.conf"
    [[ -n $ver && -f $hba ]] || return 1
    tmp=$(mktemp)
    {
        echo "# Added by twofold ops/lib.sh for LOCAL DEVELOPMENT: passwordless connections from this host."
        echo "local all postgres trust"
        echo "host all all 127.0.0.1/32 trust"
        echo "host all all ::1/128 trust"
        twofold_as_root cat "$hba"
    } >"$tmp"
    twofold_as_root cp "$tmp" "$hba" || { rm -f "$tmp"; return 1; }
    rm -f "$tmp"
    twofold_say "configured $hba for trust auth on 127.0.0.1/::1 and, for user postgres, its Unix socket (local development only) and reloading PostgreSQL"
    twofold_as_root pg_ctlcluster --skip-systemctl-redirect "$ver" main reload ||
        twofold_as_root service postgresql reload
}

# The URL of the same server, user, database and parameters over the
# server's Unix socket, when URL names this machine and a connection through
# the socket works; URL itself otherwise. On one machine the socket is the
# cheaper way in (no TCP, and no TLS: sqlx uses TLS over TCP when the server
# offers it); ops/bench and ops/up connect through it (README, Benchmarks).
twofold_pg_socket_url() { # url
    local url=$1 host port dir scheme rest userinfo after socket_url
    read -r host port < <(twofold_url_host_port "$url" 5432)
    twofold_is_local "$host" || { echo "$url"; return; }
    dir=$(PGCONNECT_TIMEOUT=5 psql -w -X -q -t -A "$url" -c 'show unix_socket_directories' 2>/dev/null) || dir=
    dir=${dir%%,*}
    dir=${dir#"${dir%%[![:space:]]*}"}
    if [[ $dir != /* || ! -S $dir/.s.PGSQL.$port ]]; then
        echo "$url"
        return
    fi
    scheme=${url%%://*}
    rest=${url#*://}
    userinfo=
    [[ ${rest%%/*} == *@* ]] && userinfo=${rest%%@*}@
    after=${rest#*/}
    [[ $rest == */* ]] || after=
    socket_url="$scheme://$userinfo${dir//\//%2F}:$port/$after"
    if PGCONNECT_TIMEOUT=5 psql -w -X -q -t -A "$socket_url" -c 'select 1' >/dev/null 2>&1; then
        echo "$socket_url"
    else
        echo "$url"
    fi
}

# psql's own error of the last failed query, for the message.
TWOFOLD_PG_ERROR=
twofold_pg_query_ok() {
    local out
    if out=$(PGCONNECT_TIMEOUT=5 psql -w -X -q -t -A "$TWOFOLD_TEST_DATABASE_URL" -c 'select 1' 2>&1 >/dev/null); then
        TWOFOLD_PG_ERROR=
        return 0
    fi
    TWOFOLD_PG_ERROR=$out
    return 1
}

ensure_postgres() {
    local fresh=0
    if ! twofold_pg_answers && ! twofold_is_local "$TWOFOLD_PG_HOST"; then
        twofold_say "nothing answers on $TWOFOLD_PG_HOST:$TWOFOLD_PG_PORT (from TWOFOLD_TEST_DATABASE_URL), and that is not this machine: start PostgreSQL there, or point TWOFOLD_TEST_DATABASE_URL at one that runs, then rerun"
        return 1
    fi
    if ! twofold_pg_answers; then
        if ! twofold_pg_installed; then
            if ! command -v apt-get >/dev/null 2>&1 || ! twofold_can_root; then
                twofold_say "PostgreSQL is not installed and apt-get is not available or you are not root (and passwordless sudo is not set up): install the Debian package postgresql (sudo apt-get install postgresql) and start it, then rerun"
                return 1
            fi
            ensure_packages postgresql || return 1
            fresh=1
        fi
        # The package's postinst may already have started it.
        if ! twofold_pg_answers; then
            if ! twofold_can_root; then
                twofold_say "PostgreSQL is installed but not running, and you are not root (and passwordless sudo is not set up): start it (sudo pg_ctlcluster <version> main start, or sudo service postgresql start), then rerun"
                return 1
            fi
            twofold_pg_start || true
            if ! twofold_wait_for twofold_pg_answers; then
                twofold_say "started PostgreSQL but it does not answer on $TWOFOLD_PG_HOST:$TWOFOLD_PG_PORT after ${TWOFOLD_WAIT_SECONDS}s: check /var/log/postgresql/ and that the cluster listens on port $TWOFOLD_PG_PORT (pg_lsclusters), then rerun"
                return 1
            fi
        fi
    fi

    if ! command -v psql >/dev/null 2>&1; then
        twofold_say "PostgreSQL answers but the psql client is missing: install the Debian package postgresql-client (sudo apt-get install postgresql-client), then rerun"
        return 1
    fi
    if ! twofold_pg_query_ok && ((fresh == 1)); then
        twofold_pg_trust_local || true
        twofold_wait_for twofold_pg_query_ok || true
    fi
    if ! twofold_pg_query_ok; then
        twofold_say "PostgreSQL answers on $TWOFOLD_PG_HOST:$TWOFOLD_PG_PORT but 'psql \$TWOFOLD_TEST_DATABASE_URL -c \"select 1\"' fails: ${TWOFOLD_PG_ERROR:-(psql said nothing)}"
        twofold_say "by default the tests connect as user postgres without a password. For local development add 'host all all 127.0.0.1/32 trust' (and '::1/128') at the top of pg_hba.conf and reload PostgreSQL, or set TWOFOLD_TEST_DATABASE_URL to an admin URL that works, then rerun"
        return 1
    fi
}

# ---------------------------------------------------------------------- NATS

twofold_nats_answers() {
    twofold_tcp_open "$TWOFOLD_NATS_HOST" "$TWOFOLD_NATS_PORT"
}

# The server's greeting ("INFO {...}") says whether JetStream is enabled.
twofold_nats_info() {
    timeout 3 bash -c 'exec 3<>"/dev/tcp/$1/$2" && IFS= read -r -t 2 line <&3 && printf "%s\n" "$line"' \
        _ "$TWOFOLD_NATS_HOST" "$TWOFOLD_NATS_PORT" 2>/dev/null
}

twofold_nats_bin() {
    if [[ -x /usr/sbin/nats-server ]]; then
        echo /usr/sbin/nats-server
    else
        command -v nats-server 2>/dev/null
    fi
}

twofold_nats_start() {
    local bin=$1
    twofold_say "starting $bin with JetStream on $TWOFOLD_NATS_HOST:$TWOFOLD_NATS_PORT"
    if twofold_can_root && command -v start-stop-daemon >/dev/null 2>&1; then
        twofold_as_root mkdir -p /var/lib/nats-server /var/log
        twofold_as_root start-stop-daemon --start --oknodo --background --exec "$bin" -- \
            -a "$TWOFOLD_NATS_HOST" -p "$TWOFOLD_NATS_PORT" -js \
            -sd /var/lib/nats-server -l /var/log/nats-server.log
    else
        # No root needed for NATS: run it as this user with per-user state.
        local dir="${XDG_STATE_HOME:-$HOME/.local/state}/twofold/nats"
        mkdir -p "$dir/store"
        nohup setsid "$bin" -a "$TWOFOLD_NATS_HOST" -p "$TWOFOLD_NATS_PORT" -js \
            -sd "$dir/store" -l "$dir/nats-server.log" </dev/null >/dev/null 2>&1 &
        twofold_say "NATS runs as $(id -un) with state in $dir (log: $dir/nats-server.log)"
    fi
}

twofold_nats_has_jetstream() {
    [[ $(twofold_nats_info || true) == *'"jetstream":true'* ]]
}

# A NATS server that answers without JetStream: Debian's packaged service
# (systemd, /etc/nats-server.conf with only host and port) is given a
# jetstream block and restarted; anything else fails with the fix to apply.
TWOFOLD_NATS_CONF=${TWOFOLD_NATS_CONF:-/etc/nats-server.conf}
twofold_nats_enable_jetstream() {
    local store=/var/lib/nats-server/jetstream
    local fix="add 'jetstream { store_dir: \"$store\" }' to the server's configuration (Debian: $TWOFOLD_NATS_CONF) and restart it (sudo systemctl restart nats-server), or run it with -js -sd <dir>"
    if ! twofold_is_local "$TWOFOLD_NATS_HOST"; then
        twofold_say "the NATS server on $TWOFOLD_NATS_HOST:$TWOFOLD_NATS_PORT (from TWOFOLD_TEST_NATS_URL) answers without JetStream, which twofold needs: on that machine, $fix; then rerun"
        return 1
    fi
    if ! command -v systemctl >/dev/null 2>&1 || ! systemctl is-active --quiet nats-server 2>/dev/null ||
        [[ ! -f $TWOFOLD_NATS_CONF ]] || ! twofold_can_root; then
        twofold_say "the NATS server on $TWOFOLD_NATS_HOST:$TWOFOLD_NATS_PORT answers without JetStream, which twofold needs, and it is not the nats-server systemd service this script can reconfigure (or you are not root): $fix; then rerun"
        return 1
    fi
    if grep -q '^[[:space:]]*jetstream' "$TWOFOLD_NATS_CONF"; then
        twofold_say "$TWOFOLD_NATS_CONF has a jetstream setting but the server on $TWOFOLD_NATS_HOST:$TWOFOLD_NATS_PORT runs without JetStream: check it (e.g. 'jetstream: disabled') and the log (journalctl -u nats-server), fix it and restart the service (sudo systemctl restart nats-server); then rerun"
        return 1
    fi
    twofold_say "enabling JetStream in $TWOFOLD_NATS_CONF (store in $store) and restarting nats-server"
    twofold_as_root mkdir -p "$store"
    twofold_as_root chown nats:nats "$store" 2>/dev/null || true
    printf '\n# Added by twofold ops/lib.sh: twofold needs JetStream.\njetstream {\n    store_dir: "%s"\n}\n' "$store" |
        twofold_as_root tee -a "$TWOFOLD_NATS_CONF" >/dev/null
    twofold_as_root systemctl restart nats-server || {
        twofold_say "systemctl restart nats-server failed: see systemctl status nats-server and journalctl -u nats-server; then rerun"
        return 1
    }
    if ! twofold_wait_for twofold_nats_has_jetstream; then
        twofold_say "nats-server restarted but answers without JetStream on $TWOFOLD_NATS_HOST:$TWOFOLD_NATS_PORT after ${TWOFOLD_WAIT_SECONDS}s: see journalctl -u nats-server; then rerun"
        return 1
    fi
}

ensure_nats() {
    local bin
    if ! twofold_nats_answers; then
        if ! twofold_is_local "$TWOFOLD_NATS_HOST"; then
            twofold_say "nothing answers on $TWOFOLD_NATS_HOST:$TWOFOLD_NATS_PORT (from TWOFOLD_TEST_NATS_URL), and that is not this machine: start NATS with JetStream there, or point TWOFOLD_TEST_NATS_URL at one that runs, then rerun"
            return 1
        fi
        bin=$(twofold_nats_bin || true)
        if [[ -z $bin ]]; then
            if ! command -v apt-get >/dev/null 2>&1 || ! twofold_can_root; then
                twofold_say "nats-server is not installed and apt-get is not available or you are not root (and passwordless sudo is not set up): install the Debian package nats-server (sudo apt-get install nats-server) or a nats-server binary on PATH, then rerun"
                return 1
            fi
            ensure_packages nats-server || return 1
            bin=$(twofold_nats_bin || true)
            [[ -n $bin ]] || { twofold_say "installed nats-server but cannot find the binary; check dpkg -L nats-server, then rerun"; return 1; }
        fi
        # The package's postinst may have started a (non-JetStream) server.
        if ! twofold_nats_answers; then
            twofold_nats_start "$bin" || true
            if ! twofold_wait_for twofold_nats_answers; then
                twofold_say "started nats-server but nothing answers on $TWOFOLD_NATS_HOST:$TWOFOLD_NATS_PORT after ${TWOFOLD_WAIT_SECONDS}s: check /var/log/nats-server.log, then rerun"
                return 1
            fi
        fi
    fi
    # The greeting ("INFO {...}") says whether JetStream is on; without it
    # the relay cannot create its stream and the NATS tests fail.
    if [[ -z $(twofold_nats_info || true) ]]; then
        twofold_say "something accepts connections on $TWOFOLD_NATS_HOST:$TWOFOLD_NATS_PORT but sends no NATS greeting: is TWOFOLD_TEST_NATS_URL right, and is that port NATS's client port? Fix that, then rerun"
        return 1
    fi
    if ! twofold_nats_has_jetstream; then
        twofold_nats_enable_jetstream || return 1
    fi
}

# ---------------------------------------------------------------- test peers

# Tools the integration tests shell out to. The tests call /usr/bin/python3
# explicitly: the python3 on PATH may be a pyenv build that cannot see
# Debian's dist-packages (where python3-aiosmtpd lives).
ensure_test_peers() {
    local ok=0 tool
    # chromium and its WebDriver drive the pages' browser tests.
    ensure_packages oathtool zbar-tools python3-aiosmtpd chromium chromium-driver || return 1
    for tool in oathtool zbarimg chromium chromedriver; do
        if ! command -v "$tool" >/dev/null 2>&1; then
            twofold_say "$tool is not on PATH even though its package is installed; check PATH (Debian installs it in /usr/bin), then rerun"
            ok=1
        fi
    done
    if [[ ! -x /usr/bin/python3 ]]; then
        twofold_say "/usr/bin/python3 is missing: install the Debian package python3 (sudo apt-get install python3), then rerun"
        ok=1
    elif ! /usr/bin/python3 -c 'import aiosmtpd' 2>/dev/null; then
        twofold_say "/usr/bin/python3 cannot import aiosmtpd: install the Debian package python3-aiosmtpd (sudo apt-get install python3-aiosmtpd), then rerun"
        ok=1
    fi
    return "$ok"
}

# ------------------------------------------------------------ schemathesis

# schemathesis (the API fuzzer ops/api-check runs) from PyPI, in a venv of
# its own under the user's cache directory, made with Debian's python3 and
# python3-venv. Prints the path of its `st` on stdout.
TWOFOLD_SCHEMATHESIS_VERSION="${TWOFOLD_SCHEMATHESIS_VERSION:->=4.3,<5}"
ensure_schemathesis() {
    local venv="${XDG_CACHE_HOME:-$HOME/.cache}/twofold/schemathesis"
    if [[ -x $venv/bin/st ]] && "$venv/bin/st" --version >/dev/null 2>&1; then
        echo "$venv/bin/st"
        return 0
    fi
    ensure_packages python3 python3-venv || return 1
    twofold_say "installing schemathesis from PyPI into $venv"
    rm -rf "$venv"
    mkdir -p "$(dirname "$venv")"
    if ! /usr/bin/python3 -m venv "$venv" >&2; then
        twofold_say "could not make a Python venv in $venv with /usr/bin/python3 -m venv: install the Debian package python3-venv (sudo apt-get install python3-venv), then rerun"
        return 1
    fi
    if ! "$venv/bin/pip" install -q "schemathesis$TWOFOLD_SCHEMATHESIS_VERSION" >&2; then
        rm -rf "$venv"
        twofold_say "pip could not install schemathesis from PyPI (see above): check the network or a proxy (pip honours HTTPS_PROXY and PIP_INDEX_URL), or install it by hand ($venv/bin/pip install 'schemathesis$TWOFOLD_SCHEMATHESIS_VERSION'), then rerun"
        return 1
    fi
    echo "$venv/bin/st"
}
