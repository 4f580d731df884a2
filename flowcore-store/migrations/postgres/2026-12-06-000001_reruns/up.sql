-- Reruns: the run a run reruns, and the steps it kept from that run (not executed again).
ALTER TABLE runs ADD COLUMN rerun_of TEXT;
ALTER TABLE steps ADD COLUMN reused BOOLEAN NOT NULL DEFAULT FALSE;
