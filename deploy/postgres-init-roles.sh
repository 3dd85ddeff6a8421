#!/bin/sh
# The role the services run as (docker-compose.yml, D44): it may log in and nothing else until
# `trial migrate --service-role trial_app` grants it, per database, what a service needs. Run
# once by the postgres image on an empty data volume, with TRIAL_APP_DB_PASSWORD from compose.
set -eu
psql -v ON_ERROR_STOP=1 -v password="$TRIAL_APP_DB_PASSWORD" --username "$POSTGRES_USER" \
     --dbname postgres <<'SQL'
SELECT format('CREATE ROLE trial_app LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE PASSWORD %L',
              :'password')
WHERE NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'trial_app')
\gexec
SQL
