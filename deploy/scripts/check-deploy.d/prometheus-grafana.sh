# Sourced by deploy/scripts/check-deploy.sh ($ROOT, $PY, `check` set there): the Prometheus config and
# alert rules (promtool, Debian's `prometheus` package from deploy/scripts/ensure-services.sh) and the
# Grafana dashboard's static check (every metric a query or alert names is exported by the code).
if command -v promtool >/dev/null 2>&1; then
  check promtool check config "$ROOT/deploy/prometheus/prometheus.yml"
  check promtool check rules "$ROOT"/deploy/prometheus/rules/tunegate.rules.yml
  check promtool test rules "$ROOT"/deploy/prometheus/rules/tunegate.rules.test.yml
else
  echo "FAILED: promtool is not installed (run deploy/scripts/ensure-services.sh)" >&2
  failures=$((failures + 1))
fi
check "$PY" "$ROOT/deploy/grafana/check_dashboard.py"
