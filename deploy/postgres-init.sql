-- One database per service (each service owns its event store and read models).
-- Run once by the postgres image on an empty data volume (/docker-entrypoint-initdb.d/);
-- \gexec keeps it safe to run again by hand: psql -U trial -d postgres -f deploy/postgres-init.sql
SELECT format('CREATE DATABASE %I OWNER trial', name)
FROM unnest(ARRAY['trial_randomization', 'trial_dosing', 'trial_safety', 'trial_efficacy',
                    'trial_audit']) AS name
WHERE NOT EXISTS (SELECT 1 FROM pg_database WHERE datname = name)
\gexec
