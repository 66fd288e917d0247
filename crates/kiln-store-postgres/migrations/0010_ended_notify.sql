-- Processes that wait for runs on workers learn of their ends from notifications on
-- `kiln_ended` (the ids of the runs that left the queue, up to 200 per notification, one
-- group per statement), instead of looking every waiting run up again and again.
CREATE OR REPLACE FUNCTION kiln_queue_notify_left() RETURNS trigger AS $$
BEGIN
    PERFORM pg_notify('kiln_queue', pool)
        FROM (SELECT DISTINCT pool FROM left_queue WHERE claimed_by IS NOT NULL) AS p;
    PERFORM pg_notify('kiln_ended', ids)
        FROM (SELECT string_agg(run_id::text, ' ') AS ids
              FROM (SELECT run_id, (row_number() OVER ()) / 200 AS part FROM left_queue) AS n
              GROUP BY part) AS g;
    RETURN NULL;
END;
$$ LANGUAGE plpgsql;
