#!/usr/bin/env bash
# docker-compose.yml's one-shot kafka-acls service: grants the ACLs given as arguments, as
# `admin`, once the broker is healthy (D48). Each argument is one principal's operations on one
# resource, ``principal:OP[,OP...]:TOPIC|GROUP:name`` (deploy/kafka_acls.py's `compact` lines;
# tests/unit/test_compose_schema.py checks that compose lists exactly its table). Granting an
# ACL the broker has already is a no-op, so this runs on every `up`.
#
# Environment: TRIAL_KAFKA_ADMIN_PASSWORD; optional TRIAL_KAFKA_BOOTSTRAP (kafka:9092),
# KAFKA_HOME (/opt/kafka).
set -euo pipefail

KAFKA_HOME=${KAFKA_HOME:-/opt/kafka}
bootstrap=${TRIAL_KAFKA_BOOTSTRAP:-kafka:9092}
admin_password=${TRIAL_KAFKA_ADMIN_PASSWORD:?set TRIAL_KAFKA_ADMIN_PASSWORD}

umask 077
config=$(mktemp)
trap 'rm -f "$config"' EXIT
cat > "$config" <<EOF
security.protocol=SASL_PLAINTEXT
sasl.mechanism=SCRAM-SHA-512
sasl.jaas.config=org.apache.kafka.common.security.scram.ScramLoginModule required username="admin" password="$admin_password";
EOF

# One kafka-acls.sh run (a JVM start) per principal and set of operations, with every resource
# it gets them on.
declare -A resources=()
order=()
for grant in "$@"; do
    IFS=: read -r principal operations kind name <<< "$grant"
    if [[ -z "$name" || ( "$kind" != TOPIC && "$kind" != GROUP ) ]]; then
        echo "not a grant: $grant" >&2
        exit 2
    fi
    key="$principal|--operation ${operations//,/ --operation }"
    [[ -v "resources[$key]" ]] || order+=("$key")
    resources[$key]+=" --${kind,,} $name"
done
for key in "${order[@]}"; do
    principal=${key%%|*}
    # Word splitting wanted: the options built above (names are topic and group names).
    # shellcheck disable=SC2086
    "$KAFKA_HOME/bin/kafka-acls.sh" --bootstrap-server "$bootstrap" --command-config "$config" \
        --add --allow-principal "User:$principal" ${key#*|} ${resources[$key]}
done
echo "granted: $# principal-resource lines in ${#order[@]} runs"
