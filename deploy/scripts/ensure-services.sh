#!/usr/bin/env bash
# Make sure the services tunegate's tests use are installed and running on this machine.
# Idempotent; needs root (or sudo) only when something is actually missing.
set -euo pipefail
SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
apt_updated=""
apt_install() {
  [ -n "$apt_updated" ] || { $SUDO apt-get update -qq; apt_updated=1; }
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "$@" >/dev/null
}

# PostgreSQL: the production store; tests run migrations on it at 127.0.0.1:5432.
if ! command -v pg_ctlcluster >/dev/null 2>&1; then
  echo "installing PostgreSQL"; apt_install postgresql
fi
if ! pg_isready -q -h 127.0.0.1 -p 5432 2>/dev/null; then
  echo "starting PostgreSQL"
  for version in $(ls /etc/postgresql); do
    $SUDO pg_ctlcluster --skip-systemctl-redirect "$version" main start || true
  done
  for _ in $(seq 30); do pg_isready -q -h 127.0.0.1 -p 5432 && break; sleep 1; done
fi
pg_isready -h 127.0.0.1 -p 5432 >/dev/null || { echo "PostgreSQL is not reachable on 127.0.0.1:5432" >&2; exit 1; }

# The role and database the tests use (tests/conftest.py tries them first): a fresh Debian install has
# peer auth on the socket and password auth on 127.0.0.1, so the role gets a password. CREATEDB: each
# test run creates and drops a database of its own.
as_postgres() { if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else sudo -u postgres "$@"; fi; }
psql_admin() { as_postgres psql -X -q -v ON_ERROR_STOP=1 -d postgres "$@"; }
if ! PGPASSWORD=tunegate psql -X -q -h 127.0.0.1 -U tunegate -d tunegate -c 'select 1' >/dev/null 2>&1; then
  echo "creating the PostgreSQL role and database \`tunegate\`"
  psql_admin -c "DO \$\$ BEGIN
      IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'tunegate') THEN
        CREATE ROLE tunegate LOGIN CREATEDB PASSWORD 'tunegate';
      ELSE
        ALTER ROLE tunegate LOGIN CREATEDB PASSWORD 'tunegate';
      END IF; END \$\$;"
  as_postgres psql -X -q -d postgres -tAc "SELECT 1 FROM pg_database WHERE datname = 'tunegate'" | grep -q 1 \
    || psql_admin -c "CREATE DATABASE tunegate OWNER tunegate"
fi
PGPASSWORD=tunegate psql -X -q -h 127.0.0.1 -U tunegate -d tunegate -c 'select 1' >/dev/null \
  || { echo "PostgreSQL: cannot log in as tunegate on 127.0.0.1:5432/tunegate" >&2; exit 1; }

# Redis: the per-key rate limits shared by gateway replicas (`gateway.redis_url`); the tests use
# 127.0.0.1:6379 (tests/test_shared_limits.py). Debian's `redis-server` (it brings `redis-cli`), started
# here without systemd (containers have none): in memory only, as the `redis` user the package made.
if ! command -v redis-server >/dev/null 2>&1 || ! command -v redis-cli >/dev/null 2>&1; then
  echo "installing Redis"; apt_install redis-server
fi
if ! redis-cli -h 127.0.0.1 -p 6379 ping >/dev/null 2>&1; then
  echo "starting Redis"
  $SUDO mkdir -p /var/lib/redis /var/log/redis
  as_redis=()
  if id redis >/dev/null 2>&1; then
    $SUDO chown redis: /var/lib/redis /var/log/redis
    if [ "$(id -u)" = 0 ]; then as_redis=(runuser -u redis --); else as_redis=(sudo -u redis); fi
  elif [ -n "$SUDO" ]; then
    as_redis=(sudo)
  fi
  "${as_redis[@]}" redis-server --daemonize yes --bind 127.0.0.1 --port 6379 --save "" --appendonly no \
    --dir /var/lib/redis --logfile /var/log/redis/tunegate.log
  for _ in $(seq 20); do redis-cli -h 127.0.0.1 -p 6379 ping >/dev/null 2>&1 && break; sleep 0.5; done
fi
redis-cli -h 127.0.0.1 -p 6379 ping >/dev/null || { echo "Redis is not reachable on 127.0.0.1:6379" >&2; exit 1; }

# Chromium and its driver: the reviewer page's browser test drives Debian's headless Chromium
# through selenium (never a downloaded browser or driver).
if ! command -v chromium >/dev/null 2>&1 || ! command -v chromedriver >/dev/null 2>&1; then
  echo "installing chromium and chromium-driver"; apt_install chromium chromium-driver
fi

# Prometheus and promtool: the alert rules' checks and unit tests (promtool) and the integration test
# that has a real Prometheus scrape a gateway (tests/test_prometheus.py). Debian's package; its
# systemd service is not needed (the test starts its own server on a free port).
if ! command -v prometheus >/dev/null 2>&1 || ! command -v promtool >/dev/null 2>&1; then
  echo "installing prometheus"; apt_install prometheus
fi
