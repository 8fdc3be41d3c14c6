# Sourced by scripts/test: makes MESH_TEST_DATABASE_URL name a PostgreSQL server the tests may
# create databases on.
#
# 1. MESH_TEST_DATABASE_URL already set: used as it is.
# 2. A server on 127.0.0.1:5432 that lets `postgres` in without a password: used.
# 3. Otherwise (or with MESH_TEST_OWN_POSTGRES=1): Debian's postgresql is installed if missing,
#    and a private cluster is started under target/mesh-postgres on port 55432 (trust auth,
#    loopback only). It keeps running for the next test run and stops with the machine.

mesh_postgres() {
    if [ -n "${MESH_TEST_DATABASE_URL:-}" ]; then
        return 0
    fi
    local shared="postgres://postgres@127.0.0.1:5432/test"
    if [ "${MESH_TEST_OWN_POSTGRES:-0}" != 1 ] && have psql \
        && psql "$shared" -qAtc 'select 1' >/dev/null 2>&1; then
        export MESH_TEST_DATABASE_URL=$shared
        return 0
    fi

    local bin
    bin=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1 || true)
    if [ -z "$bin" ] || [ ! -x "$bin/initdb" ]; then
        apt_install postgresql postgresql-client
        bin=$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -n 1)
    fi

    local dir=$ROOT/target/mesh-postgres port=55432
    local run=()
    # PostgreSQL refuses to run as root: use the postgres account the package created.
    if [ "$(id -u)" -eq 0 ]; then
        run=(runuser -u postgres --)
    fi
    mkdir -p "$dir"
    if [ "$(id -u)" -eq 0 ]; then chown postgres "$dir"; fi
    if [ ! -f "$dir/data/PG_VERSION" ]; then
        "${run[@]}" "$bin/initdb" -D "$dir/data" -U postgres --auth=trust >/dev/null
    fi
    if ! "${run[@]}" "$bin/pg_ctl" -D "$dir/data" status >/dev/null 2>&1; then
        "${run[@]}" "$bin/pg_ctl" -D "$dir/data" -l "$dir/server.log" -w \
            -o "-c listen_addresses=127.0.0.1 -c port=$port -c unix_socket_directories=$dir" start >/dev/null
    fi
    export MESH_TEST_DATABASE_URL="postgres://postgres@127.0.0.1:$port/postgres"
}
