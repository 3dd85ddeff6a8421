#!/usr/bin/env bash
# docker-compose.yml's Kafka (the apache/kafka image, KRaft, one node) with SASL/SCRAM-SHA-512 and
# ACLs (D48, D52): the configuration deploy/infra.py gives a secured broker, for compose.
#
# Every client listener asks for SASL (the compose network's kafka:9092, the host's
# localhost:19092); the controller listener is bound to the container's loopback and serves no
# client. The authorizer is the StandardAuthorizer: `admin` (and the loopback controller's
# ANONYMOUS) is the only super user, everyone else may do only what an ACL allows (compose's
# one-shot kafka-acls service grants them, deploy/kafka_acls.py's table).
#
# SCRAM credentials live in the cluster's metadata: they are added when the storage is first
# formatted (`kafka-storage.sh format --add-scram`), admin's and one per name in
# TRIAL_KAFKA_SCRAM_USERS, each password from TRIAL_KAFKA_<NAME>_PASSWORD (hex: a password is
# written into a SCRAM option and a JAAS line unquoted). A volume formatted before, without
# them (compose's PLAINTEXT Kafka), is refused: remove the volume, and every relay publishes its
# whole history to the new cluster (D45).
#
# Environment: KAFKA_LOG_DIRS (the volume), TRIAL_KAFKA_ADMIN_PASSWORD, TRIAL_KAFKA_SCRAM_USERS
# and their passwords; optional CLUSTER_ID, KAFKA_HOME (/opt/kafka), TRIAL_KAFKA_CONFIG_DIR
# (/tmp/kafka: server.properties, and admin.properties for the healthcheck and operators).
set -euo pipefail

KAFKA_HOME=${KAFKA_HOME:-/opt/kafka}
config_dir=${TRIAL_KAFKA_CONFIG_DIR:-/tmp/kafka}
data=${KAFKA_LOG_DIRS:?the volume Kafka keeps its log in}
mechanism=SCRAM-SHA-512
admin_password=${TRIAL_KAFKA_ADMIN_PASSWORD:?set TRIAL_KAFKA_ADMIN_PASSWORD}
scram_module=org.apache.kafka.common.security.scram.ScramLoginModule
marker=$data/.trial-scram-users

umask 077  # the files below hold the admin's password
mkdir -p "$config_dir"
cat > "$config_dir/server.properties" <<EOF
process.roles=broker,controller
node.id=1
controller.quorum.voters=1@127.0.0.1:9093
controller.listener.names=CONTROLLER
listeners=SASL_PLAINTEXT://:9092,HOST://:19092,CONTROLLER://127.0.0.1:9093
advertised.listeners=SASL_PLAINTEXT://kafka:9092,HOST://localhost:19092
listener.security.protocol.map=CONTROLLER:PLAINTEXT,SASL_PLAINTEXT:SASL_PLAINTEXT,HOST:SASL_PLAINTEXT
inter.broker.listener.name=SASL_PLAINTEXT
sasl.enabled.mechanisms=$mechanism
sasl.mechanism.inter.broker.protocol=$mechanism
listener.name.sasl_plaintext.scram-sha-512.sasl.jaas.config=$scram_module required username="admin" password="$admin_password";
listener.name.host.scram-sha-512.sasl.jaas.config=$scram_module required;
authorizer.class.name=org.apache.kafka.metadata.authorizer.StandardAuthorizer
super.users=User:admin;User:ANONYMOUS
allow.everyone.if.no.acl.found=false
auto.create.topics.enable=false
log.dirs=$data
num.partitions=3
default.replication.factor=1
min.insync.replicas=1
offsets.topic.replication.factor=1
transaction.state.log.replication.factor=1
transaction.state.log.min.isr=1
share.coordinator.state.topic.replication.factor=1
share.coordinator.state.topic.min.isr=1
group.initial.rebalance.delay.ms=0
EOF
cat > "$config_dir/admin.properties" <<EOF
security.protocol=SASL_PLAINTEXT
sasl.mechanism=$mechanism
sasl.jaas.config=$scram_module required username="admin" password="$admin_password";
EOF

if [[ ! -f "$data/meta.properties" ]]; then
    scram=(--add-scram "$mechanism=[name=admin,password=$admin_password]")
    for user in ${TRIAL_KAFKA_SCRAM_USERS:-}; do
        variable="TRIAL_KAFKA_${user^^}_PASSWORD"
        if [[ -z "${!variable:-}" ]]; then
            echo "set $variable: the SCRAM password of Kafka's user $user" >&2
            exit 1
        fi
        scram+=(--add-scram "$mechanism=[name=$user,password=${!variable}]")
    done
    "$KAFKA_HOME/bin/kafka-storage.sh" format --cluster-id "${CLUSTER_ID:-$("$KAFKA_HOME/bin/kafka-storage.sh" random-uuid)}" \
        --config "$config_dir/server.properties" "${scram[@]}"
    echo "admin ${TRIAL_KAFKA_SCRAM_USERS:-}" > "$marker"
elif [[ ! -f "$marker" ]]; then
    echo "$data was formatted without SCRAM users (a PLAINTEXT Kafka): no client could log in." >&2
    echo "Remove the volume (docker volume rm <project>_kafkadata); the relays republish every" >&2
    echo "event to the new cluster (docs/decisions.md, D45)." >&2
    exit 1
fi

exec "$KAFKA_HOME/bin/kafka-server-start.sh" "$config_dir/server.properties"
