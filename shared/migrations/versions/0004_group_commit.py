"""The group commit's first statement on PostgreSQL: lock the store, read its head and versions.

Revision ID: 0004
Revises: 0003

One round trip instead of three (D39): the function takes the store's append lock (the advisory
lock `shared.store` names, 7301000001) and only then reads the head and the versions of the
streams the batch touches, each version by one step down the (stream_id, stream_version) index
(a `max() ... GROUP BY` would read every event of every stream: its cost grew with the streams).
Being VOLATILE, each of its statements reads with a snapshot of its
own, taken after the lock was granted, so it sees every commit made before it. SQLite needs no
function: `BEGIN IMMEDIATE` has locked the database before the first read.
"""

from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    if op.get_bind().dialect.name != "postgresql":
        return
    op.execute("""
        CREATE OR REPLACE FUNCTION event_store_lock(streams text[])
        RETURNS TABLE (out_stream text, out_version bigint, out_position bigint, out_hash text)
        LANGUAGE plpgsql VOLATILE AS $$
        BEGIN
          PERFORM pg_advisory_xact_lock(7301000001);
          RETURN QUERY
            SELECT NULL::text, NULL::bigint, h.position::bigint, h.hash::text
              FROM (SELECT e.position, e.hash FROM events e
                    ORDER BY e.position DESC LIMIT 1) AS h
            UNION ALL
            SELECT s.id, v.version, NULL::bigint, NULL::text
              FROM unnest(streams) AS s(id)
              CROSS JOIN LATERAL (SELECT e.stream_version::bigint AS version FROM events e
                                  WHERE e.stream_id = s.id
                                  ORDER BY e.stream_version DESC LIMIT 1) AS v;
        END $$""")


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute("DROP FUNCTION IF EXISTS event_store_lock(text[])")
