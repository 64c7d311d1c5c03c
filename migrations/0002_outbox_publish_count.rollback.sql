DROP INDEX moderation_results_pending_created_idx;
ALTER TABLE outbox DROP COLUMN publish_count;
