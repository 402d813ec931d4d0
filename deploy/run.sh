#!/usr/bin/env bash
# `make run`: prepare a local Passerelle (schema, master key, demo patients, a demo
# custodian client) and serve it with gunicorn in the foreground. Safe to re-run:
# every step is idempotent, and the demo client is created only once.
set -euo pipefail
cd "$(dirname "$0")/.."

VENV="${VENV:-.venv}"
FLASK=("$VENV/bin/flask" --app wsgi)
PY="$VENV/bin/python"
INSTANCE="${PASSERELLE_INSTANCE_DIR:-instance}"
CREDENTIALS="$INSTANCE/demo-client.json"
DEMO_PATIENTS="${DEMO_PATIENTS:-200}"
BIND="${PASSERELLE_BIND:-127.0.0.1:8000}"
export PASSERELLE_BIND="$BIND"
BASE="${PASSERELLE_BASE_URL:-http://$BIND}"
BASE="${BASE%/}"

mkdir -p "$INSTANCE"
chmod 700 "$INSTANCE"

"${FLASK[@]}" init-db
"${FLASK[@]}" demo-data --patients "$DEMO_PATIENTS" --if-empty

if [[ ! -s "$CREDENTIALS" ]]; then
    tmp="$(mktemp "$INSTANCE/.demo-client.XXXXXX")"  # mktemp creates it 0600
    trap 'rm -f "$tmp"' EXIT
    "${FLASK[@]}" client create --name demo-custodian --role custodian >"$tmp"
    "$PY" -c 'import json, sys; c = json.load(open(sys.argv[1])); assert c["client_id"] and c["client_secret"]' "$tmp"
    chmod 600 "$tmp"
    mv "$tmp" "$CREDENTIALS"
    trap - EXIT
    echo "Created the demo custodian client; its credentials are in $CREDENTIALS (mode 0600)." >&2
fi

credentials="$("$PY" -c \
    'import json, sys; c = json.load(open(sys.argv[1])); print(c["client_id"], c["client_secret"])' "$CREDENTIALS")"
read -r CLIENT_ID CLIENT_SECRET <<<"$credentials"

cat <<EOF

Passerelle is starting on $BASE

  CapabilityStatement  $BASE/fhir/metadata
  custodian FHIR API   $BASE/fhir
  OAuth2 token         $BASE/auth/token
  SMART configuration  $BASE/.well-known/smart-configuration
  health               $BASE/healthz

Demo custodian client (saved in $CREDENTIALS):
  client_id      $CLIENT_ID
  client_secret  $CLIENT_SECRET

Get a token (valid 5 minutes), then search Patients:

  TOKEN=\$(curl -s -u '$CLIENT_ID:$CLIENT_SECRET' -d grant_type=client_credentials \\
      $BASE/auth/token | python3 -c 'import json, sys; print(json.load(sys.stdin)["access_token"])')
  curl -s -H "Authorization: Bearer \$TOKEN" '$BASE/fhir/Patient?_count=5'

Press Ctrl-C to stop.

EOF

exec "$VENV/bin/gunicorn" -c deploy/gunicorn.conf.py wsgi:app
