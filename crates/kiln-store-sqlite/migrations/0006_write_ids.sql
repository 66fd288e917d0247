-- Writes carry their identity, so that one delivered twice (a batch sent again after its
-- answer was lost) is applied once: a state change is recognised by `change_id`, a log
-- line by `id`. Rows written before this migration, and crash records, have none.
ALTER TABLE states ADD COLUMN change_id BLOB;
ALTER TABLE logs ADD COLUMN id BLOB;
CREATE UNIQUE INDEX logs_id ON logs (id) WHERE id IS NOT NULL;
