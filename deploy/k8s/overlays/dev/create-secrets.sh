#!/usr/bin/env bash
# Creates (or replaces) the dev overlay's Secrets in namespace `mesh` with fresh random values:
# nothing secret is kept in git. Needs kubectl (pointed at the cluster) and openssl.
#
#   mesh-postgres    password                      the in-cluster PostgreSQL's password
#   mesh-auth        database-url                  postgres://mesh:<password>@postgres:5432/mesh_auth
#                    signing-key.pem               a new Ed25519 key (tokens signed before are void)
#                    service-clients               aggregator=sha256:<digest of its secret>
#   mesh-users       database-url                  postgres://mesh:<password>@postgres:5432/mesh_users
#
# auth and users each own a database (the same server): both keep their schema versions in
# sqlx's _sqlx_migrations table, so one database for both fails the second one's start-up.
#   mesh-aggregator  client-secret                 the aggregator's secret for IssueServiceToken
set -euo pipefail

namespace=${MESH_NAMESPACE:-mesh}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

password=$(openssl rand -hex 24)
client_secret=$(openssl rand -hex 32)
digest=$(printf '%s' "$client_secret" | openssl dgst -sha256 -r | cut -d' ' -f1)
openssl genpkey -algorithm ed25519 -out "$work/signing-key.pem"
auth_url="postgres://mesh:${password}@postgres:5432/mesh_auth"
users_url="postgres://mesh:${password}@postgres:5432/mesh_users"

kubectl get namespace "$namespace" >/dev/null 2>&1 || kubectl create namespace "$namespace"
apply() { kubectl -n "$namespace" create secret generic "$@" --dry-run=client -o yaml | kubectl apply -f -; }
apply mesh-postgres --from-literal=password="$password"
apply mesh-auth --from-literal=database-url="$auth_url" \
    --from-file=signing-key.pem="$work/signing-key.pem" \
    --from-literal=service-clients="aggregator=sha256:${digest}"
apply mesh-users --from-literal=database-url="$users_url"
apply mesh-aggregator --from-literal=client-secret="$client_secret"
echo "Secrets created in namespace $namespace."
