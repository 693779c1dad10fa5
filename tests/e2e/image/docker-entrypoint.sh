#!/bin/sh
# Stand-in for the official postgres image's docker-entrypoint.sh, doing what it does for our chart:
# on an empty $PGDATA, initdb (superuser "postgres", password from POSTGRES_PASSWORD_FILE, scram for
# remote hosts, then POSTGRES_INITDB_ARGS), then the /docker-entrypoint-initdb.d scripts against a socket-only temporary server;
# finally exec the server with the given arguments ("postgres" itself dropped).
set -eu
[ "${1:-}" = postgres ] && shift
if [ ! -s "$PGDATA/PG_VERSION" ]; then
  mkdir -p "$PGDATA"; chmod 700 "$PGDATA"
  pw="$(mktemp)"; cat "$POSTGRES_PASSWORD_FILE" > "$pw"
  # shellcheck disable=SC2086 # POSTGRES_INITDB_ARGS is a list of options, split as the image splits it
  initdb --username=postgres --pwfile="$pw" --auth-local=trust --auth-host=scram-sha-256 ${POSTGRES_INITDB_ARGS:-} \
    -D "$PGDATA" >/dev/null
  rm -f "$pw"
  echo "host all all all scram-sha-256" >> "$PGDATA/pg_hba.conf"
  pg_ctl -D "$PGDATA" -o "-c listen_addresses='' -c unix_socket_directories=/var/run/postgresql" -w start >/dev/null
  export PGHOST=/var/run/postgresql
  for f in /docker-entrypoint-initdb.d/*; do
    case "$f" in
      *.sh) if [ -x "$f" ]; then "$f"; else . "$f"; fi ;;
      *.sql) psql -v ON_ERROR_STOP=1 -U postgres -f "$f" ;;
    esac
  done
  unset PGHOST
  pg_ctl -D "$PGDATA" -m fast -w stop >/dev/null
  echo "PostgreSQL init process complete; ready for start up."
fi
exec postgres "$@"
