#!/usr/bin/env bash
# `make run`: prepare a local Passerelle (schema, master key, demo patients, a demo
# custodian client, a demo patient's invitation to the consent portal) and serve it with
# gunicorn in the foreground. Safe to re-run: every step is idempotent, and the demo
# client is created only once. Each step prints a line as it starts; the URLs and
# credentials are printed once the server answers GET /healthz with 200.
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
if [[ -z "${PASSERELLE_BASE_URL:-}" && ! "${BIND%:*}" =~ ^(127\.[0-9.]+|localhost|\[::1\])$ ]]; then
    echo "Note: without PASSERELLE_BASE_URL only loopback hosts (localhost, 127.0.0.1, [::1]) are served;" \
         "set PASSERELLE_BASE_URL to the URL clients use to reach $BIND." >&2
fi

step() {  # step TEXT: say what starts now
    echo "==> $*" >&2
}

mkdir -p "$INSTANCE"
chmod 700 "$INSTANCE"

step "Database schema and master key in $INSTANCE"
"${FLASK[@]}" init-db
step "Demo data: $DEMO_PATIENTS synthetic patients (first run only)"
"${FLASK[@]}" demo-data --patients "$DEMO_PATIENTS" --if-empty

field() {  # field NAME FILE: one value of the credentials JSON
    "$PY" -c 'import json, sys; print(json.load(open(sys.argv[2]))[sys.argv[1]])' "$1" "$2"
}

known_client() {  # known_client ID: is it a registered, active client of this database?
    "${FLASK[@]}" client list | "$PY" -c '
import json, sys
active = {c["client_id"] for c in map(json.loads, filter(str.strip, sys.stdin)) if c["active"]}
sys.exit(0 if sys.argv[1] in active else 1)' "$1"
}

step "Demo clients"
if [[ -s "$CREDENTIALS" ]] && ! known_client "$(field client_id "$CREDENTIALS")"; then
    # The database was replaced (or the client disabled) since the credentials were saved.
    echo "$CREDENTIALS names a client this database does not know; creating a new demo client." >&2
    rm -f "$CREDENTIALS"
fi

if [[ ! -s "$CREDENTIALS" ]]; then
    tmp="$(mktemp "$INSTANCE/.demo-client.XXXXXX")"  # mktemp creates it 0600
    trap 'rm -f "$tmp"' EXIT
    "${FLASK[@]}" client create --name demo-custodian --role custodian >"$tmp"
    field client_secret "$tmp" >/dev/null  # fails unless it is the JSON we expect
    chmod 600 "$tmp"
    mv "$tmp" "$CREDENTIALS"
    trap - EXIT
    echo "Created the demo custodian client; its credentials are in $CREDENTIALS (mode 0600)." >&2
fi

CLIENT_ID="$(field client_id "$CREDENTIALS")"
CLIENT_SECRET="$(field client_secret "$CREDENTIALS")"

RESEARCH="$INSTANCE/demo-research.json"
if [[ -s "$RESEARCH" ]] && ! known_client "$(field client_id "$RESEARCH")"; then
    rm -f "$RESEARCH"
fi
if [[ ! -s "$RESEARCH" ]]; then
    # A demo research project (record tier, ε = 10) and its client, so the research API has a caller.
    project="$("${FLASK[@]}" project create --name "Demo diabetes cohort" --tier record --epsilon 10 \
        --title-en "Living with diabetes" --title-fr "Vivre avec le diabète" \
        --purpose-en "Understand which follow-up helps people with diabetes stay well (demonstration on synthetic data)" \
        --purpose-fr "Comprendre quel suivi aide les personnes diabétiques à rester en bonne santé (démonstration sur des données fictives)" \
        --sponsor-en "Demo University Hospital research unit" --sponsor-fr "Unité de recherche du CHU de démonstration" \
        --until "$(date -d '+2 years' +%F)")"
    project_id="$("$PY" -c 'import json, sys; print(json.loads(sys.argv[1])["project_id"])' "$project")"
    tmp="$(mktemp "$INSTANCE/.demo-research.XXXXXX")"
    trap 'rm -f "$tmp"' EXIT
    "${FLASK[@]}" client create --name demo-research --role research --project "$project_id" >"$tmp"
    field client_secret "$tmp" >/dev/null
    chmod 600 "$tmp"
    mv "$tmp" "$RESEARCH"
    trap - EXIT
fi
RESEARCH_ID="$(field client_id "$RESEARCH")"
RESEARCH_SECRET="$(field client_secret "$RESEARCH")"
PROJECT_ID="$(field project_id "$RESEARCH")"

step "Demo patient of the consent portal"
# The first patient with a patient number (medical record number) and whether they have chosen a
# passphrase: "NUMBER<TAB>yes|no", or nothing when no patient has a number. A fresh one-time link is
# issued only while they have no passphrase: each start then prints a link that works (an invitation
# expires after 7 days), and once they have one no start leaves a live link (which could replace
# it) in the terminal.
portal_patient="$("$PY" - <<'PY'
import orjson
from sqlalchemy import false, select

from consent.patients import numbers
from service import db
from service.store.schema import patient_accounts, resources
from wsgi import app

with app.app_context(), db.read() as conn:
    rows = conn.execute(select(resources.c.id, resources.c.json).where(
        resources.c.type == "Patient", resources.c.deleted == false()).order_by(resources.c.pk)
        .execution_options(yield_per=100))  # streamed: the first patient with a number is enough
    first = next(((row.id, found[0]) for row in rows if (found := numbers(orjson.loads(row.json)))), None)
    if first is not None:
        passphrase = conn.execute(select(patient_accounts.c.passphrase).where(
            patient_accounts.c.patient_id == first[0])).scalar()
        print(first[1], "yes" if passphrase else "no", sep="\t")
PY
)"
IFS=$'\t' read -r PATIENT_NUMBER HAS_PASSPHRASE <<<"$portal_patient"
INVITATION=""
if [[ "$HAS_PASSPHRASE" == no ]]; then
    INVITATION="$("${FLASK[@]}" patient invite --patient "$PATIENT_NUMBER" --base-url "$BASE" \
        | "$PY" -c 'import json, sys; print(json.load(sys.stdin)["link"])')"
fi

answers() {  # answers: does the server answer GET /healthz with 200 on the address it binds?
    # Once gunicorn listens, the request waits in its backlog until a worker has warmed up.
    "$PY" deploy/healthcheck.py --timeout 30
}

step "Starting gunicorn on $BIND; the URLs follow once $BASE/healthz answers"
"$VENV/bin/gunicorn" -c deploy/gunicorn.conf.py wsgi:app &
server=$!
trap 'kill -TERM "$server" 2>/dev/null || true' INT TERM
started=$SECONDS
told=0
until answers; do
    if ! kill -0 "$server" 2>/dev/null; then
        status=0
        wait "$server" || status=$?
        echo "gunicorn stopped (status $status) before answering; its log is above." >&2
        exit $((status == 0 ? 1 : status))
    fi
    sleep 0.5
    if ((SECONDS - started >= told + 30)); then
        told=$((SECONDS - started))
        echo "    still waiting for $BASE/healthz to answer 200 ($told s)" >&2
    fi
done

cat <<EOF

Passerelle is answering on $BASE

  CapabilityStatement  $BASE/fhir/metadata
  research FHIR API    $BASE/research/fhir
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

Demo research client for project $PROJECT_ID (saved in $RESEARCH):
  client_id      $RESEARCH_ID
  client_secret  $RESEARCH_SECRET

  RTOKEN=\$(curl -s -u '$RESEARCH_ID:$RESEARCH_SECRET' -d grant_type=client_credentials \\
      $BASE/auth/token | python3 -c 'import json, sys; print(json.load(sys.stdin)["access_token"])')
  curl -s -H "Authorization: Bearer \$RTOKEN" '$BASE/research/fhir/Observation?_count=5'

Patient consent portal  $BASE/consent/
EOF
if [[ -n "$INVITATION" ]]; then
    cat <<EOF
  demo patient number  $PATIENT_NUMBER
  invitation link      $INVITATION
  (one use, valid 7 days: open it to choose a passphrase, then sign in with the number and it)
EOF
elif [[ -n "$PATIENT_NUMBER" ]]; then
    cat <<EOF
  demo patient number  $PATIENT_NUMBER (has chosen a passphrase: sign in with the number and it)
  A new invitation link (choosing a passphrase with it replaces the old one):
    ${FLASK[*]} patient invite --patient $PATIENT_NUMBER --base-url $BASE
EOF
else
    cat <<EOF
  No patient has a patient number (an identifier of type MR) to invite.
EOF
fi
cat <<EOF

Press Ctrl-C to stop.

EOF

until wait "$server"; do  # wait returns early when Ctrl-C or TERM ran the trap
    status=$?
    kill -0 "$server" 2>/dev/null || exit "$status"
done
