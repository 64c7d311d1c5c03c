-- depends: 0001_initial
-- How often each outbox row was published, so that requeueing the record of a task that is
-- still pending backs off (a long consumer outage must not multiply the backlog).

ALTER TABLE outbox ADD COLUMN publish_count INTEGER NOT NULL DEFAULT 0;
UPDATE outbox SET publish_count = 1 WHERE published_at IS NOT NULL;

-- The stale-task check looks for pending tasks by age.
CREATE INDEX moderation_results_pending_created_idx ON moderation_results (created_at)
    WHERE status = 'pending';
