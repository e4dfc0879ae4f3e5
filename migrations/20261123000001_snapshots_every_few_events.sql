-- Appends are written in batches, one statement per batch (see
-- services/platform/src/store/committer.rs), and a stream's snapshot is
-- replaced every few events rather than at every commit.

-- A stream has one snapshot, replaced as it moves on: keyed by the stream
-- alone, so the sequence is no longer part of an index and the replacement
-- can stay on its page.
ALTER TABLE snapshots DROP CONSTRAINT snapshots_pkey;
ALTER TABLE snapshots ADD PRIMARY KEY (aggregate_type, aggregate_id);
-- A snapshot (a few KB of JSON, mostly hashes and ids) barely compresses:
-- PostgreSQL's attempt to, at each write, costs more than it saves. Kept
-- in the row up to a page's worth, and never compressed beyond.
ALTER TABLE snapshots ALTER COLUMN payload SET STORAGE EXTERNAL;
ALTER TABLE snapshots SET (toast_tuple_target = 8160);
