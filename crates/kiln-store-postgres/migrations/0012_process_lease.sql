-- Each process records its own lease (three of its heartbeat periods): a process is dead
-- once silent for longer than its lease and the judge's, so processes that beat at
-- different rates do not judge each other dead too early.
ALTER TABLE processes ADD COLUMN lease BIGINT NOT NULL DEFAULT 0;
