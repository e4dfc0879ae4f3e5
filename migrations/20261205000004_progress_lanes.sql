-- The live projector applies two batches at a time, each from its own lane
-- (the streams are split between them), and each lane records its builders'
-- progress in a row of its own, so the two never wait on each other's
-- progress rows. A builder's progress is the furthest of its lanes.
ALTER TABLE projection_progress ADD COLUMN lane smallint NOT NULL DEFAULT 0;
ALTER TABLE projection_progress DROP CONSTRAINT projection_progress_pkey;
ALTER TABLE projection_progress ADD PRIMARY KEY (projection, lane);
