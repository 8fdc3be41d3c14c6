-- Erasure of deleted profiles from the change log, and its retention. Portable SQL.

-- The last display name and bio of a deleted profile, shown only on its live DELETED event:
-- the stored log is erased (display_name and bio emptied in every event of the profile) in the
-- transaction that deletes it, and this row goes once every replica's live feed has read it.
CREATE TABLE deleted_tail (
    sequence     BIGINT PRIMARY KEY,
    display_name TEXT   NOT NULL,
    bio          TEXT   NOT NULL,
    erase_after  BIGINT NOT NULL
);

-- Events up to this sequence have been removed by the retention policy.
ALTER TABLE event_sequence ADD COLUMN pruned_through BIGINT NOT NULL DEFAULT 0;

CREATE INDEX user_events_by_user ON user_events (user_id);
CREATE INDEX user_events_by_time ON user_events (occur_time);
